"""One4D training-step benchmark on one GPU, with the peer baseline, printing one table.

Each invocation runs ONE part and appends JSON lines to --results; `--report` prints the table of everything
recorded there. `benchmarks/gpu_run.sh` runs the parts as separate processes, so a failing part (an OOM, say)
costs only its own rows.

Parts:
  --matmul            bf16 8192^3 matmul rate (the MFU reference measured in the same run), the FP8 row-wise
                      matmul rate where the GPU has FP8 tensor cores, and the attention rate of each backend
                      present (SDPA's, FlashAttention's) at the self-, text- and image-attention shapes of a step.
  --vae               the full-size Wan2.1 VAE (diffusers AutoencoderKLWan default config, random weights, bf16):
                      encode time of the condition video alone and of RGB + pointmap + condition in one call.
  (default)           our DLC model (One4DModel on WanDiT, random weights) under DeepSpeed (world size 1, the
                      DeepSpeed config the trainer builds from configs/experiment/one4d_<preset>.yaml: ZeRO-2 as
                      shipped, `--zero-stage 3` for ZeRO-3), torch AdamW(fused=True), `--variants` timed one
                      after the other on the same engine (activation checkpointing mode, attention backend,
                      compilation, activation offload and the VAE mode change in place; ZeRO settings need their
                      own process).
  --peer              diffusers WanTransformer3DModel(in_channels=36) bf16 + one shared PEFT LoRA (rank 64; 8 for
                      the tiny preset; fp32 LoRA weights), autocast bf16, gradient checkpointing, AdamW(fused=True),
                      RGB+XYZ as batch 2.

A step = one sample (RGB + XYZ of one clip): [VAE/conditioning] -> DiT forward -> loss -> backward -> optimizer.
The breakdown is timed with CUDA events; the step time is host wall time between synchronisations.

    python benchmarks/train_step.py --matmul --results r.jsonl
    python benchmarks/train_step.py --preset 1.3b --variants ckpt=selective,ckpt=full,attn=flash --results r.jsonl
    python benchmarks/train_step.py --preset 14b --peer --results r.jsonl
    python benchmarks/train_step.py --report r.jsonl
"""
from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from one4d_train.model.config import CHECKPOINT_UNITS, LORA_KERNELS  # noqa: E402
from one4d_train.train.metrics import alloc_counters  # noqa: E402

H100_PEAK = 989e12
MIN_TIMED_STEPS = 10  # the step time is the median of at least this many timed steps after warm-up
LATENT = (21, 44, 78)  # 81 x 352 x 624 video -> 18,018 tokens per modality
VIDEO = (81, 352, 624)
TEXT_LEN, TEXT_DIM, IMAGE_TOKENS, IMAGE_DIM = 512, 4096, 257, 1280
PEER_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2"]


# ---------------------------------------------------------------------------------------------------- utilities

def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


@functools.lru_cache(maxsize=None)
def commit(root: str | Path | None = None) -> str:
    """HEAD's short commit; where the files differ from it (a copied tree whose repository metadata is stale, or
    uncommitted changes), `HEAD+tree:ID` with ID the git tree the files make, which names the code run exactly:
    `git log --all --format='%h %T' | grep ID` finds the commit that holds it."""
    if os.environ.get("BENCH_COMMIT"):  # the caller knows better
        return os.environ["BENCH_COMMIT"]
    root = Path(root or Path(__file__).resolve().parents[1])

    def git(*args, **env):
        return subprocess.check_output(["git", *args], text=True, cwd=root, stderr=subprocess.DEVNULL,
                                       env={**os.environ, **env}).strip()
    try:
        head = git("rev-parse", "--short", "HEAD")
    except (OSError, subprocess.CalledProcessError):
        return "?"
    try:  # the files' tree, through a scratch index: the repository's own index is left alone
        with tempfile.TemporaryDirectory() as tmp:
            index = os.path.join(tmp, "index")
            git("add", "-A", GIT_INDEX_FILE=index)
            tree = git("write-tree", GIT_INDEX_FILE=index)
        return head if tree == git("rev-parse", "HEAD^{tree}") else f"{head}+tree:{tree[:12]}"
    except (OSError, subprocess.CalledProcessError):
        return head


def record(path: str | None, row: dict) -> None:
    row = {"device": device_name(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
           "commit": os.environ.get("BENCH_COMMIT") or commit(), **row}
    print("RESULT " + json.dumps(row), flush=True)
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Events:
    """Named time marks: CUDA events on GPU, host clock on CPU. `spans()` -> seconds between consecutive marks, each
    named by its closing mark; where a step marks "vae" then "cond" (the VAE encode, then the text/image features),
    also their sum as "vae_cond", everything before the DiT (the one span of the peer's and older rows; older rows'
    held the noising too, which is now in the DiT forward)."""

    def __init__(self, device):
        self.device, self.marks = device, []

    def mark(self, name: str) -> None:
        if self.device.type == "cuda":
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.marks.append((name, ev))
        else:
            self.marks.append((name, time.perf_counter()))

    def spans(self) -> dict[str, float]:
        out = {}
        for (_, a), (name, b) in zip(self.marks, self.marks[1:]):
            out[name] = a.elapsed_time(b) / 1e3 if self.device.type == "cuda" else b - a
        if "vae" in out and "cond" in out:
            out["vae_cond"] = out["vae"] + out["cond"]
        return out


def init_dist(device) -> None:
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 2000))
    import deepspeed
    if device.type == "cpu":
        from one4d_train.train.distributed import skip_cpu_inference_ops
        skip_cpu_inference_ops()
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo", verbose=False)


def reserved_by_stream(device, offload=None) -> dict[str, float]:
    """GB the allocator holds now on `device` per CUDA stream (its segments' sizes; what one stream caches the others
    cannot use): `current`, the activation offload's side stream `offload`, others by their handles."""
    if device.type != "cuda":
        return {}
    names = {torch.cuda.current_stream(device).cuda_stream: "current"}
    if offload is not None:
        names[offload.stream(device).cuda_stream] = "offload"
    index = device.index if device.index is not None else torch.cuda.current_device()
    out: dict[str, float] = {}
    for seg in torch.cuda.memory_snapshot():
        if seg["device"] == index:
            key = names.get(seg["stream"], str(seg["stream"]))
            out[key] = out.get(key, 0.0) + seg["total_size"] / 1e9
    return out


def timed_loop(step, warmup: int, steps: int, device, counters: dict | None = None,
               on_timed=None) -> tuple[list[float], list[dict]]:
    """Wall time and event spans of `steps` steps after `warmup`; `counters` gets the caching allocator's counts over
    the timed steps; `on_timed()` runs once before the first timed step."""
    walls, spans = [], []
    for i in range(warmup + steps):
        sync(device)
        if i == warmup and on_timed is not None:
            on_timed()
        if i == warmup and counters is not None:
            counters.update(alloc_counters(device))
        t0 = time.perf_counter()
        ev = step()
        sync(device)
        if i >= warmup:
            walls.append(time.perf_counter() - t0)
            spans.append(ev.spans())
    if counters is not None:
        counters.update({k: v - counters.get(k, 0) for k, v in alloc_counters(device).items()})
    return walls, spans


