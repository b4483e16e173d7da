"""Preemption: SIGTERM / SIGUSR1 / SIGINT (a first Ctrl-C) set a flag; at the end of each step the ranks agree
(all-reduce max) so all of them stop after the same step, checkpoint, and exit with REQUEUE_EXIT_CODE for the Slurm
script to requeue (by hand: run the same command again). A second Ctrl-C stops at once (KeyboardInterrupt).

The handler is installed once per process, as the first thing `one4d train` does: the `one4d` entry point calls
`install()` before it imports the trainer and torch, and distributed.setup calls it again (idempotent) for other
entry points. So a stop asked for during the start-up is not a kill: one before or during the rendezvous ends the
rank there (exit 42, nothing to save yet; distributed.stop_ends_the_wait), one during the model and engine build or
the resume is kept and honoured before the first step. Slurm and
scancel signal a task's whole process group, data-loader workers included; `shielded()` blocks the stop signals
while the trainer fetches data, so workers forked there inherit the block and keep serving batches until the
trainer has checkpointed (Ctrl-C excepted during an evaluation, so that a second one still stops at once).
"""
from __future__ import annotations

import contextlib
import logging
import signal

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_CONFIG = 2
EXIT_BAD_STEPS = 3
REQUEUE_EXIT_CODE = 42
EXIT_INTERRUPTED = 130  # a second Ctrl-C (the shell's code for SIGINT)


class Preemption:
    # SIGINT: Ctrl-C, which a terminal sends to the whole foreground group (the ranks and their data workers)
    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self):
        self.received = None

    def install(self) -> "Preemption":
        for sig in self.SIGNALS:
            # a SIGINT ignored from the start (`one4d train ... &` in a script) stays ignored, as Python leaves it
            if sig != signal.SIGINT or signal.getsignal(sig) is not signal.SIG_IGN:
                signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if signum == signal.SIGINT and self.received == "SIGINT":  # Ctrl-C twice: stop at once
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        if self.received == name:  # the same stop again (the Slurm script repeats it until the tasks end)
            return
        self.received = name
        log.warning("received %s: will checkpoint and exit after the current step%s", self.received,
                    " (Ctrl-C again to stop at once, without it)" if signum == signal.SIGINT else "")

    @contextlib.contextmanager
    def shielded(self, interruptible: bool = False):
        """Block the stop signals in this thread for the block: processes forked inside it (DataLoader workers)
        inherit the blocked mask, so a signal to the whole process group leaves them running; one that reaches
        this process meanwhile is delivered, and sets the flag, when the block ends. `interruptible` (a long block:
        an evaluation) leaves Ctrl-C out: a first one still asks for a stop after the block, and a second one
        stops at once (blocked, the two would merge into one pending signal). Workers forked there inherit the
        handler, which a first Ctrl-C only sets a flag in, and torch's worker loop ends quietly on a second."""
        shield = [s for s in self.SIGNALS if not (interruptible and s == signal.SIGINT)]
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, shield)
        try:
            yield
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)

    def agreed(self, device) -> bool:
        """Collective: True on every rank when any rank received a signal."""
        import torch  # not at the top: the module is imported, and its handler installed, before torch
        import torch.distributed as dist

        flag = torch.tensor([1.0 if self.received else 0.0], device=device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


_process: Preemption | None = None


def install() -> Preemption:
    """The process's Preemption, its handlers installed on the first call."""
    global _process
    if _process is None:
        _process = Preemption().install()
    return _process
