"""Training configuration: optimiser, engine, checkpoints, tracking (the `optim.`, `train.`, `tracking.` subtrees),
and `preflight`: what `one4d train` checks beyond valid values before any process group starts."""
from __future__ import annotations

import importlib
import os
import re
from dataclasses import dataclass, field
from typing import Any

from one4d_train.configtools import choice, in_range, to_yaml


@dataclass
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup_steps: int = 0
    schedule: str = "constant"  # constant | cosine (after warmup)
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of lr
    grad_clip: float = 1.0  # 0 = off

    def validate(self):
        p = choice(self.schedule, ["constant", "cosine"], "schedule")
        p += in_range(self.min_lr_ratio, 0.0, 1.0, "min_lr_ratio") + in_range(self.grad_clip, 0.0, None, "grad_clip")
        p += in_range(self.weight_decay, 0.0, None, "weight_decay") + in_range(self.eps, 0.0, None, "eps")
        p += in_range(self.lr, 0.0, None, "lr") + in_range(self.warmup_steps, 0, None, "warmup_steps")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            p.append(("betas", f"must be two values in [0, 1), got {self.betas}"))
        return p


@dataclass
class TrainConfig:
    steps: int = 5500  # optimiser steps
    micro_batch_size: int = 1  # samples per rank per forward
    grad_accum: int = 1
    zero_stage: int = 3  # 2 | 3
    zero3_param_persistence_threshold: int = 100000  # ZeRO-3: parameters smaller than this stay replicated
    precision: str = "bf16"  # bf16 | fp32 (fp32 for exactness tests on CPU)
    device: str = "auto"  # auto | cuda | cpu
    checkpoint_every: int = 500
    keep_last: int = 3
    log_every: int = 10
    max_bad_steps: int = 5  # consecutive non-finite steps before the run stops
    deepspeed_overrides: dict[str, Any] = field(default_factory=dict)  # merged into the generated DeepSpeed config (reported)
    export_adapters: bool = True  # adapters/ in every checkpoint + the final MLflow upload; false: neither
    dist_timeout_s: int = 1800  # process-group timeout; must exceed any rank-0-only work inside task.evaluate
    task: str = ""  # "module:Class" of the TrainTask to train; empty = the One4D task (tests use tests.train_toy_task:ToyTask)
    peak_flops_per_device: float = 0.0  # for MFU; 0 = 989e12 on CUDA (H100 dense bf16), MFU not logged on CPU

    def validate(self):
        p = choice(self.zero_stage, [2, 3], "zero_stage") + choice(self.precision, ["bf16", "fp32"], "precision")
        p += choice(self.device, ["auto", "cuda", "cpu"], "device")
        p += in_range(self.steps, 1, None, "steps") + in_range(self.micro_batch_size, 1, None, "micro_batch_size")
        p += in_range(self.grad_accum, 1, None, "grad_accum") + in_range(self.checkpoint_every, 1, None, "checkpoint_every")
        p += in_range(self.keep_last, 1, None, "keep_last") + in_range(self.log_every, 1, None, "log_every")
        p += in_range(self.max_bad_steps, 1, None, "max_bad_steps") + in_range(self.dist_timeout_s, 1, None, "dist_timeout_s")
        p += in_range(self.peak_flops_per_device, 0.0, None, "peak_flops_per_device")
        p += in_range(self.zero3_param_persistence_threshold, 0, None, "zero3_param_persistence_threshold")
        if self.task and (self.task.count(":") != 1 or not all(self.task.split(":"))):
            p.append(("task", f"must be 'module:Class', got {self.task!r}"))
        if not isinstance(self.deepspeed_overrides, dict):
            p.append(("deepspeed_overrides", "must be a mapping"))
        return p


# the schemes MLflow's client opens a tracking store for (mlflow/tracking/_tracking_service/utils.py): a local
# folder (no scheme) or file:, a server, Databricks, SQLAlchemy's databases (with an optional +driver)
DATABASE_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")
TRACKING_SCHEMES = ("", "file", "http", "https", "databricks") + DATABASE_SCHEMES
USABLE_STORES = ("give sqlite:///PATH.db (or postgresql://, mysql://, mssql://), http(s)://SERVER or databricks; "
                 "empty: the run directory's own store")


