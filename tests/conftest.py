"""The suite on two workers (pytest-xdist, `-n 2 --dist loadfile --no-loadscope-reorder`, the README's command): each
test file runs whole on one worker, so the training runs its tests share (module fixtures) run once, and the longest
files are handed out first, so that neither worker is left with one of them at the end. Local Slurm clusters (two
files start one) never run at the same time: tests/slurm_cluster.py holds a lock while one runs. Without workers
(plain `pytest`) nothing changes."""
from __future__ import annotations

# seconds on a 2-core machine, alone (2026-12-06): test_train_engine ~310, test_one4d_training ~250, test_slurm
# ~220, the demo 50, the others under 45 each
LONGEST_FIRST = ("test_train_engine", "test_one4d_training", "test_slurm", "test_demo", "test_latents",
                 "test_benchmark_step", "test_grad_checks")


def pytest_collection_modifyitems(config, items):
    if not hasattr(config, "workerinput"):
        return
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.module.__name__.rsplit(".", 1)[-1], len(rank)))  # stable
