"""The training engine end to end: the real `one4d train` CLI, real DeepSpeed ZeRO-3 (and ZeRO-2) on CPU with gloo,
2 processes, real MLflow, the toy task of tests/train_toy_task.py. Launches are shared by module-scoped fixtures."""
from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import sys
import threading
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file

from launch_utils import ROOT, _env, kill_job, metric, mlflow_run, srun_like, torchrun
from one4d_train.train import checkpoint as ckpt
from one4d_train.train import deepspeed_config, distributed
from one4d_train.train.preemption import EXIT_BAD_STEPS, REQUEUE_EXIT_CODE
from one4d_train.train.schedule import WarmupSchedule

STEPS = 24
COMMON = ["train.task=tests.train_toy_task:ToyTask", "train.device=cpu", "train.precision=fp32",
          "train.zero3_param_persistence_threshold=0", "tracking.system_metrics=false"]
RUN = COMMON + [f"train.steps={STEPS}", "train.micro_batch_size=2", "train.grad_accum=2", "train.checkpoint_every=6",
                "train.keep_last=2", "train.log_every=5", "optim.lr=0.03", "optim.warmup_steps=3",
                "optim.schedule=cosine", "optim.min_lr_ratio=0.1", "eval.every=8"]
LOGGED = [5, 10, 15, 20, 24]  # RUN's log lines: every 5 steps and the last
COMPARED = ("loss", "loss_rgb", "loss_xyz", "lr", "grad_norm", "skipped_steps", "eval/eval_loss")  # not timings
pytestmark = pytest.mark.slow


def trace(run_dir, rank):
    with open(os.path.join(run_dir, "toy_trace", f"rank-{rank}.jsonl")) as f:
        return [json.loads(line) for line in f]


def adapters(run_dir, step):
    return load_file(os.path.join(run_dir, "checkpoints", ckpt.step_name(step), "adapters", "adapter.safetensors"))


def from_zero(checkpoint):
    """The trainable weights rebuilt on the CPU from a checkpoint's ZeRO partitions (what export from_zero reads)."""
    from deepspeed.utils import zero_to_fp32

    with ckpt.weights_only_load(zero_to_fp32.torch):
        return zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag="ds",
                                                                    exclude_frozen_parameters=True)


def checkpoint_names(run_dir):
    """The checkpoint folder's entries, complete checkpoints marked with a *."""
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    return sorted(n + ("*" if ckpt.is_complete(os.path.join(ckpt_dir, n)) else "") for n in os.listdir(ckpt_dir))


def single(run_dir, *args, extra_env=None, kill_after=None, timeout=400):
    """`one4d train` as one plain process under ZeRO-2 (the quickest launch): (exit code, output). kill_after=
    (PATTERN, SECONDS): SIGKILL the job that long after a line of its output matches PATTERN, as a node failure
    would (exit code -9). A job still running after `timeout` seconds is killed, silent or not."""
    proc = subprocess.Popen([sys.executable, "-m", "one4d_train.cli", "train", f"run_dir={run_dir}", *COMMON,
                             "train.zero_stage=2", *args], cwd=ROOT, env=_env(extra_env), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    out, watchdog = [], threading.Timer(timeout, kill_job, (proc,))
    watchdog.start()
    try:
        for line in proc.stdout:
            out.append(line)
            if kill_after and re.search(kill_after[0], line):
                time.sleep(kill_after[1])
                kill_job(proc)
                kill_after = None
        return proc.wait(), "".join(out)
    finally:
        watchdog.cancel()
        if proc.poll() is None:  # the test stopped meanwhile (pytest-timeout, Ctrl-C): the job goes with it
            kill_job(proc)
            proc.wait()


def steps_logged(client, run, key) -> list[int]:
    """Every point of `key`'s MLflow history, by step: a step logged twice shows twice."""
    return sorted(m.step for m in client.get_metric_history(run.info.run_id, key))


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("straight")
    t = time.time()
    code, out = torchrun(run_dir, *RUN)
    assert code == 0, out[-4000:]
    print(f"straight run: {time.time() - t:.1f} s")
    return run_dir, out


@pytest.fixture(scope="module")
def preempted(tmp_path_factory):
    """1: SIGTERM to rank 1's whole process group (the rank and its 2 data workers) during step 8, an evaluation
    step in the middle of a log window; 2: the requeued job, signalled (SIGUSR1, rank 0) while it builds the model;
    3: the requeued job again, under torchrun, with train.export_adapters=false, to the end."""
    run_dir = tmp_path_factory.mktemp("preempted")
    codes1, out1 = srun_like(run_dir, *RUN, extra_env={"TOY_WORKERS": "2", "TOY_SIGNAL_AT": "8:1:TERM:group"})
    after1 = checkpoint_names(run_dir)
    codes2, out2 = srun_like(run_dir, *RUN, extra_env={"TOY_SIGNAL_AT": "0:0:USR1"})
    after2 = checkpoint_names(run_dir)
    code3, out3 = torchrun(run_dir, *RUN, "train.export_adapters=false")
    assert code3 == 0, out3[-4000:]
    return {"run_dir": run_dir, "codes1": codes1, "out1": out1, "after1": after1, "codes2": codes2, "out2": out2,
            "after2": after2, "out3": out3}


def test_zero3_trains_two_ranks_and_overfits(straight):
    run_dir, out = straight
    client, run = mlflow_run(run_dir)
    loss = metric(client, run, "loss")
    assert sorted(loss) == LOGGED
    assert loss[24] < loss[5] / 5, f"loss fell only from {loss[5]:.4f} to {loss[24]:.4f}"
    assert "global batch 8 = micro 2 x accum 2 x world 2" in out
    assert "deepspeed_shm_comm" not in out  # the CPU group compiles no inference-only op at its start
    # only the trainable adapter is exported, gathered whole from its ZeRO-3 partitions
    final = adapters(run_dir, STEPS)
    assert set(final) == {"adapter_down.weight", "adapter_up.weight"}
    assert final["adapter_up.weight"].shape == (16, 32) and final["adapter_up.weight"].abs().sum() > 0


def test_mlflow_records_params_metrics_artifacts(straight):
    run_dir, _ = straight
    client, run = mlflow_run(run_dir)
    params = run.data.params
    assert params["train.steps"] == str(STEPS) and params["optim.schedule"] == "cosine"
    assert params["train.task"] == "tests.train_toy_task:ToyTask"
    for key in ("loss_rgb", "loss_xyz", "lr", "grad_norm", "samples_per_s", "tokens_per_s", "data_wait_frac",
                "eval/eval_loss"):
        assert metric(client, run, key), key
    assert "mfu" not in run.data.metrics  # CPU and no configured peak: MFU is not logged
    assert sorted(metric(client, run, "eval/eval_loss")) == [8, 16, 24]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "adapters", "eval"} <= artifacts
    assert [a.path for a in client.list_artifacts(run.info.run_id, "adapters")] == ["adapters/adapter.safetensors"]
    assert run.info.status == "FINISHED"
    assert os.path.isfile(os.path.join(run_dir, "config.yaml"))


def test_logged_lr_is_the_one_the_step_used(straight):
    # step s updates with the schedule's factor after s - 1 applied steps (step 1: the first warmup third)
    run_dir, _ = straight
    schedule = WarmupSchedule(3, STEPS, "cosine", 0.1)
    lr = metric(*mlflow_run(run_dir), "lr")
    assert lr == {s: pytest.approx(0.03 * schedule(s - 1), rel=1e-12) for s in LOGGED}


