"""Streaming loader throughput at One4D's training shape: 81 frames out at 352x624 from 480x854 source clips
(97 frames, depth geometry -> pointmaps), reading local shards with 1, 2 and 4 DataLoader workers.

Data: one synthetic clip (data_pipeline.synthetic) of 33 rendered frames played forward and back to 97
frames (each frame keeps its exact depth and pose), written to mp4 + geometry, listed `--clips` times in a
manifest and sharded by the project's shard writer, one sample per shard. Kept in --data between runs.

The `latents` path reads shards with precomputed latents (data.use_latents), written by `one4d encode-latents`'
own shard writer (latents_cli.run_encode) with RANDOM latent values of the real encoder's shape and dtype:
encoding real ones on a CPU takes ~400 s per clip, and the reader's cost does not depend on the values.
Only throughput is measured there.

`--finish device` (data.finish_on_device) stops the workers before the per-pixel float work: they ship uint8
frames and cropped float16 depth, and the trainer makes rgb/xyz on its GPU (data_pipeline/finish.py); with a
GPU present the benchmark also times that finish for one sample.

Timed after `--warmup` samples per worker (steady state: the workers' shared-memory pools have grown);
minflt/sample is the workers' minor page faults per sample (each a fresh page the kernel zero-fills).

    python benchmarks/data_loader.py [--data /tmp/one4d-bench-data] [--workers 1 2 4] [--paths pixels latents]
                                     [--finish cpu device] [--dtypes float32 bfloat16]
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shutil
import statistics
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from data_pipeline.config import DataConfig
from data_pipeline.decode import decode_clip
from data_pipeline.latents import LatentsSpec, latent_sample
from data_pipeline.loader import build_loader
from data_pipeline.reader import raw_samples, list_shards
from data_pipeline.shard import run_sharding
from data_pipeline.shard_index import SAMPLE_FORMAT
from data_pipeline.synthetic import render_clip
from data_pipeline.transforms import to_sample, to_staged_sample
from data_pipeline.video import write_mp4

SRC_FRAMES, SRC_H, SRC_W, RENDERED = 97, 480, 854, 33
RANDOM_VAE = "random-latents"  # the VAE identity recorded with the benchmark's latents: their values are random


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


class RandomLatentEncoder:
    """Stands in for the VAE in the latent shard writer: `encode_many` returns latents of the encoder's exact
    shape and dtype (normalised, float32 [B, 16, T_lat, H/8, W/8]; stored as float16) with random N(0, 1) values."""

    def __init__(self, seed: int = 0):
        self.generator = torch.Generator().manual_seed(seed)
        self.model = SimpleNamespace(config=SimpleNamespace(latents_mean=[0.0] * 16, latents_std=[1.0] * 16))

    def encode_many(self, videos):
        from one4d_train.model.vae import latent_shape

        return [torch.randn((v.shape[0], 16) + latent_shape(*v.shape[2:]), generator=self.generator) for v in videos]


def make_latents(shards: Path, data: DataConfig) -> tuple[Path, LatentsSpec]:
    """Latent shards of `shards` (kept beside them), written by `one4d encode-latents`' writer with
    RandomLatentEncoder as the VAE, and the loader's expectation of them."""
    import one4d_train.model.vae as vae_module
    from data_pipeline.latents import latents_spec
    from data_pipeline.latents_cli import EncodeError, run_encode
    from one4d_train.config import One4DConfig

    out = shards.parent / "latent-shards"
    cfg = One4DConfig(data=replace(data, shards=str(shards)))
    cfg.model.vae = RANDOM_VAE
    real = vae_module.load_vae
    vae_module.load_vae = lambda *args, **kwargs: RandomLatentEncoder(cfg.seed)
    try:
        try:
            run_encode(shards, out, cfg, device="cpu", progress=False)
        except EncodeError:  # latents of earlier shards or settings: write them anew
            shutil.rmtree(out)
            run_encode(shards, out, cfg, device="cpu", progress=False)
    finally:
        vae_module.load_vae = real
    return out, latents_spec(cfg)


def stage_times(cfg: DataConfig, shards: Path, latents: LatentsSpec | None = None, n: int = 2) -> tuple[float, float]:
    """Median ms of decode (window of the mp4 + geometry members) and of transform, in this process
    with one thread (as in a DataLoader worker). With `latents`: of the whole latent sample, and NaN."""
    decode_ms, transform_ms = [], []
    for i, shard in enumerate(list_shards(str(shards))[:n]):
        raw = next(raw_samples(shard))
        rng = np.random.default_rng(i)
        t0 = time.perf_counter()
        if latents is not None:
            latent_sample(raw, cfg, latents, shard.name)
            decode_ms.append(1e3 * (time.perf_counter() - t0))
            transform_ms.append(float("nan"))
            continue
        clip = decode_clip(raw, cfg.num_frames, cfg.frame_stride, rng, size=(cfg.height, cfg.width))
        t1 = time.perf_counter()
        if cfg.finish_on_device:
            to_staged_sample(clip, cfg.height, cfg.width, cfg.crop, cfg.pointmap_percentiles, rng)
        else:
            to_sample(clip, cfg.height, cfg.width, cfg.crop, cfg.pointmap_percentiles, rng, cfg.sample_dtype)
        t2 = time.perf_counter()
        decode_ms.append(1e3 * (t1 - t0))
        transform_ms.append(1e3 * (t2 - t1))
    return statistics.median(decode_ms), statistics.median(transform_ms)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_finish_ms(cfg: DataConfig, shards: Path, n: int = 5) -> float:
    """Median ms of finish.finish_batch on the GPU for one staged sample already there (synchronised)."""
    from data_pipeline.finish import finish_batch
    from data_pipeline.loader import collate

    raw = next(raw_samples(list_shards(str(shards))[0]))
    clip = decode_clip(raw, cfg.num_frames, cfg.frame_stride, np.random.default_rng(0), size=(cfg.height, cfg.width))
    staged = collate([to_staged_sample(clip, cfg.height, cfg.width, cfg.crop, cfg.pointmap_percentiles,
                                       np.random.default_rng(0))])
    staged = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in staged.items()}
    times = []
    for _ in range(n + 1):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        finish_batch(staged, cfg.sample_dtype)
        torch.cuda.synchronize()
        times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times[1:])


