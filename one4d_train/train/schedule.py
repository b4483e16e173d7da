"""Learning-rate schedule: linear warmup, then constant or cosine down to `min_lr_ratio * lr`.

A LambdaLR over a small callable object (not a closure) so DeepSpeed checkpoints and restores its state."""
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


def build_scheduler(optimizer, optim_cfg, total_steps: int) -> LambdaLR:
    return LambdaLR(optimizer, WarmupSchedule(optim_cfg.warmup_steps, total_steps, optim_cfg.schedule,
                                              optim_cfg.min_lr_ratio))
