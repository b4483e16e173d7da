"""Where the condition encode's time goes (one GPU): the Wan VAE encoder's convolution shapes at One4D's clip size
(81 x 352 x 624) timed alone, one encode's kernels by device time, and the encode on a second CUDA stream while a
DiT-like load (the 1.3B block's matmuls and self-attention) runs on the first: whether overlapping the next
sample's encode with the current step would hide it. Rows go to --results as JSON lines (benchmarks/train_step.py's
format); `python3 benchmarks/train_step.py --report` does not tabulate them, the log does.

    python3 benchmarks/vae_kernels.py --results $OUT/results.jsonl [convs] [triton] [profile] [overlap]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.train_step import VIDEO, build_vae, record, seconds_per_call  # noqa: E402

# (channels, height, width, frames per call): the encoder's 3x3x3 convolutions per resolution level, with Wan's
# 4-frame calls and with all 80 frames after the first in one call
CONV_SHAPES = [(96, 352, 624, 4), (96, 352, 624, 80), (192, 176, 312, 4), (192, 176, 312, 80), (384, 88, 156, 2),
               (384, 44, 78, 1), (384, 44, 78, 20)]


def bench_convs(results, dev) -> None:
    """Each shape as cuDNN's conv3d (channels-last and not) and as a conv2d over the three temporal taps stacked
    on the channels."""
    for c, h, w, frames in CONV_SHAPES:
        conv = torch.nn.Conv3d(c, c, 3).to(dev, torch.bfloat16)
        x = torch.randn(1, c, frames + 2, h + 2, w + 2, device=dev, dtype=torch.bfloat16)
        flops = 2 * c * c * 27 * frames * h * w
        for layout in ("channels_last_3d", "contiguous"):
            fmt = getattr(torch, layout) if layout != "contiguous" else torch.contiguous_format
            conv.weight.data = conv.weight.data.contiguous(memory_format=fmt)
            xx = x.contiguous(memory_format=fmt)
            s = seconds_per_call(lambda: conv(xx), dev, reps=10)
            record(results, {"kind": "vae_conv", "shape": [c, h, w, frames], "form": f"conv3d {layout}",
                             "ms": s * 1e3, "tflops": flops / s / 1e12})
        w2 = conv.weight.permute(0, 2, 1, 3, 4).reshape(c, 3 * c, 3, 3).contiguous(memory_format=torch.channels_last)
        xcl = x.permute(0, 2, 3, 4, 1)  # [1, T, H, W, C]

        def folded():
            taps = torch.cat([xcl[:, i:i + frames] for i in range(3)], dim=-1)[0]  # [T, H, W, 3C]
            return F.conv2d(taps.permute(0, 3, 1, 2), w2)
        s = seconds_per_call(folded, dev, reps=10)
        record(results, {"kind": "vae_conv", "shape": [c, h, w, frames], "form": "conv2d over stacked taps",
                         "ms": s * 1e3, "tflops": flops / s / 1e12})


def bench_triton(results, dev) -> None:
    """Each shape through diffusers' `WanCausalConv3d` as the encoder calls it (two cache frames: `cat`, `F.pad`,
    cuDNN's channels-last conv3d) and through the Triton kernel (`one4d_train/model/vae_conv.py`), with the
    largest difference between the two outputs."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

    from one4d_train.model.vae_conv import use_triton_convs
    for c, h, w, frames in CONV_SHAPES:
        conv = WanCausalConv3d(c, c, 3, padding=1).to(dev, torch.bfloat16)
        conv.weight.data = conv.weight.data.contiguous(memory_format=torch.channels_last_3d)
        x = torch.randn(1, c, frames, h, w, device=dev, dtype=torch.bfloat16)
        x = x.contiguous(memory_format=torch.channels_last_3d)
        cache = torch.randn(1, c, 2, h, w, device=dev, dtype=torch.bfloat16)
        flops = 2 * c * c * 27 * frames * h * w
        ref = conv(x, cache)
        s_cudnn = seconds_per_call(lambda: conv(x, cache), dev, reps=10)
        use_triton_convs(conv)
        out = conv(x, cache)  # autotunes on the first call
        s_triton = seconds_per_call(lambda: conv(x, cache), dev, reps=10)
        diff = (out.float() - ref.float()).abs().max().item() / ref.float().abs().max().item()
        row = {"kind": "vae_conv_triton", "shape": [c, h, w, frames], "cudnn_ms": s_cudnn * 1e3,
               "triton_ms": s_triton * 1e3, "cudnn_tflops": flops / s_cudnn / 1e12,
               "triton_tflops": flops / s_triton / 1e12, "max_rel_diff": diff}
        record(results, row)
        print(f"conv {c}x{h}x{w}x{frames}: cuDNN (cat+pad+conv) {row['cudnn_ms']:.2f} ms {row['cudnn_tflops']:.0f} "
              f"TFLOP/s | Triton {row['triton_ms']:.2f} ms {row['triton_tflops']:.0f} TFLOP/s | diff {diff:.1e}",
              flush=True)


