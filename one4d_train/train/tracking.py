"""MLflow tracking, written by rank 0 only (other ranks get `NullTracker`).

Default store: `sqlite:///<run_dir>/mlflow.db`, artifacts in `<run_dir>/mlartifacts/`; `tracking.uri` points at a
server instead. A new store starts as a copy of an empty one with MLflow's schema (seed_store). The run id is kept
in the train state so a resumed job continues the same run. A run directory moved or copied to another path takes
its store along, whose artifact locations are made to follow it.

A start whose store fails (a tracking server down while a requeued job starts at night) is tried three times, 10 and
30 s apart; then the job trains without tracking, saying so, and keeps the run id it resumed with, so that the next
resume continues that MLflow run. Once the run has started, a write that fails (a tracking server down or
restarting, a SQLite store on a network filesystem whose lock is held past MLflow's 20 s busy timeout, an artifact
folder gone) costs that record, not the training: it is logged as a warning and counted (`failed_writes`, reported
when the run ends), and the writes of the next BREAK_S seconds are skipped and counted too, so that a store that
hangs does not hold every logging step; the run's end is always tried. MLflow's own HTTP retries (7, with backoff:
minutes per request to a server that is down) are bounded for the trainer unless the environment sets them
(HTTP_LIMITS). Hours of training, or the checkpoint a preempted job has just written, are not lost to the tracker.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import math
import os
import shutil
import sqlite3
import time
import uuid

log = logging.getLogger(__name__)

MAX_PARAM_LEN = 6000  # MLflow's limit on a param value
BATCH = 100  # MLflow's limit on params per log_batch
RUN_DIR_TAG = "one4d.run_dir"  # the run directory that a training run's MLflow run records
RUN_DIR_ID_TAG = "one4d.run_dir_id"  # and that directory's own id: one path can name folders on several machines
RUN_DIR_ID_FILE = "run_dir_id"
START_WAITS_S = (10, 30)  # the waits before the second and the third try of a start whose store fails
BREAK_S = 300.0  # after a failed write, the writes of this long are skipped (counted), then tried again
# MLflow's retries of an HTTP request (defaults 7 tries, 120 s timeout, backoff factor 2), bounded for training: a
# request to a server that is down then fails in ~15 s (refused) to ~2 min (unanswered), not ~4 to 15 min
HTTP_LIMITS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
               "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "2"}
UNSET = "<unset>"  # a resumed_with.KEY tag's value for a key the resumed run's config no longer has


class NullTracker:
    run_id: str | None = None
    failed_writes = 0  # writes that failed or were skipped after a failure (MlflowTracker)
    disabled = False  # the start failed: nothing is recorded (MlflowTracker)

    def start(self, run_id: str | None, params: dict, tags: dict | None = None, same_config: bool = True) -> str | None:
        return run_id

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def log_artifacts(self, local_dir: str, artifact_path: str | None = None) -> None: ...

    def log_text(self, text: str, name: str) -> None: ...

    def end(self, status: str = "FINISHED") -> None: ...


def _said(exc: Exception) -> str:
    """An exception in one line: SQLAlchemy's messages go on with the statement, its parameters and a link, left out
    (the cause comes first)."""
    said = " ".join(line.strip() for line in str(exc).splitlines()
                    if line.strip() and not line.startswith(("[SQL", "[parameters", "(Background")))
    return f"{type(exc).__name__}: {said[:400]}"


def _survivable(breaks: bool = True):
    """A write after the run started: one that raises is logged, counted and skipped (see the module's doc);
    `breaks`: skipped as well while the store failed moments ago (BREAK_S; the run's end is tried all the same)."""
    def wrap(write):
        signature = inspect.signature(write)

        @functools.wraps(write)
        def guarded(self, *args, **kwargs):
            if self.disabled:  # the start failed: this job trains without tracking (start)
                return None
            if breaks and self.failing_since is not None and time.monotonic() - self.failing_since < self.break_s:
                self.failed_writes += 1  # skipped: the store failed moments ago
                return None
            try:
                done = write(self, *args, **kwargs)
                self.failing_since = None
                return done
            except Exception as exc:  # noqa: BLE001 - any store failure; KeyboardInterrupt and the like still pass
                self.failed_writes += 1
                self.failing_since = time.monotonic()
                step = signature.bind(self, *args, **kwargs).arguments.get("step")
                log.warning("MLflow: %s%s failed, training goes on without it (%d failed write(s) so far; the writes "
                            "of the next %.0f s are skipped, then tried again): %s", write.__name__,
                            "" if step is None else f" of step {step}", self.failed_writes, self.break_s, _said(exc))
        return guarded
    return wrap


class MlflowTracker(NullTracker):
    def __init__(self, run_dir: str, tracking_cfg, run_name: str):
        import mlflow
        from mlflow.tracking import MlflowClient

        for key, value in HTTP_LIMITS.items():
            os.environ.setdefault(key, value)
        self.run_dir = run_dir = os.path.abspath(run_dir)
        self.uri = tracking_cfg.uri or f"sqlite:///{os.path.join(run_dir, 'mlflow.db')}"
        self.artifact_location = None if tracking_cfg.uri else "file://" + os.path.join(run_dir, "mlartifacts")
        if self.artifact_location:
            seed_store(os.path.join(run_dir, "mlflow.db"))
            _follow_moved_run_dir(os.path.join(run_dir, "mlflow.db"), self.artifact_location, run_dir)
        self.client = MlflowClient(tracking_uri=self.uri)
        self.mlflow, self.cfg, self.run_name = mlflow, tracking_cfg, run_name
        self.run_id = None
        self.logged_through = {}  # metric key -> the last step the continued run holds of it (_logged_steps)
        self.trained_through = -1  # the last step it holds training metrics of
        self.failed_writes = 0  # writes after the start that raised (_survivable)
        self.disabled = False  # the start failed every try: no writes this job (start)
        self.start_waits_s, self.break_s = START_WAITS_S, BREAK_S
        self.failing_since = None  # time.monotonic() of the last failed write, while writes are skipped

    def _experiment_id(self) -> str:
        exp = self.client.get_experiment_by_name(self.cfg.experiment)
        if exp is not None:
            return exp.experiment_id
        return self.client.create_experiment(self.cfg.experiment, artifact_location=self.artifact_location)

    def start(self, run_id: str | None, params: dict, tags: dict | None = None, same_config: bool = True) -> str:
        """Continue `run_id`, or start a new run when it is None; log `params` and set `tags` (on a continued run too:
        what this start decided, replacing the last start's). `same_config`: the
        checkpoint the job resumed was trained with the config it runs (run_dir and resume aside), so the steps it
        trains again repeat those the run holds (_logged_steps); False: their values are new, and are logged.
        A store that fails is tried again (start_waits_s), then left for this job (see the module's doc)."""
        for attempt, wait in enumerate((*self.start_waits_s, None), 1):
            try:
                return self._start(run_id, params, tags, same_config)
            except Exception as exc:  # noqa: BLE001 - any store failure
                said = _said(exc)
                active = self.mlflow.active_run()
                if active is not None:  # the run began; what failed after it is lost, as a later write would be
                    self.run_id = active.info.run_id
                    self.failed_writes += 1
                    log.warning("MLflow: run %s started, but recording its parameters failed (%s): training goes on",
                                self.run_id, said)
                    return self.run_id
                if wait is None:
                    self.disabled, self.run_id = True, run_id
                    log.error("MLflow: the store %s failed %d times at the start (%s): this job trains WITHOUT "
                              "tracking%s", self.uri, attempt, said,
                              f"; its checkpoints keep MLflow run {run_id}, which the next resume continues"
                              if run_id else "; the next resume starts an MLflow run")
                    return run_id
                log.warning("MLflow: the start failed (%s): trying again in %d s", said, wait)
                time.sleep(wait)

    def _start(self, run_id: str | None, params: dict, tags: dict | None, same_config: bool) -> str:
        self.mlflow.set_tracking_uri(self.uri)
        system = self.cfg.system_metrics
        if system:
            try:
                import psutil  # noqa: F401
            except ImportError:
                log.warning("tracking.system_metrics needs psutil, which is not installed: system metrics off")
                system = False
        run_dir_id = self._run_dir_id()
        held = self._continuable(run_id) if run_id is not None else None
        run_id = held.info.run_id if held is not None else None
        self._end_dead_runs(run_dir_id, keep=run_id)
        if run_id is None:
            tags = {**(tags or {}), RUN_DIR_TAG: self.run_dir, RUN_DIR_ID_TAG: run_dir_id}
            run = self.mlflow.start_run(experiment_id=self._experiment_id(), run_name=self.run_name, tags=tags,
                                        log_system_metrics=system)
        else:
            run = self.mlflow.start_run(run_id=run_id, log_system_metrics=system)
            if tags:  # what this start decided (the checkpointing unit `auto` picked on its nodes, say)
                self.mlflow.set_tags(tags)
        self.run_id = run.info.run_id
        if run_id is not None and same_config:  # before the params: a start that fails there has it still
            self._logged_steps(held)
        self._log_params(params, resumed=run_id is not None)
        if run_id is not None and not same_config:
            log.info("MLflow run %s continues under another config than its checkpoint's: a step it trains again "
                     "(one the run holds already) is logged again, with its new values", self.run_id)
        return self.run_id

    def _continuable(self, run_id: str):
        """The run `run_id` as this store holds it, where it is there and not deleted; else None, saying so: a
        tracking.uri changed since the run started (a team server from now on), a store replaced or a run deleted
        (MLflow refused to continue it, with a traceback after the checkpoint was loaded). The job then records
        into a new run, with a warning; the steps before stay where they were logged. A run of another experiment
        than tracking.experiment is continued where it is, saying so."""
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode

        try:
            run = self.client.get_run(run_id)
            missing = "deleted in" if run.info.lifecycle_stage == "deleted" else None
        except MlflowException as exc:
            if exc.error_code != ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
                raise
            missing = "not in"
        if missing:
            log.warning("the checkpoint's MLflow run %s is %s the store at %s (tracking.uri changed since the run "
                        "started, or the store replaced?): this job records into a new MLflow run there; the steps "
                        "before it stay where they were logged", run_id, missing, self.uri)
            return None
        experiment = self.client.get_experiment(run.info.experiment_id).name
        if experiment != self.cfg.experiment:
            log.warning("MLflow run %s continues in its experiment %r: tracking.experiment=%r names the experiment of "
                        "new runs", run_id, experiment, self.cfg.experiment)
        return run

    def _logged_steps(self, run) -> None:
        """Read the last step the continued run holds of each metric: a job killed after logging steps past its
        last checkpoint left them there, and the resumed job trains and logs them again (the same values on the
        CPU), which showed twice in each metric's history. log_metrics leaves those steps out: training metrics
        up to the last step any of them was logged at, an evaluation's per key (one run again after a kill, or
        another dataset's scores logged into the run by `one4d eval`). MLflow's system metrics count steps of
        their own. `run` is the run as read before it was continued (_continuable): the latest value MLflow keeps
        per metric is the one at its largest step (its stores compare step, then time), so the metrics' histories
        are not read point by point."""
        for m in run.data.to_proto().metrics:
            if not m.key.startswith("system/"):
                self.logged_through[m.key] = max(m.step, self.logged_through.get(m.key, -1))
        self.trained_through = max((s for k, s in self.logged_through.items() if not k.startswith("eval/")),
                                   default=-1)
        if self.trained_through >= 0:
            log.info("MLflow run %s holds training metrics up to step %d: steps up to there are not logged again",
                     self.run_id, self.trained_through)

    def _run_dir_id(self) -> str:
        """This run directory's id, made on its first run: on a shared tracking server the same path may be another
        machine's folder (containers that all work in /workspace), whose runs are not ours to end."""
        path = os.path.join(self.run_dir, RUN_DIR_ID_FILE)
        os.makedirs(self.run_dir, exist_ok=True)
        try:
            with open(path, "x") as f:
                f.write(uuid.uuid4().hex)
        except FileExistsError:
            pass
        with open(path) as f:
            return f.read().strip()

    def _end_dead_runs(self, run_dir_id: str, keep: str | None) -> None:
        """Runs of this run directory still RUNNING belong to jobs that died without a word (SIGKILL, a node
        failure) before a checkpoint could carry their run on: one training job holds the run directory at a time
        (run_lock), so none is alive. They are ended as KILLED instead of showing as running for ever."""
        exp = self.client.get_experiment_by_name(self.cfg.experiment)
        if exp is None:
            return
        dead = self.client.search_runs([exp.experiment_id], filter_string="attributes.status = 'RUNNING' and "
                                       f"tags.`{RUN_DIR_ID_TAG}` = '{run_dir_id}'")
        for run in dead:
            if run.info.run_id != keep and run.data.tags.get(RUN_DIR_TAG) == self.run_dir:
                log.warning("MLflow run %s of this run directory was left RUNNING by a job that died before its "
                            "first checkpoint: ended as KILLED", run.info.run_id)
                self.client.set_terminated(run.info.run_id, "KILLED")

    def _log_params(self, params: dict, resumed: bool = False) -> None:
        """A new run logs `params`. A resumed one records what differs from what it logged (MLflow forbids
        rewriting a param) as tags `resumed_with.KEY` holding the value this job runs with: a value that changed,
        a key the run did not have (a param would read as if the run always had it), and UNSET for a key it no
        longer has; a tag set by an earlier resume is brought up to date too (back to the param's value when the
        change is undone). Values over MLflow's length limit are pointed at the config artifact, which holds them
        whole."""
        from mlflow.entities import Param, RunTag

        run = self.client.get_run(self.run_id)
        existing, existing_tags = run.data.params, run.data.tags
        new, tags = [], []
        for key, value in params.items():
            text = str(value)
            if len(text) > MAX_PARAM_LEN:
                text = text[: MAX_PARAM_LEN - 40] + " ...(truncated; see config.yaml)"
            tag = f"resumed_with.{key}"
            # what the run records now: the tag of the latest resume that changed the key (the only record of one
            # first set on a resume), else its param
            recorded, now = (existing_tags[tag], text[:5000]) if tag in existing_tags else (existing.get(key), text)
            if key not in existing and not resumed:
                new.append(Param(key, text))
            elif recorded != now:
                tags.append(RunTag(tag, text[:5000]))
        gone = set(existing) | {k[len("resumed_with."):] for k in existing_tags if k.startswith("resumed_with.")}
        tags += [RunTag(f"resumed_with.{k}", UNSET) for k in sorted(gone - params.keys())
                 if existing_tags.get(f"resumed_with.{k}") != UNSET]
        for i in range(0, len(new), BATCH):
            self.client.log_batch(self.run_id, params=new[i:i + BATCH])
        if tags:
            log.warning("resumed with changed config values (recorded as tags): %s", ", ".join(t.key for t in tags))
            for i in range(0, len(tags), BATCH):
                self.client.log_batch(self.run_id, tags=tags[i:i + BATCH])

    @_survivable()
    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Log the finite `metrics` at `step`, but for those the continued run holds at that step (_logged_steps)."""
        finite = {k: v for k, v in _finite(metrics).items() if step > (
            self.logged_through.get(k, -1) if k.startswith("eval/") else self.trained_through)}
        if finite:
            self.mlflow.log_metrics(finite, step=step)

    @_survivable()
    def log_artifacts(self, local_dir: str, artifact_path: str | None = None) -> None:
        self.mlflow.log_artifacts(local_dir, artifact_path)

    def add_to_run(self, run_id: str, metrics: dict[str, float], step: int, local_dir: str,
                   artifact_path: str) -> None:
        """Metrics and a folder of artifacts into an existing run, leaving its status alone: an evaluation job
        beside a training job that is still running must not mark that run FINISHED (nor reopen a finished one).
        A metric the run holds already at `step` with the same value is not logged again: a retry after a failure
        part-way (metrics logged, artifacts not) adds no second point."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        finite = [Metric(k, v, now, step) for k, v in _finite(metrics).items()
                  if not any(m.step == step and m.value == v for m in self.client.get_metric_history(run_id, k))]
        for i in range(0, len(finite), BATCH):
            self.client.log_batch(run_id, metrics=finite[i:i + BATCH])
        self.client.log_artifacts(run_id, local_dir, artifact_path)

    @_survivable()
    def log_text(self, text: str, name: str) -> None:
        self.mlflow.log_text(text, name)

    @_survivable(breaks=False)
    def end(self, status: str = "FINISHED") -> None:
        """Mark the run `status`; one left RUNNING by a failed end is ended when the run directory starts again."""
        if self.run_id is not None:
            self.mlflow.end_run(status)
        if self.failed_writes:
            log.warning("MLflow: %d write(s) to %s failed during this run (warnings above): the run lacks those "
                        "records", self.failed_writes, self.uri)


def seed_store(db: str) -> None:
    """Start a new run directory's store `db` as a copy of an empty database that holds MLflow's schema, made once
    per MLflow version under $XDG_CACHE_HOME/one4d (~/.cache/one4d): MLflow builds a new store by running its ~50
    schema migrations, ~1.5-2 s at every run directory's first start. The copy is hard-linked into place, so a
    store made meanwhile by another process is kept; on any failure (a file system without hard links, say) MLflow
    creates the store as before."""
    if os.path.exists(db):
        return
    try:
        template = _schema_template()
        os.makedirs(os.path.dirname(db) or ".", exist_ok=True)
        tmp = f"{db}.{uuid.uuid4().hex}.tmp"
        try:
            shutil.copyfile(template, tmp)
            os.link(tmp, db)  # FileExistsError where another process made the store meanwhile: theirs stays
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except Exception as exc:  # noqa: BLE001 - an optimisation only: MLflow makes the store itself
        log.debug("MLflow store %s not seeded from a schema copy (%s): MLflow creates it", db, exc)


def _schema_template() -> str:
    """The cached empty database with this MLflow version's schema; made (again, where damaged) here."""
    import urllib.parse

    import mlflow
    import sqlalchemy
    from mlflow.store.db.utils import _initialize_tables  # what MLflow's SQL store runs on a new database

    cache = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser(os.path.join("~", ".cache")), "one4d")
    template = os.path.join(cache, f"mlflow-{mlflow.__version__}-schema.db")

    def intact() -> bool:
        try:
            uri = f"file:{urllib.parse.quote(template)}?mode=ro"
            with contextlib.closing(sqlite3.connect(uri, uri=True)) as con:
                return bool(con.execute("select version_num from alembic_version").fetchone())
        except sqlite3.Error:
            return False

    if os.path.isfile(template) and intact():
        return template
    os.makedirs(cache, exist_ok=True)
    tmp = f"{template}.{uuid.uuid4().hex}.tmp"
    try:
        engine = sqlalchemy.create_engine(f"sqlite:///{tmp}")
        try:
            _initialize_tables(engine)
        finally:
            engine.dispose()
        os.replace(tmp, template)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    if not intact():
        raise RuntimeError(f"{template}: no schema version after MLflow's migrations")
    return template


