"""The DeepSpeed config, generated from ours; `train.deepspeed_overrides` is deep-merged on top and every key it
changes is reported, so there is no second hand-kept JSON that can disagree.

Overrides are for DeepSpeed's own tuning keys (bucket sizes, overlap, offload, logging ...). An override that
changes a key the trainer derives from train.* / optim.* or relies on is refused, naming the key to set instead
(an accumulation or batch size of DeepSpeed's own made the trainer count every other step as skipped and log the
wrong global batch), and so is a top-level key DeepSpeed does not read (a misspelt section was silently ignored).
Which keys DeepSpeed reads is taken from DeepSpeed itself: its config class parses the merged config once while
the keys it looks up are recorded; the parse also refuses bad values and unknown keys inside its sections.
"""
from __future__ import annotations

import contextlib
import copy
import difflib
import logging
from typing import Any

from one4d_train.configtools import ConfigError

KEY = "train.deepspeed_overrides"
BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
# DeepSpeed keys the trainer sets from our config or relies on -> why an override may not change them
TRAINER_KEYS: dict[tuple[str, ...], str] = {
    ("train_batch_size",): "set from train.micro_batch_size x train.grad_accum x world size: set train.micro_batch_size "
                           "or train.grad_accum instead",
    ("train_micro_batch_size_per_gpu",): "set from train.micro_batch_size: set that instead",
    ("gradient_accumulation_steps",): "set from train.grad_accum (the trainer counts a step per accumulation window): "
                                      "set train.grad_accum instead",
    ("managed_gradient_accumulation",): "the trainer's step counting needs DeepSpeed to accumulate: set "
                                        "train.grad_accum instead",
    ("zero_optimization", "stage"): "set from train.zero_stage (the model is built for that stage): set that instead",
    ("zero_optimization", "stage3_param_persistence_threshold"): "set from train.zero3_param_persistence_threshold: "
                                                                 "set that instead",
    ("bf16", "enabled"): "set from train.precision: set that instead",
    ("fp16", "enabled"): "the precision is train.precision (bf16 | fp32): set that instead",
    ("bf16", "check_grad_overflow"): "the trainer skips a non-finite step through this check (train.max_bad_steps)",
    ("gradient_clipping",): "set from optim.grad_clip: set that instead",
    ("optimizer",): "the trainer passes its own AdamW: set optim.lr, optim.betas, optim.eps, optim.weight_decay",
    ("scheduler",): "the trainer passes its own LR schedule: set optim.schedule, optim.warmup_steps, "
                    "optim.min_lr_ratio",
    ("zero_allow_untested_optimizer",): "the trainer's torch AdamW needs it",
    ("zero_force_ds_cpu_optimizer",): "the trainer's torch AdamW steps the state offload_optimizer offloads: "
                                      "DeepSpeed refuses it with this true",
    ("zero_optimization", "elastic_checkpoint"): "a resume verifies each rank's own optimizer partition against its "
                                                 "CRC-32 before loading it; elastic checkpoints make every rank load "
                                                 "all of them",
}

# DeepSpeed (0.19.8) settings that decide how ZeRO flattens and partitions the optimizer state it checkpoints, with
# the stages that read them (stage_1_and_2.py, stage3.py): a resume under another value loaded the state into the
# wrong places (ZeRO-2 round_robin_gradients: the next step's loss 7.6% off) or failed inside DeepSpeed (ZeRO-3
# sub_group_size). Bucket sizes, prefetch, overlap and persistence thresholds only move work around: they may change.
LAYOUT_KEYS: dict[tuple[str, ...], tuple[int, ...]] = {
    ("zero_optimization", "round_robin_gradients"): (1, 2),  # the parameters' order in the flat partitions
    ("zero_optimization", "parameter_alignment"): (1, 2),  # padding between the parameters in them
    ("zero_optimization", "sub_group_size"): (3,),  # the sub-groups the optimizer state is split into
    ("zero_optimization", "zero_hpz_partition_size"): (3,),  # a secondary partition of the parameters
    ("zero_optimization", "offload_param", "device"): (3,),
    ("zero_optimization", "offload_optimizer", "device"): (1, 2, 3),  # where the state lives, and in what form
    ("zero_optimization", "offload_optimizer", "ratio"): (3,),  # which sub-groups are offloaded
    ("zero_optimization", "offload_optimizer", "super_offload"): (3,),  # another optimizer class
    ("zero_optimization", "zenflow"): (1, 2, 3),  # another optimizer class, with state of its own
    ("bf16", "bf16_master_weights_and_grads"): (1, 2, 3),  # the master weights' dtype
    ("bf16", "bf16_optimizer_states"): (1, 2, 3),  # the optimizer state's dtype
}


