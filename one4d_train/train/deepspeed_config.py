"""The DeepSpeed config, generated from ours; `train.deepspeed_overrides` is deep-merged on top and every key it
changes is reported, so there is no second hand-kept JSON that can disagree."""
from __future__ import annotations

import copy
from typing import Any


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


def build(cfg, world_size: int) -> tuple[dict, list[str]]:
    return merge(base_config(cfg, world_size), dict(cfg.train.deepspeed_overrides))
