"""Shard index (index.json) and per-shard records: atomic JSON writes, checksums, reading and verification.

index.json = {"version", "shards": [{name, samples, bytes, sha256, keys}], "totals", "statistics", "rejects"}.
The shard writer also leaves, next to each finished tar, `NAME.record.json` (the shard's entry plus its
rejects and per-sample statistics) and `plan.json` (which manifest rows go to which shard).
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import shutil
import socket
import sys
from pathlib import Path

INDEX_VERSION = 1
# Layout of the sample members (docs/data.md): 3 = per-frame geometry arrays, a bit-packed mask and sums.json in
# every sample. 2 is the same layout; `one4d shard` wrote it with sums.json from 2026-12-03 on, and read as 3
# (every sample must carry sums.json), such shards load as they are, while the earlier ones' samples are all
# skipped as lacking it (re-shard those). 1 (one geometry array, a bool mask; index files without the key), of
# the project's first days, is refused.
SAMPLE_FORMAT = 3
SAMPLE_FORMATS_READ = (2, 3)
INDEX = "index.json"
PLAN = "plan.json"
REJECTS = "rejects.jsonl"


class ShardIndexError(ValueError):
    """An index, plan or shard that does not match what was recorded; the message names the file."""


def shard_name(shard_id: int) -> str:
    return f"shard-{shard_id:06d}.tar"


def record_path(out_dir, name: str) -> Path:
    return Path(out_dir) / f"{name}.record.json"


def partial_index_path(out_dir, task_index: int) -> Path:
    return Path(out_dir) / f"index.task-{task_index}.json"


def sha256_file(path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def live_temp_file(name: str) -> bool:
    """Whether `name` is a temp file (`.NAME.tmpHOST-PID`) whose writer may still be writing it (writer_may_run)."""
    return name.startswith(".") and ".tmp" in name and writer_may_run(name)


def temp_files(out_dir, name: str) -> list[Path]:
    """The temp files (`.NAME.tmpHOST-PID`) that writes of `name` in `out_dir` left or are making; `name` taken
    literally (a source shard's name may hold the glob's [ ] * ?, which would match other files' temps)."""
    return list(Path(out_dir).glob(f".{glob.escape(name)}.tmp*"))


def writer_may_run(tmp_name: str) -> bool:
    """Whether the process that named a temp file `.NAME.tmpHOST-PID` (write_atomic's, a shard writer's) may still
    be writing it: unknown for another host; on this one, whether the process exists."""
    from one4d_train.train.run_lock import process_alive

    host, _, pid = tmp_name.rsplit(".tmp", 1)[1].rpartition("-")
    return host != socket.gethostname() or not pid.isdigit() or process_alive(int(pid))


def fsync_dir(path) -> None:
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path, data: bytes) -> None:
    """Write to a hidden temp name in the same folder, fsync, rename: readers never see a partial file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{socket.gethostname()}-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # a full disk leaves no partial temp file behind
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_failure(exc: OSError, out_dir, what: str = "cannot be written", path=None) -> str:
    """A failed write into the output folder `out_dir` in one line: the file (`path`, else the one the error names,
    else the folder), what failed, the error, the folder's free space, and what to do (the same command again goes
    on from the finished files)."""
    out_dir = Path(out_dir)
    where = path or exc.filename or out_dir
    try:
        free = f"{shutil.disk_usage(out_dir).free / 2**20:.1f} MiB free in {out_dir}"
    except OSError:
        free = f"free space of {out_dir} unknown"
    return (f"{where}: {what}: {exc.strerror or exc} ({free}): make room (or write into another folder) and re-run "
            "the same command; finished shards are kept")


def dumps(obj) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()


def write_json(path, obj) -> None:
    write_atomic(path, dumps(obj))


def read_json(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ShardIndexError(f"{path}: not found")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except RecursionError:
        raise ShardIndexError(f"{path}: not valid JSON: nested too deeply to parse") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, an integer past int()'s digit limit
        raise ShardIndexError(f"{path}: not valid JSON: {exc}") from None
    except OSError as exc:
        raise ShardIndexError(f"{path}: cannot be read: {exc.strerror or exc}") from None
    if not isinstance(obj, dict):
        raise ShardIndexError(f"{path}: top level must be a JSON object")
    return obj


def pin_plan(out_dir, plan: dict) -> dict | None:
    """Record `plan` in out_dir/plan.json, or compare it with the one a previous run recorded there: returns that
    previous plan when it differs (the caller refuses to mix outputs), else None."""
    path = os.path.join(out_dir, PLAN)
    if not os.path.isfile(path):
        write_json(path, plan)
        return None
    old = read_json(path)
    return None if dumps(old) == dumps(plan) else old


def foreign_files_problem(out_dir: Path, command: str, lock: str, made: str) -> str | None:
    """Why `out_dir` cannot take `command`'s output (`made`: what it writes there): it holds files but no plan.json
    (a plan there is the caller's to judge), beyond the locks (`lock`.lock, `lock`.task-I.lock) and the plan's temp
    file of a run starting in it (the tasks of an array start side by side). None where it can."""
    if not out_dir.is_dir():
        return None
    # listed before plan.json is looked for: a task of the same array starting beside this one writes plan.json
    # before any file but its locks and the plan's temp file, so a listing taken while plan.json was missing holds
    # no more than those, and one with more was taken after plan.json appeared (looked for first, a plan.json that
    # appeared between the look and the listing had the other task's files refused as foreign)
    names = [p.name for p in out_dir.iterdir()]
    if PLAN in names or (out_dir / PLAN).is_file():
        return None
    own = re.compile(rf"{re.escape(lock)}(\.task-\d+)?\.lock|\.{re.escape(PLAN)}\.tmp.*")
    others = sorted(n for n in names if not own.fullmatch(n))
    if not others:
        return None
    more = f" and {len(others) - 5} more" if len(others) > 5 else ""
    return (f"{out_dir}: not empty (it holds {', '.join(others[:5])}{more}, and no {PLAN} of an earlier `{command}` "
            f"into it: {made}, {INDEX} and {REJECTS} would overwrite its files or mix with them): OUT_DIR must be a new "
            f"or empty folder, or one `{command}` wrote into")


def printable(text: str) -> str:
    """`text` as stdout can print it: characters its encoding lacks (a path of a Latin-1 file system, held as
    surrogate escapes) as backslash escapes, where printing them would raise UnicodeEncodeError."""
    encoding = getattr(sys.stdout, "encoding", None) or "utf-8"
    return text.encode(encoding, "backslashreplace").decode(encoding)


def read_index(shard_dir) -> dict:
    """Read and schema-check `shard_dir/index.json`."""
    path = Path(shard_dir) / INDEX
    index = read_json(path)
    if index.get("version") != INDEX_VERSION:
        raise ShardIndexError(f"{path}: version {index.get('version')!r}, this code reads {INDEX_VERSION}")
    if index.get("sample_format") not in SAMPLE_FORMATS_READ:
        raise ShardIndexError(f"{path}: sample_format {index.get('sample_format')!r}, this code reads "
                              f"{list(SAMPLE_FORMATS_READ)}: re-shard with `one4d shard` (or update the code)")
    for key, kind in (("shards", list), ("totals", dict), ("statistics", dict), ("rejects", list)):
        if key not in index:
            raise ShardIndexError(f"{path}: missing key '{key}'")
        if not isinstance(index[key], kind):
            raise ShardIndexError(f"{path}: '{key}' must be a JSON {'list' if kind is list else 'object'}, "
                                  f"got {index[key]!r:.80}")
    _check_statistics(path, index["statistics"])
    for i, r in enumerate(index["rejects"]):
        if not (isinstance(r, dict) and _count(r.get("row")) and isinstance(r.get("path"), str)
                and isinstance(r.get("reason"), str)):
            raise ShardIndexError(f"{path}: rejects[{i}] must be a JSON object with 'row' (a row number), 'path' and "
                                  f"'reason' (texts), got {r!r:.80}")
    seen: dict[str, int] = {}
    for i, s in enumerate(index["shards"]):
        _check_entry(path, i, s)
        if s["name"] in seen:
            raise ShardIndexError(f"{path}: shards[{i}]: {s['name']} is listed twice (also shards[{seen[s['name']]}])")
        seen[s["name"]] = i
    totals = {"shards": len(index["shards"]), "samples": sum(s["samples"] for s in index["shards"]),
              "bytes": sum(s["bytes"] for s in index["shards"]), "rejected": len(index["rejects"])}
    if index["totals"] != totals:
        raise ShardIndexError(f"{path}: totals {index['totals']} disagree with the shard list ({totals})")
    return index


def _count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_statistics(path: Path, st: dict) -> None:
    """ShardIndexError naming the file and the field unless `statistics` holds what its readers use (train's and
    eval's checks, inspect-shards, encode-latents) in the types `statistics()` writes. `text_embeddings` may be
    missing (indexes written before it was kept) or unknown (samples and widths null); so may `clip_frames`."""
    where = f"{path}: statistics"

    def counts(key: str, names=None) -> None:
        value = st.get(key)
        if not isinstance(value, dict):
            raise ShardIndexError(f"{where}.{key} must be a JSON object, got {value!r:.80}")
        for name in names or value:
            if not (isinstance(name, str) and _count(value.get(name))):
                raise ShardIndexError(f"{where}.{key}.{name} must be a non-negative integer, got "
                                      f"{value.get(name)!r:.80}")

    counts("frames", ("total", "min", "max"))
    counts("resolutions")
    counts("geometry", ("depth", "xyz"))
    for key in ("depth_range", "xyz_z_range"):
        value = st.get(key)
        if not (isinstance(value, list) and len(value) == 2 and all(v is None or _number(v) for v in value)):
            raise ShardIndexError(f"{where}.{key} must be [min, max] (numbers or nulls), got {value!r:.80}")
    if "clip_frames" in st:  # indexes written before clips were counted by length lack it
        value = st["clip_frames"]
        if not isinstance(value, dict):
            raise ShardIndexError(f"{where}.clip_frames must be a JSON object, got {value!r:.80}")
        if not all(isinstance(n, str) and n.isascii() and n.isdigit() for n in value):
            raise ShardIndexError(f"{where}.clip_frames must map frame counts (digits) to clip counts, got "
                                  f"{value!r:.80}")
        counts("clip_frames")
    value = st.get("valid_fraction", "missing")
    if not (value is None or _number(value)):
        raise ShardIndexError(f"{where}.valid_fraction must be a number or null, got {value!r:.80}")
    if "text_embeddings" not in st:
        return
    text = st["text_embeddings"]
    if not (isinstance(text, dict) and {"samples", "widths"} <= set(text)):
        raise ShardIndexError(f"{where}.text_embeddings must be a JSON object {{samples, widths}}, got {text!r:.80}")
    samples, widths = text["samples"], text["widths"]
    if widths is None and samples is not None or widths is not None and not _count(samples):
        raise ShardIndexError(f"{where}.text_embeddings.samples must be a non-negative integer (null where widths "
                              f"is null), got {samples!r:.80}")
    if widths is not None and not (isinstance(widths, list) and all(_count(w) and w > 0 for w in widths)):
        raise ShardIndexError(f"{where}.text_embeddings.widths must be a list of positive integers or null, got "
                              f"{widths!r:.80}")


def _check_entry(path: Path, i: int, s) -> None:
    """ShardIndexError naming the file and the field unless shards[i] is a well-formed shard entry."""
    where = f"{path}: shards[{i}]"
    if not isinstance(s, dict):
        raise ShardIndexError(f"{where} must be a JSON object, got {s!r:.80}")
    missing = {"name", "samples", "bytes", "sha256", "keys"} - set(s)
    if missing:
        raise ShardIndexError(f"{where} lacks {sorted(missing)}")
    name = s["name"]
    if not plain_shard_name(name):
        raise ShardIndexError(f"{where}.name must be the plain name of a .tar file in the folder (no ':', '/' or "
                              f"'\\'), got {name!r:.80}")
    for key in ("samples", "bytes"):
        if not _count(s[key]):
            raise ShardIndexError(f"{where}.{key} must be a non-negative integer, got {s[key]!r:.80}")
    if not (isinstance(s["sha256"], str) and len(s["sha256"]) == 64 and set(s["sha256"]) <= set("0123456789abcdef")):
        raise ShardIndexError(f"{where}.sha256 must be 64 lowercase hex digits, got {s['sha256']!r:.80}")
    keys = s["keys"]
    if not (isinstance(keys, list) and all(isinstance(k, str) and k for k in keys)):
        raise ShardIndexError(f"{where}.keys must be a list of sample keys, got {keys!r:.80}")
    if s["samples"] != len(keys):
        raise ShardIndexError(f"{where}: shard {name}: samples {s['samples']} != {len(keys)} keys")
    if len(set(keys)) != len(keys):
        twice = next(k for k in keys if keys.count(k) > 1)
        raise ShardIndexError(f"{where}: sample key {twice} is listed twice in {name}")


def plain_shard_name(name) -> bool:
    """Whether `name` can only mean a tar file in the index's folder: a name with a ':' (webdataset's 'pipe:CMD',
    which runs CMD in a shell, or a URL scheme) or a path in it must never reach an opener."""
    return (isinstance(name, str) and name.endswith(".tar") and len(name) > len(".tar")
            and not any(c in name for c in ":/\\") and os.path.basename(name) == name)


def shard_entry(record: dict) -> dict:
    return {k: record[k] for k in ("name", "samples", "bytes", "sha256", "keys")}


def verify_shard_file(shard_dir, entry: dict, checksum: bool = True) -> str | None:
    """None if the shard file exists with the recorded size (and sha256), else the problem."""
    return check_shard_file(shard_dir, entry, checksum)[0]


def check_shard_file(shard_dir, entry: dict, checksum: bool = True) -> tuple[str | None, str | None]:
    """(verify_shard_file's answer, the file's sha256 where it was read: for a caller that records it too)."""
    path = Path(shard_dir) / entry["name"]
    if not path.is_file():
        return f"{path}: missing", None
    size = path.stat().st_size
    if size != entry["bytes"]:
        return f"{path}: {size} bytes, index says {entry['bytes']}", None
    if not checksum:
        return None, None
    digest = sha256_file(path)
    return (None if digest == entry["sha256"] else f"{path}: sha256 differs from the index"), digest


def statistics(records: list[dict]) -> dict:
    """Dataset statistics from the per-sample stats of shard records."""
    samples = [s for r in records for s in r["sample_stats"]]
    frames = [s["frames"] for s in samples]
    resolutions: dict[str, int] = {}
    for s in samples:
        key = f"{s['height']}x{s['width']}"
        resolutions[key] = resolutions.get(key, 0) + 1
    depth = [s for s in samples if s["geometry"] == "depth" and s["depth_max"] is not None]
    xyz = [s for s in samples if s["geometry"] == "xyz" and s["depth_max"] is not None]
    return {
        "frames": {"total": sum(frames), "min": min(frames, default=0), "max": max(frames, default=0)},
        "clip_frames": {str(n): frames.count(n) for n in sorted(set(frames))},
        "resolutions": dict(sorted(resolutions.items())),
        "geometry": {"depth": sum(s["geometry"] == "depth" for s in samples),
                     "xyz": sum(s["geometry"] == "xyz" for s in samples)},
        "depth_range": [min((s["depth_min"] for s in depth), default=None),
                        max((s["depth_max"] for s in depth), default=None)],
        "xyz_z_range": [min((s["depth_min"] for s in xyz), default=None),
                        max((s["depth_max"] for s in xyz), default=None)],
        "valid_fraction": (sum(s["valid_fraction"] * s["frames"] for s in samples) / sum(frames)) if frames else None,
        "text_embeddings": text_embedding_statistics(samples),
    }


def text_embedding_statistics(samples: list[dict]) -> dict:
    """{"samples": how many store a text embedding, "widths": their distinct widths} of per-sample stats; both None
    (unknown) where a record was written before the widths were kept."""
    dims = [s.get("text_emb_dim", "?") for s in samples]
    if "?" in dims:
        return {"samples": None, "widths": None}
    return {"samples": sum(d is not None for d in dims), "widths": sorted({d for d in dims if d is not None})}


def with_text_embeddings(stats: dict, added: int, width: int) -> dict:
    """Dataset statistics with `added` more samples storing a text embedding `width` wide (`one4d encode-latents`)."""
    text = stats.get("text_embeddings") or {"samples": None, "widths": None}
    if added and text["widths"] is not None:
        text = {"samples": text["samples"] + added, "widths": sorted({*text["widths"], width})}
    return {**stats, "text_embeddings": text}


def build_index(plan: dict, records: list[dict]) -> dict:
    """index.json content from the plan and every planned shard's record (same for any task split)."""
    records = sorted(records, key=lambda r: r["name"])
    rejects = sorted(plan["rejects"] + [x for r in records for x in r["rejects"]], key=lambda x: x["row"])
    shards = [shard_entry(r) for r in records]
    return {
        "version": INDEX_VERSION,
        "sample_format": SAMPLE_FORMAT,
        "shards": shards,
        "totals": {"shards": len(shards), "samples": sum(s["samples"] for s in shards),
                   "bytes": sum(s["bytes"] for s in shards), "rejected": len(rejects)},
        "statistics": statistics(records),
        "rejects": rejects,
    }


def write_index(out_dir, index: dict) -> Path:
    out_dir = Path(out_dir)
    write_atomic(out_dir / REJECTS, "".join(json.dumps(r, sort_keys=True) + "\n" for r in index["rejects"]).encode())
    write_json(out_dir / INDEX, index)
    return out_dir / INDEX
