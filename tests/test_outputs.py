import json
import math
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from data_pipeline.geometry import depth_to_pointmaps
from data_pipeline.synthetic import render_clip
from one4d_train.eval.outputs import (colourise_depth, format_table, read_ply, render_points, sheet_size, turbo,
                                      write_metrics_json, write_ply, write_sample_outputs)


def test_sample_outputs_from_a_synthetic_clip(tmp_path):
    import av

    c = render_clip(5, 6, 33, 48)  # odd height: the video writer pads
    xyz = depth_to_pointmaps(c["depth"], c["intrinsics"], c["poses_c2w"])
    files = write_sample_outputs(tmp_path / "s0", c["frames"], c["depth"], xyz, c["valid"], keyframes=[0, 5],
                                 title="synthetic")
    for key in ("rgb_video", "depth_video"):
        with av.open(files[key]) as f:
            frames = [fr.to_ndarray(format="rgb24") for fr in f.decode(video=0)]
        assert len(frames) == 6 and frames[0].shape == (34, 48, 3)
    with av.open(files["rgb_video"]) as f:
        first = next(f.decode(video=0)).to_ndarray(format="rgb24")[:33]
    assert np.abs(first.astype(int) - c["frames"][0]).mean() < 6
    pts, col = read_ply(files["ply_5"])
    v = c["valid"][5]
    assert np.array_equal(pts, xyz[5][v]) and np.array_equal(col, c["frames"][5][v])
    sheet = Image.open(files["sheet"])
    assert sheet.size == sheet_size(33, 48, 2) and sheet.mode == "RGB"
    arr = np.asarray(sheet)
    assert arr.std() > 20  # pictures, not an empty canvas


def test_ply_round_trip_and_header(tmp_path):
    rng = np.random.default_rng(0)
    pts = rng.normal(size=(100, 3)).astype(np.float32)
    col = rng.integers(0, 256, (100, 3), dtype=np.uint8)
    path = write_ply(tmp_path / "p.ply", pts, col)
    raw = path.read_bytes()
    assert raw.startswith(b"ply\nformat binary_little_endian 1.0\nelement vertex 100\n")
    assert len(raw) == raw.index(b"end_header\n") + 11 + 100 * 15
    p2, c2 = read_ply(path)
    assert np.array_equal(p2, pts) and np.array_equal(c2, col)


def test_depth_colours_and_turbo_ends():
    lut = turbo(np.linspace(0, 1, 256)).astype(int)
    assert lut[0].sum() < 120 and lut[40].argmax() == 2 and lut[128].argmax() == 1 and lut[210].argmax() == 0
    assert lut[255, 0] > 100 and lut[255, 2] < 30
    depth = np.array([[[1.0, 2.0], [4.0, 0.0]]])
    vis = colourise_depth(depth)
    assert (vis[0, 1, 1] == 0).all()  # invalid pixel black
    assert vis[0, 0, 0, 0] > vis[0, 1, 0, 0]  # near is warm (red high), far is cold


def test_render_points_z_buffer():
    K = np.array([[10.0, 0, 4.5], [0, 10.0, 4.5], [0, 0, 1]])
    pts = np.array([[0, 0, 2.0], [0, 0, 1.0], [0, 0, 3.0]])
    col = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255]], np.uint8)
    img = render_points(pts, col, K, np.eye(4), 10, 10, splat=0)
    assert tuple(img[4, 4]) == (0, 255, 0) or tuple(img[4, 5]) == (0, 255, 0)
    assert (img == (0, 255, 0)).all(-1).sum() == 1


def test_metrics_json_and_table(tmp_path):
    with pytest.raises(FileNotFoundError):  # never recreates the folder (a checkpoint pruned meanwhile)
        write_metrics_json(tmp_path / "eval/metrics.json", {})
    assert not (tmp_path / "eval").exists()
    (tmp_path / "eval").mkdir()
    path = write_metrics_json(tmp_path / "eval/metrics.json", {"a": {"psnr": float("inf"), "abs_rel": np.float32(0.5)}})
    assert json.loads(path.read_text()) == {"a": {"abs_rel": 0.5, "psnr": "inf"}}
    assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == ["metrics.json"]  # no temporary file left
    table = format_table([{"mode": "video", "abs_rel": 0.123456}, {"mode": "image", "abs_rel": 1.5}], ["mode", "abs_rel"])
    lines = table.splitlines()
    assert lines[0].split() == ["mode", "abs_rel"] and lines[2].split() == ["video", "0.1235"] and len(lines) == 4


