"""Training data loader with an exact, resumable position.

Workers batch their own samples, so every batch comes from one reader slot, and torch's DataLoader hands
out workers' batches in a fixed round robin. The loader records what the consumer has taken: per rank-local
slot (epoch, raw position after the last consumed sample, samples skipped so far and of them the clips shorter
than the frame window) and the slot whose batch comes next. Built with that position, each worker fast-forwards
its slot without decoding, and workers are rotated so that the first batch comes from the slot that was next: the
batches that follow are the ones an uninterrupted run would have produced.
"""
from __future__ import annotations

import ctypes
import logging
import os

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_pipeline import shm_pool
from data_pipeline.config import DataConfig
from data_pipeline.finish import batchable
from data_pipeline.latents import LatentsSpec
from data_pipeline.reader import (ShardStream, StreamPlan, dist_rank_world, list_shards, shard_fingerprint,
                                  stored_latents)
from data_pipeline.transforms import output_tensor

log = logging.getLogger(__name__)
POSITION_VERSION = 1
LATER_KEYS = ("shuffle_buffer", "epoch_length")  # not in positions saved before 2026-12-05: not compared there
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc mallopt parameters


def _worker_init(worker_id: int):
    """Keep a worker's large temporaries (decoded frames, depth, scratch) on its heap between samples: glibc
    maps every allocation over 32 MiB afresh, which the kernel then zero-fills page by page (glibc only)."""
    try:
        os.confstr("CS_GNU_LIBC_VERSION")
    except (ValueError, OSError):
        return
    libc = ctypes.CDLL(None)
    libc.mallopt(M_MMAP_MAX, 0)
    libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)


def collate(samples: list[dict]) -> dict:
    """Stack tensors and numbers on a new batch axis; strings stay lists. Text embeddings of different
    lengths are zero-padded, with their lengths in `text_emb_len` (0 for a sample without one). A batch of one
    is a view of its sample (whose large tensors already live in shared memory in a worker), a larger one is
    stacked straight into shared memory (transforms.output_tensor, as torch's default_collate does, but from the
    worker's pool)."""
    batch = {}
    have = [s for s in samples if "text_emb" in s]
    if have and len(have) < len(samples):  # length 0 for the others (batch_text_embeddings gives them None)
        empty = have[0]["text_emb"].new_zeros(0, have[0]["text_emb"].shape[-1])
        samples = [s if "text_emb" in s else {**s, "text_emb": empty} for s in samples]
    for key in samples[0]:
        values = [s[key] for s in samples]
        if isinstance(values[0], torch.Tensor):
            if key == "text_emb" and len({v.shape for v in values}) > 1:
                batch["text_emb_len"] = torch.tensor([len(v) for v in values])
                values = [torch.nn.functional.pad(v, (0, 0, 0, max(len(u) for u in values) - len(v))) for v in values]
            if len(values) == 1:
                batch[key] = values[0].unsqueeze(0)
            else:
                batch[key] = torch.stack(values, out=output_tensor((len(values),) + values[0].shape, values[0].dtype))
        elif isinstance(values[0], (int, float)):
            batch[key] = torch.tensor(values)
        else:
            batch[key] = values
    return batch


class BatchStream(IterableDataset):
    """Groups a ShardStream's samples into batches inside the worker that produced them. With `loans`
    (shm_pool.new_flags) each worker reuses its shared-memory output buffers once the main process has
    dropped them."""

    def __init__(self, stream: ShardStream, batch_size: int, loans: tuple[str, torch.Tensor] | None = None):
        self.stream, self.batch_size, self.loans = stream, batch_size, loans

    def __iter__(self):
        info = get_worker_info()
        if info is not None and self.loans is not None:
            shm_pool.install(*self.loans, info.id)
        samples = []
        for sample in self.stream:
            samples.append(sample)
            if len(samples) == self.batch_size:
                batch, samples = collate(batchable(samples, self.stream.cfg.sample_dtype)), []
                yield shm_pool.dispatch(batch)


class PositionError(ValueError):
    """A saved data position that does not fit this loader; `differs`: the parts of its identity that differ (seed,
    mode, num_workers, shards, shuffle_buffer, epoch_length, rank, world_size, version) -> (saved, now), empty when
    it is malformed."""

    def __init__(self, message: str, differs: dict[str, tuple] | None = None):
        super().__init__(message)
        self.differs = differs or {}


