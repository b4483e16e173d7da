"""Deterministic shard stream: its output is a pure function of (seed, epoch, rank, world size, worker slot).

Per epoch, a seeded permutation of the shards is dealt to the R x W reader slots by index (slot j of rank r,
worker w being j = r * W + w, gets perm[j::R*W]); resampled mode instead draws shards with replacement per
slot until its share of the fixed epoch length is covered. Within a slot, raw samples (undecoded bytes) pass
a seeded shuffle buffer. The buffer's choices depend only on the per-shard sample counts of index.json, so the
slot's epoch order is computed up front as a list of (shard, index-in-shard); reading follows that order with
at most ~buffer raw samples held. Resuming at raw position p therefore needs no decoding and does not even
open shards whose samples all lie before p. Each worker's stream runs over epochs 0, 1, 2, ... forever, so a
DataLoader's round robin over workers never meets an exhausted worker.
"""
from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import braceexpand
import numpy as np
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_expander

from data_pipeline import checksums, shm_pool
from data_pipeline.config import DataConfig
from data_pipeline.decode import SampleError, ShortClipError, decode_clip, window_indices
from data_pipeline.latents import LatentsMismatchError, LatentsSpec, check_settings, latent_sample
from data_pipeline.shard_index import read_index
from data_pipeline.transforms import to_sample, to_staged_sample

log = logging.getLogger(__name__)

# distinct seed streams, so the shard permutation, resampling, shuffle and per-sample draws never coincide
_PERMUTE, _RESAMPLE, _SHUFFLE, _SAMPLE = 1, 2, 3, 4
_STRIDE = 1 << 32  # order items are encoded as source * _STRIDE + index-in-shard


class NoUsableSamples(RuntimeError):
    """A reader slot found no usable sample in EMPTY_EPOCHS_LIMIT epochs in a row: its shards became unreadable,
    or every sample in them is skipped. Raised in a DataLoader worker, it reaches the trainer as the same type."""


@dataclass(frozen=True)
class Shard:
    name: str
    path: str
    count: int
    keys: tuple[str, ...]  # sample keys in tar order (index.json)
    sha256: str  # of the shard file (index.json)


def shard_directory(spec: str) -> Path:
    """The folder holding index.json of a shard directory or pattern (data.shards, data.val_shards, eval.dataset:
    the messages name the spec, their callers the key)."""
    if not spec:
        raise ValueError("no shards given: give a shard directory or a pattern like /d/shard-{000000..000009}.tar")
    if os.path.isdir(spec):
        return Path(spec)
    name = os.path.basename(spec)
    if not (glob.has_magic(name) or "{" in name or os.path.isfile(spec)):
        raise ValueError(f"{spec}: no such shard directory or shard file")
    return Path(os.path.dirname(spec) or ".")


def list_shards(spec: str) -> list[Shard]:
    """Shards of a directory holding index.json, or of a brace/glob pattern whose directory holds it; sorted by
    name, empty shards left out. Counts and keys come from index.json (docs/data.md)."""
    directory = shard_directory(spec)
    entries = {e["name"]: e for e in read_index(directory)["shards"]}
    if os.path.isdir(spec):
        names = sorted(entries)
    else:
        paths = [p for pat in braceexpand.braceexpand(os.path.basename(spec)) for p in
                 (sorted(glob.glob(str(directory / pat))) if glob.has_magic(pat) else [str(directory / pat)])]
        names = sorted({os.path.basename(p) for p in paths})
        unknown = [n for n in names if n not in entries]
        if unknown:
            raise ValueError(f"data.shards={spec}: {len(unknown)} shard(s) not in {directory / 'index.json'}: {unknown[:5]}")
    shards = [Shard(n, str(directory / n), entries[n]["samples"], tuple(entries[n]["keys"]), entries[n]["sha256"])
              for n in names if entries[n]["samples"] > 0]
    if not shards:
        raise ValueError(f"data.shards={spec}: no non-empty shards")
    return shards


def stored_latents(spec: str, cfg: DataConfig, latents: LatentsSpec | None) -> bool:
    """Whether the shard set's index records latents that this run uses (data.use_latents); checks them
    against the config and the expected VAE first (LatentsMismatchError naming the index)."""
    directory, meta = _used_latents(spec, cfg)
    if meta is None:
        return False
    check_settings(meta, cfg, latents, str(directory / "index.json"))
    return True


def _used_latents(spec: str, cfg: DataConfig) -> tuple[Path, dict | None]:
    """(the shard set's folder, its index's `latents` record when this run reads them (data.use_latents))."""
    directory = shard_directory(spec)
    meta = read_index(directory).get("latents")
    return directory, meta if cfg.use_latents else None


