"""The training engine end to end: the real `one4d train` CLI, real DeepSpeed ZeRO-3 (and ZeRO-2) on CPU with gloo,
2 processes, real MLflow, the toy task of tests/train_toy_task.py. Launches are shared by module-scoped fixtures."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch
from safetensors.torch import load_file

from launch_utils import ROOT, _env, metric, mlflow_run, srun_like, torchrun
from one4d_train.train import checkpoint as ckpt
from one4d_train.train import deepspeed_config, distributed
from one4d_train.train.preemption import EXIT_BAD_STEPS, REQUEUE_EXIT_CODE
from one4d_train.train.schedule import WarmupSchedule

STEPS = 24
COMMON = ["train.task=tests.train_toy_task:ToyTask", "train.device=cpu", "train.precision=fp32",
          "train.zero3_param_persistence_threshold=0", "tracking.system_metrics=false", "train.log_every=1"]
RUN = COMMON + [f"train.steps={STEPS}", "train.micro_batch_size=2", "train.grad_accum=2", "train.checkpoint_every=6",
                "train.keep_last=2", "optim.lr=0.03", "optim.warmup_steps=3", "optim.schedule=cosine",
                "optim.min_lr_ratio=0.1", "eval.every=12"]
pytestmark = pytest.mark.slow


def trace(run_dir, rank):
    with open(os.path.join(run_dir, "toy_trace", f"rank-{rank}.jsonl")) as f:
        return [json.loads(line) for line in f]


def adapters(run_dir, step):
    return load_file(os.path.join(run_dir, "checkpoints", ckpt.step_name(step), "adapters", "adapter.safetensors"))


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
    """SIGUSR1 reaches rank 1 only, during step 10; then the job is 'requeued' under torchrun."""
    run_dir = tmp_path_factory.mktemp("preempted")
    codes, out1 = srun_like(run_dir, *RUN, extra_env={"TOY_SIGNAL_AT": "10:1:USR1"})
    assert codes == [REQUEUE_EXIT_CODE] * 2, out1[-4000:]
    code, out2 = torchrun(run_dir, *RUN)
    assert code == 0, out2[-4000:]
    return run_dir, out1, out2


def test_zero3_trains_two_ranks_and_overfits(straight):
    run_dir, out = straight
    client, run = mlflow_run(run_dir)
    loss = metric(client, run, "loss")
    assert sorted(loss) == list(range(1, STEPS + 1))
    first, last = sum(loss[s] for s in (1, 2, 3)) / 3, sum(loss[s] for s in (22, 23, 24)) / 3
    assert last < first / 5, f"loss fell only from {first:.4f} to {last:.4f}"
    assert "global batch 8 = micro 2 x accum 2 x world 2" in out
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
    assert sorted(metric(client, run, "eval/eval_loss")) == [12, 24]
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
    assert lr == {s: pytest.approx(0.03 * schedule(s - 1), rel=1e-12) for s in range(1, STEPS + 1)}


def test_checkpoints_keep_last_and_latest(straight):
    run_dir, _ = straight
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    assert sorted(n for n in os.listdir(ckpt_dir) if n.startswith("step-")) == ["step-00000018", "step-00000024"]
    assert open(os.path.join(ckpt_dir, "latest")).read().strip() == "step-00000024"
    assert all(ckpt.is_complete(p) for p in ckpt.complete_checkpoints(ckpt_dir))
    state = json.load(open(os.path.join(ckpt_dir, "step-00000024", "train_state", "rank-00001.json")))
    assert state["step"] == STEPS and state["samples_seen"] == STEPS * 8 and state["loader"] == {"epoch": 3, "batch": 0}


def test_preemption_checkpoints_requeues_and_resumes_exactly(straight, preempted):
    ref_dir, _ = straight
    run_dir, out1, out2 = preempted
    assert "preempted" in out1 and "checkpoint" in out1
    assert "resumed from" in out2 and ckpt.step_name(10) in out2
    # both launches appended to one MLflow run; same losses as the uninterrupted run, step by step
    client, run = mlflow_run(run_dir)
    ref_client, ref_run = mlflow_run(ref_dir)
    assert metric(client, run, "loss") == metric(ref_client, ref_run, "loss")
    assert metric(client, run, "lr") == metric(ref_client, ref_run, "lr")
    # no step lost or repeated, same data order on every rank
    for rank in (0, 1):
        steps = [r["step"] for r in trace(run_dir, rank)]
        assert steps == [s for s in range(1, STEPS + 1) for _ in range(2)]
        assert trace(run_dir, rank) == trace(ref_dir, rank)
    # final trainable weights bit-exact
    final, ref = adapters(run_dir, STEPS), adapters(ref_dir, STEPS)
    assert all(torch.equal(final[k], ref[k]) for k in ref)


def test_kill_during_checkpoint_write_resumes_from_previous(straight, tmp_path):
    ref_dir, _ = straight
    run_dir = tmp_path / "killed"
    proc = torchrun(run_dir, *RUN, extra_env={ckpt.TEST_SLEEP_ENV: "12:120"}, wait=False)
    tmp_adapters = os.path.join(run_dir, "checkpoints", ".tmp-" + ckpt.step_name(12), "adapters", "adapter.safetensors")
    deadline = time.time() + 300
    while not os.path.exists(tmp_adapters):
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()[-4000:] if proc.poll() is not None else ""
        time.sleep(0.5)
    # torchrun starts its workers in sessions of their own: kill -9 every process of the job by id
    job = psutil.Process(proc.pid)
    for p in job.children(recursive=True) + [job]:
        p.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    assert ckpt.resolve_resume("auto", ckpt_dir).endswith(ckpt.step_name(6))
    code, out = torchrun(run_dir, *RUN)
    assert code == 0, out[-4000:]
    assert "resumed from" in out and ckpt.step_name(6) in out
    final, ref = adapters(run_dir, STEPS), adapters(ref_dir, STEPS)
    assert all(torch.equal(final[k], ref[k]) for k in ref)
    assert not [n for n in os.listdir(ckpt_dir) if n.startswith(".tmp-")]


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
                     "optim.lr=0.01", "train.max_bad_steps=3"] + engine
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


def test_zero2_single_plain_process_bf16(tmp_path):
    run_dir = tmp_path / "zero2"
    env = _env()
    code = subprocess.run([sys.executable, "-m", "one4d_train.cli", "train", f"run_dir={run_dir}", *COMMON,
                           "train.zero_stage=2", "train.precision=bf16", "train.steps=16", "train.checkpoint_every=8",
                           "train.micro_batch_size=8", "train.peak_flops_per_device=1e9",
                           "optim.lr=0.03", "train.deepspeed_overrides={zero_optimization: {overlap_comm: false}}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    out = code.stdout + code.stderr
    assert code.returncode == 0, out[-4000:]
    assert "deepspeed override: zero_optimization.overlap_comm: True -> False" in out
    client, run = mlflow_run(run_dir)
    loss = metric(client, run, "loss")
    first, last = sum(loss[s] for s in (1, 2, 3)) / 3, sum(loss[s] for s in (14, 15, 16)) / 3
    assert last < first / 2, loss
    # exported from the optimizer's fp32 masters, not the bf16 module copy the forward uses
    w = adapters(run_dir, 16)["adapter_up.weight"]
    assert w.dtype == torch.float32 and (w.to(torch.bfloat16).float() != w).any()
    mfu = metric(client, run, "mfu")  # logged against the configured peak on CPU
    assert sorted(mfu) == list(range(1, 17)) and all(0 < v < 1 for v in mfu.values())


def test_bad_config_exits_2_before_any_process_group(capsys):
    import torch.distributed as dist

    from one4d_train.train.main import main

    assert main(["train.zero_stage=1", "train.task=tests.train_toy_task:ToyTask"]) == 2
    assert "train.zero_stage" in capsys.readouterr().err
    assert main(["--local_rank=0", "train.task=nocolon"]) == 2  # the deepspeed launcher's argument is dropped
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
    d = distributed.detect({})
    assert (d.rank, d.world_size, d.launcher) == (0, 1, "single") and d.master_port > 0


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
