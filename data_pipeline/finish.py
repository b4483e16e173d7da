"""Staged batch -> training batch on the batch's device (data.finish_on_device).

With data.finish_on_device the loader's workers stop before the per-pixel float work (transforms.
to_staged_sample): a sample carries its frames as uint8 (`rgb_u8`) and its cropped geometry (`depth` or
`points`, stored dtype) with one 3x4 map per frame (`xyz_affine`); a latent sample only its `rgb_u8`. `finish_batch`, called by the trainer once
the batch is on the GPU, makes `rgb` and `xyz` exactly as transforms.to_sample would have on the CPU (float32
arithmetic; up to float32 rounding, and one bf16/fp16 rounding step for those sample dtypes). Workers then
spend less CPU per sample and the shared memory carries uint8 frames and half-precision depth instead of two
float clips. A batch without `rgb_u8` is returned as it is.
"""
from __future__ import annotations

import torch

from data_pipeline.transforms import DTYPES


def _depth_xyz(depth: torch.Tensor, affine: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """z-depth [B, T, H, W] (0 outside the mask), affine [B, T, 3, 4], valid bool [B, T, 1, H, W]
    -> [B, T, 3, H, W] float32: per channel c, d (a_c0 u + a_c1 v + a_c2) + a_c3 valid (elementwise, so no
    TF32 matmul can round it)."""
    H, W = depth.shape[-2:]
    d = depth.float().unsqueeze(2)  # [B, T, 1, H, W]
    a = affine.float()[..., None, None]  # [B, T, 3, 4, 1, 1]
    u = torch.arange(W, dtype=torch.float32, device=depth.device).view(W)
    v = torch.arange(H, dtype=torch.float32, device=depth.device).view(H, 1)
    ray = a[:, :, :, 0] * u + a[:, :, :, 1] * v + a[:, :, :, 2]  # [B, T, 3, H, W]
    return ray.mul_(d).add_(a[:, :, :, 3] * valid)


def _points_xyz(points: torch.Tensor, affine: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """xyz [B, T, H, W, 3] (0 where not finite) -> (A (x, y, z, 1)) * valid, [B, T, 3, H, W] float32."""
    p = points.float()
    a = affine.float()[..., None, None]  # [B, T, 3, 4, 1, 1]
    out = a[:, :, :, 3].expand(*p.shape[:2], 3, *p.shape[2:4]).clone()
    for j in range(3):
        out.add_(a[:, :, :, j] * p[..., j].unsqueeze(2))
    return out.mul_(valid)


def finish_batch(batch: dict, dtype: str) -> dict:
    """`rgb` and `xyz` in [-1, 1] in `dtype` (data.sample_dtype) on the device of the staged tensors; the
    staged keys are dropped, all other keys are kept."""
    if "rgb_u8" not in batch:
        return batch
    out = dict(batch)
    u8 = out.pop("rgb_u8")
    target = DTYPES[dtype]
    out["rgb"] = torch.add(torch.tensor(-1.0, device=u8.device), u8, alpha=1 / 127.5).to(target)
    if "xyz_affine" not in out:  # a latent sample (data_pipeline/latents.py): frames only
        return out
    affine, valid = out.pop("xyz_affine"), out["valid"]
    if "depth" in out:
        xyz = _depth_xyz(out.pop("depth"), affine, valid)
    elif "points" in out:
        xyz = _points_xyz(out.pop("points"), affine, valid)
    else:
        raise KeyError(f"staged batch has xyz_affine but neither depth nor points (keys {sorted(out)})")
    out["xyz"] = xyz.clamp_(-1.0, 1.0).to(target)
    return out
