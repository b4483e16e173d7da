"""Export and import of One4D's trainable parts.

Layout of an export folder:
- `lora_<branch>.safetensors` per branch (`rgb`, `xyz`; `shared` for the ablations): diffusers/PEFT LoRA
  keys (`transformer.blocks.0.attn1.to_q.lora_A.weight`) with diffusers' adapter metadata, so
  `WanTransformer3DModel.load_lora_adapter(path)` and `WanPipeline.load_lora_weights(path)` take it as is.
  The LoRA scale alpha/rank is folded into lora_B: tools that assume alpha == rank read it correctly.
- `control_links.safetensors`: the paper's links group (control links and the XYZ patch embedding),
  `io.safetensors`: the channel-concat design's widened patch embedding and head; both under the
  One4D model's own parameter names.
- `adapter_config.json`: design, preset, branches, rank/alpha/dropout/targets, link blocks, files, and the frozen
  base trained on (`base`: model.checkpoint's path and content fingerprint, "random-seed-N" for the tiny preset's
  seeded base), which `one4d eval` and `model.init_adapters` compare with the base they are given; the data window
  trained at and the settings that pick the held-out samples (`data`), which `one4d eval` of the export takes; and,
  in an export of `one4d export`, the checkpoint it holds (`source`: path, step, MLflow run).
"""
from __future__ import annotations

import json
import os
import re

import torch
from safetensors import SafetensorError, safe_open

from one4d_train.model.config import ModelConfig
from one4d_train.model.dlc import BRANCHES, SHARED
from one4d_train.model.params import parameter_group
from one4d_train.model.state_dict import diffusers_to_official, official_to_diffusers
from one4d_train.tensor_files import save_tensors

CONFIG_NAME = "adapter_config.json"
GROUP_FILES = {"links": "control_links.safetensors", "io": "io.safetensors"}
DIFFUSERS_PREFIX = "transformer."
# diffusers' key for its adapter metadata in the safetensors header (diffusers.loaders.lora_base)
LORA_METADATA_KEY = "lora_adapter_metadata"
_LORA_RE = re.compile(r"^base\.(blocks\.\d+\.(.+))\.(lora_[AB])$")
_LINK_RE = re.compile(r"^control_links\.links\.(\d+)\.")
_LORA_KEY_RE = re.compile(rf"^{re.escape(DIFFUSERS_PREFIX)}(.+)\.(lora_[AB])\.weight$")


def lora_file(branch: str) -> str:
    return f"lora_{branch}.safetensors"


def _save(tensors: dict[str, torch.Tensor], path: str, metadata: dict[str, str] | None = None):
    tmp = path + ".tmp"
    # clones: the branch slices of one stacked tensor must not share memory in the file
    save_tensors({k: v.detach().to("cpu", torch.float32).clone() for k, v in tensors.items()}, tmp,
              metadata={"format": "pt", **(metadata or {})})
    os.replace(tmp, path)


def base_record(identity: dict) -> dict:
    """An export's "base": the frozen base of a training task's identity (its path and content fingerprint)."""
    return {"checkpoint": identity.get("checkpoint", ""), "fingerprint": identity.get("fingerprint")}


# the data settings that shape what the adapters were trained on: an evaluation of the export samples at this window
WINDOW_KEYS = ("num_frames", "frame_stride", "height", "width", "pointmap_percentiles")
# the other data settings that pick the held-out samples an evaluation scores (the loader's shuffle buffer orders the
# set): recorded beside the window since a later release, absent from exports written before
SAMPLE_KEYS = ("shuffle_buffer",)


def data_window(dcfg) -> dict:
    """An export's "data": the training's clip window and pointmap normalisation, and the settings that pick the
    held-out samples (SAMPLE_KEYS) (data.* of the run's config)."""
    window = {k: list(getattr(dcfg, k)) if k == "pointmap_percentiles" else getattr(dcfg, k) for k in WINDOW_KEYS}
    return {**window, **{k: getattr(dcfg, k) for k in SAMPLE_KEYS}}


def design_branches(design: str) -> tuple[str, ...]:
    return BRANCHES if design == "dlc" else SHARED


