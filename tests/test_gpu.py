"""GPU checks (marked `gpu`, skipped without CUDA): attention backends against the math reference, one real
DeepSpeed ZeRO-3 training step of a mid-size DLC model, and bf16 numerics of the batched-branch model against
running each branch alone."""
from __future__ import annotations

import copy
import os

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

from one4d_train.model.attention import attention, present_backends, set_attention_backend  # noqa: E402
from one4d_train.model.backbone import WanDiT  # noqa: E402
from one4d_train.model.checkpointing import apply_activation_checkpointing  # noqa: E402
from one4d_train.model.config import ModelConfig  # noqa: E402
from one4d_train.model.dlc import BranchLoRALinear, only_branch  # noqa: E402
from one4d_train.model.one4d import One4DModel  # noqa: E402
from one4d_train.model.presets import IMAGE_TOKENS, wan_config  # noqa: E402


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("backend", ["auto", "fa4", "fa3", "fa2", "cudnn", "flash", "efficient"])
@pytest.mark.parametrize("keys", [4096, 769])  # self-attention, cross-attention to text + image tokens
def test_attention_backend_matches_math_reference(backend, keys):
    if backend != "auto" and backend not in present_backends("cuda"):
        pytest.skip(f"{backend} not present")
    g = torch.Generator(device="cuda").manual_seed(keys)
    q = torch.randn(2, 4096, 12, 128, device="cuda", generator=g)
    k, v = (torch.randn(2, keys, 12, 128, device="cuda", generator=g) for _ in range(2))
    gout = torch.randn(2, 4096, 12, 128, device="cuda", generator=g)
    low = [t.to(torch.bfloat16).requires_grad_() for t in (q, k, v)]
    ref = [t.to(torch.bfloat16).double().requires_grad_() for t in (q, k, v)]  # same rounded inputs, fp64 math
    out = attention(*low, backend=backend)
    out.backward(gout.to(torch.bfloat16))
    want = attention(*ref, backend="math")
    want.backward(gout.double())
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert rel(out, want) < 1e-2, rel(out, want)
    for a, b in zip(low, ref):
        assert rel(a.grad, b.grad) < 2e-2, (backend, rel(a.grad, b.grad))


def nudge_trainable(model) -> None:
    """The trainable parameters moved off their initial values (LoRA B and the control links start at zero), so
    every adapter and link changes the outputs and the gradients."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.01)


def mid_model(num_links: int = 1, ckpt: str = "none", dtype=torch.bfloat16, device="cuda",
              num_layers: int = 2, base_matmul: str = "bf16") -> One4DModel:
    """`num_layers` blocks at the 1.3B widths (dim 1536, 12 heads, FFN 8960), i2v inputs, DLC with rank-64 branch LoRA."""
    wc = wan_config("1.3b", num_layers=num_layers)
    torch.manual_seed(0)
    with torch.device("meta"):
        base = WanDiT(wc).to(dtype)
    base.to_empty(device=device)
    base.init_weights()
    with torch.no_grad():  # Wan's zero-initialised head would stop every gradient
        base.head.head.weight.normal_(0, 0.02)
    model = One4DModel(base, ModelConfig(preset="1.3b", num_links=num_links, activation_checkpointing=ckpt,
                                         base_matmul=base_matmul))
    apply_activation_checkpointing(base.blocks, ckpt)
    return model


def mid_inputs(seed: int = 0, t_lat: int = 5, h: int = 16, w: int = 16):
    g = torch.Generator(device="cuda").manual_seed(seed)
    rgb = torch.randn(1, 36, t_lat, h, w, device="cuda", generator=g)
    xyz = torch.randn(1, 16, t_lat, h, w, device="cuda", generator=g)
    t = torch.tensor([700.0], device="cuda")
    ctx = torch.randn(1, 512, 4096, device="cuda", generator=g, dtype=torch.bfloat16)
    clip = torch.randn(1, IMAGE_TOKENS, 1280, device="cuda", generator=g, dtype=torch.bfloat16)
    return rgb, xyz, t, ctx, clip


def branch_alone(model: One4DModel, branch: str, rgb, xyz, t, ctx, clip) -> torch.Tensor:
    base = model.base
    with only_branch(model, branch):
        e, e0 = base.embed_time(t)
        context = base.embed_context(ctx, clip)
        if branch == "rgb":
            tokens, grid = base.patchify(rgb)
        else:
            tokens, grid = base.patchify(model._pad_xyz(xyz, rgb.dtype), embedding=model.xyz_patch_embedding)
            tokens = tokens.to(model.compute_dtype)
        freqs = base.rope_freqs(grid, tokens.device)
        for block in base.blocks:
            tokens = block(tokens, e0, context, freqs)
        return base.unpatchify(base.head_out(tokens, e), grid)


@torch.no_grad()
def test_bf16_one4d_forward_matches_each_branch_run_alone():
    model = mid_model(num_links=0)
    g = torch.Generator(device="cuda").manual_seed(1)
    for m in model.modules():
        if isinstance(m, BranchLoRALinear):
            # non-zero, different adapters per branch (stacked [branches, out, rank])
            m.lora_B.copy_(torch.randn(m.lora_B.shape, device="cuda", generator=g) * 0.01)
    model.xyz_patch_embedding.weight.add_(0.01)
    inputs = mid_inputs()
    got = model(*inputs)
    exact = copy.deepcopy(model).float()  # fp32 reference of the same weights
    exact.compute_dtype = torch.float32
    for i, branch in enumerate(("rgb", "xyz")):
        alone = branch_alone(model, branch, *inputs)
        want = branch_alone(exact, branch, *(x.float() if x.is_floating_point() else x for x in inputs))
        assert got[i].shape == alone.shape == want.shape
        assert torch.isfinite(got[i]).all()
        # batched bf16 is as close to fp32 as the branch alone in bf16 is
        assert rel(got[i], want) <= 1.5 * rel(alone, want) + 2e-3, (branch, rel(got[i], want), rel(alone, want))
        assert rel(got[i], alone) < 2e-2, (branch, rel(got[i], alone))
    # the two branches really differ (their own adapters and embedding)
    assert rel(got[0], got[1]) > 0.05


def _init_dist():
    import deepspeed
    if not torch.distributed.is_initialized():
        for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
            os.environ.setdefault(key, value)
        os.environ.setdefault("MASTER_PORT", str(31000 + os.getpid() % 1000))
        deepspeed.init_distributed(dist_backend="nccl", verbose=False)


@pytest.fixture
def restore_linear():
    """ZeRO-3 replaces torch.nn.functional.linear for the rest of the process (DeepSpeed's memory-efficient
    linear); later tests in this process (compiled blocks) must see torch's own."""
    linear = torch.nn.functional.linear
    yield
    torch.nn.functional.linear = linear


