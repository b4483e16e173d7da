"""The Triton kernel of the VAE encoder's causal convolutions (model/vae_conv.py, `model.vae_conv_kernel=triton`):
exact against F.conv3d in Triton's CPU interpreter (fp32 and fp16; the interpreter has no bf16 arithmetic), and
refused by key where it cannot run. The interpreter test needs Triton, which the CUDA builds of PyTorch bring and
the CPU build the test command installs does not: it runs on the GPU image and where `pip install triton` added
it, and is skipped (saying so) elsewhere. tests/test_gpu.py checks bf16 on the GPU."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from one4d_train.model import vae_conv

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_INTERPRETED = r"""
import sys, torch, torch.nn.functional as F
from one4d_train.model.vae_conv import causal_conv3d, gemm_weight, padded_channels, zero_channels
torch.manual_seed(0)
worst = 0.0
for c, n, t, cache_t, h, w, dtype in [(32, 96, 4, 2, 5, 7, torch.float32), (32, 96, 1, 0, 3, 4, torch.float32),
                                      (64, 32, 3, 1, 4, 9, torch.float32), (32, 48, 2, 2, 3, 3, torch.float16),
                                      (32, 128, 5, 2, 2, 3, torch.float16), (3, 96, 4, 2, 5, 7, torch.float32)]:
    x, cache = torch.randn(2, c, t, h, w).to(dtype), torch.randn(2, c, cache_t, h, w).to(dtype)
    weight, bias = (torch.randn(n, c, 3, 3, 3) * 0.1).to(dtype), torch.randn(n).to(dtype)
    k = padded_channels(c)  # 3 RGB channels as the first encoder convolution runs them: padded to 32
    got = causal_conv3d(zero_channels(x, k), zero_channels(cache, k), gemm_weight(weight, k), bias)
    full = torch.cat([torch.zeros(2, c, 2 - cache_t, h, w, dtype=dtype), cache, x], 2)
    want = F.conv3d(F.pad(full.float(), (1, 1, 1, 1)), weight.float(), bias.float())
    assert got.shape == want.shape and got.dtype == dtype, (got.shape, want.shape, got.dtype)
    assert got.is_contiguous(memory_format=torch.channels_last_3d)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    err = ((got.float() - want).abs().max() / want.abs().max()).item()
    assert err < tol, (c, n, t, cache_t, dtype, err)
    worst = max(worst, err)
print("worst", worst)
"""


def test_kernel_matches_conv3d_in_the_triton_interpreter():
    """Every output frame (the first two read the cache and the zero frames before it, the rest x in place), the
    zero border, 96 = 64 + 32 output channels as two products, one product (32, 128) and 48 = 32 + 16."""
    pytest.importorskip("triton", reason="Triton is not installed (the CPU build of PyTorch brings none)")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": ROOT}
    proc = subprocess.run([sys.executable, "-c", _INTERPRETED], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "worst" in proc.stdout


def test_supported_convolutions_and_output_splits():
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

    assert vae_conv._split(96) == (64, 32) and vae_conv._split(128) == (128, 0) and vae_conv._split(384) == (256, 128)
    assert vae_conv._split(80) is None and vae_conv._split(8) is None
    if vae_conv.triton is None:
        assert vae_conv.supported(WanCausalConv3d(96, 96, 3, padding=1)) == "Triton is not installed"
        return
    assert vae_conv.supported(WanCausalConv3d(96, 96, 3, padding=1)) is None
    assert vae_conv.supported(WanCausalConv3d(3, 96, 3, padding=1)) is None  # run with its input padded to 32
    assert "kernel" in vae_conv.supported(WanCausalConv3d(96, 96, (3, 1, 1), padding=(1, 0, 0)))
    assert "output channels" in vae_conv.supported(WanCausalConv3d(96, 80, 3, padding=1))


def test_gemm_weight_orders_rows_as_the_kernel_reads_them():
    w = torch.randn(6, 4, 3, 3, 3)
    kn = vae_conv.gemm_weight(w)
    assert kn.shape == (27 * 4, 6)
    dt, dh, dw, c = 2, 0, 1, 3
    assert torch.equal(kn[((dt * 3 + dh) * 3 + dw) * 4 + c], w[:, c, dt, dh, dw])


def test_input_channels_are_zero_padded_to_the_kernels_multiple_of_32():
    """A convolution with input channels that are not a multiple of 32 (the encoder's first, on 3 RGB channels)
    runs as one on 32: zero rows in the weight's GEMM layout, zero channels after the input's, channels-last."""
    assert [vae_conv.padded_channels(c) for c in (1, 3, 32, 33, 96)] == [32, 32, 32, 64, 96]
    w = torch.randn(6, 3, 3, 3, 3)
    kn, plain = vae_conv.gemm_weight(w, 32), vae_conv.gemm_weight(w)
    assert kn.shape == (27 * 32, 6) and plain.shape == (27 * 3, 6)
    rows = kn.view(27, 32, 6)
    assert torch.equal(rows[:, :3], plain.view(27, 3, 6)) and not rows[:, 3:].any()
    x = torch.randn(2, 3, 4, 5, 7)
    padded = vae_conv.zero_channels(x, 32)
    assert padded.shape == (2, 32, 4, 5, 7) and padded.is_contiguous(memory_format=torch.channels_last_3d)
    assert torch.equal(padded[:, :3], x) and not padded[:, 3:].any()


def test_the_kernel_is_refused_where_it_cannot_run():
    """On the CPU, in fp32 or without Triton: a ValueError naming the setting from WanVAE, and a problem naming
    model.vae_conv_kernel from the training preflight."""
    from one4d_train.config import load_config
    from one4d_train.model.vae import WanVAE, conv_kernel_problem, tiny_wan_vae
    from one4d_train.train.one4d_task import One4DTask

    assert conv_kernel_problem("cudnn", "cpu", torch.float32) is None
    assert "CUDA" in conv_kernel_problem("triton", "cpu", torch.bfloat16)
    assert "bf16 or fp16" in conv_kernel_problem("triton", "cuda", torch.float32)
    assert "cudnn or triton" in conv_kernel_problem("cutlass", "cuda", torch.bfloat16)
    with pytest.raises(ValueError, match="conv_kernel=triton: the Triton kernel runs on CUDA devices"):
        WanVAE(tiny_wan_vae(0), conv_kernel="triton")
    cfg = load_config(["model.vae_conv_kernel=triton", "train.device=cpu"])
    assert "model.vae_conv_kernel" in [k for k, _ in One4DTask.config_problems(cfg)]
    with pytest.raises(Exception, match="vae_conv_kernel"):
        load_config(["model.vae_conv_kernel=cutlass"])
