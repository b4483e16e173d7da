"""`one4d eval checkpoint=<checkpoint or run dir> [config=x.yaml] [key=value ...]`: sample checkpoints in the
three UMC modes, recover depth and cameras, score them, and write videos, point clouds, contact sheets and
metrics.json into <checkpoint>/eval (logged to the run's MLflow run when the checkpoint has one).

A run directory evaluates every complete checkpoint that has no eval/metrics.json yet. Without config=, the
run's own config.yaml is used; key=value pairs (eval.*, data.*, model.*) override it.
"""
from __future__ import annotations

import os
import sys

from one4d_train.config import ConfigError, load_config
from one4d_train.eval.pipeline import checkpoints_to_evaluate, evaluate_checkpoint, run_of


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__.strip() + "\n\nexample: one4d eval checkpoint=runs/demo eval.modes=[video] eval.steps=20")
        return 0
    target = [a.split("=", 1)[1] for a in argv if a.startswith("checkpoint=")]
    rest = [a for a in argv if not a.startswith("checkpoint=")]
    if len(target) != 1:
        print("one4d eval: give exactly one checkpoint=<checkpoint dir or run dir>", file=sys.stderr)
        return 2
    checkpoints = checkpoints_to_evaluate(target[0])
    if not checkpoints:
        print(f"one4d eval: nothing to evaluate under {target[0]} (no complete checkpoint without eval/metrics.json)")
        return 0
    for ckpt in checkpoints:
        run_dir, run_id, step = run_of(ckpt)
        args = list(rest)
        run_config = os.path.join(run_dir, "config.yaml")
        if not any(a.startswith("config=") for a in args) and os.path.exists(run_config):
            args.insert(0, f"config={run_config}")
        try:
            cfg = load_config(args + [f"run_dir={run_dir}"])
        except ConfigError as exc:
            print(f"config error: {exc}", file=sys.stderr)
            return 2
        print(f"evaluating {ckpt} (step {step}, MLflow run {run_id or '-'})")
        evaluate_checkpoint(cfg, ckpt, run_id=run_id, step=step)
    return 0