@pytest.mark.parametrize("ckpt,base_matmul", [("full", "bf16"), ("selective", "bf16"), ("selective", "fp8")])
def test_zero3_training_step_updates_only_trainable(ckpt, base_matmul, restore_linear):
    deepspeed = pytest.importorskip("deepspeed")
    from one4d_train.config import load_config
    from one4d_train.train import deepspeed_config

    _init_dist()
    cfg = load_config(["train.zero_stage=3", "train.precision=bf16", "train.grad_accum=1", "optim.lr=1e-3"])
    ds_config, _ = deepspeed_config.build(cfg, 1)
    model = mid_model(num_links=1, ckpt=ckpt, base_matmul=base_matmul)
    names = {p: n for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, fused=True)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=params, optimizer=opt, config=ds_config,
                                      dist_init_required=False)

    def snapshot():
        with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None):
            return {names[p]: p.detach().clone() for p in engine.module.parameters()}

    before = snapshot()
    rgb, xyz, t, ctx, clip = mid_inputs()
    v_rgb, v_xyz = engine(rgb, xyz, t, ctx, clip)
    loss = (v_rgb.float() - 1).square().mean() + (v_xyz.float() + 1).square().mean()
    engine.backward(loss)
    engine.step()
    after = snapshot()
    assert torch.isfinite(loss)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and changed <= trainable, sorted(changed - trainable)[:5]
    lora_b = [n for n in changed if n.endswith("lora_B")]
    assert lora_b and all(not torch.equal(before[n][i], after[n][i]) for n in lora_b for i in (0, 1))
    assert any(n.startswith("control_links.") for n in changed) and "xyz_patch_embedding.weight" in changed
    frozen = [n for n in before if n not in trainable]
    assert all(torch.equal(before[n], after[n]) for n in frozen)
    engine.destroy() if hasattr(engine, "destroy") else None
    set_attention_backend("auto")


