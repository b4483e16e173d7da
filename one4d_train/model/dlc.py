"""Decoupled LoRA Control: one frozen base linear serves both branches, each batch half gets its own LoRA.

The RGB and XYZ token sets are stacked on the batch axis (RGB first, XYZ second). `BranchLoRALinear`
applies the frozen base weight once to the whole stack, then adds each branch's low-rank delta to its
own half. PEFT cannot route adapters by batch half while training, so the routing lives here; the
adapters export to a standard LoRA key format (adapters.py).

Dtypes: the trainable LoRA weights stay fp32 (the optimiser's master copy), the base may be bf16. The
delta is computed in the input's dtype (weights cast on the fly, gradients flow back to the fp32
parameters), so a bf16 stream costs bf16 matmuls with or without autocast.

Kernels: the layer is one custom op (`one4d::branch_lora`, with its own backward op) that adds the delta inside
the GEMM's epilogue (`baddbmm_` with beta 1 on the base output, and on the base's input gradient in backward)
instead of writing a full-size delta and adding it: at 2 x 18,018 tokens a 5120-wide delta is 369 MB written
and read again per linear. torch.compile keeps the op opaque, so the epilogue survives compilation. Layers
whose base is hooked (ZeRO-3 gathers it in a forward hook) or that use dropout take the plain autograd path.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import register_flop_formula

from one4d_train.model.config import LoRAConfig

BRANCHES = ("rgb", "xyz")
SHARED = ("shared",)


class InputDtypeLinear(nn.Linear):
    """A linear layer whose (fp32) weights are cast to the input's dtype: fp32 storage, bf16 compute."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype), bias)


class InputDtypeConv3d(nn.Conv3d):
    """A 3D convolution whose (fp32) weights are cast to the input's dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return self._conv_forward(x, self.weight.to(x.dtype), bias)


@torch.library.custom_op("one4d::branch_lora", mutates_args=())
def _branch_lora(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor,
                 scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """base(x) + scaling * (x_i A_i^T) B_i^T per branch part i; also returns x_i A_i^T (kept for backward)."""
    x2 = x.reshape(-1, x.shape[-1])
    y = torch.mm(x2, weight.t()) if bias is None else torch.addmm(bias, x2, weight.t())
    n = a.shape[0]
    h = torch.bmm(x2.view(n, -1, x2.shape[-1]), a.transpose(1, 2))
    y.view(n, -1, y.shape[-1]).baddbmm_(h, b.transpose(1, 2), alpha=scaling)
    return y.view(*x.shape[:-1], y.shape[-1]), h


@_branch_lora.register_fake
def _(x, weight, bias, a, b, scaling):
    n, m = a.shape[0], x.numel() // x.shape[-1]
    return x.new_empty(*x.shape[:-1], weight.shape[0]), x.new_empty(n, m // n, a.shape[1])


@torch.library.custom_op("one4d::branch_lora_backward", mutates_args=())
def _branch_lora_backward(g: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                          h: torch.Tensor, scaling: float, need_x: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of x (empty unless need_x), A and B; the branch delta of x's gradient accumulates into the base's
    (one GEMM epilogue)."""
    n = a.shape[0]
    g3 = g.reshape(n, -1, g.shape[-1])
    gh = torch.bmm(g3, b).mul_(scaling)
    gb = torch.bmm(g3.transpose(1, 2), h).mul_(scaling)
    ga = torch.bmm(gh.transpose(1, 2), x.reshape(n, -1, x.shape[-1]))
    if not need_x:
        return x.new_empty(0), ga, gb
    gx = torch.mm(g.reshape(-1, g.shape[-1]), weight)
    gx.view(n, -1, gx.shape[-1]).baddbmm_(gh, a)
    return gx.view(x.shape), ga, gb


@_branch_lora_backward.register_fake
def _(g, x, weight, a, b, h, scaling, need_x):
    return torch.empty_like(x) if need_x else x.new_empty(0), torch.empty_like(a), torch.empty_like(b)


def _setup_branch_lora(ctx, inputs, output):
    x, weight, _, a, b, scaling = inputs
    ctx.save_for_backward(x, weight, a, b, output[1])
    ctx.scaling = scaling


def _branch_lora_grad(ctx, gy, _gh):
    x, weight, a, b, h = ctx.saved_tensors
    need_x = ctx.needs_input_grad[0]
    gx, ga, gb = _branch_lora_backward(gy, x, weight, a, b, h, ctx.scaling, need_x)
    return gx if need_x else None, None, None, ga, gb, None


_branch_lora.register_autograd(_branch_lora_grad, setup_context=_setup_branch_lora)


@register_flop_formula(torch.ops.one4d.branch_lora)
def _branch_lora_flops(x_shape, weight_shape, bias_shape, a_shape, b_shape, *args, **kwargs) -> int:
    m, (out, inp), r = math.prod(x_shape[:-1]), weight_shape, a_shape[1]
    return 2 * m * (inp * out + inp * r + r * out)


@register_flop_formula(torch.ops.one4d.branch_lora_backward)
def _branch_lora_backward_flops(g_shape, x_shape, weight_shape, a_shape, b_shape, h_shape, scaling, need_x,
                                **kwargs) -> int:
    m, (out, inp), r = math.prod(x_shape[:-1]), weight_shape, a_shape[1]
    return 2 * m * (2 * out * r + r * inp + (out * inp + r * inp if need_x else 0))