def export_adapters(trainable_state: dict[str, torch.Tensor], cfg: ModelConfig, out_dir: str,
                    base: dict | None = None, window: dict | None = None) -> dict:
    """Write `trainable_state` (names as in `One4DModel.trainable_state_dict()`, e.g. gathered under ZeRO-3)
    to `out_dir`; returns the adapter config written next to the weights. `base`: the frozen base's
    {"checkpoint", "fingerprint"} (the training task's identity), recorded as the config's "base"; `window`: the
    training's data_window, recorded as its "data"."""
    scaling = cfg.lora.alpha / cfg.lora.rank
    branches = design_branches(cfg.design)
    lora: dict[str, dict[str, torch.Tensor]] = {}
    groups: dict[str, dict[str, torch.Tensor]] = {}
    targets, link_blocks = set(), set()
    if not any(_LORA_RE.match(name) for name in trainable_state):
        names = ", ".join(sorted(trainable_state)[:3]) + (" ..." if len(trainable_state) > 3 else "")
        raise AdapterError(f"no LoRA parameter of a One4D model among the trainable parameters ({names or 'none'}): "
                           "not a One4D checkpoint (another train.task)")
    for name, tensor in trainable_state.items():
        m = _LORA_RE.match(name)
        if m:
            module, target, ab = m.groups()
            if tensor.dim() != 3 or tensor.shape[0] != len(branches):
                raise AdapterError(f"{name} stacks {tensor.shape[0] if tensor.dim() == 3 else 'no'} branch adapters; "
                                   f"model.design {cfg.design} has {len(branches)} ({', '.join(branches)})")
            rank = tensor.shape[1] if ab == "lora_A" else tensor.shape[2]
            if rank != cfg.lora.rank:  # lora_B would be scaled by alpha / another rank, the metadata say another r
                raise AdapterError(f"{name} is of LoRA rank {rank}; model.lora.rank is {cfg.lora.rank}")
            key = f"{DIFFUSERS_PREFIX}{official_to_diffusers(module)}.{ab}.weight"
            for branch, t in zip(branches, tensor.float()):
                lora.setdefault(branch, {})[key] = t * scaling if ab == "lora_B" else t
            targets.add(target)
            continue
        group = parameter_group(name, trainable=True)
        if group not in GROUP_FILES:
            raise AdapterError(f"{name!r} is neither a LoRA, link nor io parameter of a One4D model")
        groups.setdefault(group, {})[name] = tensor
        if _LINK_RE.match(name):
            link_blocks.add(int(_LINK_RE.match(name).group(1)))

    os.makedirs(out_dir, exist_ok=True)
    files = {}
    for branch, tensors in lora.items():
        modules = sorted({k[len(DIFFUSERS_PREFIX):].rsplit(".", 2)[0] for k in tensors})
        metadata = {f"{DIFFUSERS_PREFIX}r": cfg.lora.rank, f"{DIFFUSERS_PREFIX}lora_alpha": cfg.lora.rank,
                    f"{DIFFUSERS_PREFIX}target_modules": modules}
        _save(tensors, os.path.join(out_dir, lora_file(branch)), {LORA_METADATA_KEY: json.dumps(metadata)})
        files[f"lora.{branch}"] = lora_file(branch)
    for group, tensors in sorted(groups.items()):
        _save(tensors, os.path.join(out_dir, GROUP_FILES[group]))
        files[group] = GROUP_FILES[group]
    config = {
        "design": cfg.design,
        "preset": cfg.preset,
        "has_image_input": cfg.has_image_input,
        "branches": list(branches),
        "lora": {"rank": cfg.lora.rank, "alpha": cfg.lora.alpha, "dropout": cfg.lora.dropout,
                 "targets": [t for t in cfg.lora.targets if t in targets],
                 "key_format": "diffusers WanTransformer3DModel, prefix 'transformer.'",
                 "scale_folded_into_lora_B": True},
        "link_blocks": sorted(link_blocks),
        # the precision it was trained in: an evaluation samples in it (another one scores other numbers)
        "compute_dtype": cfg.compute_dtype,
        "base_matmul": cfg.base_matmul,
        "xyz_patch_embedding": any(n.startswith("xyz_patch_embedding.") for n in groups.get("links", {})),
        "files": files,
    }
    if base:
        config["base"] = base_record(base)
    if window:
        config["data"] = dict(window)
    with open(os.path.join(out_dir, CONFIG_NAME), "w") as f:
        json.dump(config, f, indent=2)
    return config


class AdapterError(ValueError):
    """An export that cannot be read, or that does not fit the model it is loaded into."""


# what reading and loading an export rely on, with the JSON types they need
_CONFIG_KEYS = {"design": str, "preset": str, "has_image_input": bool, "branches": list, "lora.rank": int,
                "lora.alpha": (int, float), "link_blocks": list, "files": dict}


