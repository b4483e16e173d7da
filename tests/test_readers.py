import numpy as np
import pytest
from PIL import Image
from scipy.spatial.transform import Rotation

from one4d_train.eval.readers import read_benchmark
from one4d_train.eval.readers.bonn import BONN_MARKER_TO_CAMERA, BONN_T_ROS, bonn_camera_poses
from one4d_train.eval.readers.sintel import read_cam, read_dpt, write_cam, write_dpt
from one4d_train.eval.readers.tum import DEPTH_FACTOR, associate, c2w_to_tum_pose

H, W = 6, 8


def _poses(rng, n):
    c2w = np.tile(np.eye(4), (n, 1, 1))
    c2w[:, :3, :3] = Rotation.from_rotvec(rng.normal(0, 0.3, (n, 3))).as_matrix()
    c2w[:, :3, 3] = rng.normal(0, 1, (n, 3))
    return c2w


def _write_sintel(root, seq, rng, T):
    """A Sintel training sequence of T random frames under root; returns (rgb, depth, K, c2w)."""
    rgb = rng.integers(0, 256, (T, H, W, 3), dtype=np.uint8)
    depth = rng.uniform(0.1, 100, (T, H, W)).astype(np.float32)
    K = np.array([[688.0, 0, 511.5], [0, 688.0, 217.5], [0, 0, 1]])
    c2w = _poses(rng, T)
    for sub in ("final", "depth", "camdata_left"):
        (root / "training" / sub / seq).mkdir(parents=True)
    for i in range(T):
        stem = f"frame_{i + 1:04d}"
        Image.fromarray(rgb[i]).save(root / "training/final" / seq / f"{stem}.png")
        write_dpt(root / "training/depth" / seq / f"{stem}.dpt", depth[i])
        write_cam(root / "training/camdata_left" / seq / f"{stem}.cam", K, np.linalg.inv(c2w[i])[:3])
    return rgb, depth, K, c2w


def test_sintel_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    seq = "alley_1"
    rgb, depth, K, c2w = _write_sintel(tmp_path, seq, rng, 3)
    raw = (tmp_path / "training/depth" / seq / "frame_0001.dpt").read_bytes()
    assert np.frombuffer(raw[:4], "<f4")[0] == np.float32(202021.25)
    assert tuple(np.frombuffer(raw[4:12], "<i4")) == (W, H) and len(raw) == 12 + 4 * H * W
    assert np.array_equal(read_dpt(tmp_path / "training/depth" / seq / "frame_0001.dpt"), depth[0])
    K2, N = read_cam(tmp_path / "training/camdata_left" / seq / "frame_0002.cam")
    assert np.array_equal(K2, K) and np.allclose(N, np.linalg.inv(c2w[1])[:3], atol=1e-15)

    (s,) = list(read_benchmark("sintel", tmp_path, stride=1))
    assert s.name == seq and np.array_equal(s.rgb, rgb) and np.array_equal(s.depth, depth)
    np.testing.assert_allclose(s.poses_c2w, c2w, atol=1e-12)
    assert np.array_equal(s.intrinsics[1], K)
    (s2,) = list(read_benchmark("sintel", tmp_path, start=1, stride=2))
    assert np.array_equal(s2.depth, depth[[1]])
    (tmp_path / "bad.dpt").write_bytes(b"\0" * 16)
    with pytest.raises(ValueError, match="tag"):
        read_dpt(tmp_path / "bad.dpt")


def _write_rgbd(folder, rng, t_rgb, t_depth, t_gt, c2w, lists=True):
    (folder / "rgb").mkdir(parents=True)
    (folder / "depth").mkdir()
    rgb = rng.integers(0, 256, (len(t_rgb), H, W, 3), dtype=np.uint8)
    raw = rng.integers(0, 65536, (len(t_depth), H, W), dtype=np.uint16)
    for t, im in zip(t_rgb, rgb):
        Image.fromarray(im).save(folder / f"rgb/{t:.6f}.png")
    for t, d in zip(t_depth, raw):
        Image.fromarray(d).save(folder / f"depth/{t:.6f}.png")
    if lists:
        head = "# color images\n# file: 'x.bag'\n# timestamp filename\n"
        (folder / "rgb.txt").write_text(head + "".join(f"{t:.6f} rgb/{t:.6f}.png\n" for t in t_rgb))
        (folder / "depth.txt").write_text(head + "".join(f"{t:.6f} depth/{t:.6f}.png\n" for t in t_depth))
    gt = "# ground truth trajectory\n# timestamp tx ty tz qx qy qz qw\n"
    gt += "".join(f"{t:.4f} " + " ".join(f"{v:.17g}" for v in c2w_to_tum_pose(p)) + "\n" for t, p in zip(t_gt, c2w))
    (folder / "groundtruth.txt").write_text(gt)
    return rgb, raw


