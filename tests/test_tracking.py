"""MLflow tracking against a real sqlite store, read back with MLflow's own client."""
import os
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
from mlflow.tracking import MlflowClient

from one4d_train.train.config import TrackingConfig, tracking_uri_problem
from one4d_train.train.tracking import MAX_PARAM_LEN, MlflowTracker, NullTracker, build_tracker


def test_run_in_run_dir_params_metrics_artifacts_and_resume(tmp_path):
    cfg = SimpleNamespace(uri="", experiment="exp", system_metrics=False)
    params = {f"p{i}": i for i in range(150)} | {"long": "x" * (MAX_PARAM_LEN + 10), "nested.key": [1, 2]}
    tracker = MlflowTracker(str(tmp_path), cfg, "name")
    run_id = tracker.start(None, params, tags={"one4d.checkpointing_unit": "sublayer_ffn"})
    tracker.log_metrics({"loss": 0.5, "nan": float("nan"), "none": None}, step=1)
    tracker.log_text("a: 1\n", "config.yaml")
    (tmp_path / "adapters").mkdir()
    (tmp_path / "adapters" / "a.safetensors").write_bytes(b"123")
    tracker.log_artifacts(str(tmp_path / "adapters"), "adapters")
    tracker.end("KILLED")
    assert os.path.isfile(tmp_path / "mlflow.db")

    resumed = MlflowTracker(str(tmp_path), cfg, "name")
    assert resumed.start(run_id, {**params, "p3": 33, "new": "v"}, tags={"one4d.checkpointing_unit": "block"}) == run_id
    resumed.log_metrics({"loss": 0.25}, step=2)
    resumed.end()

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("exp").experiment_id])
    assert [r.info.run_id for r in runs] == [run_id]
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["p149"] == "149" and run.data.params["p3"] == "3"
    assert "new" not in run.data.params and run.data.tags["resumed_with.new"] == "v"  # not a param it always had
    assert run.data.params["nested.key"] == "[1, 2]"
    assert len(run.data.params["long"]) <= MAX_PARAM_LEN and "see config.yaml" in run.data.params["long"]
    assert run.data.tags["resumed_with.p3"] == "33"
    assert run.data.tags["one4d.checkpointing_unit"] == "block"  # a continued run takes this start's tags
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")] == [(1, 0.5), (2, 0.25)]
    assert "nan" not in run.data.metrics
    assert {a.path for a in client.list_artifacts(run_id)} == {"config.yaml", "adapters"}
    assert client.get_experiment_by_name("exp").artifact_location.startswith(f"file://{tmp_path}/mlartifacts")
    stored = [os.path.join(d, f) for d, _, files in os.walk(tmp_path / "mlartifacts") for f in files]
    assert any(p.endswith(os.path.join(run_id, "artifacts", "adapters", "a.safetensors")) for p in stored)


def test_a_resume_whose_run_is_not_in_the_store_records_into_a_new_run_saying_so(tmp_path, caplog):
    """tracking.uri changed since the run started (a team server from now on), or the run deleted: MLflow refused
    to continue the checkpoint's run, with a traceback after the checkpoint was loaded. A new run takes the job's
    metrics, with a warning; a run of another experiment is continued where it is."""
    cfg = SimpleNamespace(uri="", experiment="exp", system_metrics=False)
    first = MlflowTracker(str(tmp_path / "run"), cfg, "name")
    run_id = first.start(None, {"a": 1})
    first.log_metrics({"loss": 0.5}, step=1)
    first.end("KILLED")

    server = SimpleNamespace(uri=f"sqlite:///{tmp_path / 'team.db'}", experiment="exp", system_metrics=False)
    moved = MlflowTracker(str(tmp_path / "run"), server, "name")
    new_id = moved.start(run_id, {"a": 1})
    moved.log_metrics({"loss": 0.25}, step=2)
    moved.end()
    assert new_id != run_id and f"the checkpoint's MLflow run {run_id} is not in the store at {server.uri}" \
        in caplog.text
    team = MlflowClient(server.uri)
    assert [(m.step, m.value) for m in team.get_metric_history(new_id, "loss")] == [(2, 0.25)]
    own = MlflowClient(f"sqlite:///{tmp_path / 'run' / 'mlflow.db'}")
    assert [(m.step, m.value) for m in own.get_metric_history(run_id, "loss")] == [(1, 0.5)]

    caplog.clear()
    other = MlflowTracker(str(tmp_path / "run"), SimpleNamespace(**{**vars(cfg), "experiment": "renamed"}), "name")
    assert other.start(run_id, {"a": 1}) == run_id
    other.end()
    assert f"MLflow run {run_id} continues in its experiment 'exp'" in caplog.text
    own.delete_run(run_id)
    again = MlflowTracker(str(tmp_path / "run"), cfg, "name")
    assert again.start(run_id, {"a": 1}) != run_id and f"{run_id} is deleted in the store" in caplog.text
    again.end()


