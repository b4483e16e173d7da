"""What slurm/train.sbatch asks of the run directory, through the `one4d` entry point (so with the trainer's own
Python environment, whatever `python3` is on PATH):
`one4d requeue --job FILE config=X.yaml [key=value ...]`, at every start of the job: the first (SLURM_RESTART_COUNT 0)
writes the merged config (X.yaml and the key=value settings, resolved: run_dir included) to FILE, which every start
of the job then trains with; a requeued start keeps to FILE whatever X.yaml says now (a warning names the keys an
edit changed since), and prints what it adds to its arguments, as below. A requeued start without FILE (the job was
requeued before any start reached the training: a failed launch or node) writes it, as a first start does.
`one4d requeue config=FILE [key=value ...]` prints what a requeued job adds to its arguments: `resume=auto`
once this Slurm job (SLURM_JOB_ID, which a requeue keeps) has written the run directory's newest complete
checkpoint, so the job continues from it; nothing while it has written none, so the job starts again
as submitted (resume=PATH loads PATH again instead of starting from scratch, and resume=never starts afresh instead
of from checkpoints an earlier run left in run_dir).
`one4d requeue --progress config=X.yaml [key=value ...]` exits 0 when this run of the job (SLURM_JOB_ID at
SLURM_RESTART_COUNT) wrote a complete checkpoint, NO_PROGRESS (10) when it wrote none: stopped by the time limit's
signal before its first step, a requeue would only do the same again.
All exit 2 on a config error (named) or a job record that cannot be written or read; any other failure exits with
another code, which the script takes as "unknown"."""
from __future__ import annotations

import os
import sys

import yaml

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


def job_start(record: str, argv: list[str]) -> int:
    """`one4d requeue --job FILE config=X.yaml [key=value ...]` (see the module's doc)."""
    from one4d_train.configtools import flatten, to_yaml
    from one4d_train.train.checkpoint import write_atomic

    job = os.environ.get("SLURM_JOB_ID", "")
    # no record: no start of this job got as far as training (the script writes it before srun; Slurm also
    # requeues a job whose launch or node failed before that): this start is its first, as submitted
    if int(os.environ.get("SLURM_RESTART_COUNT") or 0) == 0 or not os.path.isfile(record):
        try:
            write_atomic(record, to_yaml(load_config(argv)))
        except ConfigError as exc:
            print(f"config error: {exc}", file=sys.stderr)
            return 2
        except OSError as exc:
            print(f"{record}: cannot write this job's record of its config ({exc.strerror or exc}): the submission "
                  "directory must be writable (a requeue reads the record there)", file=sys.stderr)
            return 2
        return 0
    try:
        cfg = load_config([f"config={record}"])
    except ConfigError as exc:
        print(f"config error: {exc} (this job's record of the config its first start trained with)", file=sys.stderr)
        return 2
    try:
        now = flatten(yaml.safe_load(to_yaml(load_config(argv))))
        changed = sorted(k for k, v in flatten(yaml.safe_load(to_yaml(cfg))).items() if now.get(k) != v)
    except ConfigError as exc:
        changed = [f"(it does not load: {exc})"]
    if changed:
        print(f"warning: the submitted config ({' '.join(argv)}) differs from the one job {job} started with: "
              f"{', '.join(changed[:10])}{' ...' if len(changed) > 10 else ''}. The job goes on as it started, "
              f"with {record} (run_dir {cfg.run_dir}); submit a new job to train with the edited config",
              file=sys.stderr)
    if written_by_job(cfg.run_dir, job):
        print("resume=auto")
    return 0


def main(argv: list[str]) -> int:
    if argv[:1] in (["-h"], ["--help"]):
        print(__doc__)
        return 0
    if argv[:1] == ["--job"]:
        if len(argv) < 2:
            print("usage: one4d requeue --job FILE config=X.yaml [key=value ...]", file=sys.stderr)
            return 2
        return job_start(argv[1], argv[2:])
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
