"""Checkpoint directory logic without DeepSpeed: completeness, resume choice, RNG round trip."""
import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from one4d_train.train import checkpoint as ckpt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make(ckpt_dir, step, complete=True, corrupt=False, crc=False):
    """A checkpoint folder; crc: its marker records CRC-32s (as saves do now), else sizes only (as before)."""
    path = os.path.join(ckpt_dir, ckpt.step_name(step))
    os.makedirs(os.path.join(path, "ds"))
    with open(os.path.join(path, "ds", "model.pt"), "wb") as f:
        f.write(b"x" * 100)
    if complete:
        marker = {"step": step, "world_size": 2, "files": ckpt._listing(path)}
        if crc:
            marker["crc32"] = ckpt.checksums(path, [os.path.join(path, rel) for rel in marker["files"]])
        ckpt.write_atomic(os.path.join(path, ckpt.MARKER), json.dumps(marker))
    if corrupt:
        with open(os.path.join(path, "ds", "model.pt"), "wb") as f:
            f.write(b"x" * 10)
    return path


def _choose_on_rank(rank, port, dirs, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        with open(out[rank], "w") as f:
            json.dump({"own": ckpt.resolve_resume("auto", dirs[rank]),
                       "chosen": ckpt.resolve_resume_once("auto", dirs[rank])}, f)
    finally:
        dist.destroy_process_group()


def test_every_rank_resumes_from_the_checkpoint_rank_0_chose(tmp_path):
    """Another node's listing of a shared file system may lag behind: a rank that chose for itself would load an
    older checkpoint than rank 0 (each rank is shown its own folder here: rank 1's lacks the newest)."""
    import socket

    import torch.multiprocessing as mp

    dirs = [str(tmp_path / "node0"), str(tmp_path / "node1")]
    make(dirs[0], 10), make(dirs[0], 20), make(dirs[1], 10)
    out = [str(tmp_path / "rank0.json"), str(tmp_path / "rank1.json")]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_choose_on_rank, args=(port, dirs, out), nprocs=2)
    got = [json.load(open(f)) for f in out]
    newest = os.path.join(dirs[0], ckpt.step_name(20))
    assert got[1]["own"] == os.path.join(dirs[1], ckpt.step_name(10))  # what rank 1 would have chosen itself
    assert [g["chosen"] for g in got] == [newest, newest]


def test_auto_picks_newest_complete_ignoring_leftovers(tmp_path):
    d = str(tmp_path / "checkpoints")
    assert ckpt.resolve_resume("auto", d) is None
    make(d, 10)
    good = make(d, 20)
    make(d, 30, complete=False)  # killed before its marker
    make(d, 40, corrupt=True)  # a file no longer matches the marker
    os.makedirs(os.path.join(d, ".tmp-" + ckpt.step_name(50)))
    ckpt.write_atomic(os.path.join(d, "latest"), ckpt.step_name(60))  # dangling pointer
    assert ckpt.resolve_resume("auto", d) == good
    assert ckpt.resolve_resume("never", d) is None
    assert ckpt.resolve_resume(good, d) == good
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        ckpt.resolve_resume(os.path.join(d, ckpt.step_name(30)), d)
    assert [os.path.basename(p) for p in ckpt.complete_checkpoints(d)] == [ckpt.step_name(10), ckpt.step_name(20)]


def test_marker_must_list_files(tmp_path):
    path = make(str(tmp_path), 1)
    ckpt.write_atomic(os.path.join(path, ckpt.MARKER), json.dumps({"step": 1, "files": {}}))
    assert not ckpt.is_complete(path)
    ckpt.write_atomic(os.path.join(path, ckpt.MARKER), "{not json")
    assert not ckpt.is_complete(path)


def test_world_size_mismatch_is_refused(tmp_path):
    path = make(str(tmp_path), 5)
    with pytest.raises(RuntimeError, match="written by 2 ranks; this job has 4"):
        ckpt.Checkpointer(str(tmp_path), 0, 4, 3).load_train_state(path)


def test_rng_round_trip_through_json_and_safetensors(tmp_path):
    from safetensors.torch import load_file, save_file

    gen = torch.Generator().manual_seed(3)
    random.seed(1), np.random.seed(2), torch.manual_seed(4)
    state, tensors = ckpt.capture_rng(gen)
    expected = (random.random(), np.random.rand(), torch.rand(1).item(), torch.rand(1, generator=gen).item())
    json_text = json.dumps(state)
    save_file(tensors, str(tmp_path / "rng.safetensors"))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    gen2 = torch.Generator().manual_seed(9)
    ckpt.restore_rng(json.loads(json_text), load_file(str(tmp_path / "rng.safetensors")), gen2)
    assert (random.random(), np.random.rand(), torch.rand(1).item(), torch.rand(1, generator=gen2).item()) == expected