def test_other_ranks_get_a_no_op_tracker(tmp_path):
    cfg = SimpleNamespace(run_dir=str(tmp_path), name="n", tracking=SimpleNamespace(uri="", experiment="e", system_metrics=False))
    tracker = build_tracker(cfg, is_main=False)
    assert type(tracker) is NullTracker and tracker.start("abc", {}) == "abc"
    tracker.log_metrics({"loss": 1.0}, 1)
    assert not os.listdir(tmp_path)


def test_a_run_left_running_by_a_dead_job_is_ended_when_the_run_dir_starts_again(tmp_path):
    """A job killed before its first checkpoint leaves its MLflow run RUNNING and no checkpoint to carry it on: the
    next job of the run directory (the only one alive: run_lock) ends it as KILLED. Runs of other run directories
    on a shared store, and the run being resumed, are left alone."""
    cfg = SimpleNamespace(uri=f"sqlite:///{tmp_path}/shared.db", experiment="exp", system_metrics=False)
    mine, other = str(tmp_path / "mine"), str(tmp_path / "other")

    def started(run_dir):
        tracker = MlflowTracker(run_dir, cfg, "n")
        run_id = tracker.start(None, {})
        tracker.end()
        return run_id

    dead, resumed, elsewhere = started(mine), started(mine), started(other)
    client = MlflowClient(cfg.uri)
    for run_id in (dead, resumed, elsewhere):  # as jobs killed without a word leave them
        client.update_run(run_id, status="RUNNING")

    tracker = MlflowTracker(mine, cfg, "n")
    assert tracker.start(resumed, {}) == resumed
    status = {r: client.get_run(r).info.status for r in (dead, resumed, elsewhere)}
    assert status == {dead: "KILLED", resumed: "RUNNING", elsewhere: "RUNNING"}
    assert client.get_run(resumed).data.tags["one4d.run_dir"] == os.path.abspath(mine)
    tracker.end()


def test_a_live_run_of_the_same_path_on_another_machine_is_left_alone(tmp_path):
    """On a shared tracking server one path can name a folder on each of several machines (containers that all train
    in /workspace/runs/NAME): a job starting in its folder must not end the live run of another machine's."""
    cfg = SimpleNamespace(uri=f"sqlite:///{tmp_path}/shared.db", experiment="exp", system_metrics=False)
    run_dir = tmp_path / "runs" / "x"
    run_dir.mkdir(parents=True)  # as the trainer makes it before the tracker starts
    elsewhere = MlflowTracker(str(run_dir), cfg, "n")
    live = elsewhere.start(None, {})
    elsewhere.end()
    client = MlflowClient(cfg.uri)
    client.update_run(live, status="RUNNING")  # still training, over there (one active run per process here)
    os.rename(run_dir, tmp_path / "other-machine")  # that machine's folder is not this one's
    run_dir.mkdir()
    tracker = MlflowTracker(str(run_dir), cfg, "n")
    mine = tracker.start(None, {})
    assert {r: client.get_run(r).info.status for r in (live, mine)} == {live: "RUNNING", mine: "RUNNING"}
    tracker.end()


def test_a_later_resume_brings_the_resumed_with_tag_up_to_date(tmp_path):
    """lr 1e-3, resumed with 5e-4, resumed again with 1e-3: the tag says what the run now uses, not the first
    resume's value; an unchanged key gets no tag."""
    cfg = SimpleNamespace(uri="", experiment="exp", system_metrics=False)
    run_id = None
    for lr, steps in ((0.001, 40), (0.0005, 50), (0.001, 50)):
        tracker = MlflowTracker(str(tmp_path), cfg, "name")
        run_id = tracker.start(run_id, {"lr": lr, "steps": steps, "seed": 0})
        tracker.end()
    tags = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_run(run_id).data.tags
    assert tags["resumed_with.lr"] == "0.001" and tags["resumed_with.steps"] == "50"
    assert "resumed_with.seed" not in tags