def summarise(walls, spans) -> dict:
    keys = spans[0].keys() if spans else []
    return {"step_s": statistics.median(walls), "step_s_min": min(walls), "step_s_max": max(walls),
            "steps": len(walls), **{f"{k}_s": statistics.median(s[k] for s in spans) for k in keys}}


# ------------------------------------------------------------------------------------------------ matmul / VAE

def seconds_per_call(fn, dev, warmup: int = 2, reps: int = 5) -> float:
    """Mean wall time of `fn` over `reps` calls after `warmup` untimed ones (first calls pick or compile kernels)."""
    for _ in range(warmup):
        fn()
    sync(dev)
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    sync(dev)
    return (time.perf_counter() - t0) / reps


# name -> (batch, query tokens, key tokens, heads, head dim): RGB + XYZ as a batch of 2 x 18,018 tokens; the 1.3B
# self-attention (12 heads of 128), the 14B text (512 keys) and image (257 CLIP tokens) cross-attentions (40 x 128)
ATTN_SHAPES = {"self": (2, 18018, 18018, 12, 128), "text": (2, 18018, 512, 40, 128), "image": (2, 18018, 257, 40, 128)}


def bench_matmul(args) -> None:
    dev = torch.device("cuda")
    n = 8192
    a, b = (torch.randn(n, n, device=dev, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(5):
        a @ b
    sync(dev)
    times = []
    for _ in range(20):
        t0 = torch.cuda.Event(enable_timing=True); t1 = torch.cuda.Event(enable_timing=True)
        t0.record(); a @ b; t1.record(); t1.synchronize()
        times.append(t0.elapsed_time(t1) / 1e3)
    rate = 2 * n ** 3 / statistics.median(times)
    record(args.results, {"kind": "matmul", "tflops": rate / 1e12})
    # the FP8 base matmuls' product (model.base_matmul=fp8): e4m3 operands, row-wise scales, quantised beforehand
    from one4d_train.model.fp8 import quantize_rows, require_fp8_tensor_cores
    try:
        require_fp8_tensor_cores(dev)
        (qa, sa), (qb, sb) = quantize_rows(a), quantize_rows(b)
        fp8_s = seconds_per_call(lambda: torch._scaled_mm(qa, qb.t(), scale_a=sa, scale_b=sb.t(),
                                                          out_dtype=torch.bfloat16), dev, warmup=5, reps=20)
        record(args.results, {"kind": "matmul_fp8", "tflops": 2 * n ** 3 / fp8_s / 1e12})
    except (ValueError, RuntimeError) as exc:  # a GPU without FP8 tensor cores: reported, the rest still runs
        print(f"fp8 matmul not timed: {exc}", flush=True)
    # attention at the shapes of one DLC step; SDPA's memory-efficient kernel, the slowest, only at the first
    for label, shape in ATTN_SHAPES.items():
        sdpa = ("cudnn", "flash", "efficient") if label == "self" else ("cudnn", "flash")
        for row in attention_rates(*shape, sdpa, dev):
            record(args.results, {"kind": "attention", "shape": label, **row})


def attention_rates(b, sq, sk, h, d, sdpa_backends, dev) -> list[dict]:
    """TFLOP/s forward and forward + backward (backward = 2.5x forward) of each attention backend present, every one
    called through the model's own attention() ([B, S, heads, head_dim]); a backend that fails is reported."""
    from one4d_train.model.attention import attention, backend_present
    q = torch.randn(b, sq, h, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(b, sk, h, d, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    gout = torch.randn_like(q)
    flops_fwd = 4.0 * b * h * sq * sk * d
    rows = []
    for name in (*sdpa_backends, "fa4", "fa3", "fa2"):
        if not backend_present(name, dev):
            continue
        try:
            def fwd():
                with torch.no_grad():
                    attention(q, k, v, backend=name)

            def fwd_bwd():
                attention(q, k, v, backend=name).backward(gout)
            rates = {f"tflops_{what}": mult * flops_fwd / seconds_per_call(fn, dev) / 1e12
                     for what, fn, mult in (("fwd", fwd, 1.0), ("fwd_bwd", fwd_bwd, 3.5))}
            rows.append({"backend": name, **rates})
        except Exception as exc:  # noqa: BLE001 - a backend that fails at this shape is reported, not fatal
            rows.append({"backend": name, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]})
    return rows


def build_vae(device, tiny: bool = False, compile: bool = False, **kwargs):
    from diffusers import AutoencoderKLWan
    from one4d_train.model.vae import WanVAE
    torch.manual_seed(0)
    model = AutoencoderKLWan(base_dim=8) if tiny else AutoencoderKLWan()  # default config = Wan2.1 VAE architecture
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return WanVAE(model, dtype=dtype, device=device, compile=compile, **kwargs)


def vae_flops(vae, video) -> float:
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        vae.encode(video)
    return counter.get_total_flops()


def time_encode(vae, video, repeats: int) -> float:
    """Median seconds of `repeats - 1` encodes of `video` (the first, warm-up or compilation, not counted)."""
    walls = []
    for _ in range(repeats):
        sync(video.device)
        t0 = time.perf_counter()
        vae.encode(video)
        sync(video.device)
        walls.append(time.perf_counter() - t0)
    return statistics.median(walls[1:])


VAE_LEVERS = [  # (name, WanVAE settings); each row a fresh VAE with the same random weights
    ("bf16, channels-last convs, 3 input channels", dict(pad_channels=False)),
    ("+ cudnn.benchmark (this row only)", dict(pad_channels=False, cudnn_benchmark=True)),
    ("+ compiled encoder", dict(pad_channels=False, compile=True)),
    ("+ first conv padded to 8 channels", dict(compile=True)),
    ("+ 8 frames per call", dict(compile=True, frames_per_call=8)),
    ("+ 16 frames per call", dict(compile=True, frames_per_call=16)),
    ("+ 80 frames per call", dict(compile=True, frames_per_call=80)),
    ("8 frames per call, Triton convolutions", dict(compile=True, frames_per_call=8, conv_kernel="triton")),
    ("16 frames per call, Triton convolutions", dict(compile=True, frames_per_call=16, conv_kernel="triton")),
    ("80 frames per call, Triton convolutions", dict(compile=True, frames_per_call=80, conv_kernel="triton")),
]


def bench_vae_levers(args, video) -> None:
    """The condition-video encode under each setting of VAE_LEVERS: time, rate, peak memory, and the latents'
    relative difference from the first row's and from an fp32 encode (the rows' differences are bf16 rounding
    along ~40 layers of random weights, unless a setting changes the result)."""
    dev = video.device
    ref32 = build_vae(dev, tiny=args.preset == "tiny").model.float()
    from one4d_train.model.vae import WanVAE
    fp32 = WanVAE(ref32, dtype=torch.float32, device=dev, pad_channels=False)
    with torch.no_grad():
        z32 = fp32.encode(video)
    # counted on the eager fp32 encoder: counting on a row's compiled one compiled it under the counter's dispatch
    # mode, and that row was then timed on the graph it left (slower, other rounding)
    flops, first = vae_flops(fp32, video), None
    del fp32, ref32
    for name, settings in VAE_LEVERS:
        if not any(part in name for part in args.vae_levers.split(",")):
            continue
        settings = dict(settings)
        # every row compiles from scratch: the rows share the encoder's code objects, whose variants from earlier
        # rows used up dynamo's recompile limit, so that later rows ran partly eager
        torch._dynamo.reset()
        torch.backends.cudnn.benchmark = settings.pop("cudnn_benchmark", False)
        try:
            vae = build_vae(dev, tiny=args.preset == "tiny", **settings)
            torch.cuda.reset_peak_memory_stats() if dev.type == "cuda" else None
            s = time_encode(vae, video, repeats=4)
            z = vae.encode(video)
            first = z if first is None else first
            record(args.results, {"kind": "vae", "videos": f"condition, {name}", "encode_s": s,
                                  "tflops": flops / s / 1e12, "flops": flops,
                                  "peak_gb": torch.cuda.max_memory_allocated() / 1e9 if dev.type == "cuda" else 0.0,
                                  "rel_to_first": float((z - first).norm() / first.norm()),
                                  "rel_to_fp32": float((z - z32).norm() / z32.norm())})
            del vae
        except Exception as exc:  # record and go on
            record(args.results, {"kind": "vae_error", "videos": name, "error": str(exc).splitlines()[0][:200]})
    torch.backends.cudnn.benchmark = False


def bench_vae(args) -> None:
    dev = torch.device(args.device)
    video = torch.rand(1, 3, *video_shape(args), device=dev) * 2 - 1
    if args.vae_levers is not None:
        return bench_vae_levers(args, video)
    vae = build_vae(dev, tiny=args.preset == "tiny")
    for name, n in (("condition", 1), ("rgb+xyz+condition", 3)):
        batch = video.expand(n, -1, -1, -1, -1).contiguous()
        torch.cuda.reset_peak_memory_stats() if dev.type == "cuda" else None
        s = time_encode(vae, batch, repeats=3)
        peak = torch.cuda.max_memory_allocated() / 1e9 if dev.type == "cuda" else 0.0
        record(args.results, {"kind": "vae", "videos": name, "encode_s": s, "peak_gb": peak})


def video_shape(args) -> tuple[int, int, int]:
    return (9, 32, 48) if args.preset == "tiny" else VIDEO


def latent_shape(args) -> tuple[int, int, int]:
    t, h, w = video_shape(args)
    return 1 + (t - 1) // 4, h // 8, w // 8


# --------------------------------------------------------------------------------------------------- our model

LEVER_HELP = """variants (comma separated, each a '+'-joined list of settings applied in place on the same engine):
  ckpt=none|full|selective|selective_self|mixed:K   activation checkpointing (model/checkpointing.py;
        mixed:K = the first K blocks selective_self, the rest full; MODE@K = the first K blocks in MODE, the rest
        keep every activation, as model.activation_checkpointing_blocks=K)
  unit=block|sublayer|sublayer_ffn                  checkpointed region: the block, or each of its three residual
        updates, those and the FFN's hidden layer (model.activation_checkpointing_unit); unset: as the config says
  attn=auto|cudnn|flash|efficient|fa2|fa3|fa4       attention backend
  vae=none|latents|pixels|mix                       none: DiT only; latents: targets pre-computed, the step
        encodes the (sparse-task) condition video; pixels: RGB + pointmap + condition encoded in one call; mix:
        targets pre-computed, each step draws its UMC task as the trainer does (model.umc) and encodes a condition
        only where the trainer would (the sparse task; the image task's latent stored): the row's mix s is measured,
        its step s and spans are the encoding steps' (the worst case)
  n=<steps>                                         timed steps of this variant (default --steps)
  compile=0|1|max                                   regional torch.compile of each block (model/compile.py; not
        under ZeRO-3: its parameter hooks break the graphs); max: mode max-autotune-no-cudagraphs (Triton GEMM
        templates that can fuse the branch-LoRA add into their epilogue; minutes of autotuning); unset: as the
        experiment config says
  offload=0|1|1@K                                   saved block activations in pinned host memory (model/offload.py);
        1@K: of the first K blocks only, the rest's kept on the GPU (model.activation_offload_blocks=K); unset: as
        the experiment config says
  hostmem=small|thp                                 the offload's host buffers in small pages or transparent huge
        pages (model/host_buffers.py); unset: small
  lora=fused|bmm                                    the branch LoRA's deltas accumulated in the base GEMMs
        (model/lora_op.py) or added after them (model.lora_kernel); unset: as the experiment config says
e.g. --variants "ckpt=selective+vae=latents,ckpt=full,attn=flash" (unset settings keep the previous variant's)."""


COMPILE_MODES = {"1": {}, "max": {"mode": "max-autotune-no-cudagraphs"}}
VAE_MODES = ("none", "latents", "pixels", "mix")


def set_checkpointing(blocks, mode: str, unit: str = "block") -> None:
    from one4d_train.model.checkpointing import apply_activation_checkpointing
    if mode.startswith("mixed:"):
        k = int(mode.split(":")[1])
        apply_activation_checkpointing(blocks, "full", unit=unit)
        apply_activation_checkpointing(list(blocks)[:k], "selective_self", unit=unit)
    elif "@" in mode:
        name, _, k = mode.partition("@")
        apply_activation_checkpointing(blocks, name, int(k), unit)
    else:
        apply_activation_checkpointing(blocks, mode, unit=unit)


def our_config(args):
    from one4d_train.config import load_config
    preset = args.preset
    overrides = [] if preset == "tiny" else [f"config=configs/experiment/one4d_{preset}.yaml"]
    overrides += [f"model.preset={preset}", "model.checkpoint=''", "model.vae=''", "model.text_encoder=''",
                  "model.image_encoder=''", "train.grad_accum=1", "train.micro_batch_size=1", "train.precision=bf16"]
    if args.zero_stage is not None:
        overrides.append(f"train.zero_stage={args.zero_stage}")
    if args.persistence is not None:
        overrides.append(f"train.zero3_param_persistence_threshold={args.persistence}")
    if preset == "tiny":
        overrides += ["model.compute_dtype=bf16", "model.lora.rank=8", "model.num_links=2"]
    overrides += args.set or []
    return load_config(overrides)


def our_flops(cfg, args) -> float:
    from one4d_train.model.flops import model_flops_per_sample
    from one4d_train.model.presets import wan_config
    c = wan_config(cfg.model.preset, has_image_input=cfg.model.has_image_input)
    t, h, w = latent_shape(args)
    return model_flops_per_sample(cfg.model, c, t * (h // 2) * (w // 2),
                                  image_tokens=IMAGE_TOKENS if c.has_image_input else 0)


def parse_variants(text: str) -> list[dict]:
    out, current = [], {"ckpt": None, "unit": None, "attn": None, "vae": "latents", "compile": None, "offload": None,
                        "lora": None, "hostmem": None, "n": None}
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        for setting in item.split("+"):
            key, _, value = setting.partition("=")
            if key not in current or (key == "compile" and value not in ("0", *COMPILE_MODES)) or (
                    key == "lora" and value not in LORA_KERNELS) or (
                    key == "unit" and value not in CHECKPOINT_UNITS) or (
                    key == "offload" and not re.fullmatch(r"0|1(@\d+)?", value)) or (
                    key == "hostmem" and value not in ("small", "thp")) or (
                    key == "vae" and value not in VAE_MODES):
                raise SystemExit(f"unknown variant setting {setting!r}\n{LEVER_HELP}")
            current[key] = value
        out.append({**current, "name": item})
    return out


def resident_encoders(mcfg, device, tiny: bool, text_stored: bool = False) -> list[torch.nn.Module]:
    """The frozen towers a training run keeps on its GPU besides the VAE, at their real sizes: the UMT5-XXL encoder
    (5.68B parameters; not where the trainer keeps it in host memory: `model.text_encoder_device=cpu`, or `auto`
    with `text_stored`, shards whose captions' embeddings are stored) and CLIP ViT-H/14's vision tower (0.63B), in
    bf16, with transformers' random initialisation (on a real device). The step runs them: `StepConditioning`."""
    from one4d_train.model.encoders import text_encoder_device
    from transformers import CLIPVisionConfig, CLIPVisionModel, UMT5Config, UMT5EncoderModel
    from one4d_train.model.image_encoder import tiny_clip_vision
    from one4d_train.model.text_encoder import tiny_umt5
    if tiny:
        text, image = tiny_umt5().config, tiny_clip_vision(image_size=224).config  # Wan's 257 image tokens
    else:
        text = UMT5Config(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                          relative_attention_num_buckets=32, feed_forward_proj="gated-gelu")
        image = CLIPVisionConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                 num_attention_heads=16, patch_size=14, image_size=224)
    on_device = text_encoder_device(mcfg, device, text_stored).type == torch.device(device).type
    towers = [(UMT5EncoderModel, text)] if on_device else []
    if mcfg.has_image_input:  # as the trainer builds it (model/encoders.py)
        towers.append((CLIPVisionModel, image))
    out = []
    for cls, config in towers:
        with torch.device("meta"):
            tower = cls(config).to(torch.bfloat16)
        tower = tower.to_empty(device=device).requires_grad_(False)
        if torch.device(device).type != "meta":  # to_empty leaves whatever the memory held: NaNs, at times
            with torch.no_grad():
                tower.apply(tower._init_weights)
        tower.tie_weights()  # to_empty unties UMT5's shared/encoder embeddings (2.1 GB counted twice otherwise)
        out.append(tower)
    return out


# a caption of ~120 tokens (UMT5's, `</s>` included), in the offline word-level tokenizer's words
CAPTION = " ".join(["a", "dog", "runs", "on", "the", "grass", "camera", "moves", "left"] * 13)


class StepConditioning:
    """The step's text and image features as the trainer makes them (train/one4d_task.py): CLIP's features of the
    clip's first observed frame, and, where the text tower is held on the GPU (shards without stored text
    embeddings), UMT5's encoding of a caption (the same caption, encoded every step, as a held encoder does: it
    keeps no cache). Without a tower (text stored, no image input, or `--no-encoders`): fixed random features of
    the same shape."""

    def __init__(self, towers: list, device, text_dim: int, image_dim: int, generator: torch.Generator):
        from transformers import CLIPVisionModel, UMT5EncoderModel
        from one4d_train.model.image_encoder import CLIPImageEncoder
        from one4d_train.model.text_encoder import UMT5TextEncoder, tiny_tokenizer

        text = next((t for t in towers if isinstance(t, UMT5EncoderModel)), None)
        image = next((t for t in towers if isinstance(t, CLIPVisionModel)), None)
        self.text = (UMT5TextEncoder(text, tiny_tokenizer(), dtype=torch.bfloat16, device=device)
                     if text is not None else None)
        self.image = CLIPImageEncoder(image, dtype=torch.bfloat16, device=device) if image is not None else None
        self.context = torch.randn(1, TEXT_LEN, text_dim, device=device, generator=generator, dtype=torch.bfloat16)
        self.clip = torch.randn(1, IMAGE_TOKENS, image_dim, device=device, generator=generator, dtype=torch.bfloat16)

    def __call__(self, rgb: torch.Tensor, frame_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from one4d_train.model.umc import first_observed_frame

        context = self.text.encode([CAPTION]).to(torch.bfloat16) if self.text is not None else self.context
        clip = (self.image.encode(first_observed_frame(rgb, frame_mask)).to(torch.bfloat16)
                if self.image is not None else self.clip)
        return context, clip


MIN_MIX_GROUP = 5  # timed steps of each group (encoding, not) below which a measured mix is marked '(few)'


def live_encode_share(umc) -> float:
    """The share of samples whose step encodes a condition when the shards store the target latents: the tasks
    whose condition latent cannot be stored with the clip (the sparse task)."""
    from one4d_train.model.umc import TASKS, fixed_per_clip

    return sum(getattr(umc, f"p_{t}") for t in TASKS if not fixed_per_clip(t))


def task_mix(walls: list[float], tasks: list[str], umc) -> dict:
    """The expected step over the UMC task mix, from timed steps that each drew their task as the trainer does:
    the mean step of the tasks that encode a condition (those whose condition latent is not stored: the sparse
    task) and of the others (image, video: their steps differ by a latent copy), weighted by the configured
    probabilities, which corrects for how many of each the draws gave; throughput is its inverse. Each group's
    median is kept beside it. No figure where the draws left a group empty."""
    from one4d_train.model.umc import fixed_per_clip

    p_encode = live_encode_share(umc)
    encode = [w for w, t in zip(walls, tasks) if not fixed_per_clip(t)]
    plain = [w for w, t in zip(walls, tasks) if fixed_per_clip(t)]
    out = {"mix_tasks": list(tasks), "mix_encode_steps": len(encode), "p_live_encode": p_encode}
    if encode and plain:
        out["mix_s"] = p_encode * statistics.fmean(encode) + (1 - p_encode) * statistics.fmean(plain)
        out["mix_encode_median_s"], out["mix_plain_median_s"] = statistics.median(encode), statistics.median(plain)
    return out


def build_random_model(mcfg, device):
    """The One4D model with random weights, built directly on the device: the base on the meta device, then
    materialised once in its compute dtype with Wan's initialisation (the head N(0, dim^-0.5) instead of Wan's
    zeros, which would stop every gradient), then the DLC wrapping and checkpointing as configured. Same
    modules as `build_one4d`, without its CPU-side fp32 copy of the base (65 GB and minutes for 14B)."""
    from one4d_train.model.attention import set_attention_backend
    from one4d_train.model.backbone import WanDiT, wan_config
    from one4d_train.model.checkpointing import apply_configured_checkpointing
    from one4d_train.model.one4d import DTYPES, One4DModel

    wan_cfg = wan_config(mcfg.preset, in_dim=36, has_image_input=mcfg.has_image_input)
    with torch.device("meta"):
        base = WanDiT(wan_cfg).to(DTYPES[mcfg.compute_dtype])
    base.to_empty(device=device)
    torch.manual_seed(0)
    base.init_weights()
    with torch.no_grad():
        base.head.head.weight.normal_(0, wan_cfg.dim ** -0.5)
    set_attention_backend(mcfg.attention)
    model = One4DModel(base, mcfg)
    apply_configured_checkpointing(base.blocks, mcfg)
    return model


def build_our_engine(cfg, args, device):
    """Model (one copy, on the device) -> torch AdamW(fused) -> deepspeed.initialize with the trainer's config
    (ZeRO-3 partitions the parameters in place; on one rank that holds the same memory as a zero.Init build)."""
    import deepspeed
    from one4d_train.train import deepspeed_config, grad_checks

    ds_config, changed = deepspeed_config.build(cfg, 1)
    if not torch.cuda.is_available():
        ds_config["bf16"] = {"enabled": True}
    t0 = time.perf_counter()
    model = build_random_model(cfg.model, device)
    build_s = time.perf_counter() - t0
    params = [p for p in model.parameters() if p.requires_grad]
    o = cfg.optim
    optimizer = torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay,
                                  fused=device.type == "cuda")
    grad_checks.install()
    if cfg.train.zero_stage == 3:
        from one4d_train.model.dlc import share_base_with_zero3
        share_base_with_zero3(model)
    t0 = time.perf_counter()
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=params, optimizer=optimizer,
                                           config=ds_config, dist_init_required=False)
    return engine, ds_config, changed, build_s, time.perf_counter() - t0


def profile_step(step, device) -> None:
    """One more step under torch.profiler: the ops that take the most device time, in the log."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
        sync(device)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=30, max_name_column_width=60), flush=True)
    opt = [e for e in prof.key_averages() if e.key == "optimizer_step"]
    for e in opt:
        print(f"optimizer_step: cpu {e.cpu_time_total / 1e3:.1f} ms, device {e.device_time_total / 1e3:.1f} ms",
              flush=True)


def run_ours(args) -> None:
    from one4d_train.model import attention as attn_mod
    from one4d_train.model.one4d import DTYPES
    from one4d_train.model.umc import (condition_latents, condition_video, fixed_per_clip, fold_frame_mask,
                                       sample_frame_mask, sample_umc)
    from one4d_train.train.one4d_task import denoising_loss

    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(0)
        torch.backends.cuda.matmul.allow_tf32 = True
    init_dist(device)
    cfg = our_config(args)
    if cfg.model.activation_checkpointing_unit == "auto":  # as the trainer resolves it, for this machine, once, with
        # the config's offload settings: variants that change `offload=` keep this unit unless they set `unit=`
        from one4d_train.model.offload_plan import resolve_unit
        from one4d_train.model.presets import wan_config
        t_lat, h, w = latent_shape(args)
        unit, why = resolve_unit(cfg.model, wan_config(cfg.model.preset), 2 * t_lat * (h // 2) * (w // 2))
        print(f"model.activation_checkpointing_unit auto -> {unit} ({why})", flush=True)
        cfg.model.activation_checkpointing_unit = unit
    variants = parse_variants(args.variants)
    flops = our_flops(cfg, args)
    engine, ds_config, changed, build_s, init_s = build_our_engine(cfg, args, device)
    model = engine.module
    print(f"built {cfg.model.preset} in {build_s:.1f}s, deepspeed.initialize {init_s:.1f}s; zero "
          f"{ds_config['zero_optimization']}", flush=True)
    n_trainable = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)

    # synthetic inputs (data wait = 0): clip pixels, pointmap, pre-computed target latents, text and CLIP features
    g = torch.Generator(device=device)
    g.manual_seed(0)
    t_lat, h, w = latent_shape(args)
    vt, vh, vw = video_shape(args)
    text_dim = model.base.cfg.text_dim if hasattr(model.base, "cfg") else TEXT_DIM
    image_dim = model.base.cfg.image_dim
    rgb = torch.rand(1, 3, vt, vh, vw, device=device, generator=g) * 2 - 1
    xyz = torch.rand(1, 3, vt, vh, vw, device=device, generator=g) * 2 - 1
    z_rgb = torch.randn(1, 16, t_lat, h, w, device=device, generator=g)
    z_xyz = torch.randn(1, 16, t_lat, h, w, device=device, generator=g)
    z_image = torch.randn(1, 16, t_lat, h, w, device=device, generator=g)  # the image task's, stored with the shards
    frame_mask = sample_frame_mask("sparse", vt, cfg.model.umc, torch.Generator().manual_seed(0))[None].to(device)
    mask4 = fold_frame_mask(frame_mask, h, w).to(z_rgb)
    # the XYZ cells with geometry, as shards with latents store them (`latent_valid`): one in ten without
    latent_valid = torch.rand(1, 1, t_lat, h, w, device=device, generator=g) >= 0.1
    dtype = DTYPES[cfg.model.compute_dtype]
    vae = (build_vae(device, tiny=args.preset == "tiny", compile=cfg.model.compile_vae,
                     frames_per_call=cfg.model.vae_frames_per_call,
                     chunk_size=cfg.model.vae_videos_per_call, conv_kernel=cfg.model.vae_conv_kernel)
           if any(v["vae"] != "none" for v in variants) else None)
    # stored latents come from `one4d encode-latents`, which stores the captions' text embeddings as well
    text_stored = all(v["vae"] in ("latents", "mix") for v in variants)
    encoders = (resident_encoders(cfg.model, device, tiny=args.preset == "tiny", text_stored=text_stored)
                if args.encoders else [])
    encoders_gb = sum(p.numel() * p.element_size() for e in encoders for p in e.parameters()) / 1e9
    conditioning = StepConditioning(encoders, device, text_dim, image_dim, g)

    state = {"vae": "none", "tasks": [], "encodes": 0}
    draws = torch.Generator().manual_seed(0)  # `vae=mix`: each step's UMC task, drawn as the trainer draws it

    def counted_encode(video):  # `vae=mix`: the condition encodes its steps ran (the sparse task's alone)
        state["encodes"] += 1
        return vae.encode(video)

    def step():
        ev = Events(device)
        ev.mark("start")
        zr, zx, fm, m4 = z_rgb, z_xyz, frame_mask, mask4
        if state["vae"] == "mix":
            tasks, fm = sample_umc(1, vt, cfg.model.umc, draws)
            state["tasks"] += tasks
            fm = fm.to(device)
            m4 = fold_frame_mask(fm, h, w).to(z_rgb)
            z_c = condition_latents(tasks, fm, rgb, z_rgb, counted_encode, z_image=z_image)
        elif state["vae"] == "latents":  # every step a sparse task's: the worst case
            z_c = vae.encode(condition_video(rgb, fm))
        elif state["vae"] == "pixels":
            zr, zx, z_c = vae.encode_many([rgb, xyz, condition_video(rgb, fm)])
        else:
            z_c = z_rgb
        ev.mark("vae")
        context, clip = conditioning(rgb, fm)
        ev.mark("cond")
        loss = denoising_loss(engine, zr, zx, m4, z_c, context, clip, latent_valid, cfg.flow, g, dtype)["loss"]
        ev.mark("dit_fwd")
        engine.backward(loss)
        ev.mark("dit_bwd")
        with torch.profiler.record_function("optimizer_step"):
            engine.step()
        ev.mark("optimizer")
        state["loss"] = loss.detach()
        return ev

    from one4d_train.model.compile import compile_blocks, is_compiled, uncompile_blocks
    from one4d_train.model.offload import apply_activation_offload

    from one4d_train.model.dlc import set_lora_kernel

    m = cfg.model
    last_ckpt = (m.activation_checkpointing + (f"@{m.activation_checkpointing_blocks}"
                                               if m.activation_checkpointing_blocks >= 0 else ""),
                 m.activation_checkpointing_unit)
    compiled_as, last_lora = None, cfg.model.lora_kernel
    for v in variants:
        v["lora"] = v["lora"] or cfg.model.lora_kernel
        if v["lora"] != last_lora:
            set_lora_kernel(model, v["lora"])
            compiled_as, last_lora = None, v["lora"]  # compiled again below, on the new kernel
        ckpt = (v["ckpt"] or last_ckpt[0], v["unit"] or last_ckpt[1])
        if ckpt != last_ckpt:
            uncompile_blocks(model.base.blocks)  # checkpointing wraps the uncompiled call; compiled again below
            set_checkpointing(model.base.blocks, *ckpt)
            last_ckpt = ckpt
        if v["attn"]:
            attn_mod.set_attention_backend(v["attn"])
        v["compile"] = v["compile"] or str(int(cfg.model.compile))  # unset: as the experiment config says
        v["offload"] = v["offload"] or (str(int(m.activation_offload)) + (
            f"@{m.activation_offload_blocks}" if m.activation_offload and m.activation_offload_blocks >= 0 else ""))
        if v["compile"] in COMPILE_MODES:
            if compiled_as != v["compile"] or not all(is_compiled(b) for b in model.base.blocks):
                uncompile_blocks(model.base.blocks)
                compile_blocks(model.base.blocks, **COMPILE_MODES[v["compile"]])
                compiled_as = v["compile"]
        elif v["compile"] == "0":
            uncompile_blocks(model.base.blocks)
        on, _, kept_from = v["offload"].partition("@")
        offload = apply_activation_offload(model, on == "1", blocks=int(kept_from or -1),
                                           huge_pages=v["hostmem"] == "thp")
        state["vae"] = v["vae"]
        row = {"kind": "ours", "preset": cfg.model.preset, "variant": v["name"],
               "ckpt": last_ckpt[0], "ckpt_unit": last_ckpt[1],
               "vae_frames_per_call": vae.frames_per_call if vae is not None else None,
               "vae_conv_kernel": vae.conv_kernel if vae is not None else None,
               "vae_videos_per_call": vae.chunk_size if vae is not None else None, "attn": attn_mod.get_attention_backend(),
               "vae": v["vae"], "compile": v["compile"], "offload": v["offload"], "hostmem": v["hostmem"], "zero_stage": cfg.train.zero_stage,
               "persistence": cfg.train.zero3_param_persistence_threshold, "lever": args.lever,
               "base_matmul": cfg.model.base_matmul, "lora_kernel": v["lora"], "encoders_gb": encoders_gb,
               "encoders_held": [type(e).__name__.removesuffix("Model") for e in encoders],
               "ckpt_blocks": sum(hasattr(b, "_checkpoint_mode") for b in model.base.blocks),
               "flops": flops, "trainable": n_trainable, "build_s": build_s}
        if v["vae"] == "latents":  # stored latents: only the sparse task's condition is encoded live in training
            row["p_live_encode"] = live_encode_share(cfg.model.umc)
        row["conditioning"] = [name for name, on in (("text", conditioning.text), ("image", conditioning.image)) if on]
        try:
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            counts: dict = {}
            draws.manual_seed(0)  # each variant's draws the same, whatever ran before it
            if v["vae"] == "mix":  # the encoder compiled and warm whatever the warm-up draws
                vae.encode(condition_video(rgb, frame_mask))
                sync(device)
            n = int(v["n"] or args.steps)
            walls, spans = timed_loop(step, args.warmup, n, device, counts, on_timed=lambda: state.update(encodes=0))
            row.update(summarise(walls, spans))
            if v["vae"] == "mix":  # the timed steps' draws, after the warm-up's
                tasks = state["tasks"][-len(walls):]
                row.update(task_mix(walls, tasks, cfg.model.umc), mix_encodes=state["encodes"], walls=walls)
                encoding = [i for i, t in enumerate(tasks) if not fixed_per_clip(t)]
                if encoding:  # step s and its spans: the encoding steps' (the worst case, as vae=latents rows)
                    row.update(summarise([walls[i] for i in encoding], [spans[i] for i in encoding]))
            state["tasks"] = []
            row.update({f"alloc_{k.removeprefix('num_')}": n for k, n in counts.items()})
            if device.type == "cuda":
                row["reserved_by_stream_gb"] = reserved_by_stream(device, offload)  # after the timed steps
                row["alloc_conf"] = os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")
            row["loss"] = float(state["loss"])
            if offload is not None:  # before the profiled step, which would add to the count
                row["offload_gb_per_step"] = offload.stats.bytes / 1e9 / (args.warmup + row["steps"])
                row["offload_kept_gb_per_step"] = offload.stats.kept_bytes / 1e9 / (args.warmup + row["steps"])
                row["offload_blocks"] = offload.blocks
                row["offload_host_gb"] = offload.host_bytes / 1e9  # its page-locked buffers
            if args.profile:
                profile_step(step, device)
            if device.type == "cuda":
                row["peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
                row["peak_reserved_gb"] = torch.cuda.max_memory_reserved() / 1e9
        except torch.OutOfMemoryError as exc:
            row["error"] = "OOM: " + str(exc).splitlines()[0][:160]
            engine.optimizer.zero_grad() if hasattr(engine.optimizer, "zero_grad") else None
        except Exception as exc:  # record and go on with the next variant
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            import traceback
            traceback.print_exc()
        record(args.results, row)
        if "error" in row and row["error"].startswith("OOM"):
            torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------- peer baseline

PEER_CONFIGS = {
    "1.3b": dict(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30),
    "14b": dict(num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, num_layers=40),
    "tiny": dict(num_attention_heads=4, attention_head_dim=16, ffn_dim=128, num_layers=3, text_dim=64),
}


def peer_rank(preset: str) -> int:
    return 8 if preset == "tiny" else 64


def peer_flops(preset: str, args, attention_backward_factor: float = 2.5) -> float:
    from one4d_train.model.flops import FlopShape, training_flops_per_sample
    from one4d_train.model.presets import wan_config
    c = wan_config(preset, has_image_input=False)
    t, h, w = latent_shape(args)
    shape = FlopShape(dim=c.dim, ffn_dim=c.ffn_dim, num_layers=c.num_layers, tokens=t * (h // 2) * (w // 2))
    targets = ["self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k",
               "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2"]
    return training_flops_per_sample(shape, lora_rank=peer_rank(preset), lora_targets=targets,
                                     xyz_patch_embedding=False, attention_backward_factor=attention_backward_factor)


def build_peer(preset: str, device: torch.device):
    """The peer model and its trainable LoRA parameters, ready to train."""
    from diffusers import WanTransformer3DModel
    from peft import LoraConfig

    cfg = dict(PEER_CONFIGS[preset])
    text_dim = cfg.pop("text_dim", TEXT_DIM)
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # build the base in bf16 directly on the device (14B fits only so)
    with torch.device(device):
        model = WanTransformer3DModel(in_channels=36, out_channels=16, text_dim=text_dim, **cfg)
    torch.set_default_dtype(old)
    model.requires_grad_(False)
    rank = peer_rank(preset)
    model.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=True, target_modules=PEER_TARGETS))
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    for p in lora:
        p.data = p.data.float()
        p.requires_grad_(True)
    model.enable_gradient_checkpointing()
    model.train()
    return model, lora


def run_peer(args) -> None:
    device = torch.device(args.device)
    text_dim = PEER_CONFIGS[args.preset].get("text_dim", TEXT_DIM)
    t0 = time.perf_counter()
    model, lora = build_peer(args.preset, device)
    build_s = time.perf_counter() - t0
    opt = torch.optim.AdamW(lora, lr=1e-4, fused=device.type == "cuda")
    g = torch.Generator(device=device)
    g.manual_seed(0)
    t_lat, h, w = latent_shape(args)
    x0 = torch.randn(2, 16, t_lat, h, w, device=device, generator=g)  # RGB and XYZ latents as a batch of 2
    cond = torch.randn(2, 20, t_lat, h, w, device=device, generator=g)
    ctx = torch.randn(2, TEXT_LEN, text_dim, device=device, generator=g, dtype=torch.bfloat16)

    def step():
        ev = Events(device)
        ev.mark("start")
        s = torch.rand(1, device=device, generator=g).expand(2)
        noise = torch.randn(x0.shape, device=device, generator=g)
        xt = (1 - s.view(-1, 1, 1, 1, 1)) * x0 + s.view(-1, 1, 1, 1, 1) * noise
        inp = torch.cat([xt, cond], 1).to(torch.bfloat16)
        ev.mark("vae_cond")
        with torch.autocast(device.type, dtype=torch.bfloat16):
            pred = model(hidden_states=inp, timestep=s * 1000, encoder_hidden_states=ctx, return_dict=False)[0]
        loss = (pred.float() - (noise - x0)).pow(2).mean()
        ev.mark("dit_fwd")
        loss.backward()
        ev.mark("dit_bwd")
        opt.step()
        opt.zero_grad(set_to_none=True)
        ev.mark("optimizer")
        return ev

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    row = {"kind": "peer", "preset": args.preset, "variant": "diffusers+peft", "vae": "none",
           "flops": peer_flops(args.preset, args), "trainable": sum(p.numel() for p in lora), "build_s": build_s}
    try:
        walls, spans = timed_loop(step, args.warmup, args.steps, device)
        row.update(summarise(walls, spans))
        if device.type == "cuda":
            row["peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
    except torch.OutOfMemoryError as exc:
        row["error"] = "OOM: " + str(exc).splitlines()[0][:160]
    record(args.results, row)


# ------------------------------------------------------------------------------------------------------ report

def mix_note(r: dict) -> str:
    n, k = len(r["mix_tasks"]), r["mix_encode_steps"]
    if "mix_s" not in r:
        return f" mix: {k} of {n} steps encode, no figure (a group empty)"
    few = " (few)" if min(k, n - k) < MIN_MIX_GROUP else ""
    return f" mix measured: {k} of {n} steps encode{few}"


def report(paths: list[str], peer_ref: dict[str, float] | None = None) -> str:
    """The table. `peer_ref` {preset: s/step}: peer step times from elsewhere (same GPU kind), used only where this
    run has no peer row; such speed-ups are marked '*'."""
    rows = []
    for p in paths:
        if os.path.exists(p):
            rows += [json.loads(line) for line in open(p) if line.strip()]
    matmul = next((r["tflops"] for r in rows if r.get("kind") == "matmul"), None)
    peer = {r["preset"]: r for r in rows if r.get("kind") == "peer" and "step_s" in r}
    lines = []
    head = rows[0] if rows else {}
    runs = sorted({(r.get("date", "?")[:13], r.get("commit", "?")) for r in rows})
    if len(runs) > 1:
        lines.append("rows from several runs: " + "; ".join(f"{d}h commit {c}" for d, c in runs))
    lines.append(f"device: {head.get('device', '?')} | date: {head.get('date', '?')} | commit: {head.get('commit', '?')}"
                 + (f" | bf16 matmul 8192^3: {matmul:.0f} TFLOP/s" if matmul else " | bf16 matmul: not measured in this run"))
    fp8 = next((r["tflops"] for r in rows if r.get("kind") == "matmul_fp8"), None)
    if fp8:
        lines.append(f"fp8 row-wise matmul 8192^3 (model.base_matmul=fp8's product): {fp8:.0f} TFLOP/s")
    for r in rows:
        if r.get("kind") == "attention":
            fwd = f", {r['tflops_fwd']:.0f} fwd" if "tflops_fwd" in r else ""
            kind = "SDPA " if r["backend"] in ("cudnn", "flash", "efficient") else ""
            shape = r.get("shape", "self")  # rows from before the cross shapes were timed: self-attention
            b, sq, sk, h, d = ATTN_SHAPES[shape]
            where = f"{shape}: {b}x{sq} x {sk} keys, {h}x{d}"
            lines.append(f"{kind}{r['backend']}: " + (f"{r['tflops_fwd_bwd']:.0f} TFLOP/s fwd+bwd{fwd} ({where})"
                                                      if "tflops_fwd_bwd" in r else f"{r.get('error', '')} ({where})"))
    vae_tflop = {r["videos"]: r["flops"] / 1e12 for r in rows if r.get("kind") == "vae_flops"}
    for name, tf in vae_tflop.items():
        lines.append(f"VAE encode FLOPs ({name}): {tf:.1f} TFLOP")
    for r in rows:
        if r.get("kind") == "vae_error":
            lines.append(f"VAE encode ({r['videos']}): {r['error']}")
        if r.get("kind") == "vae":
            rate = f", {r['tflops']:.0f} TFLOP/s" if "tflops" in r else ""
            peak = f", peak {r['peak_gb']:.1f} GB" if r.get("peak_gb") else ""
            diff = (f", latents vs first row {r['rel_to_first']:.1e}, vs fp32 {r['rel_to_fp32']:.1e}"
                    if "rel_to_fp32" in r else "")
            lines.append(f"VAE encode ({r['videos']}): {r['encode_s']:.3f} s{rate}{peak}{diff}")
    cols = ["preset", "who", "variant", "step s", "samples/s", "PFLOP", "MFU989", "MFUmm", "DiT MFU", "peak GB", "vae/cond",
            "fwd", "bwd", "optim", "data", "x peer", "x peer DiT", "mix s", "mix MFU", "x peer mix", "note"]
    table = []
    for r in rows:
        if r.get("kind") not in ("ours", "peer"):
            continue
        who = "peer" if r["kind"] == "peer" else f"z{r.get('zero_stage')}" + (f"/{r['lever']}" if r.get("lever") else "")
        if r.get("base_matmul", "bf16") != "bf16":
            who += f" [{r['base_matmul']} base]"
        if "step_s" not in r:
            table.append([r["preset"], who, r["variant"], "-", "-", f"{r['flops'] / 1e15:.3f}", "-", "-", "-", "-", "-", "-",
                          "-", "-", "-", "-", "-", "-", "-", "-", r.get("error", "")[:60]])
            continue
        step = r["step_s"]
        dit = r["dit_fwd_s"] + r["dit_bwd_s"]
        mfu = r["flops"] / step / H100_PEAK
        mfu_mm = r["flops"] / step / (matmul * 1e12) if matmul else float("nan")
        p = peer.get(r["preset"])
        ref = p["step_s"] if p else (peer_ref or {}).get(r["preset"])
        speed = ref / step if ref and r["kind"] == "ours" else float("nan")
        mark = "" if p else "*"
        # like for like: the peer step encodes nothing, so compare DiT forward + backward + optimizer on both sides
        dit_step = lambda x: x["dit_fwd_s"] + x["dit_bwd_s"] + x["optimizer_s"]  # noqa: E731
        speed_dit = dit_step(p) / dit_step(r) if p and r["kind"] == "ours" else float("nan")
        # the step averaged over the UMC task mix: measured where each step drew its task (vae=mix); derived for
        # vae=latents, whose timed step encodes a condition every time where training with stored latents does so
        # only for the fraction p_live_encode of samples (the sparse task)
        if "mix_s" in r:
            mix = r["mix_s"]
        elif r.get("vae") != "mix" and "p_live_encode" in r:  # less the VAE's share (all before the DiT in old rows)
            mix = step - r.get("vae_s", r["vae_cond_s"]) * (1 - r["p_live_encode"])
        else:
            mix = float("nan")
        speed_mix = ref / mix if ref and mix == mix and r["kind"] == "ours" else float("nan")
        held = f" ({'+'.join(r['encoders_held'])})" if r.get("encoders_held") else ""
        table.append([r["preset"], who, r["variant"], f"{step:.3f}", f"{1 / step:.3f}", f"{r['flops'] / 1e15:.3f}",
                      f"{100 * mfu:.1f}%",
                      f"{100 * mfu_mm:.1f}%" if matmul else "-", f"{100 * r['flops'] / dit / H100_PEAK:.1f}%",
                      f"{r['peak_gb']:.1f}" if "peak_gb" in r else "-", f"{r['vae_cond_s']:.3f}", f"{r['dit_fwd_s']:.3f}",
                      f"{r['dit_bwd_s']:.3f}", f"{r['optimizer_s']:.3f}", "0", f"{speed:.2f}x{mark}" if speed == speed else "-",
                      f"{speed_dit:.2f}x" if speed_dit == speed_dit else "-",
                      f"{mix:.3f}" if mix == mix else "-", f"{100 * r['flops'] / mix / H100_PEAK:.1f}%" if mix == mix else "-",
                      f"{speed_mix:.2f}x{mark}" if speed_mix == speed_mix else "-",
                      f"n={r['steps']}{'' if r['steps'] >= MIN_TIMED_STEPS else ' (too few)'}"
                      f" [{r['step_s_min']:.3f},{r['step_s_max']:.3f}]"
                      + (mix_note(r) if "mix_tasks" in r else "")
                      + (f" host {r['offload_gb_per_step']:.1f} GB" if "offload_gb_per_step" in r else "")
                      + (f" kept {r['offload_kept_gb_per_step']:.1f} GB" if r.get("offload_kept_gb_per_step") else "")
                      + (f" ({r['offload_host_gb']:.1f} held)" if "offload_host_gb" in r else "")
                      + (" thp" if r.get("hostmem") == "thp" else "")
                      + (f" retries {r['alloc_alloc_retries']}" if "alloc_alloc_retries" in r else "")
                      + (f" reserved {r['peak_reserved_gb']:.1f} GB" if r.get("peak_reserved_gb") else "")
                      + (f" enc {r['encoders_gb']:.1f} GB" + held if r.get("encoders_gb") else "")
                      + (f" features: {'+'.join(r['conditioning']) or 'fixed'}" if "conditioning" in r else "")])
    widths = [max(len(str(x)) for x in col) for col in zip(cols, *table)] if table else [len(c) for c in cols]
    fmt = lambda row: " | ".join(str(x).ljust(w) for x, w in zip(row, widths))  # noqa: E731
    lines.append(fmt(cols))
    lines.append("-+-".join("-" * w for w in widths))
    lines += [fmt(row) for row in table]
    lines.append("MFU989 = model FLOPs / step / 989 TFLOP/s; MFUmm = against the matmul rate above; DiT MFU = model "
                 "FLOPs / (DiT fwd + bwd time); x peer = peer step time / our step time (samples/s ratio, 1 sample = "
                 "RGB + XYZ of one clip); x peer DiT = the same for DiT fwd + bwd + optimizer alone (like for like: the peer "
                 "step encodes no condition); mix s / mix MFU = the step averaged over the UMC task mix with stored latents "
                 "(only sparse-task samples encode a condition): measured on vae=mix rows, whose steps each draw their task "
                 "as the trainer does ('mix measured: k of n steps encode': the mean step of the encoding and of the other "
                 f"tasks weighted by the configured probabilities; '(few)': a group under {MIN_MIX_GROUP} steps; their step s, "
                 "n and spans are the encoding steps', the worst case as on vae=latents rows), derived on vae=latents rows "
                 "(step - the VAE encode x (1 - p_sparse)); x peer mix = peer step time / mix s; vae/cond = all before the "
                 "DiT: the VAE encode, then the text/image features ('features: text' = UMT5 on a caption, 'image' = CLIP "
                 "on the first observed frame, 'fixed' = random ones; rows without the note, before 03d1a25: fixed; "
                 "rows before 9d4db94 held the noising too); [fp8 base] rows run the frozen "
                 "linears on FP8 tensor cores (their MFU still counts model FLOPs against the bf16 peak); '*' = against a peer time given with --peer-ref, not measured in this run. "
                 "enc X GB: the frozen text/image towers held on the GPU, in the peak (rows without it: the step alone). "
                 "retries N: the CUDA caching allocator's retries over the timed steps (each a wait for every stream and "
                 "a release of its free cache at the GPU's ceiling); reserved: its peak reserved memory; thp: the "
                 "offload's host buffers asked for huge pages. "
                 f"n = timed steps after warm-up, step s their median; '(too few)': fewer than {MIN_TIMED_STEPS}, "
                 "not a figure for the record. "
                 "data wait = 0: synthetic tensors on the GPU.")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=LEVER_HELP)
    ap.add_argument("--preset", default="1.3b", choices=["1.3b", "14b", "tiny"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--variants", default="ckpt=selective+vae=latents,vae=pixels,vae=none")
    ap.add_argument("--zero-stage", type=int, default=None, help="train.zero_stage (default: the config's)")
    ap.add_argument("--persistence", type=int, default=None, help="train.zero3_param_persistence_threshold")
    ap.add_argument("--set", action="append", help="extra config key=value (repeatable)")
    ap.add_argument("--no-encoders", dest="encoders", action="store_false",
                    help="leave the frozen text/image towers off the GPU (by default they are held there, at their "
                         "real sizes, so peak memory is a training run's)")
    ap.add_argument("--lever", default="", help="label for this process's rows")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=MIN_TIMED_STEPS,
                    help=f"timed steps after the warm-up (default {MIN_TIMED_STEPS}; the table marks rows with fewer)")
    ap.add_argument("--results", default=None, help="append JSON lines here")
    ap.add_argument("--matmul", action="store_true")
    ap.add_argument("--vae", action="store_true")
    ap.add_argument("--profile", action="store_true", help="profile one extra step per variant (table in the log)")
    ap.add_argument("--vae-levers", nargs="?", const="", default=None, metavar="FILTER",
                    help="with --vae: condition encode per VAE setting (those whose name holds one of the comma-separated FILTER parts)")
    ap.add_argument("--peer", action="store_true")
    ap.add_argument("--report", nargs="*", default=None, help="print the table of these result files")
    ap.add_argument("--peer-ref", default="", help="preset=s/step,... peer times for presets without a peer row")
    args = ap.parse_args(argv)
    if args.report is not None:
        ref = {k: float(v) for k, v in (x.split("=") for x in args.peer_ref.split(",") if x)}
        print(report(args.report, ref))
    elif args.matmul:
        bench_matmul(args)
    elif args.vae:
        bench_vae(args)
    elif args.peer:
        run_peer(args)
    else:
        run_ours(args)


if __name__ == "__main__":
    main()
