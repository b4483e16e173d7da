"""Alignments the evaluation protocols prescribe before scoring: per-sequence depth scale (and shift), and the
Sim(3) (Umeyama) alignment of an estimated camera trajectory onto the ground truth."""
from __future__ import annotations

import math

import numpy as np
import torch

DEPTH_ALIGNMENTS = ("l1_scale_shift", "l1_scale", "scale_shift", "scale", "median", "none")


def depth_alignment(pred: np.ndarray, gt: np.ndarray, mask: np.ndarray, mode: str,
                    device: str | torch.device = "cpu") -> tuple[float, float]:
    """(scale, shift) with gt ~ scale * pred + shift over mask, one pair for the whole sequence.
    l1_scale_shift / l1_scale: the video-depth protocol's fits (MonST3R's depth_evaluation, as CUT3R and Geo4D
    call it: `align_with_lad2` for scale&shift, `align_with_scale` for scale; _l1_scale_shift, _l1_scale);
    scale_shift / scale: least squares; median: median(gt) / median(pred). `device` runs the L1 scale-and-shift
    fit's 1000 steps, each a pass over the scored pixels (one CPU thread took 7.5 min at 81 x 352 x 624)."""
    p = np.asarray(pred, np.float64)[mask]
    g = np.asarray(gt, np.float64)[mask]
    if mode == "none" or p.size == 0:
        return 1.0, 0.0
    if mode == "l1_scale_shift":
        return _l1_scale_shift(p, g, device)
    if mode == "l1_scale":
        return _l1_scale(p, g), 0.0
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


def _l1_scale_shift(p: np.ndarray, g: np.ndarray, device, lr: float = 1e-4, max_iters: int = 1000,
                    tol: float = 1e-6) -> tuple[float, float]:
    """The protocol's scale and shift: Adam (lr 1e-4, betas 0.9 / 0.999, eps 1e-8) on sum |s p + t - g| from
    s = median(g) / median(p) (torch's lower median), t = 0, for at most 1000 steps, stopping once the loss before
    a step differs from the one before by less than 1e-6. A bounded descent from the median scale, not the exact L1
    optimum: each step moves s and t by about lr, so the fit is the protocol's only where it is run as the protocol
    runs it. Adam's update is written out on the two numbers (in float64) and the loss and its gradient come from
    one pass over the pixels per step: torch.optim.Adam with autograd cost ~0.2 s of Python per sequence even on a
    few pixels."""
    pt = torch.from_numpy(p).to(device)
    gt = torch.from_numpy(g).to(device)
    x = [(torch.median(gt) / torch.median(pt)).item(), 0.0]
    m, v, previous = [0.0, 0.0], [0.0, 0.0], None
    for k in range(1, max_iters + 1):
        r = pt * x[0] + x[1] - gt
        sign = torch.sign(r)
        loss, grad_s, grad_t = torch.stack([(sign * r).sum(), (sign * pt).sum(), sign.sum()]).tolist()
        for i, grad in enumerate((grad_s, grad_t)):
            m[i] = 0.9 * m[i] + 0.1 * grad
            v[i] = 0.999 * v[i] + 0.001 * grad * grad
            x[i] -= lr * (m[i] / (1 - 0.9 ** k)) / (math.sqrt(v[i] / (1 - 0.999 ** k)) + 1e-8)
        if previous is not None and abs(previous - loss) < tol:
            break
        previous = loss
    return x[0], x[1]


def _l1_scale(p: np.ndarray, g: np.ndarray, iters: int = 10) -> float:
    """The protocol's scale alone: iteratively reweighted least squares towards the L1 fit (Weiszfeld), 10 steps
    from mean(g) / mean(p), weights 1 / (|s p - g| + 1e-8), the result at least 1e-3."""
    s = g.mean() / p.mean()
    for _ in range(iters):
        w = 1.0 / (np.abs(s * p - g) + 1e-8)
        s = np.sum(w * p * g) / np.sum(w * p * p)
    return float(np.maximum(s, 1e-3))


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
