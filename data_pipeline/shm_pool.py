"""Shared-memory output buffers reused across samples in a DataLoader worker (docs/data.md, "Shared memory in
DataLoader workers").

A fresh shared-memory tensor is zero-filled by the kernel page by page as the worker first writes it (~0.7 ms
per MB: a third of a worker's CPU at the training shape). A worker's pool instead keeps its large output
buffers and rewrites one only after the main process has dropped every view of it. Each buffer's state lives
in a small shared int32 array made by the main process (a row per worker), and only one side writes it at a time:

  FREE -> LENT   worker: handed out by `take` (transforms.output_tensor)
  LENT -> FREE   worker: dropped unsent (`release` of a skipped sample; `dispatch` of a batch that does not
                 hold it, e.g. per-sample tensors stacked into a batch)
  LENT -> SENT   worker, feeder thread: the batch holding it is pickled for the main process (the queue does
                 that after put() returned; until then it stays LENT, so the worker never rewrites it)
  SENT -> FREE   main process: the last view of the storage rebuilt from it died (weakref.finalize)

With no FREE buffer of the size and the size's cap reached, `take` gives None (the caller allocates afresh, as
without a pool): a consumer that keeps batches costs speed, never correctness, and nothing waits.
"""
from __future__ import annotations

import itertools
import math
import os
import weakref

import torch

FREE, LENT, SENT = 0, 1, 2
SLOTS = 48  # pooled buffers per worker
PER_SIZE = 12  # pooled buffers of one byte size: ~4 samples in flight of the latent path's three z tensors
MIN_BYTES = 1 << 20  # smaller tensors are not pooled: their first touch costs little
STATS = ("reused", "grown", "fresh")  # takes served by a FREE buffer, by a new pooled one, left to the caller

_loans: weakref.WeakValueDictionary = weakref.WeakValueDictionary()  # main process: token -> flags
_ids = itertools.count()
_pool: Pool | None = None  # this worker's


def new_flags(workers: int) -> tuple[str, torch.Tensor]:
    """(token, flags) for one DataLoader's workers, made in the main process before they start; the token
    finds the flags when the main process rebuilds a pooled tensor."""
    token = f"{os.getpid()}-{next(_ids)}"
    flags = torch.zeros(workers, SLOTS + len(STATS), dtype=torch.int32).share_memory_()
    _loans[token] = flags
    return token, flags


def stats(flags: torch.Tensor) -> dict[str, int]:
    """Pool statistics summed over the workers of `flags`."""
    totals = flags[:, SLOTS:].sum(0).tolist()
    return dict(zip(STATS, totals))


class Pool:
    """One worker's buffers; its states are row `worker` of the shared flags."""

    def __init__(self, token: str, flags: torch.Tensor, worker: int):
        self.token, self.base = token, worker * flags.shape[1]
        self.state = flags[worker].numpy()
        self.buffers: list[tuple[int, torch.UntypedStorage]] = []
        self.slot_of: dict[int, int] = {}  # data_ptr -> slot
        self.unsent: list[int] = []  # slots lent since the last dispatch, in order

    def count(self, stat: str):
        self.state[SLOTS + STATS.index(stat)] += 1

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor | None:
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes < MIN_BYTES:
            return None
        same = [i for i, (n, _) in enumerate(self.buffers) if n == nbytes]
        slot = next((i for i in same if self.state[i] == FREE), None)
        if slot is not None:
            self.count("reused")
        else:
            if len(same) >= PER_SIZE:
                slot = None
            elif len(self.buffers) < SLOTS:
                slot = len(self.buffers)
            else:  # in place of a FREE buffer of another size (sizes may change, e.g. padded text embeddings)
                slot = next((i for i in range(SLOTS) if self.state[i] == FREE), None)
            if slot is None:
                self.count("fresh")
                return None
            storage = torch.UntypedStorage._new_shared(nbytes)
            if slot < len(self.buffers):
                del self.slot_of[self.buffers[slot][1].data_ptr()]
                self.buffers[slot] = (nbytes, storage)
            else:
                self.buffers.append((nbytes, storage))
            self.slot_of[storage.data_ptr()] = slot
            self.count("grown")
        self.state[slot] = LENT
        self.unsent.append(slot)
        return torch.empty(0, dtype=dtype).set_(self.buffers[slot][1], 0, shape)

    def dispatch(self, batch: dict) -> dict:
        lent, held, out = set(self.unsent), set(), {}
        for key, value in batch.items():
            slot = self.slot_of.get(value.untyped_storage().data_ptr()) if isinstance(value, torch.Tensor) else None
            if slot in lent:
                value = _Lent(value, self, slot)
                held.add(slot)
            out[key] = value
        for slot in lent - held:
            self.state[slot] = FREE
        self.unsent = []
        return out


class _Lent:
    """A batch tensor on a pooled buffer, on its way to the main process (a plain tensor once there)."""
    __slots__ = ("tensor", "pool", "slot")

    def __init__(self, tensor: torch.Tensor, pool: Pool, slot: int):
        self.tensor, self.pool, self.slot = tensor, pool, slot

    def __reduce__(self):
        self.pool.state[self.slot] = SENT  # pickled: from now on the main process may read it
        return _received, (self.tensor, self.pool.token, self.pool.base + self.slot)


def _received(tensor: torch.Tensor, token: str, index: int) -> torch.Tensor:
    """Unpickling in the main process: the buffer is FREE again once the rebuilt storage dies."""
    flags = _loans.get(token)
    if flags is not None:  # else the loader is gone: the buffer stays SENT, its worker is gone too
        weakref.finalize(tensor.untyped_storage(), _free, flags.view(-1).numpy(), index).atexit = False
    return tensor


def _free(state, index: int):
    state[index] = FREE


def install(token: str, flags: torch.Tensor, worker: int):
    """Give this worker process a pool (called in the worker); a second call for the same flags keeps it, since
    a new pool would take slots whose buffers the main process may still hold."""
    global _pool
    if _pool is None or _pool.token != token:
        _pool = Pool(token, flags, worker)


def take(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor | None:
    """A pooled shared-memory tensor, or None (no pool here, a small tensor, or no buffer free)."""
    return _pool.take(shape, dtype) if _pool is not None else None


def mark() -> int:
    """Where `release` rewinds to: call before building a sample that may be dropped."""
    return len(_pool.unsent) if _pool is not None else 0


def release(since: int):
    """Buffers lent after `mark()` gave `since` go back to FREE (their sample is dropped)."""
    if _pool is not None:
        for slot in _pool.unsent[since:]:
            _pool.state[slot] = FREE
        del _pool.unsent[since:]


def dispatch(batch: dict) -> dict:
    """The batch as handed to the DataLoader: tensors on lent buffers are wrapped, so that pickling them marks
    them SENT and the main process frees them when it drops them; lent buffers it does not hold are FREE again."""
    return _pool.dispatch(batch) if _pool is not None else batch
