"""Parameter accounting by group, in the paper's units (M = 2^20 parameters).

Groups: `lora.<branch>` (one per branch; `lora` is their sum), `links` (control links plus the XYZ
branch's patch embedding, as the paper counts them), `io` (the channel-concat design's widened patch
embedding and head), `base` (frozen) and `trainable` (everything that trains).
"""
from __future__ import annotations

from torch import nn

from one4d_train.model.dlc import BranchLoRALinear

MEBI = 2 ** 20
LINK_PREFIXES = ("control_links.", "xyz_patch_embedding.")


def parameter_group(name: str, trainable: bool) -> str:
    """The accounting group of the parameter called `name` in a One4D model (`lora` for the stacked
    branch adapters; `count_parameters` splits them by branch)."""
    if name.rsplit(".", 1)[-1] in ("lora_A", "lora_B"):
        return "lora"
    if name.startswith(LINK_PREFIXES):
        return "links"
    return "io" if trainable else "base"


def count_parameters(model: nn.Module) -> dict[str, int]:
    counts = {"lora": 0, "links": 0, "base": 0, "trainable": 0}
    for name, p in model.named_parameters():
        group = parameter_group(name, p.requires_grad)
        counts[group] = counts.get(group, 0) + p.numel()
        if p.requires_grad:
            counts["trainable"] += p.numel()
    for module in model.modules():
        if isinstance(module, BranchLoRALinear):
            per_branch = (module.lora_A.numel() + module.lora_B.numel()) // len(module.branches)
            for branch in module.branches:
                counts[f"lora.{branch}"] = counts.get(f"lora.{branch}", 0) + per_branch
    return counts


def format_report(counts: dict[str, int]) -> str:
    """One line per group, in 2^20 units with one decimal, as the paper reports them."""
    order = sorted(counts, key=lambda g: (g in ("base", "trainable"), g))
    width = max(len(g) for g in order)
    return "\n".join(f"{g:<{width}}  {counts[g] / MEBI:10.1f}M  ({counts[g]:,})" for g in order)