def tracking_uri_problem(uri: str) -> str | None:
    """Why MLflow would refuse `uri` as a tracking store, or None. It is opened after the run directory is locked
    and the model built: a store it refuses was an MLflow exception then."""
    from importlib.metadata import entry_points
    from urllib.parse import urlparse

    parsed = urlparse(uri)
    # MLflow reads these bare words as schemes (Unity Catalog's two hold models, not runs)
    scheme = uri if uri in ("databricks", "databricks-uc", "uc") else parsed.scheme.lower().split("+")[0]
    if scheme in ("", "file"):
        refused = _file_store_refused()
        return (f"{uri!r} is a folder store, which MLflow {refused} refuses unless MLFLOW_ALLOW_FILE_STORE=true: "
                f"{USABLE_STORES}") if refused else None
    if scheme in ("http", "https") and not parsed.netloc:
        return f"{uri!r} names no server: write {scheme}://HOST[:PORT]"
    if scheme in DATABASE_SCHEMES:
        return _database_driver_problem(uri)
    if scheme in TRACKING_SCHEMES or scheme in {e.name for e in entry_points(group="mlflow.tracking_store")}:
        return None  # (an installed MLflow plugin's scheme)
    return f"{uri!r}: MLflow has no tracking store for scheme '{scheme}': {USABLE_STORES}"


def _database_driver_problem(uri: str) -> str | None:
    """Why SQLAlchemy, which MLflow opens a database store with, could not load the driver of `uri`, or None; loads
    the driver module only, connecting to nothing (a store missing its driver failed inside MLflow, after the run
    directory was locked and the model built)."""
    try:
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError, NoSuchModuleError
    except ImportError:
        return f"{uri!r} is a database store, which MLflow opens with SQLAlchemy: it is not installed"
    try:
        url = make_url(uri)
    except ArgumentError as exc:
        return f"{uri!r} is not a database URL SQLAlchemy reads: {exc}"
    try:
        url.get_dialect().import_dbapi()
    except NoSuchModuleError:
        return f"{uri!r}: SQLAlchemy has no driver '{url.drivername}'"
    except ImportError as exc:
        return (f"{uri!r}: SQLAlchemy's driver '{url.drivername}' needs the Python module "
                f"'{getattr(exc, 'name', None) or exc}', which is not installed: install it, or name an installed "
                f"driver as {url.get_backend_name()}+DRIVER://")
    return None


def _file_store_refused() -> str | None:
    """The installed MLflow's version where it refuses a folder as its tracking store (3.13 on, unless the
    environment opts in), else None."""
    from importlib.metadata import PackageNotFoundError, version

    if os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() in ("true", "1"):
        return None
    try:
        installed = version("mlflow")
        major, minor = (int(x) for x in re.findall(r"\d+", installed)[:2])
    except (PackageNotFoundError, ValueError):
        return None
    return installed if (major, minor) >= (3, 13) else None


@dataclass
class TrackingConfig:
    uri: str = ""  # empty = sqlite store inside the run directory; else an MLflow tracking URI (server)
    experiment: str = "one4d"
    system_metrics: bool = True  # MLflow's CPU/GPU/memory sampling (needs psutil)

    def validate(self):
        return [] if self.experiment else [("experiment", "must not be empty")]

    def problems(self) -> list[tuple[str, str]]:
        """The store against the installed MLflow: checked by the commands that open it (train, eval), not by
        those that only read a run's config (export, print-config, requeue), so a run logged to a store this
        MLflow no longer opens can still be exported."""
        problem = tracking_uri_problem(self.uri) if self.uri else None
        return [("tracking.uri", problem)] if problem else []


def preflight(cfg) -> list[tuple[str, str]]:
    """What `one4d train` checks on every rank before any process group starts, beyond valid values, as
    [(key, problem)]: the run directory holds no file where the run writes a folder and an intact MLflow store; the
    task class imports, and passes its own `check_config(cfg)` when it has one (the One4D task: model files, shards);
    the resume checkpoint is complete, of this job's world size, with a train state that reads; the DeepSpeed
    config with train.deepspeed_overrides merged is one DeepSpeed accepts and the trainer can count steps with."""
    from one4d_train.train import deepspeed_config
    from one4d_train.train.distributed import detect

    env = detect()
    problems = cfg.tracking.problems() + run_dir_problems(cfg.run_dir, cfg.tracking)
    problems += resume_problems(cfg.resume, cfg.run_dir, env.world_size, cfg.train, env.rank, to_yaml(cfg))
    task_cls, problem = task_class(cfg.train.task)
    if problem:
        problems.append(("train.task", problem))
    elif cfg.train.export_adapters and not callable(getattr(task_cls, "export", None)):
        problems.append(("train.export_adapters", f"the task {cfg.train.task} has no export method: set it false"))
    elif callable(getattr(task_cls, "check_config", None)):
        problems += task_cls.check_config(cfg)
    return problems + deepspeed_config.problems(cfg, env.world_size)


