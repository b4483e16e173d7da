"""Activation offload: the large tensors autograd saves in the DiT blocks live in pinned host memory between
forward and backward.

With checkpointing, what a block keeps is its input (and, in selective mode, its attention outputs): at 14B and 2 x
18,018 tokens 369 MB per tensor, 14.8 GB for the 40 block inputs alone. Inside `HostOffload()`, every saved tensor
of at least `min_bytes` (parameters and their views excepted) is copied to pinned host memory on a side stream as
soon as it is saved, so its device memory is free once the forward no longer uses it. Backward unpacks the saved
tensors group by group in the reverse order of packing (a group: what one DiT block saved; the model marks them with
`next_group()`), though a group's own tensors may come in any order (a compiled block unpacks all of its at once, in
forward order). So an unpack starts, on the side stream, the host-to-device copies of the rest of its group and of
the `prefetch` groups before it, overlapping them with the current block's backward. Prefetching by tensor count
instead stalls wherever a block saves more tensors than the count: each one not brought back in time is waited for
(369 MB at the 54 GB/s an H100's host link carries: ~7 ms at 14B).

`blocks` (model.activation_offload_blocks) moves only the first blocks' tensors: the last blocks' stay on the device.
Backward reads those first, so their copies would otherwise be the forward's last work and the backward's first
wait; the GPU memory they hold (14B: ~1.5 GB a block by sub-layer, ~2.5 GB with the FFN's hidden layer) buys that.

Saved tensors reach the hooks both from eager checkpointing (torch's non-reentrant checkpoint saves its inputs
with `save_for_backward`) and from compiled blocks (the compiled region saves its activations the same way).
On a CPU device the copies are plain copies (no streams): the same code path, for tests.
Autograd does not check saved tensors for in-place changes where hooks are set: a block that changed a saved tensor
in place after saving it would get wrong gradients here (and race the copy to host) where plain autograd raises. The
blocks change no saved tensor in place.

The device memory of a moved tensor goes back to the compute stream in that stream's order, not when the GPU has
done the copy: the session holds each moved tensor until the compute stream has been made to wait for its copy
(`STASH_GROUPS` blocks later, when the copy is long done unless the host link lags, and at the forward's end), then
lets it go; one whose copy it sees done at a block's start goes then. With `record_stream` instead, the allocator
could hand the memory out again only once the copy had run on the GPU, which it learns in CPU time: with the CPU a
forward's part ahead, every tensor saved in that part counts as in use, and at 14B by `sublayer_ffn` (~2.5 GB moved
a block) the cache reached the 80 GB GPU's ceiling twice a step, each time waiting for all streams and releasing its
free memory (H100, 2026-12-07: 16 allocator retries counted in 8 steps, and a forward 0.23 s longer than by
`sublayer`, most likely from them). The memory held for copies in flight is now at most `STASH_GROUPS` blocks'
moved tensors, counted in `torch.cuda.memory_allocated`.

Host memory: the copies go to page-locked buffers of their exact sizes, kept for the next step (host_buffers.py;
torch's pinned-memory cache would round each up to a power of two, ~45% more at 14B). At 14B a step saves 31 GB per
GPU process by block, 61 GB by sub-layer, ~101 GB by sub-layer with the FFN's hidden layer kept
(model/checkpointing.py). Before it maps a buffer beyond those the process already holds, an offload checks what the
process may still take (host_memory.py: the machine's and its control group's limit) and stops the step with a
HostMemoryError naming the settings that need less, where the out-of-memory killer would otherwise end the process
without a word.
"""
from __future__ import annotations

import contextlib
import copy
import weakref
from dataclasses import dataclass, field

import torch
from torch import nn

from one4d_train.model import host_memory
from one4d_train.model.config import OFFLOAD_MIN_MIB
from one4d_train.model.host_buffers import HostBuffer, HostBuffers