def _counters(pids: list[int]) -> tuple[float, int]:
    """(CPU seconds, minor page faults) of the processes so far."""
    ticks = faults = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks += int(fields[11]) + int(fields[12])  # utime + stime
        faults += int(fields[7])  # minflt
    return ticks / os.sysconf("SC_CLK_TCK"), faults


def throughput(cfg: DataConfig, workers: int, per_worker: int, warmup: int,
               latents: LatentsSpec | None = None) -> tuple[float, float, float]:
    """(samples/s of wall time, samples per second of worker CPU time, workers' minor page faults per sample),
    measured after every worker delivered `warmup` batches (process start, first decodes and the growth of
    the workers' shared-memory pools excluded)."""
    cfg.num_workers = workers
    loader = build_loader(cfg, rank=0, world_size=1, seed=0, micro_batch_size=1, latents=latents)
    it = iter(loader)
    for _ in range(workers * warmup):
        next(it)
    pids = [w.pid for w in loader._iter._workers]
    (cpu0, faults0), t0 = _counters(pids), time.perf_counter()
    n = workers * per_worker
    for _ in range(n):
        next(it)
    wall, (cpu, faults) = time.perf_counter() - t0, _counters(pids)
    loader.close()
    return n / wall, n / (cpu - cpu0), (faults - faults0) / n


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="/tmp/one4d-bench-data")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--clips", type=int, default=8)
    ap.add_argument("--per-worker", type=int, default=3, help="timed samples per worker")
    ap.add_argument("--warmup", type=int, default=4, help="untimed samples per worker first (steady state)")
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], help="data.sample_dtype values")
    ap.add_argument("--paths", nargs="+", default=["pixels", "latents"], choices=["pixels", "latents"],
                    help="pixels: geometry decoded into pointmaps; latents: shards with precomputed (random) latents")
    ap.add_argument("--finish", nargs="+", default=["cpu", "device"], choices=["cpu", "device"],
                    help="data.finish_on_device false (cpu: workers make rgb/xyz) or true (device: workers ship uint8 "
                         "frames and cropped depth, the trainer finishes them on its GPU)")
    args = ap.parse_args()

    t = time.perf_counter()
    shards = make_data(Path(args.data), args.clips)
    cfg = DataConfig(shards=str(shards), num_frames=81, frame_stride=1, height=352, width=624, crop="random",
                     shuffle_buffer=4)
    sources = {"pixels": (shards, None)}
    if "latents" in args.paths:
        sources["latents"] = make_latents(shards, cfg)
    print(f"data ready in {time.perf_counter() - t:.0f} s: {', '.join(str(s) for s, _ in sources.values())}")
    torch.set_num_threads(1)
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores; python {platform.python_version()}, torch {torch.__version__}")
    print(f"\n{SRC_FRAMES}x{SRC_H}x{SRC_W} source -> {cfg.num_frames}x{cfg.height}x{cfg.width} rgb + pointmaps (pixels) "
          f"or rgb + stored latents (latents); load average at start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    if "latents" in args.paths:
        print(f"latents: RANDOM values (VAE identity '{RANDOM_VAE}') of the encoder's shape and dtype, written by "
              f"`one4d encode-latents`' shard writer; only throughput is measured")
    print(f"{'path':>7} | {'finish':>6} | {'dtype':>8} | {'workers':>7} | {'samples/s':>9} | {'samples/s/worker':>16} | "
          f"{'samples/CPU-s':>13} | {'minflt/sample':>13} | {'decode ms':>9} | {'transform ms':>12}")
    print("-" * 129)
    for path in args.paths:
        source, latents = sources[path]
        for finish, dtype in itertools.product(args.finish, args.dtypes):
            run = replace(cfg, shards=str(source), sample_dtype=dtype, finish_on_device=finish == "device")
            decode_ms, transform_ms = stage_times(run, source, latents)
            for w in args.workers:
                rate, per_cpu, faults = throughput(run, w, args.per_worker, args.warmup, latents)
                transform = "-" if np.isnan(transform_ms) else f"{transform_ms:.0f}"
                print(f"{path:>7} | {finish:>6} | {dtype:>8} | {w:>7} | {rate:>9.2f} | {rate / w:>16.2f} | {per_cpu:>13.2f} | "
                      f"{faults:>13.0f} | {decode_ms:>9.0f} | {transform:>12}", flush=True)
    if "device" in args.finish and torch.cuda.is_available():
        for dtype in args.dtypes:
            run = replace(cfg, sample_dtype=dtype, finish_on_device=True)
            print(f"finish on {torch.cuda.get_device_name()}, {dtype}: {device_finish_ms(run, shards):.2f} ms per sample")
    print(f"load average at end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
