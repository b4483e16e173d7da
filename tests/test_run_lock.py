"""One training job per run directory (one4d_train/train/run_lock.py): a second job is refused before it touches the
run directory, naming the job that holds it; a dead holder's lock is gone; a requeued job's own dead instance does
not block it."""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys

import pytest

from launch_utils import ROOT, _env, srun_like
from one4d_train.configtools import ConfigError
from one4d_train.train import run_lock

HOLD = ("import sys, time; from one4d_train.train import run_lock; "
        "lock = run_lock.acquire(sys.argv[1], {'SLURM_JOB_ID': sys.argv[2]}); print('held', flush=True); "
        "time.sleep(600)")


@pytest.fixture
def holder(tmp_path):
    """A live process of Slurm job 99 holding tmp_path/run's lock."""
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir), "99"], cwd=ROOT, env=_env(),
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    yield run_dir, proc
    proc.kill()
    proc.wait()


def test_second_job_refused_naming_the_holder_until_the_holder_dies(holder):
    run_dir, proc = holder
    with pytest.raises(run_lock.RunDirBusy) as exc:
        run_lock.acquire(str(run_dir), {"SLURM_JOB_ID": "100"})
    assert f"run_dir {run_dir}" in str(exc.value) and f"Slurm job 99, pid {proc.pid}" in str(exc.value)
    proc.send_signal(signal.SIGKILL)  # however the holder dies, the system releases its lock
    proc.wait()
    lock = run_lock.acquire(str(run_dir), {"SLURM_JOB_ID": "100"})
    try:
        assert lock is not None
        with open(lock.path) as f:  # read through another descriptor only after checking: see holder_of
            recorded = f.read()
    finally:
        lock.release()
    assert f'"pid": {os.getpid()}' in recorded and '"slurm_job_id": "100"' in recorded


def test_a_requeued_job_goes_on_past_its_own_dead_instance(holder, caplog):
    """A lock recorded under this job's own Slurm id and an earlier restart count belongs to a dead instance of it (a
    crashed node's lock left on the file server): the requeued job goes on without it, with a warning."""
    run_dir, _ = holder
    with caplog.at_level(logging.WARNING, logger="one4d_train.train.run_lock"):
        assert run_lock.acquire(str(run_dir), {"SLURM_JOB_ID": "99", "SLURM_RESTART_COUNT": "1"}) is None
    assert "earlier instance of this job" in caplog.text


def test_a_second_training_in_the_same_allocation_is_refused(holder):
    """Two `srun one4d train` of one salloc allocation share its Slurm job id and restart count: the holder is alive,
    not a requeued job's dead instance, and the second is refused as any other job."""
    run_dir, proc = holder
    with pytest.raises(run_lock.RunDirBusy, match=f"Slurm job 99, pid {proc.pid}"):
        run_lock.acquire(str(run_dir), {"SLURM_JOB_ID": "99"})


@pytest.mark.slow
def test_train_refuses_a_run_dir_in_use_before_touching_it(holder):
    """Both ranks of a second `one4d train` exit 2 (rank 0 names the holder) and nothing of the run directory but
    the lock file is written."""
    run_dir, proc = holder
    codes, out = srun_like(run_dir, "train.task=tests.train_toy_task:ToyTask", "train.device=cpu",
                           "train.precision=fp32", "tracking.system_metrics=false", "train.steps=2", timeout=120)
    assert codes == [2, 2], out[-3000:]
    assert f"another training job is using it (Slurm job 99, pid {proc.pid}" in out
    assert sorted(os.listdir(run_dir)) == [run_lock.LOCK_NAME]


def test_a_run_dir_that_cannot_be_made_names_the_key(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match=r"key 'run_dir': cannot create .*file/run.*Not a directory"):
        run_lock.acquire(str(tmp_path / "file" / "run"), {})


def test_a_lock_file_removed_by_its_holder_is_not_held_by_a_late_opener(tmp_path, monkeypatch):
    """A holder that removes its lock file on leaving (one4d export's) lets a process that opened the file just
    before lock the removed file: it would run beside the next one, which locks the new file. hold() locks the file
    that is at the path when it holds it."""
    path = str(tmp_path / "x.lock")
    real_open, calls = os.open, []

    def open_then_removed(name, *args):
        fd = real_open(name, *args)
        if not calls:  # the first holder leaves between this open and the lock
            os.remove(name)
        calls.append(name)
        return fd

    monkeypatch.setattr(run_lock.os, "open", open_then_removed)
    lock = run_lock.hold(path)
    assert len(calls) == 2 and os.path.exists(path)
    assert os.fstat(lock.fd).st_ino == os.stat(path).st_ino
    lock.release()


def test_a_holder_record_that_cannot_be_written_leaves_no_lock_behind(tmp_path, monkeypatch):
    """A write of the holder record that fails (a full disk, an NFS error at the fsync) is the key's error, and the
    lock is let go with its file descriptor: the next attempt in this process (or another job) can hold it."""
    def no_space(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(run_lock.os, "fsync", no_space)
    open_before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(ConfigError, match="key 'run_dir': cannot create .*No space left on device"):
        run_lock.acquire(str(tmp_path / "run"), {})
    assert len(os.listdir("/proc/self/fd")) == open_before
    monkeypatch.undo()
    lock = run_lock.acquire(str(tmp_path / "run"), {})
    assert lock is not None
    lock.release()
