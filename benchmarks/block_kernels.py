"""Where one DiT block's device time goes: one block of a preset at One4D's shape (2 x 18,018 tokens, RGB and XYZ
stacked, 769 context tokens), built as the trainer builds it (branch LoRA on every target linear, activation
checkpointing, the block's call compiled), forward + backward under torch.profiler. Prints the block's kernel
time per part (base GEMMs, branch-LoRA bmms, attention, Inductor's kernels, the rest) and the heaviest kernels;
--no-lora gives the base block alone, so the branch LoRA's whole cost (its bmms and the elementwise work it adds)
is the difference.

    python3 benchmarks/block_kernels.py --preset 14b --ckpt selective_self [--no-lora | --lora-kernel fused] [--cdt]
        [--results FILE]
"""
from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.train_step import IMAGE_TOKENS, TEXT_LEN, VIDEO, record, sync  # noqa: E402
from one4d_train.model.config import CHECKPOINT_MODES, LORA_KERNELS  # noqa: E402

ATTENTION_MARKS = ("flash", "fmha", "attention", "cudnn", "fa4", "Flash")


def block_inputs(cfg, dev, video=VIDEO):
    from one4d_train.model.backbone import rope_tables
    grid = (1 + (video[0] - 1) // 4, video[1] // 16, video[2] // 16)  # latents / (1, 2, 2) patches
    n = grid[0] * grid[1] * grid[2]
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    x = torch.randn(2, n, cfg.dim, device=dev, dtype=dtype, requires_grad=True)
    e0 = torch.randn(2, 6, cfg.dim, device=dev) * 0.1
    ctx = torch.randn(2, IMAGE_TOKENS + TEXT_LEN, cfg.dim, device=dev, dtype=dtype)
    return x, e0, ctx, rope_tables(grid, cfg.head_dim, dev)


def build_block(args, dev):
    """One block as the trainer has it: bf16 base, fp32 branch LoRA (B random, so every product is non-zero)."""
    from one4d_train.model.backbone import WanBlock
    from one4d_train.model.checkpointing import apply_activation_checkpointing
    from one4d_train.model.compile import compile_blocks
    from one4d_train.model.config import LoRAConfig
    from one4d_train.model.dlc import apply_dlc
    from one4d_train.model.presets import wan_config

    cfg = wan_config(args.preset)
    holder = nn.Module()
    with torch.device(dev):
        holder.blocks = nn.ModuleList([WanBlock(cfg)])
    for p in holder.parameters():
        nn.init.normal_(p, std=0.02)
    holder.to(torch.bfloat16 if dev.type == "cuda" else torch.float32)
    holder.requires_grad_(False)  # the frozen base (apply_dlc freezes it too): input gradients only
    if not args.no_lora:
        apply_dlc(holder, LoRAConfig(rank=args.rank), kernel=args.lora_kernel)
        for name, p in holder.named_parameters():
            if "lora_B" in name:
                nn.init.normal_(p, std=0.02)
    apply_activation_checkpointing(holder.blocks, args.ckpt)
    if not args.eager:
        compile_blocks(holder.blocks)
    return cfg, holder.blocks[0]


def part_of(name: str) -> str:
    if name in ("aten::mm", "aten::addmm", "aten::addmm_"):
        return "base GEMMs (mm/addmm)"
    if name == "aten::bmm":
        return "branch-LoRA bmm"
    if any(m in name for m in ATTENTION_MARKS):
        return "attention"
    if name.startswith("triton_"):
        return "Inductor kernels"
    return "other"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="14b", choices=["1.3b", "14b"])
    ap.add_argument("--ckpt", default="selective_self", choices=CHECKPOINT_MODES)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--no-lora", action="store_true", help="the base block alone (the LoRA's share, by difference)")
    ap.add_argument("--lora-kernel", default="bmm", choices=LORA_KERNELS,
                    help="the deltas accumulated in the base GEMMs (model/lora_op.py) or added after them")
    ap.add_argument("--eager", action="store_true", help="no torch.compile")
    ap.add_argument("--cdt", action="store_true", help="Inductor's coordinate-descent tuning of its kernels' tiles")
    ap.add_argument("--iters", type=int, default=3, help="profiled forward + backward passes")
    ap.add_argument("--rows", type=int, default=40, help="heaviest kernels listed")
    ap.add_argument("--results", help="append the per-part row here (JSON lines)")
    ap.add_argument("--device", default="cuda", help="cpu: a check of this script (fp32, --video small)")
    ap.add_argument("--video", default=",".join(map(str, VIDEO)), help="frames,height,width of the clip")
    args = ap.parse_args()
    dev = torch.device(args.device)
    video = tuple(int(v) for v in args.video.split(","))
    torch.backends.cuda.matmul.allow_tf32 = True
    import torch._inductor.config as inductor
    inductor.coordinate_descent_tuning = args.cdt
    cfg, block = build_block(args, dev)
    x, e0, ctx, freqs = block_inputs(cfg, dev, video)
    grad = torch.randn_like(x)

    def step():
        block(x, e0, ctx, freqs).backward(grad)

    for _ in range(3):
        step()
    sync(dev)
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(args.iters):
            step()
        sync(dev)
    # the host-side ops (aten::*, Inductor's kernel launches), each holding its kernels' device time: the kernels'
    # own rows would count that time twice
    events = [e for e in prof.key_averages() if e.device_type == DeviceType.CPU]
    own = (lambda e: e.self_device_time_total) if dev.type == "cuda" else (lambda e: e.self_cpu_time_total)
    parts, calls = defaultdict(float), defaultdict(int)
    for e in events:
        if own(e) > 0:
            parts[part_of(e.key)] += own(e) / args.iters / 1e3
            calls[part_of(e.key)] += e.count // args.iters
    total = sum(parts.values())
    label = (f"{args.preset} block, ckpt {args.ckpt}, {'no LoRA' if args.no_lora else f'LoRA rank {args.rank} ({args.lora_kernel})'}, "
             f"{'eager' if args.eager else 'compiled'}{', cdt' if args.cdt else ''}")
    print(f"\n{label}: {total:.2f} ms of kernels per forward + backward "
          f"(x{cfg.num_layers} blocks = {total * cfg.num_layers / 1e3:.3f} s)")
    for part, ms in sorted(parts.items(), key=lambda kv: -kv[1]):
        print(f"  {part:24s} {ms:8.2f} ms  {calls[part]:5d} calls  {100 * ms / total:5.1f}%")
    rows = sorted((e for e in events if own(e) > 0), key=lambda e: -own(e))
    print(f"\nheaviest {args.rows} kernels/ops per forward + backward:")
    for e in rows[:args.rows]:
        print(f"  {own(e) / args.iters / 1e3:8.3f} ms  {e.count // args.iters:4d}x  {e.key[:150]}")
    record(args.results, {"kind": "block_kernels", "preset": args.preset, "ckpt": args.ckpt,
                          "lora": not args.no_lora, "lora_kernel": args.lora_kernel, "compiled": not args.eager, "cdt": args.cdt,
                          "block_ms": total, **{f"ms {k}": v for k, v in parts.items()}})


if __name__ == "__main__":
    main()