def test_write_atomic_replaces(tmp_path):
    p = str(tmp_path / "latest")
    ckpt.write_atomic(p, "a")
    ckpt.write_atomic(p, "b")
    assert open(p).read() == "b" and os.listdir(tmp_path) == ["latest"]


def names(d):
    return sorted(n for n in os.listdir(d) if ckpt.STEP_DIR.match(n))


def test_resuming_an_earlier_checkpoint_sets_the_newer_timeline_aside(tmp_path):
    run_dir = str(tmp_path)
    d = os.path.join(run_dir, "checkpoints")
    for step in (4, 8, 12):
        make(d, step)
    ckpt.write_atomic(os.path.join(d, "latest"), ckpt.step_name(12))
    assert ckpt.set_aside(d, os.path.join(d, ckpt.step_name(12))) is None  # the newest: nothing to move
    make(d, 16, complete=False)  # killed while writing: after step 4 too
    aside = ckpt.set_aside(d, os.path.join(d, ckpt.step_name(4)))
    assert os.path.basename(aside).startswith("abandoned-")
    assert names(d) == [ckpt.step_name(4)] and names(aside) == [ckpt.step_name(s) for s in (8, 12, 16)]
    assert ckpt.is_complete(os.path.join(aside, ckpt.step_name(12)))  # moved whole, nothing deleted
    assert open(os.path.join(d, "latest")).read().strip() == ckpt.step_name(4)
    # the branch writes steps 5..7: resume=auto takes its newest, pruning keeps it and leaves the old timeline
    for step in (5, 6, 7):
        make(d, step)
    assert ckpt.resolve_resume("auto", d) == os.path.join(d, ckpt.step_name(7))
    ckpt.Checkpointer(run_dir, 0, 2, keep_last=2)._prune()
    assert names(d) == [ckpt.step_name(6), ckpt.step_name(7)]
    assert names(aside) == [ckpt.step_name(s) for s in (8, 12, 16)]


def test_a_fresh_start_or_another_runs_checkpoint_sets_all_aside(tmp_path):
    d = str(tmp_path / "checkpoints")
    other = make(str(tmp_path / "other"), 3)
    make(d, 2)
    make(d, 6)
    first = ckpt.set_aside(d, other)  # resume=PATH of another run: none of ours is its history
    assert names(d) == [] and names(first) == [ckpt.step_name(2), ckpt.step_name(6)]
    assert not os.path.exists(os.path.join(d, "latest"))
    make(d, 1)
    second = ckpt.set_aside(d, None)  # resume=never, the same second: a folder of its own
    assert second != first and names(second) == [ckpt.step_name(1)] and names(first) == [ckpt.step_name(2), ckpt.step_name(6)]
    assert ckpt.set_aside(str(tmp_path / "none"), None) is None


def test_each_rank_owns_its_deepspeed_partition_files(tmp_path):
    ds = tmp_path / "ds"
    ds.mkdir()
    files = ["mp_rank_00_model_states.pt", "zero_to_fp32.py"] + [
        f"{prefix}zero_pp_rank_{r}_mp_rank_00_{kind}_states.pt" for r in (0, 1, 10) for prefix in ("", "bf16_")
        for kind in ("model", "optim")]
    for f in files:
        (ds / f).write_bytes(b"x")
    owned = {r: [os.path.basename(p) for p in ckpt.written_by(str(ds), r)] for r in (0, 1, 10, 2)}
    assert owned[1] == sorted(f for f in files if "zero_pp_rank_1_" in f) and len(owned[1]) == 4
    assert owned[10] == sorted(f for f in files if "zero_pp_rank_10_" in f)
    assert sorted(owned[0]) == sorted(f for f in files if "zero_pp_rank_0_" in f or "zero_pp_rank" not in f)
    assert owned[2] == []


def test_set_aside_reads_the_resumed_path_as_written(tmp_path):
    d = str(tmp_path / "checkpoints")
    for step in (2, 4):
        make(d, step)
    aside = ckpt.set_aside(d, os.path.join(d, ckpt.step_name(2)) + "/")  # a trailing slash: still ours
    assert names(d) == [ckpt.step_name(2)] and names(aside) == [ckpt.step_name(4)]
    again = ckpt.set_aside(d, os.path.join(aside, ckpt.step_name(4)))  # back to the abandoned timeline
    assert names(d) == [] and names(again) == [ckpt.step_name(2)]


