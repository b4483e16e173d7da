"""Cameras and depth from predicted pointmaps (the paper's recovery), in torch.

Input: metric pointmaps [T, H, W, 3] in the first frame's camera coordinates (data_pipeline/geometry.py
conventions: OpenCV axes, z-depth, pixel centres at integer coordinates, principal point at the image centre
((W - 1) / 2, (H - 1) / 2)). Output per frame: focal length f_i (fx = fy), camera-to-world pose (R_i, o_i) and
depth D_i, with the model X_hat = R_i D_i K_i^-1 (u, v, 1) + o_i.

1. Closed form. Frame 0 is the reference camera: identity pose, focal = the median over pixels of the
   least-squares solution of u - cx = f x / z, v - cy = f y / z; depth = z. Every other frame: a DLT with
   every valid pixel as a 2D-3D correspondence (Hartley-normalised, robustly reweighted starting from the
   previous frame's camera), split into f, R, t with K = diag(f, f, 1) about the principal point.
2. Post-optimisation (Adam, cosine-decayed): L1 between X_hat and the pointmap over valid pixels, plus
   temporal smoothness of consecutive rotations (|R_i+1 - R_i|_F^2) and camera centres
   (|o_i+1 - o_i|^2 / scene scale^2); the iterate with the lowest objective is returned.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class RecoveryConfig:
    iters: int = 300
    lr: float = 1e-3  # Adam step in log-focal, log-depth, rotation vector (rad) and centre (scene-scale) units
    smooth_rot: float = 0.01
    smooth_centre: float = 0.01
    fix_first: bool = True  # frame 0 defines the pointmaps' coordinates: keep its pose at identity
    max_dlt_points: int = 50000


@dataclass
class Recovered:
    depth: torch.Tensor  # [T, H, W]
    focal: torch.Tensor  # [T]
    c2w: torch.Tensor  # [T, 4, 4]
    principal: tuple[float, float]  # (cx, cy)

    @property
    def intrinsics(self) -> torch.Tensor:
        K = torch.zeros(len(self.focal), 3, 3, dtype=self.focal.dtype, device=self.focal.device)
        K[:, 0, 0] = K[:, 1, 1] = self.focal
        K[:, 0, 2], K[:, 1, 2], K[:, 2, 2] = self.principal[0], self.principal[1], 1.0
        return K


def principal_point(height: int, width: int) -> tuple[float, float]:
    return (width - 1) / 2, (height - 1) / 2


def centred_pixels(height: int, width: int, dtype=torch.float64, device="cpu") -> torch.Tensor:
    """[H, W, 2] (u - cx, v - cy)."""
    cx, cy = principal_point(height, width)
    v, u = torch.meshgrid(torch.arange(height, dtype=dtype, device=device),
                          torch.arange(width, dtype=dtype, device=device), indexing="ij")
    return torch.stack([u - cx, v - cy], dim=-1)


def _valid_mask(points, valid):
    ok = torch.isfinite(points).all(-1)
    return ok if valid is None else ok & valid.to(torch.bool)


def _focal_from_camera_points(pts, uv, mask):
    """Median over pixels of the per-pixel least-squares focal: exact for exact data, robust to outliers."""
    z = pts[..., 2]
    a, b = pts[..., 0] / z, pts[..., 1] / z
    n = a * a + b * b
    m = mask & (z > 1e-9) & (n > 1e-12)
    if not m.any():
        return torch.tensor(float(max(uv.shape[:2])), dtype=pts.dtype, device=pts.device)
    return ((uv[..., 0] * a + uv[..., 1] * b)[m] / n[m]).median()


def _nearest_rotation(M):
    U, _, Vt = torch.linalg.svd(M)
    d = torch.sign(torch.linalg.det(U @ Vt))
    S = torch.diag(torch.stack([torch.ones_like(d), torch.ones_like(d), d]))
    return U @ S @ Vt


def _dlt_solve(Xn, xn, weights):
    """(M [3, 4], degenerate): degenerate when the null space is not one-dimensional, as for (nearly)
    coplanar points, whose 3x4 DLT is ambiguous (eigenvalue 2 is then ~ eigenvalues 1-4 << eigenvalue 5)."""
    zero = torch.zeros_like(Xn)
    A = torch.cat([torch.cat([-Xn, zero, xn[:, :1] * Xn], 1), torch.cat([zero, -Xn, xn[:, 1:] * Xn], 1)], 0)
    w = weights.repeat(2)[:, None]
    vals, vecs = torch.linalg.eigh(A.T @ (w * A))
    return vecs[:, 0].reshape(3, 4), bool(vals[1] < 1e-2 * vals[4])


def _cauchy_weights(err: torch.Tensor) -> torch.Tensor:
    c = max(3.0 * err.median().item(), 1e-9)
    return 1.0 / (1.0 + (err / c) ** 2)


def reprojection_error(points: torch.Tensor, uv: torch.Tensor, f, c2w: torch.Tensor) -> torch.Tensor:
    """Pixel distance between uv and the projection of points by (f, c2w); 1e6 behind the camera."""
    cam = (points - c2w[:3, 3]) @ c2w[:3, :3]
    z = cam[:, 2:]
    err = (f * cam[:, :2] / z.clamp_min(1e-12) - uv).norm(dim=1)
    return torch.where(z[:, 0] > 0, err, torch.full_like(err, 1e6))


def dlt_camera(points: torch.Tensor, uv: torch.Tensor, irls_iters: int = 5, prior=None):
    """Points [N, 3] (reference frame) and centred pixels [N, 2] -> (f, c2w [4, 4]) for K = diag(f, f, 1).
    Hartley-normalised DLT, reweighted a few times by reprojection error (Cauchy weights at 3x the median
    error) so that outliers such as sky pixels or clipped points of a predicted pointmap do not steer it.
    prior: (f, c2w) of a nearby camera (the previous frame) whose reprojection errors give the first weights,
    so that a large cluster of outliers cannot capture the first solve; it is also the answer (left to the
    post-optimisation) when the points are too close to coplanar for a DLT."""
    X, x = points.double(), uv.double()
    mu = X.mean(0)
    s3 = math.sqrt(3) / (X - mu).norm(dim=1).mean().clamp_min(1e-12)
    s2 = math.sqrt(2) / x.norm(dim=1).mean().clamp_min(1e-12)
    Xn = torch.cat([(X - mu) * s3, torch.ones_like(X[:, :1])], 1)
    xn = x * s2
    weights = torch.ones(len(X), dtype=X.dtype, device=X.device)
    if prior is not None and torch.isfinite(prior[1]).all():
        weights = _cauchy_weights(reprojection_error(X, x, prior[0], prior[1].to(X)))
    for it in range(irls_iters + 1):
        Mn, degenerate = _dlt_solve(Xn, xn, weights)
        proj = Xn @ Mn.T
        if (proj[:, 2] > 0).double().mean() < 0.5:
            Mn, proj = -Mn, -proj
        if it == irls_iters:
            break
        err = (proj[:, :2] / proj[:, 2:].clamp_min(1e-12) - xn).norm(dim=1)
        err = torch.where(proj[:, 2] > 0, err, torch.full_like(err, 1e6))
        weights = _cauchy_weights(err)
    nan = torch.tensor(math.nan, dtype=X.dtype, device=X.device)
    if degenerate:
        return (prior[0], prior[1].to(X)) if prior is not None else (nan, nan.expand(4, 4).clone())
    T3 = torch.eye(4, dtype=X.dtype, device=X.device)
    T3[:3, :3] *= s3
    T3[:3, 3] = -mu * s3
    T2inv = torch.diag(torch.tensor([1 / s2, 1 / s2, 1.0], dtype=X.dtype, device=X.device))
    M = T2inv @ Mn @ T3
    M = M / M[2, :3].norm()
    if not torch.isfinite(M).all():
        return nan, nan.expand(4, 4).clone()
    f = (M[0, :3].norm() + M[1, :3].norm()) / 2
    w2c_R = _nearest_rotation(torch.stack([M[0, :3] / f, M[1, :3] / f, M[2, :3]]))
    w2c_t = torch.stack([M[0, 3] / f, M[1, 3] / f, M[2, 3]])
    c2w = torch.eye(4, dtype=X.dtype, device=X.device)
    c2w[:3, :3] = w2c_R.T
    c2w[:3, 3] = -w2c_R.T @ w2c_t
    return f, c2w


def _depth_in_cameras(points, c2w):
    """z of every pointmap point in its own frame's camera: [T, H, W]."""
    R, o = c2w[:, :3, :3], c2w[:, :3, 3]
    cam = torch.einsum("tji,thwj->thwi", R, points - o[:, None, None, :])
    return cam[..., 2]