def bench_profile(results, vae, video) -> None:
    from torch.profiler import ProfilerActivity, profile
    vae.encode(video)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        vae.encode(video)
        torch.cuda.synchronize()
    events = prof.key_averages()
    top = sorted(events, key=lambda e: -e.device_time_total)[:14]
    record(results, {"kind": "vae_profile", "frames_per_call": vae.frames_per_call,
                     "total_ms": sum(e.device_time_total for e in events) / 1e3,
                     "top": [[e.key[:90], round(e.device_time_total / 1e3, 2), e.count] for e in top]})


def bench_overlap(results, vae, video, dev) -> None:
    """Encode alone, DiT-like load alone, then both at once (encode on a second stream; the load's stream at
    high and at equal priority)."""
    a = torch.randn(36036, 1536, device=dev, dtype=torch.bfloat16)
    ws = [torch.randn(1536, 1536, device=dev, dtype=torch.bfloat16) for _ in range(4)]
    up = torch.randn(8960, 1536, device=dev, dtype=torch.bfloat16)
    q = torch.randn(2, 12, 18018, 128, device=dev, dtype=torch.bfloat16)

    def dit(blocks: int = 12):
        for _ in range(blocks):
            y = a
            for w in ws:
                y = y @ w.T
            y = F.gelu(y @ up.T) @ up
            F.scaled_dot_product_attention(q, q, q)

    side = torch.cuda.Stream(priority=0)

    def both(priority: int):
        main, cur = torch.cuda.Stream(priority=priority), torch.cuda.current_stream()
        side.wait_stream(cur)
        main.wait_stream(cur)
        with torch.cuda.stream(side):
            vae.encode(video)
        with torch.cuda.stream(main):
            dit()
        cur.wait_stream(side)
        cur.wait_stream(main)

    t_dit = seconds_per_call(dit, dev, reps=3)
    t_enc = seconds_per_call(lambda: vae.encode(video), dev, reps=3)
    row = {"kind": "vae_overlap", "dit_s": t_dit, "encode_s": t_enc, "serial_s": t_dit + t_enc}
    for name, priority in (("dit_high_priority", -1), ("equal_priority", 0)):
        s = seconds_per_call(lambda: both(priority), dev, reps=3)
        row[f"concurrent_{name}_s"] = s
        row[f"hidden_{name}"] = (t_dit + t_enc - s) / t_enc
    record(results, row)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("parts", nargs="*", default=["convs", "profile", "overlap"])
    ap.add_argument("--results", default=None)
    ap.add_argument("--frames-per-call", type=int, default=4)
    args = ap.parse_args(argv)
    dev = torch.device("cuda")
    with torch.no_grad():  # inference kernels only: no autograd graph around the timed calls
        if "convs" in args.parts:
            bench_convs(args.results, dev)
        if "triton" in args.parts:
            bench_triton(args.results, dev)
        if {"profile", "overlap"} & set(args.parts):
            vae = build_vae(dev, compile=True, frames_per_call=args.frames_per_call)
            video = torch.rand(1, 3, *VIDEO, device=dev) * 2 - 1
            if "profile" in args.parts:
                bench_profile(args.results, vae, video)
            if "overlap" in args.parts:
                bench_overlap(args.results, vae, video, dev)


if __name__ == "__main__":
    main()
