"""Pointmap geometry shared by the shard writer, the reader, the synthetic generator and evaluation.

Conventions (used everywhere in the project):
- Intrinsics K are 3x3 in pixels, OpenCV style: pixel (u, v) has its centre at integer coordinates
  (u = column, v = row), so the principal point of a W x H image is near ((W-1)/2, (H-1)/2).
- Camera axes are OpenCV's: x right, y down, z forward. Depth is z-depth (along the optical axis),
  not distance along the ray.
- Poses are camera-to-world 4x4 matrices (c2w): X_world = R @ X_cam + t.
- A pointmap is per-pixel XYZ in the camera frame of the clip's first sampled frame.
"""
from __future__ import annotations

import numpy as np


def pixel_rays(K: np.ndarray, height: int, width: int) -> np.ndarray:
    """[H, W, 3] camera-frame directions with z = 1 for every pixel centre."""
    v, u = np.meshgrid(np.arange(height, dtype=np.float64), np.arange(width, dtype=np.float64), indexing="ij")
    pix = np.stack([u, v, np.ones_like(u)], axis=-1)
    return pix @ np.linalg.inv(np.asarray(K, np.float64)).T


def depth_to_camera_points(depth: np.ndarray, K: np.ndarray) -> np.ndarray:
    """depth [H, W] (z-depth) -> [H, W, 3] points in that camera's frame."""
    return pixel_rays(K, *depth.shape) * depth[..., None]


def depth_to_pointmaps(depth: np.ndarray, K: np.ndarray, c2w: np.ndarray, ref: int = 0) -> np.ndarray:
    """Per-frame depth [T, H, W], intrinsics [T, 3, 3] or [3, 3], c2w poses [T, 4, 4]
    -> pointmaps [T, H, W, 3] (float32) in the camera frame of frame `ref`."""
    depth = np.asarray(depth, np.float64)
    T = depth.shape[0]
    K = np.broadcast_to(np.asarray(K, np.float64), (T, 3, 3))
    c2w = np.asarray(c2w, np.float64)
    w2ref = np.linalg.inv(c2w[ref])
    out = np.empty(depth.shape + (3,), np.float32)
    for i in range(T):
        rel = w2ref @ c2w[i]  # camera i -> reference camera
        pts = depth_to_camera_points(depth[i], K[i])
        out[i] = pts @ rel[:3, :3].T + rel[:3, 3]
    return out


def transform_points(points: np.ndarray, T4: np.ndarray) -> np.ndarray:
    """Apply a 4x4 rigid transform to [..., 3] points."""
    T4 = np.asarray(T4, np.float64)
    return (np.asarray(points, np.float64) @ T4[:3, :3].T + T4[:3, 3]).astype(np.float32)


def pointmap_normalisation(xyz: np.ndarray, valid: np.ndarray | None = None,
                           percentiles: tuple[float, float] = (2.0, 98.0)) -> tuple[np.ndarray, float]:
    """Per-clip transform mapping pointmaps into [-1, 1]: per-axis lo/hi percentiles over valid points,
    centre = (lo + hi) / 2 (a 3-vector), scale = the largest half-range (a scalar)."""
    pts = np.asarray(xyz, np.float64).reshape(-1, 3)
    if valid is not None:
        pts = pts[np.asarray(valid).reshape(-1) > 0]
    pts = pts[np.isfinite(pts).all(axis=1)]
    if len(pts) == 0:
        return np.zeros(3, np.float32), 1.0
    lo, hi = np.percentile(pts, percentiles, axis=0)
    centre = (lo + hi) / 2
    scale = float(max((hi - lo).max() / 2, 1e-6))
    return centre.astype(np.float32), scale


def normalise_pointmap(xyz: np.ndarray, centre: np.ndarray, scale: float) -> np.ndarray:
    """Metric pointmap -> [-1, 1] (clipped)."""
    return np.clip((xyz - centre) / scale, -1.0, 1.0).astype(np.float32)


def denormalise_pointmap(xyz_n, centre, scale):
    """[-1, 1] pointmap -> metric, in the first sampled frame's camera coordinates (numpy or torch)."""
    return xyz_n * scale + centre