def test_means_leave_out_non_finite_values_and_count_them():
    from one4d_train.eval.pipeline import summarise

    nan, inf = float("nan"), float("inf")
    rows = [{"sample": "a", "mode": "video", "abs_rel": 0.1, "psnr": inf, "ate": 0.5},
            {"sample": "b", "mode": "video", "abs_rel": nan, "psnr": 30.0, "ate": 0.7},
            {"sample": "c", "mode": "video", "abs_rel": 0.3, "psnr": -inf, "ate": 0.9},
            {"sample": "a", "mode": "image", "abs_rel": nan, "psnr": 20.0}]
    means = summarise(rows)
    video, image = means["video"], means["image"]
    assert video["num_samples"] == 3 and image["num_samples"] == 1
    assert video["abs_rel"] == pytest.approx(0.2) and video["abs_rel_nonfinite"] == 1
    assert video["psnr"] == 30.0 and video["psnr_nonfinite"] == 2
    assert video["ate"] == pytest.approx(0.7) and "ate_nonfinite" not in video
    assert math.isnan(image["abs_rel"]) and image["abs_rel_nonfinite"] == 1 and image["psnr"] == 20.0
    # and the printed table says what its mean rows leave out
    from one4d_train.eval.pipeline import left_out_lines
    assert left_out_lines(means) == [
        "video mean: left out (NaN or inf, see metrics.json) abs_rel of 1, psnr of 2 of 3 samples",
        "image mean: left out (NaN or inf, see metrics.json) abs_rel of 1 of 1 samples"]
    assert left_out_lines(summarise(rows[:1])) == ["video mean: left out (NaN or inf, see metrics.json) psnr of 1 of 1 samples"]


def test_samples_without_ground_truth_depth_are_named_with_the_reason():
    """Pointmap shards stored without cameras give no ground-truth depth: abs_rel NaN over 0 pixels, which read like
    a failed prediction; the printed summary now says why."""
    import torch

    from one4d_train.eval.config import EvalConfig
    from one4d_train.eval.pipeline import no_truth_lines, score

    torch.manual_seed(0)
    xyz = torch.rand(5, 3, 8, 8) - 0.5
    xyz[:, 2] += 2.0  # in front of the camera
    sample = {"xyz": xyz, "valid": torch.ones(5, 1, 8, 8), "xyz_centre": torch.zeros(3), "rgb": torch.zeros(5, 3, 8, 8),
              "xyz_scale": torch.tensor(1.0), "poses_c2w": torch.full((5, 4, 4), float("nan"))}
    scores, _ = score(torch.zeros(5, 3, 8, 8), xyz, torch.ones(5), sample, EvalConfig(recovery_iters=1))
    assert scores["num_pixels"] == 0 and math.isnan(scores["abs_rel"]) and scores["depth_truth"], scores
    rows = [{"sample": "a", "mode": "video", **scores},
            {"sample": "b", "mode": "video", "num_pixels": 40},
            {"sample": "c", "mode": "video", "num_pixels": 0},  # real depth, all beyond the cap: another reason
            {"sample": "a", "mode": "image", "num_pixels": 40}]
    assert no_truth_lines(rows) == [
        "video: 1 sample(s) have no ground-truth depth (a): pointmaps stored without cameras (intrinsics and poses) "
        "give none, so their abs_rel and delta_1_25 are NaN; their PSNR/SSIM are scored",
        "video: 1 sample(s) have no ground-truth cameras to score ATE and RPE against (a; a benchmark sequence without "
        "its groundtruth.txt, say): the camera means are over the others"]


def test_depth_means_weight_each_sample_by_its_scored_pixels():
    """The video-depth protocol averages sequences weighted by their valid pixels (a 50-frame sequence counts ten
    times a 5-frame one); the pose and RGB scores are plain means over sequences."""
    from one4d_train.eval.pipeline import summarise

    rows = [{"sample": "long", "mode": "video", "abs_rel": 0.1, "delta_1_25": 0.9, "ate": 0.2, "num_pixels": 5000},
            {"sample": "short", "mode": "video", "abs_rel": 0.5, "delta_1_25": 0.5, "ate": 0.4, "num_pixels": 500},
            {"sample": "failed", "mode": "video", "abs_rel": float("nan"), "delta_1_25": float("nan"), "ate": 0.6,
             "num_pixels": 9000}]
    video = summarise(rows)["video"]
    assert video["abs_rel"] == pytest.approx((0.1 * 5000 + 0.5 * 500) / 5500)
    assert video["delta_1_25"] == pytest.approx((0.9 * 5000 + 0.5 * 500) / 5500)
    assert video["ate"] == pytest.approx(0.4) and video["abs_rel_nonfinite"] == 1 and "num_pixels" not in video


