"""Control links: zero-initialised token-to-token linear maps between the RGB and XYZ branches.

After each linked block: z_rgb += L_rgb<-xyz(z_xyz) and z_xyz += L_xyz<-rgb(z_rgb), both from the
values before the update. The links are bias-free: with biases the 14B links group would count
250.8M (2^20 units) instead of the paper's 250.7M.
"""
from __future__ import annotations

import torch
from torch import nn

from one4d_train.model.dlc import InputDtypeLinear


def evenly_spaced_blocks(num_blocks: int, num_links: int) -> list[int]:
    """The block at the centre of each of `num_links` equal segments of the stack (40 blocks, 5 links:
    4, 12, 20, 28, 36)."""
    if not 0 <= num_links <= num_blocks:
        raise ValueError(f"model.num_links must be in [0, {num_blocks}] (the number of blocks), got {num_links}")
    return [int((j + 0.5) * num_blocks / num_links) for j in range(num_links)]


def resolve_link_blocks(link_blocks, num_links: int, num_blocks: int) -> list[int]:
    """Explicit `link_blocks` (validated) or, when empty, `num_links` evenly spaced blocks."""
    if not link_blocks:
        return evenly_spaced_blocks(num_blocks, num_links)
    blocks = sorted(int(b) for b in link_blocks)
    if len(set(blocks)) != len(blocks) or blocks[0] < 0 or blocks[-1] >= num_blocks:
        raise ValueError(f"model.link_blocks must be distinct block indices in [0, {num_blocks}), "
                         f"got {list(link_blocks)}")
    return blocks


class ControlLink(nn.Module):
    """Both directions of the link after one block."""

    def __init__(self, dim: int, device=None):
        super().__init__()
        self.rgb_from_xyz = InputDtypeLinear(dim, dim, bias=False, device=device, dtype=torch.float32)
        self.xyz_from_rgb = InputDtypeLinear(dim, dim, bias=False, device=device, dtype=torch.float32)
        nn.init.zeros_(self.rgb_from_xyz.weight)
        nn.init.zeros_(self.xyz_from_rgb.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [2B, N, dim], RGB tokens first, XYZ second."""
        rgb, xyz = x.chunk(2)
        return torch.cat([rgb + self.rgb_from_xyz(xyz), xyz + self.xyz_from_rgb(rgb)])


class ControlLinks(nn.Module):
    """One `ControlLink` per linked block, keyed by the block index."""

    def __init__(self, dim: int, blocks: list[int], device=None):
        super().__init__()
        self.blocks = list(blocks)
        self.links = nn.ModuleDict({str(b): ControlLink(dim, device) for b in self.blocks})

    def has(self, block: int) -> bool:
        return str(block) in self.links

    def forward(self, block: int, x: torch.Tensor) -> torch.Tensor:
        return self.links[str(block)](x)