def test_fa4_ops_pass_opcheck_and_compile_without_graph_breaks():
    """FlashAttention-4 (flash_attn.cute) runs as custom ops: their shape functions agree with the kernels
    (torch.library.opcheck), and a compiled function around it is one graph whose output and gradients are eager's."""
    if "fa4" not in present_backends("cuda"):
        pytest.skip("fa4 not present")
    from one4d_train.model.attention import _fa4_fwd
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, 1024, 12, 128, device="cuda", generator=g, dtype=torch.bfloat16).requires_grad_()
               for _ in range(3))
    torch.library.opcheck(_fa4_fwd, (q, k, v))
    out, lse = _fa4_fwd(q, k, v)
    torch.library.opcheck(torch.ops.one4d.fa4_bwd, tuple(t.detach() for t in (q, k, v, out, torch.randn_like(out), lse)))

    def f(q, k, v):
        return (attention(q * 0.5, k, v, backend="fa4").float().square()).mean()

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    results = []
    for fn in (f, torch.compile(f, fullgraph=True)):
        loss = fn(q, k, v)
        results.append((loss, torch.autograd.grad(loss, (q, k, v))))
    assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])
    (el, eg), (cl, cg) = results
    assert rel(cl, el) < 1e-2
    for a, b in zip(cg, eg):
        assert rel(a, b) < 2e-2


@pytest.fixture
def restore_attention():
    yield
    set_attention_backend("auto")


@pytest.mark.parametrize("attn", ["auto", "fa4"])
@pytest.mark.parametrize("ckpt", ["none", "full", "selective"])
def test_compiled_blocks_match_eager(ckpt, attn, restore_attention):
    """Regional torch.compile (one4d_train.model.compile) with the block's checkpointing inside the compiled
    region: same outputs and gradients as eager, in bf16, with no graph break (FlashAttention-4 included)."""
    from one4d_train.model.compile import compile_blocks
    if attn != "auto" and attn not in present_backends("cuda"):
        pytest.skip(f"{attn} not present")
    set_attention_backend(attn)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()

    eager = mid_model(num_links=1, ckpt=ckpt)
    nudge_trainable(eager)
    compiled = copy.deepcopy(eager)
    apply_activation_checkpointing(compiled.base.blocks, ckpt)
    compile_blocks(compiled.base.blocks)
    inputs = mid_inputs(seed=3)
    results = []
    for model in (eager, compiled):
        v_rgb, v_xyz = model(*inputs)
        (v_rgb.float().square().mean() + v_xyz.float().square().mean()).backward()
        grads = {n: p.grad.float() for n, p in model.named_parameters() if p.requires_grad}
        results.append((v_rgb, v_xyz, grads))
    assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0, "nothing was compiled"
    (er, ex, eg), (cr, cx, cg) = results
    assert rel(cr, er) < 2e-2 and rel(cx, ex) < 2e-2, (rel(cr, er), rel(cx, ex))
    for n, g in eg.items():
        if g.norm() > 0:
            assert rel(cg[n], g) < 5e-2, (n, rel(cg[n], g))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
def test_fp8_linear_compiled_input_gradient_matches_eager(backend, out_dtype):
    """One frozen FP8 linear under torch.compile: the input gradient is eager's (torch 2.11 routed the gradient
    of an autograd.Function whose output aliases an intermediate to the wrong slot: zeros came out)."""
    from one4d_train.model.fp8 import FP8Linear
    torch._dynamo.reset()
    g = torch.Generator(device="cuda").manual_seed(0)
    lin = FP8Linear.from_linear(torch.nn.Linear(1536, 8960, device="cuda", dtype=out_dtype).requires_grad_(False))
    x0 = torch.randn(4000, 1536, device="cuda", dtype=out_dtype, generator=g)
    dy = torch.randn(4000, 8960, device="cuda", dtype=out_dtype, generator=g) * 1e-3
    got = {}
    for name, fn in (("eager", lin), ("compiled", torch.compile(lin, backend=backend))):
        x = x0.clone().requires_grad_(True)
        y = fn(x)
        y.backward(dy)
        got[name] = (y.detach(), x.grad)
    assert rel(got["compiled"][0], got["eager"][0]) < 1e-2
    assert got["compiled"][1].norm() > 0
    assert rel(got["compiled"][1], got["eager"][1]) < 1e-2, rel(got["compiled"][1], got["eager"][1])


