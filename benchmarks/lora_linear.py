"""One branch-LoRA linear at One4D's shape (2 x 18,018 tokens, rank 64, bf16 base and adapters as DeepSpeed's bf16
mode holds them), forward + backward, per kernel (`model.lora_kernel`): `fused` (model/lora_op.py: the deltas
accumulate in the base GEMM) against `bmm` (the base linear, two batched products and the adds under autograd).
Prints one row per shape and kernel: time (median of CUDA-event-timed passes), the base product's share at the
measured matmul rate, the bytes the adapters move at the measured copy rate, and the kernels of one fused pass.

    python3 benchmarks/lora_linear.py [--presets 14b,1.3b] [--results FILE]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.train_step import record  # noqa: E402

TOKENS = 2 * 18018
SHAPES = {"14b": [("q/k/v/o", 5120, 5120), ("ffn.0", 5120, 13824), ("ffn.2", 13824, 5120)],
          "1.3b": [("q/k/v/o", 1536, 1536), ("ffn.0", 1536, 8960), ("ffn.2", 8960, 1536)]}


def timed(fn, iters: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def layer(k: int, n: int, kernel: str, dev) -> nn.Module:
    from one4d_train.model.dlc import BranchLoRALinear
    torch.manual_seed(0)
    m = BranchLoRALinear(nn.Linear(k, n, device=dev, dtype=torch.bfloat16), rank=64, alpha=64, kernel=kernel)
    with torch.no_grad():
        m.lora_B.normal_(std=0.02)
    return m.to(torch.bfloat16)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="14b,1.3b")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--results", help="append the rows here (JSON lines)")
    args = ap.parse_args()
    dev = torch.device("cuda")
    a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    mm_rate = 2 * 8192 ** 3 / timed(lambda: a @ a, args.iters) / 1e9  # TFLOP/s
    big = torch.empty(TOKENS, 5120, device=dev, dtype=torch.bfloat16)
    copy_rate = 2 * big.numel() * 2 / timed(lambda: big.clone(), args.iters) / 1e6  # GB/s (bytes read + written)
    del a, big
    print(f"{torch.cuda.get_device_name()}: bf16 matmul 8192^3 {mm_rate:.0f} TFLOP/s, copy {copy_rate:.0f} GB/s")
    print("preset | linear  | K -> N        | kernel | fwd+bwd ms | base GEMMs at the matmul rate | rest ms | one read ms")
    for preset in args.presets.split(","):
        for name, k, n in SHAPES[preset]:
            x = torch.randn(TOKENS, k, device=dev, dtype=torch.bfloat16, requires_grad=True)
            g = torch.randn(TOKENS, n, device=dev, dtype=torch.bfloat16)
            base_ms = 2 * 2 * TOKENS * k * n / mm_rate / 1e9  # the frozen weight's two products: forward, input grad
            read_ms = TOKENS * max(k, n) * 2 / copy_rate / 1e6  # one read of the wider activation
            times = {}
            for kernel in ("fused", "bmm"):
                m = layer(k, n, kernel, dev)
                wrt = (x, m.lora_A, m.lora_B)  # gradients returned, not accumulated into .grad
                times[kernel] = timed(lambda: torch.autograd.grad(m(x), wrt, g), args.iters)
                print(f"{preset:6s} | {name:7s} | {k:5d} -> {n:5d} | {kernel:6s} | {times[kernel]:10.3f} | "
                      f"{base_ms:29.3f} | {times[kernel] - base_ms:7.3f} | {read_ms:.3f}")
                record(args.results, {"kind": "lora_linear", "preset": preset, "linear": name, "k": k, "n": n,
                                      "lora_kernel": kernel, "ms": times[kernel], "base_ms": base_ms,
                                      "read_ms": read_ms, "matmul_tflops": mm_rate})
                del m
            print(f"{'':6s} | {'':7s} | {'':13s} | fused/bmm {times['fused'] / times['bmm']:.3f}")
    m = layer(*SHAPES[args.presets.split(",")[0]][0][1:], "fused", dev)
    x = torch.randn(TOKENS, m.base_layer.in_features, device=dev, dtype=torch.bfloat16, requires_grad=True)
    g = torch.ones(TOKENS, m.base_layer.out_features, device=dev, dtype=torch.bfloat16)
    torch.autograd.grad(m(x), (x, m.lora_A, m.lora_B), g)
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        torch.autograd.grad(m(x), (x, m.lora_A, m.lora_B), g)
        torch.cuda.synchronize()
    print("\nkernels of one fused forward + backward:")
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            print(f"  {e.device_time_total / 1e3:8.3f} ms  {e.name[:140]}")


if __name__ == "__main__":
    main()
