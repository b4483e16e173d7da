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
    """z-depth [..., T, H, W] (0 outside the mask), affine [..., T, 3, 4], valid bool [..., T, 1, H, W]
    -> [..., T, 3, H, W] float32: per channel c, d (a_c0 u + a_c1 v + a_c2) + a_c3 valid (elementwise, so no
    TF32 matmul can round it; one full-size buffer, updated in place)."""
    H, W = depth.shape[-2:]
    a = affine.float()[..., None, None]  # [..., T, 3, 4, 1, 1]
    u = torch.arange(W, dtype=torch.float32, device=depth.device)
    v = torch.arange(H, dtype=torch.float32, device=depth.device).view(H, 1)
    out = a.select(-3, 1) * v + a.select(-3, 0) * u  # [..., T, 3, H, W]
    out.add_(a.select(-3, 2)).mul_(depth.unsqueeze(-3))
    return out.addcmul_(a.select(-3, 3), valid.to(torch.float32))


def _points_xyz(points: torch.Tensor, affine: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """xyz [..., T, H, W, 3] (0 where not finite) -> (A (x, y, z, 1)) * valid, [..., T, 3, H, W] float32."""
    a = affine.float()[..., None, None]  # [..., T, 3, 4, 1, 1]
    out = a.select(-3, 0) * points[..., 0].unsqueeze(-3).float()
    for j in (1, 2):
        out.addcmul_(a.select(-3, j), points[..., j].unsqueeze(-3).float())
    return out.add_(a.select(-3, 3)).mul_(valid)


def finish_batch(batch: dict, dtype: str) -> dict:
    """`rgb` and `xyz` in [-1, 1] in `dtype` (data.sample_dtype) on the device of the staged tensors, for a batch
    or a single sample (any leading axes); the staged keys are dropped, all other keys are kept."""
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


def batchable(samples: list[dict], dtype: str) -> list[dict]:
    """Samples that stack into one batch: staged samples of both geometry kinds (a shard set may mix depth and
    pointmap clips) are finished here, on the CPU, since their geometry members differ; otherwise unchanged."""
    kinds = {"depth" if "depth" in s else "points" if "points" in s else None for s in samples if "rgb_u8" in s}
    if len(kinds) < 2:
        return samples
    return [finish_batch(s, dtype) for s in samples]
