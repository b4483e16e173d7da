"""What the trainer trains: the `TrainTask` protocol, and `build_task` choosing the implementation.

The trainer is generic (DeepSpeed, schedule, checkpoints, tracking); everything model- or data-specific sits
behind this interface. `train.task="module:Class"` selects another implementation (the tests train
`tests.train_toy_task:ToyTask` through the real `one4d train`); empty means the One4D task.
Optionally a task class has `check_config(cfg) -> [(key, problem)]`, a classmethod that `one4d train` calls on
every rank before any process group starts (train/config.py `preflight`): whatever it returns is reported by key
and the run exits 2 before anything is built. Optionally a task has `identity() -> dict`, stored in every
checkpoint's train state (JSON) as `task_identity`: what the trained parameters depend on beyond their shapes (the
frozen weights they were trained on, a scale they are applied with), for its check_config to compare on resume.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable, ContextManager, Protocol, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class PositionedLoader(Protocol):
    """An iterable of batches whose `state_dict()` is the JSON-serialisable position of the next unconsumed batch;
    the same dict passed back to `build_loader(position=...)` continues from there. Exhausting it ends an epoch;
    iterating again starts the next one."""

    def __iter__(self): ...

    def state_dict(self) -> dict: ...


@runtime_checkable
class TrainTask(Protocol):
    def build_model(self, partitioned: Callable[[], ContextManager]) -> nn.Module:
        """The trained network only (frozen parameters with requires_grad False). Modules built inside
        `partitioned()` (deepspeed.zero.Init under ZeRO-3, else a no-op) are partitioned as they are created:
        build the large frozen base there; small trainable parts built outside are partitioned by
        deepspeed.initialize. Build frozen encoders (VAE, text) elsewhere, so they stay out of ZeRO."""

    def load_base_weights(self, model: nn.Module) -> None:
        """Fill the frozen base from its source files, e.g. per layer under
        GatheredParameters(params, modifier_rank=0). Called after engine init and again after every resume
        (ZeRO-3 checkpoints do not hold frozen weights)."""

    def build_loader(self, rank: int, world_size: int, position: dict | None) -> PositionedLoader: ...

    def loss(self, model: nn.Module, batch: Any, step: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """{'loss': scalar to minimise, other scalars for logging (same keys on every rank)}."""

    def flops_per_sample(self) -> float:
        """Model FLOPs of one training sample, forward + backward, for MFU."""

    def tokens_per_sample(self) -> int: ...

    def export(self, trainable_state: dict[str, torch.Tensor], out_dir: str) -> None:
        """Write adapter files from the full (gathered) trainable parameters, keyed by module parameter name."""

    # Optional: evaluate(model, step, out_dir) -> dict[str, float], run on every rank; see Trainer.


DEFAULT_TASK = "one4d_train.train.one4d_task:One4DTask"  # train.task empty


# what the trainer calls on every task (the methods of TrainTask above; `export` only with train.export_adapters)
TASK_METHODS = ("build_model", "load_base_weights", "build_loader", "loss", "flops_per_sample", "tokens_per_sample")


def load_object(spec: str) -> Any:
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def build_task(cfg) -> TrainTask:
    cls = load_object(cfg.train.task or DEFAULT_TASK)
    return cls(cfg)