def stored_text(spec: str, cfg: DataConfig) -> tuple[str | None, Path | None]:
    """(the text encoder whose caption embeddings the shard set stores, the file of its empty-prompt embedding)
    as `one4d encode-latents` records them in index.json, when this run reads the stored latents
    (data.use_latents); None for what is not there."""
    directory, meta = _used_latents(spec, cfg)
    if meta is None:
        return None, None
    name = meta.get("empty_prompt")
    return meta.get("text_encoder"), directory / name if name and (directory / name).is_file() else None


def shard_fingerprint(shards: list[Shard], contents: bool = True) -> str:
    """Identifies the shard set a position belongs to: names, counts and contents (sha256), so that shards of
    other clips under the same names and counts (a re-shard) are another set. `contents=False`: names and counts
    only, the fingerprint of positions saved before 2026-12-04."""
    text = json.dumps([[s.name, s.count, s.sha256] if contents else [s.name, s.count] for s in shards])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def dist_rank_world() -> tuple[int, int]:
    """(rank, world size) from torch.distributed when initialised, else the launcher's environment
    (RANK/WORLD_SIZE from torchrun, SLURM_PROCID/SLURM_NTASKS from srun), else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    for rank_var, world_var in (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS")):
        if rank_var in os.environ and world_var in os.environ:
            return int(os.environ[rank_var]), int(os.environ[world_var])
    return 0, 1


def shuffle_order(counts: list[int], buffer: int, rng: np.random.Generator) -> np.ndarray:
    """Output order of a shuffle buffer of size `buffer` fed with the sources' samples in order, as encoded
    items source * _STRIDE + index. Depends on counts and rng only, never on the data."""
    stream = [s * _STRIDE + i for s, c in enumerate(counts) for i in range(c)]
    if buffer <= 1:
        return np.asarray(stream, np.int64)
    draws = rng.random(len(stream)).tolist()
    out, buf = [], []

    def pick():
        j = int(draws[len(out)] * len(buf))
        buf[j], buf[-1] = buf[-1], buf[j]
        out.append(buf.pop())

    for item in stream:
        buf.append(item)
        if len(buf) >= buffer:
            pick()
    while buf:
        pick()
    return np.asarray(out, np.int64)


@dataclass(frozen=True)
class StreamPlan:
    """Everything a reader slot's stream depends on."""
    shards: tuple[Shard, ...]
    seed: int
    rank: int
    world_size: int
    workers: int  # reader slots per rank (1 when the DataLoader has no workers)
    mode: str = "exact"
    epoch_length: int = 0  # resampled: samples per rank per epoch (0 = dataset size / world size)
    shuffle_buffer: int = 16

    def __post_init__(self):
        slots = self.world_size * self.workers
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside world size {self.world_size}")
        if self.mode == "exact" and len(self.shards) < slots:
            raise ValueError(f"exact mode needs at least one shard per reader slot: {len(self.shards)} shards for "
                             f"{self.world_size} ranks x {self.workers} workers; write smaller shards or use fewer workers")
        if self.mode == "resampled" and min(self.slot_length(w) for w in range(self.workers)) < 1:
            raise ValueError(f"resampled epoch length {self.rank_length()} per rank is below {self.workers} workers")
        if sum(s.count for s in self.shards) == 0:
            raise ValueError("the shard set holds no samples")

    def slot(self, local: int) -> int:
        return self.rank * self.workers + local

    def rank_length(self) -> int:
        return self.epoch_length or sum(s.count for s in self.shards) // self.world_size

    def slot_length(self, local: int) -> int:
        n, w = self.rank_length(), self.workers
        return n // w + (local < n % w)

    def sources(self, local: int, epoch: int) -> list[Shard]:
        """The shards slot `local` reads in `epoch`, in reading order."""
        if self.mode == "exact":
            perm = np.random.default_rng([self.seed, _PERMUTE, epoch]).permutation(len(self.shards))
            return [self.shards[i] for i in perm[self.slot(local)::self.world_size * self.workers]]
        rng = np.random.default_rng([self.seed, _RESAMPLE, epoch, self.slot(local)])
        need, out = self.slot_length(local), []
        while need > 0:
            shard = self.shards[int(rng.integers(len(self.shards)))]
            out.append(shard)
            need -= shard.count
        return out

    def order(self, local: int, epoch: int, sources: list[Shard]) -> np.ndarray:
        rng = np.random.default_rng([self.seed, _SHUFFLE, epoch, self.slot(local)])
        order = shuffle_order([s.count for s in sources], self.shuffle_buffer, rng)
        return order[:self.slot_length(local)] if self.mode == "resampled" else order

    def sample_rng(self, local: int, epoch: int, pos: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, _SAMPLE, epoch, self.slot(local), pos])