def _oracle_scores(cfg, tmp_path):
    """Score every sample of eval.dataset against itself (the prediction is the label): near-perfect."""
    from one4d_train.eval.pipeline import iter_samples, score

    out = []
    for batch in iter_samples(cfg):
        single = {k: (v[0] if isinstance(v, (torch.Tensor, list)) else v) for k, v in batch.items()}
        mask = torch.zeros(len(single["rgb"]), dtype=torch.bool)
        mask[0] = True
        out.append(score(single["rgb"], single["xyz"], mask, single, cfg.eval)[0])
    return out


@pytest.mark.parametrize("sample_dtype", ["float32", "bfloat16"])
def test_scoring_a_perfect_prediction_of_shard_samples(tmp_path, sample_dtype):
    """The ground truth of shard samples is read in float32 whatever data.sample_dtype trains with: the shipped
    configs' bfloat16 pointmaps put a floor of ~0.007 under a perfect prediction's Abs Rel."""
    from data_utils import make_shards

    from one4d_train.config import load_config
    from one4d_train.eval.pipeline import iter_samples

    torch.set_num_threads(1)
    shards = make_shards(tmp_path, num_clips=1, frames=9, height=32, width=64)
    cfg = load_config([f"eval.dataset={shards}", "data.num_frames=9", "data.height=32", "data.width=64",
                       "eval.recovery_iters=30", f"data.sample_dtype={sample_dtype}"])
    assert {next(iter(iter_samples(cfg)))[k].dtype for k in ("rgb", "xyz")} == {torch.float32}
    (m,) = _oracle_scores(cfg, tmp_path)
    # sky and the points clipped by the normalisation act as outliers: close to, not exactly, the truth
    assert m["abs_rel"] < 1e-3 and m["delta_1_25"] == 1.0 and m["ate"] < 5e-3 and m["rpe_rot"] < 0.1, str(m)
    assert m["psnr"] == float("inf") and m["num_frames"] == 1


def test_scoring_a_perfect_prediction_of_a_sintel_sequence(tmp_path):
    from one4d_train.config import load_config
    from one4d_train.eval.readers.sintel import write_cam, write_dpt

    torch.set_num_threads(1)
    c = render_clip(11, 9, 48, 80)
    seq = tmp_path / "training"
    for sub in ("final", "depth", "camdata_left"):
        (seq / sub / "synth").mkdir(parents=True)
    for i in range(9):
        stem = f"frame_{i + 1:04d}"
        Image.fromarray(c["frames"][i]).save(seq / "final/synth" / f"{stem}.png")
        write_dpt(seq / "depth/synth" / f"{stem}.dpt", np.where(c["valid"][i], c["depth"][i], 1e10))
        write_cam(seq / "camdata_left/synth" / f"{stem}.cam", c["intrinsics"], np.linalg.inv(c["poses_c2w"][i])[:3])
    cfg = load_config([f"eval.dataset=sintel:{tmp_path}", "data.num_frames=9", "data.height=32", "data.width=64",
                       "eval.recovery_iters=30"])
    (m,) = _oracle_scores(cfg, tmp_path)
    # pointmaps beyond the 2nd-98th percentiles are clipped by the normalisation, so not exactly 0
    assert m["abs_rel"] < 0.02 and m["delta_1_25"] > 0.98 and m["ate"] < 0.01 and m["rpe_rot"] < 0.5, str(m)


