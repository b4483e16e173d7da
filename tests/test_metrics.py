import copy
import math

import numpy as np
import pytest
import torch
from scipy.ndimage import correlate1d
from scipy.spatial.transform import Rotation

from one4d_train.eval.alignment import align_trajectory, depth_alignment, umeyama
from one4d_train.eval.metrics import depth_metrics, pose_metrics, psnr, relative_pose_errors, rgb_metrics, ssim


def _random_trajectory(rng, n):
    poses = np.tile(np.eye(4), (n, 1, 1))
    rot = Rotation.from_rotvec(np.cumsum(rng.normal(0, 0.1, (n, 3)), axis=0))
    poses[:, :3, :3] = rot.as_matrix()
    poses[:, :3, 3] = np.cumsum(rng.normal(0, 0.3, (n, 3)), axis=0)
    return poses


def _evo_numbers(est, gt):
    from evo.core import metrics, sync
    from evo.core.trajectory import PoseTrajectory3D

    stamps = np.arange(len(gt), dtype=float)
    ref = PoseTrajectory3D(poses_se3=list(gt), timestamps=stamps)
    traj = PoseTrajectory3D(poses_se3=list(est), timestamps=stamps.copy())
    ref, traj = sync.associate_trajectories(ref, traj)
    traj = copy.deepcopy(traj)
    traj.align(ref, correct_scale=True)
    out = {}
    ape = metrics.APE(metrics.PoseRelation.translation_part)
    ape.process_data((ref, traj))
    out["ate"] = ape.get_statistic(metrics.StatisticsType.rmse)
    for key, rel in (("rpe_trans", metrics.PoseRelation.translation_part),
                     ("rpe_rot", metrics.PoseRelation.rotation_angle_deg)):
        rpe = metrics.RPE(rel, delta=1, delta_unit=metrics.Unit.frames, all_pairs=False)
        rpe.process_data((ref, traj))
        out[key] = rpe.get_statistic(metrics.StatisticsType.rmse)
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pose_metrics_agree_with_evo(seed):
    rng = np.random.default_rng(seed)
    gt = _random_trajectory(rng, 30)
    noise = _random_trajectory(rng, 30)
    est = gt @ np.linalg.inv(gt[0]) @ noise  # a different but related trajectory
    est[:, :3, 3] *= 2.7
    ours, ref = pose_metrics(est, gt), _evo_numbers(est, gt)
    for k in ("ate", "rpe_trans", "rpe_rot"):
        assert abs(ours[k] - ref[k]) < 1e-6, (k, ours[k], ref[k])
    assert ours["ate"] > 0.01 and ours["rpe_rot"] > 0.1


def test_pose_identity_and_similarity_give_zero():
    gt = _random_trajectory(np.random.default_rng(3), 12)
    m = pose_metrics(gt, gt)
    assert m["ate"] < 1e-9 and m["rpe_trans"] < 1e-9 and m["rpe_rot"] < 1e-5
    S = np.eye(4)
    S[:3, :3] = Rotation.from_rotvec([0.3, -0.2, 0.5]).as_matrix()
    S[:3, 3] = [1.0, -2.0, 0.5]
    est = S @ gt
    est[:, :3, 3] = 0.4 * est[:, :3, 3]  # a different world frame and scale
    m = pose_metrics(est, gt)
    assert m["ate"] < 1e-9 and m["rpe_trans"] < 1e-9 and m["rpe_rot"] < 1e-5