def closed_form(points: torch.Tensor, valid: torch.Tensor | None = None, max_dlt_points: int = 50000) -> Recovered:
    """Closed-form focal, pose and depth for pointmaps [T, H, W, 3] (float64 inside)."""
    P = points.double()
    T, H, W, _ = P.shape
    mask = _valid_mask(P, valid)
    uv = centred_pixels(H, W, device=P.device)
    focal = torch.empty(T, dtype=torch.float64, device=P.device)
    c2w = torch.eye(4, dtype=torch.float64, device=P.device).repeat(T, 1, 1)
    focal[0] = _focal_from_camera_points(P[0], uv, mask[0])
    for i in range(1, T):
        m = mask[i].reshape(-1)
        X, x = P[i].reshape(-1, 3)[m], uv.reshape(-1, 2)[m]
        if len(X) > max_dlt_points:
            idx = torch.linspace(0, len(X) - 1, max_dlt_points, device=P.device).long()
            X, x = X[idx], x[idx]
        if len(X) < 6:
            focal[i], c2w[i] = focal[i - 1], c2w[i - 1]
            continue
        focal[i], c2w[i] = dlt_camera(X, x, prior=(focal[i - 1], c2w[i - 1]))
    # a pointmap no pinhole camera explains (e.g. an untrained model's) still gets a usable focal
    size = float(max(H, W))
    focal = torch.where(torch.isfinite(focal) & (focal > 0), focal, torch.full_like(focal, size))
    focal = focal.clamp(0.05 * size, 100 * size)
    c2w[~torch.isfinite(c2w).all(-1).all(-1)] = torch.eye(4, dtype=c2w.dtype, device=c2w.device)
    depth = _depth_in_cameras(P, c2w)
    return Recovered(depth, focal, c2w, principal_point(H, W))