def test_fp8_base_compiled_matches_eager_and_tracks_bf16(restore_attention):
    """FP8 base matmuls on the GPU (torch._scaled_mm, row-wise scales): the compiled, selectively checkpointed
    block matches eager FP8 with no graph break, and both stay within FP8's rounding of the bf16 model."""
    from one4d_train.model.compile import compile_blocks
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    models = {"bf16": mid_model(ckpt="selective"), "fp8": mid_model(ckpt="selective", base_matmul="fp8")}
    for m in models.values():
        with torch.no_grad():
            for p in m.parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, device="cuda", generator=torch.Generator("cuda").manual_seed(1)) * 0.01)
    models["fp8 compiled"] = copy.deepcopy(models["fp8"])
    models["fp8 repeat"] = copy.deepcopy(models["fp8"])  # eager again: the run-to-run spread, for the messages
    apply_activation_checkpointing(models["fp8 compiled"].base.blocks, "selective")
    compile_blocks(models["fp8 compiled"].base.blocks)
    inputs = mid_inputs(seed=4)
    out, grads = {}, {}
    for name, model in models.items():
        v_rgb, v_xyz = model(*inputs)
        (v_rgb.float().square().mean() + v_xyz.float().square().mean()).backward()
        out[name] = torch.cat([v_rgb.flatten(), v_xyz.flatten()])
        grads[name] = torch.cat([p.grad.float().flatten() for p in model.parameters() if p.requires_grad])
    assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0, "nothing was compiled"
    spread = {"eager repeat": (rel(out["fp8 repeat"], out["fp8"]), rel(grads["fp8 repeat"], grads["fp8"])),
              **{f"{n} vs bf16": (rel(out[n], out["bf16"]), rel(grads[n], grads["bf16"])) for n in ("fp8", "fp8 compiled")}}
    print("fp8 (output, grad) rel differences:", spread)
    assert rel(out["fp8 compiled"], out["fp8"]) < 2e-2, (rel(out["fp8 compiled"], out["fp8"]), spread)
    assert rel(grads["fp8 compiled"], grads["fp8"]) < 5e-2, (rel(grads["fp8 compiled"], grads["fp8"]), spread)
    for name in ("fp8", "fp8 compiled"):
        assert 1e-3 < rel(out[name], out["bf16"]) < 0.1, (name, rel(out[name], out["bf16"]))
        assert rel(grads[name], grads["bf16"]) < 0.1, (name, spread)
        cosine = torch.nn.functional.cosine_similarity(grads[name], grads["bf16"], dim=0).item()
        assert cosine > 0.99, (name, cosine)


@pytest.mark.parametrize("text_device", ["auto", "cpu", "stored"])
def test_one4d_task_step_on_cuda_with_a_cuda_generator(text_device):
    """The training step as the trainer runs it on a GPU: batch and generator on CUDA (UMC draws, noise,
    condition encode, DLC forward/backward), tiny preset in bf16; the text encoder on the GPU or in host memory
    (`model.text_encoder_device`), or (stored: shards with text embeddings and the empty prompt's) in host memory
    and built at the first caption."""
    from contextlib import nullcontext

    from one4d_train.config import load_config
    from one4d_train.train.one4d_task import One4DTask

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = load_config([f"config={root}/configs/experiment/demo.yaml", "train.device=cuda", "train.zero_stage=2",
                       "train.precision=bf16", "model.compute_dtype=bf16", "model.umc.p_image=0",
                       "model.umc.p_video=0", "model.umc.p_sparse=1",
                       f"model.text_encoder_device={'auto' if text_device == 'stored' else text_device}"])
    task = One4DTask(cfg)
    model = task.build_model(nullcontext)
    if text_device == "stored":
        from one4d_train.model.encoders import build_encoders
        empty = build_encoders(cfg.model, task.wan_cfg, torch.device("cpu"), torch.bfloat16, cfg.seed)[1].empty
        task._encoders = build_encoders(cfg.model, task.wan_cfg, torch.device("cuda"), torch.bfloat16, cfg.seed,
                                        text_stored=True, stored_empty=empty[:1])
        assert task._encoders[1]._encoder is None
    text = task.encoders(torch.device("cuda"))[1]
    g = torch.Generator(device="cuda").manual_seed(0)
    B, T, H, W = 2, 9, 32, 48
    batch = {"rgb": torch.rand(B, T, 3, H, W, device="cuda") * 2 - 1,
             "xyz": torch.rand(B, T, 3, H, W, device="cuda") * 2 - 1,
             "valid": torch.ones(B, T, 1, H, W, dtype=torch.bool, device="cuda"), "caption": ["a cat", "a dog"]}
    out = task.loss(model, batch, 0, g)
    out["loss"].backward()
    assert torch.isfinite(out["loss"])
    assert text.encoder.device.type == ("cuda" if text_device == "auto" else "cpu")
    grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
    assert grads and any(gr.abs().sum() > 0 for gr in grads)


def offload_model(blocks: int, compiled: bool):
    """(model of `blocks` blocks checkpointed whole, adapters and links non-zero, inputs, bytes of a block input)."""
    from one4d_train.model.compile import compile_blocks

    model = mid_model(num_links=1, ckpt="full", num_layers=blocks)
    nudge_trainable(model)
    if compiled:
        compile_blocks(model.base.blocks)
    inputs = mid_inputs(seed=5, t_lat=6, h=40, w=72)  # 2 x 4,320 tokens: 26.5 MB per block input
    return model, inputs, 2 * 6 * 20 * 36 * 1536 * 2