def ignored_settings(cfg) -> list[tuple[str, str]]:
    """Valid settings that have no effect in this config, as [(key, why)]: `one4d train` warns about them at the
    start (the run trains, just not as the setting suggests); the task's own `ignored_settings(cfg)` adds its keys."""
    o, t, d = cfg.optim, cfg.train, cfg.data
    notes = []
    if o.warmup_steps > t.steps:
        notes.append(("optim.warmup_steps", f"{o.warmup_steps} > train.steps={t.steps}: the run ends in its warmup, at "
                      f"{t.steps / o.warmup_steps:.3g} x optim.lr"))
    if o.schedule == "constant" and o.min_lr_ratio:
        notes.append(("optim.min_lr_ratio", f"{o.min_lr_ratio:g} is the cosine schedule's floor: optim.schedule=constant "
                      "ignores it"))
    if d.mode == "exact" and d.epoch_length:
        notes.append(("data.epoch_length", f"{d.epoch_length} sets data.mode=resampled's epochs: an exact-mode epoch is "
                      "every sample once"))
    if t.zero_stage == 2 and t.zero3_param_persistence_threshold != TrainConfig.zero3_param_persistence_threshold:
        notes.append(("train.zero3_param_persistence_threshold", "ZeRO-3 only: train.zero_stage=2 keeps every parameter "
                      "whole on each rank"))
    task_cls, problem = task_class(t.task)
    if not problem and callable(getattr(task_cls, "ignored_settings", None)):
        notes += task_cls.ignored_settings(cfg)
    return notes


def task_class(spec: str) -> tuple[type | None, str | None]:
    """(the TrainTask class `train.task` names (empty: the One4D task), None), or (None, why it cannot be
    loaded)."""
    from one4d_train.train.task import DEFAULT_TASK

    spec = spec or DEFAULT_TASK
    module, _, name = spec.partition(":")
    try:
        obj = getattr(importlib.import_module(module), name, None)
    except ImportError as exc:
        return None, f"cannot import module '{module}': {exc}"
    except Exception as exc:  # the module itself fails while importing
        return None, f"importing module '{module}' failed: {type(exc).__name__}: {exc}"
    if obj is None:
        return None, f"module '{module}' has no '{name}'"
    if not isinstance(obj, type):
        return None, f"'{spec}' is not a class"
    from one4d_train.train.task import TASK_METHODS

    missing = [m for m in TASK_METHODS if not callable(getattr(obj, m, None))]
    if missing:  # (a function or another class failed after the process group had started)
        return None, (f"'{spec}' is not a training task: it has no {', '.join(missing)} (the methods of "
                      "one4d_train/train/task.py's TrainTask)")
    return obj, None


RUN_DIR_FOLDERS = ("checkpoints", "eval", "mlartifacts")  # what training writes into as folders


def run_dir_problems(run_dir: str, tracking) -> list[tuple[str, str]]:
    """What in the run directory keeps a run from writing or tracking there, by key: a file where training makes a
    folder (found only at the first checkpoint, after the steps since the start were trained), an MLflow store
    (the default, tracking.uri empty) that SQLite cannot read."""
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        return [("run_dir", f"{run_dir} is a file, not a folder: give a folder (made when missing)")]
    p = [("run_dir", f"{os.path.join(run_dir, name)} is a file, not a folder: the run writes its {name} there; move "
          "the file away, or give another run_dir") for name in RUN_DIR_FOLDERS
         if os.path.lexists(os.path.join(run_dir, name)) and not os.path.isdir(os.path.join(run_dir, name))]
    # (found otherwise as a PermissionError traceback at the first write, or after the steps up to a checkpoint)
    p += [("run_dir", f"{folder} is not writable by this user, and the run writes into it: give it write "
           "permission, or another run_dir") for folder in (run_dir, os.path.join(run_dir, "checkpoints"))
          if os.path.isdir(folder) and not os.access(folder, os.W_OK | os.X_OK)]
    # the default store's address (sqlite:///RUN_DIR/mlflow.db) and artifact location (file://RUN_DIR/mlartifacts)
    # are URLs: a '?' or '#' in the path cut it there, and '%41' was read as 'A' (records and artifacts went to
    # another folder, or the store did not open)
    url_syntax = sorted(set(re.findall(r"[?#]|%[0-9A-Fa-f]{2}", os.path.abspath(run_dir))))
    if not tracking.uri and url_syntax:
        p.append(("run_dir", f"{run_dir} holds {', '.join(url_syntax)}, which the address of the run's MLflow store "
                  "(sqlite:///RUN_DIR/mlflow.db) reads as URL syntax, so its records would go to another folder: "
                  "give a run_dir without them, or a tracking.uri"))
    db = os.path.join(run_dir, "mlflow.db")
    if not tracking.uri and os.path.lexists(db):
        problem = sqlite_problem(db)
        if problem:
            p.append(("run_dir", f"{db}, the run's MLflow store, cannot be read: {problem}. Put back an intact copy, "
                      "or move it away and train into a new run_dir (resume=<a checkpoint of this run> carries the "
                      "weights and data position over; metrics go to a new MLflow store)"))
    return p