def _so3_exp(w):
    K = torch.zeros(w.shape[0], 3, 3, dtype=w.dtype, device=w.device)
    K[:, 0, 1], K[:, 0, 2], K[:, 1, 2] = -w[:, 2], w[:, 1], -w[:, 0]
    K = K - K.transpose(1, 2)
    return torch.linalg.matrix_exp(K)


def unproject(depth, focal, c2w, principal) -> torch.Tensor:
    """X_hat = R D K^-1 (u, v, 1) + o for depth [T, H, W]: [T, H, W, 3] in world (= first camera) coordinates."""
    T, H, W = depth.shape
    uv = centred_pixels(H, W, depth.dtype, depth.device).reshape(1, H * W, 2) / focal[:, None, None]
    cam = torch.cat([uv.expand(T, -1, -1), torch.ones_like(depth.reshape(T, H * W, 1))], -1)
    cam = cam * depth.reshape(T, H * W, 1)
    X = torch.baddbmm(c2w[:, None, :3, 3], cam, c2w[:, :3, :3].transpose(1, 2))
    return X.reshape(T, H, W, 3)


@torch.enable_grad()  # also when called under no_grad (evaluation inside training)
def refine(points: torch.Tensor, valid: torch.Tensor | None, init: Recovered, cfg: RecoveryConfig) -> Recovered:
    """The post-optimisation from a closed-form start (float64 inside)."""
    P = points.double()
    T = P.shape[0]
    mask = _valid_mask(P, valid)
    P = torch.where(mask[..., None], P, torch.zeros_like(P))
    scale = P[mask].norm(dim=-1).median().clamp_min(1e-6) if mask.any() else torch.tensor(1.0, dtype=P.dtype)
    R0, o0 = init.c2w[:, :3, :3].double(), init.c2w[:, :3, 3].double()
    min_depth = 1e-3 * scale
    params = {
        "rot": torch.zeros(T, 3, dtype=P.dtype, device=P.device, requires_grad=True),
        "centre": torch.zeros(T, 3, dtype=P.dtype, device=P.device, requires_grad=True),
        "log_focal": init.focal.double().log().detach().clone().requires_grad_(True),
        "log_depth": torch.nan_to_num(init.depth.double(), nan=1.0).clamp_min(min_depth).log().requires_grad_(True),
    }
    opt = torch.optim.Adam(params.values(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(cfg.iters, 1))
    keep = torch.ones(T, 1, dtype=P.dtype, device=P.device)
    if cfg.fix_first:
        keep[0] = 0
    n = mask.sum().clamp_min(1)

    def cameras():
        R = R0 @ _so3_exp(params["rot"] * keep)
        o = o0 + scale * params["centre"] * keep
        c2w = torch.eye(4, dtype=P.dtype, device=P.device).repeat(T, 1, 1)
        c2w[:, :3, :3], c2w[:, :3, 3] = R, o
        return c2w

    best, best_loss = None, math.inf
    for it in range(cfg.iters + 1):
        opt.zero_grad(set_to_none=True)
        c2w = cameras()
        X = unproject(params["log_depth"].exp(), params["log_focal"].exp(), c2w, init.principal)
        loss = ((X - P).abs().sum(-1) * mask).sum() / n / scale
        if T > 1:
            loss = loss + cfg.smooth_rot * ((c2w[1:, :3, :3] - c2w[:-1, :3, :3]) ** 2).sum((1, 2)).mean()
            loss = loss + cfg.smooth_centre * ((c2w[1:, :3, 3] - c2w[:-1, :3, 3]) ** 2).sum(1).mean() / scale ** 2
        # Adam's sign-like steps keep moving around an L1 minimum: keep the best iterate, the init included
        if not math.isfinite(loss.item()):
            break
        if loss.item() < best_loss:
            best_loss = loss.item()
            best = (params["log_depth"].detach().exp(), params["log_focal"].detach().exp(), c2w.detach().clone())
        if it == cfg.iters:
            break
        loss.backward()
        opt.step()
        sched.step()
    if best is None:
        return init
    return Recovered(*best, init.principal)


def recover_geometry(points: torch.Tensor, valid: torch.Tensor | None = None,
                     cfg: RecoveryConfig | None = None) -> Recovered:
    """Pointmaps [T, H, W, 3] (+ validity [T, H, W]) -> depth [T, H, W], focal [T], c2w [T, 4, 4] (float64)."""
    cfg = cfg or RecoveryConfig()
    init = closed_form(points, valid, cfg.max_dlt_points)
    rec = refine(points, valid, init, cfg) if cfg.iters > 0 else init
    return _unknown_where_not_finite(rec, points)


def _unknown_where_not_finite(rec: Recovered, points: torch.Tensor) -> Recovered:
    """NaN depth where the pointmap is not finite, NaN focal and camera for a frame with no finite point: what a
    failed (NaN) prediction does not determine stays unknown, and scores NaN, instead of the solvers' stand-ins
    (depth 1, the image size as focal, the identity or the previous frame's camera), which would be scored as a
    prediction."""
    finite = torch.isfinite(points).all(-1).to(rec.depth.device)
    if bool(finite.all()):
        return rec
    empty = ~finite.flatten(1).any(1)
    depth, focal, c2w = rec.depth.clone(), rec.focal.clone(), rec.c2w.clone()
    depth[~finite], focal[empty], c2w[empty] = float("nan"), float("nan"), float("nan")
    return Recovered(depth, focal, c2w, rec.principal)