def test_the_run_directory_of_a_checkpoint_set_aside_is_its_run(tmp_path):
    run = tmp_path / "run"
    assert ckpt.run_dir_of(str(run / "checkpoints" / "step-00000008")) == str(run)
    assert ckpt.run_dir_of(str(run / "checkpoints" / "abandoned-20261204T221500Z" / "step-00000012")) == str(run)
    assert ckpt.run_dir_of(str(run / "checkpoints" / "damaged-step-00000004-20261204T221500Z")) == str(run)
    assert ckpt.run_dir_of(str(tmp_path / "elsewhere" / "step-00000008")) is None  # a copy: no run around it


def test_evaluation_of_a_set_aside_checkpoint_logs_into_no_mlflow_run(tmp_path):
    """The run continues along the new timeline and logs its own eval scores at the same steps: a set-aside
    checkpoint's scores would mix the two timelines in one curve, so eval takes no run id for it."""
    import json

    from one4d_train.eval.pipeline import run_of

    run = tmp_path / "run"
    for folder in (run / "checkpoints" / "step-00000008", run / "checkpoints" / "abandoned-20261204T221500Z" /
                   "step-00000012"):
        (folder / "train_state").mkdir(parents=True)
        step = int(folder.name.split("-")[1])
        (folder / "train_state" / "rank-00000.json").write_text(json.dumps({"step": step, "mlflow_run_id": "r1"}))
    assert run_of(str(run / "checkpoints" / "step-00000008")) == (str(run), "r1", 8)
    assert run_of(str(run / "checkpoints" / "abandoned-20261204T221500Z" / "step-00000012")) == (str(run), None, 12)


def test_a_prune_killed_midway_leaves_no_step_folder_behind(tmp_path):
    """Pruning deletes a checkpoint of many files; a kill in the middle must not leave a step folder without its
    files: no later prune would see it (it counts complete checkpoints only) and it would stay on disk for good.
    What a cut-short delete leaves is a .tmp- folder, which the next save removes."""
    import signal
    import subprocess
    import sys

    run_dir = tmp_path / "run"
    d = run_dir / "checkpoints"
    old = make(str(d), 1)
    for i in range(20000):
        (d / ckpt.step_name(1) / "ds" / f"part-{i:05d}").write_bytes(b"x")
    marker = {"step": 1, "world_size": 1, "files": ckpt._listing(old)}
    ckpt.write_atomic(os.path.join(old, ckpt.MARKER), json.dumps(marker))
    make(str(d), 2)
    code = (f"import sys; sys.path.insert(0, {ROOT!r}); from one4d_train.train import checkpoint as c; "
            f"print('go', flush=True); c.Checkpointer({str(run_dir)!r}, 0, 1, keep_last=1)._prune()")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "go\n"

    def left():
        for name in os.listdir(d):
            if name != ckpt.step_name(2):
                try:
                    return len(os.listdir(d / name / "ds"))
                except FileNotFoundError:
                    pass
        return 0

    while proc.poll() is None and left() > 10000:
        pass
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 0 < left() < 20000, "the kill did not land inside the delete"
    assert names(d) == [ckpt.step_name(2)], os.listdir(d)
    assert [n for n in os.listdir(d) if n != ckpt.step_name(2)] == [".tmp-deleted-" + ckpt.step_name(1)]


def _state(folder, run_id):
    os.makedirs(os.path.join(folder, "train_state"), exist_ok=True)
    with open(os.path.join(folder, "train_state", "rank-00000.json"), "w") as f:
        json.dump({"mlflow_run_id": run_id}, f)


def test_a_branch_is_known_by_the_abandoned_timeline_it_leaves(tmp_path):
    """Resuming step 4 of run A with an abandoned step 6 of run A is a branch, on the first start (set_aside moved it)
    and on a requeue before the branch's first checkpoint (nothing left to move); resuming the branch's own newer
    checkpoint (run B) is not."""
    d = str(tmp_path / "checkpoints")
    for step, run in ((4, "A"), (6, "A"), (8, "B")):
        _state(os.path.join(d, "abandoned-20261205T000000Z" if step == 6 else "", ckpt.step_name(step)), run)
    assert ckpt.continued_elsewhere(d, os.path.join(d, ckpt.step_name(4)), "A")
    assert not ckpt.continued_elsewhere(d, os.path.join(d, ckpt.step_name(8)), "B")
    assert not ckpt.continued_elsewhere(d, os.path.join(d, ckpt.step_name(4)), "C")
    assert not ckpt.continued_elsewhere(d, os.path.join(d, ckpt.step_name(6)), "A")


