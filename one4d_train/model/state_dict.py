"""Wan2.1 DiT weights: official <-> diffusers key names, and streaming loading from local files.

Official names are ours (`blocks.0.self_attn.q.weight`); diffusers names are those of diffusers'
`WanTransformer3DModel` (`blocks.0.attn1.to_q.weight`), taken from its source and its own converter
(`diffusers.loaders.single_file_utils.convert_wan_transformer_to_diffusers`). Both functions map parameter
names and module names (`blocks.0.self_attn.q` <-> `blocks.0.attn1.to_q`).
"""
from __future__ import annotations

import glob
import functools
import hashlib
import json
import math
import os
import re

import torch
from torch import nn

from one4d_train.model.presets import WanConfig
from one4d_train.model.pretrained import load_state_dict, open_safetensors

# the dtypes a checkpoint's weights may come in (safetensors' names, torch's)
FULL_FLOAT_NAMES = ("F64", "F32", "F16", "BF16")
FULL_FLOATS = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
QUANTISED = "not 16/32/64-bit floating-point (a quantised checkpoint? use the bf16 or fp32 release)"

# (official prefix, diffusers prefix); prefixes match whole dot-separated components
_TOP = [
    ("text_embedding.0", "condition_embedder.text_embedder.linear_1"),
    ("text_embedding.2", "condition_embedder.text_embedder.linear_2"),
    ("time_embedding.0", "condition_embedder.time_embedder.linear_1"),
    ("time_embedding.2", "condition_embedder.time_embedder.linear_2"),
    ("time_projection.1", "condition_embedder.time_proj"),
    ("img_emb.proj.0", "condition_embedder.image_embedder.norm1"),
    ("img_emb.proj.1", "condition_embedder.image_embedder.ff.net.0.proj"),
    ("img_emb.proj.3", "condition_embedder.image_embedder.ff.net.2"),
    ("img_emb.proj.4", "condition_embedder.image_embedder.norm2"),
    ("head.head", "proj_out"),
    ("head.modulation", "scale_shift_table"),
    ("head.norm", "norm_out"),
    ("patch_embedding", "patch_embedding"),
]
_BLOCK = [
    ("self_attn.q", "attn1.to_q"), ("self_attn.k", "attn1.to_k"), ("self_attn.v", "attn1.to_v"),
    ("self_attn.o", "attn1.to_out.0"), ("self_attn.norm_q", "attn1.norm_q"), ("self_attn.norm_k", "attn1.norm_k"),
    ("cross_attn.q", "attn2.to_q"), ("cross_attn.k", "attn2.to_k"), ("cross_attn.v", "attn2.to_v"),
    ("cross_attn.o", "attn2.to_out.0"), ("cross_attn.norm_q", "attn2.norm_q"), ("cross_attn.norm_k", "attn2.norm_k"),
    ("cross_attn.k_img", "attn2.add_k_proj"), ("cross_attn.v_img", "attn2.add_v_proj"),
    ("cross_attn.norm_k_img", "attn2.norm_added_k"),
    ("self_attn", "attn1"), ("cross_attn", "attn2"),
    # Wan calls the cross-attention norm norm3 and the FFN norm norm2; diffusers the other way round
    ("norm1", "norm1"), ("norm3", "norm2"), ("norm2", "norm3"),
    ("ffn.0", "ffn.net.0.proj"), ("ffn.2", "ffn.net.2"), ("ffn", "ffn"),
    ("modulation", "scale_shift_table"),
]
_BLOCK_RE = re.compile(r"^blocks\.(\d+)(?:\.(.*))?$")
# official files repackaged for other tools carry this prefix
_STRIP_PREFIXES = ("model.diffusion_model.",)
# diffusers ignores these on load (an unused norm in some Wan I2V diffusers exports)
_DIFFUSERS_IGNORED = ("norm_added_q",)


# container modules map only as whole names: what lies under them is named by the rules above
_CONTAINERS = {"self_attn", "cross_attn", "ffn", "attn1", "attn2"}


def _rename(name: str, table: list[tuple[str, str]], src: int) -> str | None:
    for pair in table:
        prefix = pair[src]
        if name == prefix or (name.startswith(prefix + ".") and prefix not in _CONTAINERS):
            return pair[1 - src] + name[len(prefix):]
    return None