class BranchLoRALinear(nn.Module):
    """Frozen `base` linear plus one LoRA adapter per branch, routed by batch part.

    Input [n*B, ..., in] with n = len(branches) stacked branch batches in `branches` order. With a single
    branch (the ablations' shared adapter) the one adapter applies to the whole batch. The branches'
    adapters are stacked (`lora_A` [n, rank, in], `lora_B` [n, out, rank]) so both deltas cost one batched
    matmul each way (H100, 2 x 18,018 tokens, 5120 -> 5120, forward + backward: 1.5 ms of LoRA on the
    5.3 ms base matmul, against 2.6 ms for a per-branch loop).
    They are direct parameters of this module, so ZeRO-3 gathers them with its forward.
    """

    def __init__(self, base: nn.Linear, branches=BRANCHES, rank: int = 64, alpha: float = 64.0,
                 dropout: float = 0.0):
        super().__init__()
        self.base_layer = base
        self._branches = tuple(branches)
        self.rank = rank
        self.scaling = alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        base.requires_grad_(False)
        n, device = len(self.branches), base.weight.device
        self.lora_A = nn.Parameter(torch.empty(n, rank, base.in_features, device=device, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.empty(n, base.out_features, rank, device=device, dtype=torch.float32))
        self.only_branch: str | None = None  # set by `only_branch`: that adapter on the whole batch
        self.fused = True  # the one-op path where it applies (False: plain autograd ops, the reference)
        self.reset_lora_parameters()

    @property
    def branches(self) -> tuple[str, ...]:
        """Fixed at construction: the stacked adapters follow this order (`only_branch` selects one)."""
        return self._branches

    def reset_lora_parameters(self):
        """PEFT's default per branch: A kaiming-uniform, B zero, so the layer starts equal to the base."""
        with torch.no_grad():
            for a in self.lora_A:
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            self.lora_B.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.lora_A, self.lora_B
        if self.only_branch is not None:
            i = self.branches.index(self.only_branch)
            a, b = a[i:i + 1], b[i:i + 1]
        n = a.shape[0]
        if x.shape[0] % n:
            raise ValueError(f"batch {x.shape[0]} does not split into {n} branch parts {self.branches}")
        if self.fused and self._plain_base() and (isinstance(self.dropout, nn.Identity) or not self.training):
            base = self.base_layer
            return _branch_lora(x, base.weight, base.bias, a.to(x.dtype), b.to(x.dtype), self.scaling)[0]
        y = self.base_layer(x)
        parts = self.dropout(x).reshape(n, -1, x.shape[-1])
        # scaled at rank width, where it is cheap
        h = torch.bmm(parts, a.to(x.dtype).transpose(1, 2)) * self.scaling
        return y + torch.bmm(h, b.to(x.dtype).transpose(1, 2)).view_as(y)

    def _plain_base(self) -> bool:
        """A plain nn.Linear with no hooks and a materialised weight (ZeRO-3 partitions and gathers it)."""
        base = self.base_layer
        return (type(base) is nn.Linear and not base._forward_hooks and not base._forward_pre_hooks
                and not hasattr(base.weight, "ds_id"))

    def extra_repr(self) -> str:
        return f"branches={self.branches}, rank={self.rank}, scaling={self.scaling:g}"


@contextlib.contextmanager
def only_branch(model: nn.Module, branch: str):
    """Within the context every branch layer of `model` applies only `branch`'s adapter, to its whole input:
    that branch run on its own (single-branch inference, per-branch references)."""
    layers = [m for m in model.modules() if isinstance(m, BranchLoRALinear)]
    for m in layers:
        if branch not in m.branches:
            raise ValueError(f"branch {branch!r} not in {m.branches}")
        m.only_branch = branch
    try:
        yield model
    finally:
        for m in layers:
            m.only_branch = None


def target_linears(block: nn.Module, targets) -> dict[str, nn.Linear]:
    """The block's linears named in `targets` (official Wan2.1 names); absent ones (k_img/v_img in t2v) skipped."""
    found = {}
    for name in targets:
        try:
            module = block.get_submodule(name)
        except AttributeError:
            continue
        if not isinstance(module, nn.Linear):
            raise TypeError(f"LoRA target {name!r} is a {type(module).__name__}, not nn.Linear")
        found[name] = module
    return found


def apply_dlc(model: nn.Module, lora_cfg: LoRAConfig, branches=BRANCHES) -> nn.Module:
    """Freeze every base parameter and put branch LoRA on the target linears of each of `model.blocks`."""
    model.requires_grad_(False)
    for block in model.blocks:
        linears = target_linears(block, lora_cfg.targets)
        if not linears:
            raise ValueError(f"none of the LoRA targets {list(lora_cfg.targets)} exists in the blocks")
        for name, linear in linears.items():
            parent_name, _, child = name.rpartition(".")
            parent = block.get_submodule(parent_name) if parent_name else block
            parent.add_module(child, BranchLoRALinear(linear, branches, lora_cfg.rank, lora_cfg.alpha,
                                                      lora_cfg.dropout))
    return model