# a moved tensor's device memory is let go once the compute stream waited for its copy, this many groups (blocks)
# after the one that saved it: at 14B by sublayer_ffn a block's forward (~57 ms) outlasts its copies (~46 ms at the
# 55 GB/s an H100's host link carries), so the copies of the block before last are done and the wait costs nothing
# while the link keeps that pace; one group would wait for the copies of the block just finished
STASH_GROUPS = 2


@dataclass
class OffloadStats:
    tensors: int = 0
    bytes: int = 0
    prefetched: int = 0
    kept_bytes: int = 0  # device memory that the tensors of blocks past `blocks` hold: their storages, each once


@dataclass
class _Entry:
    host: torch.Tensor | None  # None where kept
    device: torch.device
    ready: torch.cuda.Event | None = None  # device-to-host copy done
    loaded: torch.Tensor | None = None  # prefetched device copy
    loaded_ready: torch.cuda.Event | None = None
    used: bool = False  # handed to backward once (its device copy then belongs to autograd)
    group: int = 0  # the block that saved it (the tensor's own index where no groups are marked)
    buffer: HostBuffer | None = None  # what `host` lives in
    kept: bool = False  # saved by a block past `HostOffload.blocks`: not moved (autograd holds the tensor itself)


class HostMemoryError(RuntimeError):
    """The saved activations of a step would not fit in the host memory left to this process."""