def test_the_same_resume_command_run_again_goes_on_from_the_start_it_made(tmp_path):
    """resume=PATH run again after the start it made was stopped resumed PATH again and set the progress since aside
    as abandoned. The newest checkpoint goes on from that start when its timeline began with a start from PATH (its
    train state's started_from names PATH's MLflow run and step) and it was trained with the same config but for
    run_dir and resume (a moved run directory, a requeue's resume=auto); another config is another branch."""
    d = str(tmp_path / "run" / "checkpoints")

    def checkpoint(folder, step, run, started_from, **config):
        path = make(folder, step)  # the marker lists ds/ only: the files added below leave it complete
        _state(path, run)
        with open(os.path.join(path, "train_state", "rank-00000.json"), "w") as f:
            json.dump({"mlflow_run_id": run, "step": step, "started_from": started_from}, f)
        with open(os.path.join(path, ckpt.CONFIG_FILE), "w") as f:
            yaml.safe_dump({"run_dir": "/old/run", "resume": "auto", "optim": {"lr": 0.03, "betas": [0.9, 0.99]},
                            **config}, f)
        return path

    def command(**config):
        return yaml.safe_dump({"run_dir": str(tmp_path / "run"), "resume": os.path.join(d, ckpt.step_name(4)),
                               "optim": {"lr": 0.03, "betas": [0.9, 0.99]}, **config})

    start = checkpoint(d, 4, "A", None)
    assert ckpt.start_point(start) == {"mlflow_run_id": "A", "step": 4, "path": os.path.realpath(start)}
    assert ckpt.branch_progress(d, start, command()) == (None, [])  # nothing newer
    branch = checkpoint(d, 6, "B", {"mlflow_run_id": "A", "step": 4}, optim={"lr": 0.02, "betas": [0.9, 0.99]})
    assert ckpt.branch_progress(d, start, command(optim={"lr": 0.02, "betas": [0.9, 0.99]})) == (branch, [])
    assert ckpt.branch_progress(d, start, command(optim={"lr": 0.01, "betas": [0.9, 0.99]})) == (None, ["optim.lr"])
    assert ckpt.branch_progress(d, start, command(optim={"lr": 0.02, "betas": [0.9, 0.99]}, seed=1)) == (
        None, ["seed"])
    checkpoint(d, 8, "C", {"mlflow_run_id": "B", "step": 6}, optim={"lr": 0.02, "betas": [0.9, 0.99]})
    assert ckpt.branch_progress(d, start, command(optim={"lr": 0.02, "betas": [0.9, 0.99]})) == (None, [])
    # a start from another run's checkpoint (a new run directory) is known the same way
    elsewhere = checkpoint(str(tmp_path / "other"), 4, "X", None)
    into = str(tmp_path / "new" / "checkpoints")
    newest = checkpoint(into, 10, "Y", {"mlflow_run_id": "X", "step": 4})
    assert ckpt.branch_progress(into, elsewhere, command()) == (newest, [])


def resumable(folder, step, run, started_from, config_text, crc=False):
    """A complete checkpoint as far as resume_problems and branch_progress read it: a train state with the keys a
    resume reads, recording `started_from`, and the config.yaml `config_text`."""
    path = make(folder, step, crc=crc)  # the marker lists ds/ only: the files added below leave it complete
    os.makedirs(os.path.join(path, "train_state"))
    state = {k: 0 for k in ckpt.STATE_KEYS} | {"step": step, "mlflow_run_id": run, "started_from": started_from}
    with open(os.path.join(path, "train_state", "rank-00000.json"), "w") as f:
        json.dump(state, f)
    with open(os.path.join(path, ckpt.CONFIG_FILE), "w") as f:
        f.write(config_text)
    return path


