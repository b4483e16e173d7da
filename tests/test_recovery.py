import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from data_pipeline.geometry import depth_to_pointmaps
from data_pipeline.synthetic import render_clip
from one4d_train.eval.recovery import RecoveryConfig, closed_form, recover_geometry, refine, unproject


@pytest.fixture(scope="module")
def clip():
    torch.set_num_threads(1)
    c = render_clip(3, 5, 32, 48)
    c["xyz"] = depth_to_pointmaps(c["depth"], c["intrinsics"], c["poses_c2w"])
    c["rel"] = np.linalg.inv(c["poses_c2w"][0]) @ c["poses_c2w"]
    return c


def _errors(rec, c):
    rot = max(np.degrees(Rotation.from_matrix(a[:3, :3].T @ b[:3, :3]).magnitude())
              for a, b in zip(rec.c2w.numpy(), c["rel"]))
    extent = np.abs(c["xyz"][c["valid"]]).max()
    trans = np.abs(rec.c2w[:, :3, 3].numpy() - c["rel"][:, :3, 3]).max() / extent
    focal = np.abs(rec.focal.numpy() / c["intrinsics"][0, 0] - 1).max()
    d, g = rec.depth.numpy()[c["valid"]], c["depth"][c["valid"]]
    return rot, trans, focal, float(np.mean(np.abs(d - g) / g))


def test_unproject_matches_the_pointmap_convention(clip):
    T = len(clip["depth"])
    X = unproject(torch.from_numpy(clip["depth"]).double(), torch.full((T,), clip["intrinsics"][0, 0]).double(),
                  torch.from_numpy(clip["rel"]), ((48 - 1) / 2, (32 - 1) / 2))
    np.testing.assert_allclose(X.numpy()[clip["valid"]], clip["xyz"][clip["valid"]], atol=1e-4)


def test_exact_pointmaps_recover_cameras_focal_and_depth(clip):
    xyz, valid = torch.from_numpy(clip["xyz"]), torch.from_numpy(clip["valid"])
    for rec in (closed_form(xyz, valid), recover_geometry(xyz, valid, RecoveryConfig(iters=60))):
        rot, trans, focal, abs_rel = _errors(rec, clip)
        assert rot < 0.1 and trans < 1e-3 and focal < 1e-3 and abs_rel < 1e-3, (rot, trans, focal, abs_rel)
        assert torch.allclose(rec.c2w[0], torch.eye(4, dtype=rec.c2w.dtype), atol=1e-12)
        assert rec.depth.shape == (5, 32, 48) and rec.intrinsics.shape == (5, 3, 3)


def test_optimisation_improves_on_noisy_pointmaps(clip):
    rng = np.random.default_rng(0)
    noisy = clip["xyz"] * (1 + 0.02 * rng.standard_normal(clip["xyz"].shape[:-1]))[..., None]
    xyz, valid = torch.from_numpy(noisy), torch.from_numpy(clip["valid"])
    init = closed_form(xyz, valid)
    rec = refine(xyz, valid, init, RecoveryConfig(iters=150))
    rot0, _, focal0, _ = _errors(init, clip)
    rot1, _, focal1, _ = _errors(rec, clip)
    assert rot1 < 0.7 * rot0 and focal1 < focal0, (rot0, rot1, focal0, focal1)

    def l1(r):
        X = unproject(r.depth, r.focal, r.c2w, r.principal)
        return (X - xyz).abs().sum(-1)[valid].mean().item()

    assert l1(rec) < l1(init)


def test_outliers_without_a_validity_mask(clip):
    """A model predicts sky as one point (its normalised 0): a large cluster of outliers, no mask given."""
    xyz = clip["xyz"].copy()
    xyz[~clip["valid"]] = np.median(xyz[clip["valid"]], axis=0)
    assert (~clip["valid"]).mean() > 0.1
    rot, trans, focal, _ = _errors(closed_form(torch.from_numpy(xyz)), clip)
    assert rot < 0.1 and trans < 1e-3 and focal < 1e-3, (rot, trans, focal)


