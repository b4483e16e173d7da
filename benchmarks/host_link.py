"""The host link's copy rates, as activation offload (model/offload.py) uses it: pinned host memory, one side stream.

Prints one table: device-to-host and host-to-device rates of a `--mb` MB tensor (the 14B block input at One4D's
shape is 369 MB), each alone, both directions at once (two side streams), and each while the compute stream runs
bf16 matmuls (does the copy slow the matmuls, and the matmuls the copy?).

    python benchmarks/host_link.py [--mb 369] [--repeats 8]
"""
from __future__ import annotations

import argparse

import torch


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


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=369)
    ap.add_argument("--repeats", type=int, default=8)
    args = ap.parse_args()
    n = args.mb * 10**6 // 2
    dev = torch.empty(n, dtype=torch.bfloat16, device="cuda").normal_()
    dev2 = torch.empty_like(dev)
    host = torch.empty(n, dtype=torch.bfloat16, pin_memory=True)
    host2 = torch.empty(n, dtype=torch.bfloat16, pin_memory=True)
    compute, s1, s2 = torch.cuda.current_stream(), torch.cuda.Stream(), torch.cuda.Stream()
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    gb = n * 2 / 1e9
    matmuls = 16
    d2h = (s1, lambda: host.copy_(dev, non_blocking=True))
    h2d = (s2, lambda: dev2.copy_(host2, non_blocking=True))
    mm = (compute, lambda: [a @ a for _ in range(matmuls)])
    cases = [("device->host", {"copy": d2h}), ("host->device", {"copy": h2d}),
             ("both at once", {"copy": d2h, "copy2": h2d}), ("matmuls alone", {"mm": mm}),
             ("device->host + matmuls", {"copy": d2h, "mm": mm}), ("host->device + matmuls", {"copy": h2d, "mm": mm})]
    print(f"device: {torch.cuda.get_device_name()} | {args.mb} MB per copy, pinned host memory, side streams; "
          f"matmuls: {matmuls} x 8192^3 bf16 on the compute stream")
    print(f"{'case':<24} | {'copy ms':>7} | {'GB/s':>6} | {'2nd copy GB/s':>13} | {'matmul TFLOP/s':>14}")
    for name, work in cases:
        t = _run(work, args.repeats)
        copy = f"{t['copy'] * 1e3:7.1f} | {gb / t['copy']:6.1f}" if "copy" in t else f"{'-':>7} | {'-':>6}"
        copy2 = f"{gb / t['copy2']:13.1f}" if "copy2" in t else f"{'-':>13}"
        rate = f"{matmuls * 2 * 8192**3 / t['mm'] / 1e12:14.0f}" if "mm" in t else f"{'-':>14}"
        print(f"{name:<24} | {copy} | {copy2} | {rate}")


if __name__ == "__main__":
    main()
