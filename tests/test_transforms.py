"""Resize/crop of RGB and geometry, intrinsics that follow it, pointmaps and their normalisation."""
import json

import numpy as np
import pytest
import torch

from data_pipeline.decode import DecodedClip
from data_pipeline.geometry import denormalise_pointmap, depth_to_pointmaps
from data_pipeline.synthetic import render_clip
from data_pipeline.transforms import (camera_pointmaps, crop_intrinsics, plan_crop, resize_crop_nearest,
                                      resize_crop_rgb, to_sample)


def _project(K, X):
    p = K @ X
    return p[:2] / p[2]


@pytest.mark.parametrize("src, out, mode", [((480, 854), (352, 624), "random"), ((40, 64), (32, 48), "center"),
                                            ((30, 40), (64, 96), "random"), ((64, 64), (32, 48), "center")])
def test_crop_covers_target(src, out, mode):
    rng = np.random.default_rng(0)
    for _ in range(5):
        c = plan_crop(*src, *out, mode, rng)
        assert c.resized_h >= out[0] and c.resized_w >= out[1]
        assert 0 <= c.top <= c.resized_h - out[0] and 0 <= c.left <= c.resized_w - out[1]
        # aspect kept up to rounding: the tight side matches the target
        assert min(c.resized_h - out[0], c.resized_w - out[1]) == 0


def test_intrinsics_follow_resize_and_crop():
    """A 3D point projects onto the same spot of the scene before and after: its pixel coordinates move
    exactly as the pixel-centre resize u -> (u + 0.5) s - 0.5 and the crop offset say."""
    K = np.array([[500.0, 0, 426.5], [0, 510.0, 239.5], [0, 0, 1]])
    crop = plan_crop(480, 854, 352, 624, "random", np.random.default_rng(3))
    K2 = crop_intrinsics(K, 480, 854, crop)
    sx, sy = crop.resized_w / 854, crop.resized_h / 480
    for X in (np.array([0.3, -0.2, 2.0]), np.array([-1.1, 0.7, 5.0]), np.array([0.0, 0.0, 1.0])):
        u, v = _project(K, X)
        u2, v2 = _project(K2, X)
        assert u2 == pytest.approx((u + 0.5) * sx - 0.5 - crop.left, abs=1e-9)
        assert v2 == pytest.approx((v + 0.5) * sy - 0.5 - crop.top, abs=1e-9)


def test_intrinsics_match_the_resized_image():
    """A bright dot at the projection of a 3D point lands, after the RGB resize/crop, at the pixel where the
    adjusted intrinsics project that point."""
    K = np.array([[120.0, 0, 95.5], [0, 120.0, 63.5], [0, 0, 1]])
    X = np.array([0.25, -0.1, 1.5])
    u, v = np.round(_project(K, X)).astype(int)
    X = np.linalg.inv(K) @ np.array([u, v, 1.0]) * 1.5  # the point exactly behind that pixel centre
    frame = np.zeros((1, 128, 192, 3), np.uint8)
    frame[0, v - 2:v + 3, u - 2:u + 3] = 255
    crop = plan_crop(128, 192, 64, 80, "random", np.random.default_rng(1))
    out = resize_crop_rgb(frame, crop)[0, 0].float()
    ys, xs = torch.meshgrid(torch.arange(out.shape[0]), torch.arange(out.shape[1]), indexing="ij")
    centroid = np.array([(out * xs).sum() / out.sum(), (out * ys).sum() / out.sum()])
    np.testing.assert_allclose(centroid, _project(crop_intrinsics(K, 128, 192, crop), X), atol=0.05)


def test_nearest_resize_invents_no_depth_values():
    rng = np.random.default_rng(0)
    depth = np.where(rng.random((3, 45, 80)) < 0.5, 1.0, 9.0).astype(np.float32) * rng.integers(1, 5, (3, 45, 80))
    for out in [(32, 48), (64, 112), (16, 16)]:
        crop = plan_crop(45, 80, *out, "random", rng)
        small = resize_crop_nearest(depth, crop)
        assert small.shape == (3, *out)
        assert set(np.unique(small)) <= set(np.unique(depth))
    # a pure crop (scale 1) is an exact copy of the window
    crop = plan_crop(45, 80, 45, 48, "center", rng)
    np.testing.assert_array_equal(resize_crop_nearest(depth, crop), depth[:, :, 16:64])


