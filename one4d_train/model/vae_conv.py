"""The Wan VAE encoder's causal 3x3x3 convolutions as one Triton implicit-GEMM kernel (`model.vae_conv_kernel=triton`).

At One4D's clip size the encoder's full-resolution level (96 channels at 352x624) takes a third of the condition
encode, and cuDNN runs it with an Ampere-generation kernel at ~240 TFLOP/s on Hopper (benchmarks/PERF_NOTES.md).
This kernel computes the same convolution as a GEMM of M = output pixels (a tile of rows x columns per
program), N = output channels (as a 64- and a 32-wide product for the VAE's 96, so no tile is wasted on padding),
K = 27 taps x input channels, reading its input in place: the spatial zero border comes from the loads' masks,
and only the first two output frames read a small copy (the cache frames, or zeros, and x's first two frames),
so diffusers' `cat` + `F.pad` copy of the whole activation is not made. Inputs in bf16/fp16, channels-last (`channels_last_3d`), accumulation
in fp32, bias added in fp32.

Exactness against `F.conv3d` is tested in Triton's interpreter on the CPU (tests/test_vae_conv.py) and on the GPU.
"""
from __future__ import annotations

import os

import torch

try:  # Triton ships with the CUDA builds of PyTorch; the CPU builds have none
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where Triton is absent
    triton = None

CACHE_T = 2  # frames a causal 3x3x3 convolution carries across calls (diffusers' CACHE_T)
K_CHANNELS = 32  # input channels per step of the kernel's K loop (its BLOCK_K)


def supported(conv: torch.nn.Conv3d) -> str | None:
    """Why `conv` cannot run on the kernel, or None: a causal 3x3x3, stride 1, spatial padding 1 convolution whose
    output channels are a power of two >= 16, or one plus half of it (96 = 64 + 32). The kernel reads input channels
    32 at a time; a convolution with fewer or another number (the encoder's first, on 3 RGB channels) runs with its
    input and weight zero-padded up to a multiple of 32 (`_TritonCausalConv`)."""
    if triton is None:
        return "Triton is not installed"
    if tuple(conv.kernel_size) != (3, 3, 3) or tuple(conv.stride) != (1, 1, 1) or conv.groups != 1:
        return f"kernel {tuple(conv.kernel_size)}, stride {tuple(conv.stride)}, groups {conv.groups}"
    if tuple(getattr(conv, "_padding", ())) != (1, 1, 1, 1, 2, 0):
        return "not a causal convolution with a one-pixel spatial border"
    if conv.bias is None:
        return "no bias (the kernel adds one)"
    if _split(conv.out_channels) is None:
        return f"{conv.out_channels} output channels"
    return None


def _split(n: int) -> tuple[int, int] | None:
    """Output channels as one or two power-of-two products: 96 -> (64, 32), 128 -> (128, 0)."""
    for first in (256, 128, 64, 32, 16):
        if n == first:
            return first, 0
        if n == first + first // 2:
            return first, first // 2
    return None


