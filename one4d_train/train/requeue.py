"""`python3 -m one4d_train.train.requeue config=X.yaml [key=value ...]`: what slurm/train.sbatch adds to a requeued
job's arguments. `resume=auto` once this Slurm job (SLURM_JOB_ID, which a requeue keeps) has written the run
directory's newest complete checkpoint: the job continues from it. Nothing while it has written none: the job starts
again as submitted, so resume=PATH loads PATH again instead of starting from scratch, and resume=never starts afresh
instead of from checkpoints an earlier run left in run_dir. Exit 2 on a config error (named)."""
from __future__ import annotations

import os
import sys

from one4d_train.config import ConfigError, load_config
from one4d_train.train import checkpoint as ckpt


def written_by_job(run_dir: str, job_id: str) -> bool:
    """The newest complete checkpoint of `run_dir` was written by Slurm job `job_id`."""
    found = ckpt.complete_checkpoints(os.path.join(run_dir, "checkpoints"))
    return bool(found) and ckpt.marker_of(found[-1]).get("slurm_job_id") == job_id


def main(argv: list[str]) -> int:
    try:
        cfg = load_config(argv)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    if written_by_job(cfg.run_dir, os.environ.get("SLURM_JOB_ID", "")):
        print("resume=auto")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