@dataclass
class _Session:
    owner: "HostOffload"
    params: set[int]
    bytes: int = 0  # host memory this forward's offloads took
    entries: list[_Entry] = field(default_factory=list)
    by_id: dict[int, tuple[weakref.ref, int]] = field(default_factory=dict)
    group: int | None = None  # the current group; None: none marked, each tensor a group of its own
    buffers: list[HostBuffer] = field(default_factory=list)  # back to the owner's free buffers with the session
    kept_storages: set[int] = field(default_factory=set)  # counted in kept_bytes
    # moved device tensors whose copies may still run: (group, tensor, copy done, the stream it was saved on)
    stash: list[tuple[int, torch.Tensor, torch.cuda.Event, torch.cuda.Stream]] = field(default_factory=list)

    def __post_init__(self):
        # the session lives as long as autograd holds what it packed: until backward is done with the graph
        weakref.finalize(self, _end_session, self.owner.buffers, self.buffers, self.entries, self.stash)

    def next_group(self) -> None:
        """What is saved from here on belongs to the next group (call before each block)."""
        self.group = 0 if self.group is None else self.group + 1
        self.release(self.group - STASH_GROUPS)

    def release(self, upto: float = float("inf")) -> None:
        """Let go of the moved tensors of groups up to `upto`, and of any whose copy is seen done already, once the
        streams that saved them wait for their copies (one side stream per device runs the copies in order: waiting
        for the last one waits for all before it). Their memory is then free for the saving stream's later work,
        which runs after the copies; a tensor made on another stream is marked as used by the saving one, so its own
        stream's pool takes it back only after that (the allocator ignores the mark where the two are the same
        stream)."""
        done = 0  # the copies already run (in order on the side stream): nothing to wait for, nothing to hold
        while done < len(self.stash) and self.stash[done][2].query():
            done += 1
        go = [item for i, item in enumerate(self.stash) if i < done or item[0] <= upto]
        if not go:
            return
        last = {}
        for _, _, ready, stream in go:
            last[stream] = ready
        for stream, ready in last.items():
            stream.wait_event(ready)
        for _, t, _, stream in go:
            t.record_stream(stream)
        self.stash[:] = [item for i, item in enumerate(self.stash) if i >= done and item[0] > upto]

    def pack(self, t: torch.Tensor):
        nbytes = t.numel() * t.element_size()
        if (nbytes < self.owner.min_bytes or isinstance(t, nn.Parameter) or isinstance(t._base, nn.Parameter)
                or t.untyped_storage().data_ptr() in self.params):  # (a weight's view: ZeRO-3 gathers its storage
            return _unlinked(t)  # after the session began, so only its base tells it is no activation)
        keep = self.group is not None and 0 <= self.owner.blocks <= self.group  # read first in backward
        seen = self.by_id.get(id(t))
        if seen is not None and seen[0]() is t:
            entry = self.entries[seen[1]]
            if entry.kept:
                return self, seen[1], _unlinked(t)
            if not keep:  # saved by a later block too: it comes back with the last one that saved it
                if self.group is not None:
                    entry.group = max(entry.group, self.group)
                return self, seen[1]
            # moved for earlier blocks and saved again by a kept one (the text context, say): that one keeps the
            # tensor itself, still on the device here, rather than wait for its copy back first in backward
        if keep:  # left where it is: the entry only marks its place (its unpack brings back the blocks before
            # it); autograd holds the tensor in the packed tuple and frees it when done with it, as without offload
            self.entries.append(_Entry(None, t.device, group=self.group, kept=True))
            storage = t.untyped_storage()  # what the tensor holds on the device (q, k and v may be views of one
            if storage.data_ptr() not in self.kept_storages:  # product), counted once, if moved for earlier blocks too
                self.kept_storages.add(storage.data_ptr())
                self.owner.stats.kept_bytes += storage.nbytes()
            self.by_id[id(t)] = (weakref.ref(t), len(self.entries) - 1)
            return self, len(self.entries) - 1, _unlinked(t)
        buffers = self.owner.buffers
        new = buffers.new_bytes(nbytes, t.is_cuda)
        if new:  # beyond the buffers earlier steps left
            try:
                self.owner.check_host_memory(new, self.bytes)
            except HostMemoryError:
                if not buffers.trim():  # the free buffers: earlier steps' of sizes this one has not taken
                    raise
                self.owner.check_host_memory(new, self.bytes)
        buf = buffers.take(nbytes, pinned=t.is_cuda)
        self.buffers.append(buf)
        host = buf.view(t)
        self.bytes += nbytes
        entry = _Entry(host, t.device, group=len(self.entries) if self.group is None else self.group, buffer=buf)
        if t.is_cuda:
            side = self.owner.stream(t.device)
            side.wait_stream(torch.cuda.current_stream(t.device))
            with torch.cuda.stream(side):
                if buf.event is not None:  # its last reader, an earlier step's host-to-device copy
                    side.wait_event(buf.event)
                host.copy_(t, non_blocking=True)
                entry.ready = torch.cuda.Event()
                entry.ready.record(side)
            buf.event = entry.ready
            # held until the saving stream waits for the copy (release): its memory is not reused before the copy
            # has read it; detached, as an output's grad_fn would lead back here through what was packed, a cycle
            # that keeps the session alive where its graph is dropped
            self.stash.append((entry.group, t.detach(), entry.ready, torch.cuda.current_stream(t.device)))
            if self.group is None:  # no groups marked: each tensor is one, so the copy two tensors back is waited
                self.release(entry.group - STASH_GROUPS)  # for (the model marks a group per block)
        else:
            host.copy_(t)
        self.entries.append(entry)
        index = len(self.entries) - 1
        self.by_id[id(t)] = (weakref.ref(t), index)
        self.owner.stats.tensors += 1
        self.owner.stats.bytes += nbytes
        return self, index

    def unpack(self, packed):
        if self.stash:  # backward has begun (sessions used without the context manager end their forward here)
            self.release()
        if isinstance(packed, torch.Tensor):
            return packed
        _, index, *kept = packed
        entry = self.entries[index]
        if entry.device.type != "cuda":
            entry.used = True
            return kept[0] if kept else entry.host.clone()
        out = kept[0] if kept else self._load(entry, wait=True)
        for j in self._ahead(index):  # (a kept block's unpack starts the copies of the last block moved)
            ahead = self.entries[j]
            if not ahead.kept and ahead.loaded is None and not ahead.used:
                self._load(ahead, wait=False)
                self.owner.stats.prefetched += 1
        return out

    def _ahead(self, index: int):
        """The indices to bring back with `index`: the rest of its group, then the `prefetch` groups before it."""
        group, entries = self.entries[index].group, self.entries
        j = index + 1
        while j < len(entries) and entries[j].group == group:
            yield j
            j += 1
        j = index - 1
        while j >= 0 and entries[j].group >= group - self.owner.prefetch:
            yield j
            j -= 1

    def _load(self, entry: _Entry, wait: bool) -> torch.Tensor:
        current = torch.cuda.current_stream(entry.device)
        if entry.loaded is None:
            side = self.owner.stream(entry.device)
            loaded = torch.empty_like(entry.host, device=entry.device)  # from the current stream's pool
            side.wait_stream(current)  # the block is free in the current stream's order
            with torch.cuda.stream(side):
                side.wait_event(entry.ready)
                loaded.copy_(entry.host, non_blocking=True)
                entry.loaded_ready = torch.cuda.Event()
                entry.loaded_ready.record(side)
            entry.loaded, entry.buffer.event = loaded, entry.loaded_ready
        if not wait:
            return entry.loaded
        current.wait_event(entry.loaded_ready)
        out, entry.loaded, entry.used = entry.loaded, None, True  # freed when autograd is done with it
        return out


