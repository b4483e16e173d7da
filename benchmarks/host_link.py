"""The host link's copy rates, as activation offload (model/offload.py) uses it: page-locked host memory, one side
stream.

Prints one table: device-to-host and host-to-device rates of a `--mb` MB tensor (the 14B block input at One4D's
shape is 369 MB, the FFN's pre-activation 996 MB), each alone, both directions at once (two side streams), and each
while the compute stream runs bf16 matmuls (does the copy slow the matmuls, and the matmuls the copy?); each case
for every kind of host memory in `--buffers`: `pinned` (torch's pinned-memory cache, cudaHostAlloc), `offload`
(the offload's exact-size mappings page-locked with cudaHostRegister, model/host_buffers.py), `offload-thp` (the
same asking for transparent huge pages).

    python benchmarks/host_link.py [--mb 369,996] [--buffers pinned,offload,offload-thp] [--repeats 8]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from one4d_train.model.host_buffers import HostBuffers  # noqa: E402


def _events(stream) -> tuple[torch.cuda.Event, torch.cuda.Event]:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record(stream)
    return start, end


def _run(work: dict, repeats: int) -> dict[str, float]:
    """Each (stream, fn) of `work` enqueued on its stream `repeats` times; seconds per repeat of each, by events."""
    times = {name: 0.0 for name in work}
    for i in range(repeats + 1):  # the first round warms up
        torch.cuda.synchronize()
        marks = {}
        for name, (stream, fn) in work.items():
            with torch.cuda.stream(stream):
                start, end = _events(stream)
                fn()
                end.record(stream)
            marks[name] = (start, end)
        torch.cuda.synchronize()
        if i:
            for name, (start, end) in marks.items():
                times[name] += start.elapsed_time(end) / 1e3 / repeats
    return times


def host_tensors(kind: str, like: torch.Tensor, pools: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Two host tensors shaped like `like` in the `kind` of page-locked memory."""
    if kind == "pinned":
        return tuple(torch.empty(like.shape, dtype=like.dtype, pin_memory=True) for _ in range(2))
    if kind not in ("offload", "offload-thp"):
        raise ValueError(f"unknown buffer kind {kind!r}; expected pinned, offload or offload-thp")
    pool = pools.setdefault(kind, HostBuffers(huge_pages=kind == "offload-thp"))
    nbytes = like.numel() * like.element_size()
    return tuple(pool.take(nbytes, pinned=True).view(like) for _ in range(2))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", default="369", help="tensor sizes in MB, comma-separated")
    ap.add_argument("--buffers", default="pinned,offload", help="host memory kinds, comma-separated")
    ap.add_argument("--repeats", type=int, default=8)
    args = ap.parse_args()
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    compute, s1, s2 = torch.cuda.current_stream(), torch.cuda.Stream(), torch.cuda.Stream()
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    matmuls = 16
    print(f"device: {torch.cuda.get_device_name()} | side streams; matmuls: {matmuls} x 8192^3 bf16 on the compute "
          f"stream | THP: {thp.read_text().strip() if thp.exists() else 'unknown'}")
    print(f"{'buffers':<11} | {'MB':>4} | {'case':<24} | {'copy ms':>7} | {'GB/s':>6} | {'2nd copy GB/s':>13} | "
          f"{'matmul TFLOP/s':>14}")
    pools: dict = {}
    for mb in (int(x) for x in args.mb.split(",")):
        n = mb * 10**6 // 2
        dev = torch.empty(n, dtype=torch.bfloat16, device="cuda").normal_()
        dev2 = torch.empty_like(dev)
        gb = n * 2 / 1e9
        for kind in args.buffers.split(","):
            host, host2 = host_tensors(kind, dev, pools)
            d2h = (s1, lambda: host.copy_(dev, non_blocking=True))
            h2d = (s2, lambda: dev2.copy_(host2, non_blocking=True))
            mm = (compute, lambda: [a @ a for _ in range(matmuls)])
            cases = [("device->host", {"copy": d2h}), ("host->device", {"copy": h2d}),
                     ("both at once", {"copy": d2h, "copy2": h2d}), ("matmuls alone", {"mm": mm}),
                     ("device->host + matmuls", {"copy": d2h, "mm": mm}),
                     ("host->device + matmuls", {"copy": h2d, "mm": mm})]
            for name, work in cases:
                t = _run(work, args.repeats)
                copy = f"{t['copy'] * 1e3:7.1f} | {gb / t['copy']:6.1f}" if "copy" in t else f"{'-':>7} | {'-':>6}"
                copy2 = f"{gb / t['copy2']:13.1f}" if "copy2" in t else f"{'-':>13}"
                rate = f"{matmuls * 2 * 8192**3 / t['mm'] / 1e12:14.0f}" if "mm" in t else f"{'-':>14}"
                print(f"{kind:<11} | {mb:>4} | {name:<24} | {copy} | {copy2} | {rate}")
            del host, host2
        del dev, dev2
    rollup = Path("/proc/self/smaps_rollup")  # what the kernel granted: huge pages in this process's anonymous memory
    granted = [line.split(":")[1].strip() for line in rollup.read_text().splitlines()
               if line.startswith("AnonHugePages")] if rollup.exists() else []
    print(f"huge pages granted to this process (AnonHugePages): {granted[0] if granted else 'unknown'}")
    for pool in pools.values():
        pool.close()


if __name__ == "__main__":
    main()
