"""Preemption: SIGTERM / SIGUSR1 set a flag; at the end of each step the ranks agree (all-reduce max) so all of
them stop after the same step, checkpoint, and exit with REQUEUE_EXIT_CODE for the Slurm script to requeue."""
from __future__ import annotations

import logging
import signal

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_CONFIG = 2
EXIT_BAD_STEPS = 3
REQUEUE_EXIT_CODE = 42


class Preemption:
    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, device: torch.device):
        self.device, self.received = device, None

    def install(self) -> "Preemption":
        for sig in self.SIGNALS:
            signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name
        log.warning("received %s: will checkpoint and exit after the current step", self.received)

    def agreed(self) -> bool:
        """Collective: True on every rank when any rank received a signal."""
        flag = torch.tensor([1.0 if self.received else 0.0], device=self.device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