class StreamLoader:
    """Iterate for batches (forever); `state_dict()` is the position after the batches taken so far."""

    def __init__(self, cfg: DataConfig, *, rank: int, world_size: int, seed: int, micro_batch_size: int,
                 position: dict | None = None, shards: str | None = None, pin_memory: bool = False,
                 latents: LatentsSpec | None = None):
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        self.cfg, self.batch_size, self.pin_memory = cfg, micro_batch_size, pin_memory
        spec = shards if shards is not None else cfg.shards
        shard_list = list_shards(spec)
        self.latents = latents
        self.uses_latents = stored_latents(spec, cfg, latents)  # checked up front: a mismatch raises here
        self.plan = StreamPlan(tuple(shard_list), seed=seed, rank=rank, world_size=world_size,
                               workers=max(1, cfg.num_workers), mode=cfg.mode, epoch_length=cfg.epoch_length,
                               shuffle_buffer=cfg.shuffle_buffer)
        self.fingerprint = shard_fingerprint(shard_list)
        # per local slot: epoch, position, samples skipped, of them clips shorter than the frame window
        self.slots = [[0, 0, 0, 0] for _ in range(self.plan.workers)]
        self.next_slot = 0
        self.samples = 0
        self._iter = None
        self._loans = None
        if position is not None:
            self._restore(position)

    def _identity(self) -> dict:
        # shuffle_buffer orders every epoch; epoch_length splits a resampled stream into epochs (exact mode: unused)
        return {"version": POSITION_VERSION, "mode": self.plan.mode, "seed": self.plan.seed, "rank": self.plan.rank,
                "world_size": self.plan.world_size, "num_workers": self.plan.workers, "shards": self.fingerprint,
                "shuffle_buffer": self.plan.shuffle_buffer,
                "epoch_length": self.plan.epoch_length if self.plan.mode == "resampled" else 0}

    def state_dict(self) -> dict:
        return {**self._identity(), "next_slot": self.next_slot, "samples": self.samples,
                "slots": [list(s) for s in self.slots]}

    def _restore(self, position: dict):
        try:
            saved = {k: position[k] for k in self._identity() if k in position or k not in LATER_KEYS}
            slots, next_slot, samples = position["slots"], int(position["next_slot"]), int(position["samples"])
        except (KeyError, TypeError, ValueError) as exc:
            raise PositionError(f"data position is malformed ({exc!r}): {position}") from None
        mine = self._identity()
        diff = {k: (saved[k], mine[k]) for k in saved if saved[k] != mine[k]}
        if diff.get("shards", (None,))[0] == shard_fingerprint(self.plan.shards, contents=False):  # pre-2026-12-04
            log.warning("data position saved by an earlier version, whose fingerprint of the shard set covers names "
                        "and sample counts only: they match; the shards' contents cannot be checked against it")
            del diff["shards"]
        if diff and self.plan.mode == "resampled" and saved["mode"] == "resampled" and "version" not in diff:
            # a resampled stream only needs to be statistically equivalent: move on to unseen epochs
            epoch = max(int(s[0]) for s in slots) + 1
            log.warning("data position saved for %s; resampled mode starts fresh at epoch %d",
                        {k: v[0] for k, v in diff.items()}, epoch)
            self.slots = [[epoch, 0, 0, 0] for _ in self.slots]
            self.slots[0][2:] = [sum(int(s[i]) for s in _padded(slots)) for i in (2, 3)]  # keep the run's counts
            self.samples = samples
            return
        if diff:
            raise PositionError("data position does not fit this loader (saved vs now): " +
                                ", ".join(f"{k}: {a} vs {b}" for k, (a, b) in diff.items()) +
                                "; exact resume needs the same seed, rank, world size, num_workers, shuffle buffer and "
                                "shard set (its shards' names, sample counts and sha256)", diff)
        if len(slots) != self.plan.workers or not 0 <= next_slot < self.plan.workers:
            raise PositionError(f"data position has {len(slots)} slots / next_slot {next_slot} for "
                                f"{self.plan.workers} workers")
        self.slots = [[int(v) for v in s] for s in _padded(slots)]
        self.next_slot, self.samples = next_slot, samples

    @property
    def samples_yielded(self) -> int:
        """Samples handed to the consumer (over the whole run, resumes included)."""
        return self.samples

    @property
    def samples_skipped(self) -> int:
        """Samples skipped before the consumed positions (whole run): corrupt, undecodable or too short."""
        return sum(s[2] for s in self.slots)

    @property
    def samples_too_short(self) -> int:
        """Of samples_skipped, the clips shorter than the frame window (counted since positions kept them apart)."""
        return sum(s[3] for s in self.slots)

    def _loader(self) -> DataLoader:
        stream = ShardStream(self.plan, self.cfg, start={i: tuple(s) for i, s in enumerate(self.slots)},
                             rotation=self.next_slot, latents=self.latents, latents_only=self.uses_latents)
        workers = self.cfg.num_workers
        # new flags for each DataLoader: batches of an earlier one, freed late, must not free this one's buffers
        self._loans = shm_pool.new_flags(workers) if workers else None
        # a generator of its own for the workers' base seed (the stream does not depend on it): DataLoader would
        # otherwise draw it from the global torch RNG at every iter(), which the trainer checkpoints and the step
        # draws from (LoRA dropout), so a resumed run would step with other random numbers than an uninterrupted one
        seed = torch.Generator().manual_seed(self.plan.seed * 1_000_003 + self.plan.rank)
        return DataLoader(BatchStream(stream, self.batch_size, self._loans), batch_size=None, num_workers=workers,
                          pin_memory=self.pin_memory, prefetch_factor=2 if workers else None, in_order=True,
                          worker_init_fn=_worker_init if workers else None, generator=seed)

    def __iter__(self):
        """Batches from the consumed position on; a new iterator resumes where the last consumed batch left off."""
        self.close()
        self._iter = iter(self._loader())
        W, base = self.plan.workers, self.plan.rank * self.plan.workers
        for batch in self._iter:
            local = int(batch["__slot__"][-1]) - base
            expected = self.next_slot
            if local != expected:
                raise RuntimeError(f"batch came from reader slot {local}, expected {expected}: the round robin broke")
            self.slots[local] = [int(batch[k][-1]) for k in ("__epoch__", "__pos__", "__skipped__", "__short__")]
            self.next_slot = (local + 1) % W
            self.samples += len(batch["__key__"])
            yield batch

    def pool_stats(self) -> dict[str, int]:
        """Shared-memory buffer pool statistics of the current workers (shm_pool.STATS; zeros without workers)."""
        return shm_pool.stats(self._loans[1]) if self._loans else dict.fromkeys(shm_pool.STATS, 0)

    def close(self):
        """Stop the worker processes (an open iterator ends)."""
        if self._iter is not None:
            shutdown = getattr(self._iter, "_shutdown_workers", None)
            if shutdown:
                shutdown()
            self._iter = None