@pytest.mark.parametrize("bench", ["tum", "bonn"])
def test_rgbd_round_trip_with_association(tmp_path, bench):
    rng = np.random.default_rng(1)
    name = "rgbd_dataset_freiburg3_walking_xyz" if bench == "tum" else "rgbd_bonn_balloon"
    t_rgb = 1305031102.0 + np.arange(5) / 30
    t_depth = t_rgb + np.array([0.004, -0.01, 0.05, 0.0, 0.015])  # frame 2 has no depth within 0.02 s
    t_gt = np.concatenate([t_rgb[:4] + 0.003, [t_rgb[4] + 0.03]])  # frame 4 has no pose within 0.02 s
    c2w = _poses(rng, 5)
    # Bonn's groundtruth.txt holds the motion-capture marker's poses, the camera's follow from them
    written = c2w if bench == "tum" else np.linalg.inv(BONN_T_ROS) @ c2w @ np.linalg.inv(BONN_MARKER_TO_CAMERA)
    rgb, raw = _write_rgbd(tmp_path / name, rng, t_rgb, t_depth, t_gt, written, lists=bench == "tum")
    (s,) = list(read_benchmark(bench, tmp_path))
    keep = [0, 1, 3]
    assert s.name == name and np.array_equal(s.rgb, rgb[keep])
    assert np.array_equal(s.depth, (raw[keep] / DEPTH_FACTOR).astype(np.float32))
    np.testing.assert_allclose(s.poses_c2w, c2w[keep], atol=1e-12)
    np.testing.assert_allclose(s.timestamps, np.round(t_rgb[keep], 6), atol=1e-9)
    fx = 535.4 if bench == "tum" else 542.822841
    assert s.intrinsics.shape == (3, 3, 3) and s.intrinsics[0, 0, 0] == fx


def test_associate_is_greedy_by_difference():
    a = np.array([0.0, 0.03, 0.1])
    b = np.array([0.015, 0.031, 0.5])
    assert associate(a, b) == [(0, 0), (1, 1)]
    assert associate(np.array([0.0, 0.01]), np.array([0.012])) == [(1, 0)]



def test_bonn_marker_poses_become_camera_poses():
    """groundtruth.txt of Bonn RGB-D Dynamic is the motion-capture marker's pose; the dataset's conversion is
    camera c2w = T_ros G T_ros T_m with the published marker-to-camera calibration T_m (whose rotation block
    carries a uniform scale of ~1.059, taken out so that poses stay rigid) and the ROS axis change T_ros."""
    t_m = np.array([[1.0157, 0.1828, -0.2389, 0.0113], [0.0009, -0.8431, -0.6413, -0.0098],
                    [-0.3009, 0.6147, -0.8085, 0.0111], [0, 0, 0, 1.0]])
    t_ros = np.array([[-1.0, 0, 0, 0], [0, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 1]])
    (at_origin,) = bonn_camera_poses(np.eye(4)[None])  # T_ros T_ros = I: the calibration itself
    scale = np.cbrt(np.linalg.det(t_m[:3, :3]))
    assert abs(scale - 1.0593) < 1e-3
    np.testing.assert_allclose(at_origin[:3, :3], t_m[:3, :3] / scale, atol=2e-4)
    np.testing.assert_allclose(at_origin[:3, 3], t_m[:3, 3], atol=1e-12)
    marker = _poses(np.random.default_rng(3), 4)
    cams = bonn_camera_poses(marker)
    np.testing.assert_allclose(cams, t_ros @ marker @ t_ros @ at_origin, atol=1e-12)
    for c in cams:
        np.testing.assert_allclose(c[:3, :3] @ c[:3, :3].T, np.eye(3), atol=1e-12)
        assert np.linalg.det(c[:3, :3]) > 0
    # the camera turns ~173 degrees from the marker: marker poses used as camera poses are far off
    rel_marker, rel_cam = np.linalg.inv(marker[0]) @ marker[1], np.linalg.inv(cams[0]) @ cams[1]
    assert np.abs(rel_marker[:3, 3] - rel_cam[:3, 3]).max() > 0.1


