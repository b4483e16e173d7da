"""Manifest -> WebDataset tar shards: a deterministic plan, validated samples, atomic resumable writes.

The plan (which manifest rows go to which shard) is fixed from the manifest before anything is written, so
any split of the work (worker processes, Slurm array tasks, a re-run after a kill) produces the same shards.
A shard is written to a hidden temp name, fsynced and renamed; then its record (`NAME.record.json`: entry,
rejects, per-sample statistics, its rows' input fingerprints) is written. A shard whose record matches its file,
and whose rows' input files are unchanged, is not written again.
One run at a time writes into an output folder (`shard.lock`; the tasks of one array hold it shared and each its
own `shard.task-I.lock`, so they run side by side, but never beside a whole run or a --merge).
"""
from __future__ import annotations

import ctypes
import io
import json
import logging
import os
import re
import signal
import socket
import sys
import tarfile
import zipfile
import zlib
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from data_pipeline import shard_index as si
from data_pipeline.checksums import with_sums
from data_pipeline.decode import frame_member
from data_pipeline.manifest import (ManifestError, ManifestRow, RowError, load_geometry, load_text_embedding,
                                   not_a_file, read_manifest, repeated_rows)
from data_pipeline.video import VideoError, probe_and_check

log = logging.getLogger(__name__)

PLAN_VERSION = 1


class ShardingError(RuntimeError):
    """The run cannot proceed (bad options, a plan from another manifest, the folder in use) or a merge does not
    verify."""


def lock_out_dir(out_dir: Path, task_index: int | None = None, command: str = "shard",
                 error: type[Exception] = ShardingError) -> list:
    """Hold `out_dir`'s locks for this run of `one4d <command>`, or raise `error` naming the run that holds them:
    two runs into one folder delete each other's temporary files. A whole run (and --merge) holds <command>.lock
    alone; array task I holds it shared with the other tasks, and <command>.task-I.lock alone. The locks held (none
    where the file system has no POSIX locks: a warning says so)."""
    from one4d_train.train.run_lock import Held, hold

    held = []
    folder_lock = out_dir / f"{command}.lock"
    wanted = [(folder_lock, task_index is not None)]
    if task_index is not None:
        wanted.append((out_dir / f"{command}.task-{task_index}.lock", False))
    for path, shared in wanted:
        try:
            held.append(hold(str(path), what=f"a second `one4d {command}`", shared=shared))
        except Held as exc:
            for lock in held:
                if lock is not None:
                    lock.release()
            who = exc.who if exc.holder else f"the tasks of a job array ({command}.task-*.lock)"
            if path != folder_lock:
                who = f"another array task {task_index} ({exc.who})"
            elif task_index is not None:
                whole = "a run of the whole manifest or a --merge" if command == "shard" else "a run over every shard"
                who = f"{whole} ({exc.who})"
            raise error(f"{out_dir} is in use by {who}: wait for it to end, or write into another "
                        f"folder. If it is no longer running (its node failed while it held the lock on a "
                        f"network file system), delete {path}") from None
    return [lock for lock in held if lock is not None]


def sample_key(row: int) -> str:
    return f"r{row:09d}"


