"""Launching the real `one4d train` CLI the ways clusters do (torchrun; srun-style plain processes) on CPU, and
reading back what a run recorded in MLflow. Shared by the training tests."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(extra: dict | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TOY_", "ONE4D_"))
           and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=ROOT, **(extra or {}))
    return env


def torchrun(run_dir, *args, extra_env=None, timeout=400, wait=True):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_port()}",
           "-m", "one4d_train.cli", "train", f"run_dir={run_dir}", *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(extra_env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    if not wait:
        return proc
    out = communicate(proc, timeout)
    return proc.returncode, out


def srun_like(run_dir, *args, extra_env=None, nproc=2, timeout=400):
    """Launch the way srun does: one plain process per task with SLURM_* variables, no torchrun, each task in a
    process group of its own (a signal to it reaches the task's data workers, not this test)."""
    port, procs = _port(), []
    for rank in range(nproc):
        env = _env({**(extra_env or {}), "SLURM_PROCID": str(rank), "SLURM_NTASKS": str(nproc),
                    "SLURM_LOCALID": str(rank), "SLURM_JOB_ID": "4242", "MASTER_ADDR": "127.0.0.1",
                    "MASTER_PORT": str(port)})
        procs.append(subprocess.Popen([sys.executable, "-m", "one4d_train.cli", "train", f"run_dir={run_dir}", *args],
                                      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      start_new_session=True))
    outs = [communicate(p, timeout) for p in procs]
    return [p.returncode for p in procs], "\n".join(outs)


def communicate(proc: subprocess.Popen, timeout: float) -> str:
    """The output of `proc` (started in a session of its own) once it ends; past `timeout` seconds (or when the test
    is stopped meanwhile: Ctrl-C, pytest-timeout) the job, its ranks and data workers, is killed before the test
    fails, so that a hung job neither outlives the test nor holds the CPUs the tests after it need."""
    try:
        return proc.communicate(timeout=timeout)[0]
    except BaseException:
        kill_job(proc)
        proc.communicate()
        raise


def kill_job(proc: subprocess.Popen) -> None:
    """SIGKILL the job `proc` started (in a session of its own): its process group and every process under it, since
    torchrun starts each rank in a session of its own."""
    import psutil

    try:
        tree = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:  # the job is gone already
        tree = []
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for p in tree:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def mlflow_run(run_dir):
    from mlflow.tracking import MlflowClient  # here: GPU machines without mlflow still import ROOT

    client = MlflowClient(f"sqlite:///{run_dir}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("one4d").experiment_id])
    assert len(runs) == 1, f"expected one MLflow run, found {len(runs)}"
    return client, runs[0]


def metric(client, run, key) -> dict[int, float]:
    """step -> value (the last one logged for that step)."""
    return {m.step: m.value for m in sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.timestamp)}
