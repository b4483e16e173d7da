import json

import numpy as np
import pytest

from data_pipeline.geometry import depth_to_camera_points, depth_to_pointmaps, pixel_rays
from data_pipeline.synthetic import (BACK_WALL, BOX, FLOOR, SIDE_WALL, SKY, SPHERE, make_scene, render_clip,
                                     write_dataset)
from data_pipeline.synthetic_cli import main as synth_main
from data_pipeline.video import decode_frames

T, H, W = 6, 48, 80


@pytest.fixture(scope="module")
def clip():
    return render_clip(3, T, H, W)


@pytest.fixture(scope="module")
def scene():
    return make_scene(3, T, H, W)


def world_points(clip, i):
    cam = depth_to_camera_points(clip["depth"][i].astype(np.float64), clip["intrinsics"])
    c2w = clip["poses_c2w"][i]
    return cam @ c2w[:3, :3].T + c2w[:3, 3]


def test_outputs_have_documented_shapes_and_types(clip):
    assert clip["frames"].shape == (T, H, W, 3) and clip["frames"].dtype == np.uint8
    assert clip["depth"].shape == (T, H, W) and clip["depth"].dtype == np.float32
    assert clip["valid"].shape == (T, H, W) and clip["valid"].dtype == bool
    assert clip["intrinsics"].shape == (3, 3) and clip["poses_c2w"].shape == (T, 4, 4)
    assert clip["intrinsics"][0, 2] == pytest.approx((W - 1) / 2)
    R = clip["poses_c2w"][:, :3, :3]
    np.testing.assert_allclose(R @ R.transpose(0, 2, 1), np.broadcast_to(np.eye(3), (T, 3, 3)), atol=1e-12)
    np.testing.assert_allclose(np.linalg.det(R), 1.0)
    assert np.array_equal(clip["valid"], clip["surface"] != SKY)
    assert (clip["depth"][clip["valid"]] > 0).all() and (clip["depth"][~clip["valid"]] == 0).all()
    assert 0 < (~clip["valid"]).sum() < clip["valid"].size / 2  # some sky, mostly surfaces
    assert "ball" in clip["caption"] and "box" in clip["caption"]


def test_render_is_deterministic_per_seed(clip):
    again = render_clip(3, T, H, W)
    for k in ("frames", "depth", "valid", "poses_c2w"):
        assert np.array_equal(again[k], clip[k])
    assert not np.array_equal(render_clip(4, T, H, W)["depth"], clip["depth"])


def test_unprojected_depth_lies_on_the_analytic_surfaces(clip, scene):
    seen = set()
    for i in range(T):
        p = world_points(clip, i)
        s = clip["surface"][i]
        seen |= set(np.unique(s).tolist())
        residual = {
            FLOOR: p[..., 1] - scene.floor_y,
            BACK_WALL: p[..., 2] - scene.back_z,
            SIDE_WALL: p[..., 0] - scene.side_x,
            SPHERE: np.linalg.norm(p - scene.sphere_centres[i], axis=-1) - scene.sphere_radius,
            BOX: np.abs((p - scene.box_centres[i]) / scene.box_half).max(-1) - 1.0,
        }
        for surf, res in residual.items():
            scale = 1.0 if surf == BOX else np.abs(clip["depth"][i][s == surf]).max(initial=1.0)
            assert np.abs(res[s == surf]).max(initial=0) < 2e-6 * scale, f"frame {i} surface {surf}"
    assert {FLOOR, BACK_WALL, SIDE_WALL, SPHERE, BOX} <= seen


