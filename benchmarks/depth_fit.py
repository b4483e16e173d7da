"""What the video-depth protocol's L1 scale-and-shift fit (`eval.depth_align=l1_scale_shift`) costs per sequence and
mode: `depth_alignment` on one sequence of synthetic depth (ground truth in 0.5-20 m, the prediction an affine,
noisy and partly wrong copy of it), every pixel scored, on each device given. Prints one table.

    python benchmarks/depth_fit.py [--shape 81 352 624] [--devices cpu cuda] [--threads 1] [--repeat 2]
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from one4d_train.eval.alignment import depth_alignment


def sequence(shape: tuple[int, ...], seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    gt = rng.uniform(0.5, 20.0, shape).astype(np.float32)
    pred = (gt - 0.3) / 2.5 * rng.lognormal(0.0, 0.05, shape).astype(np.float32)
    wrong = rng.random(shape) < 0.05  # outliers an L1 fit should ignore
    pred[wrong] = rng.uniform(0.1, 10.0, int(wrong.sum()))
    return pred, gt, np.ones(shape, bool)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", type=int, nargs=3, default=[81, 352, 624], metavar=("T", "H", "W"))
    ap.add_argument("--devices", nargs="+", default=["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads for the cpu rows")
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pred, gt, mask = sequence(tuple(args.shape))
    name = torch.cuda.get_device_name() if "cuda" in args.devices else ""
    print(f"L1 scale-and-shift depth fit, {'x'.join(map(str, args.shape))} ({mask.sum() / 1e6:.1f} M pixels) "
          f"{name}".rstrip())
    print(f"{'device':<12} | {'seconds':>8} | {'scale':>8} | {'shift':>8}")
    for device in args.devices:
        times = []
        for _ in range(args.repeat):
            start = time.perf_counter()
            scale, shift = depth_alignment(pred, gt, mask, "l1_scale_shift", device)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        label = f"cpu x{args.threads}" if device == "cpu" else device
        print(f"{label:<12} | {statistics.median(times):8.2f} | {scale:8.4f} | {shift:8.4f}")


if __name__ == "__main__":
    main()