def test_checkpoints_keep_last_and_latest(straight):
    run_dir, _ = straight
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    assert sorted(n for n in os.listdir(ckpt_dir) if n.startswith("step-")) == ["step-00000018", "step-00000024"]
    assert open(os.path.join(ckpt_dir, "latest")).read().strip() == "step-00000024"
    assert all(ckpt.is_complete(p) for p in ckpt.complete_checkpoints(ckpt_dir))
    state = json.load(open(os.path.join(ckpt_dir, "step-00000024", "train_state", "rank-00001.json")))
    assert state["step"] == STEPS and state["samples_seen"] == STEPS * 8 and state["loader"] == {"epoch": 3, "batch": 0}
    assert state["log_window"] == {"sums": {}, "counted": 0}  # logged at the last step
    window = json.load(open(os.path.join(ckpt_dir, "step-00000018", "train_state", "rank-00001.json")))["log_window"]
    assert window["counted"] == 3 and sorted(window["sums"]) == ["loss", "loss_rgb", "loss_xyz"]  # steps 16-18


def test_checkpoint_files_are_as_readable_as_the_umask_allows(straight):
    """safetensors creates its files 0600 whatever the umask: a checkpoint's train state and adapters were the only
    files of a run its group could not read on a shared cluster."""
    from one4d_train.tensor_files import _umask

    path = os.path.join(straight[0], "checkpoints", ckpt.step_name(STEPS))
    modes = {rel: stat.S_IMODE(os.stat(os.path.join(path, rel)).st_mode) for rel in ckpt._listing(path)}
    assert any(rel.endswith(".safetensors") for rel in modes) and any(rel.endswith(".pt") for rel in modes)
    # (DeepSpeed's zero_to_fp32.py scripts are executable too)
    assert {rel: m for rel, m in modes.items() if m & 0o666 != 0o666 & ~_umask()} == {}