def test_a_key_first_set_or_dropped_on_a_resume_is_tagged_not_logged_as_a_param(tmp_path):
    """A DeepSpeed override first given on a resume was logged as a plain param: the record read as if the run had
    always trained with it. It is tagged like a changed value; a key the resumed config no longer has is tagged
    <unset>, and tagged back when it returns."""
    cfg = SimpleNamespace(uri="", experiment="exp", system_metrics=False)
    run_id = None
    for params in ({"lr": 0.1, "ds.overlap": False}, {"lr": 0.1, "ds.bucket": 1000}, {"lr": 0.1, "ds.overlap": False}):
        tracker = MlflowTracker(str(tmp_path), cfg, "name")
        run_id = tracker.start(run_id, params)
        tracker.end()
        if "ds.bucket" in params:
            run = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_run(run_id)
            assert run.data.params == {"lr": "0.1", "ds.overlap": "False"}
            assert run.data.tags["resumed_with.ds.bucket"] == "1000"
            assert run.data.tags["resumed_with.ds.overlap"] == "<unset>"
    run = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_run(run_id)
    assert run.data.params == {"lr": "0.1", "ds.overlap": "False"}
    assert run.data.tags["resumed_with.ds.bucket"] == "<unset>" and run.data.tags["resumed_with.ds.overlap"] == "False"
    assert "resumed_with.lr" not in run.data.tags


def test_a_resume_that_changes_nothing_records_and_warns_nothing(tmp_path, caplog):
    """A key first set on a resume has no param, and a changed value no longer matches its param: every later resume
    compared its value with the param, tagged it again and warned "resumed with changed config values" though
    nothing had changed. What the run records of a key is its resumed_with tag where it has one."""
    cfg = SimpleNamespace(uri="", experiment="exp", system_metrics=False)
    run_id = None
    for params in ({"lr": 0.001}, {"lr": 0.0005, "ds.bucket": 1000}, {"lr": 0.0005, "ds.bucket": 1000}):
        caplog.clear()
        tracker = MlflowTracker(str(tmp_path), cfg, "name")
        run_id = tracker.start(run_id, params)
        tracker.end()
    assert "resumed with changed config values" not in caplog.text
    run = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_run(run_id)
    assert run.data.params == {"lr": "0.001"}
    assert {k: v for k, v in run.data.tags.items() if k.startswith("resumed_with.")} == {
        "resumed_with.lr": "0.0005", "resumed_with.ds.bucket": "1000"}


def test_a_resumed_run_logs_no_step_it_holds_again(tmp_path):
    """A job killed after logging steps past its last checkpoint: the resumed job trains and logs them again, and
    each showed twice in the metric's history. Training metrics are not logged again up to the last step the run
    holds; an evaluation's per key, so one run again after a kill adds nothing while another key is logged."""
    cfg = SimpleNamespace(uri="", experiment="exp", system_metrics=False)
    tracker = MlflowTracker(str(tmp_path), cfg, "name")
    run_id = tracker.start(None, {})
    for step in range(1, 7):
        tracker.log_metrics({"loss": 1.0 / step, "lr": 0.1, "grad_norm": None if step == 6 else 2.0}, step)
    tracker.log_metrics({"eval/loss": 0.5}, 4)
    tracker.log_metrics({"eval/other": 0.3}, 6)  # `one4d eval` scores an earlier checkpoint after a later one
    tracker.log_metrics({"eval/other": 0.2}, 2)
    tracker.end("KILLED")

    resumed = MlflowTracker(str(tmp_path), cfg, "name")
    with pytest.MonkeyPatch.context() as mp:  # one read of the run, not every metric's every point
        mp.setattr(MlflowClient, "get_metric_history", lambda *a, **k: pytest.fail("read a metric's history"))
        resumed.start(run_id, {})
    assert resumed.logged_through == {"loss": 6, "lr": 6, "grad_norm": 5, "eval/loss": 4, "eval/other": 6}
    for step in range(5, 9):  # resumed from a checkpoint of step 4
        resumed.log_metrics({"loss": 1.0 / step, "lr": 0.1, "grad_norm": 2.0}, step)
    resumed.log_metrics({"eval/loss": 0.5, "eval/new": 0.25}, 4)  # the evaluation of step 4 run again
    resumed.log_metrics({"eval/loss": 0.4}, 8)
    resumed.end()
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")

    def history(key):
        return [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]

    assert history("loss") == [(s, 1.0 / s) for s in range(1, 9)]
    assert [s for s, _ in history("lr")] == list(range(1, 9))
    assert [s for s, _ in history("grad_norm")] == [1, 2, 3, 4, 5, 7, 8]  # step 6 logged none, then or now
    assert history("eval/loss") == [(4, 0.5), (8, 0.4)] and history("eval/new") == [(4, 0.25)]