@pytest.mark.parametrize("bench", ["tum", "bonn"])
def test_malformed_rgbd_files_are_errors_naming_the_file(tmp_path, bench):
    """A list or trajectory line that does not parse, and a sequence with no frame left after matching, are errors
    naming the file (and line); `one4d eval` reports them as a bad dataset (EvalInputError, exit 2)."""
    from one4d_train.config import load_config
    from one4d_train.eval.pipeline import EvalInputError, iter_samples

    rng = np.random.default_rng(2)
    name = "rgbd_dataset_freiburg1_desk" if bench == "tum" else "rgbd_bonn_balloon"
    t = np.arange(3) * 0.1
    cases = {"groundtruth.txt": ("0.1 1 2 3\n", r"groundtruth.txt, line 1: expected a timestamp and 7 more"),
             "rgb.txt": ("x rgb/a.png\n", r"rgb.txt, line 1: 'x' is not a timestamp"),
             "depth.txt": ("100.0 depth/x.png\n", r": no frame left: 3 rgb and 1 depth timestamps, 0 matched")}
    for i, (file, (text, message)) in enumerate(cases.items()):
        root = tmp_path / str(i)
        _write_rgbd(root / name, rng, t, t + 0.001, t, _poses(rng, 3))
        (root / name / file).write_text(text)
        with pytest.raises(ValueError, match=message) as err:
            list(read_benchmark(bench, root))
        assert str(root / name) in str(err.value)
        cfg = load_config([f"eval.dataset={bench}:{root}", "data.num_frames=5", "data.height=32", "data.width=64"])
        with pytest.raises(EvalInputError, match=f"eval.dataset={bench}:.*{message}"):
            list(iter_samples(cfg))
    root = tmp_path / "text"
    _write_rgbd(root / name, rng, t, t + 0.001, t, _poses(rng, 3))
    (root / name / "groundtruth.txt").write_text("0.0 1 2 3 a 0 0 1\n")
    with pytest.raises(ValueError, match=f"{root / name / 'groundtruth.txt'}: a pose that is not 7 numbers"):
        list(read_benchmark(bench, root))