def sqlite_problem(path: str) -> str | None:
    """Why the SQLite database `path` is not intact, from its 100-byte header alone (every rank checks it, so
    nothing is opened: no lock waited for, no hot journal mistaken for damage, nothing read past the header): the
    format's magic string, a page size SQLite writes, and a file as long as the page count the header records
    (when that count is valid: SQLite's own check). None when it looks whole."""
    try:
        with open(path, "rb") as f:
            head = f.read(100)
        size = os.path.getsize(path)
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    if size == 0:  # SQLite's empty database
        return None
    if len(head) < 100 or not head.startswith(b"SQLite format 3\x00"):
        return "not an SQLite database (its header is not SQLite's)"
    page = int.from_bytes(head[16:18], "big")
    page = 65536 if page == 1 else page
    if page < 512 or page & (page - 1):
        return f"its header records a page size of {page} bytes, which SQLite never writes"
    pages, changes, valid_for = (int.from_bytes(head[i:i + 4], "big") for i in (28, 24, 92))
    # a write under way or killed part-way (its -journal or -wal beside, which SQLite rolls back or forward) may
    # leave the header ahead of the file's length
    pending = any(os.path.exists(path + suffix) and os.path.getsize(path + suffix) for suffix in ("-journal", "-wal"))
    if pages and changes == valid_for and size < pages * page and not pending:
        return f"{size} bytes, where its header records {pages} pages of {page} (cut short)"
    return None


def resume_problems(resume: str, run_dir: str, world_size: int, train, rank: int = 0,
                    config_text: str = "") -> list[tuple[str, str]]:
    """`resume` names a complete checkpoint (or `auto` finds one, or none) written by as many ranks as this job,
    under `train`'s (TrainConfig) ZeRO stage, precision and optimizer-state layout (deepspeed_config.LAYOUT_KEYS),
    whose train state (rank 0's and `rank`'s) reads. With
    resume=auto, a checkpoint whose train state fails its CRC-32 is left to the trainer, which sets it aside and
    falls back to an older one (as it does among the checkpoints a resume=PATH command went on to). A resume=PATH
    whose PATH is gone (pruned by train.keep_last) is checked as the newest checkpoint of the start this command
    (`config_text`, its config.yaml's text) made from PATH, where the trainer goes on (checkpoint.branch_progress)."""
    from one4d_train.train import checkpoint as ckpt

    ckpt_dir, went_on = os.path.join(run_dir, "checkpoints"), None
    try:  # the trainer's own choice
        path = ckpt.resolve_resume(resume, ckpt_dir)
    except FileNotFoundError:
        went_on, changes = (ckpt.branch_progress(ckpt_dir, resume, config_text) if config_text and
                            not os.path.isdir(resume) else (None, []))
        if went_on is None:
            return [("resume", _no_checkpoint(resume, ckpt_dir, changes))]
        path = went_on
    if path is None:
        refusal = ckpt.only_damaged_left(ckpt_dir) if resume == "auto" else None
        return [("resume", refusal)] if refusal else []
    chosen = (f"resume=auto chose {path}: " if resume == "auto" else
              f"resume={resume} goes on from {path}: " if went_on else f"{resume}: ")
    written = ckpt.marker_of(path).get("world_size")
    if written != world_size:
        return [("resume", f"{chosen}written by {written} ranks, this job has {world_size} "
                 f"rank{'s' if world_size != 1 else ''}: resume it with {written}")]
    try:
        state = ckpt.read_state_json(path, 0)
        ckpt.read_state_json(path, rank)
    except ckpt.CheckpointDamaged as exc:
        failed_crc = ckpt.damaged_files(path, [f"train_state/rank-{r:05d}.json" for r in {0, rank}])
        if failed_crc and (resume == "auto" or went_on):  # the trainer falls back (checkpoint.choose_resume)
            return []
        return [("resume", f"{chosen}{exc}. {ckpt.DAMAGED_ADVICE if failed_crc else ckpt.unloadable_advice(path)}")]
    except OSError:
        return []
    # DeepSpeed reads its optimizer files by stage and precision: another of either fails inside it
    return [(f"train.{key}", f"{now} here, {state[key]} in {chosen.rstrip(': ')}: DeepSpeed's checkpoint holds the "
             f"optimizer state as {key.replace('_', ' ')} {state[key]} writes it; resume with train.{key}="
             f"{state[key]}, or start a new run (another run_dir, or resume=never)")
            for key, now in (("zero_stage", train.zero_stage), ("precision", train.precision))
            if key in state and state[key] != now] + layout_problems(path, state, train)