_said: set = set()  # shard-level warnings this process has logged: a damaged shard is read at every epoch


def _warn_once(message: str, counted: bool = True, about=None) -> None:
    """Log `message` the first time this process meets `about` (default: the message itself; it names the file)."""
    about = message if about is None else about
    if about not in _said:
        _said.add(about)
        log.warning("%s (logged once%s)", message, "; data_skipped counts them at every epoch" if counted else "")


def _log_tar_error(exn: Exception) -> bool:
    _warn_once("shard read error (remaining samples of this shard are counted as skipped): "
               + (" ".join(str(a) for a in exn.args if isinstance(a, str)) or repr(exn)))
    return True


def _opened(path: str) -> Iterator[dict]:
    """The shard file at `path` as webdataset's tar pieces take it, opened as a plain file: its URL opener would also
    run 'pipe:CMD' in a shell. A file that does not open is logged and reads as empty."""
    try:
        stream = open(path, "rb")
    except OSError as exc:
        _log_tar_error(OSError(f"{path}: {exc.strerror or exc}"))
        return
    with stream:
        yield {"url": path, "stream": stream}


def raw_samples(shard: Shard) -> Iterator[dict]:
    """Undecoded samples (member suffix -> bytes, plus __key__) of one shard, read with webdataset's tar pieces."""
    yield from group_by_keys(tar_file_expander(_opened(shard.path), handler=_log_tar_error), handler=_log_tar_error)