def _convert(name: str, src: int) -> str:
    m = _BLOCK_RE.match(name)
    if m:
        rest = m.group(2)
        new = None if rest is None else _rename(rest, _BLOCK, src)
        if rest is None or new is not None:
            return f"blocks.{m.group(1)}" + ("" if rest is None else "." + new)
    elif name == "blocks":
        return name
    else:
        new = _rename(name, _TOP, src)
        if new is not None:
            return new
    raise KeyError(f"not a Wan2.1 DiT {('official', 'diffusers')[src]} name: {name!r}")


def official_to_diffusers(name: str) -> str:
    """`blocks.0.cross_attn.k_img.weight` -> `blocks.0.attn2.add_k_proj.weight` (KeyError if not a DiT name)."""
    return _convert(name, 0)


def diffusers_to_official(name: str) -> str:
    """`blocks.0.attn2.add_k_proj.weight` -> `blocks.0.cross_attn.k_img.weight` (KeyError if not a DiT name)."""
    return _convert(name, 1)


# ---- files -------------------------------------------------------------------------------------------------

def checkpoint_files(path: str) -> list[str]:
    """The weight files of a checkpoint given as a .safetensors/.pt/.pth file, a *.safetensors.index.json, a
    folder of shards (official or diffusers), or a diffusers pipeline folder with a `transformer/` subfolder."""
    if os.path.isfile(path):
        if path.endswith(".json"):
            files = [os.path.join(os.path.dirname(path), s) for s in sorted(set(_weight_map(path).values()))]
            absent = [f for f in files if not os.path.isfile(f)]
            if absent:
                raise FileNotFoundError(f"{path} names {len(absent)} shard file(s) that are not there: "
                                        f"{', '.join(absent[:3])}{' ...' if len(absent) > 3 else ''}")
            return files
        return [path]
    if not os.path.isdir(path):
        raise FileNotFoundError(f"backbone checkpoint not found: {path}")
    indexes = sorted(glob.glob(os.path.join(path, "*.safetensors.index.json")))
    preferred = os.path.join(path, "diffusion_pytorch_model.safetensors.index.json")
    if preferred in indexes:
        return checkpoint_files(preferred)
    if len(indexes) == 1:
        return checkpoint_files(indexes[0])
    if len(indexes) > 1:
        raise ValueError(f"{path}: several shard indexes, pass one of them: {[os.path.basename(i) for i in indexes]}")
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if files:
        return files
    if os.path.isdir(os.path.join(path, "transformer")):
        return checkpoint_files(os.path.join(path, "transformer"))
    raise FileNotFoundError(f"{path}: no *.safetensors weights (nor a shard index, nor a transformer/ subfolder)")


def checkpoint_fingerprint(path: str, blocks: int = 16, block_bytes: int = 1 << 16) -> str:
    """A content fingerprint of a backbone checkpoint, cheap enough for every start: each weight file's size and
    `blocks` evenly spaced blocks of its bytes, hashed (about 1 MB read per file, not the 28 GB). Another checkpoint
    of the same architecture (another fine-tune, another precision) differs; the same files at another path agree."""
    return files_fingerprint(checkpoint_files(path), blocks, block_bytes)


VAE_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")  # diffusers' order of preference


def vae_files(path: str) -> list[str]:
    """The files the latents of the VAE `path` (model.vae) depend on: an official weights file itself, or a diffusers
    folder's config.json and the weights diffusers loads from it (none listed where the folder has none)."""
    if os.path.isfile(path):
        return [path]
    weights = [os.path.join(path, n) for n in VAE_WEIGHTS if os.path.isfile(os.path.join(path, n))][:1]
    index = os.path.join(path, f"{VAE_WEIGHTS[0]}.index.json")
    if not weights and os.path.isfile(index):
        weights = checkpoint_files(index)
    return [os.path.join(path, "config.json")] + weights


def vae_fingerprint(path: str) -> str | None:
    """A content fingerprint of the VAE `path` (files_fingerprint of vae_files: ~1 MB read of a 500 MB file): the same
    files at another path (a node-local copy) agree, other weights at the same path differ. None for the tiny random
    VAE (empty path: its seed identifies it) and where the files cannot be read (model_file_problems names them)."""
    if not path:
        return None
    try:
        files = vae_files(path)
        return files_fingerprint(files) if len(files) > 1 or os.path.isfile(path) else None
    except (OSError, ValueError):
        return None


