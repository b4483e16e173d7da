"""Streaming loader throughput at One4D's training shape: 81 frames out at 352x624 from 480x854 source clips
(97 frames, depth geometry -> pointmaps), reading local shards with 1, 2 and 4 DataLoader workers.

Data: one synthetic clip (data_pipeline.synthetic) of 33 rendered frames played forward and back to 97
frames (each frame keeps its exact depth and pose), written to mp4 + geometry, listed `--clips` times in a
manifest and sharded by the project's shard writer, one sample per shard. Kept in --data between runs.

    python benchmarks/data_loader.py [--data /tmp/one4d-bench-data] [--workers 1 2 4]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from data_pipeline.config import DataConfig
from data_pipeline.decode import decode_clip
from data_pipeline.loader import build_loader
from data_pipeline.reader import raw_samples, list_shards
from data_pipeline.shard import run_sharding
from data_pipeline.shard_index import SAMPLE_FORMAT
from data_pipeline.synthetic import render_clip
from data_pipeline.transforms import to_sample
from data_pipeline.video import write_mp4

SRC_FRAMES, SRC_H, SRC_W, RENDERED = 97, 480, 854, 33


def make_data(root: Path, clips: int) -> Path:
    shards = root / "shards"
    if (shards / "index.json").is_file():
        index = json.loads((shards / "index.json").read_text())
        if index["totals"]["samples"] == clips and index.get("sample_format", 1) == SAMPLE_FORMAT:
            return shards
        shutil.rmtree(shards)  # another size or an older sample format: re-shard
    raw = root / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    clip = render_clip(0, RENDERED, SRC_H, SRC_W)
    bounce = np.concatenate([np.arange(RENDERED), np.arange(RENDERED - 2, -1, -1), np.arange(1, RENDERED)])[:SRC_FRAMES]
    write_mp4(raw / "clip.mp4", clip["frames"][bounce])
    np.save(raw / "depth.npy", clip["depth"][bounce])
    np.save(raw / "poses.npy", clip["poses_c2w"][bounce])
    np.savez_compressed(raw / "valid.npz", valid=clip["valid"][bounce])
    row = {"video": "clip.mp4", "depth": "depth.npy", "poses": "poses.npy", "valid": "valid.npz",
           "intrinsics": clip["intrinsics"].tolist(), "caption": clip["caption"]}
    (raw / "manifest.jsonl").write_text("".join(json.dumps({**row, "id": f"bench_{i}"}) + "\n" for i in range(clips)))
    run_sharding(raw / "manifest.jsonl", shards, samples_per_shard=1, workers=2, progress=False)
    return shards


def stage_times(cfg: DataConfig, shards: Path, n: int = 2) -> tuple[float, float]:
    """Median ms of decode (window of the mp4 + geometry members) and of transform, in this process
    with one thread (as in a DataLoader worker)."""
    decode_ms, transform_ms = [], []
    for i, shard in enumerate(list_shards(str(shards))[:n]):
        raw = next(raw_samples(shard))
        rng = np.random.default_rng(i)
        t0 = time.perf_counter()
        clip = decode_clip(raw, cfg.num_frames, cfg.frame_stride, rng)
        t1 = time.perf_counter()
        to_sample(clip, cfg.height, cfg.width, cfg.crop, cfg.pointmap_percentiles, rng, cfg.sample_dtype)
        t2 = time.perf_counter()
        decode_ms.append(1e3 * (t1 - t0))
        transform_ms.append(1e3 * (t2 - t1))
    return statistics.median(decode_ms), statistics.median(transform_ms)


def _cpu_seconds(pids: list[int]) -> float:
    ticks = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks += int(fields[11]) + int(fields[12])  # utime + stime
    return ticks / os.sysconf("SC_CLK_TCK")


def throughput(cfg: DataConfig, workers: int, per_worker: int) -> tuple[float, float]:
    """(samples/s of wall time, samples per second of worker CPU time), measured after every worker delivered
    its first batch (process start and first decode excluded)."""
    cfg.num_workers = workers
    loader = build_loader(cfg, rank=0, world_size=1, seed=0, micro_batch_size=1)
    it = iter(loader)
    for _ in range(workers):
        next(it)
    pids = [w.pid for w in loader._iter._workers]
    cpu0, t0 = _cpu_seconds(pids), time.perf_counter()
    n = workers * per_worker
    for _ in range(n):
        next(it)
    wall, cpu = time.perf_counter() - t0, _cpu_seconds(pids) - cpu0
    loader.close()
    return n / wall, n / cpu


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="/tmp/one4d-bench-data")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--clips", type=int, default=8)
    ap.add_argument("--per-worker", type=int, default=3, help="timed samples per worker")
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], help="data.sample_dtype values")
    args = ap.parse_args()

    t = time.perf_counter()
    shards = make_data(Path(args.data), args.clips)
    print(f"data ready in {time.perf_counter() - t:.0f} s: {shards}")
    cfg = DataConfig(shards=str(shards), num_frames=81, frame_stride=1, height=352, width=624, crop="random",
                     shuffle_buffer=4)
    torch.set_num_threads(1)
    print(f"\n{SRC_FRAMES}x{SRC_H}x{SRC_W} source -> {cfg.num_frames}x{cfg.height}x{cfg.width} rgb + pointmaps; "
          f"load average at start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"{'dtype':>8} | {'workers':>7} | {'samples/s':>9} | {'samples/s/worker':>16} | {'samples/CPU-s':>13} | "
          f"{'decode ms':>9} | {'transform ms':>12}")
    print("-" * 94)
    for dtype in args.dtypes:
        cfg.sample_dtype = dtype
        decode_ms, transform_ms = stage_times(cfg, shards)
        for w in args.workers:
            rate, per_cpu = throughput(cfg, w, args.per_worker)
            print(f"{dtype:>8} | {w:>7} | {rate:>9.2f} | {rate / w:>16.2f} | {per_cpu:>13.2f} | {decode_ms:>9.0f} | "
                  f"{transform_ms:>12.0f}", flush=True)


if __name__ == "__main__":
    main()
