"""Alignments the evaluation protocols prescribe before scoring: per-sequence depth scale (and shift), and the
Sim(3) (Umeyama) alignment of an estimated camera trajectory onto the ground truth."""
from __future__ import annotations

import numpy as np

DEPTH_ALIGNMENTS = ("median", "scale", "scale_shift", "none")


def depth_alignment(pred: np.ndarray, gt: np.ndarray, mask: np.ndarray, mode: str) -> tuple[float, float]:
    """(scale, shift) with gt ~ scale * pred + shift over mask, one pair for the whole sequence.
    median: median(gt) / median(pred); scale: least squares scale; scale_shift: least squares both."""
    p = np.asarray(pred, np.float64)[mask]
    g = np.asarray(gt, np.float64)[mask]
    if mode == "none" or p.size == 0:
        return 1.0, 0.0
    if mode == "median":
        m = np.median(p)
        return (float(np.median(g) / m) if m != 0 else float("nan")), 0.0
    if mode == "scale":
        return float((p @ g) / max(p @ p, 1e-12)), 0.0
    if mode == "scale_shift":
        A = np.stack([p, np.ones_like(p)], axis=1)
        (s, t), *_ = np.linalg.lstsq(A, g, rcond=None)
        return float(s), float(t)
    raise ValueError(f"depth alignment must be one of {DEPTH_ALIGNMENTS}, got {mode!r}")


def umeyama(src: np.ndarray, dst: np.ndarray, with_scale: bool = True) -> tuple[np.ndarray, np.ndarray, float]:
    """R, t, s minimising sum ||dst - (s R src + t)||^2 for [N, 3] point sets (Umeyama 1991)."""
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    mu_s, mu_d = src.mean(0), dst.mean(0)
    xs, xd = src - mu_s, dst - mu_d
    cov = xd.T @ xs / len(src)
    U, d, Vt = np.linalg.svd(cov)
    S = np.eye(3)
    if np.linalg.det(U) * np.linalg.det(Vt) < 0:
        S[2, 2] = -1
    R = U @ S @ Vt
    var_s = (xs ** 2).sum() / len(src)
    s = float(np.trace(np.diag(d) @ S) / var_s) if with_scale else 1.0
    t = mu_d - s * R @ mu_s
    return R, t, s


def align_trajectory(est_c2w: np.ndarray, gt_c2w: np.ndarray, with_scale: bool = True) -> np.ndarray:
    """Sim(3)-align estimated c2w poses [T, 4, 4] onto gt by their camera centres; returns aligned poses
    (rotations rotated by R, centres mapped by s R c + t; a pose's rotation is not scaled)."""
    est = np.asarray(est_c2w, np.float64)
    R, t, s = umeyama(est[:, :3, 3], np.asarray(gt_c2w, np.float64)[:, :3, 3], with_scale)
    out = est.copy()
    out[:, :3, :3] = R @ est[:, :3, :3]
    out[:, :3, 3] = s * est[:, :3, 3] @ R.T + t
    return out