@pytest.mark.parametrize("compiled", [False, True])
def test_activation_offload_frees_block_inputs(compiled):
    """Activation offload (one4d_train.model.offload): the saved block inputs leave the GPU during forward and
    come back (prefetched) in backward; gradients as without it."""
    from one4d_train.model.offload import apply_activation_offload

    blocks = 6
    model, inputs, block_input = offload_model(blocks, compiled)
    runs = {}
    for offload in (False, True, False, True):  # the first pair warms up (compilation, allocator)
        offloader = apply_activation_offload(model, offload, min_bytes=1 << 20)
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        v_rgb, v_xyz = model(*inputs)
        after_forward = torch.cuda.memory_allocated() - base
        (v_rgb.float().square().mean() + v_xyz.float().square().mean()).backward()
        torch.cuda.synchronize()
        grads = {n: p.grad.float() for n, p in model.named_parameters() if p.requires_grad}
        runs[offload] = (after_forward, torch.cuda.max_memory_allocated() - base, grads, offloader)
    (fwd0, peak0, g0, _), (fwd1, peak1, g1, offloader) = runs[False], runs[True]
    stats = offloader.stats
    assert stats.tensors >= blocks and stats.prefetched > 0
    assert fwd0 - fwd1 >= 0.8 * blocks * block_input, (fwd0, fwd1)
    assert peak1 < peak0, (peak0, peak1)
    for n, g in g0.items():
        if g.norm() > 0:
            assert rel(g1[n], g) < 1e-2, (n, rel(g1[n], g))
    # page-locked host buffers of the tensors' own sizes (whole pages), reused by the next step: same gradients
    from one4d_train.model.host_buffers import PAGE

    held = offloader.host_bytes
    assert stats.bytes <= held < stats.bytes + stats.tensors * PAGE, (held, stats.bytes)
    pinned = [b.data.is_pinned() for b in offloader.buffers._all]
    assert all(pinned), pinned
    model.zero_grad(set_to_none=True)
    v_rgb, v_xyz = model(*inputs)
    (v_rgb.float().square().mean() + v_xyz.float().square().mean()).backward()
    torch.cuda.synchronize()
    assert offloader.host_bytes == held
    for n, p in model.named_parameters():  # (bf16; the attention backward's sums are not deterministic)
        if p.requires_grad and g1[n].norm() > 0:
            assert rel(p.grad.float(), g1[n]) < 1e-2, (n, rel(p.grad.float(), g1[n]))
    offloader.buffers.close()
    assert offloader.host_bytes == 0


@pytest.mark.parametrize("compiled", [False, True])
def test_activation_offload_keeps_the_last_blocks_on_the_gpu(compiled):
    """model.activation_offload_blocks: the first blocks' saved inputs leave the GPU, the last ones' stay (the GPU
    holds more after forward than with every block moved, less than with none); gradients as without offload."""
    from one4d_train.model import offload as offload_module
    from one4d_train.model.offload import apply_activation_offload

    blocks, moved = 6, 4
    model, inputs, block_input = offload_model(blocks, compiled)
    runs, loads = {}, []
    real_load = offload_module._Session._load

    def load(self, entry, wait):  # (group, waited for) of each copy back, in order
        if entry.loaded is None:
            loads.append((entry.group, wait))
        return real_load(self, entry, wait)

    for setting in ("none", "none", "all", "first", "first"):  # warm-up first (compilation, allocator)
        loads.clear()
        offloader = apply_activation_offload(model, setting != "none", min_bytes=1 << 20,
                                             blocks=moved if setting == "first" else -1)
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        v_rgb, v_xyz = model(*inputs)
        after_forward = torch.cuda.memory_allocated() - base
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(offload_module._Session, "_load", load)
            (v_rgb.float().square().mean() + v_xyz.float().square().mean()).backward()
        torch.cuda.synchronize()
        runs[setting] = (after_forward, {n: p.grad.float() for n, p in model.named_parameters() if p.requires_grad},
                         offloader)
    stats = runs["first"][2].stats
    assert stats.kept_bytes >= (blocks - moved) * block_input and stats.prefetched > 0
    # the last moved block is brought back ahead, by the first kept block's unpack: not waited for on its own
    assert loads and all(group < moved for group, _ in loads) and loads[0] == (moved - 1, False), loads
    assert runs["all"][0] + 0.8 * (blocks - moved) * block_input <= runs["first"][0], {k: v[0] for k, v in runs.items()}
    assert runs["first"][0] + 0.8 * moved * block_input <= runs["none"][0], {k: v[0] for k, v in runs.items()}
    for n, g in runs["none"][1].items():
        if g.norm() > 0:
            assert rel(runs["first"][1][n], g) < 1e-2, (n, rel(runs["first"][1][n], g))
    runs["all"][2].buffers.close()
    runs["first"][2].buffers.close()


