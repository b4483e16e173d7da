"""Decoupled LoRA Control: one frozen base linear serves both branches, each batch half gets its own LoRA.

The RGB and XYZ token sets are stacked on the batch axis (RGB first, XYZ second). `BranchLoRALinear`
applies the frozen base weight once to the whole stack, then adds each branch's low-rank delta to its
own half. PEFT cannot route adapters by batch half while training, so the routing lives here; the
adapters export to a standard LoRA key format (adapters.py).

Dtypes: the trainable LoRA weights stay fp32 (the optimiser's master copy), the base may be bf16. The
delta is computed in the input's dtype (weights cast on the fly, gradients flow back to the fp32
parameters), so a bf16 stream costs bf16 matmuls with or without autocast.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from one4d_train.model.config import LORA_KERNELS as KERNELS
from one4d_train.model.config import LoRAConfig
from one4d_train.model.lora_op import branch_lora_linear

BRANCHES = ("rgb", "xyz")
SHARED = ("shared",)


def _checked_kernel(kernel: str) -> str:
    if kernel not in KERNELS:
        raise ValueError(f"branch LoRA kernel {kernel!r}: choose one of {', '.join(KERNELS)}")
    return kernel


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


class BranchLoRALinear(nn.Module):
    """Frozen `base` linear plus one LoRA adapter per branch, routed by batch part.

    Input [n*B, ..., in] with n = len(branches) stacked branch batches in `branches` order. With a single
    branch (the ablations' shared adapter) the one adapter applies to the whole batch. The branches'
    adapters are stacked (`lora_A` [n, rank, in], `lora_B` [n, out, rank]) so both deltas cost one batched
    matmul each way (H100, 2 x 18,018 tokens, 5120 -> 5120, forward + backward: 1.5 ms of LoRA on the
    5.3 ms base matmul, against 2.6 ms for a per-branch loop).
    They are direct parameters of this module, so ZeRO-3 gathers them with its forward.

    `kernel`: `bmm` (the default) runs the base and the two batched products apart; `fused` runs the layer as one
    operator whose deltas accumulate in the base GEMM (lora_op.py) where it can: a frozen plain `nn.Linear` base in
    the input's dtype (under ZeRO-3 registered by `share_base_with_zero3`), no active dropout, no autocast; elsewhere
    it too runs the separate products.
    """

    def __init__(self, base: nn.Linear, branches=BRANCHES, rank: int = 64, alpha: float = 64.0,
                 dropout: float = 0.0, kernel: str = "bmm"):
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
        self.kernel = _checked_kernel(kernel)
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
        if self._fused_applies(x):
            return branch_lora_linear(x, self.base_layer, a, b, self.scaling)
        y = self.base_layer(x)
        parts = self.dropout(x).reshape(n, -1, x.shape[-1])
        # scaled at rank width, where it is cheap
        h = torch.bmm(parts, a.to(x.dtype).transpose(1, 2)) * self.scaling
        return y + torch.bmm(h, b.to(x.dtype).transpose(1, 2)).view_as(y)

    def _fused_applies(self, x: torch.Tensor) -> bool:
        base = self.base_layer
        return (self.kernel == "fused" and type(base) is nn.Linear and not base.weight.requires_grad
                and x.dtype == base.weight.dtype and x.dim() >= 2
                and (not hasattr(base.weight, "ds_id") or id(base.weight) in getattr(self, "_external_params", {}))
                and (isinstance(self.dropout, nn.Identity) or not self.training)
                and not torch.is_autocast_enabled(x.device.type))

    def extra_repr(self) -> str:
        return f"branches={self.branches}, rank={self.rank}, scaling={self.scaling:g}, kernel={self.kernel}"


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


def share_base_with_zero3(model: nn.Module) -> None:
    """Under ZeRO-3 a parameter is gathered by its own module's call, which the fused operator skips for the base
    linear: each base weight and bias is registered as an external parameter of its branch layer, so ZeRO-3 gathers
    it for the layer's forward and backward (before deepspeed.initialize, for the layers on the `fused` kernel; without
    it a layer runs the separate products)."""
    from deepspeed.runtime.zero.partition_parameters import register_external_parameter
    for m in model.modules():  # layers on the separate products, and other bases, gather theirs by their own call
        if isinstance(m, BranchLoRALinear) and m.kernel == "fused" and type(m.base_layer) is nn.Linear:
            for p in m.base_layer.parameters(recurse=False):
                register_external_parameter(m, p)


def set_lora_kernel(model: nn.Module, kernel: str) -> None:
    """Every branch layer of `model` on `kernel` (one of KERNELS)."""
    _checked_kernel(kernel)
    for m in model.modules():
        if isinstance(m, BranchLoRALinear):
            m.kernel = kernel


def apply_dlc(model: nn.Module, lora_cfg: LoRAConfig, branches=BRANCHES, kernel: str = "bmm") -> nn.Module:
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
                                                      lora_cfg.dropout, kernel))
    return model