def test_moving_object_moves_independently_of_the_camera(clip, scene):
    first, last = 0, T - 1
    sphere_first = world_points(clip, first)[clip["surface"][first] == SPHERE]
    sphere_last = world_points(clip, last)[clip["surface"][last] == SPHERE]
    assert len(sphere_first) > 10 and len(sphere_last) > 10
    r = scene.sphere_radius

    def fit_centre(pts):  # algebraic sphere fit: |p|^2 = 2 c.p + (r^2 - |c|^2)
        A = np.c_[2 * pts, np.ones(len(pts))]
        return np.linalg.lstsq(A, (pts ** 2).sum(1), rcond=None)[0][:3]

    c0, c1 = fit_centre(sphere_first), fit_centre(sphere_last)
    np.testing.assert_allclose(c0, scene.sphere_centres[first], atol=1e-3)
    np.testing.assert_allclose(c1, scene.sphere_centres[last], atol=1e-3)
    assert np.linalg.norm(c1 - c0) > 0.5  # the object moved in the world ...
    assert np.abs(np.linalg.norm(sphere_last - c0, axis=1) - r).max() > 0.3  # ... so it is off its old place
    for i in (first, last):  # while the static floor stays where it was
        floor = world_points(clip, i)[clip["surface"][i] == FLOOR]
        np.testing.assert_allclose(floor[:, 1], scene.floor_y, atol=1e-4)
    cam_move = clip["poses_c2w"][last, :3, 3] - clip["poses_c2w"][first, :3, 3]
    assert np.linalg.norm((c1 - c0) - cam_move) > 0.3  # not the camera's motion
    box_move = scene.box_centres[last] - scene.box_centres[first]
    cosine = np.dot(box_move, c1 - c0) / (np.linalg.norm(box_move) * np.linalg.norm(c1 - c0))
    assert np.linalg.norm(box_move) > 0.5 and abs(cosine) < 0.9  # the two objects move on different paths


def test_pointmaps_of_frame0_equal_camera_frame_points(clip):
    xyz = depth_to_pointmaps(clip["depth"], clip["intrinsics"], clip["poses_c2w"])
    rays = pixel_rays(clip["intrinsics"], H, W)
    np.testing.assert_allclose(xyz[0], rays * clip["depth"][0][..., None], rtol=1e-6, atol=1e-6)
    w2c0 = np.linalg.inv(clip["poses_c2w"][0])
    last = world_points(clip, T - 1) @ w2c0[:3, :3].T + w2c0[:3, 3]
    v = clip["valid"][T - 1]
    np.testing.assert_allclose(xyz[T - 1][v], last[v], atol=1e-4)


def test_write_dataset_mp4_decodes_within_codec_tolerance(tmp_path):
    manifest = write_dataset(tmp_path, 2, 9, 64, 112, seed=7)
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert len(rows) == 2
    for n, row in enumerate(rows):
        ref = render_clip(7 + n, 9, 64, 112)
        frames = decode_frames(tmp_path / row["video"])
        assert frames.shape == ref["frames"].shape
        mse = ((frames.astype(np.float64) - ref["frames"]) ** 2).mean()
        psnr = 10 * np.log10(255 ** 2 / mse)
        assert psnr > 30, f"PSNR {psnr:.1f} dB"  # measured ~34 dB (crf 10, yuv420p chroma subsampling)
        assert np.array_equal(np.load(tmp_path / row["depth"], allow_pickle=False), ref["depth"])
        np.testing.assert_allclose(np.load(tmp_path / row["poses"], allow_pickle=False), ref["poses_c2w"])
        np.testing.assert_allclose(row["intrinsics"], ref["intrinsics"])
        with np.load(tmp_path / row["valid"], allow_pickle=False) as z:
            assert np.array_equal(z["valid"], ref["valid"])
        assert row["caption"] == ref["caption"]


def test_write_dataset_xyz_geometry(tmp_path):
    manifest = write_dataset(tmp_path, 1, 5, 32, 64, seed=1, geometry="xyz")
    row = json.loads(manifest.read_text())
    assert "depth" not in row and "poses" not in row
    ref = render_clip(1, 5, 32, 64)
    xyz = np.load(tmp_path / row["xyz"], allow_pickle=False)
    expect = depth_to_pointmaps(ref["depth"], ref["intrinsics"], ref["poses_c2w"])
    np.testing.assert_allclose(xyz[ref["valid"]], expect[ref["valid"]])
    assert (xyz[~ref["valid"]] == 0).all()
    with pytest.raises(ValueError, match="geometry"):
        write_dataset(tmp_path, 1, 5, 32, 64, geometry="mesh")
    with pytest.raises(ValueError, match="does not decode with decord"):  # a decord 0.6 limit, docs/data.md
        write_dataset(tmp_path / "w48", 1, 3, 32, 48)