def test_the_same_resume_command_goes_on_once_train_keep_last_pruned_its_start(tmp_path):
    """resume=PATH of step 4 of the same run: the start's checkpoints 6, 8 and 10 made the prune (keep_last=3) delete
    step 4, and the same command run again (a requeue, a re-run after a kill) stopped at its start-up check with "no
    such checkpoint directory". Its checkpoints record PATH's path beside PATH's MLflow run and step, which no longer
    read: the command goes on from the newest, checked as such; under another config it is told which keys differ."""
    from one4d_train.train.config import TrainConfig, resume_problems

    run = tmp_path / "run"
    d = str(run / "checkpoints")
    config = {"run_dir": str(run), "resume": os.path.join(d, ckpt.step_name(4)), "optim": {"lr": 0.02}}
    text = yaml.safe_dump(config)
    start = resumable(d, 4, "A", None, text)
    point = ckpt.start_point(start)
    for step in (6, 8, 10):
        resumable(d, step, "B", point, text)
    ckpt.Checkpointer(str(run), 0, 2, keep_last=3)._prune()
    assert names(d) == [ckpt.step_name(s) for s in (6, 8, 10)]
    newest = os.path.join(d, ckpt.step_name(10))
    assert ckpt.branch_progress(d, start, text) == (newest, [])
    assert resume_problems(start, str(run), 2, TrainConfig(), 0, text) == []
    (key, problem), = resume_problems(start, str(run), 4, TrainConfig(), 0, text)
    assert key == "resume" and problem.startswith(f"resume={start} goes on from {newest}: written by 2 ranks")
    other = yaml.safe_dump({**config, "optim": {"lr": 0.01}})
    assert ckpt.branch_progress(d, start, other) == (None, ["optim.lr"])
    (key, problem), = resume_problems(start, str(run), 2, TrainConfig(), 0, other)
    assert key == "resume" and "no such checkpoint directory" in problem and "(optim.lr differ)" in problem
    elsewhere = str(tmp_path / "run" / "checkpoints" / ckpt.step_name(2))  # never a start of theirs
    assert ckpt.branch_progress(d, elsewhere, text) == (None, [])


@pytest.fixture
def one_rank():
    """A process group of one rank (gloo): what choose_resume's collectives need."""
    import torch.distributed as dist

    from launch_utils import _port

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_port()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_a_damaged_checkpoint_of_the_same_resume_commands_start_falls_back_within_that_start(tmp_path, one_rank):
    """The same resume=PATH command goes on from the newest checkpoint of its start; that one damaged, it was refused
    as a resume=<that checkpoint> the user never gave, for good. Those checkpoints are the command's own progress:
    a damaged one is set aside as resume=auto does, and the start's next newest is tried, then PATH itself (refused
    when damaged, never set aside); with PATH pruned and none left, the refusal says so."""
    from one4d_train.configtools import ConfigError

    run = tmp_path / "run"
    d = str(run / "checkpoints")
    text = yaml.safe_dump({"run_dir": str(run), "resume": os.path.join(d, ckpt.step_name(4)), "optim": {"lr": 0.02}})
    start = resumable(d, 4, "A", None, text, crc=True)
    point = ckpt.start_point(start)
    six, eight = (resumable(d, step, "B", point, text, crc=True) for step in (6, 8))
    flip(os.path.join(eight, "ds", "model.pt"))
    with pytest.raises(ConfigError, match="is damaged"):  # resume=<that checkpoint> as given, never set aside
        ckpt.choose_resume(eight, d, 0)
    assert ckpt.choose_resume(eight, d, 0, branch=(start, text)) == (six, True)
    assert names(d) == [ckpt.step_name(4), ckpt.step_name(6)]
    assert any(n.startswith(f"damaged-{ckpt.step_name(8)}-") for n in os.listdir(d))
    flip(os.path.join(six, "ds", "model.pt"))
    assert ckpt.choose_resume(six, d, 0, branch=(start, text)) == (start, True)
    flip(os.path.join(start, "ds", "model.pt"))
    with pytest.raises(ConfigError, match=f"key 'resume': {start} is damaged"):
        ckpt.choose_resume(start, d, 0, branch=(start, text))
    assert os.path.isdir(start)
    ten = resumable(d, 10, "B", point, text, crc=True)
    flip(os.path.join(ten, "ds", "model.pt"))
    os.rename(start, str(tmp_path / "pruned"))
    with pytest.raises(ConfigError, match="no such checkpoint directory .* went on from it are damaged"):
        ckpt.choose_resume(ten, d, 0, branch=(start, text))