def test_small_rotation_errors_of_float32_poses_agree_with_evo():
    """Scoring reads float32 ground-truth poses (the sample's poses_c2w): their rounding must not become an
    RPE-R floor (arccos of the trace made ~0.007 degrees of it for a perfect estimate)."""
    rng = np.random.default_rng(6)
    gt = _random_trajectory(rng, 40)
    gt32 = (np.linalg.inv(gt[0]) @ gt).astype(np.float32).astype(np.float64)
    for noise_deg in (0.0, 0.01, 0.5):
        est = gt32.copy()
        turn = Rotation.from_rotvec(rng.normal(0, np.radians(noise_deg) / math.sqrt(3), (40, 3)))
        est[:, :3, :3] = est[:, :3, :3] @ turn.as_matrix()
        est[:, :3, :3] = Rotation.from_matrix(est[:, :3, :3]).as_matrix()  # exactly orthonormal, as recovered
        ours, ref = pose_metrics(est, gt32)["rpe_rot"], _evo_numbers(est, gt32)["rpe_rot"]
        assert abs(ours - ref) < 1e-5 + 1e-3 * ref, (noise_deg, ours, ref)


def test_still_cameras_and_too_short_trajectories():
    """A still ground-truth camera has no aligned score (any estimate shrinks onto it). A still estimate of a
    moving camera is a failure scored as the limit of the Sim(3) fit: ATE the ground truth's spread, RPE-T its
    step lengths. It was NaN, which the means over sequences leave out: one failed sequence raised the mean."""
    from evo.core.geometry import GeometryException

    rng = np.random.default_rng(5)
    gt = _random_trajectory(rng, 8)
    gt[:, :3, 3] = [0.5, -1.0, 2.0]  # a camera that turns on a tripod
    est = _random_trajectory(rng, 8)  # an estimate that wanders off
    with pytest.raises(GeometryException):  # the reference has no Sim(3) alignment for it
        _evo_numbers(est, gt)
    _, er = relative_pose_errors(est, gt)
    m = pose_metrics(est, gt)  # a still ground truth
    assert math.isnan(m["ate"]) and math.isnan(m["rpe_trans"]), m
    assert abs(m["rpe_rot"] - np.sqrt(np.mean(er ** 2))) < 1e-9
    m = pose_metrics(gt, est)  # a still estimate of the wandering camera
    centres = est[:, :3, 3]
    spread = np.sqrt(np.mean(np.sum((centres - centres.mean(0)) ** 2, axis=1)))
    steps = np.linalg.norm((np.linalg.inv(est[:-1]) @ est[1:])[:, :3, 3], axis=1)
    assert abs(m["ate"] - spread) < 1e-9 and abs(m["rpe_trans"] - np.sqrt(np.mean(steps ** 2))) < 1e-9, m
    assert abs(m["rpe_rot"] - np.sqrt(np.mean(er ** 2))) < 1e-9
    # the fit at scale 0, which bounds the Sim(3) fit of any estimate: one that barely moves scores (by evo) below
    # it, by what its jitter, scaled up, happens to explain
    nearly = gt.copy()
    nearly[:, :3, 3] += 1e-6 * rng.normal(size=(8, 3))
    assert 0.5 * spread < _evo_numbers(nearly, est)["ate"] <= spread
    assert pose_metrics(est, gt, with_scale=False)["ate"] > 0.1  # SE(3) alignment is defined
    for n in (1, 2):  # one or two poses align exactly: no score, and no 0 standing for one
        with pytest.raises(ValueError, match="T >= 3"):
            pose_metrics(est[:n], gt[:n])
    with pytest.raises(ValueError, match="same"):
        pose_metrics(est, gt[:5])


def test_known_rotation_perturbation_gives_its_rpe():
    gt = np.tile(np.eye(4), (5, 1, 1))
    gt[:, 0, 3] = np.arange(5.0)
    est = gt.copy()
    est[3, :3, :3] = Rotation.from_rotvec([0, 0, np.radians(2.0)]).as_matrix()  # frame 3 turned by 2 degrees
    _, er = relative_pose_errors(est, gt)
    np.testing.assert_allclose(er, [0, 0, 2.0, 2.0], atol=1e-9)
    m = pose_metrics(est, gt, with_scale=False)
    assert abs(m["rpe_rot"] - math.sqrt((4 + 4) / 4)) < 1e-9


