"""`one4d inspect-shards DIR`: check every shard against index.json and print dataset statistics.

Checks per shard: file present, size and sha256 as indexed, the tar reads, its sample keys equal the
index's, every sample has its sums.json and the members of its geometry (cam.json with depth), every member
parses (npz/npy with allow_pickle=False, json, UTF-8 text, mp4 container opens with decord and no edit list hides
some of its frames) and matches the sample's sums.json (data_pipeline/checksums.py), and the members fit each
other as the reader checks them (geometry frame count and size against the video's, camera shapes, the mask; on
the first frame).
Every shard is checked (a shard whose size or sha256 differ is still read, to name the samples at fault); each
problem is printed with its shard and key, and the command exits 1 naming the failing shards. A shard set of no
sample (every row rejected) exits 1 as well, after its statistics and rejects.
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import tarfile
from collections import defaultdict
from pathlib import Path

import numpy as np

from data_pipeline import checksums, shard_index as si
from data_pipeline.decode import crc32, decode_clip
from data_pipeline.video import hidden_frames, hidden_frames_problem, open_reader


class ShardProblem(ValueError):
    pass


def _check_member(shard: str, key: str, ext: str, data: bytes) -> None:
    where = f"{shard}: {key}.{ext}"
    try:
        if ext.endswith(".npz"):
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                frames = {}  # per-frame arrays (depth_000000 ...): the first of each kind
                for name in z.files:
                    a = z[name]
                    stem, _, index = name.rpartition("_")
                    if stem and index.isdigit():  # the reader stacks them: one frame unlike the first skips the sample
                        first = frames.setdefault(stem, (name, a.dtype, a.shape))
                        if (a.dtype, a.shape) != first[1:]:
                            raise ShardProblem(f"{where}: {name} is {a.dtype} {a.shape}, {first[0]} {first[1]} "
                                               f"{first[2]}: the reader would skip the sample")
        elif ext.endswith(".npy"):
            np.load(io.BytesIO(data), allow_pickle=False)
        elif ext.endswith("json"):
            json.loads(data.decode("utf-8"))
        elif ext == "txt":
            data.decode("utf-8")
        elif ext == "mp4":
            stored = len(open_reader(data))
            if stored == 0:
                raise ValueError("no frames")
            hidden = hidden_frames(data)
            if hidden:
                raise ShardProblem(f"{where}: {hidden_frames_problem(hidden, stored)} (then re-shard it)")
    except ShardProblem:
        raise
    except Exception as exc:
        detail = (str(exc).strip().splitlines() or [""])[-1]
        raise ShardProblem(f"{where}: does not parse: {type(exc).__name__}: {detail}") from None


def _sample_problem(raw: dict) -> str | None:
    """The reader's own checks of one sample's members against each other (geometry frames and size against the
    video's, the cameras' shapes, the mask), on its first frame only: why the reader would skip it, or None."""
    try:
        decode_clip(raw, num_frames=1, frame_stride=1, rng=None, start=0)
    except Exception as exc:  # what the reader skips a sample for, said as it says it
        return f"{type(exc).__name__}: {exc}"
    return None


def _tar_problem(exc: tarfile.TarError) -> str:
    """tarfile's reason, its plain-tar attempt's where it tried every compression ("file could not be opened
    successfully:" and one line per method)."""
    lines = str(exc).splitlines() or [repr(exc)]
    plain = [line for line in lines if line.startswith("- method tar: ")]
    return plain[0].removeprefix("- method tar: ") if plain else lines[0]


def check_shard(shard_dir: Path, entry: dict) -> tuple[dict[str, int], list[str]]:
    """Verify one shard against its index entry: (member counts by extension, its problems). A shard whose size
    or sha256 differ is still read, so that the samples at fault are named."""
    problem = si.verify_shard_file(shard_dir, entry)
    if problem and not (shard_dir / entry["name"]).is_file():
        return {}, [problem]
    problems = [problem] if problem else []
    counts: dict[str, int] = defaultdict(int)
    raws: dict[str, dict] = defaultdict(dict)  # per key: member -> CRC-32 (sums.json: its bytes)
    sample: dict[str, bytes] = {}  # the members of the sample being read (a sample's members are consecutive)

    def check_sample():
        problem = _sample_problem(sample)
        if problem:
            problems.append(f"{entry['name']}: {sample['__key__']}: the reader would skip it: {problem}")

    try:
        with tarfile.open(shard_dir / entry["name"]) as tar:
            for info in tar:
                key, _, ext = info.name.partition(".")
                if not info.isfile() or not ext or not key or "/" in info.name:  # a path: no sample's member
                    problems.append(f"{entry['name']}: unexpected tar member {info.name!r}")
                    continue
                data = tar.extractfile(info).read()
                try:
                    _check_member(entry["name"], key, ext, data)
                except ShardProblem as exc:
                    problems.append(str(exc))
                if ext in raws[key]:  # a reader keeps one of the two (webdataset warns and skips the sample)
                    problems.append(f"{entry['name']}: {key}: member {ext} repeated")
                counts[ext] += 1
                raws[key][ext] = data if ext == checksums.MEMBER else crc32(data)
                if sample and sample["__key__"] != key:
                    check_sample()
                    sample = {}
                sample.update({"__key__": key, ext: data})
        if sample:
            check_sample()
    except tarfile.TarError as exc:
        problems.append(f"{entry['name']}: tar does not read: {_tar_problem(exc)}")
    for key, raw in raws.items():  # the reader's own check: sums.json, its members, the members every sample has
        sums = raw.pop(checksums.MEMBER, None)
        problem = checksums.sample_problem(raw, sums)
        if problem:
            problems.append(f"{entry['name']}: {key}: {problem}")
    if list(raws) != entry["keys"]:
        problems.append(f"{entry['name']}: keys {list(raws)} differ from the index's {entry['keys']}")
    return counts, problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="one4d inspect-shards", description=__doc__.split(":", 1)[1].strip(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("shard_dir", help="folder with index.json and the shards")
    args = p.parse_args(argv)
    shard_dir = Path(args.shard_dir)
    try:
        index = si.read_index(shard_dir)
    except si.ShardIndexError as exc:
        print(f"one4d inspect-shards: FAILED: {exc}", file=sys.stderr)
        return 1
    totals: dict[str, int] = defaultdict(int)
    failed = []
    for entry in index["shards"]:
        counts, problems = check_shard(shard_dir, entry)
        for ext, n in counts.items():
            totals[ext] += n
        for problem in problems:
            print(f"one4d inspect-shards: FAILED: {problem}", file=sys.stderr)
        failed += [entry["name"]] if problems else []
    if failed:
        print(f"one4d inspect-shards: FAILED: {len(failed)} of {len(index['shards'])} shards: {', '.join(failed)}",
              file=sys.stderr)
        return 1
    stray = sorted({p.name for p in shard_dir.glob("*.tar")} - {e["name"] for e in index["shards"]})
    if stray:
        print(si.printable(f"  warning: tar files not in the index (ignored by readers): {stray}"))
    t, st = index["totals"], index["statistics"]
    print(si.printable(f"{shard_dir}: {'OK' if t['samples'] else 'EMPTY'}: {t['shards']} shards, {t['samples']} "
                       f"samples, {t['bytes'] / 2**20:.1f} MiB, {t['rejected']} rejected rows"))
    print(f"  frames: {st['frames']['total']} total, {st['frames']['min']}-{st['frames']['max']} per clip")
    print(f"  resolutions: {', '.join(f'{k} x{v}' for k, v in st['resolutions'].items())}")
    print(f"  geometry: {st['geometry']}; depth range: {st['depth_range']}; valid fraction: {st['valid_fraction']}")
    text = st.get("text_embeddings") or {}
    if text.get("widths") is not None:
        print(f"  stored text embeddings: {text['samples']} samples"
              + (f", {' and '.join(map(str, text['widths']))} wide" if text["widths"] else ""))
    print(f"  members: {dict(sorted(totals.items()))}")
    for r in index["rejects"]:
        print(si.printable(f"  rejected row {r['row']} ({r['path']}): {r['reason']}"))
    if not t["samples"]:  # consistent, but nothing to train or evaluate on (`one4d shard` exited 1 for it too)
        print(f"one4d inspect-shards: FAILED: {shard_dir} holds no sample"
              + (f": every row was rejected ({t['rejected']}, listed above)" if t["rejected"] else ""), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
