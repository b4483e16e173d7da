"""The one attention function of the model: q, k, v as [B, S, heads, head_dim], no mask, no dropout.

Backends: `fa4` (flash_attn.cute, the CuTe-DSL FlashAttention-4 package `flash-attn-4`), `fa3`
(flash_attn_interface), `fa2` (flash_attn), `cudnn` / `flash` / `efficient` (torch SDPA forced to one kernel), `math`
(SDPA math, the reference). `auto` picks per call: on CUDA with fp16/bf16 inputs, on Hopper and Blackwell fa4
when importable (measured on an H200 at the model's self-attention shape: 642-678 TFLOP/s forward + backward against
cuDNN's 540-546; level with cuDNN at the short-key cross-attentions), then
fa3 on Hopper, else SDPA with cuDNN first on Hopper and newer (~1.7x the flash kernel), then flash, then
memory-efficient; fp32 on CUDA goes to SDPA's own choice; CPU runs math.
"""
from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = ("auto", "fa4", "fa3", "fa2", "cudnn", "flash", "efficient", "math")
_SDPA = {
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}
_FLASH_MODULES = {"fa4": "flash_attn.cute", "fa3": "flash_attn_interface", "fa2": "flash_attn"}
_backend = "auto"
_flash_funcs: dict = {}  # backend name -> flash_attn_func, or None when the library is absent


def _flash_attn_func(name: str):
    if name not in _flash_funcs:
        try:
            _flash_funcs[name] = importlib.import_module(_FLASH_MODULES[name]).flash_attn_func
            if name == "fa4":  # the custom ops below call its kernel entry points, present since 4.0.0b36
                interface = importlib.import_module("flash_attn.cute.interface")
                interface._flash_attn_fwd, interface._flash_attn_bwd  # noqa: B018 - AttributeError: treated as absent
        except (ImportError, AttributeError):
            _flash_funcs[name] = None
        except Exception:  # noqa: BLE001 - a CuTe-DSL library that fails to load (OSError, RuntimeError): absent
            if name != "fa4":
                raise
            _flash_funcs[name] = None
    return _flash_funcs[name]


def backend_present(name: str, device: torch.device | str = "cuda") -> bool:
    """Whether `name` can run on `device` here (library importable, device kind right)."""
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if name in ("auto", "math"):
        return True
    if torch.device(device).type != "cuda" or not torch.cuda.is_available():
        return False
    if name in _FLASH_MODULES:
        return _flash_attn_func(name) is not None
    return True


def present_backends(device: torch.device | str = "cuda") -> list[str]:
    """Concrete backends (not `auto`) that can run on `device`."""
    return [b for b in BACKENDS[1:] if backend_present(b, device)]


def backend_problem(name: str) -> str | None:
    """Why the backend `name` cannot be forced here, or None (`auto` and `math` always can)."""
    if name in _FLASH_MODULES and _flash_attn_func(name) is None:
        return f"`{_FLASH_MODULES[name]}` is not importable"
    if name in BACKENDS[1:-1] and not torch.cuda.is_available():
        return "CUDA is not available"
    return None


def attention_problems(name: str, key: str = "model.attention") -> list[tuple[str, str]]:
    """`key` = `name` checked by key before a model is built (it failed in the first forward otherwise)."""
    if name not in BACKENDS:
        return []  # (ModelConfig's own check names the choices)
    problem = backend_problem(name)
    return [(key, f"{name} forced but {problem} here; `auto` picks the fastest backend present")] if problem else []