def test_a_step_folder_whose_files_changed_size_is_damaged_not_an_unfinished_save(tmp_path, one_rank, caplog):
    """A save renames its folder to step-X only once complete, so a step folder that is not complete was damaged:
    a file cut short or a marker overwritten. resume=auto set it aside as an abandoned timeline without a word (and,
    with no other checkpoint, started afresh from step 0). It is damaged like a CRC mismatch: set aside and named,
    the next older one tried, a refusal when none is left; a missing file may come back, so it stops the run with
    nothing moved."""
    import logging

    from one4d_train.configtools import ConfigError

    d = str(tmp_path / "checkpoints")
    make(d, 5, crc=True, corrupt=True)  # an older one damaged too: set aside, so that no later scan trips on it
    ten = make(d, 10, crc=True)
    make(d, 20, crc=True)
    make(d, 30, crc=True, corrupt=True)  # ds/model.pt cut from 100 to 10 bytes
    with open(os.path.join(d, ckpt.step_name(20), ckpt.MARKER), "w") as f:
        f.write("{garbage")
    with caplog.at_level(logging.WARNING):
        # not a fall-back: the start-up checks, which take the newest complete one, checked step 10 already
        assert ckpt.choose_resume("auto", d, 0) == (ten, False)
    assert names(d) == [ckpt.step_name(10)]
    assert sorted(n.split("-2")[0] for n in os.listdir(d) if n.startswith("damaged-")) == [
        f"damaged-{ckpt.step_name(5)}", f"damaged-{ckpt.step_name(20)}", f"damaged-{ckpt.step_name(30)}"]
    said = caplog.text
    assert f"{os.path.join(d, ckpt.step_name(30), 'ds', 'model.pt')} is 10 bytes, COMPLETE says 100" in said, said
    assert "COMPLETE marker is damaged" in said

    forty = make(d, 40, crc=True)
    os.remove(os.path.join(forty, "ds", "model.pt"))
    with pytest.raises(ConfigError, match=r"step-00000040 cannot be read now: .*model.pt, listed in COMPLETE, is "
                                          r"missing. It was not set aside"):
        ckpt.choose_resume("auto", d, 0)
    assert names(d) == [ckpt.step_name(10), ckpt.step_name(40)]

    only = str(tmp_path / "only")
    make(only, 4, crc=True, corrupt=True)
    with pytest.raises(ConfigError, match="no intact checkpoint left .* only damaged ones set aside"):
        ckpt.choose_resume("auto", only, 0)


def test_a_checkpoint_copied_out_of_its_run_uses_its_own_config(tmp_path):
    """config_of takes the run's config.yaml only for a checkpoint inside a run's checkpoints/ (or set aside there),
    not a config.yaml that happens to sit two folders up from a copy."""
    run = tmp_path / "run"
    inside = run / "checkpoints" / ckpt.step_name(4)
    aside = run / "checkpoints" / "abandoned-20261205T000000Z" / ckpt.step_name(6)
    copy = tmp_path / "copies" / ckpt.step_name(4)
    for folder in (inside, aside, copy):
        folder.mkdir(parents=True)
        (folder / "config.yaml").write_text("seed: 1\n")
    (run / "config.yaml").write_text("seed: 2\n")
    (tmp_path / "config.yaml").write_text("seed: 3\n")  # unrelated, two folders above the copy
    assert ckpt.config_of(str(inside)) == ckpt.config_of(str(aside)) == str(run / "config.yaml")
    assert ckpt.config_of(str(copy)) == str(copy / "config.yaml")


def flip(path, offset=None, n=8):
    """Flip n bytes of a file in place (bit rot: the size stays)."""
    data = bytearray(open(path, "rb").read())
    offset = len(data) // 2 if offset is None else offset
    for i in range(offset, offset + n):
        data[i] ^= 0x5A
    open(path, "wb").write(bytes(data))


def test_flipped_bytes_are_named_by_their_crc_and_each_rank_verifies_what_it_reads(tmp_path):
    """Sizes alone miss bit rot: the marker's CRC-32s name the file. A rank verifies its own ZeRO partitions, the
    files of no partition (ZeRO-1/2's model states, which every rank reads) and its own train state."""
    path = make(str(tmp_path), 6, crc=True)
    names = ["mp_rank_00_model_states.pt"] + [f"{p}zero_pp_rank_{r}_mp_rank_00_{k}_states.pt" for r in (0, 1, 10)
                                               for p, k in (("", "model"), ("bf16_", "optim"))]
    for name in names:
        with open(os.path.join(path, "ds", name), "wb") as f:
            f.write(name.encode() * 1000)
    os.makedirs(os.path.join(path, "train_state"))
    for r in (0, 1):
        with open(os.path.join(path, "train_state", f"rank-{r:05d}.json"), "w") as f:
            json.dump({"step": 6}, f)
    files = ckpt._listing(path)
    ckpt.write_atomic(os.path.join(path, ckpt.MARKER), json.dumps(
        {"step": 6, "world_size": 2, "files": files,
         "crc32": ckpt.checksums(path, [os.path.join(path, rel) for rel in files])}))
    assert ckpt.resume_files(path, 1) == ["ds/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt", "ds/model.pt",
                                          "ds/mp_rank_00_model_states.pt", "ds/zero_pp_rank_1_mp_rank_00_model_states.pt",
                                          "train_state/rank-00001.json", "train_state/rank-00001.safetensors"]
    assert not ckpt.damaged_files(path)
    damaged = os.path.join(path, "ds", "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt")
    flip(damaged)
    assert ckpt.is_complete(path)  # every size still right
    (line,) = ckpt.damaged_files(path)
    assert line.startswith(damaged + ": its bytes changed after the save (CRC-32 ")
    assert ckpt.damaged_files(path, ckpt.resume_files(path, 1)) == [line]
    assert ckpt.damaged_files(path, ckpt.resume_files(path, 0)) == []  # rank 0 never reads rank 1's partition
    with pytest.raises(ckpt.CheckpointDamaged, match="rank_1_mp_rank_00_optim"):
        ckpt.verify_folder(path, "ds")
    ckpt.verify_folder(path, "adapters")  # none there: nothing to verify
    old = make(str(tmp_path), 4)  # a marker of sizes alone, written before CRC-32s: not verified
    flip(os.path.join(old, "ds", "model.pt"))
    assert ckpt.damaged_files(old) == [] and ckpt.verify_folder(old, "ds") is None


