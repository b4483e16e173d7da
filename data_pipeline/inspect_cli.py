"""`one4d inspect-shards DIR`: check every shard against index.json and print dataset statistics.

Checks per shard: file present, size and sha256 as indexed, the tar reads, its sample keys equal the
index's, every sample has its sums.json and the members of its geometry (cam.json with depth), every member
parses (npz/npy with allow_pickle=False, json, UTF-8 text, mp4 container opens with decord) and matches the
sample's sums.json (data_pipeline/checksums.py).
Exits 1 naming the first failing shard and key.
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
from data_pipeline.decode import crc32
from data_pipeline.video import open_reader


class ShardProblem(ValueError):
    pass


def _check_member(shard: str, key: str, ext: str, data: bytes) -> None:
    where = f"{shard}: {key}.{ext}"
    try:
        if ext.endswith(".npz"):
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                for name in z.files:
                    z[name]
        elif ext.endswith(".npy"):
            np.load(io.BytesIO(data), allow_pickle=False)
        elif ext.endswith("json"):
            json.loads(data.decode("utf-8"))
        elif ext == "txt":
            data.decode("utf-8")
        elif ext == "mp4":
            if len(open_reader(data)) == 0:
                raise ValueError("no frames")
    except Exception as exc:
        detail = (str(exc).strip().splitlines() or [""])[-1]
        raise ShardProblem(f"{where}: does not parse: {type(exc).__name__}: {detail}") from None


def check_shard(shard_dir: Path, entry: dict) -> dict[str, int]:
    """Verify one shard against its index entry; returns member counts by extension."""
    problem = si.verify_shard_file(shard_dir, entry)
    if problem:
        raise ShardProblem(problem)
    counts: dict[str, int] = defaultdict(int)
    raws: dict[str, dict] = defaultdict(dict)  # per key: member -> CRC-32 (sums.json: its bytes)
    try:
        with tarfile.open(shard_dir / entry["name"]) as tar:
            for info in tar:
                key, _, ext = info.name.partition(".")
                if not info.isfile() or not ext:
                    raise ShardProblem(f"{entry['name']}: unexpected tar member {info.name!r}")
                data = tar.extractfile(info).read()
                _check_member(entry["name"], key, ext, data)
                counts[ext] += 1
                raws[key][ext] = data if ext == checksums.MEMBER else crc32(data)
    except tarfile.TarError as exc:
        raise ShardProblem(f"{entry['name']}: tar does not read: {exc}") from None
    for key, raw in raws.items():  # the reader's own check: sums.json, its members, the members every sample has
        sums = raw.pop(checksums.MEMBER, None)
        problem = checksums.sample_problem(raw, sums)
        if problem:
            raise ShardProblem(f"{entry['name']}: {key}: {problem}")
    if list(raws) != entry["keys"]:
        raise ShardProblem(f"{entry['name']}: keys {list(raws)} differ from the index's {entry['keys']}")
    return counts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="one4d inspect-shards", description=__doc__.split(":", 1)[1].strip(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("shard_dir", help="folder with index.json and the shards")
    args = p.parse_args(argv)
    shard_dir = Path(args.shard_dir)
    try:
        index = si.read_index(shard_dir)
        totals: dict[str, int] = defaultdict(int)
        for entry in index["shards"]:
            for ext, n in check_shard(shard_dir, entry).items():
                totals[ext] += n
    except (si.ShardIndexError, ShardProblem) as exc:
        print(f"one4d inspect-shards: FAILED: {exc}", file=sys.stderr)
        return 1
    stray = sorted({p.name for p in shard_dir.glob("*.tar")} - {e["name"] for e in index["shards"]})
    if stray:
        print(f"  warning: tar files not in the index (ignored by readers): {stray}")
    t, st = index["totals"], index["statistics"]
    print(f"{shard_dir}: OK: {t['shards']} shards, {t['samples']} samples, {t['bytes'] / 2**20:.1f} MiB, "
          f"{t['rejected']} rejected rows")
    print(f"  frames: {st['frames']['total']} total, {st['frames']['min']}-{st['frames']['max']} per clip")
    print(f"  resolutions: {', '.join(f'{k} x{v}' for k, v in st['resolutions'].items())}")
    print(f"  geometry: {st['geometry']}; depth range: {st['depth_range']}; valid fraction: {st['valid_fraction']}")
    print(f"  members: {dict(sorted(totals.items()))}")
    for r in index["rejects"]:
        print(f"  rejected row {r['row']} ({r['path']}): {r['reason']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