# the precision keys an export records, with the values ModelConfig takes
PRECISION_KEYS = {"compute_dtype": ("bf16", "fp32"), "base_matmul": ("bf16", "fp8")}


def _config_value(config, key: str):
    for part in key.split("."):
        if not isinstance(config, dict) or part not in config:
            raise KeyError(key)
        config = config[part]
    return config


def read_adapter_config(out_dir: str) -> dict:
    """adapter_config.json of an export, with every key that loading uses present and of its type."""
    path = os.path.join(out_dir, CONFIG_NAME)
    try:
        with open(path) as f:
            config = json.load(f)
    except FileNotFoundError:
        raise AdapterError(f"{path}: missing (not an export folder, or one not completely written)") from None
    except json.JSONDecodeError as exc:
        raise AdapterError(f"{path}: not valid JSON ({exc}); the file is damaged or was cut short") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise AdapterError(f"{path}: cannot be read ({exc})") from exc
    for key, kind in _CONFIG_KEYS.items():
        try:
            value = _config_value(config, key)
        except KeyError:
            raise AdapterError(f"{path}: no key {key!r}") from None
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            raise AdapterError(f"{path}: key {key!r} has the wrong type: {value!r}")
    if config["lora"]["rank"] < 1:
        raise AdapterError(f"{path}: key 'lora.rank' must be >= 1, got {config['lora']['rank']}")
    base = config.get("base")  # absent in exports written before they recorded it
    if base is not None and not (isinstance(base, dict) and isinstance(base.get("fingerprint"), str)
                                 and isinstance(base.get("checkpoint", ""), str)):
        raise AdapterError(f"{path}: key 'base' must be {{\"checkpoint\": path, \"fingerprint\": text}}, got {base!r}")
    if config["branches"] != list(design_branches(config["design"])):  # stacked in this order when loaded
        raise AdapterError(f"{path}: key 'branches' must be {list(design_branches(config['design']))} for design "
                           f"{config['design']!r}, got {config['branches']!r}")
    named = {f"lora.{b}": lora_file(b) for b in config["branches"]} | GROUP_FILES
    for group, filename in config["files"].items():  # the files as the export writes them: no branch swapped
        if named.get(group) != filename:
            raise AdapterError(f"{path}: key 'files' maps {group!r} to {filename!r}; an export names "
                               + (f"it {named[group]!r}" if group in named else f"only {sorted(named)}"))
    targets = config["lora"].get("targets")
    if targets is not None and not (isinstance(targets, list) and all(isinstance(t, str) for t in targets)):
        raise AdapterError(f"{path}: key 'lora.targets' must be a list of module names, got {targets!r}")
    for key, choices in PRECISION_KEYS.items():  # absent in exports written before they recorded them
        if key in config and config[key] not in choices:
            raise AdapterError(f"{path}: key {key!r} must be one of {list(choices)}, got {config[key]!r}")
    window = config.get("data")  # absent in exports written before they recorded it; later keys are left alone
    if window is not None and not (isinstance(window, dict) and set(WINDOW_KEYS) <= set(window) and all(
            isinstance(window[k], int) and not isinstance(window[k], bool) for k in WINDOW_KEYS[:4]) and
            isinstance(window["pointmap_percentiles"], list) and len(window["pointmap_percentiles"]) == 2 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in window["pointmap_percentiles"])):
        raise AdapterError(f"{path}: key 'data' must hold {', '.join(WINDOW_KEYS)} (whole numbers and a [lo, hi] "
                           f"pair), got {window!r}")
    for key in SAMPLE_KEYS if window is not None else ():  # absent in exports written before they recorded them
        if key in window and not (isinstance(window[key], int) and not isinstance(window[key], bool)
                                  and window[key] >= 0):
            raise AdapterError(f"{path}: key 'data.{key}' must be a whole number >= 0, got {window[key]!r}")
    return config


