"""FP8 matmuls for the frozen base linears of the DiT blocks (`model.base_matmul: fp8`).

The base weights never change, and the two products a frozen linear costs per step (forward, and the input
gradient in backward; three with the recompute of activation checkpointing) are most of the DiT's matmul
work. `FP8Linear` runs both on FP8 tensor cores (`torch._scaled_mm`) with row-wise scaling: the activation
(forward) or the output gradient (backward) is scaled per token, the weight per output channel (forward) or
per input channel (backward), each to float8 e4m3 from its own absolute maximum, and the product comes out in
the input's dtype. Weights are quantised on the fly from the bf16 copy (a memory-bound pass per call: the
checkpoint, the state dict and ZeRO see the usual bf16 linear); the LoRA branches, their gradients and every
other part of the model stay in bf16/fp32.

Numerics: per product, a relative error of ~3.7% against fp32 (bf16: ~0.17%), for forward and input gradient
alike (H200, Gaussian data; tests/test_fp8.py bounds it). Opt-in: it changes what the LoRA adapters are
trained against, so a run should use the same setting for evaluation (the model config carries it).
Rates (H200, 2 x 18,018 tokens, fwd + input-gradient, quantisation included, compiled): 5120 -> 5120 1056 vs
730 TFLOP/s bf16, 5120 -> 13824 966 vs 694, 13824 -> 5120 1016 vs 695; at 1.3B's width (1536) the standalone
FP8 linear is slower (313 vs 399 for 1536 -> 1536). Training step (H200, shipped configs): 14B 7.77 -> 6.61 s,
1.3B 1.63 -> 1.58 s (benchmarks/PERF_NOTES.md).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max
_TINY = 1e-12  # all-zero rows: any positive scale quantises them to zeros
ALIGN = 16  # `_scaled_mm` needs both matrix widths to be multiples of 16


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """2-D `x` -> (row-major float8 e4m3 tensor, fp32 scale per row [rows, 1]) with x ~= q * scale."""
    scale = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=_TINY) / E4M3_MAX
    return (x.float() / scale).to(E4M3).contiguous(), scale


def fp8_matmul(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """a [M, K] @ b[N, K]^T with both operands quantised row-wise (over K) to e4m3, result in `out_dtype`. The
    product comes out in bf16 (the one output type row-wise scaled kernels have on every FP8 GPU generation) and
    is cast from there: an fp32 model gets fp32 tensors, with FP8's rounding either way."""
    qa, sa = quantize_rows(a)
    qb, sb = quantize_rows(b)
    out = torch._scaled_mm(qa, qb.t(), scale_a=sa, scale_b=sb.t(), out_dtype=torch.bfloat16)
    # no `.to()` that returns its own input: under torch.compile (2.11) an autograd.Function whose output
    # aliases an intermediate gets its gradient routed to the wrong slot, and the input gradient comes out zero
    return out if out.dtype == out_dtype else out.to(out_dtype)


class _FrozenFP8Matmul(torch.autograd.Function):
    """x [M, K] @ weight [N, K]^T in FP8; gradient for x only (the weight is frozen)."""

    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(weight)
        return fp8_matmul(x, weight, x.dtype)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        return fp8_matmul(grad, weight.t(), grad.dtype), None


class FP8Linear(nn.Linear):
    """A frozen linear whose matmuls (forward and input gradient) run in FP8; same parameters and state-dict
    keys as the `nn.Linear` it replaces, bias added in the input's dtype."""

    @classmethod
    def from_linear(cls, linear: nn.Linear, name: str = "") -> "FP8Linear":
        where = f"{name or 'linear'} ({linear.in_features} -> {linear.out_features})"
        if linear.weight.requires_grad or (linear.bias is not None and linear.bias.requires_grad):
            raise ValueError(f"{where}: FP8 matmuls are for frozen base weights; this layer is trainable")
        if linear.in_features % ALIGN or linear.out_features % ALIGN:
            raise ValueError(f"{where}: FP8 matmuls need widths that are multiples of {ALIGN}")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight, new.bias = linear.weight, linear.bias  # the same Parameter objects: nothing is copied
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() == 0:  # no rows to scale
            return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        y = _FrozenFP8Matmul.apply(x.reshape(-1, self.in_features), self.weight)
        y = y.view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(y.dtype)


def require_fp8_tensor_cores(device: torch.device) -> None:
    """FP8 products need compute capability 8.9 or newer (Ada, Hopper, Blackwell) on CUDA; the CPU runs them too.
    Checked where the model is built (`convert_frozen_linears`), so build it on the GPU it trains on."""
    device = torch.device(device)
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < (8, 9):
            raise ValueError(f"model.base_matmul=fp8 needs FP8 tensor cores (compute capability >= 8.9); "
                             f"{device} has {major}.{minor}: use model.base_matmul=bf16")


def fp8_problems(base_matmul: str, device: torch.device) -> list[tuple[str, str]]:
    """model.base_matmul=fp8 where `device` has no FP8 tensor cores, by key before a model is built (a ValueError
    from the model's build, after the process group had started; an export trained in FP8 evaluated on an A100)."""
    if base_matmul != "fp8":
        return []
    try:
        require_fp8_tensor_cores(device)
    except ValueError as exc:
        return [("model.base_matmul", str(exc).removeprefix("model.base_matmul=").replace("fp8 needs", "fp8: needs"))]
    return []


def convert_frozen_linears(module: nn.Module) -> list[str]:
    """Replace every frozen `nn.Linear` under `module` (a base linear inside a branch-LoRA layer included) by an
    `FP8Linear` on the same parameters; returns the converted names. Trainable linears are left as they are."""
    first = next(module.parameters(), None)
    if first is not None:
        require_fp8_tensor_cores(first.device)
    converted = []
    for name, child in list(module.named_modules()):
        for child_name, sub in list(child.named_children()):
            if type(sub) is nn.Linear and not sub.weight.requires_grad:
                full = f"{name}.{child_name}" if name else child_name
                setattr(child, child_name, FP8Linear.from_linear(sub, full))
                converted.append(full)
    return converted

