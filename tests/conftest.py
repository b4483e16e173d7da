"""The suite on two workers (pytest-xdist: `-n 2 --dist loadgroup --no-loadscope-reorder`, the README's command):
each test file is one unit of work, so the training runs a file's tests share (module fixtures) run once; the two
Slurm files share a worker (each starts a local Slurm); the longest files are handed out first, so that neither
worker is left with one of them at the end. Without workers (plain `pytest`) nothing changes."""
from __future__ import annotations

import pytest

SAME_WORKER = {"test_slurm_multinode": "test_slurm"}
# seconds on a 2-core machine, alone (2026-12-06); the other files take under 25 s each
LONGEST_FIRST = ("test_train_engine", "test_one4d_training", "test_slurm", "test_demo", "test_latents",
                 "test_benchmark_step", "test_grad_checks")


def _group(item) -> str:
    name = item.module.__name__.rsplit(".", 1)[-1]
    return SAME_WORKER.get(name, name)


@pytest.hookimpl(tryfirst=True)  # before xdist names each test by its group
def pytest_collection_modifyitems(config, items):
    if not hasattr(config, "workerinput"):
        return
    for item in items:
        item.add_marker(pytest.mark.xdist_group(_group(item)))
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(_group(item), len(rank)))  # stable: a file's tests keep their order