def set_attention_backend(name: str) -> None:
    """Force a backend for every later `attention` call (`ModelConfig.attention`); `auto` restores the default."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {', '.join(BACKENDS)}")
    problem = backend_problem(name)
    if problem:
        raise RuntimeError(f"attention backend {name!r} forced but {problem}")
    _backend = name


def get_attention_backend() -> str:
    return _backend


# evaluated once at trace time, so a compiled block has no graph break here
@torch.compiler.assume_constant_result
def _auto_choice(device_index: int) -> str:
    """`fa4`, `fa3` or the SDPA priority order (`cudnn` = cuDNN first) for half-precision inputs on this GPU."""
    major = torch.cuda.get_device_capability(device_index)[0]
    if major in (9, 10) and _flash_attn_func("fa4") is not None:  # FlashAttention-4's kernels: SM90 and SM100
        return "fa4"
    if major == 9 and _flash_attn_func("fa3") is not None:
        return "fa3"
    return "cudnn" if major >= 9 else "flash"


def _fa4_takes(head_dim: int) -> bool:
    """Head dims FlashAttention-4's kernels take on both SM90 and SM100 (multiples of 8 up to 128); others go to SDPA.
    Short key sequences stay with FA4 too: at the cross-attention shapes (512 text, 257 CLIP keys, 40 heads) it
    measured level with cuDNN on an H200 (forward + backward 381 vs 372 and 239 vs 231 TFLOP/s; the 14B step the
    same with either, benchmarks/RESULTS.md)."""
    return head_dim % 8 == 0 and 8 <= head_dim <= 128


_AUTO_SDPA = {
    "cudnn": [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH],
    "flash": [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH],
}


def _sdpa(q, k, v, backends: list[SDPBackend] | None) -> torch.Tensor:
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    if backends is None:
        out = F.scaled_dot_product_attention(q, k, v)
    else:
        with sdpa_kernel(backends, set_priority=len(backends) > 1):
            out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2)


# FlashAttention-4 as two custom ops: its autograd.Function calls CuTe-DSL kernels that torch.compile cannot trace,
# and a graph break inside a checkpointed, compiled block sends the whole block back to eager. As opaque ops with a
# shape function, forward and backward stay inside the block's graph.
@torch.library.custom_op("one4d::fa4_fwd", mutates_args=(), device_types="cuda")
def _fa4_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from flash_attn.cute.interface import _flash_attn_fwd
    out, lse = _flash_attn_fwd(q, k, v, return_lse=True)[:2]
    return out, lse


@_fa4_fwd.register_fake
def _(q, k, v):
    b, s, h, _ = q.shape
    return q.new_empty((b, s, h, v.shape[-1])), q.new_empty((b, h, s), dtype=torch.float32)


@torch.library.custom_op("one4d::fa4_bwd", mutates_args=(), device_types="cuda")
def _fa4_bwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, dout: torch.Tensor,
             lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from flash_attn.cute.interface import _flash_attn_bwd
    dq, dk, dv = _flash_attn_bwd(q, k, v, out, dout, lse)[:3]
    return dq, dk, dv


@_fa4_bwd.register_fake
def _(q, k, v, out, dout, lse):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _fa4_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs, *output)
    ctx.mark_non_differentiable(output[1])  # the log-sum-exp is for the backward kernel only


def _fa4_backward(ctx, dout, dlse):
    q, k, v, out, lse = ctx.saved_tensors
    return _fa4_bwd(q, k, v, out, dout.contiguous(), lse)


_fa4_fwd.register_autograd(_fa4_backward, setup_context=_fa4_setup)


def _flash(name: str, q, k, v) -> torch.Tensor:
    fn = _flash_attn_func(name)
    if fn is None:
        raise RuntimeError(f"attention backend {name!r} requested but `{_FLASH_MODULES[name]}` is not importable")
    if not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"attention backend {name!r} needs fp16/bf16 CUDA tensors, got {q.dtype} on {q.device}")
    if name == "fa4":
        return _fa4_fwd(q.contiguous(), k.contiguous(), v.contiguous())[0]
    out = fn(q, k, v)
    # flash_attn_interface versions differ in whether they also return the log-sum-exp
    return out[0] if isinstance(out, tuple) else out


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(head_dim)) v over all keys. q [B, Sq, H, D], k/v [B, Sk, H, D] -> [B, Sq, H, D].

    `backend` None uses the one set by `set_attention_backend` (default `auto`)."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"attention takes [B, S, heads, head_dim] tensors, got {q.shape}, {k.shape}, {v.shape}")
    if q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:] or k.shape != v.shape:
        raise ValueError(f"attention shape mismatch: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    name = _backend if backend is None else backend
    if name == "auto":
        if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
            choice = _auto_choice(q.device.index if q.device.index is not None else torch.cuda.current_device())
            if choice == "fa4" and not _fa4_takes(q.shape[-1]):
                choice = "cudnn"
            if choice in _FLASH_MODULES:
                return _flash(choice, q, k, v)
            return _sdpa(q, k, v, _AUTO_SDPA[choice])
        return _sdpa(q, k, v, None if q.is_cuda else [SDPBackend.MATH])
    if name in _FLASH_MODULES:
        return _flash(name, q, k, v)
    if name not in _SDPA:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if name != "math" and not q.is_cuda:
        raise ValueError(f"attention backend {name!r} needs CUDA tensors, got {q.device}")
    return _sdpa(q, k, v, [_SDPA[name]])
