"""`one4d demo [--out DIR] [--steps N]`: the whole product on a CPU in about four minutes, in a new folder.

synthetic clips with exact geometry -> `one4d shard` -> `one4d inspect-shards` -> `one4d train` (tiny DLC model,
DeepSpeed ZeRO-3 on 2 CPU processes) -> stop -> `one4d train` again (resumes from the checkpoint) ->
`one4d export` -> `one4d eval` -> where the MLflow record is and how to open it.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "experiment",
                      "demo.yaml")


def run(title: str, args: list[str], env: dict | None = None) -> None:
    print(f"\n=== {title}\n$ {' '.join(args)}", flush=True)
    t0 = time.time()
    proc = subprocess.run(args, env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        raise SystemExit(f"demo: '{title}' failed with exit code {proc.returncode}")
    print(f"--- {title}: {time.time() - t0:.0f} s", flush=True)


def one4d(*args: str) -> list[str]:
    return [sys.executable, "-m", "one4d_train.cli", *args]


def torchrun(nproc: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "one4d_train.cli", *args]


def loss_summary(db: str) -> tuple[list[tuple[int, float]], str]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    exp = client.get_experiment_by_name("one4d")
    run_ = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"], max_results=1)[0]
    history = client.get_metric_history(run_.info.run_id, "loss")
    return sorted((m.step, m.value) for m in history), run_.info.run_id


def count(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, got {text!r}")
    return int(text)


def is_new(path: str) -> bool:
    return not os.path.exists(path) or (os.path.isdir(path) and not os.listdir(path))


def fresh_folder(base: str) -> str:
    """`base`, or the first of base-2, base-3 ... that is new or empty: the README's command runs again as is."""
    n, path = 1, base
    while not is_new(path):
        n += 1
        path = f"{base}-{n}"
    return path


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="one4d demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="where data, shards and the run go: a new or empty folder (default runs/demo, or "
                                 "runs/demo-2, -3 ... where earlier demos are)")
    p.add_argument("--steps", type=count, default=60, help="training steps of the first run (default 60)")
    p.add_argument("--resume-steps", type=count, default=10, help="steps added by the resumed run (default 10)")
    p.add_argument("--nproc", type=count, default=2, help="training processes (default 2)")
    a = p.parse_args(argv)
    # an earlier demo's run in the folder would be resumed from its last checkpoint: nothing trained, old results
    out = os.path.abspath(a.out) if a.out else fresh_folder(os.path.abspath("runs/demo"))
    if not is_new(out):
        p.error(f"--out {out} exists and is not an empty folder (an earlier demo?): remove it or choose another --out")
    raw, shards, run_dir = (os.path.join(out, d) for d in ("data", "shards", "run"))
    val_raw, val_shards = os.path.join(out, "val_data"), os.path.join(out, "val_shards")
    env = {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    t0 = time.time()

    run("synthetic 4D clips (moving camera, moving objects, exact depth and poses)",
        one4d("synth", raw, "--clips", "12", "--frames", "17", "--height", "64", "--width", "96", "--seed", "0"))
    run("shard the manifest into WebDataset tars",
        one4d("shard", os.path.join(raw, "manifest.jsonl"), shards, "--samples-per-shard", "2", "--workers", "2"))
    run("verify the shards against their index", one4d("inspect-shards", shards))
    run("held-out clips (another seed) for evaluation",
        one4d("synth", val_raw, "--clips", "2", "--frames", "17", "--height", "64", "--width", "96", "--seed", "1"))
    run("shard the held-out clips", one4d("shard", os.path.join(val_raw, "manifest.jsonl"), val_shards,
                                          "--samples-per-shard", "1", "--workers", "1"))
    common = [f"config={CONFIG}", f"data.shards={shards}", f"run_dir={run_dir}", "resume=auto"]
    run(f"train {a.steps} steps: tiny DLC model, DeepSpeed ZeRO-3, {a.nproc} CPU processes",
        torchrun(a.nproc, "train", *common, f"train.steps={a.steps}"), env)
    total = a.steps + a.resume_steps
    run(f"resume from the step-{a.steps} checkpoint and train to step {total}",
        torchrun(a.nproc, "train", *common, f"train.steps={total}"), env)
    ckpt = os.path.join(run_dir, "checkpoints", f"step-{total:08d}")
    run("export the branch adapters and control links",
        one4d("export", f"checkpoint={ckpt}", f"out={os.path.join(out, 'export')}"))
    run("evaluate the checkpoint in the three UMC modes",
        one4d("eval", f"checkpoint={ckpt}", f"config={CONFIG}", f"data.val_shards={val_shards}", "eval.num_samples=2",
              "eval.steps=4", "eval.cfg_scale=1.0"), env)

    db = os.path.join(run_dir, "mlflow.db")
    losses, run_id = loss_summary(db)
    first = [v for s, v in losses if s <= 10]
    last = [v for s, v in losses if s > total - 10]
    print(f"\n=== demo finished in {time.time() - t0:.0f} s")
    if first and last:
        print(f"mean loss, steps 1-10: {sum(first) / len(first):.3f}; last 10 steps: {sum(last) / len(last):.3f}")
    print(f"checkpoint:  {ckpt}\nadapters:    {os.path.join(out, 'export')}\nevaluation:  {os.path.join(ckpt, 'eval')}")
    print(f"MLflow run {run_id} in {db}; open it with:\n  mlflow ui --backend-store-uri sqlite:///{db}")
    return 0