@pytest.mark.parametrize("bench", ["tum", "bonn"])
def test_rgbd_files_that_would_score_wrongly_or_name_nothing_are_errors_naming_the_file(tmp_path, bench):
    """A non-finite or zero-quaternion pose left the sequence's ATE/RPE out of the means without a word; depth maps
    at another resolution than the frames were scored as if aligned; a frame of another size, a truncated PNG and
    frames not named by timestamp (without rgb.txt) failed naming no file."""
    rng = np.random.default_rng(3)
    name = "rgbd_dataset_freiburg1_desk" if bench == "tum" else "rgbd_bonn_balloon"
    t = np.arange(3) * 0.1

    def fresh(key):
        root = tmp_path / key
        _write_rgbd(root / name, rng, t, t + 0.001, t, _poses(rng, 3), lists=False)
        return root, root / name

    root, seq = fresh("nan")
    lines = (seq / "groundtruth.txt").read_text().splitlines()
    (seq / "groundtruth.txt").write_text("\n".join(lines[:-1] + ["0.2000 nan nan nan 0 0 0 1"]) + "\n")
    with pytest.raises(ValueError, match=rf"{seq / 'groundtruth.txt'}: the pose at timestamp 0.2 is not a camera"):
        list(read_benchmark(bench, root))
    root, seq = fresh("zero")
    (seq / "groundtruth.txt").write_text("\n".join(lines[:-1] + ["0.2000 1 2 3 0 0 0 0"]) + "\n")
    with pytest.raises(ValueError, match=r"zero quaternion"):
        list(read_benchmark(bench, root))
    # a bad row no scored frame is matched to (a trajectory at the motion capture's rate) is not read
    root, seq = fresh("unused")
    (seq / "groundtruth.txt").write_text("\n".join(lines + ["5.0000 nan nan nan 0 0 0 0"]) + "\n")
    assert len(list(read_benchmark(bench, root))[0].poses_c2w) == 3
    assert len(list(read_benchmark(bench, root, start=1))[0].poses_c2w) == 2
    root, seq = fresh("small-depth")
    for p in (seq / "depth").glob("*.png"):
        Image.fromarray(np.zeros((H // 2, W // 2), np.uint16)).save(p)
    with pytest.raises(ValueError, match=rf"{seq / 'depth'}/.*\.png: depth of {W // 2}x{H // 2}, its frames are {W}x{H}"):
        list(read_benchmark(bench, root))
    root, seq = fresh("odd-frame")
    odd = sorted((seq / "rgb").glob("*.png"))[1]
    Image.fromarray(np.zeros((H, W + 2, 3), np.uint8)).save(odd)
    with pytest.raises(ValueError, match=rf"{odd}: a frame of {W + 2}x{H}, the sequence's first"):
        list(read_benchmark(bench, root))
    root, seq = fresh("truncated")
    odd = sorted((seq / "rgb").glob("*.png"))[1]
    odd.write_bytes(odd.read_bytes()[:len(odd.read_bytes()) // 2])
    with pytest.raises(ValueError, match=rf"{odd}: not a readable image"):
        list(read_benchmark(bench, root))
    root, seq = fresh("names")
    first = sorted((seq / "rgb").glob("*.png"))[0]
    first.rename(seq / "rgb" / "frame0000.png")
    with pytest.raises(ValueError, match=rf"{seq / 'rgb' / 'frame0000.png'}: not named by its timestamp, and no "
                                         rf"{seq / 'rgb.txt'} lists the frames"):
        list(read_benchmark(bench, root))


def test_sintel_files_that_would_score_wrongly_are_errors_naming_the_file(tmp_path):
    rng = np.random.default_rng(4)
    _write_sintel(tmp_path / "a", "alley_1", rng, 3)
    dpt = tmp_path / "a/training/depth/alley_1/frame_0002.dpt"
    write_dpt(dpt, np.ones((H // 2, W // 2), np.float32))
    with pytest.raises(ValueError, match=rf"{dpt}: a depth map of {W // 2}x{H // 2}, the sequence's first"):
        list(read_benchmark("sintel", tmp_path / "a"))
    for p in (tmp_path / "a/training/depth/alley_1").glob("*.dpt"):
        write_dpt(p, np.ones((H // 2, W // 2), np.float32))
    with pytest.raises(ValueError, match=rf"frame_0001.dpt: depth of {W // 2}x{H // 2}, its frames are {W}x{H}"):
        list(read_benchmark("sintel", tmp_path / "a"))
    _write_sintel(tmp_path / "b", "alley_1", rng, 3)
    cam = tmp_path / "b/training/camdata_left/alley_1/frame_0003.cam"
    write_cam(cam, np.zeros((3, 3)), np.zeros((3, 4)))
    with pytest.raises(ValueError, match=rf"{cam}: not a camera"):
        list(read_benchmark("sintel", tmp_path / "b"))


def test_depth_cap_follows_the_protocol_unless_set():
    """eval.depth_cap=0 (the default) scores with the 70 m of MonST3R's depth_evaluation, whose depth-space
    alignment and Abs Rel the metrics follow, on every dataset (its Bonn evaluation included: Bonn had been capped
    at DepthCrafter's 10 m, which belongs to a disparity-space protocol); a set value wins."""
    from one4d_train.config import load_config

    caps = {spec: load_config([f"eval.dataset={spec}"] if spec else []).eval.resolved_depth_cap()
            for spec in ("bonn:/b", "tum:/t", "sintel:/s", "/shards", "")}
    assert set(caps.values()) == {70.0}
    assert load_config(["eval.dataset=bonn:/b", "eval.depth_cap=10"]).eval.resolved_depth_cap() == 10.0
    assert load_config(["eval.depth_cap=inf"]).eval.resolved_depth_cap() == float("inf")


def test_a_benchmark_cut_short_by_num_samples_says_so(tmp_path, capsys):
    """eval.num_samples (default 4) scored the first sequences of a benchmark in silence: a user evaluating Bonn
    got 4 of its sequences as 'the' score. The cut is now said, naming the setting; a whole benchmark is not."""
    from one4d_train.config import load_config
    from one4d_train.eval.pipeline import iter_samples

    rng = np.random.default_rng(3)
    t = np.arange(5) * 0.1
    for name in ("rgbd_bonn_a", "rgbd_bonn_b", "rgbd_bonn_c"):
        _write_rgbd(tmp_path / name, rng, t, t + 0.001, t, _poses(rng, 5))
    base = [f"eval.dataset=bonn:{tmp_path}", "data.num_frames=5", "data.height=32", "data.width=64"]
    got = [s["__key__"][0] for s in iter_samples(load_config([*base, "eval.num_samples=2"]))]
    assert got == ["rgbd_bonn_a", "rgbd_bonn_b"]
    err = capsys.readouterr().err
    assert (f"scoring the first 2 of the 3 sequences of bonn:{tmp_path} (eval.num_samples=2): eval.num_samples=3 "
            "scores them all") in err, err
    samples = list(iter_samples(load_config([*base, "eval.num_samples=3"])))
    assert [s["__key__"][0] for s in samples] == ["rgbd_bonn_a", "rgbd_bonn_b", "rgbd_bonn_c"]
    assert "scoring the first" not in capsys.readouterr().err
    # the ground truth counts as valid only within the cap (its depth PNGs hold up to 65.5 m here)
    capped = list(iter_samples(load_config([*base, "eval.num_samples=1", "eval.depth_cap=10"])))
    depth, valid = capped[0]["depth"][0], capped[0]["valid"][0, :, 0].bool()
    assert valid.any() and (depth[valid] < 10).all() and (depth[~valid] >= 10).any()


def test_benchmark_inputs_that_cannot_be_scored_are_named_before_any_sample(tmp_path, capsys):
    """A root one level too deep (no sequence: it scored nothing, exit 0, and the checkpoint counted as scored), a
    TUM folder renamed without its freiburgN camera, a window too short to score, and a Sintel start past the end
    are EvalInputErrors naming the root or sequence; a damaged sequence after the eval.num_samples scored ones is
    not read."""
    from one4d_train.config import load_config
    from one4d_train.eval.pipeline import EvalInputError, eval_dataset, iter_samples

    rng = np.random.default_rng(4)
    t = np.arange(9) * 0.1
    for name in ("rgbd_bonn_a", "rgbd_bonn_b", "rgbd_bonn_c"):
        _write_rgbd(tmp_path / "bonn" / name, rng, t, t + 0.001, t, _poses(rng, 9))
    base = ["data.num_frames=9", "data.height=32", "data.width=64"]
    deep = tmp_path / "bonn" / "rgbd_bonn_a"
    with pytest.raises(EvalInputError, match=f"eval.dataset=bonn:{deep}: {deep}: no bonn sequence there; the reader "
                                             "expects ROOT/<sequence>/ with rgb/"):
        eval_dataset(load_config([f"eval.dataset=bonn:{deep}", *base]))
    (tmp_path / "bonn" / "rgbd_bonn_c" / "depth.txt").write_text("x depth/a.png\n")  # the third: never read
    got = list(iter_samples(load_config([f"eval.dataset=bonn:{tmp_path / 'bonn'}", "eval.num_samples=2", *base])))
    assert [s["__key__"][0] for s in got] == ["rgbd_bonn_a", "rgbd_bonn_b"]
    with pytest.raises(EvalInputError, match=r"rgbd_bonn_a: 3 frame\(s\) in its window \(eval.benchmark_start=6, "
                                             r"eval.benchmark_stride=1, data.num_frames=9\), 5 needed"):
        list(iter_samples(load_config([f"eval.dataset=bonn:{tmp_path / 'bonn'}", "eval.benchmark_start=6", *base])))
    renamed = tmp_path / "tum" / "fr3_walking_xyz"
    _write_rgbd(renamed, rng, t, t + 0.001, t, _poses(rng, 9))
    with pytest.raises(EvalInputError, match=f"{renamed}: no freiburg1, freiburg2 or freiburg3 in the folder's name"):
        list(iter_samples(load_config([f"eval.dataset=tum:{tmp_path / 'tum'}", *base])))
    _write_sintel(tmp_path / "sintel", "alley_1", rng, 9)
    with pytest.raises(EvalInputError, match=r"alley_1: no frame from frame 20 on \(it has 9\)"):
        list(iter_samples(load_config([f"eval.dataset=sintel:{tmp_path / 'sintel'}", "eval.benchmark_start=20",
                                       *base])))
