"""`one4d shard`: manifest (JSONL) -> validated WebDataset shards + index.json.

  one4d shard MANIFEST OUT_DIR [--samples-per-shard N | --shard-bytes B] [--workers W]
  one4d shard MANIFEST OUT_DIR --num-tasks N --task-index I     (one Slurm array task)
  one4d shard --merge OUT_DIR                                    (after all array tasks)

Re-running the same command after a kill finishes the job: finished shards are kept, the rest written, and
those whose rows' input files changed since written again. OUT_DIR is new, empty or one this command wrote into.
"""
from __future__ import annotations

import argparse
import os
import sys

from data_pipeline.shard import ShardingError, array_task_index, array_task_problem, merge, run_sharding
from data_pipeline.shard_index import PLAN, REJECTS, ShardIndexError, printable


def parser() -> argparse.ArgumentParser:
    head, usage = __doc__.split("\n\n", 1)
    p = argparse.ArgumentParser(prog="one4d shard", description=head.split(":", 1)[1].strip(), epilog=usage,
                                usage="one4d shard MANIFEST OUT_DIR [options] | one4d shard --merge OUT_DIR",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", metavar="PATH", help="manifest and output folder (or OUT_DIR with --merge)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--samples-per-shard", type=int, help="samples per shard (default 64 unless --shard-bytes)")
    size.add_argument("--shard-bytes", type=int, help="target shard size in bytes (samples estimated as written: docs/data.md)")
    p.add_argument("--workers", type=int, default=1, help="worker processes, one shard each at a time (default 1)")
    p.add_argument("--num-tasks", type=int, help="Slurm array size: this task writes shards with id %% N == I")
    p.add_argument("--task-index", type=int, help="this task's index (default $SLURM_ARRAY_TASK_ID with --num-tasks)")
    p.add_argument("--merge", action="store_true", help="combine the tasks' partial indexes into index.json")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _print_rejects(rejects: list[dict]) -> None:
    for r in rejects:
        again = " (put the file there and run the same command again: it writes the row)" if r.get("missing") else ""
        print(printable(f"  rejected row {r['row']} ({r['path']}): {r['reason']}{again}"))


def _none_written(samples: int, rejected: int) -> int:
    """The exit status of a finished shard set: 1 (with the reason) when every row was rejected, so that a job
    that runs next (training, a dependent Slurm job) does not start on a dataset of no samples."""
    if samples:
        return 0
    print(f"one4d shard: error: no sample was written: all {rejected} rows were rejected (reasons above and in "
          f"{REJECTS})", file=sys.stderr)
    return 1


def _retry_pending(rejects: list[dict]) -> int:
    """1 (with the reason) where rows ran out of memory: they were not written, and a re-run writes them."""
    retry = [r["row"] for r in rejects if r.get("retry")]
    if not retry:
        return 0
    listed = f"{retry[:10]}"[:-1] + (f", ... ({len(retry)} in all)]" if len(retry) > 10 else "]")
    print(f"one4d shard: error: out of memory: rows {listed} were not written: re-run the same command with fewer "
          "--workers to write them (finished shards are kept)", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    try:
        if args.merge:
            if len(args.paths) != 1:
                p.error("--merge takes exactly one argument: OUT_DIR")
            index = merge(args.paths[0])
            t = index["totals"]
            print(f"merged: {t['shards']} shards, {t['samples']} samples, {t['bytes']} bytes, {t['rejected']} rejected")
            _print_rejects(index["rejects"])
            return _retry_pending(index["rejects"]) or _none_written(t["samples"], t["rejected"])
        if len(args.paths) != 2:
            p.error("expected MANIFEST OUT_DIR")
        task_index = array_task_index(args.num_tasks, args.task_index)
        problem = array_task_problem(args.num_tasks, task_index)
        if problem:
            p.error(problem)
        if args.samples_per_shard is not None and args.samples_per_shard < 1:
            p.error(f"--samples-per-shard must be >= 1, got {args.samples_per_shard}")
        if args.shard_bytes is not None and args.shard_bytes < 1:
            p.error(f"--shard-bytes must be >= 1, got {args.shard_bytes}")
        per_shard = args.samples_per_shard if args.samples_per_shard or args.shard_bytes else 64
        if args.workers < 1:
            p.error("--workers must be >= 1")
        s = run_sharding(args.paths[0], args.paths[1], samples_per_shard=per_shard, shard_bytes=args.shard_bytes,
                         workers=args.workers, num_tasks=args.num_tasks, task_index=task_index,
                         progress=not args.no_progress)
    except (ShardingError, ShardIndexError, OSError) as exc:  # OSError: a file it cannot read or write, a full disk
        print(f"one4d shard: error: {exc}", file=sys.stderr)
        return 1
    if s["replaced_plan"]:
        print(printable(f"{os.path.join(args.paths[1], PLAN)}: replaced, no sample having been written under it: "
                        f"{'; '.join(s['replaced_plan'])}"))
    changed = f", {s['changed']} of them again as their input files changed" if s["changed"] else ""
    print(printable(f"{s['shards']} shards ({s['written']} written{changed}, {s['skipped']} already done), "
                    f"{s['samples']} samples, {len(s['rejects'])} rejected; index: {s['index']}"))
    _print_rejects(s["rejects"])
    for text in s["repeated"]:
        print(printable(f"  warning: {text}: it is sharded as often as it is listed"))
    # an array task whose own rows were all rejected is no failure; the merge of such tasks is
    return _retry_pending(s["rejects"]) or (_none_written(s["samples"], len(s["rejects"])) if args.num_tasks is None
                                            else 0)


if __name__ == "__main__":
    raise SystemExit(main())