def base_config(cfg, world_size: int) -> dict[str, Any]:
    t, o = cfg.train, cfg.optim
    zero: dict[str, Any] = {"stage": t.zero_stage, "overlap_comm": True, "contiguous_gradients": True}
    if t.zero_stage == 3:
        zero.update(stage3_param_persistence_threshold=t.zero3_param_persistence_threshold,
                    stage3_gather_16bit_weights_on_model_save=False)
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.micro_batch_size * t.grad_accum * world_size,
        "zero_optimization": zero,
        "bf16": {"enabled": t.precision == "bf16"},
        "gradient_clipping": o.grad_clip,
        "zero_allow_untested_optimizer": True,  # our torch AdamW: no fused-op build, also on CPU
        # and it steps the offloaded state too (DeepSpeed refused it under offload_optimizer, at the engine build)
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def merge(base: dict, overrides: dict, prefix: str = "") -> tuple[dict, list[str]]:
    """Deep-merge `overrides` into a copy of `base`; return it and the dotted keys whose value was set or changed."""
    out, changed = copy.deepcopy(base), []
    for key, value in overrides.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key], sub = merge(out[key], value, path + ".")
            changed += sub
        else:
            if out.get(key, object()) != value:
                changed.append(f"{path}: {out.get(key, '<unset>')!r} -> {value!r}")
            out[key] = copy.deepcopy(value)
    return out, changed


def problems(cfg, world_size: int) -> list[tuple[str, str]]:
    """[(train.deepspeed_overrides.KEY, problem)]: overrides of the trainer's keys, else what DeepSpeed refuses or
    does not read."""
    overrides = dict(cfg.train.deepspeed_overrides)
    found = _trainer_keys_changed(base_config(cfg, world_size), overrides)
    return found or _deepspeed_problems(cfg, overrides)


def build(cfg, world_size: int) -> tuple[dict, list[str]]:
    found = problems(cfg, world_size)
    if found:
        raise ConfigError("\n".join(f"key '{key}': {problem}" for key, problem in found))
    return merge(base_config(cfg, world_size), dict(cfg.train.deepspeed_overrides))


def optimizer_layout(train) -> dict[str, Any]:
    """{dotted LAYOUT_KEYS key: value} of the keys `train`'s ZeRO stage reads, as DeepSpeed runs them under
    `train` (TrainConfig): its stage and precision with train.deepspeed_overrides merged, DeepSpeed's defaults filled
    in and its older spellings read (cpu_offload ...), as JSON values. Every checkpoint records it; a resume under
    another is refused by key (train/config.py resume_problems). {} for overrides DeepSpeed refuses (`problems`
    reports them)."""
    from deepspeed.runtime.precision_config import DeepSpeedBF16Config
    from deepspeed.runtime.zero import offload_config
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    base = {"zero_optimization": {"stage": train.zero_stage}, "bf16": {"enabled": train.precision == "bf16"}}
    merged, _ = merge(base, dict(train.deepspeed_overrides))
    try:
        with _quiet():
            zero = DeepSpeedZeroConfig(**merged["zero_optimization"]).model_dump(mode="json")
            bf16 = DeepSpeedBF16Config(**merged["bf16"]).model_dump(mode="json")
            for name, model in (("offload_optimizer", offload_config.DeepSpeedZeroOffloadOptimizerConfig),
                                ("offload_param", offload_config.DeepSpeedZeroOffloadParamConfig)):
                if zero[name] is None:  # no offload: its defaults (device none) say the same
                    zero[name] = model().model_dump(mode="json")
    except Exception:  # pydantic's ValidationError, a section replaced by a plain value (TypeError) ...
        return {}
    out = {}
    for path, stages in LAYOUT_KEYS.items():
        if train.zero_stage in stages:
            node = {"zero_optimization": zero, "bf16": bf16}
            for part in path:
                node = node[part]
            out[".".join(path)] = node
    return out


_ABSENT = object()


def _trainer_keys_changed(base: dict, overrides: dict) -> list[tuple[str, str]]:
    out, mapping_needed = [], {}
    for path, why in TRAINER_KEYS.items():
        node = overrides
        for depth, part in enumerate(path):
            if not isinstance(node, dict):  # a section replaced by a plain value
                mapping_needed.setdefault(path[:depth], why)
                break
            names = _names(path[:depth], part)
            given = [n for n in names if n in node]
            if not given:
                break
            if depth == len(path) - 1:
                if node[given[0]] != _trainer_value(base, path):
                    out.append((".".join((KEY,) + path[:depth] + (given[0],)), f"{why} (got {node[given[0]]!r})"))
            else:
                node = node[given[0]]
    for section, why in mapping_needed.items():
        out.append((".".join((KEY,) + section), f"must be a mapping: it holds keys the trainer sets ({why})"))
    return out


