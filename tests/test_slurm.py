"""The real slurm/ scripts, submitted to a real single-node Slurm that this module starts (tests/slurm_cluster.py).

Site settings come from slurm/sites/local-cpu.env, exactly as a user's would from slurm/site.env.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from slurm_cluster import LocalSlurm, SlurmUnavailable, ensure_installed

REPO = Path(__file__).resolve().parents[1]
SITE = REPO / "slurm" / "sites" / "local-cpu.env"
JOB_TIMEOUT_S = 600
TRAIN_STEPS = 120  # toy steps take ~25-50 ms here: a USR1 or TERM sent at step 3 lands within ~10 steps, mid-run

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


@pytest.fixture(scope="module")
def cluster():
    try:
        ensure_installed()
    except SlurmUnavailable as exc:
        pytest.skip(f"Slurm cannot be installed on this machine: {exc}")
    with LocalSlurm() as c:
        yield c


@pytest.fixture(scope="module")
def job_env(cluster):
    # the submitting shell's environment travels with each job (sbatch --export=ALL); PYTHONPATH: the toy task
    env = dict(cluster.env, ONE4D_SITE=str(SITE), ONE4D_VENV=sys.prefix,
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    env.pop("ONE4D_ROOT", None)  # found by submit.sh, or by the job from its submission directory
    return env


def run(cmd, env, timeout=JOB_TIMEOUT_S, cwd=REPO) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def submit(env, *args, timeout=JOB_TIMEOUT_S, cwd=REPO) -> subprocess.CompletedProcess:
    return run([REPO / "slurm" / "submit.sh", *args], env, timeout, cwd)


def wait_for_job(cluster: LocalSlurm, job_id: str, timeout_s: float = JOB_TIMEOUT_S) -> dict[str, str]:
    """The job's last record: poll until it reaches a final state. One that ended and was forgotten (MinJobAge)
    between two polls, on a loaded machine, is read from the end record jobcomp wrote, over the last one seen."""
    final = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")
    deadline, seen = time.monotonic() + timeout_s, {}
    while time.monotonic() < deadline:
        job = cluster.job(job_id)
        if job.get("JobState") in final:
            return job
        ended = {} if job else cluster.ended(job_id)
        if ended.get("JobState") in final:
            return {**seen, **ended}
        seen = job or seen
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} did not finish within {timeout_s} s: {cluster.job(job_id)}")


def wait_for_text(path: Path, pattern: str, timeout_s: float = JOB_TIMEOUT_S) -> re.Match:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        m = re.search(pattern, path.read_text()) if path.exists() else None
        if m:
            return m
        time.sleep(0.2)
    raise AssertionError(f"{pattern!r} never appeared in {path}:\n{path.read_text() if path.exists() else ''}")


def test_a_job_forgotten_before_a_poll_still_gives_its_final_state(cluster, job_env, tmp_path):
    """On a loaded machine a poll can come after Slurm has forgotten an ended job (MinJobAge=4): its final state
    comes from the end record jobcomp wrote (a wait that saw {} ran on to its 600 s timeout)."""
    r = run(["sbatch", "--parsable", f"--output={tmp_path / 'out'}", "--wrap", "exit 3"], job_env)
    job_id = r.stdout.strip().split(";")[0]
    deadline = time.monotonic() + 60
    while (cluster.job(job_id) or not cluster.ended(job_id)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert cluster.job(job_id) == {}, cluster.job(job_id)
    job = wait_for_job(cluster, job_id, timeout_s=5)
    assert (job["JobId"], job["JobState"], job["ExitCode"]) == (job_id, "FAILED", "3:0"), job


def test_job_tasks_get_the_cpus_per_task_the_site_asks_for(cluster, job_env, tmp_path):
    """From Slurm 22.05 on srun does not inherit the job's --cpus-per-task but reads SRUN_CPUS_PER_TASK (sbatch(1)):
    job_env.sh, which every job script sources first, passes the job's value on to the tasks' srun."""
    script, out = tmp_path / "probe.sbatch", tmp_path / "probe.out"
    script.write_text(f"#!/bin/bash\nsource {REPO}/slurm/job_env.sh\n"
                      "srun bash -c 'echo task $SLURM_PROCID srun_cpus=$SRUN_CPUS_PER_TASK'\n")
    r = run(["sbatch", "--wait", "--ntasks=2", "--cpus-per-task=2", f"--output={out}", script], job_env)
    assert r.returncode == 0, r.stdout + r.stderr + (out.read_text() if out.exists() else "")
    assert sorted(re.findall(r"task \d srun_cpus=(\S*)", out.read_text())) == ["2", "2"]


def test_a_job_submitted_from_a_job_does_not_inherit_its_srun_cpus_per_task(cluster, job_env, tmp_path):
    """A job with --cpus-per-task (training) submits one without it (an evaluation where the site file asks for none)
    through submit.sh: the new job's srun must not ask for the first job's CPUs per task, which its allocation of one
    CPU cannot give."""
    site, inner_out, outer_out = tmp_path / "site.env", tmp_path / "inner.out", tmp_path / "outer.out"
    site.write_text(f"source {SITE}\nONE4D_SBATCH_INNER=(--ntasks=1 --time=00:05:00)\n")
    inner = tmp_path / "inner.sbatch"
    inner.write_text(f"#!/bin/bash\nsource {REPO}/slurm/job_env.sh\n"
                     "srun bash -c 'echo srun_cpus=${SRUN_CPUS_PER_TASK:-none}'\n")
    outer = tmp_path / "outer.sbatch"
    outer.write_text(f"#!/bin/bash\nsource {REPO}/slurm/job_env.sh\n"
                     f"{REPO}/slurm/submit.sh --wait --output={inner_out} {inner}\n")
    r = run(["sbatch", "--wait", "--ntasks=1", "--cpus-per-task=2", f"--output={outer_out}", outer],
            dict(job_env, ONE4D_SITE=str(site)))
    logs = (outer_out.read_text() if outer_out.exists() else "") + (inner_out.read_text() if inner_out.exists() else "")
    assert r.returncode == 0, r.stdout + r.stderr + logs
    assert "srun_cpus=none" in inner_out.read_text(), logs


# -- training --

def train_args(tmp: Path, run_dir: Path, steps: int) -> list[str]:
    """Config + overrides: the toy task through the real `one4d train` (ZeRO-3, 2 ranks from srun)."""
    config = tmp / "toy.yaml"
    config.write_text("name: slurm_toy\ntrain:\n  task: tests.train_toy_task:ToyTask\n  device: cpu\n"
                      "  precision: fp32\ntracking:\n  system_metrics: false\n")
    return [config, f"run_dir={run_dir}", f"train.steps={steps}", "train.zero_stage=3", "train.log_every=1",
            f"train.checkpoint_every={steps // 2}"]


def mlflow_run(run_dir: Path):
    """(client, the run) of a run directory's MLflow store, read with MLflow's own client."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1, f"expected one MLflow run (a resumed job or an evaluation continues it), found {len(runs)}"
    return client, runs[0]


