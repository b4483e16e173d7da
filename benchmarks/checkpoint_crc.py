"""What the CRC-32 of every checkpoint file costs: recorded at save (each rank its own files, read back from the page
cache right after the write), verified at resume (each rank the files it reads, before DeepSpeed loads them).

One file per size, shaped like a rank's optimizer partition: fp32 master weights and two Adam moments in one
torch.save zip, as DeepSpeed writes them.
  save   : torch.save + fsync (what every checkpoint pays) | crc32_of the file just written (what the save adds)
  resume : the file evicted from the page cache (posix_fadvise DONTNEED after the fsync), then torch.load | evicted
           again, crc32_of (cold) then torch.load (warm) | what verifying added
Timings are medians of --repeat rounds.

    python benchmarks/checkpoint_crc.py [--sizes-mb 256 512] [--dir /tmp] [--repeat 3]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time

import torch

from one4d_train.train.checkpoint import crc32_of


def evict(path: str) -> None:
    """Drop the file's (clean) pages from the page cache, as a fresh job on another node finds it."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def round_trip(path: str, size_mb: int) -> dict[str, float]:
    n = size_mb * 2**20 // 4 // 3
    state = {"optimizer_state_dict": {"fp32_flat_groups": [torch.randn(n)],
                                      "state": {0: {"exp_avg": torch.randn(n), "exp_avg_sq": torch.rand(n)}}}}

    def save():
        torch.save(state, path)
        fd = os.open(path, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)

    out = {"save": timed(save), "crc_warm": timed(lambda: crc32_of(path))}
    evict(path)
    out["load_cold"] = timed(lambda: torch.load(path, weights_only=True))
    evict(path)
    out["crc_cold"] = timed(lambda: crc32_of(path))
    out["load_after_crc"] = timed(lambda: torch.load(path, weights_only=True))
    out["mb"] = os.path.getsize(path) / 2**20
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes-mb", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="a folder on the file system to measure")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"{platform.node()}: {os.cpu_count()} cores, {platform.processor() or platform.machine()}, torch "
          f"{torch.__version__}, files in {args.dir}")
    header = (f"{'file MB':>8} | {'save+fsync s':>12} | {'CRC at save s':>13} | {'CRC GB/s':>8} | "
              f"{'load cold s':>11} | {'CRC cold + load s':>17} | {'added at resume s':>17}")
    print(header + "\n" + "-" * len(header))
    for size in args.sizes_mb:
        path = os.path.join(args.dir, f"one4d-crc-bench-{os.getpid()}.pt")
        try:
            rounds = [round_trip(path, size) for _ in range(args.repeat)]
        finally:
            if os.path.exists(path):
                os.remove(path)
        m = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
        verified = m["crc_cold"] + m["load_after_crc"]
        print(f"{m['mb']:>8.0f} | {m['save']:>12.3f} | {m['crc_warm']:>13.3f} | {m['mb'] / 1024 / m['crc_warm']:>8.2f} | "
              f"{m['load_cold']:>11.3f} | {verified:>17.3f} | {verified - m['load_cold']:>17.3f}")


if __name__ == "__main__":
    main()