def test_a_dropped_graph_frees_a_prefetched_copy_only_once_it_is_written():
    """A device copy brought back ahead of its use and never handed to backward (the graph dropped part-way through
    backward) came from the current stream's memory pool while the side stream writes it: the session's end waits for
    that copy before the memory can be handed out again."""
    import gc

    from one4d_train.model.offload import HostOffload, _Session

    offload = HostOffload(min_bytes=0)
    session = _Session(offload, set())
    packed = []
    for _ in range(3):  # 3 blocks of one 512 MB tensor each (~10 ms a copy back over the host link)
        session.next_group()
        packed.append(session.pack(torch.randn(128 << 20, device="cuda")))
    session.release()  # (the forward's end: the moved tensors go)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    with torch.cuda.stream(offload.stream(torch.device("cuda"))):
        torch.cuda._sleep(200_000_000)  # (~0.1 s: the copies back certainly still pending at the session's end)
    last = session.unpack(packed[2])  # the last block's, waited for; starts the copy back of the block before it
    ahead = session.entries[packed[1][1]]
    assert ahead.loaded is not None and not ahead.used
    ready = ahead.loaded_ready
    del session, packed, ahead  # (no cycle: the session ends here)
    assert ready.query()  # the copy was done before its memory went back to the pool
    gc.collect()
    assert torch.cuda.memory_allocated() <= base + last.numel() * 4  # the prefetched copy is freed
    offload.buffers.close()


def test_a_moved_tensor_goes_back_to_the_compute_stream_in_its_order():
    """A tensor moved to host is held until the compute stream waits for its copy, STASH_GROUPS blocks later; its
    memory is then handed out again at once, while its copy still waits on the side stream (with `record_stream`
    the allocator would give it out only once it saw the copy done on the GPU, in CPU time), and the work that reuses
    it runs after the copy read it."""
    from one4d_train.model.offload import STASH_GROUPS, HostOffload, _Session

    groups, size = 4, 64 << 20  # one 256 MB fp32 tensor a block, filled with the block's number
    offload = HostOffload(min_bytes=0)
    bufs = [offload.buffers.take(size * 4, pinned=True) for _ in range(groups)]
    offload.buffers.give(bufs)  # (page-locked ahead: registering them inside the loop would outlast the stall)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    session = _Session(offload, set())
    with torch.cuda.stream(offload.stream(torch.device("cuda"))):  # the stream the copies go on
        torch.cuda._sleep(400_000_000)  # (~0.2 s)
    ptrs, packed = [], []
    for g in range(groups):
        session.next_group()
        t = torch.full((size,), float(g), device="cuda")
        ptrs.append(t.data_ptr())
        packed.append(session.pack(t))
        del t
    first = session.entries[packed[0][1]]
    assert not first.ready.query(), "the copies were meant to be stalled here"
    # the blocks STASH_GROUPS behind took the memory of those let go, whose copies had not run yet
    assert ptrs[STASH_GROUPS:] == ptrs[:groups - STASH_GROUPS], ptrs
    assert [g for g, *_ in session.stash] == list(range(groups - STASH_GROUPS, groups))
    session.release()  # the forward's end
    assert not session.stash
    torch.cuda.synchronize()
    for g in range(groups):  # each copy read its block's values before the next block's overwrote them
        assert torch.equal(session.entries[packed[g][1]].host, torch.full((size,), float(g))), g
    del session, packed, first
    # a copy seen done at the next block's start is let go then, without waiting STASH_GROUPS blocks
    session = _Session(offload, set())
    session.next_group()
    packed = session.pack(torch.full((size,), 7.0, device="cuda"))
    torch.cuda.synchronize()
    session.next_group()
    assert not session.stash
    del session, packed
    offload.buffers.close()


