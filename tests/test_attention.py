"""The attention function: layout, CPU reference, backend selection, every GPU backend against math."""
import math

import pytest
import torch

from one4d_train.model import attention as attn_mod
from one4d_train.model.attention import (
    attention, backend_present, get_attention_backend, present_backends, set_attention_backend,
)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def naive(q, k, v):
    """softmax(QK^T / sqrt(d)) V per head, written out; [B, S, H, D] layout."""
    scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) / math.sqrt(q.shape[-1])
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v.double())


def qkv(b=2, sq=37, sk=19, h=3, d=16, device="cpu", dtype=torch.float32, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    shape = lambda s: (b, s, h, d)
    return (torch.randn(shape(sq), generator=g, device=device, dtype=dtype),
            torch.randn(shape(sk), generator=g, device=device, dtype=dtype),
            torch.randn(shape(sk), generator=g, device=device, dtype=dtype))


@pytest.fixture(autouse=True)
def restore_backend():
    yield
    set_attention_backend("auto")


@pytest.mark.parametrize("backend", [None, "auto", "math"])
def test_cpu_equals_naive_softmax(backend):
    q, k, v = qkv()
    out = attention(q, k, v, backend=backend)
    assert out.shape == q.shape and out.dtype == q.dtype
    torch.testing.assert_close(out.double(), naive(q, k, v), rtol=1e-5, atol=1e-5)


def test_layout_is_batch_seq_heads_dim():
    q, k, v = qkv(b=2, sq=5, sk=7, h=4, d=8)
    out = attention(q, k, v)
    for b in range(2):  # each (sample, head) attends only within itself
        for h in range(4):
            ref = naive(q[b:b + 1, :, h:h + 1], k[b:b + 1, :, h:h + 1], v[b:b + 1, :, h:h + 1])
            torch.testing.assert_close(out[b:b + 1, :, h:h + 1].double(), ref, rtol=1e-5, atol=1e-5)


def test_gradients_match_naive():
    q, k, v = (t.requires_grad_() for t in qkv(sq=11, sk=11))
    w = torch.randn(q.shape)
    grads = torch.autograd.grad((attention(q, k, v) * w).sum(), (q, k, v))
    refs = torch.autograd.grad((naive(q, k, v) * w.double()).sum(), (q, k, v))
    for g, r in zip(grads, refs):
        torch.testing.assert_close(g, r.float(), rtol=1e-4, atol=1e-5)


def test_shape_errors():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="heads, head_dim"):
        attention(q.flatten(2), k, v)
    with pytest.raises(ValueError, match="mismatch"):
        attention(q, k[:, :, :2], v)
    with pytest.raises(ValueError, match="mismatch"):
        attention(q, k, v[:, :3])


def test_forcing_and_errors():
    assert get_attention_backend() == "auto"
    set_attention_backend("math")
    assert get_attention_backend() == "math"
    with pytest.raises(ValueError, match="unknown attention backend 'xformers'"):
        set_attention_backend("xformers")
    with pytest.raises(ValueError, match="unknown attention backend"):
        attention(*qkv(), backend="xformers")
    if not torch.cuda.is_available():
        assert present_backends("cpu") == ["math"]
        for name in ["fa4", "fa3", "fa2", "cudnn", "flash", "efficient"]:
            assert not backend_present(name, "cpu")
            with pytest.raises(RuntimeError, match=f"'{name}' forced but"):
                set_attention_backend(name)
        with pytest.raises(ValueError, match="needs CUDA tensors"):
            attention(*qkv(), backend="cudnn")


