"""What slurm/train.sbatch asks of the run directory, through the `one4d` entry point (so with the trainer's own
Python environment, whatever `python3` is on PATH):
`one4d requeue config=X.yaml [key=value ...]` prints what a requeued job adds to its arguments: `resume=auto`
once this Slurm job (SLURM_JOB_ID, which a requeue keeps) has written the run directory's newest complete
checkpoint, so the job continues from it; nothing while it has written none, so the job starts again
as submitted (resume=PATH loads PATH again instead of starting from scratch, and resume=never starts afresh instead
of from checkpoints an earlier run left in run_dir).
`one4d requeue --progress config=X.yaml [key=value ...]` exits 0 when this run of the job (SLURM_JOB_ID at
SLURM_RESTART_COUNT) wrote a complete checkpoint, NO_PROGRESS (10) when it wrote none: stopped by the time limit's
signal before its first step, a requeue would only do the same again.
Both exit 2 on a config error (named); any other failure exits with another code, which the script takes as
"unknown"."""
from __future__ import annotations

import os
import sys

from one4d_train.config import ConfigError, load_config
from one4d_train.train import checkpoint as ckpt

NO_PROGRESS = 10  # an exit code of its own: 1 is what any Python failure gives


def written_by_job(run_dir: str, job_id: str) -> bool:
    """The newest complete checkpoint of `run_dir` was written by Slurm job `job_id`."""
    found = ckpt.complete_checkpoints(os.path.join(run_dir, "checkpoints"))
    return bool(found) and ckpt.marker_of(found[-1]).get("slurm_job_id") == job_id


def written_by_run(run_dir: str, job_id: str, restart: int) -> bool:
    """A complete checkpoint of `run_dir` was written by Slurm job `job_id` in its run after `restart` requeues."""
    for path in ckpt.complete_checkpoints(os.path.join(run_dir, "checkpoints")):
        marker = ckpt.marker_of(path)
        if marker.get("slurm_job_id") == job_id and marker.get("slurm_restart_count", 0) == restart:
            return True
    return False


def main(argv: list[str]) -> int:
    if argv[:1] in (["-h"], ["--help"]):
        print(__doc__)
        return 0
    progress = argv[:1] == ["--progress"]
    try:
        cfg = load_config(argv[1:] if progress else argv)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    job = os.environ.get("SLURM_JOB_ID", "")
    if progress:
        return 0 if written_by_run(cfg.run_dir, job, int(os.environ.get("SLURM_RESTART_COUNT") or 0)) else NO_PROGRESS
    if written_by_job(cfg.run_dir, job):
        print("resume=auto")
    return 0