def test_a_run_resumed_under_another_config_logs_the_steps_it_trains_again(tmp_path):
    """Resumed from step 4 under a changed optim.lr, the steps up to the last one the run holds are trained to other
    values: leaving them out as repeats lost them, and the run showed the old config's values there."""
    cfg = SimpleNamespace(uri="", experiment="exp", system_metrics=False)
    tracker = MlflowTracker(str(tmp_path), cfg, "name")
    run_id = tracker.start(None, {"lr": 0.1})
    for step in range(1, 7):
        tracker.log_metrics({"loss": 1.0, "lr": 0.1}, step)
    tracker.log_metrics({"eval/loss": 0.5}, 6)
    tracker.end("KILLED")
    resumed = MlflowTracker(str(tmp_path), cfg, "name")
    resumed.start(run_id, {"lr": 0.05}, same_config=False)
    for step in range(5, 8):
        resumed.log_metrics({"loss": 0.5, "lr": 0.05}, step)
    resumed.log_metrics({"eval/loss": 0.25}, 6)
    resumed.end()
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")

    def last(key):  # step -> the value logged last
        return {m.step: m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.timestamp)}

    assert last("loss") == {1: 1.0, 2: 1.0, 3: 1.0, 4: 1.0, 5: 0.5, 6: 0.5, 7: 0.5}
    assert last("lr")[5] == 0.05 and last("eval/loss") == {6: 0.25}