def _no_checkpoint(resume: str, ckpt_dir: str, changes: list[str]) -> str:
    """Why `resume`, not a complete checkpoint, cannot be resumed: what it is instead, and what to give. `changes`:
    the keys whose value differs from the checkpoints that went on from it (its start, under another config)."""
    from one4d_train.train import checkpoint as ckpt

    if changes:
        return (f"{resume}: no such checkpoint directory (pruned?); the checkpoints in {ckpt_dir} go on from a start "
                f"made from it under another config ({', '.join(changes)} differ): run that command again, or "
                "resume=auto, to continue them")
    if not os.path.isdir(resume):
        hint = (f" (did you mean {resume.lower()}?)" if resume.lower() in ("auto", "never") else
                " (resume takes auto, never or the path of a checkpoint directory)")
        return f"{resume}: no such checkpoint directory{hint}"
    hint = (f": {resume} is a run directory; resume=auto with run_dir={resume} continues it"
            if os.path.isdir(os.path.join(resume, "checkpoints")) else "")
    if hint:
        return f"{resume}: not a complete checkpoint{hint}"
    return f"{resume}: not a complete checkpoint: {ckpt.checkpoint_problem(resume)}"


def layout_problems(path: str, state: dict, train) -> list[tuple[str, str]]:
    """The DeepSpeed settings that lay out the optimizer state (deepspeed_config.LAYOUT_KEYS) whose value under
    `train` differs from the one checkpoint `path` (rank 0's train state `state`) was written under, by key: DeepSpeed
    loads the state by position into whatever layout this config makes, silently wrong or failing inside it."""
    from one4d_train.train import checkpoint as ckpt
    from one4d_train.train import deepspeed_config

    if state.get("zero_stage", train.zero_stage) != train.zero_stage:  # refused as such
        return []
    saved = state.get("zero_layout")
    if not isinstance(saved, dict):  # written before checkpoints recorded it: what its config.yaml ran with
        saved = _layout_of_config(os.path.join(path, ckpt.CONFIG_FILE)) or {}
    now = deepspeed_config.optimizer_layout(train)
    return [(f"{deepspeed_config.KEY}.{key}", f"{now[key]!r} here, {saved[key]!r} in {path}: DeepSpeed's checkpoint "
             "holds the optimizer state flattened and partitioned as that setting lays it out, and loads it by "
             f"position; resume with {deepspeed_config.KEY}.{key}: {saved[key]!r} (or leave it out where that is "
             "DeepSpeed's default), or start a new run (another run_dir, or resume=never)")
            for key in sorted(saved.keys() & now.keys()) if saved[key] != now[key]]


def _layout_of_config(config_file: str) -> dict | None:
    """deepspeed_config.optimizer_layout of the train.* a checkpoint's config.yaml records (the config its job ran
    with), None when it does not read."""
    from omegaconf import OmegaConf

    from one4d_train.train import deepspeed_config

    try:
        train = OmegaConf.to_container(OmegaConf.load(config_file), resolve=True)["train"]
        saved = TrainConfig(**{k: train[k] for k in ("zero_stage", "precision", "deepspeed_overrides") if k in train})
    except Exception:  # none there (a copy without it), not YAML, not a mapping
        return None
    return deepspeed_config.optimizer_layout(saved)