@pytest.mark.parametrize("major, present, expected", [
    (9, {"fa4", "fa3"}, "fa4"), (10, {"fa4", "fa3"}, "fa4"), (9, {"fa3"}, "fa3"), (10, {"fa3"}, "cudnn"),
    (9, set(), "cudnn"), (8, {"fa4", "fa3", "fa2"}, "flash"),
])
def test_auto_order_per_gpu_generation(monkeypatch, major, present, expected):
    """`auto` on half-precision CUDA inputs: FlashAttention-4 on Hopper/Blackwell (measured 1.18x cuDNN on an
    H200), FA3 on Hopper, then cuDNN SDPA on Hopper and newer, SDPA flash before."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (major, 0))
    monkeypatch.setattr(attn_mod, "_flash_funcs", {n: (object() if n in present else None) for n in ("fa4", "fa3", "fa2")})
    assert attn_mod._auto_choice(0) == expected
    # FA4's kernels take head dims that are multiples of 8 up to 128; auto sends other calls to SDPA
    assert attn_mod._fa4_takes(128) and attn_mod._fa4_takes(64) and not attn_mod._fa4_takes(100)
    assert not attn_mod._fa4_takes(256)


def test_missing_flash_library_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(attn_mod._FLASH_MODULES, "fa3", "no_such_flash_module")
    monkeypatch.setattr(attn_mod, "_flash_funcs", {})
    assert not backend_present("fa3")
    with pytest.raises(RuntimeError, match="no_such_flash_module.* not importable"):
        set_attention_backend("fa3")
    # by key before a model is built: `one4d train` (its start-up checks) and `one4d eval` failed in the first forward
    from one4d_train.config import load_config
    from one4d_train.train.one4d_task import One4DTask

    assert attn_mod.attention_problems("auto") == attn_mod.attention_problems("math") == []
    problems = dict(One4DTask.config_problems(load_config(["model.attention=fa3", "train.device=cpu"])))
    assert problems["model.attention"].startswith("fa3 forced but `no_such_flash_module` is not importable here")
    with pytest.raises(RuntimeError, match="not importable"):
        attention(*qkv(), backend="fa3")


def gpu_backends():
    names = ["auto", "fa4", "fa3", "fa2", "cudnn", "flash", "efficient", "math"]
    return [pytest.param(n, marks=[pytest.mark.gpu, cuda]) for n in names]


@pytest.mark.parametrize("backend", gpu_backends())
@pytest.mark.parametrize("shape", [(2, 1024, 1024, 8, 128), (1, 777, 257, 4, 128), (2, 300, 512, 12, 64)],
                         ids=["self", "cross-odd", "text"])
def test_gpu_backend_matches_math(backend, shape):
    if not backend_present(backend, "cuda"):
        pytest.skip(f"{backend} not present")
    b, sq, sk, h, d = shape
    q, k, v = (t.requires_grad_() for t in qkv(b, sq, sk, h, d, device="cuda", dtype=torch.bfloat16))
    w = torch.randn(q.shape, device="cuda", dtype=torch.bfloat16)
    out = attention(q, k, v, backend=backend)
    grads = torch.autograd.grad((out * w).sum(), (q, k, v))
    ref_in = [t.detach().float().requires_grad_() for t in (q, k, v)]
    ref = attention(*ref_in, backend="math")
    ref_grads = torch.autograd.grad((ref * w.float()).sum(), ref_in)
    assert out.shape == q.shape and out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)
    for g, r in zip(grads, ref_grads):
        assert g.shape == r.shape
        assert (g.float() - r).norm() / r.norm() < 2e-2


@pytest.mark.gpu
@cuda
def test_gpu_auto_prefers_fastest_present():
    present = present_backends("cuda")
    assert "cudnn" in present and "flash" in present and "math" in present
    expected = attn_mod._auto_choice(torch.cuda.current_device())  # the order itself: test_auto_order_per_gpu_generation
    assert expected in present

    def kernels_of(keys):
        q, k, v = qkv(1, 256, keys, 2, 128, device="cuda", dtype=torch.bfloat16)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            attention(q, k, v)
            torch.cuda.synchronize()
        return " ".join(e.name.lower() for e in prof.events())

    for keys in (256, 512, 257):  # a self-attention-like call and the cross-attentions' short key sequences
        kernels = kernels_of(keys)
        assert {"fa4": "flash", "fa3": "flash", "cudnn": "cudnn", "flash": "flash"}[expected] in kernels, kernels[:500]
        if expected != "flash":  # cuDNN or a flash library, not SDPA's own flash kernel
            assert "pytorch_flash" not in kernels


def test_fa4_ops_shapes_and_selective_checkpointing_keeps_them():
    """FlashAttention-4 runs as the custom ops one4d::fa4_fwd/fa4_bwd (compiled blocks keep one graph): their shape
    functions give the kernels' output layouts (out like q, log-sum-exp [B, heads, Sq] fp32; gradients like q/k/v),
    and the selective checkpointing policies save fa4_fwd's outputs as they save SDPA's."""
    from one4d_train.model.checkpointing import _saved_ops
    q = torch.empty(2, 100, 4, 64, device="meta", dtype=torch.bfloat16)
    k = torch.empty(2, 30, 4, 64, device="meta", dtype=torch.bfloat16)
    out, lse = torch.ops.one4d.fa4_fwd(q, k, k)
    assert out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous()
    assert lse.shape == (2, 4, 100) and lse.dtype == torch.float32
    dq, dk, dv = torch.ops.one4d.fa4_bwd(q, k, k, out, out, lse)
    assert (dq.shape, dk.shape, dv.shape) == (q.shape, k.shape, k.shape)
    assert torch.ops.one4d.fa4_fwd.default in _saved_ops()


def test_fa4_without_its_kernel_entry_points_counts_as_absent(monkeypatch):
    """The fa4 ops call flash_attn.cute.interface._flash_attn_fwd/_flash_attn_bwd: a version without them is not
    used (auto falls back to cuDNN) instead of failing inside a training step."""
    import sys
    import types
    cute, interface = types.ModuleType("flash_attn.cute"), types.ModuleType("flash_attn.cute.interface")
    cute.flash_attn_func = lambda q, k, v: q
    monkeypatch.setitem(sys.modules, "flash_attn.cute", cute)
    monkeypatch.setitem(sys.modules, "flash_attn.cute.interface", interface)
    monkeypatch.setattr(attn_mod, "_flash_funcs", {})
    assert attn_mod._flash_attn_func("fa4") is None
    interface._flash_attn_fwd = interface._flash_attn_bwd = lambda *a, **k: None
    monkeypatch.setattr(attn_mod, "_flash_funcs", {})
    assert attn_mod._flash_attn_func("fa4") is cute.flash_attn_func


@pytest.fixture
def fa4_on_cpu(monkeypatch):
    """The fa4 custom ops wired to a math stand-in for FlashAttention-4's kernel entry points (same arguments and
    returns as flash_attn.cute.interface 4.0.0b36: forward -> (out, lse [B, H, Sq] fp32, ...), backward -> (dq, dk,
    dv)), their own CUDA implementations registered for the CPU for the test's duration. Counts kernel calls."""
    import math
    import sys
    import types
    calls = {"fwd": 0, "bwd": 0}

    def fwd(q, k, v, return_lse=False):
        calls["fwd"] += 1
        assert return_lse and all(t.is_contiguous() for t in (q, k, v))
        s = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) / math.sqrt(q.shape[-1])
        out = torch.einsum("bhqk,bkhd->bqhd", torch.softmax(s, -1), v.float()).to(q.dtype)
        return out.contiguous(), torch.logsumexp(s, -1).contiguous(), None, None, None  # the kernel's layouts

    def bwd(q, k, v, out, dout, lse):
        calls["bwd"] += 1
        assert dout.is_contiguous() and lse.shape == (q.shape[0], q.shape[2], q.shape[1])
        scale = 1 / math.sqrt(q.shape[-1])
        p = torch.exp(torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * scale - lse[..., None])
        do = dout.float()
        dv = torch.einsum("bhqk,bqhd->bkhd", p, do)
        ds = p * (torch.einsum("bqhd,bkhd->bhqk", do, v.float()) - (do * out.float()).sum(-1).transpose(1, 2)[..., None])
        dq = torch.einsum("bhqk,bkhd->bqhd", ds, k.float()) * scale
        dk = torch.einsum("bhqk,bqhd->bkhd", ds, q.float()) * scale
        return tuple(t.to(q.dtype).contiguous() for t in (dq, dk, dv))

    interface = types.ModuleType("flash_attn.cute.interface")
    interface._flash_attn_fwd, interface._flash_attn_bwd = fwd, bwd
    monkeypatch.setitem(sys.modules, "flash_attn.cute.interface", interface)
    lib = torch.library.Library("one4d", "FRAGMENT")
    torch.library.register_kernel(attn_mod._fa4_fwd, "cpu", attn_mod._fa4_fwd._init_fn, lib=lib)
    torch.library.register_kernel(attn_mod._fa4_bwd, "cpu", attn_mod._fa4_bwd._init_fn, lib=lib)
    yield calls
    lib._destroy()