def _names(section: tuple[str, ...], key: str) -> tuple[str, ...]:
    """`key` and its other spelling in DeepSpeed's pydantic model of `section` (field name vs alias)."""
    if section != ("zero_optimization",):
        return (key,)
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    for name, info in DeepSpeedZeroConfig.model_fields.items():
        if key in (name, info.alias):
            return tuple(dict.fromkeys((key, name, info.alias or name)))
    return (key,)


def _trainer_value(base: dict, path: tuple[str, ...]):
    """The value the trainer runs with: in the generated config, else DeepSpeed's default."""
    node = base
    for part in path:
        if not isinstance(node, dict) or part not in node:
            return _deepspeed_default(path)
        node = node[part]
    return node


def _deepspeed_default(path: tuple[str, ...]):
    from deepspeed.runtime import constants
    from deepspeed.runtime.precision_config import DeepSpeedBF16Config, DeepSpeedFP16Config

    models = {"bf16": DeepSpeedBF16Config, "fp16": DeepSpeedFP16Config}
    if len(path) == 2 and path[0] in models:
        return models[path[0]].model_fields[path[1]].get_default()
    if path == ("managed_gradient_accumulation",):
        return constants.MANAGED_GRADIENT_ACCUMULATION_DEFAULT
    if path == ("zero_optimization", "elastic_checkpoint"):
        from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
        return DeepSpeedZeroConfig.model_fields["elastic_checkpoint"].get_default()
    return _ABSENT  # the trainer leaves it unset: any value changes it


class _Keys:
    """`dict.keys()` of a _ReadRecorder: membership tests are recorded too (DeepSpeed writes `k in d.keys()`)."""

    def __init__(self, owner: "_ReadRecorder"):
        self.owner = owner

    def __contains__(self, key) -> bool:
        return self.owner.__contains__(key)

    def __iter__(self):
        return iter(dict.keys(self.owner))

    def __len__(self) -> int:
        return dict.__len__(self.owner)


class _ReadRecorder(dict):
    """A config dict that records every top-level key looked up (DeepSpeedConfig's shallow copy shares `seen`)."""

    def __init__(self, data: dict, seen: set[str]):
        super().__init__(data)
        self.seen = seen

    def __getitem__(self, key):
        self.seen.add(key)
        return super().__getitem__(key)

    def get(self, key, default=None):
        self.seen.add(key)
        return super().get(key, default)

    def __contains__(self, key) -> bool:
        self.seen.add(key)
        return super().__contains__(key)

    def keys(self):
        return _Keys(self)


class _OneRank:
    """DeepSpeedConfig's world size for the trial parse (the batch keys are the trainer's, checked above)."""

    @staticmethod
    def get_data_parallel_world_size() -> int:
        return 1


@contextlib.contextmanager
def _quiet():
    from deepspeed.utils import logger

    level = logger.level
    logger.setLevel(logging.WARNING)  # its info line names the trial's world size of 1
    try:
        yield
    finally:
        logger.setLevel(level)


def _accepted_but_failing(ds) -> list[tuple[str, str]]:
    """Values DeepSpeed's config accepts and its engine then fails on: NVMe offload without nvme_path (a TypeError
    in the engine's build), steps_per_print 0 (a ZeroDivisionError in the first step)."""
    out = []
    zero = ds.zero_config
    for name in ("offload_optimizer", "offload_param"):
        offload = getattr(zero, name, None)
        if offload is not None and str(getattr(offload.device, "value", offload.device)) == "nvme" \
                and not offload.nvme_path:
            out.append((f"{KEY}.zero_optimization.{name}.nvme_path",
                        "device nvme needs nvme_path, a folder on the NVMe drive"))
    if ds.steps_per_print is not None and ds.steps_per_print < 1:  # (None: DeepSpeed's own default, no prints)
        out.append((f"{KEY}.steps_per_print", f"must be >= 1, got {ds.steps_per_print}"))
    return out


def _deepspeed_problems(cfg, overrides: dict) -> list[tuple[str, str]]:
    import deepspeed
    from deepspeed.runtime.config import DeepSpeedConfig

    trial, _ = merge(base_config(cfg, 1), {k: v for k, v in overrides.items() if k not in BATCH_KEYS})
    seen: set[str] = set()
    try:
        with _quiet():
            ds = DeepSpeedConfig(_ReadRecorder(trial, seen), mpu=_OneRank())
    except Exception as exc:  # pydantic ValidationError, DeepSpeedConfigError, AssertionError, ValueError ...
        text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip() and "pydantic.dev" not in line)
        return [(KEY, f"DeepSpeed {deepspeed.__version__} refuses the merged config: {text or type(exc).__name__}")]
    out = _accepted_but_failing(ds)
    for key in overrides:
        if key not in seen:
            close = difflib.get_close_matches(key, sorted(seen), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            out.append((f"{KEY}.{key}", f"not a key DeepSpeed {deepspeed.__version__} reads (misspelt, or ignored "
                        f"with this config){hint}"))
    return out