def test_each_rank_fsyncs_the_deepspeed_files_it_wrote(straight):
    ds = os.path.join(straight[0], "checkpoints", ckpt.step_name(STEPS), "ds")
    rank0, rank1 = ckpt.written_by(ds, 0), ckpt.written_by(ds, 1)
    assert sorted(rank0 + rank1) == sorted(os.path.join(ds, f) for f in os.listdir(ds))  # each file has its writer
    assert sorted(os.path.basename(p) for p in rank1) == ["zero_pp_rank_1_mp_rank_00_model_states.pt",
                                                          "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    # and checksums them for the marker, which records a CRC-32 of every file it lists
    path = os.path.dirname(ds)
    marker = ckpt.marker_of(path)
    assert marker["crc32"].keys() == marker["files"].keys() and not ckpt.damaged_files(path)


def test_a_damaged_optimizer_partition_is_refused_by_path_and_set_aside_by_auto(straight, tmp_path):
    """Bytes flipped in rank 1's Adam state of step 24 (same size: complete by its marker's sizes) resumed silently
    from a corrupted optimizer. resume=PATH now exits 2 naming the file; resume=auto sets the checkpoint aside and
    continues from step 18, exactly as the uninterrupted run did from there."""
    import shutil

    ref_dir, _ = straight
    run_dir = tmp_path / "copy"
    shutil.copytree(ref_dir, run_dir)
    ckpt_dir = run_dir / "checkpoints"
    damaged = ckpt_dir / ckpt.step_name(STEPS) / "ds" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2: len(data) // 2 + 8] = bytes(b ^ 0x5A for b in data[len(data) // 2: len(data) // 2 + 8])
    damaged.write_bytes(bytes(data))
    assert ckpt.is_complete(str(ckpt_dir / ckpt.step_name(STEPS)))

    codes, out = srun_like(run_dir, *RUN, f"resume={ckpt_dir / ckpt.step_name(STEPS)}")
    assert codes == [2, 2], out[-4000:]
    assert f"key 'resume': {ckpt_dir / ckpt.step_name(STEPS)} is damaged: {damaged}: its bytes changed" in out, out[-4000:]
    assert "Traceback" not in out and "resumed from" not in out
    assert checkpoint_names(run_dir) == ["latest", ckpt.step_name(18) + "*", ckpt.step_name(STEPS) + "*"]

    code, out = torchrun(run_dir, *RUN)
    assert code == 0, out[-4000:]
    (aside,) = [n for n in os.listdir(ckpt_dir) if n.startswith("damaged-")]
    assert aside.startswith(f"damaged-{ckpt.step_name(STEPS)}-")
    assert f"checkpoint {ckpt_dir / ckpt.step_name(STEPS)} is damaged: {damaged}" in out and aside in out
    assert f"resumed from {ckpt_dir / ckpt.step_name(18)} at step 18" in out
    assert (ckpt_dir / aside / "ds" / damaged.name).read_bytes() == bytes(data)  # kept whole for inspection
    assert open(ckpt_dir / "latest").read().strip() == ckpt.step_name(STEPS)  # the new step 24
    final, ref = adapters(run_dir, STEPS), adapters(ref_dir, STEPS)
    assert all(torch.equal(final[k], ref[k]) for k in ref)
    client, run = mlflow_run(run_dir)  # the run continued: steps 20 and 24 trained again, not logged twice
    ref_client, ref_run = mlflow_run(ref_dir)
    for key in ("loss", "grad_norm", "lr"):
        assert steps_logged(client, run, key) == steps_logged(ref_client, ref_run, key) == LOGGED, key
        assert metric(client, run, key) == metric(ref_client, ref_run, key), key


def test_auto_falls_back_only_to_a_checkpoint_this_run_can_continue_and_never_to_a_fresh_start(straight, tmp_path):
    """The start-up checks read the newest checkpoint's train state; when that one fails its CRC-32, resume=auto
    falls back in the trainer. The older one it takes is checked the same way (another ZeRO stage here: DeepSpeed's
    assertion before), and with every checkpoint damaged the run stops instead of training from step 0 again."""
    import shutil

    def flip(path):
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x5A
        path.write_bytes(bytes(data))

    run_dir = tmp_path / "copy"
    shutil.copytree(straight[0], run_dir)
    ckpt_dir = run_dir / "checkpoints"
    flip(ckpt_dir / ckpt.step_name(STEPS) / "train_state" / "rank-00000.json")
    codes, out = srun_like(run_dir, *RUN, "train.zero_stage=2")
    assert codes == [2, 2], out[-4000:]
    assert (f"resume=auto fell back to {ckpt_dir / ckpt.step_name(18)}, which this run cannot continue: key "
            "'train.zero_stage': 2 here, 3 in") in out, out[-4000:]
    assert "Traceback" not in out
    flip(ckpt_dir / ckpt.step_name(18) / "ds" / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    codes, out = srun_like(run_dir, *RUN)
    assert codes == [2, 2], out[-4000:]
    assert f"key 'resume': no intact checkpoint left in {ckpt_dir}" in out and "resume=never" in out, out[-4000:]
    assert not list(ckpt_dir.glob("step-*")) and len(list(ckpt_dir.glob("damaged-step-*"))) == 2
    codes, out = srun_like(run_dir, *RUN)  # launched again: refused as well, not a silent start from step 0
    assert codes == [2, 2] and "only damaged ones set aside" in out, out[-4000:]


def test_sigterm_to_a_ranks_process_group_with_data_workers_checkpoints_and_exits_42(preempted):
    out = preempted["out1"]
    assert preempted["codes1"] == [REQUEUE_EXIT_CODE] * 2, out[-4000:]
    workers = re.search(r"toy: SIGTERM to process group \d+: rank 1 and data workers \[([\d, ]+)\]", out)
    assert workers and len(workers.group(1).split(",")) == 2, out[-4000:]
    assert "received SIGTERM" in out and "checkpointed step 8, exiting 42 for requeue" in out
    assert "DataLoader worker" not in out
    assert preempted["after1"] == ["latest", ckpt.step_name(6) + "*", ckpt.step_name(8) + "*"]


def test_stop_during_start_up_exits_42_without_a_checkpoint(preempted):
    out = preempted["out2"]
    assert preempted["codes2"] == [REQUEUE_EXIT_CODE] * 2, out[-4000:]
    assert "stop requested (SIGUSR1 on some rank) before the first step: exiting 42" in out
    assert preempted["after2"] == preempted["after1"]  # nothing written; the requeue resumes from step 8


def _listening(port: int) -> bool:
    """Whether a socket on this machine listens on TCP `port` (/proc/net/tcp and tcp6: local address, state 0A)."""
    rows = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            rows += [line.split() for line in f.readlines()[1:]]
    return any(r[1].endswith(f":{port:04X}") and r[3] == "0A" for r in rows)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_while_waiting_for_ranks_that_never_come_ends_the_rank_at_once(tmp_path, sig, sigint_as_in_a_terminal):
    """Rank 0 of 2 with no rank 1 waits in the rendezvous inside C++, where Python's handlers do not run: SIGTERM
    (scancel, timeout) and Ctrl-C, twice, were ignored until the rendezvous timed out (30 minutes). It stops at once
    now, exit 42, nothing written."""
    from launch_utils import _port

    port = _port()
    # PYTHONFAULTHANDLER: a rank that does not stop is made to print every thread's stack (SIGABRT) for the message
    env = _env({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                "PYTHONFAULTHANDLER": "1"})
    proc = subprocess.Popen([sys.executable, "-m", "one4d_train.cli", "train", f"run_dir={tmp_path / 'run'}", *RUN],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # SIGINT: a handler here, so the default in the child
    try:
        deadline = time.time() + 120
        while not _listening(port) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)  # rank 0's store: it waits for rank 1 from now on
        assert proc.poll() is None and _listening(port), proc.communicate(timeout=5)[0][-3000:]
        time.sleep(1)
        os.kill(proc.pid, sig)
        try:
            out = proc.communicate(timeout=30)[0]
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGABRT)
            stacks = proc.communicate(timeout=30)[0][-6000:]
            pytest.fail(f"still running 30 s after {signal.Signals(sig).name}:\n{stacks}")
    finally:
        if proc.poll() is None:
            kill_job(proc)
    assert proc.returncode == REQUEUE_EXIT_CODE, out[-3000:]
    assert f"one4d train: {signal.Signals(sig).name} while waiting for the other ranks to start: stopping (exit 42)" in out
    assert "Traceback" not in out and not (tmp_path / "run" / "checkpoints").exists()


def test_a_stop_that_came_before_the_wait_for_the_ranks_ends_it_at_once():
    """A stop asked for during the imports (its flag set, no wakeup byte written) ended nothing: the rank then
    waited for ranks that never came as long as the rendezvous allowed."""
    code = ("import os, signal, time\n"
            "from one4d_train.train import distributed, preemption\n"
            "preemption.install()\n"
            "os.kill(os.getpid(), signal.SIGUSR1)\n"
            "time.sleep(0.1)\n"  # the handler runs: the flag is set
            "with distributed.stop_ends_the_wait('the other ranks to start'):\n"
            "    time.sleep(60)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == REQUEUE_EXIT_CODE, proc.stdout + proc.stderr
    assert "one4d train: SIGUSR1 before waiting for the other ranks to start: stopping (exit 42)" in proc.stderr


def test_preemption_checkpoints_requeues_and_resumes_exactly(straight, preempted):
    ref_dir, _ = straight
    run_dir, out1, out3 = preempted["run_dir"], preempted["out1"], preempted["out3"]
    assert "resumed from" in out3 and ckpt.step_name(8) in out3
    # the evaluation due at step 8 was left for after the requeue, and ran there first
    assert "evaluation of step 8 left for after the requeue" in out1 and "eval step 8" not in out1
    assert out3.index("eval step 8") < out3.index("step 10/")
    # three launches appended to one MLflow run; the same metrics as the uninterrupted run, the log window of
    # steps 6-10 included, which the stop at step 8 cut in two
    client, run = mlflow_run(run_dir)
    ref_client, ref_run = mlflow_run(ref_dir)
    for key in COMPARED:
        assert metric(client, run, key) == metric(ref_client, ref_run, key), key
    # no step lost or repeated, same data order on every rank, with and without data workers
    for rank in (0, 1):
        steps = [r["step"] for r in trace(run_dir, rank)]
        assert steps == [s for s in range(1, STEPS + 1) for _ in range(2)]
        assert trace(run_dir, rank) == trace(ref_dir, rank)
    # final trainable weights bit-exact
    final, ref = from_zero(os.path.join(run_dir, "checkpoints", ckpt.step_name(STEPS))), adapters(ref_dir, STEPS)
    assert final.keys() == ref.keys() and all(torch.equal(final[k], ref[k]) for k in ref)


def test_export_adapters_false_writes_no_adapters(preempted):
    run_dir = preempted["run_dir"]
    for step in (18, 24):  # written by the launch with train.export_adapters=false
        path = os.path.join(run_dir, "checkpoints", ckpt.step_name(step))
        assert ckpt.is_complete(path) and not os.path.exists(os.path.join(path, "adapters"))
    client, run = mlflow_run(run_dir)
    assert "adapters" not in {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "adapters not exported (train.export_adapters=false)" in preempted["out3"]


@pytest.fixture(scope="module")
def killed(tmp_path_factory):
    """A run killed (-9) while it writes its step-12 checkpoint, then resumed to the end."""
    run_dir = tmp_path_factory.mktemp("killed")
    proc = torchrun(run_dir, *RUN, extra_env={ckpt.TEST_SLEEP_ENV: "12:120"}, wait=False)
    tmp_adapters = os.path.join(run_dir, "checkpoints", ".tmp-" + ckpt.step_name(12), "adapters", "adapter.safetensors")
    deadline = time.time() + 300
    while not os.path.exists(tmp_adapters):
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()[-4000:] if proc.poll() is not None else ""
        time.sleep(0.5)
    kill_job(proc)  # every process of the job, as a node failure would
    proc.communicate(timeout=60)
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    chosen = ckpt.resolve_resume("auto", ckpt_dir)
    code, out = torchrun(run_dir, *RUN)
    assert code == 0, out[-4000:]
    return {"run_dir": run_dir, "chosen": chosen, "out": out, "final": adapters(run_dir, STEPS),
            "names": checkpoint_names(run_dir)}


def test_kill_during_checkpoint_write_resumes_from_previous(straight, killed):
    ref_dir, _ = straight
    assert killed["chosen"].endswith(ckpt.step_name(6))
    assert "resumed from" in killed["out"] and ckpt.step_name(6) in killed["out"]
    final, ref = killed["final"], adapters(ref_dir, STEPS)
    assert all(torch.equal(final[k], ref[k]) for k in ref)
    assert not [n for n in killed["names"] if n.startswith(".tmp-")]


def test_resume_from_an_earlier_checkpoint_branches_with_this_configs_optimizer(killed):
    """Resume the finished run from its step 18 with another lr, schedule, step count and AdamW settings: step 24
    (the old timeline) is moved aside, not picked by resume=auto nor pruned in place of the new ones, and the new
    config drives the optimizer from step 19 on."""
    run_dir = killed["run_dir"]
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    old = adapters(run_dir, 24)
    code, out = torchrun(run_dir, *RUN, f"resume={os.path.join(ckpt_dir, ckpt.step_name(18))}", "train.steps=22",
                         "optim.lr=0.01", "optim.min_lr_ratio=0.5", "optim.weight_decay=0.05", "optim.betas=[0.8,0.99]")
    assert code == 0, out[-4000:]
    (aside,) = [n for n in os.listdir(ckpt_dir) if n.startswith("abandoned-")]
    assert "belong to an abandoned timeline" in out and aside in out
    assert sorted(n for n in os.listdir(ckpt_dir) if n.startswith("step-")) == [ckpt.step_name(18), ckpt.step_name(22)]
    assert ckpt.resolve_resume("auto", ckpt_dir).endswith(ckpt.step_name(22))
    assert open(os.path.join(ckpt_dir, "latest")).read().strip() == ckpt.step_name(22)
    moved = os.path.join(ckpt_dir, aside, ckpt.step_name(24))  # kept whole
    assert ckpt.is_complete(moved)
    assert all(torch.equal(old[k], v) for k, v in load_file(os.path.join(moved, "adapters", "adapter.safetensors")).items())
    for change in ("optim.lr: 0.03 -> 0.01", "train.steps: 24 -> 22", "optim.min_lr_ratio: 0.1 -> 0.5",
                   "optim.weight_decay: 0.0 -> 0.05", "optim.betas: (0.9, 0.999) -> (0.8, 0.99)"):
        assert change in out, change
    schedule = WarmupSchedule(3, 22, "cosine", 0.5)
    # the branch logs into a new MLflow run naming its origin; the first keeps the abandoned timeline alone
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{run_dir}/mlflow.db")
    first, branch = sorted(client.search_runs([client.get_experiment_by_name("one4d").experiment_id]),
                           key=lambda r: r.info.start_time)
    assert branch.data.tags["one4d.branched_from_run"] == first.info.run_id
    assert branch.data.tags["one4d.branched_at_step"] == "18"
    lr = metric(client, branch, "lr")
    assert sorted(lr) == [20, 22]  # log_every=5, and the last step
    assert {s: lr[s] for s in (20, 22)} == {s: pytest.approx(0.01 * schedule(s - 1), rel=1e-12) for s in (20, 22)}
    old_schedule = WarmupSchedule(3, 24, "cosine", 0.1)
    old_lr = client.get_metric_history(first.info.run_id, "lr")
    assert 22 not in {m.step for m in old_lr} and 24 in {m.step for m in old_lr}
    assert all(m.value == pytest.approx(0.03 * old_schedule(19), rel=1e-12) for m in old_lr if m.step == 20)
    for rank in (0, 1):
        (group,) = _optim_state(run_dir, 22, rank)["optimizer_state_dict"]["param_groups"]
        assert (group["lr"], group["weight_decay"], tuple(group["betas"])) == (
            pytest.approx(0.01 * schedule(22)), 0.05, (0.8, 0.99))


def _optim_state(run_dir, step, rank):
    ds = os.path.join(run_dir, "checkpoints", ckpt.step_name(step), "ds")
    # DeepSpeed prefixes bf16 ZeRO-1/2 optimizer files with "bf16_"
    (path,) = [os.path.join(ds, f) for f in os.listdir(ds) if f.endswith(f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")]
    with torch.serialization.safe_globals(ckpt._safe_globals()):
        return torch.load(path, weights_only=True)["optimizer_state_dict"]


def _tensors(obj, prefix=""):
    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    if isinstance(obj, dict):
        return {k2: v2 for k, v in obj.items() for k2, v2 in _tensors(v, f"{prefix}/{k}").items()}
    if isinstance(obj, (list, tuple)):
        return {k2: v2 for i, v in enumerate(obj) for k2, v2 in _tensors(v, f"{prefix}/{i}").items()}
    return {}


@pytest.mark.parametrize("engine", [[], ["train.zero_stage=2", "train.precision=bf16"]], ids=["zero3-fp32", "zero2-bf16"])
def test_nan_steps_are_skipped_on_all_ranks_then_stop(tmp_path, engine):
    # zero2-bf16: the shipped configs' engine, whose non-finite check is one4d_train.train.grad_checks'
    run_dir = tmp_path / "nan"
    args = COMMON + ["train.steps=12", "train.checkpoint_every=1", "train.keep_last=20", "optim.warmup_steps=6",
                     "optim.lr=0.01", "train.max_bad_steps=3", "train.log_every=1"] + engine
    codes, out = srun_like(run_dir, *args, extra_env={"TOY_NAN_STEPS": "3,6,7,8", "TOY_NAN_RANK": "1"})
    assert codes == [EXIT_BAD_STEPS] * 2, out[-4000:]
    assert "3 consecutive non-finite steps" in out and "train.max_bad_steps=3" in out
    client, run = mlflow_run(run_dir)
    assert run.info.status == "FAILED"
    assert metric(client, run, "skipped_steps") == {1: 0, 2: 0, 3: 1, 4: 1, 5: 1, 6: 2, 7: 3, 8: 4}
    # the lr each step used: the skipped steps 3, 6, 7 did not advance the warmup (1/6 of 0.01 per applied step)
    applied_before = {1: 0, 2: 1, 3: 2, 4: 2, 5: 3, 6: 4, 7: 4}  # step 8, the third bad one in a row, stops the run
    assert metric(client, run, "lr") == {s: pytest.approx(0.01 * (n + 1) / 6, rel=1e-12) for s, n in applied_before.items()}
    assert 3 not in metric(client, run, "loss")
    # the skipped step moved neither the weights nor Adam's moments/step count, on either rank
    assert all(torch.equal(adapters(run_dir, 2)[k], adapters(run_dir, 3)[k]) for k in adapters(run_dir, 2))
    assert not all(torch.equal(adapters(run_dir, 3)[k], adapters(run_dir, 4)[k]) for k in adapters(run_dir, 3))
    for rank in (0, 1):
        before, after = _tensors(_optim_state(run_dir, 2, rank)), _tensors(_optim_state(run_dir, 3, rank))
        assert before.keys() == after.keys() and any("exp_avg" in k for k in before)
        assert all(torch.equal(before[k], after[k]) for k in before)
    assert not os.path.exists(os.path.join(run_dir, "checkpoints", ckpt.step_name(8)))


def test_optimizer_state_offloaded_to_the_host_trains(tmp_path):
    """`offload_optimizer.device: cpu`, an override the README offers, passed every check and then failed in
    DeepSpeed's engine build (ZeRO-Offload refused the trainer's torch AdamW): the state now steps where it lives."""
    run_dir = tmp_path / "offloaded"
    code = subprocess.run([sys.executable, "-m", "one4d_train.cli", "train", f"run_dir={run_dir}", *COMMON,
                           "train.zero_stage=2", "train.steps=12", "train.checkpoint_every=100", "train.log_every=1",
                           "train.micro_batch_size=8", "optim.lr=0.03",
                           "train.deepspeed_overrides={zero_optimization: {offload_optimizer: {device: cpu}}}"],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=400)
    out = code.stdout + code.stderr
    assert code.returncode == 0, out[-4000:]
    assert "deepspeed override: zero_optimization.offload_optimizer" in out, out[-4000:]
    loss = metric(*mlflow_run(run_dir), "loss")
    assert sum(loss[s] for s in (10, 11, 12)) < sum(loss[s] for s in (1, 2, 3)) / 2, loss


def test_zero2_single_plain_process_bf16(tmp_path):
    run_dir = tmp_path / "zero2"
    env = _env()
    code = subprocess.run([sys.executable, "-m", "one4d_train.cli", "train", f"run_dir={run_dir}", *COMMON,
                           "train.zero_stage=2", "train.precision=bf16", "train.steps=16", "train.checkpoint_every=8",
                           "train.log_every=1",
                           "train.micro_batch_size=8", "train.peak_flops_per_device=1e9",
                           "optim.lr=0.03", "train.deepspeed_overrides={zero_optimization: {overlap_comm: false}}",
                           "model.vae=weights/vae", "eval.dataset=sintel:../sintel"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    out = code.stdout + code.stderr
    assert code.returncode == 0, out[-4000:]
    assert "deepspeed override: zero_optimization.overlap_comm: True -> False" in out
    assert "done: 16 steps, 0 steps skipped (non-finite loss or gradients); MLflow store" in out  # not samples
    # the run's config names its files from anywhere: the evaluation and export read it in other folders
    stored = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert stored["model"]["vae"] == os.path.join(ROOT, "weights", "vae")
    assert stored["eval"]["dataset"] == "sintel:" + os.path.join(os.path.dirname(ROOT), "sintel")
    client, run = mlflow_run(run_dir)
    loss = metric(client, run, "loss")
    first, last = sum(loss[s] for s in (1, 2, 3)) / 3, sum(loss[s] for s in (14, 15, 16)) / 3
    assert last < first / 2, loss
    # exported from the optimizer's fp32 masters, not the bf16 module copy the forward uses
    w = adapters(run_dir, 16)["adapter_up.weight"]
    assert w.dtype == torch.float32 and (w.to(torch.bfloat16).float() != w).any()
    mfu = metric(client, run, "mfu")  # logged against the configured peak on CPU
    assert sorted(mfu) == list(range(1, 17)) and all(0 < v < 1 for v in mfu.values())


@pytest.fixture
def sigint_as_in_a_terminal():
    """SIGINT as a terminal's foreground process has it (Python's KeyboardInterrupt): a suite started in the
    background (`cmd &` in a script) inherits it ignored, and the trainer rightly leaves an ignored SIGINT alone."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)  # a child's, before it runs Python
    signal.signal(signal.SIGINT, previous)


def test_ctrl_c_checkpoints_and_exits_42_a_second_stops_at_once(tmp_path, capsys, monkeypatch,
                                                                 sigint_as_in_a_terminal):
    """Ctrl-C reaches the whole foreground group (the trainer and its data workers): it was a KeyboardInterrupt
    traceback and the steps since the last checkpoint were lost. Now a first one stops as SIGTERM does (checkpoint,
    exit 42: the same command resumes); a second one stops at once, with one line and the shell's 130 (it was a
    traceback and exit 1), during an evaluation too (where the two merged into one, after it)."""
    from one4d_train.train.preemption import Preemption

    run_dir = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "one4d_train.cli", "train", f"run_dir={run_dir}", *COMMON,
                        "train.zero_stage=2", "train.steps=16", "train.checkpoint_every=100", "train.log_every=1"],
                       cwd=ROOT, env={**_env(), "TOY_WORKERS": "2", "TOY_SIGNAL_AT": "5:0:INT:group"},
                       capture_output=True, text=True, timeout=400, start_new_session=True,  # its own group
                       preexec_fn=sigint_as_in_a_terminal)
    out = r.stdout + r.stderr
    assert r.returncode == REQUEUE_EXIT_CODE, out[-4000:]
    assert "received SIGINT: will checkpoint and exit after the current step (Ctrl-C again" in out
    assert "Traceback" not in out and "DataLoader worker" not in out, out[-4000:]
    stopped = int(re.search(r"checkpointed step (\d+), exiting 42", out).group(1))
    assert 5 <= stopped < 16 and checkpoint_names(run_dir)[-1] == ckpt.step_name(stopped) + "*"

    # two during an evaluation (which blocks the stop signals, and so merged them into one after it, 42): at once
    started = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "one4d_train.cli", "train", f"run_dir={tmp_path / 'evaluating'}",
                        *COMMON, "train.zero_stage=2", "train.steps=4", "eval.every=2"],
                       cwd=ROOT, env={**_env(), "TOY_EVAL_SLEEP": "120", "TOY_SIGNAL_AT": "2:0:INT:eval,2:0:INT:eval"},
                       capture_output=True, text=True, timeout=400, start_new_session=True,
                       preexec_fn=sigint_as_in_a_terminal)
    out = r.stdout + r.stderr
    assert r.returncode == 130 and time.monotonic() - started < 100, out[-4000:]
    assert "one4d train: interrupted (no checkpoint of the steps since the last one" in r.stderr
    assert "Traceback" not in out, out[-4000:]

    previous = {sig: signal.getsignal(sig) for sig in Preemption.SIGNALS}
    try:
        stop = Preemption().install()
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.received == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # ignored from the start (`cmd &` in a script): left so
        Preemption().install()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    from one4d_train import cli

    def interrupted(name):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli.importlib, "import_module", interrupted)
    assert cli.main(["eval", "checkpoint=x"]) == 130
    assert capsys.readouterr().err == "one4d eval: interrupted\n"


def test_logged_throughput_leaves_out_checkpoints_and_evaluation(tmp_path):
    """Samples/s, step time and MFU are the training steps' own: a checkpoint or an evaluation between two log
    lines does not count as step time (here every evaluation takes 1 s more, a toy step a few ms: a window that
    counted it would take longer than the 1 s bound below)."""
    run_dir = tmp_path / "timed"
    code = subprocess.run([sys.executable, "-m", "one4d_train.cli", "train", f"run_dir={run_dir}", *COMMON,
                           "train.zero_stage=2", "train.steps=6", "train.checkpoint_every=2", "train.log_every=1",
                           "eval.every=2", "train.micro_batch_size=8", "train.peak_flops_per_device=1e9",
                           "train.deepspeed_overrides={zero_optimization: {overlap_comm: false}}"],
                          cwd=ROOT, env=_env({"TOY_EVAL_SLEEP": "1"}), capture_output=True, text=True, timeout=400)
    assert code.returncode == 0, (code.stdout + code.stderr)[-4000:]
    client, run = mlflow_run(run_dir)
    assert sorted(metric(client, run, "eval/eval_loss")) == [2, 4, 6]
    step_time, samples, mfu = (metric(client, run, k) for k in ("step_time_s", "samples_per_s", "mfu"))
    assert sorted(step_time) == list(range(1, 7))
    for step in (3, 5):  # the windows right after an evaluation and a checkpoint
        assert step_time[step] < 1.0, step_time
        assert samples[step] == pytest.approx(8 / step_time[step], rel=1e-6)
        assert mfu[step] / samples[step] == pytest.approx(mfu[1] / samples[1], rel=1e-6)  # MFU from the same rate


def test_resume_from_another_runs_checkpoint_records_into_a_new_mlflow_run_of_this_run(tmp_path):
    """A run started from another run's checkpoint (resume=PATH into a new run_dir) keeps its steps and weights, but
    that run's MLflow run lives in the other store (or is the other run's, on a shared server): a new one is started."""
    def train(run_dir, *args):
        r = subprocess.run([sys.executable, "-m", "one4d_train.cli", "train", f"run_dir={run_dir}", *COMMON,
                            "train.zero_stage=2", "train.log_every=1", *args],
                           cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=400)
        return r.returncode, r.stdout + r.stderr

    first, second = tmp_path / "first", tmp_path / "second"
    code, out = train(first, "train.steps=2", "train.checkpoint_every=2")
    assert code == 0, out[-4000:]
    code, out = train(second, f"resume={first / 'checkpoints' / ckpt.step_name(2)}", "train.steps=4",
                      "train.checkpoint_every=4")
    assert code == 0, out[-4000:]
    client, run = mlflow_run(second)
    assert sorted(metric(client, run, "loss")) == [3, 4] and run.info.status == "FINISHED"
    client, run = mlflow_run(first)
    assert sorted(metric(client, run, "loss")) == [1, 2] and run.info.status == "FINISHED"


def test_bad_config_exits_2_before_any_process_group(capsys):
    import torch.distributed as dist

    from one4d_train.train.main import main

    assert main(["train.zero_stage=1", "train.task=tests.train_toy_task:ToyTask"]) == 2
    assert "train.zero_stage" in capsys.readouterr().err
    assert main(["--local_rank=0", "train.task=nocolon"]) == 2  # the deepspeed launcher's argument is dropped
    assert "train.task" in capsys.readouterr().err
    from one4d_train.cli import main as one4d_main  # `deepspeed --module one4d_train.cli train ...` puts it first
    assert one4d_main(["--local_rank=1", "train", "train.task=nocolon"]) == 2
    assert "train.task" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["train.device=cuda", "train.task=tests.train_toy_task:ToyTask"]) == 2
        assert "train.device" in capsys.readouterr().err
    assert not dist.is_initialized()
    assert main(["--help"]) == 0 and "resume=auto" in capsys.readouterr().out


def test_launcher_detection():
    torchrun_env = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "n1", "MASTER_PORT": "1234",
                    "SLURM_PROCID": "0", "SLURM_NTASKS": "2"}
    d = distributed.detect(torchrun_env)
    assert (d.rank, d.world_size, d.local_rank, d.launcher, d.master_addr, d.master_port) == (3, 8, 1, "torchrun", "n1", 1234)
    slurm = {"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "5", "SLURM_JOB_ID": "777", "MASTER_ADDR": "gpu01"}
    d = distributed.detect(slurm)
    assert (d.rank, d.world_size, d.local_rank, d.launcher, d.master_addr) == (5, 16, 5, "slurm", "gpu01")
    assert d.master_port == distributed.detect(dict(slurm, SLURM_PROCID="0")).master_port  # same on every task
    # without MASTER_PORT: the port slurm/train.sbatch exports, from the same formula
    assert d.master_port == 20777
    sbatch = open(os.path.join(ROOT, "slurm", "train.sbatch")).read()
    base, span = re.search(r"MASTER_PORT=\$\(\( (\d+) \+ SLURM_JOB_ID % (\d+) \)\)", sbatch).groups()
    assert (int(base), int(span)) == (distributed.PORT_BASE, distributed.PORT_SPAN)
    # every port of the range lies below Linux's default ephemeral ports (32768-60999), which outgoing connections hold
    assert distributed.PORT_BASE + distributed.PORT_SPAN - 1 < 32768
    d = distributed.detect({})
    assert (d.rank, d.world_size, d.launcher) == (0, 1, "single") and d.master_port > 0
    assert distributed.launch_problem(torchrun_env) is None and distributed.launch_problem(slurm) is None


@pytest.mark.parametrize("env, said", [
    ({"RANK": "abc", "WORLD_SIZE": "1"}, "environment variable RANK='abc' is not a whole number"),
    ({"RANK": "", "WORLD_SIZE": "1"}, "environment variable RANK='' is not a whole number"),
    ({"RANK": "0", "WORLD_SIZE": "0"}, "RANK=0 and WORLD_SIZE=0: the rank must be below the number of processes"),
    ({"RANK": "1", "WORLD_SIZE": "1"}, "RANK=1 and WORLD_SIZE=1: the rank must be below"),
    ({"MASTER_PORT": "abc"}, "MASTER_PORT='abc' is not a whole number"),
    ({"MASTER_PORT": "70000"}, "MASTER_PORT=70000 is not a TCP port"),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_JOB_ID": "abc", "MASTER_ADDR": "h"}, "SLURM_JOB_ID='abc'"),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}, "neither MASTER_ADDR nor SLURM_JOB_NODELIST"),
])
def test_launcher_variables_that_do_not_read_are_named_before_anything_starts(env, said, monkeypatch, capsys):
    """ValueError/KeyError tracebacks before; WORLD_SIZE=0 was blamed on data.num_workers of the data config; a rank
    at or past the world size passed every check and waited for the rendezvous until its timeout."""
    from one4d_train.train.main import main

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_JOB_ID",
                 "MASTER_ADDR", "SLURM_JOB_NODELIST"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(["train.task=tests.train_toy_task:ToyTask", "train.device=cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("launch error: ") and said in err, err


def test_the_step_line_says_skipped_steps_not_samples():
    """Next to the data line's skipped samples, a bare "skipped 2" read as samples too."""
    from one4d_train.train.metrics import format_line

    perf = {"samples_per_s": 1.0, "tokens_per_s": 2.0, "data_wait_frac": 0.5}
    assert format_line(3, 10, {"loss": 1.0}, 1e-4, 0.5, perf, 2).endswith("| data 50% | 2 steps skipped")
    assert "skipped" not in format_line(3, 10, {"loss": 1.0}, 1e-4, 0.5, perf, 0)
    # the host memory activation offload holds, where it is on
    perf.update(peak_mem_gib=60.0, host_offload_gib=83.25)
    assert format_line(3, 10, {"loss": 1.0}, 1e-4, 0.5, perf, 0).endswith("| mem 60.0 GiB | host offload 83.2 GiB")
    # allocator retries in the window (GPU memory at its ceiling), said only where there were some
    perf.update(alloc_retries=0)
    assert "retries" not in format_line(3, 10, {"loss": 1.0}, 1e-4, 0.5, perf, 0)
    perf.update(alloc_retries=16)
    assert format_line(3, 10, {"loss": 1.0}, 1e-4, 0.5, perf, 0).endswith("| host offload 83.2 GiB | 16 allocator retries")


def test_allocator_retries_are_counted_per_window_and_warned_of_once_past_the_first():
    """The trainer's windows: the count since the last log line; a warning naming the settings that hold less on the
    GPU, once a run, not for the first window (compilation and warm-up)."""
    from one4d_train.train.metrics import AllocRetries

    watch = AllocRetries()
    assert watch.window(5) == 5 and watch.warning(5, 10) is None  # the first window: not warned of
    assert watch.window(5) == 0 and watch.warning(0, 10) is None
    assert watch.window(21) == 16
    line = watch.warning(16, 8)
    assert line.startswith("GPU memory at its ceiling: the CUDA allocator retried 16 times in the last 8 steps")
    for key in ("model.activation_checkpointing_blocks", "model.activation_offload_blocks", "model.text_encoder_device"):
        assert key in line
    assert watch.window(30) == 9 and watch.warning(9, 8) is None  # once


def test_the_data_line_tells_short_clips_from_corrupt_samples():
    """A clip shorter than the frame window is skipped at every epoch, but it is no corrupt sample: the line said
    "corrupt or undecodable" for all of them."""
    from one4d_train.train.metrics import data_skips_line

    assert data_skips_line(10, 10) == ("data: 10 samples skipped so far (all ranks): 10 shorter than the frame window; "
                                       "each is logged with its shard, key and reason by the readers")
    assert data_skips_line(3, 1).startswith("data: 3 samples skipped so far (all ranks): 1 shorter than the frame "
                                            "window, 2 corrupt or undecodable; ")
    assert "shorter" not in data_skips_line(2, 0) and "2 corrupt or undecodable" in data_skips_line(2, 0)


def test_deepspeed_config_generated_and_overrides_reported():
    from one4d_train.config import load_config

    cfg = load_config(["train.micro_batch_size=2", "train.grad_accum=4", "train.precision=bf16", "optim.grad_clip=0.5",
                       "train.deepspeed_overrides={zero_optimization: {reduce_bucket_size: 1000}, bf16: {enabled: true}}"])
    ds, changed = deepspeed_config.build(cfg, world_size=8)
    assert ds["train_batch_size"] == 64 and ds["gradient_accumulation_steps"] == 4 and ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"]["stage"] == 3 and ds["zero_optimization"]["reduce_bucket_size"] == 1000
    assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is False
    assert ds["zero_allow_untested_optimizer"] is True and ds["bf16"] == {"enabled": True}
    assert changed == ["zero_optimization.reduce_bucket_size: '<unset>' -> 1000"]


def test_the_entry_point_catches_stop_signals_before_importing_the_trainer(monkeypatch, sigint_as_in_a_terminal):
    """Importing the trainer (torch, DeepSpeed...) takes seconds; a USR1 from the Slurm script in that time must
    be a requested stop, not a killed rank, so `one4d train` installs the handler before any of it."""
    import importlib

    from one4d_train import cli
    from one4d_train.train import preemption

    seen = {}

    def import_module(name):
        seen[name] = {s: signal.getsignal(s) for s in preemption.Preemption.SIGNALS}
        raise ImportError("stop here")

    monkeypatch.setattr(preemption, "_process", None)
    previous = {s: signal.getsignal(s) for s in preemption.Preemption.SIGNALS}
    monkeypatch.setattr(importlib, "import_module", import_module)
    try:
        with pytest.raises(ImportError, match="stop here"):
            cli.main(["train", "config=x.yaml"])
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    handlers = seen["one4d_train.train.main"]
    assert preemption._process is not None, "no handler installed before the trainer's import"
    assert all(getattr(h, "__func__", None) is preemption.Preemption._handle
               and h.__self__ is preemption._process for h in handlers.values()), handlers


def test_resume_with_another_batch_size_counts_the_samples_the_steps_took(tmp_path):
    """train.micro_batch_size may change on resume (the global batch with it): the checkpoint's samples_seen is the
    sum over the steps of each step's global batch, not the step count times the current one."""
    def train(*args):
        r = subprocess.run([sys.executable, "-m", "one4d_train.cli", "train", f"run_dir={tmp_path}", *COMMON,
                            "train.zero_stage=2", "train.log_every=1", *args],
                           cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=400)
        assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]

    train("train.steps=2", "train.checkpoint_every=2", "train.micro_batch_size=8")
    train("train.steps=5", "train.checkpoint_every=5", "train.micro_batch_size=2", "train.grad_accum=2")
    state = json.load(open(os.path.join(tmp_path, "checkpoints", ckpt.step_name(5), "train_state", "rank-00000.json")))
    assert state["step"] == 5 and state["samples_seen"] == 2 * 8 + 3 * 4


def test_an_evaluation_cut_short_after_its_checkpoint_runs_on_resume_and_a_finished_one_does_not(tmp_path):
    """The checkpoint of an evaluation step is written before the evaluation runs: a job killed in between left the
    evaluation undone for good (the checkpoint owed none). It is owed now until its marker says it finished; its
    partial outputs are cleared first (nothing stale uploaded), and a finished one is not run again."""
    args = ["train.steps=8", "train.checkpoint_every=4", "train.log_every=1", "eval.every=4", "optim.lr=0.03"]
    code, out = single(tmp_path, *args, extra_env={"TOY_EVAL_SLEEP": "60"},
                       kill_after=(rf"checkpoint .*{ckpt.step_name(4)}", 2))
    assert code == -signal.SIGKILL and "eval step 4" not in out, out[-4000:]
    stale = tmp_path / "eval" / ckpt.step_name(4) / "stale.json"  # what an evaluation cut short may leave
    stale.parent.mkdir(parents=True, exist_ok=True)
    stale.write_text("{}")
    code, out = single(tmp_path, *args, extra_env={"TOY_SIGNAL_AT": "6:0:KILL"})
    assert code == -signal.SIGKILL and f"{ckpt.step_name(4)} at step 4" in out, out[-4000:]
    assert out.index("eval step 4: eval_loss") < out.index("step 5/")
    assert not stale.exists()
    code, out = single(tmp_path, *args)  # from step 4 again: its evaluation finished, nothing is owed
    assert code == 0 and f"{ckpt.step_name(4)} at step 4" in out, out[-4000:]
    assert "eval step 4: finished before this job" in out and "eval step 4: eval_loss" not in out
    assert "eval step 8: eval_loss" in out
    client, run = mlflow_run(tmp_path)
    assert steps_logged(client, run, "eval/eval_loss") == [4, 8]
    assert {a.path for a in client.list_artifacts(run.info.run_id, f"eval/{ckpt.step_name(4)}")} == {
        f"eval/{ckpt.step_name(4)}/eval.json"}


def test_a_resume_under_another_optimizer_state_layout_exits_2_naming_the_key(tmp_path):
    """ZeRO-2's round_robin_gradients orders the parameters in the flat partitions that DeepSpeed saves the optimizer
    state in, and loads by position: a resume that changed it trained on with the state in the wrong places (the next
    step's loss 7.6% off, no error). A tuning key may change; one first set on a resume is recorded as a resumed_with.*
    tag like a changed value, not as a param the run always had."""
    args = ["train.log_every=1", "train.checkpoint_every=2", "optim.warmup_steps=5"]
    code, out = single(tmp_path, *args, "train.steps=2")
    assert code == 0, out[-4000:]
    # valid settings the run cannot follow are said at its start (ZeRO-2 here; the run ends in its warmup)
    assert "config note: train.zero3_param_persistence_threshold: ZeRO-3 only" in out, out[-4000:]
    assert "config note: optim.warmup_steps: 5 > train.steps=2: the run ends in its warmup, at 0.4 x optim.lr" in out
    code, out = single(tmp_path, *args, "train.steps=4",
                       "train.deepspeed_overrides={zero_optimization: {round_robin_gradients: true}}")
    key = "train.deepspeed_overrides.zero_optimization.round_robin_gradients"
    assert code == 2 and f"key '{key}': True here, False in {tmp_path / 'checkpoints' / ckpt.step_name(2)}" in out, \
        out[-4000:]
    assert "Traceback" not in out and "resumed from" not in out
    code, out = single(tmp_path, *args, "train.steps=4",
                       "train.deepspeed_overrides={zero_optimization: {reduce_bucket_size: 1000}}")
    assert code == 0 and "resumed from" in out, out[-4000:]
    client, run = mlflow_run(tmp_path)
    key = "train.deepspeed_overrides.zero_optimization.reduce_bucket_size"
    assert key not in run.data.params and run.data.tags[f"resumed_with.{key}"] == "1000"


def test_the_same_resume_command_after_a_preempted_branch_goes_on_from_its_last_checkpoint(tmp_path):
    """A branch started with resume=PATH and preempted (SIGTERM: checkpoint, exit 42): the same command, run again
    as the README says resumes, resumed PATH again, set the branch's checkpoints aside as abandoned and logged into a
    third MLflow run. It goes on from the branch's checkpoint in the branch's MLflow run; a command with another
    config still starts another branch from PATH."""
    args = ["train.steps=8", "train.checkpoint_every=2", "train.keep_last=10", "train.log_every=1"]
    code, out = single(tmp_path, *args)
    assert code == 0, out[-4000:]
    ckpt_dir = tmp_path / "checkpoints"
    branch = [*args, f"resume={ckpt_dir / ckpt.step_name(4)}", "optim.lr=0.02"]
    code, out = single(tmp_path, *branch, extra_env={"TOY_SIGNAL_AT": "6:0:TERM"})
    assert code == REQUEUE_EXIT_CODE, out[-4000:]
    (aside,) = [n for n in os.listdir(ckpt_dir) if n.startswith("abandoned-")]
    code, out = single(tmp_path, *branch)
    assert code == 0 and f"resumed from {ckpt_dir / ckpt.step_name(6)} at step 6" in out, out[-4000:]
    assert "abandoned timeline" not in out
    assert [n for n in os.listdir(ckpt_dir) if n.startswith("abandoned-")] == [aside]
    assert sorted(os.listdir(ckpt_dir / aside)) == [ckpt.step_name(6), ckpt.step_name(8)]  # the first timeline's
    assert [r["step"] for r in trace(tmp_path, 0)][-2:] == [7, 8]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    first, second = sorted(client.search_runs([client.get_experiment_by_name("one4d").experiment_id]),
                           key=lambda r: r.info.start_time)
    assert second.data.tags["one4d.branched_from_run"] == first.info.run_id and second.info.status == "FINISHED"
    assert steps_logged(client, second, "loss") == [5, 6, 7, 8]
    code, out = single(tmp_path, *args, f"resume={ckpt_dir / ckpt.step_name(4)}", "optim.lr=0.01")
    assert code == 0 and f"resumed from {ckpt_dir / ckpt.step_name(4)} at step 4" in out, out[-4000:]
    assert "under another config (optim.lr differ)" in out and "belong to an abandoned timeline" in out
    assert len(client.search_runs([client.get_experiment_by_name("one4d").experiment_id])) == 3


def preempted_branch(run_dir, keep_last: int) -> tuple:
    """A 4-step run, then a branch of it from its step 2 (resume=PATH, 8 steps, a checkpoint every 2) preempted at
    step 6 (SIGTERM: checkpoint, exit 42); returns the checkpoint folder and the branch's command line."""
    args = ["train.checkpoint_every=2", "train.log_every=1"]
    code, out = single(run_dir, *args, "train.steps=4")
    assert code == 0, out[-4000:]
    ckpt_dir = run_dir / "checkpoints"
    branch = [*args, "train.steps=8", f"train.keep_last={keep_last}", f"resume={ckpt_dir / ckpt.step_name(2)}"]
    code, out = single(run_dir, *branch, extra_env={"TOY_SIGNAL_AT": "6:0:TERM"})
    assert code == REQUEUE_EXIT_CODE, out[-4000:]
    return ckpt_dir, branch


def assert_one_finished_branch_logging(run_dir, steps: list[int]) -> None:
    """The run directory's MLflow store holds the first run and one branch of it, finished, whose loss history is
    `steps`, each once: the same resume command run again went on in the branch's run."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{run_dir}/mlflow.db")
    first, second = sorted(client.search_runs([client.get_experiment_by_name("one4d").experiment_id]),
                           key=lambda r: r.info.start_time)
    assert second.data.tags["one4d.branched_from_run"] == first.info.run_id and second.info.status == "FINISHED"
    assert steps_logged(client, second, "loss") == steps


def test_the_same_resume_command_goes_on_after_train_keep_last_pruned_its_start(tmp_path):
    """resume=PATH of this run's step 2: the start's checkpoints 4 and 6 made the prune (train.keep_last=2) delete
    PATH, and the same command run again after a preemption exited 2 at its start-up check ("no such checkpoint
    directory"). It goes on from step 6, in the branch's MLflow run."""
    ckpt_dir, branch = preempted_branch(tmp_path, keep_last=2)
    assert not (ckpt_dir / ckpt.step_name(2)).exists()
    code, out = single(tmp_path, *branch)
    assert code == 0 and f"resumed from {ckpt_dir / ckpt.step_name(6)} at step 6" in out, out[-4000:]
    assert [r["step"] for r in trace(tmp_path, 0)][-2:] == [7, 8]
    assert_one_finished_branch_logging(tmp_path, list(range(3, 9)))


def test_the_same_resume_command_falls_back_within_its_start_when_its_newest_checkpoint_is_damaged(tmp_path):
    """resume=PATH of step 2, preempted at step 6: the command run again goes on from step 6, which was damaged (a
    flipped byte), and exited 2 on "key 'resume': .../step-6 is damaged", a path it was never given, for good. Step 6
    is set aside as resume=auto sets one aside, and the start's step 4 resumed, in the branch's MLflow run."""
    ckpt_dir, branch = preempted_branch(tmp_path, keep_last=10)
    tensors = ckpt_dir / ckpt.step_name(6) / "train_state" / "rank-00000.safetensors"
    data = bytearray(tensors.read_bytes())
    data[-8] ^= 0x5A
    tensors.write_bytes(bytes(data))
    code, out = single(tmp_path, *branch)
    assert code == 0 and f"resumed from {ckpt_dir / ckpt.step_name(4)} at step 4" in out, out[-4000:]
    assert f"checkpoint {ckpt_dir / ckpt.step_name(6)}, where this command went on, is damaged" in out
    assert f"falling back to {ckpt_dir / ckpt.step_name(4)}" in out
    assert sum(n.startswith(f"damaged-{ckpt.step_name(6)}-") for n in os.listdir(ckpt_dir)) == 1
    assert_one_finished_branch_logging(tmp_path, list(range(3, 9)))


def test_steps_logged_before_a_kill_are_not_logged_again_after_the_resume(tmp_path):
    """A job killed between checkpoints had logged the steps since its last one; the resumed job trains them again
    and logged each a second time, so every metric's history held two points at those steps where an uninterrupted
    run holds one. Each step is logged once, with the uninterrupted run's values."""
    args = ["train.steps=8", "train.checkpoint_every=4", "train.log_every=1", "eval.every=2"]
    code, out = single(tmp_path / "killed", *args, extra_env={"TOY_SIGNAL_AT": "7:0:KILL"})
    assert code == -signal.SIGKILL, out[-4000:]
    code, out = single(tmp_path / "killed", *args)
    assert code == 0 and f"{ckpt.step_name(4)} at step 4" in out, out[-4000:]
    code, out = single(tmp_path / "straight", *args)
    assert code == 0, out[-4000:]
    client, run = mlflow_run(tmp_path / "killed")
    ref_client, ref_run = mlflow_run(tmp_path / "straight")
    for key in ("loss", "loss_rgb", "lr", "grad_norm", "skipped_steps", "samples_per_s", "eval/eval_loss"):
        assert steps_logged(client, run, key) == steps_logged(ref_client, ref_run, key), key
    for key in ("loss", "lr", "eval/eval_loss"):
        assert metric(client, run, key) == metric(ref_client, ref_run, key), key


def test_a_resume_under_another_config_logs_and_evaluates_the_retrained_steps_again(tmp_path):
    """Killed at step 7 with step 4 checkpointed, step 6 logged and evaluated, then resumed with another optim.lr
    (allowed: tagged resumed_with.optim.lr): steps 5-7 train to other values, yet they were left out of MLflow as
    repeats of the steps it held, and the evaluation of step 6 was not run again, its marker naming the run and
    step. Under another config both are run and logged again."""
    args = ["train.steps=8", "train.checkpoint_every=4", "train.log_every=1", "eval.every=2", "optim.lr=0.03"]
    code, out = single(tmp_path, *args, extra_env={"TOY_SIGNAL_AT": "7:0:KILL"})
    assert code == -signal.SIGKILL and "eval step 6: eval_loss" in out, out[-4000:]
    client, run = mlflow_run(tmp_path)
    before = {key: metric(client, run, key) for key in ("loss", "eval/eval_loss")}
    code, out = single(tmp_path, *args, "optim.lr=0.01")
    assert code == 0 and f"{ckpt.step_name(4)} at step 4" in out, out[-4000:]
    assert "eval step 6: eval_loss" in out and "not run again" not in out
    client, run = mlflow_run(tmp_path)
    assert run.data.tags["resumed_with.optim.lr"] == "0.01"
    assert steps_logged(client, run, "loss") == [1, 2, 3, 4, 5, 5, 6, 6, 7, 8]
    for key, old in before.items():
        new = metric(client, run, key)
        assert new[6] != old[6] and {s: new[s] for s in old if s <= 4} == {s: v for s, v in old.items() if s <= 4}, key


def test_a_stop_requested_during_a_checkpoint_ends_on_that_checkpoint(tmp_path):
    """A signal that came while a checkpoint was written was seen only after the next step, which was then saved
    again: a second step and a second save inside the grace time. The run stops on the checkpoint it just wrote,
    leaving that step's evaluation to the requeue, which runs it first."""
    args = ["train.steps=8", "train.checkpoint_every=4", "train.log_every=1", "eval.every=4"]
    code, out = single(tmp_path, *args, extra_env={ckpt.TEST_SLEEP_ENV: "4:1:USR1"})
    assert code == 42 and "checkpointed step 4, exiting 42" in out, out[-4000:]
    assert "evaluation of step 4 left for after the requeue (stop requested during its checkpoint)" in out
    assert "step 5/" not in out and "eval step 4" not in out
    assert checkpoint_names(tmp_path) == ["latest", ckpt.step_name(4) + "*"]
    leftovers = [tmp_path / "checkpoints" / ".tmp-step-00000008" / "ds", tmp_path / "checkpoints" / "latest.tmp-99"]
    leftovers[0].mkdir(parents=True)  # what a save cut short (a full disk) leaves: the start removes it first
    leftovers[1].write_text(ckpt.step_name(8))
    code, out = single(tmp_path, *args, "train.steps=4")  # no step, so no save: the start removed them
    assert code == 0 and "eval step 4: eval_loss" in out, out[-4000:]
    assert checkpoint_names(tmp_path) == ["latest", ckpt.step_name(4) + "*"]
