"""Host buffers of exact sizes for the activation offload, page-locked where they serve a GPU, kept for reuse.

torch's pinned-memory cache (`pin_memory=True`) rounds every allocation up to the next power of two: a 14B block
input's 369 MB takes 537 MB, and a 14B step checkpointed by sub-layer pinned ~89 GB for 61 GB of activations. Here
each buffer is an anonymous private mapping of its own size (whole pages), page-locked with `cudaHostRegister`, and
kept by size once its step is done: a training step saves tensors of the same sizes every time, so from the second
step on every buffer is reused and the host memory held is one step's saved activations.

The mappings are not inherited by forked processes (MADV_DONTFORK): Linux copies page-locked private pages into a
child at fork, so each DataLoader worker forked after the first step would otherwise duplicate them all.
"""
from __future__ import annotations

import mmap
import weakref
from dataclasses import dataclass

import torch

PAGE = mmap.PAGESIZE


def _pages(nbytes: int) -> int:
    return max(-(-nbytes // PAGE), 1) * PAGE


@dataclass(eq=False)
class HostBuffer:
    memory: mmap.mmap
    data: torch.Tensor  # uint8 over the whole mapping
    nbytes: int  # what it holds (the mapping is this rounded up to pages)
    pinned: bool
    event: torch.cuda.Event | None = None  # the last copy that reads or writes it

    def view(self, like: torch.Tensor) -> torch.Tensor:
        """A tensor of `like`'s dtype, shape and (dense) strides over the buffer, as `torch.empty_like` lays it out."""
        typed = self.data[:self.nbytes].view(like.dtype)
        return typed.as_strided(like.shape, torch.empty_like(like, device="meta").stride())


def _register(data: torch.Tensor, size: int) -> None:
    err = torch.cuda.cudart().cudaHostRegister(data.data_ptr(), size, 1)  # 1: cudaHostRegisterPortable
    if int(err) != 0:
        raise RuntimeError(f"activation offload: page-locking {size / 1e9:.2f} GB of host memory for the saved "
                           f"activations failed (cudaHostRegister: CUDA error {int(err)})")


def _release(buffers: list[HostBuffer]) -> None:
    for buf in buffers:
        try:
            if buf.event is not None:  # a copy still reading or writing it
                buf.event.synchronize()
            if buf.pinned:
                torch.cuda.cudart().cudaHostUnregister(buf.data.data_ptr())
        except Exception:  # at interpreter exit CUDA may be gone: the process's end frees it anyway
            pass
        buf.data = None
        try:
            buf.memory.close()
        except BufferError:  # a view still lives somewhere: the mapping goes with it
            pass
    buffers.clear()


class HostBuffers:
    """Buffers by size: `take` reuses a free one of exactly that size or maps a new one, `give` returns them.

    `held` counts every mapping in bytes (whole pages), in use or free: the host memory the offload holds.
    huge_pages: ask the kernel for transparent huge pages in each mapping (MADV_HUGEPAGE; where THP is off or the
    constant is missing, the mapping keeps its small pages)."""

    def __init__(self, huge_pages: bool = False):
        self.huge_pages = huge_pages and hasattr(mmap, "MADV_HUGEPAGE")
        self._free: dict[tuple[int, bool], list[HostBuffer]] = {}  # by (size, page-locked)
        self._all: list[HostBuffer] = []
        self.held = 0
        self.closed = False
        self._finalizer = weakref.finalize(self, _release, self._all)

    def new_bytes(self, nbytes: int, pinned: bool) -> int:
        """Host memory that taking `nbytes` would add: 0 where a free buffer of that size is there."""
        return 0 if self._free.get((nbytes, pinned)) else _pages(nbytes)

    def take(self, nbytes: int, pinned: bool) -> HostBuffer:
        if self.closed:
            raise RuntimeError("activation offload: its host buffers were closed")
        free = self._free.get((nbytes, pinned))
        if free:
            return free.pop()
        size = _pages(nbytes)
        memory = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        memory.madvise(mmap.MADV_DONTFORK)
        if self.huge_pages:
            try:
                memory.madvise(mmap.MADV_HUGEPAGE)
            except OSError:  # (a kernel without transparent huge pages: small pages, as said)
                pass
        data = torch.frombuffer(memory, dtype=torch.uint8)
        if pinned:
            _register(data, size)
        buf = HostBuffer(memory, data, nbytes, pinned)
        self._all.append(buf)
        self.held += size
        return buf

    def give(self, buffers) -> None:
        if self.closed:  # (a graph that outlived its offload's buffers)
            return
        for buf in buffers:
            self._free.setdefault((buf.nbytes, buf.pinned), []).append(buf)

    def trim(self) -> int:
        """Unlock and unmap every free buffer (none a graph still holds); returns the bytes freed. Sizes still in use
        are mapped again when next taken."""
        free = [buf for bufs in self._free.values() for buf in bufs]
        self._free.clear()
        freed = sum(_pages(buf.nbytes) for buf in free)
        _release(free)
        ids = {id(buf) for buf in free}
        self._all[:] = [buf for buf in self._all if id(buf) not in ids]
        self.held -= freed
        return freed

    def close(self) -> None:
        """Unlock and unmap every buffer once the copies touching them are done (none may be in use by a graph)."""
        self.closed = True
        self._free.clear()
        self.held = 0
        self._finalizer()
