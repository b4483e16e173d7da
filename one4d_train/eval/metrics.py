"""Scores: video depth (Abs Rel, delta < 1.25), camera pose (ATE, RPE-T, RPE-R) and RGB fidelity (PSNR, SSIM).

Depth follows the MonST3R / CUT3R / Geo4D video-depth protocol (MonST3R's depth_evaluation): ground truth is
valid where 0 < gt < cap; one alignment is fitted over the whole sequence (by default the protocol's L1 scale and
shift, else its L1 scale, least squares, or the median ratio: alignment.py); the aligned prediction is clipped at
the cap; Abs Rel = mean |d - gt| / gt, and delta = the share of pixels with max(d / gt, gt / d) < 1.25, with d
floored at 1e-5. Means over sequences weight each by its scored pixels (eval/pipeline.py's summarise).
Pose follows evo: the estimate is Sim(3)-aligned to the ground truth by camera centres (Umeyama); ATE is the RMSE
of centre errors; RPE compares relative motions between consecutive frames, E_i = (Q_i^-1 Q_i+1)^-1
(P_i^-1 P_i+1), and reports the RMSE of |t(E_i)| and of the angle of R(E_i) in degrees.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from one4d_train.eval.alignment import align_trajectory, depth_alignment

def depth_metrics(pred: np.ndarray, gt: np.ndarray, align: str = "l1_scale_shift", cap: float = 70.0,
                  valid: np.ndarray | None = None, device: str | torch.device = "cpu") -> dict:
    """pred, gt: [T, H, W] depth of one sequence. Returns abs_rel, delta_1_25, scale, shift, num_pixels.
    A prediction that is not finite on a scored pixel scores NaN (as it does in the reference code): leaving
    such pixels out would score a failed prediction on the pixels where it did not fail."""
    pred, gt = np.asarray(pred, np.float64), np.asarray(gt, np.float64)
    mask = np.isfinite(gt) & (gt > 0) & (gt < cap)
    if valid is not None:
        mask &= np.asarray(valid, bool)
    if not mask.any() or not np.isfinite(pred[mask]).all():
        return {"abs_rel": float("nan"), "delta_1_25": float("nan"), "scale": 1.0, "shift": 0.0,
                "num_pixels": int(mask.sum())}
    s, t = depth_alignment(pred, gt, mask, align, device)
    # as MonST3R's depth_evaluation: the aligned depth clipped at the cap for Abs Rel (a pixel aligned below zero
    # keeps its whole error), then at 1e-5 from below for the ratios of delta < 1.25
    d = np.minimum(s * pred[mask] + t, cap)
    g = gt[mask]
    abs_rel = float(np.mean(np.abs(d - g) / g))
    d = np.maximum(d, 1e-5)
    delta = float(np.mean(np.maximum(d / g, g / d) < 1.25))
    return {"abs_rel": abs_rel, "delta_1_25": delta, "scale": s, "shift": t, "num_pixels": int(mask.sum())}


def _rotation_angle_deg(R: np.ndarray) -> np.ndarray:
    """Angle of rotations [..., 3, 3] in degrees, as atan2(sin, cos) from the skew and trace parts: arccos of the
    trace alone turns a rounding error e of a nearly identical rotation (float32 poses: e ~ 1e-7) into an angle of
    sqrt(e) (~0.02 degrees) where the angle is ~e."""
    cos = (np.trace(R, axis1=-2, axis2=-1) - 1) / 2
    skew = np.stack([R[..., 2, 1] - R[..., 1, 2], R[..., 0, 2] - R[..., 2, 0], R[..., 1, 0] - R[..., 0, 1]], -1)
    return np.degrees(np.arctan2(np.linalg.norm(skew, axis=-1) / 2, cos))


def relative_pose_errors(est_c2w: np.ndarray, gt_c2w: np.ndarray, delta: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Per-pair translation error and rotation error (degrees) between frames i and i + delta."""
    P, Q = np.asarray(est_c2w, np.float64), np.asarray(gt_c2w, np.float64)
    rel_p = np.linalg.inv(P[:-delta]) @ P[delta:]
    rel_q = np.linalg.inv(Q[:-delta]) @ Q[delta:]
    E = np.linalg.inv(rel_q) @ rel_p
    return np.linalg.norm(E[:, :3, 3], axis=1), _rotation_angle_deg(E[:, :3, :3])


def _static(centres: np.ndarray) -> bool:
    """Camera centres that do not move (up to rounding): no similarity alignment is defined for them."""
    spread = np.sqrt(np.mean(np.sum((centres - centres.mean(0)) ** 2, axis=1)))
    return not spread > 1e-9 * max(1.0, float(np.abs(centres).max()))