def test_a_damaged_train_state_under_a_marker_without_crc_is_named_not_a_key_error(tmp_path):
    """A flipped byte in the train state JSON of a checkpoint written before markers held CRC-32s renamed a key
    ('step' -> 'Xtep': KeyError in the trainer) or broke the JSON or the safetensors header (raw tracebacks)."""
    from safetensors.torch import save_file

    from one4d_train.train.config import resume_problems

    run = tmp_path / "run"
    path = make(str(run / "checkpoints"), 4)
    os.makedirs(os.path.join(path, "train_state"))
    state, tensors = ckpt.capture_rng(torch.Generator().manual_seed(1))
    text = json.dumps({**{k: 0 for k in ckpt.STATE_KEYS}, "rng": state})
    base = os.path.join(path, "train_state", "rank-00000")
    save_file(tensors, base + ".safetensors")
    marker = {"step": 4, "world_size": 1}
    for damaged_text in (text.replace('"step"', '"Xtep"'), "\xff" + text[1:]):
        with open(base + ".json", "w") as f:
            f.write(damaged_text)
        ckpt.write_atomic(os.path.join(path, ckpt.MARKER), json.dumps({**marker, "files": ckpt._listing(path)}))
        with pytest.raises(ckpt.CheckpointDamaged, match=f"^{base}.json: (no key 'step'|not valid JSON)"):
            ckpt.Checkpointer(str(run), 0, 1, 3).load_train_state(path)
        (key, problem), = resume_problems("auto", str(run), 1, None)
        assert key == "resume" and f"{base}.json" in problem and f"move {path} out of" in problem, problem
    with open(base + ".json", "w") as f:
        f.write(text)
    flip(base + ".safetensors", offset=3)  # in the header's length
    ckpt.write_atomic(os.path.join(path, ckpt.MARKER), json.dumps({**marker, "files": ckpt._listing(path)}))
    with pytest.raises(ckpt.CheckpointDamaged, match=f"^{base}.safetensors: not a readable safetensors file"):
        ckpt.Checkpointer(str(run), 0, 1, 3).load_train_state(path)


