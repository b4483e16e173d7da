"""slurm/train.sbatch across two nodes of a real Slurm: the rendezvous on the first host of the allocation, two tasks
per node (global ranks 0-1 and 2-3, local ranks 0-1 on each), ZeRO-3 partitioned across the nodes, one checkpoint,
one MLflow run.

Both nodes are slurmds on this machine (tests/slurm_cluster.py, `nodes=2`), so the shared run directory plays the
part of a cluster's shared file system.
"""
from __future__ import annotations

import json
import os
import re
import sys

import pytest

from slurm_cluster import LocalSlurm, SlurmUnavailable, ensure_installed
from test_slurm import REPO, SITE, logged_steps, run, train_args, zero_partitions

STEPS = 4  # the checks need a few logged steps and a final checkpoint, not a long run

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


@pytest.fixture(scope="module")
def two_nodes():
    try:
        ensure_installed()
        cluster = LocalSlurm(nodes=2)
    except SlurmUnavailable as exc:
        pytest.skip(f"no two-node Slurm on this machine: {exc}")
    with cluster as c:
        yield c


def test_train_job_spans_two_nodes_one_task_each(two_nodes, tmp_path):
    env = dict(two_nodes.env, ONE4D_SITE=str(SITE), ONE4D_VENV=sys.prefix,
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    env.pop("ONE4D_ROOT", None)
    run_dir, out = tmp_path / "run", tmp_path / "train.out"
    r = run(["sbatch", "--wait", "--nodes=2", "--ntasks-per-node=2", "--cpus-per-task=1", f"--output={out}",
             "slurm/train.sbatch", *train_args(tmp_path, run_dir, STEPS)], env)
    text = out.read_text() if out.exists() else ""
    assert r.returncode == 0, f"{r.stdout}{r.stderr}\n{text[-4000:]}"
    host = two_nodes.names[0]  # this machine's name: the first node, which the rendezvous address must resolve to
    assert re.search(rf"2 node\(s\), 4 task\(s\), rendezvous {host}:\d+", text), text[-2000:]
    assert "training finished" in text
    final = run_dir / "checkpoints" / f"step-{STEPS:08d}"
    marker = json.loads((final / "COMPLETE").read_text())
    assert (marker["step"], marker["world_size"]) == (STEPS, 4)
    assert zero_partitions(final) == [(3, 4)] * 4, "each rank holds its ZeRO-3 partition of 4"
    assert logged_steps(run_dir) == list(range(1, STEPS + 1))
    # each task as the trainer set it up (written by the toy task): ranks 0-1 on the first node, 2-3 on the second
    seen = [json.loads(p.read_text()) for p in sorted((run_dir / "toy_trace").glob("where-*.json"))]
    assert seen == [{"rank": r, "world_size": 4, "local_rank": r % 2, "node": host if r < 2 else f"{host}-2"}
                    for r in range(4)], seen
