"""`one4d train config=x.yaml [key=value ...]`: train with DeepSpeed ZeRO-2/3 on one process, torchrun, srun or
the deepspeed launcher.

main keys:
  run_dir=runs/NAME           checkpoints, config.yaml, MLflow store (mlflow.db); survives requeues
  resume=auto|never|PATH      auto: newest complete checkpoint of run_dir whose files match their CRC-32s (a
                              damaged one is moved to checkpoints/damaged-*, named), else a fresh start where
                              run_dir has no checkpoint at all (only damaged ones: exit 2; never: start afresh);
                              PATH: that checkpoint, or the newest one the same command wrote since it started there
                              (also once train.keep_last pruned PATH)
  model.init_adapters=PATH    a new run's adapters and control links start from an earlier run's (an export, a
                              checkpoint, or a run directory's newest): same model settings and base; fresh optimizer
  train.steps=5500            optimiser steps;  train.micro_batch_size=1  train.grad_accum=1
  train.zero_stage=3|2        train.precision=bf16|fp32  train.device=auto|cuda|cpu
  train.checkpoint_every=500  train.keep_last=3  train.log_every=10  train.max_bad_steps=5
  train.deepspeed_overrides={...}  DeepSpeed tuning keys merged into the generated config (changes are logged;
                              keys set from train.* / optim.* and keys DeepSpeed does not read are refused, and
                              on resume a change of one that lays out the optimizer state, e.g. sub_group_size)
  train.task=module:Class     train another TrainTask (default: the One4D task)
  optim.lr=1e-4 optim.warmup_steps optim.schedule=constant|cosine optim.min_lr_ratio optim.grad_clip
  tracking.uri=               MLflow server (default: sqlite store in run_dir)  tracking.experiment=one4d
  eval.every=0                in-training evaluation every N steps, all ranks taking part

Before any process group starts, every rank checks the config: values, then what the run needs (the task
importable, model files and shards present, the run directory's folders and MLflow store intact, the resume
checkpoint complete and of this world size, DeepSpeed overrides that leave the trainer's keys alone); every problem
names its key and where it was set.

exit codes: 0 finished, 2 bad config (or run_dir in use by another training job, or a damaged resume checkpoint), 3 too
many consecutive non-finite steps, 42 preempted (checkpointed; requeue the job), 1 any other failure (the MLflow run is
ended as FAILED).

examples (the first on the shards `one4d demo` writes):
  one4d train config=configs/experiment/demo.yaml data.shards=runs/demo/shards run_dir=runs/mine train.steps=20
  python -m torch.distributed.run --nproc_per_node=2 -m one4d_train.cli train config=... train.device=cpu
"""
from __future__ import annotations

import logging
import os
import random
import sys
import traceback
import warnings

import numpy as np
import torch

from one4d_train.cli import LAUNCHER_ARG
from one4d_train.config import ConfigError, absolute_paths, load_config
from one4d_train.train.config import ignored_settings, preflight
from one4d_train.train.preemption import EXIT_CONFIG, EXIT_INTERRUPTED


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__.strip())
        return 0
    argv = [a for a in argv if not LAUNCHER_ARG.match(a)]
    from one4d_train.train.distributed import launch_problem

    problem = launch_problem()  # read by the checks below (the world size) and by the process group's start
    if problem:
        print(f"launch error: {problem}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        cfg = load_config(argv, checks=preflight, prepare=absolute_paths)
    except ConfigError as exc:
        _print_config_error(exc)
        return EXIT_CONFIG

    from one4d_train.train import distributed, run_lock

    # DeepSpeed calls these on every step; the deprecation notice would bury the log
    warnings.filterwarnings("ignore", message=r".*(all_gather_into_tensor|reduce_scatter_tensor).* is deprecated")

    try:
        env = distributed.setup(cfg.train.device, cfg.train.dist_timeout_s)
    except distributed.DeviceUnavailable as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    logging.basicConfig(level=logging.INFO if env.is_main else logging.WARNING,
                        format=f"%(asctime)s [rank {env.rank}] %(message)s", stream=sys.stdout, force=True)
    if env.is_main:
        for key, why in ignored_settings(cfg):
            logging.warning("config note: %s: %s", key, why)
    busy = None
    if env.is_main:  # before anything in run_dir is read or written; held until this process ends
        try:
            lock = run_lock.acquire(cfg.run_dir)  # noqa: F841 (kept open: closing it would release the lock)
        except ConfigError as exc:  # in use by another job, or not creatable
            busy = exc
    if distributed.broadcast_from_main(busy is not None):
        if busy is not None:
            _print_config_error(busy)
        distributed.shutdown(EXIT_CONFIG)
    trainer = None
    try:
        from one4d_train.train.task import build_task
        from one4d_train.train.trainer import Trainer

        seed_everything(cfg.seed)  # identical on every rank while the model is built
        task = build_task(cfg)
        trainer = Trainer(cfg, task, env)
        seed_everything(cfg.seed + 1_000_003 * env.rank)  # per-rank streams for the steps
        code = trainer.train()
    except BaseException as exc:
        code = report_failure(exc, getattr(trainer, "tracker", None))
        os._exit(code)  # peers may sit in a collective: do not wait for the process group to shut down
    distributed.shutdown(code)
    return code


def report_failure(exc: BaseException, tracker) -> int:
    """Print the failure, end this rank's MLflow run (started or not; other ranks hold a no-op tracker) as FAILED,
    KILLED for an interrupt, and return the exit code: 2 for a config error found late or a damaged checkpoint file
    (the message names it: no traceback), 1 for a checkpoint that could not be written or data that no longer gives
    a sample or stored latents that do not fit the run (one line too), 130 (the shell's code for SIGINT) for a second
    Ctrl-C (one line), else 1."""
    from data_pipeline.latents import LatentsMismatchError
    from data_pipeline.reader import NoUsableSamples
    from one4d_train.train.checkpoint import CheckpointDamaged, CheckpointSaveError

    if isinstance(exc, ConfigError):
        _print_config_error(exc)
    elif isinstance(exc, (CheckpointDamaged, CheckpointSaveError)):
        print(f"checkpoint error: {exc}", file=sys.stderr)
    elif isinstance(exc, NoUsableSamples):
        said = _worker_message(exc)
        print(f"data error: {said}. The same command resumes from the last complete checkpoint once the shards "
              "read again", file=sys.stderr)
    elif isinstance(exc, LatentsMismatchError):  # a sample's latents.json: its message says what to do
        print(f"data error: {_worker_message(exc)}", file=sys.stderr)
    elif isinstance(exc, KeyboardInterrupt):  # a second Ctrl-C: stopped at once, as asked
        print("one4d train: interrupted (no checkpoint of the steps since the last one; the same command resumes "
              "from the last complete checkpoint, if there is one)", file=sys.stderr)
    else:
        traceback.print_exception(exc)
    if tracker is not None:
        try:
            tracker.end("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        except Exception as end_exc:  # the store may be what failed: the original error is the one to report
            print(f"could not end the MLflow run: {type(end_exc).__name__}: {end_exc}", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    return EXIT_CONFIG if isinstance(exc, (ConfigError, CheckpointDamaged)) else 1


def _worker_message(exc: BaseException) -> str:
    """The message of an error raised in the data pipeline: from a DataLoader worker it carries the worker's
    traceback, the message on its last line."""
    return str(exc).strip().splitlines()[-1].removeprefix(f"{type(exc).__module__}.{type(exc).__name__}: ")


def _print_config_error(exc: ConfigError) -> None:
    for line in str(exc).splitlines():
        print(f"config error: {line}", file=sys.stderr)