def test_a_damaged_deepspeed_file_is_named_without_torchs_advice_to_unpickle(tmp_path):
    """torch.load(weights_only=True) of a damaged file raised UnpicklingError advising weights_only=False (which
    runs whatever the file holds), or RuntimeError 'mmap can only be used...'; neither named what to do."""
    import pickle

    path = str(tmp_path / "zero_pp_rank_0_mp_rank_00_model_states.pt")
    torch.save({"param_shapes": [{"w": torch.Size([4, 4])}], "module": {"w": torch.zeros(64, 64)}}, path)
    good = open(path, "rb").read()
    for offset in (2, good.index(b"\x80\x02") + 4):  # the archive's first header, the pickle (protocol 2)
        for mmap in (False, True):
            open(path, "wb").write(good)
            flip(path, offset=offset)
            with pytest.raises(ckpt.CheckpointDamaged) as caught:
                ckpt.load_weights_only(path, map_location="cpu", mmap=mmap)
            message = str(caught.value)
            assert message.startswith(f"{path}: cannot be read by torch.load(weights_only=True) (its zip member "), message
            assert "weights_only=False" not in message, message
    # the trainer opens each rank's files before DeepSpeed loads them (a rank failing alone inside DeepSpeed's load
    # left the others to fail in its next collective): only the rank that reads the damaged file finds it
    checkpoint = tmp_path / ckpt.step_name(4)
    (checkpoint / "ds").mkdir(parents=True)
    os.replace(path, checkpoint / "ds" / os.path.basename(path))
    marker = {"step": 4, "world_size": 2, "files": ckpt._listing(str(checkpoint))}
    ckpt.write_atomic(str(checkpoint / ckpt.MARKER), json.dumps(marker))
    with pytest.raises(ckpt.CheckpointDamaged, match="zero_pp_rank_0_mp_rank_00_model_states.pt: cannot be read"):
        ckpt.open_deepspeed_files(str(checkpoint), 0)
    ckpt.open_deepspeed_files(str(checkpoint), 1)
    path = str(checkpoint / "ds" / os.path.basename(path))
    open(path, "wb").write(good)
    flip(path, offset=len(good) // 2)  # tensor data: loads without a word, which the marker's CRC-32s catch
    assert ckpt.load_weights_only(path)["module"]["w"].abs().sum() > 0
    torch_says = ("Weights only load failed. This file can still be loaded, to do so you have two options, do those "
                  "steps only if you trust the source of the checkpoint. \n\t(1) Re-running `torch.load` with "
                  "`weights_only` set to `False` will likely succeed, but it can result in arbitrary code execution."
                  "\n WeightsUnpickler error: Unsupported operand 118")
    message = str(ckpt.unreadable(str(tmp_path / "gone.pt"), pickle.UnpicklingError(torch_says)))
    assert "UnpicklingError: Unsupported operand 118" in message and "weights_only` set to" not in message, message


def test_a_key_a_checkpoints_config_lacks_counts_as_its_default(tmp_path):
    """A checkpoint written before a config key existed: the key is its default there (what that version did), so
    resuming it with the default is no config change (it made a requeued resume=PATH job start its branch again,
    and a resume=auto one log its held steps twice); another value is one."""
    from one4d_train.config import load_config
    from one4d_train.configtools import to_yaml

    cfg = load_config([])
    old = yaml.safe_load(to_yaml(cfg))
    del old["model"]["vae_videos_per_call"]
    (tmp_path / ckpt.CONFIG_FILE).write_text(yaml.safe_dump(old))
    assert ckpt.config_changes(str(tmp_path), to_yaml(cfg)) == []
    other = load_config(["model.vae_videos_per_call=1", "optim.lr=0.5"])
    assert ckpt.config_changes(str(tmp_path), to_yaml(other)) == ["model.vae_videos_per_call", "optim.lr"]


def test_a_save_that_fails_says_why_with_the_space_left_and_a_restart_clears_its_leftovers(tmp_path, one_rank):
    """A full disk during a save ended the run with torch's 'unexpected pos' traceback, and the unfinished folder it
    left filled the disk for the next start, whose first write (`latest`) failed before any step. The failure is one
    message naming the step, the space left and the checkpoint the same command resumes from; a start removes what
    an interrupted save left."""
    import errno

    d = tmp_path / "run" / "checkpoints"
    ten = make(str(d), 10, crc=True)

    class FullDisk:
        def save_checkpoint(self, folder, **kwargs):
            os.makedirs(os.path.join(folder, "ds"), exist_ok=True)
            (Path(folder) / "ds" / "half.pt").write_bytes(b"x" * 10)
            raise OSError(errno.ENOSPC, "No space left on device")

    saver = ckpt.Checkpointer(str(tmp_path / "run"), 0, 1, keep_last=2)
    with pytest.raises(ckpt.CheckpointSaveError) as caught:
        saver.save(FullDisk(), 20, {}, {})
    said = str(caught.value)
    assert said.startswith(f"the checkpoint of step 20 into {d} failed (OSError: [Errno 28] No space left on device)")
    assert " GB free on its file system" in said and f"The same command resumes from {ten};" in said, said

    class Short:
        def save_checkpoint(self, folder, **kwargs):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 846912 vs 846800")

    class Bug:
        def save_checkpoint(self, folder, **kwargs):
            raise TypeError("a fault of the code, to see with its traceback")

    with pytest.raises(ckpt.CheckpointSaveError, match=r"unexpected pos .*\(torch's writer reports a short write: "
                                                       r"a full disk reads so\)"):
        saver.save(Short(), 20, {}, {})
    with pytest.raises(TypeError, match="a fault of the code"):
        saver.save(Bug(), 20, {}, {})
    (d / "latest.tmp-4242").write_text("step-00000020")
    assert sorted(os.listdir(d)) == [".tmp-" + ckpt.step_name(20), "latest.tmp-4242", ckpt.step_name(10)]
    saver.clear_leftovers()
    assert sorted(os.listdir(d)) == [ckpt.step_name(10)]