def test_one4d_eval_end_to_end_on_a_tiny_checkpoint(tmp_path, capsys, monkeypatch):
    """`one4d eval` on a run directory: model + adapters from the checkpoint, three modes, outputs,
    metrics.json, MLflow metrics in the run the checkpoint names; a second call finds nothing left to do, and
    another dataset is scored beside the first (it was skipped as scored, or overwrote it when named)."""
    from data_utils import make_shards
    from mlflow.tracking import MlflowClient

    from one4d_train.cli import main as cli
    from one4d_train.config import load_config, to_yaml
    from one4d_train.eval.pipeline import dataset_tag, load_generator
    from one4d_train.model.adapters import export_adapters
    from one4d_train.model.one4d import build_one4d
    from one4d_train.train.checkpoint import MARKER, STATE_KEYS, _listing
    from one4d_train.train.tracking import MlflowTracker

    torch.set_num_threads(1)
    shards = make_shards(tmp_path, num_clips=1, frames=5, height=32, width=64)
    run = tmp_path / "run"
    cfg = load_config([f"run_dir={run}", f"data.val_shards={shards}", "data.num_frames=5", "data.height=32",
                       "data.width=64", "model.num_links=2", "model.compute_dtype=fp32",
                       "model.activation_checkpointing=none", "eval.steps=2", "eval.num_samples=1",
                       "eval.recovery_iters=5", "eval.keyframes=2", "eval.sparse_frames=3", "train.device=cpu",
                       "tracking.system_metrics=false"])
    run.mkdir()
    (run / "config.yaml").write_text(to_yaml(cfg))
    tracker = MlflowTracker(str(run), cfg.tracking, cfg.name)
    run_id = tracker.start(None, {})
    tracker.end()
    client = MlflowClient(tracking_uri=f"sqlite:///{run / 'mlflow.db'}")
    client.update_run(run_id, status="RUNNING")  # training still going on beside this evaluation
    ckpt = run / "checkpoints" / "step-00000010"
    (ckpt / "adapters").mkdir(parents=True)
    (ckpt / "train_state").mkdir()
    model = build_one4d(cfg.model, seed=1)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.normal_(0, 0.02)  # non-zero LoRA B and links: the loaded adapters must matter
    export_adapters(model.trainable_state_dict(), cfg.model, str(ckpt / "adapters"))
    state = {**{k: 0 for k in STATE_KEYS}, "step": 10, "mlflow_run_id": run_id}  # a train state as the trainer's
    (ckpt / "train_state" / "rank-00000.json").write_text(json.dumps(state))
    (ckpt / MARKER).write_text(json.dumps({"step": 10, "world_size": 1, "files": _listing(str(ckpt))}))

    assert cli(["eval", f"checkpoint={run}"]) == 0
    table = capsys.readouterr().out
    loaded = load_generator(cfg, str(ckpt), torch.device("cpu")).model.state_dict()  # what the evaluation sampled
    want = model.trainable_state_dict()
    assert want and all(torch.equal(loaded[k], want[k]) for k in want)
    assert "video" in table and "sparse" in table and "image" in table and "abs_rel" in table
    tag = dataset_tag(str(shards))
    report = json.loads((ckpt / "eval" / tag / "metrics.json").read_text())
    assert report["step"] == 10 and {r["mode"] for r in report["samples"]} == {"image", "sparse", "video"}
    for r in report["samples"]:
        assert np.isfinite(r["abs_rel"]) and np.isfinite(r["ate"]) and np.isfinite(r["psnr"])
        for f in ("rgb_video", "depth_video", "sheet"):
            assert (tmp_path / r["files"][f]).is_file()
    sparse = next(r for r in report["samples"] if r["mode"] == "sparse")
    assert sparse["num_frames"] == 3
    settings = report["settings"]  # what the scores depend on: the dataset (data.val_shards here) and the window too
    assert (settings["dataset"], settings["sparse_frames"], settings["sparse_frames_observed"]) == (str(shards), 3, [3])
    assert (settings["num_frames"], settings["height"], settings["width"], settings["steps"]) == (5, 32, 64, 2)
    assert settings["modes"] == ["image", "sparse", "video"] and settings["recovery_iters"] == 5
    history = client.get_metric_history(run_id, f"eval/{tag}/video/abs_rel")
    assert len(history) == 1 and history[0].step == 10
    assert client.get_run(run_id).info.status == "RUNNING"  # the evaluation does not end the training's run
    assert any(a.path.startswith("eval") for a in client.list_artifacts(run_id))
    assert cli(["eval", f"checkpoint={run}"]) == 0
    assert "nothing to evaluate" in capsys.readouterr().out
    # another dataset of the same run: scored into its own folder and MLflow keys, the first one's kept
    other = make_shards(tmp_path / "other", num_clips=1, frames=5, height=32, width=64, seed=3)
    assert cli(["eval", f"checkpoint={run}", f"eval.dataset={other}", "eval.modes=[video]"]) == 0
    capsys.readouterr()
    assert dataset_tag(str(other)) != tag and (ckpt / "eval" / dataset_tag(str(other)) / "metrics.json").is_file()
    assert json.loads((ckpt / "eval" / tag / "metrics.json").read_text()) == report
    assert len(client.get_metric_history(run_id, f"eval/{dataset_tag(str(other))}/video/abs_rel")) == 1
    assert len(client.get_metric_history(run_id, f"eval/{tag}/video/abs_rel")) == 1
    # the store fails after the scoring (locked by the training beside it past its timeout): the scores were kept
    # but never logged (a traceback, and later scans skipped the checkpoint as scored); now a warning, and the next
    # evaluation of the run directory logs them without scoring again
    import sqlite3

    def locked(*args, **kwargs):
        raise sqlite3.OperationalError("database is locked")
    third = make_shards(tmp_path / "third", num_clips=1, frames=5, height=32, width=64, seed=4)
    key, scores = f"eval/{dataset_tag(str(third))}/video/abs_rel", ckpt / "eval" / dataset_tag(str(third)) / "metrics.json"
    with monkeypatch.context() as m:
        m.setattr(MlflowTracker, "add_to_run", locked)
        assert cli(["eval", f"checkpoint={run}", f"eval.dataset={third}", "eval.modes=[video]"]) == 0
    assert (f"scores are in {scores} but were not logged to MLflow run {run_id}: OperationalError: database is "
            "locked; an evaluation of its run directory logs them") in capsys.readouterr().err
    assert json.loads(scores.read_text())["mlflow_not_logged"]["run_id"] == run_id
    assert client.get_metric_history(run_id, key) == []
    assert cli(["eval", f"checkpoint={run}", f"eval.dataset={third}", "eval.modes=[video]"]) == 0
    err = capsys.readouterr().err
    assert "scored on this dataset already" in err and f"logged its scores (made earlier) to MLflow run {run_id}" in err
    assert len(client.get_metric_history(run_id, key)) == 1 and "mlflow_not_logged" not in json.loads(scores.read_text())
    # a failure part-way, the metrics logged and the artifacts not: the retry logs no second point of them
    from mlflow.tracking import MlflowClient

    fourth = make_shards(tmp_path / "fourth", num_clips=1, frames=5, height=32, width=64, seed=5)
    key = f"eval/{dataset_tag(str(fourth))}/video/abs_rel"
    with monkeypatch.context() as m:
        m.setattr(MlflowClient, "log_artifacts", locked)
        assert cli(["eval", f"checkpoint={run}", f"eval.dataset={fourth}", "eval.modes=[video]"]) == 0
    assert "were not logged to MLflow run" in capsys.readouterr().err and len(client.get_metric_history(run_id, key)) == 1
    assert cli(["eval", f"checkpoint={run}", f"eval.dataset={fourth}", "eval.modes=[video]"]) == 0
    assert f"logged its scores (made earlier) to MLflow run {run_id}" in capsys.readouterr().err
    assert len(client.get_metric_history(run_id, key)) == 1
    assert any(a.path == f"eval/{dataset_tag(str(fourth))}" for a in client.list_artifacts(run_id, "eval"))
    # a copy out of the run directory: scored on its own, into no store (its grandparent is an unrelated folder,
    # where a store used to be made for a run it does not hold, failing once the scores were in)
    away = tmp_path / "elsewhere" / "ck"
    shutil.copytree(ckpt, away, ignore=shutil.ignore_patterns("eval"))
    (away / "config.yaml").write_text(to_yaml(cfg))
    assert cli(["eval", f"checkpoint={away}", "eval.modes=[video]"]) == 0
    assert "not logged to MLflow: copied out of its run directory" in capsys.readouterr().out
    assert (away / "eval" / tag / "metrics.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("mlflow")) == []
    assert not (tmp_path / "elsewhere" / "mlflow.db").exists()


def test_scores_go_to_the_training_run_only_where_its_store_holds_it(tmp_path, monkeypatch):
    """tracked_run: the run's own store beside a checkpoint in its run directory, or tracking.uri's; none for a copy
    (no store of its run), a run directory whose store is gone (none is made), or a store without the run."""
    from one4d_train.config import load_config
    from one4d_train.eval.pipeline import tracked_run
    from one4d_train.train.tracking import MlflowTracker

    cfg = load_config(["tracking.system_metrics=false"])
    run = tmp_path / "run"
    tracker = MlflowTracker(str(run), cfg.tracking, cfg.name)
    run_id = tracker.start(None, {})
    tracker.end()
    assert tracked_run(cfg, str(run), run_id) == (run_id, "")
    assert tracked_run(cfg, str(run), None) == (None, "")
    assert tracked_run(cfg, None, run_id)[0] is None
    gone = tmp_path / "gone"
    gone.mkdir()
    got, why = tracked_run(cfg, str(gone), run_id)
    assert got is None and "mlflow.db" in why and not (gone / "mlflow.db").exists()
    other = tmp_path / "other"
    elsewhere = MlflowTracker(str(other), cfg.tracking, cfg.name)
    elsewhere.start(None, {})
    elsewhere.end()
    got, why = tracked_run(cfg, str(other), run_id)
    assert got is None and run_id in why
    server = load_config(["tracking.system_metrics=false", f"tracking.uri=sqlite:///{run / 'mlflow.db'}"])
    assert tracked_run(server, None, run_id) == (run_id, "")  # a copy evaluated against the run's server