def test_a_moved_run_directory_keeps_its_artifacts_with_it(tmp_path):
    """MLflow stores absolute artifact locations: a run directory moved to another path (scratch -> project space)
    and resumed there wrote its new artifacts to the old path, re-created for them, and its runs still named the
    old directory. The store now follows the directory; the artifacts logged before the move stay readable."""
    from one4d_train.train.tracking import RUN_DIR_TAG

    cfg = SimpleNamespace(uri="", experiment="exp", system_metrics=False)
    old, new = tmp_path / "scratch" / "run", tmp_path / "project" / "run"
    tracker = MlflowTracker(str(old), cfg, "name")
    run_id = tracker.start(None, {})
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "first.txt").write_text("1")
    tracker.log_artifacts(str(tmp_path / "a"), "eval")
    tracker.end("KILLED")
    new.parent.mkdir()
    os.rename(old, new)

    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "second.txt").write_text("2")
    # the resumed job: a new process (MLflow caches each run's artifact location for the life of a process)
    script = ("import sys; from types import SimpleNamespace; from one4d_train.train.tracking import MlflowTracker\n"
              "t = MlflowTracker(sys.argv[1], SimpleNamespace(uri='', experiment='exp', system_metrics=False), 'n')\n"
              "t.start(sys.argv[2], {}); t.log_artifacts(sys.argv[3], 'eval'); t.end()\n")
    done = subprocess.run([sys.executable, "-c", script, str(new), run_id, str(tmp_path / "b")], capture_output=True,
                          text=True, timeout=120, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "the run directory moved from" in done.stderr

    assert not old.exists(), "nothing is written to the old path"
    client = MlflowClient(f"sqlite:///{new}/mlflow.db")
    run = client.get_run(run_id)
    assert run.info.artifact_uri == f"file://{new}/mlartifacts/{run_id}/artifacts"
    assert {a.path for a in client.list_artifacts(run_id, "eval")} == {"eval/first.txt", "eval/second.txt"}
    assert run.data.tags[RUN_DIR_TAG] == str(new)
    assert client.get_experiment_by_name("exp").artifact_location == f"file://{new}/mlartifacts"
    again = MlflowTracker(str(new), cfg, "name")  # nothing more to do once it follows
    assert again.client.get_run(run_id).info.artifact_uri == run.info.artifact_uri


@pytest.mark.parametrize("uri", ["ftp://x", "s3://bucket/runs", "uc", "databricks-uc", "mlruns", "file:./mlruns",
                                 "http://localhost:5000", "https://mlflow.example.org", "sqlite:///{tmp}/store.db",
                                 "databricks"])
@pytest.mark.parametrize("file_store", ["", "true"])
def test_tracking_uri_is_refused_where_mlflow_refuses_it(tmp_path, monkeypatch, uri, file_store):
    """tracking.uri is opened after the run directory is locked and the model built: a store MLflow's client
    refuses (a scheme it has none for; a folder, which MLflow 3.13 on refuses unless MLFLOW_ALLOW_FILE_STORE) is
    refused by the config's check instead, and only those. (Opening a server's or Databricks' store connects to
    nothing.)"""
    monkeypatch.chdir(tmp_path)
    if file_store:
        monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", file_store)
    else:
        monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    uri = uri.format(tmp=tmp_path)
    problem = tracking_uri_problem(uri)
    try:
        MlflowClient(tracking_uri=uri)
        opened = None
    except Exception as exc:
        opened = exc
    assert (problem is None) == (opened is None), (problem, opened)


@pytest.mark.parametrize("uri, module", [("postgresql://user@db.example.org/runs", "psycopg"),
                                         ("postgresql+psycopg2://user@db.example.org/runs", "psycopg2"),
                                         ("mysql://user@db.example.org/runs", "MySQLdb"),
                                         ("mssql+pyodbc://user@dsn", "pyodbc")])
def test_database_store_without_its_driver_is_refused_by_key(monkeypatch, uri, module):
    """A database store whose SQLAlchemy driver module is not installed failed inside MLflow once the run directory
    was locked and the model built: the check loads the driver (connecting to nothing) and names the module. The
    same URI with the module present passes, and SQLAlchemy's create_engine, which MLflow's store calls, fails for
    the same reason."""
    import sqlalchemy

    monkeypatch.setitem(sys.modules, module, None)  # not installed, whatever this machine has
    problem = tracking_uri_problem(uri)
    assert problem is not None and f"'{module}'" in problem and uri in problem, problem
    with pytest.raises(ImportError):
        sqlalchemy.create_engine(uri)
    cfg = TrackingConfig(uri=uri)
    assert [k for k, _ in cfg.problems()] == ["tracking.uri"]


def test_database_store_driver_checks_connect_to_nothing(tmp_path):
    """An unknown driver is named; sqlite's, always present, passes without creating the file."""
    assert "no driver 'postgresql+nosuch'" in tracking_uri_problem("postgresql+nosuch://h/db")
    assert tracking_uri_problem(f"sqlite:///{tmp_path}/store.db") is None
    assert not (tmp_path / "store.db").exists()


def test_a_new_store_is_a_copy_of_one_schema_made_once(tmp_path, monkeypatch):
    """MLflow builds a new store by running its schema migrations (~1.5-2 s per run directory): the first store
    makes an empty schema database in the cache, later ones copy it and migrate nothing; the copy holds no
    experiment of the cache's (MLflow makes its default one per store). A damaged copy in the cache is made again."""
    import mlflow.store.db.utils as db_utils
    import mlflow
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    cfg = SimpleNamespace(uri="", experiment="exp", system_metrics=False)

    def train(name):
        tracker = MlflowTracker(str(tmp_path / name), cfg, name)
        run_id = tracker.start(None, {"lr": 0.1})
        tracker.log_metrics({"loss": 1.0}, 1)
        tracker.end()
        client = MlflowClient(f"sqlite:///{tmp_path / name}/mlflow.db")
        assert [m.value for m in client.get_metric_history(run_id, "loss")] == [1.0]
        assert "cache" not in client.get_experiment("0").artifact_location  # made by MLflow for this store

    train("first")
    template = tmp_path / "cache" / "one4d" / f"mlflow-{mlflow.__version__}-schema.db"
    assert template.is_file()
    migrations = []
    real = db_utils._upgrade_db
    monkeypatch.setattr(db_utils, "_upgrade_db", lambda engine: migrations.append(engine) or real(engine))
    train("second")
    assert migrations == []  # the copy holds the schema: nothing migrated
    template.write_bytes(b"damaged")
    train("third")  # the damaged copy is made again, not copied
    assert len(migrations) == 1 and sorted(p.name for p in (tmp_path / "third").iterdir() if ".tmp" in p.name) == []
    train("fourth")
    assert len(migrations) == 1


def test_a_failing_write_after_the_start_is_counted_and_skipped_and_the_next_one_goes_through(tmp_path, caplog):
    """A store that fails mid-run (here: its metrics table and artifact folder gone, as a server restarting or a
    network filesystem's lock would make it fail) costs those records, not the training: no exception reaches the
    trainer (which would turn a preempted job's checkpoint-and-requeue into a failure), each failure is a warning,
    and the writes after the store is back are recorded. After a failure the writes of the next break_s seconds are
    skipped and counted (a server that hangs would hold every logging step for minutes); the end is always tried."""
    import sqlite3

    cfg = SimpleNamespace(uri="", experiment="exp", system_metrics=False)
    tracker = MlflowTracker(str(tmp_path), cfg, "name")
    tracker.break_s = 0  # each write tried: what each failure says
    run_id = tracker.start(None, {"a": 1})
    tracker.log_metrics({"loss": 0.5}, step=1)
    db = sqlite3.connect(tmp_path / "mlflow.db", isolation_level=None)
    db.execute("ALTER TABLE metrics RENAME TO metrics_away")
    assert not (tmp_path / "mlartifacts").exists()  # made by the first artifact
    (tmp_path / "mlartifacts").write_text("not a folder")
    (tmp_path / "adapters").mkdir()
    (tmp_path / "adapters" / "a.safetensors").write_bytes(b"123")
    with caplog.at_level("WARNING", logger="one4d_train.train.tracking"):
        tracker.log_metrics({"loss": 0.4}, 2)
        tracker.log_artifacts(str(tmp_path / "adapters"), "adapters")
        tracker.log_text("a: 1\n", "config.yaml")
    assert tracker.failed_writes == 3
    warned = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("MLflow: log_metrics of step 2 failed, training goes on") for m in warned), warned
    assert any(m.startswith("MLflow: log_text failed") and "3 failed write(s)" in m for m in warned), warned
    assert any("no such table: metrics" in m for m in warned if m.startswith("MLflow: log_metrics")), warned

    tracker.break_s = 3600
    tracker.log_metrics({"loss": 0.35}, step=3)  # fails again, and opens the break
    db.execute("ALTER TABLE metrics_away RENAME TO metrics")
    (tmp_path / "mlartifacts").unlink()
    tracker.log_metrics({"loss": 0.33}, step=4)  # skipped, though the store is back: within the break
    assert tracker.failed_writes == 5 and "log_metrics of step 4" not in caplog.text
    tracker.break_s = 0  # the break over
    tracker.log_metrics({"loss": 0.3}, step=5)
    tracker.log_artifacts(str(tmp_path / "adapters"), "adapters")
    tracker.break_s, tracker.failing_since = 3600, time.monotonic()  # a break open: the end is tried all the same
    caplog.clear()
    with caplog.at_level("WARNING", logger="one4d_train.train.tracking"):
        tracker.end("KILLED")
    assert "5 write(s) to sqlite:///" in caplog.text and tracker.failed_writes == 5
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")] == [(1, 0.5), (5, 0.3)]
    assert client.get_run(run_id).info.status == "KILLED"
    assert {a.path for a in client.list_artifacts(run_id)} == {"adapters"}