def pose_metrics(est_c2w: np.ndarray, gt_c2w: np.ndarray, with_scale: bool = True) -> dict:
    """ATE, RPE-T (RMSE, gt units) and RPE-R (RMSE, degrees) after Sim(3) alignment of est onto gt, for [T, 4, 4]
    poses, T >= 3 (any two trajectories of two poses align exactly). Where the estimated camera centres do not
    move, the Sim(3) fit degenerates (evo refuses it): every similarity maps them to one point, best placed at the
    ground truth's centroid, so ATE is the ground truth's spread and RPE-T its step lengths: a failed estimate
    scores as one, not NaN (which the means over sequences would leave out). Where the ground-truth camera does
    not move, any estimate would shrink onto it (ATE = RPE-T = 0): ATE and RPE-T are NaN then. RPE-R, which no
    alignment changes, is scored in both cases. An estimate with a non-finite camera (a frame of a failed, NaN
    prediction) scores NaN throughout, as its depth does."""
    est, gt = np.asarray(est_c2w, np.float64), np.asarray(gt_c2w, np.float64)
    if est.shape != gt.shape or est.shape[1:] != (4, 4) or len(gt) < 3:
        raise ValueError(f"pose metrics need two trajectories of the same T >= 3 poses [T, 4, 4], got {est.shape} "
                         f"and {gt.shape}")
    if not np.isfinite(est).all():
        return {"ate": float("nan"), "rpe_trans": float("nan"), "rpe_rot": float("nan")}
    if with_scale and _static(gt[:, :3, 3]):
        _, er = relative_pose_errors(est, gt)
        return {"ate": float("nan"), "rpe_trans": float("nan"), "rpe_rot": float(np.sqrt(np.mean(er ** 2)))}
    if with_scale and _static(est[:, :3, 3]):
        aligned = est.copy()
        aligned[:, :3, 3] = gt[:, :3, 3].mean(0)
    else:
        aligned = align_trajectory(est, gt, with_scale)
    ate = float(np.sqrt(np.mean(np.sum((aligned[:, :3, 3] - gt[:, :3, 3]) ** 2, axis=1))))
    et, er = relative_pose_errors(aligned, gt)
    return {"ate": ate, "rpe_trans": float(np.sqrt(np.mean(et ** 2))), "rpe_rot": float(np.sqrt(np.mean(er ** 2)))}


def psnr(pred: torch.Tensor, ref: torch.Tensor, data_range: float = 1.0) -> float:
    """PSNR in dB over all elements; inf for identical inputs."""
    mse = torch.mean((pred.double() - ref.double()) ** 2).item()
    return math.inf if mse == 0 else 10 * math.log10(data_range ** 2 / mse)


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    return g / g.sum()


def ssim(pred: torch.Tensor, ref: torch.Tensor, data_range: float = 1.0, window: int = 11,
         sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03) -> float:
    """Mean SSIM (Wang et al. 2004: Gaussian 11x11 window, sigma 1.5, K1 0.01, K2 0.03, 'valid' filtering)
    over images [N, C, H, W] (or [C, H, W]), channels scored separately and averaged."""
    x, y = pred.double(), ref.double()
    if x.ndim == 3:
        x, y = x[None], y[None]
    N, C, H, W = x.shape
    x, y = x.reshape(N * C, 1, H, W), y.reshape(N * C, 1, H, W)
    g = _gaussian_window(min(window, H, W), sigma)
    w = (g[:, None] * g[None, :])[None, None]
    blur = lambda z: F.conv2d(z, w)
    mx, my = blur(x), blur(y)
    sxx, syy, sxy = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    m = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (sxx + syy + c2))
    return float(m.mean())


def rgb_metrics(pred: torch.Tensor, ref: torch.Tensor, observed: torch.Tensor | None = None) -> dict:
    """Mean per-frame PSNR and mean SSIM of frames [T, 3, H, W] in [0, 1] over the observed frames (bool [T]; default all)."""
    if observed is not None:
        pred, ref = pred[observed], ref[observed]
    if pred.shape[0] == 0:
        return {"psnr": float("nan"), "ssim": float("nan"), "num_frames": 0}
    frame_psnr = [psnr(p, r) for p, r in zip(pred, ref)]
    return {"psnr": float(np.mean(frame_psnr)), "ssim": ssim(pred, ref), "num_frames": int(pred.shape[0])}