def mib_bytes(mib: float) -> int:
    return round(mib * (1 << 20))


def _end_session(buffers: HostBuffers, taken: list[HostBuffer], entries: list[_Entry], stash: list) -> None:
    """A session's host buffers go back for the next step. A device copy prefetched and never handed to backward (the
    graph dropped part-way through it) is freed only once its copy is done: it came from the current stream's memory
    pool, which would hand it out again at once while the side stream still writes it. (One handed to backward is
    safe: the current stream waited for its copy before reading it.) So are moved tensors still held for their
    copies to host (a session ended without its forward's end)."""
    try:
        for _, _, ready, _ in stash:
            ready.synchronize()
        stash.clear()
        for entry in entries:
            if entry.loaded is not None:
                entry.loaded_ready.synchronize()
                entry.loaded = None
    finally:
        buffers.give(taken)


def _unlinked(t: torch.Tensor) -> torch.Tensor:
    """`t` as autograd may keep it packed: a saved output holding its grad_fn, which holds what was packed, would be
    a reference cycle, alive (with the offload session) where the graph is dropped without backward or kept by
    retain_graph; so a tensor with a grad_fn is packed detached (autograd links it to its graph again on unpack). A
    leaf (a parameter, an input) has no grad_fn to cycle through and is packed itself: a ZeRO-3 parameter, whose
    `.data` is swapped between gathered and released, must be read as it is in backward, not as it was."""
    return t if t.grad_fn is None else t.detach()