def test_fa4_ops_wiring_gradients_and_checkpointing(fa4_on_cpu):
    """Our side of the FA4 integration, on the CPU: the ops pass torch.library.opcheck (shape functions, autograd
    registration), give math attention's gradients, and the selective checkpointing policies keep fa4_fwd's outputs
    in eager and compiled (one graph) blocks: forward kernel once, where full checkpointing runs it again."""
    from torch.utils.checkpoint import checkpoint

    from one4d_train.model.checkpointing import _selective_context, _selective_self_context
    calls = fa4_on_cpu
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 33, 3, 16, generator=g, requires_grad=True) for _ in range(3))
    torch.library.opcheck(attn_mod._fa4_fwd, (q, k, v))
    out, lse = attn_mod._fa4_fwd(q, k, v)
    dout = torch.randn(out.shape, generator=g)
    torch.library.opcheck(attn_mod._fa4_bwd, tuple(t.detach() for t in (q, k, v, out, dout, lse)))  # no double backward
    weights = torch.arange(33.0)[None, :, None, None]
    got = torch.autograd.grad((attn_mod._fa4_fwd(q, k, v)[0] * weights).square().sum(), (q, k, v))
    want = torch.autograd.grad((attention(q, k, v, backend="math") * weights).square().sum(), (q, k, v))
    for a, b in zip(got, want):
        assert ((a - b).norm() / b.norm()).item() < 1e-5

    lin = torch.nn.Linear(16, 16)
    text = torch.randn(2, 7, 3, 16, generator=g)

    def block(x):  # a self-attention and a cross-attention, as in a DiT block
        y = lin(x)
        a = attn_mod._fa4_fwd(y, y, y)[0]
        b = attn_mod._fa4_fwd(y, lin(text), text)[0]
        return (a + b).sin().sum()

    x = torch.randn(2, 33, 3, 16, generator=g, requires_grad=True)
    runs = {
        "full": lambda x: checkpoint(block, x, use_reentrant=False),
        "selective": lambda x: checkpoint(block, x, use_reentrant=False, context_fn=_selective_context),
        "selective_self": lambda x: checkpoint(block, x, use_reentrant=False, context_fn=_selective_self_context),
        "selective, compiled": torch.compile(
            lambda x: checkpoint(block, x, use_reentrant=False, context_fn=_selective_context), fullgraph=True),
    }
    forward_kernels = {}
    for name, fn in runs.items():
        calls.update(fwd=0, bwd=0)
        torch.autograd.grad(fn(x), x)
        forward_kernels[name] = calls["fwd"]
        assert calls["bwd"] == 2, (name, calls)
    assert forward_kernels == {"full": 4, "selective": 2, "selective_self": 3, "selective, compiled": 2}
