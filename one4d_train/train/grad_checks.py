"""Batched gradient checks for DeepSpeed's ZeRO-1/2 optimizer step.

DeepSpeed's ZeRO-1/2 step inspects every gradient tensor on its own, twice: a non-finite check (amax, amin,
isfinite and three more kernels per tensor) and the clipping norm (an fp64 copy and a norm per tensor). With
LoRA's hundreds of small trainable tensors that is thousands of kernel launches from Python per step (1.3B
preset: 732 tensors, ~0.3 s of host time against ~35 ms of GPU work, the GPU idle meanwhile). Here both become
one multi-tensor norm (`torch._foreach_norm`, fp64 results) over the step's gradients. A finite result proves
every gradient finite; a non-finite one (a NaN/inf gradient, or squares overflowing) hands the decision to
DeepSpeed's own per-tensor functions, so which steps are skipped, and the norm of any applied step up to fp
rounding, stay exactly DeepSpeed's.
"""
from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)
_ORIGINALS: dict[str, object] = {}


def _norms(grads: list[torch.Tensor]) -> torch.Tensor:
    """Per-tensor L2 norms (fp64), stacked; grads of different dtypes are grouped by the op itself."""
    return torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float64))


def _has_overflow_partitioned_grads_serial(self):
    grads = [g for i in range(len(self.bit16_groups)) for g in (self.averaged_gradients[i] or ()) if g is not None]
    if not grads:
        return torch.zeros(1, dtype=torch.bool, device=self.device)
    if bool(torch.isfinite(_norms(grads)).all()):
        return torch.zeros(1, dtype=torch.bool, device=grads[0].device)
    return _ORIGINALS["has_overflow_partitioned_grads_serial"](self)


def _get_grad_norm_direct(self, gradients, params, norm_type=2):
    from deepspeed import comm as dist
    from deepspeed.comm import pg_utils
    from deepspeed.runtime.constants import PIPE_REPLICATED
    from deepspeed.runtime.utils import mask_nan_or_inf_with_val_inplace

    original = _ORIGINALS["get_grad_norm_direct"]
    params = list(params)
    if (float(norm_type) != 2.0 or pg_utils.is_parallel(self.model_parallel_group)
            or any(getattr(p, PIPE_REPLICATED, False) and p.ds_pipe_replicated for p in params)):
        return original(self, gradients, params, norm_type)
    # the same tensors DeepSpeed sums: padding dropped, then zipped with the partition's parameters
    grads = [g for g, _ in zip((g for g in gradients if not getattr(g, "_zero_padding", False)), params)]
    if grads:
        squared = _norms(grads).pow(2).sum()
        if not bool(torch.isfinite(squared)):
            return original(self, gradients, params, norm_type)
        total = squared.float()
    else:
        total = torch.tensor(0.0, dtype=torch.float32, device=self.device)
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=self.dp_process_group)
    total = total.sqrt()
    mask_nan_or_inf_with_val_inplace(total, device=self.device)
    return total


TESTED_SINCE = "0.19"  # the replaced methods' contract (a tensor norm, -1 for non-finite) as of this release


def install() -> bool:
    """Patch DeepSpeed's ZeRO-1/2 optimizer class (idempotent). False, with a warning, when this DeepSpeed is
    older than TESTED_SINCE or lacks the methods replaced (its own per-tensor checks then stay).
    tests/test_grad_checks.py compares both against DeepSpeed's own on every install of the suite."""
    import deepspeed
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer as cls
    from packaging.version import Version

    if Version(deepspeed.__version__).release < Version(TESTED_SINCE).release:
        log.warning("DeepSpeed %s is older than %s: keeping its per-tensor gradient checks", deepspeed.__version__,
                    TESTED_SINCE)
        return False

    replacements = {"has_overflow_partitioned_grads_serial": _has_overflow_partitioned_grads_serial,
                    "get_grad_norm_direct": _get_grad_norm_direct}
    if any(getattr(cls, name, None) is fn for name, fn in replacements.items()):
        return True
    missing = [name for name in replacements if not callable(getattr(cls, name, None))]
    if missing or not hasattr(torch, "_foreach_norm"):
        log.warning("DeepSpeed's ZeRO optimizer lacks %s: keeping its per-tensor gradient checks", missing)
        return False
    for name, fn in replacements.items():
        _ORIGINALS[name] = getattr(cls, name)
        setattr(cls, name, fn)
    return True


def uninstall() -> None:
    """Restore DeepSpeed's own methods (tests compare both)."""
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer as cls
    for name, fn in _ORIGINALS.items():
        setattr(cls, name, fn)
    _ORIGINALS.clear()
