"""`one4d eval checkpoint=<checkpoint, export or run dir> [config=x.yaml] [key=value ...]`: sample checkpoints in
the three UMC modes, recover depth and cameras, score them, and write videos, point clouds, contact sheets and
metrics.json into <checkpoint>/eval/<dataset>/, one folder per dataset (eval.dataset or data.val_shards: its kind
and a hash of its path), logged to the run's MLflow run (eval/<dataset>/<mode>/<metric>) when it has one.

A checkpoint must be complete (its COMPLETE marker matching its files); an export folder of `one4d export`
is evaluated as it is. A run directory evaluates every complete checkpoint not yet scored on this dataset with
these settings (one scored with other settings, or by an earlier version's metrics, is scored again unless
eval.rescore=never), skipping one that another evaluation holds (eval/<dataset>.lock) or that the training run
removes meanwhile (train.keep_last); metrics.json is written last, so a checkpoint whose evaluation was killed
counts as not scored.
Without config=, the run's config.yaml is used (a checkpoint copied out of its run: the config.yaml it holds), with
the data window the checkpoint's adapters record (the run's config may hold a later resume's); an export: the model
settings, precision and data window of its adapter_config.json, over a config.yaml beside it, with a warning where
an older export records no window. key=value pairs (eval.*, data.*, model.*) override it. The adapters are
evaluated only on the frozen base they were trained on: a checkpoint's train state and an export's
adapter_config.json record model.checkpoint's content fingerprint (and the LoRA scale), and another base exits 2
naming model.checkpoint (the same files at any path are taken).
The files read (adapters/, or ds/ for a rebuild, and the train state) must match the CRC-32s of the checkpoint's
COMPLETE marker (a marker written before markers recorded them is not verified): a damaged checkpoint is named with
its damaged file, and a run directory's other checkpoints are evaluated still.
The outputs go to eval.out_dir where set; a checkpoint or export this user cannot write into needs it (exit 2 before
the model is built, naming the folder).
Exit codes: 0 evaluated (or, for a run directory, nothing left to evaluate), 2 a missing, incomplete or damaged
checkpoint, adapters that do not fit the model, or a bad config or dataset; other: the evaluation failed.
"""
from __future__ import annotations

import errno
import os
import shutil
import sys

from one4d_train.config import ConfigError, load_config
from one4d_train.eval.claim import Busy
from one4d_train.eval.pipeline import (BENCHMARKS, EvalInputError, checkpoints_to_evaluate, dataset_tag,
                                       eval_dataset, evaluate_checkpoint, log_pending, resolve_device, run_of,
                                       scored, scoring_settings, tracked_run)
from one4d_train.model.adapters import (CONFIG_NAME, PRECISION_KEYS, SAMPLE_KEYS, WINDOW_KEYS, AdapterError,
                                        read_adapter_config)
from one4d_train.model.attention import attention_problems
from one4d_train.model.fp8 import fp8_problems
from one4d_train.model.encoders import vae_kernel_problems
from one4d_train.train.checkpoint import MARKER, CheckpointDamaged, broken_checkpoints, checkpoint_problem, config_of
from one4d_train.train.warm_start import trained_identity
from one4d_train.train.one4d_task import (identity_problems, index_problems, link_problems, model_file_problems,
                                          unset_file_problems)


def export_settings(export: str) -> list[str]:
    """The model settings an export records (preset, design, image input, LoRA shape and scale, link blocks, the
    precision it was trained in) and its training's data window (data.num_frames, frame_stride, height, width,
    pointmap_percentiles) and held-out sample choice (data.shuffle_buffer) as key=value items: without config= its
    model is built, and sampled, as it was trained, not from the defaults; the model files (model.checkpoint,
    model.vae, ...) are still the config's or the command line's."""
    c = read_adapter_config(export)
    lora = c["lora"]
    items = [f"model.preset={c['preset']}", f"model.design={c['design']}",
             f"model.has_image_input={c['has_image_input']}",
             f"model.lora.rank={lora['rank']}", f"model.lora.alpha={lora['alpha']}",
             f"model.link_blocks=[{','.join(str(b) for b in c['link_blocks'])}]",
             f"model.num_links={len(c['link_blocks'])}"]  # [] alone means num_links evenly spaced
    if isinstance(lora.get("targets"), list) and lora["targets"]:
        items.append(f"model.lora.targets=[{','.join(lora['targets'])}]")
    if isinstance(c.get("xyz_patch_embedding"), bool):
        items.append(f"model.xyz_patch_embedding={c['xyz_patch_embedding']}")
    items += [f"model.{key}={c[key]}" for key in PRECISION_KEYS if key in c]  # its training's precision
    return items + window_settings(c)