def logged_steps(run_dir: Path) -> list[int]:
    """Every step the trainer logged, in order."""
    client, run_ = mlflow_run(run_dir)
    return sorted(m.step for m in client.get_metric_history(run_.info.run_id, "loss"))


def zero_partitions(checkpoint: Path) -> list[tuple[int, int]]:
    """(ZeRO stage, partition count) from each rank's optimizer file of a DeepSpeed checkpoint."""
    import torch
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    out = []
    for f in sorted((checkpoint / "ds").glob("zero_pp_rank_*_optim_states.pt")):
        with torch.serialization.safe_globals([LossScaler, ZeroStageEnum, fragment_address]):
            state = torch.load(f, map_location="cpu", weights_only=True)["optimizer_state_dict"]
        out.append((int(state["zero_stage"]), state["partition_count"]))
    return out


def final_weights(run_dir: Path, steps: int) -> dict:
    from safetensors.torch import load_file

    return load_file(run_dir / "checkpoints" / f"step-{steps:08d}" / "adapters" / "adapter.safetensors")


@pytest.fixture(scope="module")
def uninterrupted(cluster, job_env, tmp_path_factory):
    """One training job straight through, with plain `sbatch --wait slurm/train.sbatch CONFIG key=value ...` from
    the repository root (the other jobs go through slurm/submit.sh): the allocation on the command line, the
    job environment still from the site file."""
    tmp = tmp_path_factory.mktemp("train")
    run_dir, out = tmp / "run", tmp / "train.out"
    # ONE4D_EVAL_AFTER_TRAIN=1 with no held-out set: the evaluation job would only exit 2, so none is submitted
    r = run(["sbatch", "--wait", "--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", f"--output={out}",
             "slurm/train.sbatch", *train_args(tmp, run_dir, TRAIN_STEPS)], dict(job_env, ONE4D_EVAL_AFTER_TRAIN="1"))
    return {"rc": r.returncode, "sbatch": r.stdout + r.stderr, "run_dir": run_dir, "out": out.read_text()}