def _follow_moved_run_dir(db: str, location: str, run_dir: str) -> None:
    """MLflow's store records absolute artifact locations, made in the run directory's first path: after the
    directory moved (or was copied) new artifacts went to the old path, re-created there or failing where it is no
    longer writable, and the runs' one4d.run_dir tags named the old path. Both are rewritten to this path in the
    store's database, which MLflow's client has no call for (the experiments' and runs' locations, and the tags)."""
    if not os.path.isfile(db):
        return
    with contextlib.closing(sqlite3.connect(db, timeout=60)) as con, con:
        if not con.execute("select 1 from sqlite_master where type = 'table' and name = 'experiments'").fetchone():
            return
        old = [row[0] for row in con.execute("select artifact_location from experiments where artifact_location "
                                             "like 'file://%/mlartifacts' and artifact_location != ?", (location,))]
        for prev in old:
            prev_dir = os.path.dirname(prev[len("file://"):])
            log.warning("the run directory moved from %s: MLflow's artifact locations now follow it to %s",
                        prev_dir, run_dir)
            con.execute("update experiments set artifact_location = ? where artifact_location = ?", (location, prev))
            con.execute("update runs set artifact_uri = ? || substr(artifact_uri, ?) where artifact_uri like ?",
                        (location, len(prev) + 1, prev + "/%"))
            con.execute("update tags set value = ? where key = ? and value = ?",
                        (run_dir, RUN_DIR_TAG, prev_dir))


def _finite(metrics: dict) -> dict[str, float]:
    """The metrics MLflow can hold: None, NaN and inf values left out (a skipped step's loss, say)."""
    return {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}


def build_tracker(cfg, is_main: bool) -> NullTracker:
    return MlflowTracker(cfg.run_dir, cfg.tracking, cfg.name) if is_main else NullTracker()