def test_camera_pointmaps_match_geometry():
    clip = render_clip(5, 4, 24, 40)
    rel = np.linalg.inv(clip["poses_c2w"][1]) @ clip["poses_c2w"]
    K = np.broadcast_to(clip["intrinsics"], (4, 3, 3))
    ours = camera_pointmaps(torch.from_numpy(clip["depth"]), torch.from_numpy(K.copy()), torch.from_numpy(rel))
    ref = depth_to_pointmaps(clip["depth"], clip["intrinsics"], clip["poses_c2w"], ref=1)
    np.testing.assert_allclose(ours.permute(0, 2, 3, 1).numpy(), ref, atol=2e-5 * np.abs(ref).max())


def _decoded(clip, idx):
    rel = np.linalg.inv(clip["poses_c2w"][idx[0]]) @ clip["poses_c2w"][idx]
    return DecodedClip(frames=clip["frames"][idx], depth=clip["depth"][idx], xyz=None, xyz_to_ref=None, valid=clip["valid"][idx],
                       intrinsics=np.broadcast_to(clip["intrinsics"], (len(idx), 3, 3)).copy(), poses_c2w=rel,
                       caption=clip["caption"], text_emb=None, frame_indices=np.asarray(idx))


def test_sample_pointmaps_are_nearest_resized_depth_in_first_sampled_camera():
    clip = render_clip(2, 7, 45, 80)
    idx = np.array([2, 4, 6])
    s = to_sample(_decoded(clip, idx), 32, 48, "random", (2.0, 98.0), np.random.default_rng(4))
    assert s["rgb"].shape == s["xyz"].shape == (3, 3, 32, 48) and s["valid"].shape == (3, 1, 32, 48)
    assert s["rgb"].dtype == s["xyz"].dtype == torch.float32 and s["valid"].dtype == torch.bool
    assert s["rgb"].min() >= -1 and s["rgb"].max() <= 1 and s["xyz"].abs().max() <= 1
    np.testing.assert_allclose(s["poses_c2w"][0].numpy(), np.eye(4), atol=1e-6)

    crop = plan_crop(45, 80, 32, 48, "random", np.random.default_rng(4))
    depth = resize_crop_nearest(clip["depth"][idx], crop)
    K = crop_intrinsics(clip["intrinsics"], 45, 80, crop)
    np.testing.assert_allclose(s["intrinsics"].numpy(), np.broadcast_to(K, (3, 3, 3)), rtol=1e-6)
    ref = depth_to_pointmaps(depth, K, clip["poses_c2w"][idx])
    metric = denormalise_pointmap(s["xyz"].permute(0, 2, 3, 1).numpy(), s["xyz_centre"].numpy(), s["xyz_scale"].item())
    valid = s["valid"][:, 0].numpy()
    np.testing.assert_array_equal(valid, resize_crop_nearest(clip["valid"][idx], crop))
    inside = valid & (np.abs(s["xyz"].permute(0, 2, 3, 1).numpy()) < 1).all(-1)
    assert inside.mean() > 0.5
    np.testing.assert_allclose(metric[inside], ref[inside], atol=1e-5 * s["xyz_scale"].item() + 1e-5)
    assert (s["xyz"].permute(0, 2, 3, 1)[torch.from_numpy(~valid)] == 0).all()
    # centre / scale are the 2nd-98th percentile box of the valid points
    lo, hi = np.percentile(ref[valid], [2, 98], axis=0)
    np.testing.assert_allclose(s["xyz_centre"].numpy(), (lo + hi) / 2, rtol=1e-5, atol=1e-5)
    assert s["xyz_scale"].item() == pytest.approx((hi - lo).max() / 2, rel=1e-5)


def test_same_seed_same_sample_and_crop_varies_with_seed():
    clip = render_clip(1, 3, 40, 90)
    dec = _decoded(clip, np.arange(3))
    a = to_sample(dec, 32, 48, "random", (2.0, 98.0), np.random.default_rng(7))
    b = to_sample(dec, 32, 48, "random", (2.0, 98.0), np.random.default_rng(7))
    assert torch.equal(a["rgb"], b["rgb"]) and torch.equal(a["xyz"], b["xyz"])
    lefts = {plan_crop(40, 90, 32, 48, "random", np.random.default_rng(s)).left for s in range(20)}
    assert len(lefts) > 3