def test_train_job_trains_zero3_on_two_tasks_and_checkpoints(uninterrupted):
    out, run_dir = uninterrupted["out"], uninterrupted["run_dir"]
    assert uninterrupted["rc"] == 0, f"{uninterrupted['sbatch']}\n{out[-4000:]}"
    assert re.search(r"1 node\(s\), 2 task\(s\), rendezvous localhost:\d+", out)
    assert "training finished" in out
    assert "no evaluation submitted: the run names no eval.dataset nor data.val_shards" in out, out[-2000:]
    assert "Submitted batch job" not in out
    names = sorted(p.name for p in (run_dir / "checkpoints").glob("step-*"))
    assert names == [f"step-{TRAIN_STEPS // 2:08d}", f"step-{TRAIN_STEPS:08d}"]
    final = run_dir / "checkpoints" / names[-1]
    marker = json.loads((final / "COMPLETE").read_text())
    assert (marker["step"], marker["world_size"]) == (TRAIN_STEPS, 2)
    assert zero_partitions(final) == [(3, 2), (3, 2)], "each rank holds its ZeRO-3 partition of 2"
    assert logged_steps(run_dir) == list(range(1, TRAIN_STEPS + 1))


def test_usr1_checkpoints_requeues_and_resumes_without_losing_or_repeating_a_step(cluster, job_env, tmp_path,
                                                                                 uninterrupted):
    """USR1 mid-run: the job checkpoints, requeues itself and trains on from that step, every step logged once, to
    the uninterrupted job's weights. Its CONFIG.yaml is edited while it trains (its name and run_dir): each requeue
    read the file again, so the requeued job missed its checkpoints and trained afresh in another folder. Every start
    of a job trains with the config its first start recorded (in the submission directory, removed once the training
    finished); the edit is named in a warning."""
    config, out = tmp_path / "toy.yaml", tmp_path / "train.out"
    first, second = tmp_path / "first", tmp_path / "second"
    # the settings of train_args, all in the file (an edit of a key given on the command line changes nothing)
    text = ("name: {name}\nrun_dir: {run}\ntrain:\n  task: tests.train_toy_task:ToyTask\n  device: cpu\n"
            f"  precision: fp32\n  steps: {TRAIN_STEPS}\n  zero_stage: 3\n  log_every: 1\n"
            f"  checkpoint_every: {TRAIN_STEPS // 2}\ntracking:\n  system_metrics: false\n")
    config.write_text(text.format(name="slurm_toy", run=first))
    r = submit(job_env, "--parsable", f"--output={out}", REPO / "slurm" / "train.sbatch", config, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    job_id = r.stdout.strip().split(";")[0]
    record = tmp_path / f"one4d-train-{job_id}.config.yaml"
    wait_for_text(out, r"\[rank 0\] step 3/")  # the trainer is in its loop, its signal handlers installed
    config.write_text(text.format(name="second", run=second))  # edited while the job trains
    sig = run(["scancel", "--signal=USR1", "--batch", job_id], job_env, timeout=30)
    assert sig.returncode == 0, sig.stderr
    job = wait_for_job(cluster, job_id)
    text = out.read_text()
    assert (job["JobState"], job["ExitCode"], job["Restarts"]) == ("COMPLETED", "0:0", "1"), f"{job}\n{text[-4000:]}"

    stopped = int(re.search(r"checkpointed step (\d+), exiting 42", text).group(1))
    assert 3 <= stopped < TRAIN_STEPS, "the signal must land mid-run"
    assert re.search(r"restart 0: got SIGUSR1: asking the trainer to checkpoint", text)
    assert re.search(r"restart 0: checkpointed; requeued \(restart 1 of at most 3\)", text)
    restarted = text[text.index("restart 1:"):]
    assert f"resumed from {first / 'checkpoints' / f'step-{stopped:08d}'} at step {stopped}" in restarted, text[-4000:]
    assert f"differs from the one job {job_id} started with: name, run_dir. The job goes on as it started" in text
    assert "restart 1: training finished" in text
    assert not second.exists() and not record.exists()
    assert logged_steps(first) == list(range(1, TRAIN_STEPS + 1)), "every step logged exactly once"
    # exact resume: the interrupted job ends with the same trainable weights as the uninterrupted one
    assert uninterrupted["rc"] == 0
    expected = final_weights(uninterrupted["run_dir"], TRAIN_STEPS)
    got = final_weights(first, TRAIN_STEPS)
    assert expected.keys() == got.keys() and all((expected[k] == got[k]).all() for k in expected)


def test_scancel_checkpoints_and_ends_the_job(cluster, job_env, tmp_path):
    """`scancel` (a TERM to the batch shell and the tasks) had the job checkpoint and requeue itself, so it trained
    on to the end: the job now ends after the checkpoint, and resubmitting resumes from it."""
    run_dir, out = tmp_path / "run", tmp_path / "train.out"
    r = submit(job_env, "--parsable", f"--output={out}", REPO / "slurm" / "train.sbatch",
               *train_args(tmp_path, run_dir, TRAIN_STEPS), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    job_id = r.stdout.strip().split(";")[0]
    wait_for_text(out, r"\[rank 0\] step 3/")
    assert run(["scancel", job_id], job_env, timeout=30).returncode == 0
    job = wait_for_job(cluster, job_id)
    text = wait_for_text(out, r"NOT requeued by this job").string
    assert (job["JobState"], job["Restarts"]) == ("CANCELLED", "0"), f"{job}\n{text[-4000:]}"
    assert "got SIGTERM: asking the trainer to checkpoint" in text and "requeued (restart" not in text
    stopped = int(re.search(r"checkpointed step (\d+), exiting 42", text).group(1))
    assert stopped < TRAIN_STEPS and (run_dir / "checkpoints" / f"step-{stopped:08d}" / "COMPLETE").exists()
    time.sleep(3)  # Slurm would have requeued it by now
    assert cluster.job(job_id).get("JobState") in (None, "CANCELLED"), cluster.job(job_id)


def test_term_with_no_restarts_left_checkpoints_and_exits_43_without_requeue(cluster, job_env, tmp_path):
    """ONE4D_REQUEUE_ON_TERM=1 (a site that preempts by cancelling): a TERM requeues, while restarts are left."""
    run_dir, out = tmp_path / "run", tmp_path / "train.out"
    env = dict(job_env, ONE4D_MAX_RESTARTS="0", ONE4D_REQUEUE_ON_TERM="1")
    r = submit(env, "--parsable", f"--output={out}", REPO / "slurm" / "train.sbatch",
               *train_args(tmp_path, run_dir, TRAIN_STEPS), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    job_id = r.stdout.strip().split(";")[0]
    wait_for_text(out, r"\[rank 0\] step 3/")
    assert run(["scancel", "--signal=TERM", "--batch", job_id], job_env, timeout=30).returncode == 0
    job = wait_for_job(cluster, job_id)
    text = out.read_text()
    assert (job["JobState"], job["ExitCode"], job["Restarts"]) == ("FAILED", "43:0", "0"), f"{job}\n{text[-4000:]}"
    assert "got SIGTERM: asking the trainer to checkpoint" in text
    assert "checkpointed; NOT requeued (restart 0, ONE4D_MAX_RESTARTS=0)" in text
    stopped = int(re.search(r"checkpointed step (\d+), exiting 42", text).group(1))
    assert (run_dir / "checkpoints" / f"step-{stopped:08d}" / "COMPLETE").exists(), "resubmitting continues from here"


def test_the_time_limits_usr1_before_the_first_step_ends_the_job_instead_of_requeuing_it(cluster, job_env, tmp_path):
    """A time limit at or below the USR1 lead plus the start-up: the signal comes before the first step, and every
    requeue would stop the same way until ONE4D_MAX_RESTARTS ran out. USR1 to the batch shell (as Slurm's
    --signal=B:USR1@600 sends it) while the model is built, then a TERM (scancel): the job ends with 43, saying why,
    after one run."""
    run_dir, out = tmp_path / "run", tmp_path / "train.out"
    env = dict(job_env, TOY_SIGNAL_AT="0:0:USR1:batch,0:0:TERM:batch")
    r = submit(env, "--parsable", f"--output={out}", REPO / "slurm" / "train.sbatch",
               *train_args(tmp_path, run_dir, TRAIN_STEPS), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    job = wait_for_job(cluster, r.stdout.strip().split(";")[0])
    text = out.read_text()
    assert (job["JobState"], job["ExitCode"], job["Restarts"]) == ("FAILED", "43:0", "0"), f"{job}\n{text[-4000:]}"
    assert "restart 0: got SIGUSR1: asking the trainer to checkpoint" in text and "got SIGTERM" in text
    assert "stop requested (SIGUSR1 on some rank) before the first step" in text
    assert "stopped before its first step, nothing saved, after USR1: NOT requeued" in text
    assert "requeued (restart" not in text
    assert not list(run_dir.glob("checkpoints/step-*"))


def test_job_started_from_another_runs_checkpoint_and_killed_before_its_first_resumes_from_that_one(
        cluster, job_env, tmp_path, uninterrupted):
    """A run started from another run's checkpoint (resume=PATH), its tasks killed hard (SIGKILL, as on a node
    failure) before it wrote a checkpoint of its own, then requeued by Slurm: the requeued job must load PATH again,
    not start from scratch, and end with the weights of the run it started from."""
    assert uninterrupted["rc"] == 0
    start = uninterrupted["run_dir"] / "checkpoints" / f"step-{TRAIN_STEPS // 2:08d}"
    run_dir, out = tmp_path / "run", tmp_path / "train.out"
    args = [*train_args(tmp_path, run_dir, TRAIN_STEPS), f"resume={start}", f"train.checkpoint_every={TRAIN_STEPS}"]
    r = submit(job_env, "--parsable", f"--output={out}", "slurm/train.sbatch", *args)
    assert r.returncode == 0, r.stderr
    job_id = r.stdout.strip().split(";")[0]
    wait_for_text(out, rf"\[rank 0\] step {TRAIN_STEPS // 2 + 3}/")
    record = REPO / f"one4d-train-{job_id}.config.yaml"  # the config every start of the job trains with
    tasks = [p for p in psutil.process_iter(["name", "cmdline"])
             if p.info["name"] == "one4d" and f"config={record}" in (p.info["cmdline"] or [])]
    assert len(tasks) == 2, tasks
    for p in tasks:
        p.kill()
    psutil.wait_procs(tasks, timeout=30)
    assert run(["scontrol", "requeue", job_id], job_env, timeout=30).returncode == 0
    job = wait_for_job(cluster, job_id)
    text = out.read_text()
    assert (job["JobState"], job["ExitCode"], job["Restarts"]) == ("COMPLETED", "0:0", "1"), f"{job}\n{text[-4000:]}"
    restarted = text[text.index("restart 1:"):]
    assert f"resumed from {start} at step {TRAIN_STEPS // 2}" in restarted, restarted[-4000:]
    expected = final_weights(uninterrupted["run_dir"], TRAIN_STEPS)
    got = final_weights(run_dir, TRAIN_STEPS)
    assert expected.keys() == got.keys() and all((expected[k] == got[k]).all() for k in expected)


@pytest.fixture(scope="module")
def shards(cluster, job_env, tmp_path_factory):
    """slurm/shard_submit.sh: a 3-task array over 6 clips, then the merge/verify job (submitted from tmp)."""
    from data_utils import make_dataset

    tmp = tmp_path_factory.mktemp("shard")
    manifest = make_dataset(tmp / "data", num_clips=6, frames=9, height=32, width=64)
    out = tmp / "shards"
    r = run([REPO / "slurm" / "shard_submit.sh", "--tasks", "3", manifest, out, "--samples-per-shard", "1"], job_env,
            timeout=60, cwd=tmp)
    assert r.returncode == 0, r.stderr
    array_id, merge_id = r.stdout.split()
    merge = wait_for_job(cluster, merge_id)
    logs = {p.name: p.read_text() for p in tmp.glob("*.out")}
    return {"dir": out, "merge": merge, "array_id": array_id, "merge_id": merge_id, "logs": logs}


def test_shard_array_writes_disjoint_slices_merged_into_one_verified_index(shards, job_env):
    out, logs = shards["dir"], shards["logs"]
    assert (shards["merge"]["JobState"], shards["merge"]["ExitCode"]) == ("COMPLETED", "0:0"), logs
    assert sorted(logs) == sorted([f"one4d-shard-{shards['array_id']}_{i}.out" for i in range(3)]
                                  + [f"one4d-shard-merge-{shards['merge_id']}.out"])
    slices = [{s["name"] for s in json.loads((out / f"index.task-{i}.json").read_text())["records"]} for i in range(3)]
    assert all(slices) and not (slices[0] & slices[1] or slices[0] & slices[2] or slices[1] & slices[2])
    index = json.loads((out / "index.json").read_text())
    assert {s["name"] for s in index["shards"]} == set().union(*slices)
    assert (index["totals"]["shards"], index["totals"]["samples"]) == (6, 6)
    check = run([Path(sys.prefix) / "bin" / "one4d", "inspect-shards", out], job_env, timeout=300)
    assert check.returncode == 0, check.stdout + check.stderr


def test_encode_latents_array_stores_latents_of_every_shard_and_its_last_task_writes_the_index(cluster, shards,
                                                                                              job_env, tmp_path):
    """slurm/encode_latents.sbatch as a 2-task array: disjoint slices, one index.json (by whichever task ends
    last), shards that inspect-shards verifies and that carry the latents."""
    out = tmp_path / "latents"
    config = [f"config={REPO / 'configs/experiment/demo.yaml'}", "data.num_frames=5", "data.frame_stride=2"]
    r = submit(job_env, "--wait", "--parsable", "--array=0-1", REPO / "slurm" / "encode_latents.sbatch",
               shards["dir"], out, *config, "--device", "cpu", cwd=tmp_path)
    logs = {p.name: p.read_text() for p in tmp_path.glob("*.out")}
    array_id = r.stdout.strip().split(";")[0]
    # twice in CI (2026-12-07) sbatch --wait exited 1, a task having failed: both tasks' output, then what the daemons
    # logged of the array's two job ids. A string, which pytest prints whole (it cuts the repr of other objects to
    # 240 characters, which left too little of the output to say which task failed or why)
    assert r.returncode == 0, "\n".join([f"sbatch: {r.stderr}", *(f"== {name}\n{text[-3000:]}" for name, text in
                                                                   sorted(logs.items())),
                                          cluster.trace(array_id or "0", ids=2)])
    assert sorted(logs) == [f"one4d-encode-latents-{array_id}_{i}.out" for i in range(2)], logs
    assert sum("index:" in text for text in logs.values()) >= 1, logs
    index = json.loads((out / "index.json").read_text())
    assert (index["totals"]["shards"], index["totals"]["samples"]) == (6, 6)
    assert (index["latents"]["encoded"], index["latents"]["failed"]) == (6, [])
    check = run([Path(sys.prefix) / "bin" / "one4d", "inspect-shards", out], job_env, timeout=300)
    assert check.returncode == 0, check.stdout + check.stderr


def test_shard_merge_fails_loudly_on_a_corrupt_shard(shards, job_env, tmp_path):
    bad = tmp_path / "shards"
    shutil.copytree(shards["dir"], bad)
    (bad / "index.json").unlink()
    victim = sorted(bad.glob("*.tar"))[2]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    r = submit(job_env, "--wait", REPO / "slurm" / "shard_merge.sbatch", bad, cwd=tmp_path)
    job_id = re.search(r"Submitted batch job (\d+)", r.stdout).group(1)
    text = (tmp_path / f"one4d-shard-merge-{job_id}.out").read_text()
    assert r.returncode == 1, text
    assert re.search(r"(MERGE|VERIFY) FAILED for", text) and victim.name in text
    assert not (bad / "index.json").exists()


def test_train_real_tiny_model_on_the_shards_then_the_eval_job_it_submits_writes_metrics(cluster, job_env, shards,
                                                                                       tmp_path):
    run_dir, out = tmp_path / "run", tmp_path / "train.out"
    # memory asked for per node for training and per CPU for evaluation, as sites do: the evaluation job, submitted
    # from inside the training job, must not inherit the training job's SLURM_MEM_PER_NODE (its srun would refuse
    # to start next to its own SLURM_MEM_PER_CPU)
    site = tmp_path / "site.env"
    site.write_text(f"source {SITE}\nONE4D_SBATCH_TRAIN+=(--mem=1)\nONE4D_SBATCH_EVAL+=(--mem-per-cpu=1)\n")
    env = dict(job_env, ONE4D_EVAL_AFTER_TRAIN="1", ONE4D_SITE=str(site))
    r = submit(env, "--wait", f"--output={out}", REPO / "slurm" / "train.sbatch",
               REPO / "configs" / "experiment" / "demo.yaml", f"run_dir={run_dir}", f"data.shards={shards['dir']}",
               f"data.val_shards={shards['dir']}", "train.steps=2", "train.log_every=1", "train.zero_stage=3",
               "eval.num_samples=1", "eval.steps=2", "eval.cfg_scale=1.0", cwd=tmp_path)
    text = out.read_text()
    assert r.returncode == 0, text[-4000:]
    eval_id = re.search(r"Submitted batch job (\d+)", text).group(1)
    job = wait_for_job(cluster, eval_id)
    eval_log = (tmp_path / f"one4d-eval-{eval_id}.out").read_text()
    assert (job["JobState"], job["ExitCode"]) == ("COMPLETED", "0:0"), eval_log[-4000:]
    from one4d_train.eval.pipeline import dataset_tag

    tag = dataset_tag(str(shards["dir"]))
    metrics = json.loads((run_dir / "checkpoints" / "step-00000002" / "eval" / tag / "metrics.json").read_text())
    assert sorted(metrics["means"]) == ["image", "sparse", "video"]
    assert all(math.isfinite(m["abs_rel"]) for m in metrics["means"].values())
    _, run_ = mlflow_run(run_dir)
    assert run_.data.metrics[f"eval/{tag}/video/abs_rel"] == pytest.approx(metrics["means"]["video"]["abs_rel"])


@pytest.mark.parametrize("setting, value", [("ONE4D_REQUEUE_ON_TERM", "yes"), ("ONE4D_EVAL_AFTER_TRAIN", "2"),
                                            ("ONE4D_MAX_RESTARTS", "08"), ("ONE4D_TASK_EXIT_WAIT_S", "1.5"),
                                            ("ONE4D_TASK_EXIT_WAIT_S", "0")])  # srun --wait=0: no limit at all
def test_job_settings_are_checked_when_the_job_starts(setting, value, tmp_path):
    """A bad setting is named when a job starts, not where it is read after hours of training."""
    env = dict(os.environ, ONE4D_ROOT=str(REPO), ONE4D_SITE=str(SITE), ONE4D_VENV=sys.prefix, **{setting: value})
    r = subprocess.run(["bash", "-c", f"source {REPO}/slurm/job_env.sh && echo sourced"], env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and f"{setting}={value}" in r.stderr and "sourced" not in r.stdout, r


def _train_script(tmp_path, *args, **env):
    """train.sbatch run by bash as Slurm would start it on the batch host (the checks before its srun need no
    cluster): a job of one node whose SLURM_* variables are `env`'s."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env = dict(base, ONE4D_ROOT=str(REPO), ONE4D_SITE=str(SITE), ONE4D_VENV=sys.prefix, SLURM_JOB_ID="77",
               SLURM_JOB_NUM_NODES="1", SLURM_JOB_NODELIST="localhost", SLURM_SUBMIT_DIR=str(tmp_path), **env)
    return subprocess.run(["bash", str(REPO / "slurm" / "train.sbatch"), str(REPO / "configs/experiment/demo.yaml"),
                           f"run_dir={tmp_path / 'run'}", *args], env=env, capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)


def test_a_train_job_without_a_task_count_exits_2_instead_of_training_on_one_gpu_per_node(tmp_path):
    """sbatch sets SLURM_NTASKS only for --ntasks or --ntasks-per-node; without either srun starts one task per node."""
    r = _train_script(tmp_path)
    assert r.returncode == 2 and "no task count: submit with --ntasks-per-node" in r.stdout, r


def test_a_requeued_job_refuses_what_one4d_requeue_printed_besides_its_answer(tmp_path):
    """Stray output on one4d requeue's stdout (here a site's Python start-up banner) would be passed to the trainer
    as an argument: the job says what it got and exits 2, instead of failing on a config error it did not make."""
    site = tmp_path / "site-packages"
    site.mkdir()
    (site / "sitecustomize.py").write_text("print('welcome to the cluster')\n")
    r = _train_script(tmp_path, PYTHONPATH=str(site))  # the first start: records the job's config (no task count)
    assert r.returncode == 2 and "no task count" in r.stdout and (tmp_path / "one4d-train-77.config.yaml").is_file(), r
    r = _train_script(tmp_path, SLURM_NTASKS="2", SLURM_RESTART_COUNT="1", PYTHONPATH=str(site))
    assert r.returncode == 2 and "one4d requeue printed 'welcome to the cluster'" in r.stdout, r


def test_a_requeued_job_without_the_record_of_its_config_starts_as_submitted(tmp_path):
    """A requeued start trains with the config its first start recorded (run_dir included). Without the record no
    start of the job reached the training (Slurm requeues a job whose launch or node failed before the script ran):
    it starts as submitted, writing the record as a first start does."""
    from one4d_train.train.requeue import job_start

    record = tmp_path / "one4d-train-77.config.yaml"
    env = {"SLURM_JOB_ID": "77", "SLURM_RESTART_COUNT": "1"}
    with pytest.MonkeyPatch.context() as m:
        for k, v in env.items():
            m.setenv(k, v)
        assert job_start(str(record), [f"config={REPO / 'configs/experiment/demo.yaml'}",
                                       f"run_dir={tmp_path / 'run'}"]) == 0
    assert f"run_dir: {tmp_path / 'run'}" in record.read_text()