def test_umeyama_recovers_similarity():
    rng = np.random.default_rng(0)
    src = rng.normal(size=(50, 3))
    R = Rotation.from_rotvec([0.1, 0.7, -0.4]).as_matrix()
    dst = 3.0 * src @ R.T + [1, 2, 3]
    R2, t2, s2 = umeyama(src, dst)
    np.testing.assert_allclose(R2, R, atol=1e-12)
    np.testing.assert_allclose(t2, [1, 2, 3], atol=1e-12)
    assert abs(s2 - 3.0) < 1e-12
    est, gt = np.tile(np.eye(4), (50, 1, 1)), np.tile(np.eye(4), (50, 1, 1))
    est[:, :3, 3], gt[:, :3, 3] = src, dst
    np.testing.assert_allclose(align_trajectory(est, gt)[:, :3, 3], dst, atol=1e-12)


def test_depth_identity_and_known_scale_shift():
    rng = np.random.default_rng(0)
    gt = rng.uniform(0.5, 20.0, size=(4, 6, 8))
    gt[0, 0, 0] = 0.0  # invalid
    gt[1, 1, 1] = 90.0  # beyond the cap
    for align in ("median", "scale", "scale_shift"):
        m = depth_metrics(gt, gt, align=align, cap=70.0)
        assert m["abs_rel"] < 1e-12 and m["delta_1_25"] == 1.0
        assert m["num_pixels"] == gt.size - 2
    m = depth_metrics((gt - 0.3) / 2.5, gt, align="scale_shift")
    assert abs(m["scale"] - 2.5) < 1e-9 and abs(m["shift"] - 0.3) < 1e-9 and m["abs_rel"] < 1e-9
    m = depth_metrics(gt / 4.0, gt, align="scale")
    assert abs(m["scale"] - 4.0) < 1e-9 and m["abs_rel"] < 1e-9
    m = depth_metrics(gt / 4.0, gt, align="median")
    assert abs(m["scale"] - 4.0) < 1e-9


def test_depth_known_error_value():
    gt = np.full((1, 2, 2), 2.0)
    pred = np.array([[[2.0, 2.0], [2.0, 3.0]]])
    m = depth_metrics(pred, gt, align="none")
    assert abs(m["abs_rel"] - 0.5 / 4) < 1e-12 and m["delta_1_25"] == 0.75
    with pytest.raises(ValueError, match="alignment"):
        depth_alignment(pred, gt, gt > 0, "affine")


def _video_depth_reference(pred, gt, max_depth, lstsq):
    """MonST3R's depth_evaluation (dust3r/depth_eval.py) in numpy with its median or least-squares (`align_with_lstsq`)
    alignment: ground truth in (0, max_depth), one alignment over the whole sequence, aligned depth clipped at max_depth
    (post_clip_max), Abs Rel and delta < 1.25 over the masked pixels; nothing masks the prediction."""
    mask = (gt > 0) & (gt < max_depth)
    p, g = pred[mask], gt[mask]
    if lstsq:
        (s, t), *_ = np.linalg.lstsq(np.stack([p, np.ones_like(p)], 1), g, rcond=None)
        p = s * p + t
    else:
        p = p * (np.median(g) / np.median(p))
    p = np.minimum(p, max_depth)
    abs_rel = np.mean(np.abs(p - g) / g)
    p = np.maximum(p, 1e-5)
    return abs_rel, np.mean(np.maximum(p / g, g / p) < 1.25)


def _lad2_reference(p, g, lr=1e-4, max_iters=1000, tol=1e-6):
    """The video-depth protocol's scale-and-shift fit (`align_with_lad2`: absolute_value_scaling2) as it is written
    there, torch.optim.Adam and autograd, from s = median(g) / median(p) (torch's lower median), t = 0."""
    p, g = torch.from_numpy(p), torch.from_numpy(g)
    s = torch.tensor([(torch.median(g) / torch.median(p)).item()], requires_grad=True, dtype=p.dtype)
    t = torch.tensor([0.0], requires_grad=True, dtype=p.dtype)
    optimizer = torch.optim.Adam([s, t], lr=lr)
    prev_loss = None
    for _ in range(max_iters):
        optimizer.zero_grad()
        loss = torch.sum(torch.abs(s * p + t - g))
        loss.backward()
        optimizer.step()
        if prev_loss is not None and torch.abs(prev_loss - loss) < tol:
            break
        prev_loss = loss.item()
    return s.item(), t.item()