def test_coplanar_points_fall_back_to_the_previous_camera():
    """A 3x4 DLT of coplanar points is ambiguous: the closed form keeps the previous frame's camera."""
    T, H, W = 3, 16, 24
    c2w = torch.eye(4, dtype=torch.float64).repeat(T, 1, 1)
    c2w[:, 0, 3] = torch.tensor([0.0, 0.05, 0.1])
    plane = unproject(torch.full((T, H, W), 3.0, dtype=torch.float64), torch.full((T,), 20.0, dtype=torch.float64),
                      c2w, ((W - 1) / 2, (H - 1) / 2))
    rec = closed_form(plane)
    assert torch.allclose(rec.focal, torch.full((T,), 20.0, dtype=torch.float64))
    assert torch.allclose(rec.c2w, torch.eye(4, dtype=torch.float64).repeat(T, 1, 1))


def test_a_failed_nan_prediction_recovers_nothing_instead_of_the_solvers_stand_ins(clip):
    """A pointmap that is NaN everywhere (a model whose weights went NaN) gave depth 1, the image size as focal and
    identity cameras, which scored as a good prediction; partly NaN gave depth 1 on its NaN pixels. What it does not
    determine is NaN now, and its depth and pose metrics are NaN (counted as left out)."""
    import math

    from one4d_train.eval.metrics import depth_metrics, pose_metrics

    xyz = torch.from_numpy(clip["xyz"].copy())
    T = xyz.shape[0]
    for iters in (0, 20):
        rec = recover_geometry(torch.full_like(xyz, float("nan")), None, RecoveryConfig(iters=iters))
        assert rec.depth.isnan().all() and rec.focal.isnan().all() and rec.c2w.isnan().all(), iters
        assert math.isnan(depth_metrics(rec.depth.numpy(), clip["depth"])["abs_rel"])
        assert all(math.isnan(v) for v in pose_metrics(rec.c2w.numpy(), clip["rel"]).values())
        part = xyz.clone()
        part[1:] = float("nan")  # frame 0 predicted, the rest failed
        part[0, :2] = float("nan")
        rec = recover_geometry(part, None, RecoveryConfig(iters=iters))
        assert rec.depth[0, :2].isnan().all() and rec.depth[0, 2:].isfinite().all() and rec.depth[1:].isnan().all()
        assert rec.focal[0].isfinite() and rec.focal[1:].isnan().all() and rec.c2w[1:].isnan().all()
        assert rec.c2w[0].isfinite().all() and T > 2
    ok = recover_geometry(xyz, None, RecoveryConfig(iters=0))  # a finite pointmap: nothing changes
    assert ok.depth.isfinite().all() and ok.c2w.isfinite().all()


def test_temporal_smoothness_weights_smooth_the_recovered_trajectory(clip):
    """eval.smooth_rot / eval.smooth_centre (DESIGN: temporal smoothness on R and o) penalise frame-to-frame camera
    changes: with per-frame noise in the pointmaps, larger weights give a smoother trajectory, and the settings
    reach the recovery."""
    from one4d_train.eval.config import EvalConfig
    from one4d_train.eval.pipeline import recovery_config

    rng = np.random.default_rng(1)
    noisy = clip["xyz"] * (1 + 0.05 * rng.standard_normal((len(clip["xyz"]), 1, 1)))[..., None]
    noisy = noisy + 0.05 * rng.standard_normal((len(noisy), 1, 1, 3))  # a shift per frame
    xyz, valid = torch.from_numpy(noisy), torch.from_numpy(clip["valid"])
    init = closed_form(xyz, valid)

    def steps(weight):
        c2w = refine(xyz, valid, init, RecoveryConfig(iters=100, lr=3e-3, smooth_rot=weight,
                                                      smooth_centre=weight)).c2w
        return (((c2w[1:, :3, :3] - c2w[:-1, :3, :3]) ** 2).sum().item(),
                ((c2w[1:, :3, 3] - c2w[:-1, :3, 3]) ** 2).sum().item())

    (rot0, centre0), (rot1, centre1) = steps(0.0), steps(100.0)
    assert rot1 < 0.8 * rot0 and centre1 < 0.8 * centre0, (rot0, rot1, centre0, centre1)
    cfg = recovery_config(EvalConfig(smooth_rot=0.25, smooth_centre=0.5))
    assert (cfg.smooth_rot, cfg.smooth_centre) == (0.25, 0.5)