def test_compiled_vae_encoder_matches_eager():
    """model.compile_vae: the in-place compiled encoder gives the eager latents (bf16), and keeps its keys."""
    from one4d_train.model.vae import WanVAE, tiny_wan_vae

    eager = WanVAE(tiny_wan_vae(0), dtype=torch.bfloat16, device="cuda")
    compiled = WanVAE(tiny_wan_vae(0), dtype=torch.bfloat16, device="cuda", compile=True)
    assert list(compiled.model.state_dict()) == list(eager.model.state_dict())
    video = torch.rand(2, 3, 9, 64, 96, device="cuda", generator=torch.Generator("cuda").manual_seed(0)) * 2 - 1
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    want, got = eager.encode(video), compiled.encode(video)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0, "nothing was compiled"
    assert got.shape == want.shape and rel(got, want) < 2e-2, rel(got, want)


def test_cuda_vae_settings_give_the_fp32_latents():
    """On CUDA the first convolution is padded to 8 input channels; with it, 16 frames per encoder call and the
    compiled encoder, bf16 latents stay those of the unpadded fp32 encode on the CPU with Wan's 4-frame loop."""
    from one4d_train.model.vae import WanVAE, tiny_wan_vae

    video = torch.rand(1, 3, 33, 64, 96, generator=torch.Generator().manual_seed(0)) * 2 - 1
    want = WanVAE(tiny_wan_vae(0)).encode(video)
    for settings in ({}, {"frames_per_call": 16}, {"frames_per_call": 16, "compile": True}):
        vae = WanVAE(tiny_wan_vae(0), dtype=torch.bfloat16, device="cuda", **settings)
        assert vae.model.encoder.conv_in._extra_in == 5 and vae.model.encoder.conv_in.weight.shape[1] == 3
        got = vae.encode(video.cuda()).cpu()
        assert got.shape == want.shape and rel(got, want) < 2e-2, (settings, rel(got, want))


@pytest.mark.parametrize("channels,frames,cache_frames", [(96, 8, 2), (96, 1, 0), (96, 4, 1), (192, 4, 2), (384, 2, 2)])
def test_triton_vae_conv_matches_conv3d(channels, frames, cache_frames):
    """model.vae_conv_kernel=triton: the kernel's causal convolution (cache frames, zero frames before them, the
    zero border) against F.conv3d in fp32 on the same bf16 inputs, as close as cuDNN's bf16 convolution is."""
    import torch.nn.functional as F

    from one4d_train.model.vae_conv import causal_conv3d, gemm_weight

    g = torch.Generator("cuda").manual_seed(channels + frames)
    x, cache = (torch.randn(2, channels, t, 40, 200, device="cuda", generator=g).to(torch.bfloat16)
                for t in (frames, cache_frames))
    x = x.contiguous(memory_format=torch.channels_last_3d)
    weight = (torch.randn(channels, channels, 3, 3, 3, device="cuda", generator=g) / (27 * channels) ** 0.5)
    weight, bias = weight.to(torch.bfloat16), torch.randn(channels, device="cuda", generator=g).to(torch.bfloat16)
    full = torch.cat([x.new_zeros(2, channels, 2 - cache_frames, 40, 200), cache, x], 2)
    want = F.conv3d(F.pad(full.float(), (1, 1, 1, 1)), weight.float(), bias.float())
    cudnn = F.conv3d(F.pad(full, (1, 1, 1, 1)).contiguous(memory_format=torch.channels_last_3d), weight, bias)
    got = causal_conv3d(x, cache, gemm_weight(weight), bias)
    assert got.shape == want.shape and got.dtype == torch.bfloat16
    assert got.is_contiguous(memory_format=torch.channels_last_3d)
    assert rel(got, want) < 2 * max(rel(cudnn, want), 2e-3), (rel(got, want), rel(cudnn, want))


def test_triton_first_vae_conv_runs_its_rgb_channels_padded_to_32():
    """The encoder's first convolution (3 RGB channels -> 96) on the kernel, its input and weight zero-padded to 32
    channels at the module: the causal convolution of F.conv3d, its weight and state dict the checkpoint's."""
    import torch.nn.functional as F
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

    from one4d_train.model.vae_conv import use_triton_convs

    torch.manual_seed(0)
    conv = WanCausalConv3d(3, 96, 3, padding=1).to("cuda", torch.bfloat16)
    x = torch.rand(1, 3, 9, 40, 200, device="cuda").to(torch.bfloat16) * 2 - 1
    cache = torch.rand(1, 3, 2, 40, 200, device="cuda").to(torch.bfloat16) * 2 - 1
    want = conv(x, cache)
    assert use_triton_convs(conv) == 1 and conv.weight.shape[1] == 3 and conv._weight_kn.shape == (27 * 32, 96)
    got = conv(x, cache)
    exact = F.conv3d(F.pad(torch.cat([cache, x], 2).float(), (1, 1, 1, 1)), conv.weight.float(), conv.bias.float())
    assert got.shape == want.shape and rel(got, exact) < 2 * max(rel(want, exact), 2e-3), (rel(got, exact),
                                                                                            rel(want, exact))