def test_synth_cli(tmp_path, capsys):
    assert synth_main([str(tmp_path), "--clips", "2", "--frames", "3", "--height", "32", "--width", "64",
                       "--geometry", "xyz", "--seed", "5"]) == 0
    assert "manifest" in capsys.readouterr().out
    assert len((tmp_path / "manifest.jsonl").read_text().splitlines()) == 2
    with pytest.raises(SystemExit) as e:
        synth_main(["--help"])
    assert e.value.code == 0
    with pytest.raises(SystemExit) as e:
        synth_main([str(tmp_path), "--height", "33"])
    assert e.value.code == 2


@pytest.mark.parametrize("args, message", [
    (["--width", "16"], "decord cannot decode H.264 frames of 16x64 (width x height)"),
    (["--width", "48"], "decord cannot decode H.264 frames of 48x64 (width x height)"),
    (["--height", "2", "--width", "2"], "decord cannot decode H.264 frames of 2x2"),
    (["--fps", "0"], "--fps must be a positive number"),
    (["--fps", "-3"], "--fps must be a positive number"),
    (["--fps", "0.0001"], "--fps must be a positive number"),
    (["--fps", "inf"], "--fps must be a positive number"),
    (["--fps", "nan"], "--fps must be a positive number"),
    (["--seed", "-1"], "--seed must be >= 0"),
])
def test_synth_cli_refuses_bad_arguments_before_rendering(tmp_path, capsys, args, message):
    """A frame size decord cannot read, or a frame rate libx264 would not take (or silently replace by 24), is a
    usage error naming the argument, before anything is rendered: no traceback, no clips written."""
    with pytest.raises(SystemExit) as e:
        synth_main([str(tmp_path / "out"), "--clips", "1", "--frames", "2", *args])
    assert e.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_synth_cli_names_an_output_folder_that_is_a_file(tmp_path, capsys):
    """OUT_DIR naming a file is a usage error before rendering, a path under a file an error message: no traceback."""
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit) as e:
        synth_main([str(tmp_path / "file"), "--clips", "1", "--frames", "2"])
    assert e.value.code == 2
    assert f"{tmp_path / 'file'}: not a folder: OUT_DIR is the folder clips/ and manifest.jsonl go to" in \
        capsys.readouterr().err
    assert synth_main([str(tmp_path / "file" / "x"), "--clips", "1", "--frames", "2"]) == 1
    assert f"one4d synth: error: [Errno 20] Not a directory: '{tmp_path / 'file' / 'x'}" in capsys.readouterr().err


def test_synth_cli_refuses_a_folder_that_is_not_empty(tmp_path, capsys):
    """A second synth into the folder of a first overwrote its manifest.jsonl and clips without a word (and left
    clips of a larger first dataset beside a smaller manifest)."""
    out = tmp_path / "out"
    out.mkdir()  # an empty folder is fine
    assert synth_main([str(out), "--clips", "2", "--frames", "2", "--height", "32", "--width", "64"]) == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(SystemExit) as e:
        synth_main([str(out), "--clips", "1", "--frames", "2", "--height", "32", "--width", "64", "--seed", "7"])
    assert e.value.code == 2
    assert f"{out}: not empty" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("fps", [0.0, -3.0, 1e-4, float("inf"), float("nan")])
def test_write_mp4_refuses_a_frame_rate_it_cannot_store(tmp_path, fps):
    from data_pipeline.video import VideoError, write_mp4

    with pytest.raises(VideoError, match="fps must be a positive number"):
        write_mp4(tmp_path / "a.mp4", np.zeros((2, 32, 64, 3), np.uint8), fps=fps)
    assert not (tmp_path / "a.mp4").exists()
