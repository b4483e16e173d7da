"""The branch-LoRA linear as one operator whose deltas ride in the frozen base GEMM's accumulator.

`BranchLoRALinear` computed `base(x) + B(A x)` as three products and an add: at One4D's shape every product is
memory-bound, and the add (plus the input gradients' sum in backward) re-reads and re-writes the whole activation,
~40% of what the adapters cost (benchmarks/RESULTS.md, 2026-12-06 13:03). Here the low-rank delta is written
first (the base bias in its GEMM's epilogue) and the base product accumulates onto it (`addmm_`, beta = 1: the
read of the delta hides in the compute-bound base GEMM); backward does the same for the input gradient. What is
left of the adapters is their four rank-wide products, each reading one activation once.

`torch.library.custom_op` keeps Inductor from splitting the accumulation back into a product and an add, and lets
selective checkpointing treat the whole linear as one recomputable op. The base must be a frozen plain
`nn.Linear` in the input's dtype (the layer falls back to its separate products otherwise: FP8 bases, ZeRO-3's
partitioned weights not registered by `dlc.share_base_with_zero3`, LoRA dropout, autocast).

Opt-in (`model.lora_kernel=fused`). Measured on an H100 (benchmarks/RESULTS.md, 2026-12-06 16:19): one eager linear
at the 14B shapes 5-10% faster forward + backward (at 1.3B's 1536 x 1536 31% slower); but inside the compiled,
checkpointed block the opaque operator costs more than it saves (14B +8.6 ms per block: its base GEMMs +10.8 ms,
the `bmm`s and Inductor's kernels -6.4 ms; 1.3B level), so the shipped configs keep the separate products.
"""
from __future__ import annotations

import torch
from torch.utils.flop_counter import register_flop_formula


def _parts(x: torch.Tensor, n: int) -> torch.Tensor:
    return x.view(n, x.shape[0] // n, x.shape[1])


@torch.library.custom_op("one4d::branch_lora_linear", mutates_args=())
def branch_lora_linear_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                          lora_b: torch.Tensor, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (M = n stacked branch parts), weight [N, K], bias [N] or None, lora_a [n, r, K], lora_b [n, N, r]
    -> (y [M, N], h [n, M/n, r]: the scaled rank-wide activations backward needs)."""
    n, dt = lora_a.shape[0], x.dtype
    x = x.contiguous()
    h = torch.bmm(_parts(x, n), lora_a.to(dt).transpose(1, 2)).mul_(scaling)
    bt = lora_b.to(dt).transpose(1, 2)
    if bias is None:
        y = torch.bmm(h, bt).view(x.shape[0], weight.shape[0])
    else:
        y = x.new_empty(x.shape[0], weight.shape[0])
        for i, out in enumerate(_parts(y, n)):  # the bias in the delta GEMM's epilogue
            torch.addmm(bias.to(dt), h[i], bt[i], out=out)
    y.addmm_(x, weight.to(dt).t())
    return y, h


@branch_lora_linear_op.register_fake
def _(x, weight, bias, lora_a, lora_b, scaling):
    n = lora_a.shape[0]
    return x.new_empty(x.shape[0], weight.shape[0]), x.new_empty(n, x.shape[0] // n, lora_a.shape[1])


@torch.library.custom_op("one4d::branch_lora_linear_backward", mutates_args=())
def branch_lora_linear_backward_op(grad: torch.Tensor, x: torch.Tensor, h: torch.Tensor, weight: torch.Tensor,
                                   lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float,
                                   input_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad of x [M, K] or an empty tensor where not wanted, grad of lora_a, grad of lora_b) in their dtypes."""
    n, dt = lora_a.shape[0], x.dtype
    grad, x = grad.contiguous(), x.contiguous()
    g = _parts(grad, n)
    gh = torch.bmm(g, lora_b.to(dt)).mul_(scaling)  # the gradient of x A^T
    grad_b = torch.bmm(g.transpose(1, 2), h)
    grad_a = torch.bmm(gh.transpose(1, 2), _parts(x, n))
    if input_grad:
        grad_x = torch.bmm(gh, lora_a.to(dt)).view_as(x)
        grad_x.addmm_(grad, weight.to(dt))
    else:
        grad_x = x.new_empty(0)
    return grad_x, grad_a.to(lora_a.dtype), grad_b.to(lora_b.dtype)


@branch_lora_linear_backward_op.register_fake
def _(grad, x, h, weight, lora_a, lora_b, scaling, input_grad):
    return (x.new_empty(x.shape if input_grad else (0,)), lora_a.new_empty(lora_a.shape),
            lora_b.new_empty(lora_b.shape))


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_a, lora_b, scaling = inputs
    ctx.save_for_backward(x, weight, lora_a, lora_b, output[1])
    ctx.scaling = scaling


def _backward(ctx, grad, _grad_h):
    x, weight, lora_a, lora_b, h = ctx.saved_tensors
    input_grad = ctx.needs_input_grad[0]
    grad_x, grad_a, grad_b = branch_lora_linear_backward_op(grad, x, h, weight, lora_a, lora_b, ctx.scaling,
                                                            input_grad)
    return (grad_x if input_grad else None), None, None, grad_a, grad_b, None


branch_lora_linear_op.register_autograd(_backward, setup_context=_setup_context)


@register_flop_formula(torch.ops.one4d.branch_lora_linear)
def _forward_flops(x_shape, weight_shape, bias_shape, a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    (m, k), (n_out, _), rank = x_shape, weight_shape, a_shape[1]
    return 2 * m * k * n_out + 2 * m * rank * (k + n_out)


@register_flop_formula(torch.ops.one4d.branch_lora_linear_backward)
def _backward_flops(grad_shape, x_shape, h_shape, weight_shape, a_shape, b_shape, scaling, input_grad,
                    *args, out_shape=None, **kwargs) -> int:
    (m, n_out), (_, k), rank = grad_shape, x_shape, a_shape[1]
    flops = 2 * m * n_out * rank * 2 + 2 * m * rank * k  # gradient of h and of B, gradient of A
    if input_grad:
        flops += 2 * m * rank * k + 2 * m * n_out * k
    return flops


def branch_lora_linear(x: torch.Tensor, base: torch.nn.Linear, lora_a: torch.Tensor, lora_b: torch.Tensor,
                       scaling: float) -> torch.Tensor:
    """`base(x)` plus each branch part's LoRA delta; x [..., K] with its leading dims split into lora_a.shape[0]."""
    y, _ = branch_lora_linear_op(x.reshape(-1, x.shape[-1]), base.weight, base.bias, lora_a, lora_b, scaling)
    return y.view(*x.shape[:-1], y.shape[-1])
