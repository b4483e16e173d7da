"""Learning-rate schedule: linear warmup, then constant or cosine down to `min_lr_ratio * lr`.

A LambdaLR over a small callable object (not a closure) so DeepSpeed checkpoints and restores its state. The
schedule is a function of (config, applied steps): on resume `apply_config` puts this run's config back over
what the checkpoint restored, keeping only the count of applied steps."""
from __future__ import annotations

import math

from torch.optim.lr_scheduler import LambdaLR


class WarmupSchedule:
    def __init__(self, warmup_steps: int, total_steps: int, kind: str = "constant", min_lr_ratio: float = 0.0):
        self.warmup_steps, self.total_steps, self.kind, self.min_lr_ratio = warmup_steps, total_steps, kind, min_lr_ratio

    def __call__(self, done: int) -> float:
        """LR factor for the optimiser step taken after `done` completed steps."""
        if done < self.warmup_steps:
            return (done + 1) / self.warmup_steps
        if self.kind == "constant":
            return 1.0
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (done - self.warmup_steps) / span)
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _schedule(optim_cfg, total_steps: int) -> WarmupSchedule:
    return WarmupSchedule(optim_cfg.warmup_steps, total_steps, optim_cfg.schedule, optim_cfg.min_lr_ratio)


def build_scheduler(optimizer, optim_cfg, total_steps: int) -> LambdaLR:
    return LambdaLR(optimizer, _schedule(optim_cfg, total_steps))


SCHEDULE_KEYS = {"warmup_steps": "optim.warmup_steps", "total_steps": "train.steps", "kind": "optim.schedule",
                 "min_lr_ratio": "optim.min_lr_ratio"}
GROUP_KEYS = {"betas": "optim.betas", "eps": "optim.eps", "weight_decay": "optim.weight_decay"}


def apply_config(scheduler: LambdaLR, optim_cfg, total_steps: int) -> list[str]:
    """After a checkpoint's optimizer and scheduler states are loaded (they carry the hyperparameters and the
    schedule of the run that wrote them): this config's schedule, lr, betas, eps and weight decay, at the restored
    count of applied steps. Returns the changes, 'key: old -> new'; none for an unchanged config, whose lr is then
    recomputed by LambdaLR's own formula, bit for bit."""
    new = _schedule(optim_cfg, total_steps)
    changes = []
    old = scheduler.lr_lambdas[0]
    for attr, key in SCHEDULE_KEYS.items():
        if getattr(old, attr, None) != getattr(new, attr):
            changes.append(f"{key}: {getattr(old, attr, None)} -> {getattr(new, attr)}")
    groups = scheduler.optimizer.param_groups
    values = {"betas": tuple(optim_cfg.betas), "eps": optim_cfg.eps, "weight_decay": optim_cfg.weight_decay}
    if any(base != optim_cfg.lr for base in scheduler.base_lrs):
        changes.append(f"optim.lr: {scheduler.base_lrs[0]} -> {optim_cfg.lr}")
    for attr, key in GROUP_KEYS.items():
        if any((tuple(g[attr]) if attr == "betas" else g[attr]) != values[attr] for g in groups):
            changes.append(f"{key}: {groups[0][attr]} -> {values[attr]}")
    scheduler.lr_lambdas = [_schedule(optim_cfg, total_steps) for _ in groups]
    scheduler.base_lrs = [optim_cfg.lr for _ in groups]
    for group, base, factor in zip(groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group.update(values, initial_lr=base)
        group["lr"] = base * factor(scheduler.last_epoch)
    scheduler._last_lr = [g["lr"] for g in groups]
    return changes