def test_stored_pointmaps_are_re_expressed_in_the_first_sampled_camera():
    """xyz geometry (first frame of the clip) with known poses gives the same sample as depth geometry.
    (A pure crop, so that nearest-resized pointmaps and pointmaps of nearest-resized depth coincide.)"""
    clip = render_clip(3, 6, 32, 64)
    idx = np.array([2, 3, 4])
    from_depth = _decoded(clip, idx)
    xyz = depth_to_pointmaps(clip["depth"], clip["intrinsics"], clip["poses_c2w"], ref=0)
    to_ref = np.linalg.inv(clip["poses_c2w"][2]) @ clip["poses_c2w"][0]
    from_xyz = DecodedClip(**{**from_depth.__dict__, "depth": None, "xyz": xyz[idx], "xyz_to_ref": to_ref})
    a = to_sample(from_depth, 32, 48, "random", (2.0, 98.0), np.random.default_rng(2))
    b = to_sample(from_xyz, 32, 48, "random", (2.0, 98.0), np.random.default_rng(2))
    assert torch.equal(a["valid"], b["valid"])
    torch.testing.assert_close(a["xyz_centre"], b["xyz_centre"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(a["xyz_scale"], b["xyz_scale"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(a["xyz"], b["xyz"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("form, grid", [("depth", "misses"), ("xyz", "misses"), ("depth", "barely")])
def test_normalisation_of_a_mask_the_subsample_grid_misses_uses_the_valid_pixels(monkeypatch, form, grid):
    """The percentiles are estimated on a k-strided pixel grid; geometry valid only off it (an object smaller than
    the grid's step, a mask on every other column) gave centre 0 and scale 1, so every valid point was clipped to
    the box's face while the sample claimed an identity transform. Such a mask is sampled among its valid pixels;
    a window with no valid pixel at all is a SampleError (skipped and counted), not a sample training on nothing."""
    import data_pipeline.transforms as tr
    from data_pipeline.decode import SampleError

    monkeypatch.setattr(tr, "NORMALISATION_POINTS", 200)  # 3 x 32 x 48 pixels: a stride-5 grid
    monkeypatch.setattr(tr, "MIN_GRID_POINTS", 4)
    clip = render_clip(2, 7, 32, 48)
    idx = np.array([2, 4, 6])
    assert clip["valid"][:, 16:20, 21:25].all()
    clip["valid"] = np.zeros_like(clip["valid"])
    clip["valid"][:, 16:20, 21:25] = True  # 48 pixels, none on the grid (rows and columns 0, 5, 10, ...)
    if grid == "barely":
        clip["valid"][:, 15, 20] = True  # and one that is: the grid's three points (one per frame) set the box
    dec = _decoded(clip, idx)
    if form == "xyz":
        xyz = depth_to_pointmaps(clip["depth"], clip["intrinsics"], clip["poses_c2w"], ref=0)
        to_ref = np.linalg.inv(clip["poses_c2w"][2]) @ clip["poses_c2w"][0]
        dec = DecodedClip(**{**dec.__dict__, "depth": None, "xyz": xyz[idx], "xyz_to_ref": to_ref})
    s = to_sample(dec, 32, 48, "center", (2.0, 98.0), np.random.default_rng(0))
    ref = depth_to_pointmaps(clip["depth"][idx], clip["intrinsics"], clip["poses_c2w"][idx])
    lo, hi = np.percentile(ref[clip["valid"][idx]], [2, 98], axis=0)
    np.testing.assert_allclose(s["xyz_centre"].numpy(), (lo + hi) / 2, rtol=1e-4, atol=1e-4)
    assert s["xyz_scale"].item() == pytest.approx((hi - lo).max() / 2, rel=1e-4)
    inside = s["xyz"].permute(0, 2, 3, 1)[s["valid"][:, 0]]
    assert (inside.abs() < 1).all(-1).float().mean() > 0.85  # not clipped to the box's faces

    dec.valid[:] = False
    with pytest.raises(SampleError, match="no valid geometry in the window's 3 frames"):
        to_sample(dec, 32, 48, "center", (2.0, 98.0), np.random.default_rng(0))
    empty = to_sample(dec, 32, 48, "center", (2.0, 98.0), np.random.default_rng(0), empty_ok=True)  # a benchmark's
    assert not empty["valid"].any() and empty["xyz_scale"].item() == 1.0 and not empty["xyz"].any()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_samples_match_float32(dtype):
    dec = _decoded(render_clip(4, 3, 40, 64), np.arange(3))
    ref = to_sample(dec, 32, 48, "center", (2.0, 98.0), np.random.default_rng(0))
    half = to_sample(dec, 32, 48, "center", (2.0, 98.0), np.random.default_rng(0), dtype)
    tol = 2 ** -8 if dtype == "bfloat16" else 2 ** -11
    for key in ("rgb", "xyz"):
        assert half[key].dtype == getattr(torch, dtype)
        torch.testing.assert_close(half[key].float(), ref[key], atol=tol, rtol=0)
    assert torch.equal(half["valid"], ref["valid"])


def _edge(profile: np.ndarray) -> float:
    """Sub-pixel position of a rising step in a 1-D profile: where it crosses half-way between its ends."""
    half = (profile[0] + profile[-1]) / 2
    j = int(np.argmax(profile >= half))
    return j - 1 + (half - profile[j - 1]) / (profile[j] - profile[j - 1])


def test_rgb_and_geometry_edges_stay_aligned_through_the_resized_decode(tmp_path):
    """A step edge seen in the video and in the depth (a near plane beside a far one) at source column/row c
    lands, after the decoder's swscale resize + crop and the depth's nearest resize + crop, where the sample's
    intrinsics map source pixel c - 0.5: in RGB to 0.15 px, in the pointmaps to the nearest pixel boundary."""
    from data_pipeline.decode import decode_clip, frame_member
    from data_pipeline.shard import npz_arrays_bytes
    from data_pipeline.video import write_mp4

    H, W, T = 90, 160, 4
    cuts = [37, 81, 29, 52]  # frames 0-1: a vertical edge at that column, frames 2-3: a horizontal one at that row
    frames, depth = np.full((T, H, W, 3), 40, np.uint8), np.full((T, H, W), 1.0, np.float16)
    for t, c in enumerate(cuts):
        far = (slice(None), slice(c, None)) if t < 2 else (slice(c, None), slice(None))
        frames[t][far], depth[t][far] = 220, 3.0
    write_mp4(tmp_path / "edge.mp4", frames)
    K = np.array([[100.0, 0, 79.5], [0, 100.0, 44.5], [0, 0, 1]])
    raw = {"mp4": (tmp_path / "edge.mp4").read_bytes(),
           "depth.npz": npz_arrays_bytes([(frame_member("depth", t), depth[t]) for t in range(T)]),
           "cam.json": json.dumps({"intrinsics": K.tolist(), "poses_c2w": [np.eye(4).tolist()] * T}).encode(),
           "txt": b""}
    for seed in range(3):
        rng = np.random.default_rng(seed)
        clip = decode_clip(raw, T, 1, rng, size=(64, 96))
        assert clip.frames.shape == (T, 64, 114, 3)  # 90x160 covering 64x96: scale 64/90, resized by the decoder
        s = to_sample(clip, 64, 96, "random", (2.0, 98.0), rng)
        Ks = s["intrinsics"].numpy().astype(np.float64)
        rgb, z = s["rgb"][:, 0].numpy(), s["xyz"][:, 2].numpy()
        for t, c in enumerate(cuts):
            axis = 0 if t < 2 else 1  # u (columns) or v (rows)
            a = Ks[t, axis, axis] / K[axis, axis]
            want = a * (c - 0.5) + Ks[t, axis, 2] - a * K[axis, 2]
            mid = rgb.shape[1 + (1 - axis)] // 2
            rgb_line = rgb[t, mid, :] if axis == 0 else rgb[t, :, mid]
            z_line = z[t, mid, :] if axis == 0 else z[t, :, mid]
            assert abs(_edge(rgb_line) - want) < 0.15, (seed, t, _edge(rgb_line), want)
            step = int(np.argmax(z_line > (z_line[0] + z_line[-1]) / 2)) - 0.5  # between two nearest-resized pixels
            assert abs(step - want) <= 0.5 + 1e-6, (seed, t, step, want)