def _weiszfeld_reference(p, g):
    """The protocol's scale fit (`align_with_scale`), in torch as it is written there."""
    p, g = torch.from_numpy(p), torch.from_numpy(g)
    s = torch.nanmean(g) / torch.nanmean(p)
    for _ in range(10):
        w = 1.0 / ((s * p - g).abs() + 1e-8)
        s = torch.sum(w * p * g) / torch.sum(w * p ** 2)
    return s.clamp(min=1e-3).item()


def test_l1_alignments_are_the_video_depth_protocols_and_the_default():
    """Sintel / Bonn video-depth tables (MonST3R, CUT3R, Geo4D) fit scale and shift by an L1 descent from the median
    scale and scale alone by Weiszfeld's reweighting; least squares, the earlier default, let a few far outliers
    drag the fit (Abs Rel 0.48 where the protocol gives 0.19 on the case below)."""
    from one4d_train.eval.config import EvalConfig

    rng = np.random.default_rng(7)
    gt = rng.uniform(1.0, 10.0, (4, 30, 40))
    pred = gt * np.exp(rng.normal(0, 0.05, gt.shape))
    far = rng.random(gt.shape) < 0.05
    pred[far] *= 4.0  # 5% of the pixels predicted 4x too far
    mask = gt > 0
    s, t = depth_alignment(pred, gt, mask, "l1_scale_shift")
    np.testing.assert_allclose([s, t], _lad2_reference(pred[mask], gt[mask]), rtol=1e-9, atol=1e-12)
    # weights of 1 / (|r| + 1e-8) make the last steps depend on the order of summation: equal to 1e-4
    assert depth_alignment(pred, gt, mask, "l1_scale") == (pytest.approx(_weiszfeld_reference(pred[mask], gt[mask]),
                                                                         rel=1e-4), 0.0)
    l1, lstsq = (depth_metrics(pred, gt, align=a, cap=70.0) for a in ("l1_scale_shift", "scale_shift"))
    assert l1["abs_rel"] < 0.25 < 0.4 < lstsq["abs_rel"] and l1["delta_1_25"] > 0.9 > lstsq["delta_1_25"]
    assert EvalConfig().depth_align == "l1_scale_shift"
    for align in ("l1_scale_shift", "l1_scale"):
        m = depth_metrics(gt / 2.0, gt, align=align, cap=70.0)  # a perfect prediction up to scale
        assert m["abs_rel"] < 1e-3 and m["delta_1_25"] == 1.0


@pytest.mark.parametrize("align", ["median", "scale_shift"])
def test_depth_metrics_match_the_reference_and_a_failed_prediction_scores_nan(align):
    rng = np.random.default_rng(4)
    gt = rng.uniform(0.5, 90.0, (4, 12, 16))
    gt[rng.random(gt.shape) < 0.1] = 0.0
    pred = 0.3 * gt * np.exp(rng.normal(0, 0.3, gt.shape)) + 0.5
    ref = _video_depth_reference(pred, gt, 70.0, align == "scale_shift")
    m = depth_metrics(pred, gt, align=align, cap=70.0)
    assert abs(m["abs_rel"] - ref[0]) < 1e-12 and m["delta_1_25"] == ref[1] and 0.05 < ref[0] < 1
    # the prediction failed on some scored pixels: NaN, as in the reference (whose least-squares fit raises)
    pred[1, 3:6] = np.nan
    m = depth_metrics(pred, gt, align=align, cap=70.0)
    assert np.isnan(m["abs_rel"]) and np.isnan(m["delta_1_25"])
    if align == "median":
        assert np.isnan(_video_depth_reference(pred, gt, 70.0, False)[0])
    assert m["num_pixels"] == int(((gt > 0) & (gt < 70.0)).sum())
    pred[gt == 0] = np.inf  # but not where the ground truth is unknown
    pred[1, 3:6] = gt[1, 3:6]
    assert np.isfinite(depth_metrics(pred, gt, align=align, cap=70.0)["abs_rel"])