def model_folder_files(path: str) -> list[str]:
    """A weights file itself, or a model folder's config.json and weight files (*.safetensors, *.bin), by name."""
    if os.path.isfile(path):
        return [path]
    return [os.path.join(path, n) for n in sorted(os.listdir(path))
            if n == "config.json" or n.endswith((".safetensors", ".bin"))]


def model_folder_fingerprint(path: str) -> str | None:
    """files_fingerprint of a model folder's config.json and weight files (*.safetensors, *.bin, by name), or of a
    weights file itself: the same files at another path agree (a node-local copy of the text encoder). None where
    there are no weights to read."""
    try:
        files = model_folder_files(path)
        if [os.path.basename(f) for f in files] in ([], ["config.json"]):
            return None
        stamp = tuple((f, st.st_size, st.st_mtime_ns) for f in files for st in [os.stat(f)])
        return _fingerprint_of(stamp)
    except OSError:
        return None


@functools.lru_cache(maxsize=64)  # compared per stored sample where an older index names the VAE by path alone
def _fingerprint_of(stamp: tuple) -> str:
    return files_fingerprint([f for f, _, _ in stamp])


def files_fingerprint(files: list[str], blocks: int = 16, block_bytes: int = 1 << 16) -> str:
    """checkpoint_fingerprint of the weight files `files`, in order."""
    h = hashlib.sha256()
    for f in files:
        size = os.path.getsize(f)
        h.update(size.to_bytes(8, "little"))
        with open(f, "rb") as fh:
            for i in range(blocks):
                fh.seek(max(0, size - block_bytes) * i // max(1, blocks - 1))
                h.update(fh.read(block_bytes))
    return h.hexdigest()[:20]


def _weight_map(index: str) -> dict[str, str]:
    """The `weight_map` {tensor name: shard file} of a *.safetensors.index.json."""
    try:
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
    except (ValueError, KeyError, TypeError) as exc:  # JSONDecodeError is a ValueError
        raise ValueError(f"{index}: not a safetensors shard index (JSON with a 'weight_map'): "
                         f"{type(exc).__name__}: {exc}") from None
    if not isinstance(weight_map, dict):
        raise ValueError(f"{index}: its 'weight_map' is not a {{tensor name: shard file}} object")
    return weight_map


class _TensorSource:
    """Read-one-tensor-at-a-time access to one weight file (safetensors lazily; torch files memory-mapped and
    loaded with weights_only=True: nothing but tensors and plain containers is unpickled)."""

    def __init__(self, path: str, device: str = "cpu"):
        self.path = path
        if path.endswith(".safetensors"):
            self._file, self._tensors = open_safetensors(path, device), None
        else:
            self._tensors = load_state_dict(path)

    def keys(self) -> list[str]:
        return list(self._file.keys() if self._tensors is None else self._tensors.keys())

    def shape(self, key: str) -> tuple[int, ...]:
        if self._tensors is None:
            return tuple(self._file.get_slice(key).get_shape())
        return tuple(self._tensors[key].shape)

    def is_float(self, key: str) -> bool:
        """Whether the tensor holds 16- to 64-bit floating-point values (safetensors: from the header, no data
        read); 8-bit floats (F8_E4M3 ...) are a quantised export's codes, whose scales live elsewhere."""
        if self._tensors is None:
            return self._file.get_slice(key).get_dtype() in FULL_FLOAT_NAMES
        return self._tensors[key].dtype in FULL_FLOATS

    def get(self, key: str) -> torch.Tensor:
        return self._file.get_tensor(key) if self._tensors is None else self._tensors[key]


def _strip(key: str) -> str:
    for prefix in _STRIP_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def _is_diffusers(keys: list[str]) -> bool:
    """Diffusers names where more keys read as only diffusers' than as only Wan's (not any one: a diffusers-named
    LoRA file beside official shards would turn the naming of all of them)."""
    diffusers = sum(k.startswith("condition_embedder.") or ".attn1." in k or k == "proj_out.weight" for k in keys)
    official = sum(k.startswith(("text_embedding.", "time_embedding.", "head.")) or ".self_attn." in k for k in keys)
    return diffusers > official


def _index(sources: list[_TensorSource]):
    """{official name: (source, raw name)} over all files, the raw names that are not DiT weights, and the
    names found in more than one file. The naming is decided over all files: one diffusers shard may hold only
    keys (`blocks.3.norm2.weight`) that read as official names too."""
    keys = [(src, raw, _strip(raw)) for src in sources for raw in src.keys()]
    diffusers = _is_diffusers([k for _, _, k in keys])
    found, unknown, duplicated = {}, [], []
    for src, raw, key in keys:
        if diffusers and any(part in key for part in _DIFFUSERS_IGNORED):
            continue
        try:
            official = diffusers_to_official(key) if diffusers else key
            official_to_diffusers(official)  # raises for names that are not DiT weights
        except KeyError:
            unknown.append(raw)
            continue
        if official in found:
            duplicated.append(official)
        found[official] = (src, raw)
    return found, unknown, duplicated


def _listing(title: str, keys: list[str], limit: int = 20) -> str:
    shown = ", ".join(sorted(keys)[:limit])
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return f"{title} ({len(keys)}): {shown}{more}"


def open_backbone_checkpoint(path: str, expected: dict[str, tuple[int, ...]]):
    """Index a Wan2.1 DiT checkpoint (official or diffusers names, any layout `checkpoint_files` accepts) against
    `expected` {official name: shape}, reading no tensor data. Every expected name must be matched by exactly one
    checkpoint tensor of that shape and vice versa, else the error lists missing/unexpected keys. Returns
    `get(name) -> tensor`, reading one tensor at a time (for loading into partitioned or meta parameters)."""
    sources = [_TensorSource(f) for f in checkpoint_files(path)]
    found, unexpected, duplicated = _index(sources)
    unexpected += [found[k][1] for k in found if k not in expected]
    missing = [k for k in expected if k not in found]
    wrong = [f"{k}: checkpoint {found[k][0].shape(found[k][1])} vs model {tuple(shape)}"
             for k, shape in expected.items() if k in found and found[k][0].shape(found[k][1]) != tuple(shape)]
    # integer or 8-bit float tensors (a quantised export) would be cast to the compute dtype as if they were the
    # weights' values (an fp8 file without its scales loads ~3% off every weight, silently)
    not_float = [k for k in expected if k in found and not found[k][0].is_float(found[k][1])]
    if missing or unexpected or duplicated or wrong or not_float:
        problems = [_listing(t, ks) for t, ks in (("missing keys", missing), ("unexpected keys", unexpected),
                                                   ("keys in several files", duplicated),
                                                   ("shape mismatches", wrong),
                                                   (QUANTISED, not_float)) if ks]
        if len(sources) > 1 and unexpected:  # a VAE, LoRA or other model's file beside the DiT's in its folder
            names = set(unexpected)
            counts = [(os.path.basename(src.path), sum(raw in names for raw in src.keys())) for src in sources]
            used = {id(src) for k, (src, _) in found.items() if k in expected}
            strays = [os.path.basename(src.path) for src in sources if id(src) not in used]
            problems.append("unexpected keys by file: " + ", ".join(f"{n} ({c})" for n, c in counts if c)
                            + (f"; holding none of the model's weights: {', '.join(strays)} (not part of this "
                               "checkpoint? move them out of the folder, or point model.checkpoint at the DiT's "
                               "file or *.safetensors.index.json)" if strays else ""))
        raise RuntimeError(f"backbone checkpoint {path} does not match the model:\n  " + "\n  ".join(
            problems + _kind_hints(found, expected, missing)))

    def get(name: str) -> torch.Tensor:
        src, raw = found[name]
        return src.get(raw)

    return get


def _kind_hints(found: dict, expected: dict[str, tuple[int, ...]], missing: list[str]) -> list[str]:
    """What a mismatch says about the checkpoint: another model size, text-to-video weights, or image
    cross-attention on one side only (model.has_image_input)."""
    hints, key = [], "patch_embedding.weight"
    if key in found and key in expected:
        (dim, in_dim, *_), (want_dim, want_in, *_) = found[key][0].shape(found[key][1]), expected[key]
        if dim != want_dim:
            hints.append(f"the checkpoint's hidden size is {dim}, the model's {want_dim}: weights of another model "
                         "size (1.3B: 1536, 14B: 5120)")
        if in_dim != want_in:
            hints.append(f"the checkpoint's patch embedding takes {in_dim} input channels, the model's {want_in}"
                         + (": a text-to-video checkpoint; the image-to-video/InP one takes 36 (noise, mask and "
                            "condition latents)" if in_dim == 16 else ""))
    image_in_checkpoint = any(k.startswith("img_emb.") for k in found)
    image_in_model = any(k.startswith("img_emb.") for k in expected)
    if image_in_model and not image_in_checkpoint:
        hints.append("the checkpoint has no CLIP image cross-attention (img_emb, k_img/v_img), the model has "
                     "(model.has_image_input): text-to-video weights, or a base without CLIP image conditioning "
                     "(model.has_image_input=false for such a base)")
    elif image_in_checkpoint and not image_in_model:
        hints.append("the checkpoint has CLIP image cross-attention (img_emb, k_img/v_img), the model has not: "
                     "model.has_image_input=true for it (Wan2.1-Fun InP and I2V have it)")
    return hints


def load_backbone_weights(model: nn.Module, path: str, dtype: torch.dtype | None = None,
                          device: torch.device | str | None = None) -> None:
    """Load a Wan2.1 DiT checkpoint into `model` (a WanDiT), one tensor at a time; nothing is loaded unless every
    key matches (see `open_backbone_checkpoint`). Parameters on the meta device are replaced (on `device`, default
    cpu); others are copied into in place. `dtype` defaults to each parameter's current dtype."""
    params = dict(model.named_parameters())
    get = open_backbone_checkpoint(path, {k: tuple(p.shape) for k, p in params.items()})
    with torch.no_grad():
        for name, param in params.items():
            tensor = get(name)
            module_name, _, attr = name.rpartition(".")
            module = model.get_submodule(module_name)
            if param.is_meta:
                target = torch.device("cpu" if device is None else device)
                new = tensor.to(device=target, dtype=dtype or param.dtype)
                module._parameters[attr] = nn.Parameter(new, requires_grad=param.requires_grad)
            else:
                if dtype is not None and param.dtype != dtype:
                    param.data = param.data.to(dtype)
                param.copy_(tensor.to(param.device))
            del tensor


# ---- config inference ------------------------------------------------------------------------------------

def wan_config_from_checkpoint(path: str) -> WanConfig:
    """Infer the architecture from tensor shapes (no tensor data read); heads come from a config.json next to the
    weights (official `num_heads` or diffusers `num_attention_heads`), else head dim 128 as in every Wan2.1."""
    files = checkpoint_files(path)
    found, _, _ = _index([_TensorSource(f) for f in files])
    shapes = {k: src.shape(raw) for k, (src, raw) in found.items()}
    if "patch_embedding.weight" not in shapes:
        raise ValueError(f"{path}: no patch_embedding.weight: not a Wan2.1 DiT checkpoint")
    dim, in_dim, *patch = shapes["patch_embedding.weight"]
    num_layers = 1 + max(int(k.split(".")[1]) for k in shapes if k.startswith("blocks."))
    has_image_input = "img_emb.proj.1.weight" in shapes
    num_heads = _heads_from_config(os.path.dirname(files[0])) or dim // 128
    return WanConfig(
        in_dim=in_dim, dim=dim, ffn_dim=shapes["blocks.0.ffn.0.weight"][0], num_heads=num_heads,
        num_layers=num_layers, freq_dim=shapes["time_embedding.0.weight"][1],
        text_dim=shapes["text_embedding.0.weight"][1],
        out_dim=shapes["head.head.weight"][0] // math.prod(patch), patch_size=tuple(patch),
        qk_norm="blocks.0.self_attn.norm_q.weight" in shapes,
        cross_attn_norm="blocks.0.norm3.weight" in shapes, has_image_input=has_image_input,
        image_dim=shapes["img_emb.proj.0.weight"][0] if has_image_input else WanConfig.image_dim,
    )


def _heads_from_config(folder: str) -> int | None:
    cfg_path = os.path.join(folder, "config.json")
    if not os.path.isfile(cfg_path):
        return None
    with open(cfg_path) as f:
        cfg = json.load(f)
    return cfg.get("num_heads") or cfg.get("num_attention_heads")