# (BLOCK_H, BLOCK_W, warps, stages) tried by the autotuner per shape: tiles of BLOCK_H output rows x BLOCK_W pixels
# (taller tiles reuse each input row for up to three output rows from cache); Triton's CPU interpreter runs one
# small two-row tile, which partial tiles at both edges of the test shapes exercise
_CONFIGS = ((1, 128, 4, 4), (1, 128, 8, 4), (2, 64, 4, 4), (2, 128, 8, 4), (4, 64, 8, 4))
if triton is not None:
    @triton.autotune(
        configs=[triton.Config({"BLOCK_H": bh, "BLOCK_W": bw, "BLOCK_K": K_CHANNELS}, num_warps=w, num_stages=s)
                 for bh, bw, w, s in (((2, 16, 4, 1),) if os.environ.get("TRITON_INTERPRET") == "1" else _CONFIGS)],
        key=["C", "N1", "N2", "HAS_N2", "H", "W", "FRAMES_CLASS"])
    @triton.jit
    def _conv3d_kernel(x_ptr, w_ptr, bias_ptr, y_ptr, T, H, W, sxb, sxt, sxh, sxw, syb, syt, syh, syw, FRAMES_CLASS,
                       C: tl.constexpr, N1: tl.constexpr, N2: tl.constexpr, HAS_N2: tl.constexpr,
                       BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_K: tl.constexpr):
        """y[b, :, t, h, w] = bias + sum over (dt, dh, dw, c) of x[b, c, t + dt, h + dh - 1, w + dw - 1] w[.., c, dt, dh, dw]:
        T + 2 input frames give T output frames; the spatial border is zero (masked loads). One program: a tile of
        BLOCK_H rows x BLOCK_W pixels of one output frame, all output channels."""
        BLOCK_M: tl.constexpr = BLOCK_H * BLOCK_W
        row = tl.program_id(0)  # (b, t, first row of the tile): the grid's first axis, which takes 2^31 - 1 blocks
        pid_w = tl.program_id(1)
        h_tiles = tl.cdiv(H, BLOCK_H)
        h0 = (row % h_tiles) * BLOCK_H
        t = ((row // h_tiles) % T).to(tl.int64)
        b = (row // (h_tiles * T)).to(tl.int64)
        offs_m = tl.arange(0, BLOCK_M)
        oh = h0 + offs_m // BLOCK_W  # output row and column of each tile pixel
        ow = pid_w * BLOCK_W + offs_m % BLOCK_W
        offs_k = tl.arange(0, BLOCK_K)
        offs_n1 = tl.arange(0, N1)
        acc1 = tl.zeros((BLOCK_M, N1), dtype=tl.float32)
        offs_n2 = N1 + tl.arange(0, N2)  # N2 is a valid width (16) even where HAS_N2 is off
        acc2 = tl.zeros((BLOCK_M, N2), dtype=tl.float32)
        x_frame = x_ptr + b * sxb + t * sxt
        steps_per_tap: tl.constexpr = C // BLOCK_K
        for step in range(27 * steps_per_tap):
            tap = step // steps_per_tap
            c0 = (step % steps_per_tap) * BLOCK_K
            hs = oh + (tap // 3) % 3 - 1
            ws = ow + tap % 3 - 1
            inside = (hs >= 0) & (hs < H) & (ws >= 0) & (ws < W)
            a_ptrs = x_frame + (tap // 9) * sxt + (hs * sxh + ws * sxw)[:, None] + (c0 + offs_k)[None, :]
            a = tl.load(a_ptrs, mask=inside[:, None] & (offs_k[None, :] < BLOCK_K), other=0.0)
            k_rows = (tap * C + c0 + offs_k)[:, None] * (N1 + N2 * HAS_N2)
            acc1 = tl.dot(a, tl.load(w_ptr + k_rows + offs_n1[None, :]), acc1)
            if HAS_N2:
                acc2 = tl.dot(a, tl.load(w_ptr + k_rows + offs_n2[None, :]), acc2)
        out_mask = ((oh < H) & (ow < W))[:, None]
        y_tile = y_ptr + b * syb + t * syt + (oh * syh + ow * syw)[:, None]
        acc1 += tl.load(bias_ptr + offs_n1).to(tl.float32)[None, :]
        tl.store(y_tile + offs_n1[None, :], acc1.to(y_ptr.dtype.element_ty), mask=out_mask)
        if HAS_N2:
            acc2 += tl.load(bias_ptr + offs_n2).to(tl.float32)[None, :]
            tl.store(y_tile + offs_n2[None, :], acc2.to(y_ptr.dtype.element_ty), mask=out_mask)


def padded_channels(channels: int) -> int:
    """Input channels as the kernel reads them: `channels` zero-padded up to a multiple of K_CHANNELS."""
    return -(-channels // K_CHANNELS) * K_CHANNELS


def gemm_weight(weight: torch.Tensor, channels: int | None = None) -> torch.Tensor:
    """[N, C, 3, 3, 3] -> [27 C', N], rows in the kernel's K order (dt, dh, dw, input channel), C' = `channels`
    (default C): input channels past C get zero rows."""
    n, c = weight.shape[:2]
    if channels is not None and channels > c:
        weight = torch.cat([weight, weight.new_zeros(n, channels - c, *weight.shape[2:])], 1)
    return weight.permute(2, 3, 4, 1, 0).reshape(-1, n).contiguous()


def zero_channels(t: torch.Tensor, channels: int) -> torch.Tensor:
    """t [B, C, T, H, W] followed by zero channels up to `channels`, channels-last (the kernel's layout)."""
    out = torch.empty((t.shape[0], channels, *t.shape[2:]), dtype=t.dtype, device=t.device,
                      memory_format=torch.channels_last_3d)
    out[:, t.shape[1]:] = 0
    out[:, :t.shape[1]] = t
    return out


def _launch(x: torch.Tensor, weight_kn: torch.Tensor, bias: torch.Tensor, y: torch.Tensor) -> None:
    """y's T frames from x's T + 2 (both channels-last)."""
    bsz, c, t, h, w = y.shape[0], x.shape[1], y.shape[2], y.shape[3], y.shape[4]
    n1, n2 = _split(weight_kn.shape[1])
    # (b, t, row tiles) on the first axis: 3 videos x 78 frames x 352 rows passed the second axis' 65,535 blocks
    grid = lambda meta: (bsz * t * triton.cdiv(h, meta["BLOCK_H"]), triton.cdiv(w, meta["BLOCK_W"]))  # noqa: E731
    _conv3d_kernel[grid](x, weight_kn, bias, y, t, h, w, x.stride(0), x.stride(2), x.stride(3), x.stride(4),
                         y.stride(0), y.stride(2), y.stride(3), y.stride(4), frames_class(bsz * t),
                         C=c, N1=n1, N2=n2 or 16, HAS_N2=n2 > 0)


def frames_class(frames: int) -> int:
    """The autotuner's bucket of a launch's output frames (videos x frames): a config tuned on the one or two
    frames of an encoder's first call, or of a call's first frames, is not the best for its bulk of 8 or 80."""
    return 0 if frames <= 2 else 1 if frames <= 16 else 2


@torch.library.custom_op("one4d::causal_conv3d", mutates_args=())
def causal_conv3d(x: torch.Tensor, cache: torch.Tensor, weight_kn: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """A causal 3x3x3 convolution, stride 1, one-pixel zero border: x [B, C, T, H, W] after the `cache` frames
    [B, C, 0..2, H, W] (zero frames before those), weight in `gemm_weight`'s layout, bias ->
    [B, N, T, H, W] channels-last in x's dtype (bias added in fp32). The first two output frames read a small copy of the cache and
    x's first frames; the rest read x in place."""
    bsz, c, t, h, w = x.shape
    x = x.contiguous(memory_format=torch.channels_last_3d)
    y = torch.empty((bsz, weight_kn.shape[1], t, h, w), device=x.device, dtype=x.dtype,
                    memory_format=torch.channels_last_3d)
    if t > CACHE_T:
        _launch(x, weight_kn, bias, y[:, :, CACHE_T:])
    head = min(CACHE_T, t)
    zeros = x.new_zeros((bsz, c, CACHE_T - cache.shape[2], h, w))
    front = torch.cat([zeros, cache.to(x.dtype), x[:, :, :head]], 2).contiguous(memory_format=torch.channels_last_3d)
    _launch(front, weight_kn, bias, y[:, :, :head])
    return y


@causal_conv3d.register_fake
def _(x, cache, weight_kn, bias):
    bsz, _, t, h, w = x.shape
    return x.new_empty((bsz, weight_kn.shape[1], t, h, w)).contiguous(memory_format=torch.channels_last_3d)


class _TritonCausalConv:
    """A `WanCausalConv3d` whose forward runs `causal_conv3d`. Its weight, bias and state dict stay the
    checkpoint's; the frozen weight's GEMM layout is a non-persistent buffer (`_weight_kn`), made when the kernel
    is switched on, so it follows the module's `.to()` but is not saved. Input channels that are not a multiple of
    32 are zero-padded up to one, the input at each call and the weight's GEMM layout once: the encoder's first
    convolution (3 -> 96 channels at full resolution) on the kernel at 32 channels beats cuDNN's at 8 (H100, 80
    frames: 7.7 vs 23 ms)."""

    def forward(self, x, cache_x=None):
        cache = (x[:, :, :0] if cache_x is None else cache_x[:, :, -CACHE_T:]).to(x.device)
        channels = self._weight_kn.shape[0] // 27
        if x.shape[1] != channels:
            x, cache = zero_channels(x, channels), zero_channels(cache, channels)
        return causal_conv3d(x, cache, self._weight_kn, self.bias)


def use_triton_convs(module: torch.nn.Module) -> int:
    """Run every supported causal convolution under `module` on the kernel (after its weights are loaded: the
    GEMM layout is made from them now); returns how many."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d
    count = 0
    for conv in module.modules():
        if isinstance(conv, WanCausalConv3d) and not isinstance(conv, _TritonCausalConv) and supported(conv) is None:
            cls = type(conv)
            conv.__class__ = type(f"Triton{cls.__name__}", (_TritonCausalConv, cls), {})
            conv.register_buffer("_weight_kn", gemm_weight(conv.weight.detach(), padded_channels(conv.in_channels)),
                                 persistent=False)
            count += 1
    return count