@pytest.mark.parametrize("align", ["median", "scale_shift"])
def test_depth_metrics_keep_the_whole_error_of_pixels_aligned_below_zero(align):
    """A prediction concave in depth: the least-squares fit puts some near pixels below zero. Their Abs Rel error
    counts whole, as in MonST3R's depth_evaluation (clipped at 1e-5 only for delta); clipping them at 1e-3 first
    capped each at ~1. A prediction whose median is negative aligns by that median too."""
    rng = np.random.default_rng(5)
    gt = rng.uniform(0.2, 20.0, (3, 10, 12))
    pred = np.log(gt) + 0.05
    ref = _video_depth_reference(pred, gt, 70.0, align == "scale_shift")
    m = depth_metrics(pred, gt, align=align, cap=70.0)
    if align == "scale_shift":
        s, t = m["scale"], m["shift"]
        assert ((s * pred + t) < 0).mean() > 0.01  # the case at issue
    assert abs(m["abs_rel"] - ref[0]) < 1e-12 and m["delta_1_25"] == ref[1]
    assert depth_metrics(-gt, gt, align="median", cap=70.0)["abs_rel"] < 1e-12


def _ssim_reference(x, y, L=1.0):
    """Wang et al.'s SSIM, written with scipy separable filtering, cropped to the 'valid' region."""
    x, y = x.astype(np.float64), y.astype(np.float64)
    k = np.exp(-((np.arange(11) - 5) ** 2) / (2 * 1.5 ** 2))
    k /= k.sum()

    def f(z):
        z = correlate1d(correlate1d(z, k, axis=0, mode="constant"), k, axis=1, mode="constant")
        return z[5:-5, 5:-5]

    mx, my = f(x), f(y)
    sxx, syy, sxy = f(x * x) - mx ** 2, f(y * y) - my ** 2, f(x * y) - mx * my
    c1, c2 = (0.01 * L) ** 2, (0.03 * L) ** 2
    return np.mean(((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (sxx + syy + c2)))


def test_ssim_psnr_against_references():
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(3, 32, 40))
    y = np.clip(x + rng.normal(0, 0.1, x.shape), 0, 1)
    ref = np.mean([_ssim_reference(x[c], y[c]) for c in range(3)])
    assert abs(ssim(torch.from_numpy(y), torch.from_numpy(x)) - ref) < 1e-10
    assert 0.3 < ref < 0.95
    a, b = torch.full((1, 1, 20, 20), 0.2), torch.full((1, 1, 20, 20), 0.6)
    c1 = 0.01 ** 2  # a constant image pair: only the luminance term differs from 1
    assert abs(ssim(a, b) - (2 * 0.2 * 0.6 + c1) / (0.2 ** 2 + 0.6 ** 2 + c1)) < 1e-6
    assert abs(psnr(a, b) - 10 * math.log10(1 / 0.16)) < 1e-5
    img = torch.from_numpy(x)[None].float()
    assert psnr(img, img) == math.inf and abs(ssim(img, img) - 1.0) < 1e-12


def test_rgb_metrics_use_observed_frames_only():
    ref = torch.rand(4, 3, 16, 16)
    pred = ref.clone()
    pred[1] = 1 - pred[1]
    m = rgb_metrics(pred, ref, torch.tensor([True, False, True, False]))
    assert m["psnr"] == math.inf and abs(m["ssim"] - 1) < 1e-12 and m["num_frames"] == 2
    assert rgb_metrics(pred, ref, torch.tensor([False, True, False, False]))["psnr"] < 10