class HostOffload:
    """`with offload() as session:` around a forward keeps its large saved tensors in host memory until backward;
    `session.next_group()` (session is None without autograd) marks where each block's tensors begin.

    min_bytes: smallest tensor moved (smaller ones stay on the device: copies would cost more than they free).
    prefetch: groups (blocks) brought back ahead of their use in backward; where no groups are marked, tensors.
    blocks: only the first `blocks` groups' tensors are moved (-1: all; no effect where no groups are marked); the
    last groups', which backward reads first, stay on the device, where their copies out and back would end the
    forward and start the backward. A tensor that moved groups and kept ones both save (the text context) is moved
    for the first and kept by the others.
    exclude: module whose parameters are never moved (they are not activations).
    huge_pages: host buffers in transparent huge pages where the kernel grants them (host_buffers.py; the H100's
    host link carried the same 55 GB/s either way, benchmarks/RESULTS.md 2026-12-07 09:27)."""

    def __init__(self, exclude: nn.Module | None = None, min_bytes: int = mib_bytes(OFFLOAD_MIN_MIB),
                 prefetch: int = 1, host_reserve: int = 2 << 30, blocks: int = -1, huge_pages: bool = False):
        if min_bytes < 0 or prefetch < 0 or host_reserve < 0 or blocks < -1:
            raise ValueError("activation offload: min_bytes, prefetch and host_reserve must be >= 0, blocks >= -1")
        self.exclude = exclude
        self.min_bytes = min_bytes
        self.prefetch = prefetch
        self.blocks = blocks
        self.host_reserve = host_reserve  # host memory an offload leaves to the rest of the process
        self.buffers = HostBuffers(huge_pages)  # host memory the saved tensors go to, kept for the next step
        self.stats = OffloadStats()
        self._streams: dict[torch.device, torch.cuda.Stream] = {}

    def __deepcopy__(self, memo) -> "HostOffload":
        """The same settings for the copy (of the model, `exclude` the copied one), with its own host memory, streams
        and counts: buffers are page-locked mappings, and the copy's activations are its own."""
        twin = type(self)(None, self.min_bytes, self.prefetch, self.host_reserve, self.blocks, self.buffers.huge_pages)
        memo[id(self)] = twin
        twin.exclude = copy.deepcopy(self.exclude, memo)
        return twin

    @property
    def host_bytes(self) -> int:
        """Host memory this offload holds (its buffers, in use or kept for the next step)."""
        return self.buffers.held

    def check_host_memory(self, nbytes: int, done: int) -> None:
        """Raise HostMemoryError where `nbytes` more would leave less than `host_reserve` of host memory."""
        left = host_memory.available_bytes()
        if left is None or left - nbytes >= self.host_reserve:
            return
        raise HostMemoryError(
            f"activation offload: {left / 1e9:.1f} GB of host memory left to this process (the machine's, or its "
            f"Slurm job's/container's limit) and {nbytes / 1e9:.2f} GB more to hold, after {done / 1e9:.1f} GB of "
            f"this step's saved activations; going on would end the process in the out-of-memory killer. Every GPU "
            f"process of a node holds its own (14B: ~101 GB with model.activation_checkpointing_unit=sublayer_ffn, "
            f"~61 GB with sublayer, ~31 GB with block; model.activation_checkpointing_unit=auto picks by the memory "
            f"left at the start); give the job the node's memory (Slurm: --mem=0), run "
            f"fewer processes per node, or keep the last blocks' activations on the GPU where it has the room "
            f"(model.activation_offload_blocks, or model.activation_offload=false for all)")

    def stream(self, device: torch.device) -> torch.cuda.Stream:
        """The side stream of `device` (`cuda` and `cuda:N` of the current device are one)."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        return self._streams[device]

    def _param_storages(self) -> set[int]:
        if self.exclude is None:
            return set()
        tensors = list(self.exclude.parameters()) + list(self.exclude.buffers())
        return {t.untyped_storage().data_ptr() for t in tensors if t.numel()}

    @contextlib.contextmanager
    def __call__(self):
        if not torch.is_grad_enabled():
            yield
            return
        session = _Session(self, self._param_storages())
        try:
            with torch.autograd.graph.saved_tensors_hooks(session.pack, session.unpack):
                yield session
        except BaseException:
            with contextlib.suppress(Exception):  # (the forward's own error is the one to see; the session's end
                session.release()  # waits for what is left)
            raise
        session.release()  # the forward's end: the last blocks' moved tensors go once their copies are waited for


def apply_activation_offload(model: nn.Module, enabled: bool = True, **kwargs) -> HostOffload | None:
    """Offload the saved activations of `model`'s blocks (a One4DModel) to host memory, or stop doing so."""
    model.activation_offload = HostOffload(exclude=model, **kwargs) if enabled else None
    return model.activation_offload


def apply_configured_offload(model: nn.Module, cfg) -> HostOffload | None:
    """`ModelConfig.activation_offload` of the first `activation_offload_blocks` blocks' saved tensors of at least
    `activation_offload_min_mib` (every builder of the model, the trainer's included, goes through here)."""
    return apply_activation_offload(model, cfg.activation_offload, blocks=cfg.activation_offload_blocks,
                                    min_bytes=mib_bytes(cfg.activation_offload_min_mib))