def _read_tensors(out_dir: str, config: dict) -> dict[str, torch.Tensor]:
    scaling = config["lora"]["alpha"] / config["lora"]["rank"]
    state, per_branch = {}, {}
    for group, filename in config["files"].items():
        path = os.path.join(out_dir, filename)
        if not os.path.isfile(path):
            raise AdapterError(f"{path}: missing (listed in {CONFIG_NAME} as {group!r})")
        try:
            with safe_open(path, framework="pt") as f:
                tensors = {key: f.get_tensor(key) for key in f.keys()}
        except (SafetensorError, OSError) as exc:
            raise AdapterError(f"{path}: not a readable safetensors file ({exc}); truncated or damaged") from exc
        for key, tensor in tensors.items():
            if group.startswith("lora."):
                m = _LORA_KEY_RE.match(key)
                if not m:
                    raise AdapterError(f"{path}: key {key!r} is not a diffusers LoRA key of this export format")
                module, ab = m.groups()
                name = f"base.{diffusers_to_official(module)}.{ab}"
                per_branch.setdefault(name, {})[group[5:]] = tensor / scaling if ab == "lora_B" else tensor
            else:
                state[key] = tensor
    for name, tensors in per_branch.items():
        if set(tensors) != set(config["branches"]):
            raise AdapterError(f"export {out_dir}: {name} has adapters {sorted(tensors)}, "
                               f"expected {config['branches']}")
        shapes = {b: tuple(tensors[b].shape) for b in config["branches"]}
        if len(set(shapes.values())) > 1:  # a branch's file copied in from another export
            raise AdapterError(f"export {out_dir}: {name} is " + ", ".join(
                f"{list(shape)} in {config['files']['lora.' + b]}" for b, shape in shapes.items())
                + ": the branches' files are of different exports")
        state[name] = torch.stack([tensors[b] for b in config["branches"]])
    return state


def read_adapters(out_dir: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """The adapter config and the tensors of an export, under the One4D model's parameter names (LoRA
    scale taken back out of lora_B). Raises AdapterError naming the file (and key) that is missing or damaged."""
    config = read_adapter_config(out_dir)
    return config, _read_tensors(out_dir, config)


def fit_problem(config: dict, mcfg: ModelConfig, link_blocks: list[int], out_dir: str) -> str | None:
    """Why the export `out_dir` (its adapter_config.json `config`) does not fit a model of `mcfg` linking
    `link_blocks`, None when it does."""
    ours = {"preset": mcfg.preset, "has_image_input": mcfg.has_image_input, "design": mcfg.design,
            "lora.rank": mcfg.lora.rank, "lora.alpha": mcfg.lora.alpha}
    # the backbone first: adapters made for another one differ in everything that follows
    for keys in (("preset", "has_image_input"), ("design",), ("lora.rank", "lora.alpha")):
        wrong = [f"{k} {_config_value(config, k)!r} (model.{k} {ours[k]!r})" for k in keys
                 if _config_value(config, k) != ours[k]]
        if wrong:
            return (f"the adapters of {out_dir} do not fit the model: {'; '.join(wrong)} ({CONFIG_NAME} vs the "
                    f"model config; set model.* to its values)")
    targets = config["lora"].get("targets")  # the targets that hold adapters (absent in early exports)
    if isinstance(targets, list) and targets and set(targets) != set(mcfg.lora.targets):
        return (f"the adapters of {out_dir} adapt {sorted(targets)}, the model (model.lora.targets) "
                f"{sorted(mcfg.lora.targets)}")
    xyz = config.get("xyz_patch_embedding")
    if mcfg.design == "dlc" and isinstance(xyz, bool) and xyz != mcfg.xyz_patch_embedding:
        return (f"the adapters of {out_dir} {'hold' if xyz else 'hold no'} XYZ patch embedding, the model "
                f"(model.xyz_patch_embedding) {'has one' if mcfg.xyz_patch_embedding else 'has none'}")
    if config["link_blocks"] != list(link_blocks):
        return (f"the adapters of {out_dir} link blocks {config['link_blocks']}, the model (model.link_blocks / "
                f"model.num_links) {list(link_blocks)}")
    return None


def load_adapters(model: torch.nn.Module, out_dir: str) -> dict:
    """Copy an export into `model` (a One4DModel of the same design, preset and LoRA shape); every trainable
    parameter must be covered and nothing else may be present. Returns the adapter config."""
    config = read_adapter_config(out_dir)
    problem = fit_problem(config, model.cfg, model.link_blocks, out_dir)
    if problem:
        raise AdapterError(problem)
    state = _read_tensors(out_dir, config)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing = sorted(set(params) - set(state))
    unexpected = sorted(set(state) - set(params))
    wrong = [f"{n}: export {tuple(state[n].shape)} vs model {tuple(p.shape)}"
             for n, p in params.items() if n in state and state[n].shape != p.shape]
    if missing or unexpected or wrong:
        raise AdapterError(f"export {out_dir} does not match the model: missing {missing[:10]} "
                           f"({len(missing)}), unexpected {unexpected[:10]} ({len(unexpected)}), shapes {wrong[:10]}")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state[name].to(p.device, p.dtype))
    return config