def window_settings(adapter_config: dict) -> list[str]:
    """The data window an adapter_config.json records (data.num_frames, frame_stride, height, width,
    pointmap_percentiles) and the settings that pick the held-out samples (data.shuffle_buffer, where recorded) as
    key=value items; none where it records none (written before it did)."""
    window = adapter_config.get("data") or {}  # (checked by read_adapter_config)
    keys = (*WINDOW_KEYS, *(k for k in SAMPLE_KEYS if k in window)) if window else ()
    return [f"data.{key}=[{','.join(str(v) for v in window[key])}]" if isinstance(window[key], list) else
            f"data.{key}={window[key]}" for key in keys]


def write_failure_in(exc: OSError, out_dir: str) -> bool:
    """Whether `exc` is a failure to write the evaluation's outputs: a full disk or quota or a read-only file system
    anywhere, a permission refused inside `out_dir` (one refused elsewhere is a file it reads: another problem)."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
        return True
    where = os.path.abspath(str(exc.filename or ""))
    return exc.errno in (errno.EACCES, errno.EPERM) and bool(exc.filename) and \
        (where + os.sep).startswith(os.path.abspath(out_dir) + os.sep)


def write_failure(exc: OSError) -> str:
    """A failure to write (write_failure_in) as one line: what, where, and the space left there."""
    where = exc.filename or ""
    line = f"{exc.strerror or exc}" + (f": {where}" if where else "")
    probe = os.path.abspath(str(where)) if where else ""
    while probe and not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if probe and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        line += f" ({shutil.disk_usage(probe).free / 1e9:.1f} GB free there)"
    return line


def say_pending_logged(cfg, ckpt: str, tag: str, step: int | None) -> None:
    """A scored checkpoint skipped by a scan: the scores its scoring could not log to MLflow are logged now."""
    logged = log_pending(cfg, ckpt, tag, step or 0)
    if logged:
        print(f"one4d eval: {ckpt}: {logged}", file=sys.stderr)


def out_dir_problems(ecfg, checkpoint: str | None = None) -> list[tuple[str, str]]:
    """eval.out_dir must be a folder or a path one can be made at, by this user, outside any checkpoint or export
    but the eval/ folder of the one evaluated (`checkpoint`): a file there (or above it) was a FileExistsError, a
    read-only place an OSError, after the model was built; inside a checkpoint the outputs became part of it (its
    adapters/ copied into exports, another checkpoint's scores overwritten and then trusted by scans)."""
    if not ecfg.out_dir:
        if not checkpoint:
            return []
        # the default folder, <checkpoint>/eval: a read-only checkpoint or export (another user's, a read-only
        # mount) was a PermissionError traceback where it was made
        folder = os.path.join(checkpoint, "eval")
        where = folder if os.path.isdir(folder) else checkpoint
        if os.access(where, os.W_OK | os.X_OK, effective_ids=os.access in os.supports_effective_ids):
            return []
        return [("eval.out_dir", f"not set, and {where} is not writable by this user: the outputs go to {folder}/ "
                                 "by default; name a folder of yours for them with eval.out_dir=DIR (one checkpoint "
                                 "or export at a time)")]
    path = os.path.abspath(ecfg.out_dir)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    fix = "name a new or existing folder for the evaluation's outputs"
    if not os.path.isdir(path):
        where = "is a file" if path == os.path.abspath(ecfg.out_dir) else f"is under {path}, which is a file"
        return [("eval.out_dir", f"{ecfg.out_dir} {where}: {fix}")]
    if not os.access(path, os.W_OK | os.X_OK):
        return [("eval.out_dir", f"{ecfg.out_dir}: {path} is not writable by this user: {fix}")]
    own = os.path.realpath(os.path.join(checkpoint, "eval")) if checkpoint else None
    target = os.path.realpath(ecfg.out_dir)
    in_own = bool(own) and (target + os.sep).startswith(own + os.sep)  # the evaluated one's eval/ (or below)
    inside = path
    while True:
        allowed = in_own and os.path.realpath(inside) == os.path.dirname(own)
        for marker, what in ((MARKER, "checkpoint"), (CONFIG_NAME, "export")):
            if os.path.isfile(os.path.join(inside, marker)) and not allowed:
                return [("eval.out_dir", f"{ecfg.out_dir} is inside {what} {inside}: {fix} outside checkpoints "
                                         "and exports, or in the eval/ folder of the one evaluated")]
        if os.path.dirname(inside) == inside:
            return []
        inside = os.path.dirname(inside)


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__.strip() + "\n\nexample (the run of `one4d train --help`'s first example, held-out shards of `one4d demo`):\n"
              "  one4d eval checkpoint=runs/mine data.val_shards=runs/demo/val_shards eval.modes=[video] eval.steps=20")
        return 0
    target = [a.split("=", 1)[1] for a in argv if a.startswith("checkpoint=")]
    rest = [a for a in argv if not a.startswith("checkpoint=")]
    if len(target) != 1:
        print("one4d eval: give exactly one checkpoint=<checkpoint dir, export dir or run dir>", file=sys.stderr)
        return 2
    try:
        checkpoints = checkpoints_to_evaluate(target[0])
    except EvalInputError as exc:
        print(f"one4d eval: {exc}", file=sys.stderr)
        return 2
    # a run directory: its checkpoints were listed once, and the training run may prune them or another job score them
    scan = os.path.isdir(os.path.join(target[0], "checkpoints"))
    damaged = []  # step folders whose files changed after their save, and the checkpoints that fail to load below
    for path, problem, _ in broken_checkpoints(os.path.join(target[0], "checkpoints")) if scan else []:
        print(f"one4d eval: skipping {path}, damaged: {problem}", file=sys.stderr)
        damaged.append(path)
    if not checkpoints:
        print(f"one4d eval: nothing to evaluate under run directory {target[0]}: no complete checkpoint")
        return 2 if damaged else 0
    done = []
    for ckpt in checkpoints:
        try:
            run_dir, run_id, step = run_of(ckpt)
            trained = trained_identity(ckpt)
        except CheckpointDamaged as exc:  # its marker or train state: a key missing, a file this user may not read
            if not scan:
                print(f"one4d eval: {exc}", file=sys.stderr)
                return 2
            print(f"one4d eval: skipping {ckpt}: {exc}", file=sys.stderr)
            damaged.append(ckpt)
            continue
        except AdapterError as exc:
            print(f"one4d eval: {exc}", file=sys.stderr)
            return 2
        args = list(rest)
        windowless = False  # an export that records no data window, none given here either
        run_config = config_of(ckpt)  # its run's config.yaml, else the checkpoint's own
        if not any(a.startswith("config=") for a in args):
            if os.path.isfile(os.path.join(ckpt, CONFIG_NAME)):  # an export, wherever it lies: it names its model
                run_config = os.path.join(os.path.dirname(os.path.abspath(ckpt)), "config.yaml")
                try:
                    args[:0] = export_settings(ckpt)
                except AdapterError as exc:
                    print(f"one4d eval: {exc}", file=sys.stderr)
                    return 2
                windowless = not any(a.startswith("data.height=") for a in args)
            elif os.path.isfile(os.path.join(ckpt, "adapters", CONFIG_NAME)):
                # a checkpoint is sampled at the window it was trained at, which a later resume of its run may
                # have changed in the run's config.yaml (its export would be sampled at its own)
                try:
                    args[:0] = window_settings(read_adapter_config(os.path.join(ckpt, "adapters")))
                except AdapterError as exc:
                    print(f"one4d eval: {exc}", file=sys.stderr)
                    return 2
            run_config = run_config if run_config and os.path.exists(run_config) else ""
            if run_config:  # (an export: a config.yaml beside it)
                args.insert(0, f"config={run_config}")
        try:
            cfg = load_config(args + ([f"run_dir={run_dir}"] if run_dir else []), checks=lambda c: (
                link_problems(c.model) + unset_file_problems(c.model) + model_file_problems(c) +
                identity_problems(c, ckpt, trained, action="evaluate") +
                out_dir_problems(c.eval, ckpt) + c.tracking.problems() +
                vae_kernel_problems(c.model, resolve_device(c.train.device)) + attention_problems(c.model.attention) +
                fp8_problems(c.model.base_matmul, resolve_device(c.train.device))))
            if scan and cfg.eval.out_dir:  # one folder for every checkpoint: each would overwrite the last
                raise ConfigError(f"key 'eval.out_dir': names the folder of one checkpoint's evaluation; the "
                                  f"checkpoints of run directory {target[0]} are each scored into their own eval/ "
                                  f"folder (leave eval.out_dir empty, or name one checkpoint)")
            if windowless:
                d = cfg.data
                print(f"one4d eval: warning: {ckpt} records no data window (an export written before exports "
                      f"recorded it): sampling at data.num_frames={d.num_frames} frame_stride={d.frame_stride} "
                      f"height={d.height} width={d.width} from {run_config or 'the defaults'}; if it was "
                      "trained at another window, give config= (its run's config.yaml) or data.* to match",
                      file=sys.stderr)
            spec = eval_dataset(cfg)
            tag = dataset_tag(spec)
            if spec.partition(":")[0] not in BENCHMARKS:  # a benchmark's window is checked per sequence
                problems = index_problems(cfg, spec, key="eval.dataset" if cfg.eval.dataset else "data.val_shards")
                if problems:
                    raise ConfigError("; ".join(f"key '{k}': {v}" for k, v in problems))
        except ConfigError as exc:
            print(f"config error: {exc}", file=sys.stderr)
            return 2
        except EvalInputError as exc:
            print(f"one4d eval: {exc}", file=sys.stderr)
            return 2
        differ = scored(ckpt, tag, scoring_settings(cfg, spec)) if scan else None
        if differ and cfg.eval.rescore == "never":
            print(f"one4d eval: skipping {ckpt}: scored on this dataset with other settings ({', '.join(differ)}), "
                  f"kept (eval.rescore=never)", file=sys.stderr)
            say_pending_logged(cfg, ckpt, tag, step)  # scores its scoring could not log to MLflow
            done.append(ckpt)
            continue
        if differ == []:
            print(f"one4d eval: skipping {ckpt}: scored on this dataset already "
                  f"(its eval/ holds the metrics.json; name the checkpoint to score it again)",
                  file=sys.stderr)
            say_pending_logged(cfg, ckpt, tag, step)  # scores its scoring could not log to MLflow
            done.append(ckpt)
            continue
        if differ:  # a table of the run's checkpoints would mix settings (or the rules of an earlier version)
            print(f"one4d eval: scoring {ckpt} again: its scores on this dataset were made with other settings "
                  f"({', '.join(differ)})", file=sys.stderr)
        run_id, untracked = tracked_run(cfg, run_dir, run_id)
        logged = f"MLflow run {run_id}" if run_id else "not logged to MLflow" + (f": {untracked}" if untracked else "")
        at = f"step {step}, " if step is not None else ""
        into = os.path.join(ckpt, "eval", tag) if not cfg.eval.out_dir else cfg.eval.out_dir
        print(f"evaluating {ckpt} on {cfg.eval.dataset or cfg.data.val_shards} ({at}{logged}) into {into}")
        try:
            if evaluate_checkpoint(cfg, ckpt, run_id=run_id, step=step, unscored_only=scan) is None:
                print(f"one4d eval: skipping {ckpt}: another evaluation scored it meanwhile", file=sys.stderr)
        except Busy as exc:
            print(f"one4d eval: {'skipping ' if scan else ''}{ckpt}: {exc}", file=sys.stderr)
            if not scan:
                return 2
        except CheckpointDamaged as exc:  # its other checkpoints are still scored: one damaged file spoils one step
            if scan and checkpoint_problem(ckpt):  # a file missing: pruned meanwhile, as below
                print(f"one4d eval: skipping {ckpt}: removed by the training run while it was being evaluated",
                      file=sys.stderr)
                continue
            print(f"one4d eval: {'skipping ' + ckpt + ': ' if scan else ''}{exc}", file=sys.stderr)
            if not scan:
                return 2
            damaged.append(ckpt)
        except (AdapterError, EvalInputError, OSError) as exc:
            # a scan's checkpoint can be pruned (train.keep_last) or set aside by a resume while it is evaluated
            if scan and checkpoint_problem(ckpt):
                print(f"one4d eval: skipping {ckpt}: removed by the training run while it was being evaluated "
                      f"({exc})", file=sys.stderr)
                continue
            if isinstance(exc, OSError):
                if not write_failure_in(exc, into):
                    raise
                print(f"one4d eval: {ckpt}: its outputs cannot be written: {write_failure(exc)}; it does not count "
                      "as scored (metrics.json is written last)", file=sys.stderr)
                return 1
            print(f"one4d eval: {ckpt}: {exc}", file=sys.stderr)
            return 2
    if done and len(done) == len(checkpoints):
        print(f"one4d eval: nothing to evaluate under run directory {target[0]}: its {len(done)} complete "
              f"checkpoint(s) are scored on this dataset already (eval/{tag}/metrics.json)")
    if damaged:
        print(f"one4d eval: {len(damaged)} damaged checkpoint(s) not evaluated: {', '.join(damaged)}", file=sys.stderr)
        return 2
    return 0