@pytest.fixture
def one_kernel_config():
    """The kernel with its first autotuner configuration alone: the encoder's dozen shapes each tried every one
    (and, compiled, inside Inductor's compile of every shape variant) took over 2 minutes."""
    from one4d_train.model import vae_conv

    configs = vae_conv._conv3d_kernel.configs
    vae_conv._conv3d_kernel.configs = configs[:1]
    yield
    vae_conv._conv3d_kernel.configs = configs


def test_triton_vae_conv_launches_past_65535_row_tiles(one_kernel_config):
    """More (video, frame, row) tiles than a CUDA grid's second axis takes (65,535): 190 frames x 352 rows of
    one-row tiles, as 3 videos x 78 frames of an encode-latents call at 80 frames per call hold. They are the grid's first axis."""
    import torch.nn.functional as F

    from one4d_train.model.vae_conv import causal_conv3d, gemm_weight

    g = torch.Generator("cuda").manual_seed(1)
    x = torch.randn(1, 32, 192, 352, 16, device="cuda", generator=g).to(torch.bfloat16)
    x = x.contiguous(memory_format=torch.channels_last_3d)
    weight = (torch.randn(32, 32, 3, 3, 3, device="cuda", generator=g) / (27 * 32) ** 0.5).to(torch.bfloat16)
    bias = torch.zeros(32, device="cuda", dtype=torch.bfloat16)
    got = causal_conv3d(x, x[:, :, :0], gemm_weight(weight), bias)
    want = F.conv3d(F.pad(x.float(), (1, 1, 1, 1, 2, 0)), weight.float(), bias.float())
    assert rel(got, want) < 1e-2, rel(got, want)


@pytest.mark.parametrize("compile", [False, True])
def test_triton_vae_encoder_gives_the_cudnn_latents(compile, one_kernel_config):
    """The Wan VAE (its real widths: 96, 192, 384 channels) with its convolutions on the Triton kernel encodes the
    latents of the cuDNN encoder, eager and compiled, its state dict unchanged."""
    from diffusers import AutoencoderKLWan

    from one4d_train.model.vae import WanVAE

    def vae(kernel):
        torch.manual_seed(0)
        return WanVAE(AutoencoderKLWan(), dtype=torch.bfloat16, device="cuda", frames_per_call=8,
                      conv_kernel=kernel, compile=compile)
    video = torch.rand(1, 3, 17, 64, 96, device="cuda", generator=torch.Generator("cuda").manual_seed(0)) * 2 - 1
    cudnn, triton_vae = vae("cudnn"), vae("triton")
    assert list(triton_vae.model.state_dict()) == list(cudnn.model.state_dict())
    convs = [m for m in triton_vae.model.encoder.modules() if type(m).__name__.startswith("Triton")]
    assert len(convs) >= 10 and triton_vae.model.encoder.conv_in in convs, len(convs)  # the first: 3 -> 32 channels
    want, got = cudnn.encode(video), triton_vae.encode(video)
    assert got.shape == want.shape and rel(got, want) < 1e-2, rel(got, want)


def test_a_checkpoints_gpu_rng_state_is_the_ranks_own_device():
    """Every visible GPU's state was saved by index and restored with set_rng_state_all: a resume with fewer GPUs
    visible (2 x 4 for 1 x 8) raised IndexError, reported as a damaged checkpoint, and with more a rank restored
    another GPU's state into its own. Now the rank's own device's state is saved and restored onto it; a
    checkpoint of the earlier form gives the state of its index."""
    from one4d_train.train import checkpoint as ckpt

    device = torch.device("cuda", torch.cuda.device_count() - 1)
    gen = torch.Generator().manual_seed(0)
    torch.cuda.manual_seed_all(5)
    state, tensors = ckpt.capture_rng(gen, device)
    assert sorted(k for k in tensors if k.startswith("cuda")) == ["cuda"]
    expected = torch.rand(4, device=device)
    for saved in (tensors, {**{k: v for k, v in tensors.items() if k != "cuda"},  # written before: 16 GPUs' states
                            **{f"cuda.{i}": (tensors["cuda"] if i == device.index else torch.zeros_like(
                                tensors["cuda"])) for i in range(16)}}):
        torch.cuda.manual_seed_all(9)
        ckpt.restore_rng(state, saved, gen, device)
        assert torch.equal(torch.rand(4, device=device), expected)