def _padded(slots: list) -> list[list[int]]:
    """Saved slots as [epoch, position, skipped, too short]; a position saved before short clips were counted apart
    holds 3 numbers a slot (their count starts at 0)."""
    out = []
    for s in slots:
        if not isinstance(s, (list, tuple)) or len(s) not in (3, 4):
            raise PositionError(f"data position is malformed: slot {s!r:.80} is not [epoch, position, skipped, short]")
        out.append([int(v) for v in s] + [0] * (4 - len(s)))
    return out


def build_loader(data_cfg: DataConfig, *, seed: int, micro_batch_size: int, rank: int | None = None,
                 world_size: int | None = None, position: dict | None = None, shards: str | None = None,
                 pin_memory: bool = False, latents: LatentsSpec | None = None) -> StreamLoader:
    """The training loader of one rank: `rank`/`world_size` as given, else from torch.distributed or the launcher's
    environment (reader.dist_rank_world). `position` is a previous `state_dict()`; `shards` overrides
    data_cfg.shards (e.g. with data_cfg.val_shards). `latents` (latents.latents_spec(cfg)) is the VAE the
    stored latents must come from; shards with latents and data.use_latents need it (docs/data.md)."""
    if (rank is None) != (world_size is None):
        raise ValueError(f"give rank and world_size together (got rank={rank}, world_size={world_size})")
    if rank is None:
        rank, world_size = dist_rank_world()
    return StreamLoader(data_cfg, rank=rank, world_size=world_size, seed=seed, micro_batch_size=micro_batch_size,
                        position=position, shards=shards, pin_memory=pin_memory, latents=latents)