def read_in_order(sources: list[Shard], order: np.ndarray, start: int) -> Iterator[tuple[int, Shard, str, dict | None]]:
    """Yield (position after it, shard, key, raw sample or None when missing) for order[start:], reading the
    sources sequentially and holding only samples still to come. Samples before `start` are skipped unread
    where a whole shard lies before it, read and dropped otherwise."""
    todo = order[start:]
    needed = set(todo.tolist())
    pending = np.bincount(todo // _STRIDE, minlength=len(sources)).tolist()
    held: dict[int, dict] = {}
    missing: set[int] = set()
    cur, it, seen, index_of = 0, None, set(), {}

    def advance():
        nonlocal cur, it, seen, index_of
        if it is None:
            while not pending[cur]:
                cur += 1
            it, seen = raw_samples(sources[cur]), set()
            index_of = {k: i for i, k in enumerate(sources[cur].keys)}
        shard = sources[cur]
        raw = next(it, None)
        if raw is None:
            lost = [i for i in range(shard.count) if i not in seen]
            if lost:  # tarfile ends quietly at a damaged header: the index's count is what tells
                _warn_once(f"shard={shard.name}: the tar ended after {len(seen)} of the {shard.count} samples "
                           f"index.json lists; the other {len(lost)} (those still due) are counted as skipped",
                           about=(shard.path, "ended"))
            missing.update(cur * _STRIDE + i for i in lost)
            cur, it = cur + 1, None
            return
        i = index_of.get(raw["__key__"], -1)
        if i < 0 or i in seen:
            _warn_once(f"shard={shard.name} key={raw['__key__']}: sample not in index.json (or repeated); ignored",
                       counted=False, about=(shard.path, raw["__key__"]))
            return
        seen.add(i)
        item = cur * _STRIDE + i
        if item in needed:
            held[item] = raw

    for p, item in enumerate(todo.tolist(), start=start):
        while item not in held and item not in missing:
            advance()
        s, i = divmod(item, _STRIDE)
        raw = held.pop(item, None)
        pending[s] -= 1
        yield p + 1, sources[s], sources[s].keys[i], raw


def _short_clip(raw: dict, cfg: DataConfig) -> None:
    """ShortClipError where the clip of a sample (its json member's num_frames) is shorter than the frame window."""
    try:
        frames = int(json.loads(raw["json"].decode("utf-8"))["num_frames"])
    except Exception:  # no usable count: the sample is skipped as lacking latents
        return
    window_indices(frames, cfg.num_frames, cfg.frame_stride, pinned=True)


# a reader slot that finds nothing usable in this many epochs in a row stops the run (the data is unusable); a
# single empty epoch (all of the few shards dealt to the slot were bad) is logged and passed over
EMPTY_EPOCHS_LIMIT = 16


class ShardStream(IterableDataset):
    """Decoded samples (docs/data.md) of one rank; each DataLoader worker serves one reader slot, forever.

    `start` maps a rank-local slot to (epoch, raw position, skipped so far, of them clips shorter than the frame
    window); `rotation` makes worker w serve local slot (w + rotation) % workers, so that after a resume the
    DataLoader's first batch comes from the slot that was next.

    With data.use_latents, a sample carrying latents (`one4d encode-latents`) is read by
    latents.latent_sample (stored window and crop, latents instead of geometry) and checked against the config
    and `latents` (the expected VAE); a mismatch raises LatentsMismatchError instead of being skipped. With
    `latents_only` (the shard set's index records latents) a sample without them is skipped, so that every
    batch has the same keys.
    """

    def __init__(self, plan: StreamPlan, cfg: DataConfig, start: dict[int, tuple[int, int, int]] | None = None,
                 rotation: int = 0, latents: LatentsSpec | None = None, latents_only: bool = False):
        self.plan, self.cfg, self.start, self.rotation = plan, cfg, dict(start or {}), rotation
        self.latents, self.latents_only = latents, latents_only and cfg.use_latents

    def local_slot(self) -> int:
        info = get_worker_info()
        workers = info.num_workers if info else 1
        if workers != self.plan.workers:
            raise RuntimeError(f"stream planned for {self.plan.workers} reader slots per rank, run by {workers} workers")
        return ((info.id if info else 0) + self.rotation) % workers

    def decode(self, raw: dict, rng: np.random.Generator, where: str = "sample") -> dict:
        c = self.cfg
        checksums.verify(raw)
        if c.use_latents and "latents.npz" in raw:
            return latent_sample(raw, c, self.latents, where)
        if self.latents_only:
            _short_clip(raw, c)  # encode-latents could not encode it for its length: counted as short, not corrupt
            raise SampleError("no stored latents (one4d encode-latents could not encode it; see index.json "
                              "latents.failed)")
        clip = decode_clip(raw, c.num_frames, c.frame_stride, rng, size=(c.height, c.width))
        if c.finish_on_device:
            return to_staged_sample(clip, c.height, c.width, c.crop, c.pointmap_percentiles, rng)
        return to_sample(clip, c.height, c.width, c.crop, c.pointmap_percentiles, rng, c.sample_dtype)

    def __iter__(self):
        local = self.local_slot()
        slot = self.plan.slot(local)
        epoch, pos, skipped, short = self.start.get(local, (0, 0, 0, 0))
        told: dict[str, str] = {}  # key -> the reason this slot logged it skipped for: said again only if it changes
        empty = 0  # epochs in a row in which this slot found no usable sample
        while True:
            sources = self.plan.sources(local, epoch)
            order = self.plan.order(local, epoch, sources)
            yielded = 0
            for after, shard, key, raw in read_in_order(sources, order, pos):
                reason = "missing from the shard (truncated or unreadable tar)" if raw is None else None
                too_short = False
                if raw is not None:
                    lent = shm_pool.mark()
                    try:
                        sample = self.decode(raw, self.plan.sample_rng(local, epoch, after - 1),
                                             f"shard={shard.name} key={key}")
                    except LatentsMismatchError:
                        raise
                    except Exception as exc:
                        too_short = isinstance(exc, ShortClipError)  # no damage: counted apart, logged once
                        reason = (f"shorter than the frame window: {exc}" if too_short
                                  else f"{type(exc).__name__}: {exc}")
                        shm_pool.release(lent)  # the dropped sample's pooled buffers
                if reason:
                    skipped, short = skipped + 1, short + too_short
                    if told.get(key) != reason:  # a damaged sample fails the same way at every epoch
                        log.warning("skipped sample shard=%s key=%s slot=%d epoch=%d: %s%s", shard.name, key, slot,
                                    epoch, reason, " (skipped at every epoch, logged once)" if too_short else
                                    " (logged again only if it fails otherwise; data_skipped counts every skip)")
                        told[key] = reason
                    continue
                yielded += 1
                sample.update(__key__=key, __shard__=shard.name, __slot__=slot, __epoch__=epoch, __pos__=after,
                              __skipped__=skipped, __short__=short)
                yield sample
            if yielded == 0 and pos == 0:  # every shard dealt to this slot this epoch was unusable
                empty += 1
                names = [s.name for s in sources]
                if empty >= EMPTY_EPOCHS_LIMIT:
                    raise NoUsableSamples(f"reader slot {slot}: no usable sample in {empty} epochs in a row (the last, "
                                          f"epoch {epoch}: shards {names}); the reason for each sample is logged "
                                          "above; `one4d inspect-shards` checks the shards")
                log.warning("reader slot %d: no usable sample in epoch %d (shards %s); going on with epoch %d",
                            slot, epoch, names, epoch + 1)
            elif yielded:
                empty = 0
            epoch, pos = epoch + 1, 0