def test_a_store_that_fails_at_the_start_leaves_the_job_training_untracked_with_its_run_id_kept(tmp_path, caplog):
    """A tracking server down while a requeued job starts killed the job (exit 1, so no requeue either): the start is
    tried again, then the job trains without tracking and keeps the run id it resumed with, so the next resume
    continues that MLflow run once the store is back."""
    import sqlite3

    cfg = SimpleNamespace(uri="", experiment="exp", system_metrics=False)
    first = MlflowTracker(str(tmp_path), cfg, "name")
    run_id = first.start(None, {"a": 1})
    first.log_metrics({"loss": 0.5}, step=1)
    first.end("KILLED")
    db = sqlite3.connect(tmp_path / "mlflow.db", isolation_level=None)
    db.execute("ALTER TABLE runs RENAME TO runs_away")

    down = MlflowTracker(str(tmp_path), cfg, "name")
    down.start_waits_s = (0, 0)
    with caplog.at_level("WARNING", logger="one4d_train.train.tracking"):
        assert down.start(run_id, {"a": 1}) == run_id
    assert down.disabled and down.run_id == run_id
    assert sum("trying again" in r.getMessage() for r in caplog.records) == 2
    assert "failed 3 times at the start" in caplog.text and f"keep MLflow run {run_id}" in caplog.text
    down.log_metrics({"loss": 0.4}, step=2)  # nothing recorded, nothing raised
    down.end("KILLED")
    assert down.failed_writes == 0

    db.execute("ALTER TABLE runs_away RENAME TO runs")
    back = MlflowTracker(str(tmp_path), cfg, "name")
    assert back.start(run_id, {"a": 1}) == run_id
    back.log_metrics({"loss": 0.3}, step=3)
    back.end()
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")] == [(1, 0.5), (3, 0.3)]