def npz_arrays_bytes(arrays: list[tuple[str, np.ndarray]]) -> bytes:
    """A compressed npz of the named arrays, in order, with a fixed timestamp: equal arrays give equal bytes."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, array in arrays:
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            with zf.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def npz_bytes(name: str, array: np.ndarray) -> bytes:
    """A compressed one-member npz with a fixed timestamp, so equal arrays give equal bytes."""
    return npz_arrays_bytes([(name, array)])


def frames_npz_bytes(name: str, array: np.ndarray) -> bytes:
    """Geometry: one compressed array per frame (`{name}_000000`, ...), so a reader inflates
    only the frames of its window."""
    return npz_arrays_bytes([(frame_member(name, i), a) for i, a in enumerate(array)])


def packed_valid_bytes(valid: np.ndarray) -> bytes:
    """Validity: `valid_packed` = np.packbits(valid, axis=-1), uint8 [T, H, ceil(W / 8)]."""
    return npz_bytes("valid_packed", np.packbits(np.asarray(valid, bool), axis=-1))


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def encode_sample(r: ManifestRow) -> tuple[list[tuple[str, bytes]], dict]:
    """Validate one row and build its shard members (docs/data.md) and statistics; raises RowError."""
    if not Path(r.video).is_file():
        raise not_a_file(r.row, Path(r.video), "video file", r.base)
    try:
        info = probe_and_check(r.video)
    except VideoError as exc:
        raise RowError(r.row, str(r.video), str(exc).removeprefix(f"{r.video}: ")) from None
    geo = load_geometry(r, info.num_frames, info.height, info.width)
    emb = load_text_embedding(r)
    key = sample_key(r.row)
    g, valid = geo["geometry"].astype(np.float16), geo["valid"]  # as stored: the statistics are the stored values
    members = [(f"{key}.mp4", r.video.read_bytes()),
               (f"{key}.{r.geometry}.npz", frames_npz_bytes(r.geometry, g)),
               (f"{key}.valid.npz", packed_valid_bytes(valid))]
    if "intrinsics" in geo:
        cam = {"intrinsics": geo["intrinsics"].tolist(), "poses_c2w": geo["poses_c2w"].tolist()}
        members.append((f"{key}.cam.json", json.dumps(cam).encode()))
    members.append((f"{key}.txt", r.caption.encode("utf-8")))
    if emb is not None:
        members.append((f"{key}.emb.npy", npy_bytes(emb.astype(np.float16))))
    meta = {"row": r.row, "id": r.id, "source": r.source, "num_frames": info.num_frames, "height": info.height,
            "width": info.width, "fps": info.fps, "geometry": r.geometry}
    members.append((f"{key}.json", json.dumps(meta, sort_keys=True).encode()))
    members = with_sums(key, members)
    z = g[valid] if r.geometry == "depth" else g[..., 2][valid]
    stats = {"key": key, "frames": info.num_frames, "height": info.height, "width": info.width,
             "geometry": r.geometry, "valid_fraction": float(valid.mean()),
             "depth_min": float(z.min()) if z.size else None, "depth_max": float(z.max()) if z.size else None,
             "text_emb_dim": int(emb.shape[1]) if emb is not None else None}
    return members, stats


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


def write_shard(out_dir, name: str, rows: list[ManifestRow]) -> dict:
    """Write one planned shard atomically, then its record; bad rows become rejects. Returns the record. A row
    that ran out of memory is a reject of this run only (`retry`): the shard gets no record file, so a re-run writes
    it again. The record keeps each row's input fingerprints, taken before encoding: a re-run writes the shard again
    once they change. A failure to write (a full disk) removes the temp file and raises ShardingError naming it."""
    out_dir = Path(out_dir)
    keys, rejects, stats, retry = [], [], [], False
    inputs = {str(r.row): r.fingerprints() for r in rows}
    tmp = out_dir / f".{name}.tmp{socket.gethostname()}-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            with tarfile.open(fileobj=f, mode="w", format=tarfile.GNU_FORMAT) as tar:
                for r in rows:
                    try:
                        members, st = encode_sample(r)
                    except RowError as exc:
                        rejects.append(exc.record())
                        continue
                    except MemoryError as exc:  # no fault of the row's: reported, and the shard is left unrecorded
                        retry = True
                        rejects.append({"row": r.row, "path": str(r.video), "retry": True, "reason": f"MemoryError: "
                                        f"{exc} (out of memory: re-run the same command, with fewer --workers, to "
                                        "write this row)"})
                        continue
                    except Exception as exc:  # a row must never stop the run
                        rejects.append({"row": r.row, "path": str(r.video), "reason": f"{type(exc).__name__}: {exc}"})
                        continue
                    for member, data in members:
                        _add(tar, member, data)
                    keys.append(st["key"])
                    stats.append(st)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out_dir / name)
        si.fsync_dir(out_dir)
        final = out_dir / name
        record = {"name": name, "samples": len(keys), "bytes": final.stat().st_size, "sha256": si.sha256_file(final),
                  "keys": keys, "rows": [r.row for r in rows], "rejects": rejects, "sample_stats": stats,
                  "inputs": inputs}
        if not retry:  # a re-run rewrites a shard without a record, and so tries its rows again
            si.write_json(si.record_path(out_dir, name), record)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise ShardingError(si.write_failure(exc, out_dir, "cannot write the shard", out_dir / name)) from None
        raise
    return record


def _unless_changed(record: dict | None, rows: list[ManifestRow]) -> dict | None:
    """`record`, or None where the inputs of one of its rows changed, appeared or went since it was written (a
    record of before fingerprints were kept: where one of its rejects names a missing input file that exists now)."""
    if record is None:
        return None
    if "inputs" in record:
        return record if all(record["inputs"].get(str(r.row)) == r.fingerprints() for r in rows) else None
    # (records written before rejects carried `missing` say so by their reason)
    if any((r.get("missing") or r.get("reason") in ("file not found", "video file not found"))
           and os.path.exists(r["path"]) for r in record["rejects"]):
        return None
    return record


def shard_done(out_dir, name: str) -> dict | None:
    """The record of a finished shard whose file still matches it, else None."""
    path = si.record_path(out_dir, name)
    if not path.is_file():
        return None
    try:
        record = si.read_json(path)
    except si.ShardIndexError:
        return None
    return record if si.verify_shard_file(out_dir, record) is None else None


# the estimate of a written sample: tar header + padding per member (~9 members), npz local + central headers
# per geometry frame, cam.json text per frame (a 3x3 and a 4x4 matrix of floats)
TAR_MEMBER_BYTES, NPZ_MEMBER_BYTES, CAM_FRAME_BYTES = 768, 160, 520


def _geometry_bytes(path: Path) -> tuple[int, int] | None:
    """(estimated bytes, frames) of a .npy geometry stored as written (float16 frames, each deflated):
    the middle frame deflated as the writer does, times the number of frames (~12 ms a row at 480p instead of
    compressing the clip; within ~10-20% on real and synthetic clips: frames differ). None where the file is
    not a plain .npy."""
    a = _npy_map(path)
    if a is None or a.ndim < 3 or a.shape[0] == 0:
        return None
    T = a.shape[0]
    frame = np.ascontiguousarray(a[T // 2], np.float16).tobytes()
    return (len(zlib.compress(frame, zlib.Z_DEFAULT_COMPRESSION)) + NPZ_MEMBER_BYTES) * T, T


def _npy_map(path: Path) -> np.ndarray | None:
    """A memory map of a plain .npy, or None for anything else (an empty file, an npz under a .npy name...: the
    row's own validation rejects it later; planning must not stop on it)."""
    try:
        a = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception:
        return None
    return a if isinstance(a, np.ndarray) else None


def _mask_bytes(path: Path) -> int | None:
    """Estimated size of a .npy validity mask stored bit-packed and deflated: its middle frame so, x frames."""
    a = _npy_map(path)
    if a is None or a.ndim != 3 or a.shape[0] == 0:
        return None
    packed = np.packbits(np.asarray(a[a.shape[0] // 2], bool), axis=-1).tobytes()
    return len(zlib.compress(packed, zlib.Z_DEFAULT_COMPRESSION)) * a.shape[0] + NPZ_MEMBER_BYTES


def _estimated_bytes(r: ManifestRow) -> int:
    """The row's sample as `one4d shard` will write it, estimated without encoding it: the video as it is,
    .npy geometry by _geometry_bytes and .npy masks by _mask_bytes, a .npy text embedding as float16, cameras as
    JSON text, other inputs at their file size, tar overhead."""
    total, frames = TAR_MEMBER_BYTES * 9, 1
    for p in r.input_paths():
        if not p.is_file() or p in (r.intrinsics, r.poses):
            continue
        npy = p.suffix == ".npy"
        est = _geometry_bytes(p) if p == r.geometry_path and npy else None
        if est is not None:
            total, frames = total + est[0], est[1]
            continue
        size = _mask_bytes(p) if p == r.valid and npy else None
        if size is None and p == r.text_embedding and npy:
            a = _npy_map(p)
            size = 2 * a.size + 128 if a is not None else None
        total += size if size is not None else p.stat().st_size
    if r.intrinsics is not None or r.poses is not None:
        total += CAM_FRAME_BYTES * frames
    return total


def make_plan(manifest, samples_per_shard: int | None = None, shard_bytes: int | None = None,
              previous: dict | None = None) -> tuple[dict, dict]:
    """(plan, rows by row number): rows grouped into shards in manifest order, by count or by estimated bytes
    (the written sample's size, _estimated_bytes; a shard closes before it would exceed shard_bytes). A
    `previous` plan of the same manifest and options (a re-run, another array task) is taken as it is, so the
    size estimates are made once."""
    if (samples_per_shard is None) == (shard_bytes is None):
        raise ShardingError("give exactly one of samples_per_shard or shard_bytes")
    if (samples_per_shard or 1) < 1 or (shard_bytes or 1) < 1:
        raise ShardingError("samples_per_shard and shard_bytes must be >= 1")
    try:
        rows, errors = read_manifest(manifest)
    except ManifestError as exc:  # nothing to plan: refused before the output folder is made
        raise ShardingError(str(exc)) from None
    manifest_sha = si.sha256_file(manifest)
    reuse = previous is not None and shard_bytes and (previous.get("version"), previous.get("manifest_sha256"),
                                                      previous.get("shard_bytes")) == (PLAN_VERSION, manifest_sha, shard_bytes)
    if reuse:
        groups = [list(s["rows"]) for s in previous["shards"]]
    else:
        groups, size = [], 0
        for r in rows:
            est = _estimated_bytes(r) if shard_bytes else 1
            if not groups or (groups[-1] and size + est > (shard_bytes or samples_per_shard)):
                groups.append([])
                size = 0
            groups[-1].append(r.row)
            size += est
    plan = {"version": PLAN_VERSION, "manifest_sha256": manifest_sha,
            "samples_per_shard": samples_per_shard, "shard_bytes": shard_bytes,
            "shards": [{"name": si.shard_name(i), "rows": g} for i, g in enumerate(groups)],
            "rejects": [e.record() for e in errors]}
    return plan, {r.row: r for r in rows}


def plan_differences(old: dict, new: dict) -> list[str]:
    """What differs between a recorded plan and this run's, in words."""
    def short(v):
        return f"{v[:12]}..." if isinstance(v, str) and len(v) == 64 else v

    out = []
    for key in ("version", "manifest_sha256", "samples_per_shard", "shard_bytes"):
        if old.get(key) != new.get(key):
            name = key.replace("_sha256", " sha256")
            out.append(f"{name} {short(old.get(key))} when planned, {short(new.get(key))} now")
    if old.get("shards") != new.get("shards") and not out:
        out.append("the rows' grouping into shards differs")
    a, b = old.get("rejects", []), new.get("rejects", [])
    rows = sorted({r.get("row") for r in a} ^ {r.get("row") for r in b})
    if rows:
        listed = f"{rows[:10]}"[:-1] + (f", ... ({len(rows)} in all)]" if len(rows) > 10 else "]")
        out.append(f"unparsable rows differ: rows {listed}")
    elif a != b:
        x, y = next((x, y) for x, y in zip(a, b) if x != y)
        out.append(f"an unparsable row's record differs: {x} when planned, {y} now")
    return out or ["recorded plan differs"]


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _die_with_parent(parent: int) -> None:
    """Pool initializer: the worker gets SIGKILL when the process that forked it dies (Linux prctl; elsewhere only
    the check below), so a killed `one4d shard` leaves no orphans writing shards beside a re-run."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent:  # the parent died before the signal was set up
        os._exit(1)


def _write_task(args) -> dict:
    out_dir, name, rows = args
    return write_shard(out_dir, name, rows)


def array_task_index(num_tasks: int | None, task_index: int | None) -> int | None:
    """--task-index as given, else, in an array (--num-tasks given), $SLURM_ARRAY_TASK_ID where it is set."""
    if num_tasks is not None and task_index is None and "SLURM_ARRAY_TASK_ID" in os.environ:
        return int(os.environ["SLURM_ARRAY_TASK_ID"])
    return task_index


def array_task_problem(num_tasks: int | None, task_index: int | None) -> str | None:
    """Why --num-tasks N / --task-index I name no task of an array of N (None where they do, or neither is given);
    `one4d shard` and `one4d encode-latents` alike."""
    if num_tasks is None:
        return None if task_index is None else "--task-index needs --num-tasks (the array's size)"
    if task_index is None:
        return ("--num-tasks needs --task-index, which defaults to $SLURM_ARRAY_TASK_ID, not set here (outside an "
                "array job give --task-index I)")
    if num_tasks < 1:
        return f"--num-tasks must be >= 1, got {num_tasks}"
    if not 0 <= task_index < num_tasks:
        return (f"--task-index must be in [0, {num_tasks - 1}] with --num-tasks {num_tasks}, got {task_index}"
                + (f" (array task ids start at 0: --array=0-{num_tasks - 1})" if task_index == num_tasks else ""))
    return None


def run_sharding(manifest, out_dir, samples_per_shard: int | None = None, shard_bytes: int | None = None,
                 workers: int = 1, num_tasks: int | None = None, task_index: int | None = None,
                 progress: bool = True) -> dict:
    """Write this task's planned shards (all shards without num_tasks), skipping finished ones; then write
    index.json (single run) or index.task-I.json (array task). Returns a summary dict (`repeated`: the written
    rows, of this task's shards, that repeat an earlier one's clip or id: manifest.repeated_rows)."""
    problem = array_task_problem(num_tasks, task_index)
    if problem:
        raise ShardingError(problem)
    out_dir = Path(out_dir)
    recorded = out_dir / si.PLAN
    plan, rows = make_plan(manifest, samples_per_shard, shard_bytes,
                           previous=si.read_json(recorded) if recorded.is_file() else None)
    if not plan["shards"] and not plan["rejects"]:  # nothing made from it, not even an index of no shards
        raise ShardingError(f"{manifest}: the manifest has no rows (one JSON object per line: docs/data.md)")
    if out_dir.exists() and not out_dir.is_dir():
        raise ShardingError(f"{out_dir}: not a folder: OUT_DIR is the folder the shards go to (new or this run's)")
    problem = si.foreign_files_problem(out_dir, "one4d shard", "shard", "the shards")
    if problem:
        raise ShardingError(problem)
    out_dir.mkdir(parents=True, exist_ok=True)
    locks = lock_out_dir(out_dir, task_index)
    try:
        return _write_planned(out_dir, plan, rows, workers, num_tasks, task_index, progress)
    finally:
        for lock in locks:
            lock.release()


def _write_planned(out_dir: Path, plan: dict, rows: list, workers: int, num_tasks: int | None, task_index: int | None,
                   progress: bool) -> dict:
    """run_sharding's writing, with the output folder locked."""
    from tqdm import tqdm

    old = si.pin_plan(out_dir, plan)
    replaced = [] if old is None else _replace_plan(out_dir, old, plan, whole_run=num_tasks is None)
    mine = [(i, s) for i, s in enumerate(plan["shards"]) if num_tasks is None or i % num_tasks == task_index]
    for _, s in mine:
        for stale in si.temp_files(out_dir, s["name"]):
            stale.unlink()
    # a shard whose rows' input files changed (a video fixed in place, a missing file there now) is written again
    done = {s["name"]: shard_done(out_dir, s["name"]) for _, s in mine}
    records = {s["name"]: _unless_changed(done[s["name"]], [rows[r] for r in s["rows"]]) for _, s in mine}
    changed = sum(done[name] is not None and records[name] is None for name in records)
    todo = [(str(out_dir), s["name"], [rows[r] for r in s["rows"]]) for _, s in mine if records[s["name"]] is None]
    skipped = len(mine) - len(todo)
    bar = tqdm(total=len(mine), initial=skipped, unit="shard", desc="shards", disable=not progress)
    if workers > 1 and len(todo) > 1:
        try:
            # workers are forked by this (main) thread, whose exit the death signal follows
            with ProcessPoolExecutor(min(workers, len(todo)), mp_context=get_context("fork"),
                                     initializer=_die_with_parent, initargs=(os.getpid(),)) as pool:
                for done in as_completed([pool.submit(_write_task, t) for t in todo]):
                    rec = done.result()
                    records[rec["name"]] = rec
                    bar.update()
        except BrokenProcessPool:
            raise ShardingError("a worker process died (out of memory?); finished shards are kept: re-run the "
                                "same command to write the rest") from None
    else:
        for task in todo:
            rec = _write_task(task)
            records[rec["name"]] = rec
            bar.update()
    bar.close()
    recs = [records[s["name"]] for _, s in mine]
    if num_tasks is None:
        index = si.build_index(plan, recs)
        index_path = si.write_index(out_dir, index)
        rejects, samples = index["rejects"], index["totals"]["samples"]
    else:
        index_path = si.partial_index_path(out_dir, task_index)
        si.write_json(index_path, {"version": si.INDEX_VERSION, "num_tasks": num_tasks, "task_index": task_index,
                                   "manifest_sha256": plan["manifest_sha256"], "records": recs})
        rejects = sorted((x for r in recs for x in r["rejects"]), key=lambda x: x["row"])
        samples = sum(r["samples"] for r in recs)
    written = sorted(int(k.removeprefix("r")) for r in recs for k in r["keys"])
    repeated = [text for _, text in repeated_rows([rows[r] for r in written])]
    return {"index": str(index_path), "shards": len(mine), "written": len(todo), "skipped": skipped,
            "changed": changed, "samples": samples, "rejects": rejects, "repeated": repeated,
            "replaced_plan": replaced}


def _written_under_plan(out_dir: Path) -> list[str]:
    """The files of `out_dir` written (or maybe being written now) under its recorded plan: shards, their records,
    and the temp files of writers that may still run. None: a new plan mixes nothing with the old one."""
    return sorted(p.name for p in out_dir.iterdir()
                  if (not p.name.startswith(".") and p.name.endswith((".tar", ".record.json")))
                  or si.live_temp_file(p.name))


def _no_sample(path: Path) -> bool:
    """Whether `path` is a tar of no member: a shard whose rows were all rejected."""
    try:
        with tarfile.open(path) as tar:
            return tar.next() is None
    except (OSError, tarfile.TarError):
        return False


def _replace_plan(out_dir: Path, old: dict, plan: dict, whole_run: bool) -> list[str]:
    """Put `plan` in place of the other plan `old` recorded in out_dir, where no sample was written under `old` (a run
    whose rows were all unparsable or rejected, or stopped before its first shard; its shards of no sample and their
    records are removed): a retry with a corrected manifest or other options then goes ahead. Returns what differs;
    raises ShardingError, naming it, where shards of `old` holding samples are there, or for an array task, which
    holds the folder beside tasks that may be writing under `old`."""
    differences, held = plan_differences(old, plan), _written_under_plan(out_dir)
    empty = {n for n in held if n.endswith(".tar") and _no_sample(out_dir / n)}
    held = [n for n in held if n not in empty and n.removesuffix(".record.json") not in empty]
    if held or not whole_run:
        more = f" and {len(held) - 3} more" if len(held) > 3 else ""
        why = (f"it holds {', '.join(held[:3])}{more}, written under that plan: re-run with the manifest and options "
               "it was planned with, or use a new output folder" if held else
               "no sample was written under it, but an array task does not replace it (a task beside it may be "
               "writing under it): run once without --num-tasks, re-run with the manifest and options it was planned "
               "with, or use a new output folder")
        raise ShardingError(f"{out_dir / si.PLAN}: this folder holds shards planned from another manifest or other "
                            f"options ({'; '.join(differences)}); {why}")
    for stale in [out_dir / si.INDEX, out_dir / si.REJECTS, *out_dir.glob("index.task-*.json"),
                  *out_dir.glob(".*.tmp*"), *(out_dir / n for n in sorted(empty)),
                  *(si.record_path(out_dir, n) for n in sorted(empty))]:
        # the old plan's index of no samples, its shards of none, and its dead writers' temp files
        stale.unlink(missing_ok=True)
    si.write_json(out_dir / si.PLAN, plan)
    return differences


def merge(out_dir) -> dict:
    """Combine index.task-*.json into index.json after checking that every planned shard is present, was
    written from its planned rows, and matches its recorded size, sha256 and sample count."""
    out_dir = Path(out_dir)
    plan = si.read_json(out_dir / si.PLAN)
    locks = lock_out_dir(out_dir)
    try:
        return _merge(out_dir, plan)
    finally:
        for lock in locks:
            lock.release()


def _merge(out_dir: Path, plan: dict) -> dict:
    paths = sorted(out_dir.glob("index.task-*.json"))
    if not paths:
        raise ShardingError(f"{out_dir}: no partial indexes (index.task-*.json) to merge")
    partials = [si.read_json(p) for p in paths]
    problems = []
    # an earlier array of another size left its own (its tasks past this array's count are never rewritten): the
    # newest partial's array is the one merged, and the others' files go once it is
    newest = max(range(len(paths)), key=lambda i: paths[i].stat().st_mtime_ns)
    num_tasks = partials[newest].get("num_tasks")
    stale = [p for p, part in zip(paths, partials) if part.get("num_tasks") != num_tasks]
    if stale:
        log.warning("%s: merging the partial indexes of the %s-task array; leaving out %s, of an earlier array of "
                    "another size", out_dir, num_tasks, ", ".join(p.name for p in stale))
        partials = [part for part in partials if part.get("num_tasks") == num_tasks]
    present = {p.get("task_index") for p in partials}
    missing_tasks = sorted(set(range(num_tasks)) - present)
    if missing_tasks:
        problems.append(f"missing partial index for task(s) {missing_tasks} of {num_tasks}")
    for p in partials:
        if p.get("manifest_sha256") != plan["manifest_sha256"]:
            problems.append(f"index.task-{p.get('task_index')}.json was written from a different manifest")
    records = {r["name"]: r for p in partials for r in p["records"]}
    for s in plan["shards"]:
        rec = records.get(s["name"])
        if rec is None:
            problems.append(f"{s['name']}: planned but in no partial index")
            continue
        done = sorted([int(k[1:]) for k in rec["keys"]] + [x["row"] for x in rec["rejects"]])
        if done != sorted(s["rows"]) or rec["samples"] != len(rec["keys"]):
            problems.append(f"{s['name']}: record does not cover its planned rows {s['rows']}")
        problem = si.verify_shard_file(out_dir, rec)
        if problem:
            problems.append(problem)
    if problems:
        raise ShardingError("merge failed:\n  " + "\n  ".join(problems))
    index = si.build_index(plan, [records[s["name"]] for s in plan["shards"]])
    si.write_index(out_dir, index)
    for path in stale:
        path.unlink(missing_ok=True)
    return index
