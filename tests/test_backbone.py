"""Wan2.1 DiT backbone: equal to diffusers' WanTransformer3DModel, meta construction, dtypes, checkpointing."""
import math

import pytest
import torch
from torch import nn

from launch_utils import ROOT
from one4d_train.model.backbone import WanDiT, sinusoidal_embedding, wan_config
from one4d_train.model.checkpointing import apply_activation_checkpointing
from one4d_train.model.state_dict import official_to_diffusers


def diffusers_model(cfg):
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(
        patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
        in_channels=cfg.in_dim, out_channels=cfg.out_dim, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
        ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers, cross_attn_norm=cfg.cross_attn_norm, eps=cfg.eps,
        image_dim=cfg.image_dim if cfg.has_image_input else None,
        added_kv_proj_dim=cfg.dim if cfg.has_image_input else None,
    )


def inputs(cfg, batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_dim, 3, 8, 12, generator=g)
    t = torch.tensor([999.0, 321.5][:batch])
    context = torch.randn(batch, 512, cfg.text_dim, generator=g)  # diffusers assumes 512 text tokens
    clip = torch.randn(batch, 257, cfg.image_dim, generator=g) if cfg.has_image_input else None
    return x, t, context, clip


class Float64Sinusoid(nn.Module):
    """Wan's fp64 timestep sinusoid in place of diffusers' fp32 one (compared on its own below)."""

    def __init__(self, dim):
        super().__init__()
        self.dim = dim

    def forward(self, t):
        return sinusoidal_embedding(t, self.dim)


def paired_models(has_image_input):
    cfg = wan_config("tiny", in_dim=36 if has_image_input else 16, has_image_input=has_image_input)
    torch.manual_seed(0)
    ref = diffusers_model(cfg).eval()
    with torch.no_grad():
        for p in ref.parameters():  # random norms and tables too, so any swapped key shows
            p.normal_(0, 0.2)
    ours = WanDiT(cfg).eval()
    ref_sd = ref.state_dict()
    ours.load_state_dict({k: ref_sd[official_to_diffusers(k)] for k in ours.state_dict()})
    return cfg, ours, ref


def random_model(has_image_input):
    torch.manual_seed(0)
    model = WanDiT(wan_config("tiny", in_dim=36 if has_image_input else 16, has_image_input=has_image_input))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


@pytest.mark.parametrize("has_image_input", [False, True], ids=["t2v", "i2v"])
def test_forward_matches_diffusers(has_image_input):
    cfg, ours, ref = paired_models(has_image_input)
    ref.condition_embedder.timesteps_proj = Float64Sinusoid(cfg.freq_dim)
    x, t, context, clip = inputs(cfg)
    with torch.no_grad():
        got = ours(x, t, context, clip)
        want = ref(x, t, context, clip, return_dict=False)[0]
    assert got.shape == (2, cfg.out_dim, 3, 8, 12)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-5)
    assert want.abs().max() > 1.0  # the comparison is not between near-zero outputs


def test_time_embedding_matches_diffusers():
    cfg, ours, ref = paired_models(False)
    t = torch.tensor([0.0, 1.0, 500.0, 999.0])
    with torch.no_grad():
        e, e0 = ours.embed_time(t)
        temb, proj, _, _ = ref.condition_embedder(t, torch.zeros(4, 1, cfg.text_dim))
    assert e.dtype == e0.dtype == torch.float32 and e0.shape == (4, 6, cfg.dim)
    # Wan's sinusoid is fp64; diffusers' fp32 differs by ~1e-4 relative at t ~ 1000
    torch.testing.assert_close(e, temb, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(e0, proj.unflatten(1, (6, -1)), rtol=1e-4, atol=1e-4)


def test_sinusoid_is_wans_formula():
    t = torch.tensor([3.0, 999.0], dtype=torch.float64)
    half = 128
    args = torch.outer(t, torch.pow(10000.0, -torch.arange(half, dtype=torch.float64).div(half)))
    torch.testing.assert_close(sinusoidal_embedding(t, 256), torch.cat([args.cos(), args.sin()], 1).float())


def test_forward_is_composition_of_stages():
    ours = random_model(True)
    cfg = ours.cfg
    x, t, context, clip = inputs(cfg)
    with torch.no_grad():
        tokens, grid = ours.patchify(x)
        assert grid == (3, 4, 6) and tokens.shape == (2, 72, cfg.dim)
        e, e0 = ours.embed_time(t)
        ctx = ours.embed_context(context, clip)
        assert ctx.shape == (2, 257 + 512, cfg.dim)
        freqs = ours.rope_freqs(grid, tokens.device)
        assert ours.rope_freqs(grid, tokens.device) is freqs
        for block in ours.blocks:
            tokens = block(tokens, e0, ctx, freqs)
        out = ours.head_out(tokens, e)
        assert out.shape == (2, 72, cfg.out_dim * math.prod(cfg.patch_size))
        torch.testing.assert_close(ours.unpatchify(out, grid), ours(x, t, context, clip), rtol=0, atol=0)


def test_context_errors():
    model = WanDiT(wan_config("tiny"))
    with pytest.raises(ValueError, match="clip_fea"):
        model.embed_context(torch.zeros(1, 4, model.cfg.text_dim))
    t2v = WanDiT(wan_config("tiny", in_dim=16, has_image_input=False))
    with pytest.raises(ValueError, match="no image cross-attention"):
        t2v.embed_context(torch.zeros(1, 4, 64), torch.zeros(1, 257, 32))


def test_official_module_names_and_plain_linears():
    model = WanDiT(wan_config("tiny"))
    names = set(dict(model.named_modules()))
    for name in ["patch_embedding", "text_embedding.0", "text_embedding.2", "time_embedding.0", "time_embedding.2",
                 "time_projection.1", "head.head", "img_emb.proj.0", "img_emb.proj.1", "img_emb.proj.3",
                 "img_emb.proj.4"]:
        assert name in names, name
    block = ["norm1", "self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "self_attn.norm_q",
             "self_attn.norm_k", "norm3", "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o",
             "cross_attn.norm_q", "cross_attn.norm_k", "cross_attn.k_img", "cross_attn.v_img",
             "cross_attn.norm_k_img", "norm2", "ffn.0", "ffn.2"]
    for name in block:
        assert f"blocks.2.{name}" in names, name
    assert "blocks.0.modulation" in dict(model.named_parameters()) and "head.modulation" in dict(model.named_parameters())
    linears = [m for n, m in model.blocks.named_modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 12 * 3 and all(type(m) is nn.Linear for m in linears)


def count(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("preset,in_dim,img", [("14b", 36, True), ("14b", 16, False), ("1.3b", 16, False)])
def test_meta_construction_counts_match_diffusers(preset, in_dim, img):
    cfg = wan_config(preset, in_dim=in_dim, has_image_input=img)
    with torch.device("meta"):
        model = WanDiT(cfg)
        ref = diffusers_model(cfg)
    assert all(p.is_meta for p in model.parameters())
    assert count(model) == count(ref)
    if preset == "14b" and img:
        d, f = 5120, 13824
        # 10 dim x dim linears, FFN, q/k norms (2 + 3), cross-attention norm (weight, bias), modulation
        block = 10 * (d * d + d) + 2 * d * f + f + d + 5 * d + 2 * d + 6 * d
        assert sum(p.numel() for p in model.blocks.parameters()) == 40 * block


def test_meta_then_init_weights_materialises():
    with torch.device("meta"):
        model = WanDiT(wan_config("tiny"))
    model.to_empty(device="cpu")
    model.init_weights()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert torch.equal(model.blocks[0].self_attn.norm_q.weight, torch.ones(64))
    assert torch.equal(model.head.head.weight, torch.zeros_like(model.head.head.weight))
    x, t, context, clip = inputs(model.cfg)
    assert torch.isfinite(model(x, t, context[:, :8], clip)).all()


def test_bf16_model_keeps_fp32_modulation_and_tracks_fp32():
    ours = random_model(True)
    cfg = ours.cfg
    x, t, context, clip = inputs(cfg)
    with torch.no_grad():
        want = ours(x, t, context, clip)
        ours.to(torch.bfloat16)
        e, e0 = ours.embed_time(t)
        got = ours(x, t, context, clip)
    assert e.dtype == e0.dtype == torch.float32
    assert got.dtype == torch.bfloat16
    rel = (got.float() - want).norm() / want.norm()
    assert rel < 0.05, rel


@pytest.mark.parametrize("unit", ["block", "sublayer", "sublayer_ffn"])
@pytest.mark.parametrize("mode", ["full", "selective", "selective_self"])
def test_activation_checkpointing_same_gradients(mode, unit):
    model = random_model(True)
    x, t, context, clip = inputs(model.cfg)
    context = context[:, :16]

    def grads():
        model.zero_grad()
        out = model(x, t, context, clip)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    want = grads()
    names = list(model.state_dict())
    apply_activation_checkpointing(model.blocks, mode, unit=unit)
    assert type(model.blocks[0]).__name__ == "CheckpointedWanBlock" and list(model.state_dict()) == names
    got = grads()
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-6, msg=n)
    apply_activation_checkpointing(model.blocks, "none")
    assert type(model.blocks[0]).__name__ == "WanBlock"
    with pytest.raises(ValueError, match="activation checkpointing mode"):
        apply_activation_checkpointing(model.blocks, "some")
    with pytest.raises(ValueError, match="activation checkpointing unit 'layer'"):
        apply_activation_checkpointing(model.blocks, mode, unit="layer")
    # by sub-layer needs blocks that have them: refused before any block changes
    mixed = nn.ModuleList([model.blocks[0], nn.Linear(2, 2)])
    with pytest.raises(ValueError, match="Linear has no sub-layers"):
        apply_activation_checkpointing(mixed, mode, unit="sublayer")
    assert type(mixed[0]).__name__ == "WanBlock"


@pytest.mark.parametrize("mode,dtype", [("full", "fp32"), ("selective_self", "fp32"), ("selective_self", "bf16")])
def test_compiled_sublayer_checkpointing_keeps_the_residual_stream_and_never_reruns_the_output_projections(mode,
                                                                                                          dtype):
    """Compiled blocks (the partitioner Inductor uses), One4D's frozen base with branch LoRA: by sub-layer, each block
    saves two more token-sized tensors (the residual stream after each attention) and its backward runs two base
    linears fewer (the self- and cross-attention output projections: addmm with their bias), one LoRA product fewer
    each; the gradients are the block unit's. With the FFN split at its activation (`sublayer_ffn`), one more tensor
    is saved, the FFN's ffn_dim-wide pre-activation, and backward runs the FFN's first linear no more. In bf16 too,
    where a cast shared across the split once kept an fp32 copy of the block's residual stream as well."""
    from functorch.compile import min_cut_rematerialization_partition
    from torch._dynamo.backends.common import aot_autograd

    from one4d_train.config import load_config
    from one4d_train.model.compile import compile_blocks
    from one4d_train.model.one4d import build_one4d

    cfg = load_config([f"config={ROOT}/configs/experiment/demo.yaml", f"model.compute_dtype={dtype}"]).model
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    g = torch.Generator().manual_seed(0)
    rgb, xyz = torch.randn(1, 36, 3, 8, 12, generator=g).to(dt), torch.randn(1, 16, 3, 8, 12, generator=g).to(dt)
    context, clip = torch.randn(1, 512, 64, generator=g).to(dt), torch.randn(1, 257, 32, generator=g).to(dt)
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == "fp32" else {"rtol": 2e-2, "atol": 1e-3}
    tokens = 3 * 4 * 6  # each branch's tokens of the latents above (patch 1 x 2 x 2)

    def run(unit):
        torch._dynamo.reset()
        graphs = {}

        def keep(kind):
            return lambda gm, example_inputs: graphs.setdefault(kind, gm).forward

        model = build_one4d(cfg, dtype=dt, seed=3)
        for p in model.trainable_parameters():  # B = 0 would leave some products out of the graphs
            p.data.normal_(0, 0.1, generator=torch.Generator().manual_seed(hash(p.shape) % 1000))
        apply_activation_checkpointing(model.base.blocks, mode, unit=unit)
        compile_blocks(model.base.blocks, fullgraph=True, backend=aot_autograd(
            fw_compiler=keep("fw"), bw_compiler=keep("bw"), partition_fn=min_cut_rematerialization_partition))
        out_rgb, out_xyz = model(rgb, xyz, torch.tensor([500.0]), context, clip)
        (out_rgb.float().square().sum() + out_xyz.float().square().sum()).backward()

        def ops(gm, name):
            return sum(n.op == "call_function" and n.target is name for n in gm.graph.nodes)
        vals = [n.meta["val"] for n in graphs["fw"].graph.find_nodes(op="output")[0].args[0][1:]
                if hasattr(n, "meta") and isinstance(n.meta.get("val"), torch.Tensor)]
        ffn_dim = model.base.cfg.ffn_dim
        token_bytes = 2 * tokens * model.dim * dt.itemsize  # one token-sized tensor in the compute dtype
        counts = {"addmm": ops(graphs["bw"], torch.ops.aten.addmm.default),
                  "bmm": ops(graphs["bw"], torch.ops.aten.bmm.default),  # saved: in token-sized tensors' bytes
                  "saved": sum(v.nbytes for v in vals if tuple(v.shape) == (2, tokens, model.dim)) / token_bytes,
                  "hidden": sum(tuple(v.shape) in ((2 * tokens, ffn_dim), (2, tokens, ffn_dim)) for v in vals)}
        return counts, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    block, want = run("block")
    sublayer, got = run("sublayer")
    assert sublayer == {"addmm": block["addmm"] - 2, "bmm": block["bmm"] - 2, "saved": block["saved"] + 2,
                        "hidden": block["hidden"]}, (block, sublayer)
    for n in want:
        torch.testing.assert_close(got[n], want[n], **tol, msg=n)
    ffn, got = run("sublayer_ffn")
    assert ffn == {"addmm": sublayer["addmm"] - 1, "bmm": sublayer["bmm"] - 1, "saved": sublayer["saved"],
                   "hidden": sublayer["hidden"] + 1}, (sublayer, ffn)
    for n in want:
        torch.testing.assert_close(got[n], want[n], **tol, msg=n)


def test_checkpointing_recomputes_in_backward():
    model = random_model(False)
    cfg = model.cfg
    calls = []
    model.blocks[0].self_attn.q.register_forward_hook(lambda *a: calls.append(1))
    x, t, context, _ = inputs(cfg, batch=1)
    context = context[:, :8]
    model(x, t[:1], context).sum().backward()
    assert len(calls) == 1
    apply_activation_checkpointing(model.blocks, "full")
    model(x, t[:1], context).sum().backward()
    assert len(calls) == 3  # forward, then recompute during backward (hooks run again)


@pytest.mark.parametrize("num_blocks", [0, 1, 2])
def test_checkpointing_the_first_blocks_only(num_blocks):
    """`activation_checkpointing_blocks`: the first N blocks recompute in backward, the others keep their
    activations; the gradients stay those of the uncheckpointed model."""
    model = random_model(False)
    x, t, context, _ = inputs(model.cfg, batch=1)
    context = context[:, :8]
    calls = [0] * len(model.blocks)
    for i, block in enumerate(model.blocks):
        block.self_attn.q.register_forward_hook(lambda *a, i=i: calls.__setitem__(i, calls[i] + 1))

    def grads():
        model.zero_grad()
        model(x, t[:1], context).square().sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    want = grads()
    apply_activation_checkpointing(model.blocks, "full", num_blocks)
    calls[:] = [0] * len(model.blocks)
    got = grads()
    assert calls == [2 if i < num_blocks else 1 for i in range(len(model.blocks))]
    assert [type(b).__name__ for b in model.blocks] == ["CheckpointedWanBlock" if i < num_blocks else "WanBlock"
                                                        for i in range(len(model.blocks))]
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-6, msg=n)
    with pytest.raises(ValueError, match="-1 \\(all\\)"):
        apply_activation_checkpointing(model.blocks, "full", -2)
    # re-applying replaces every block's mode: the blocks past the count lose their checkpointing
    apply_activation_checkpointing(model.blocks, "selective")
    apply_activation_checkpointing(model.blocks, "full", 1)
    assert [getattr(b, "_checkpoint_mode", None) for b in model.blocks] == ["full"] + [None] * (len(model.blocks) - 1)
    assert [type(b).__name__ for b in model.blocks][1:] == ["WanBlock"] * (len(model.blocks) - 1)


def test_model_config_checks_the_checkpointed_block_count():
    from one4d_train.model.config import ModelConfig
    assert not ModelConfig(activation_checkpointing_blocks=12).validate()
    problems = ModelConfig(activation_checkpointing_blocks=-2).validate()
    assert [key for key, _ in problems] == ["activation_checkpointing_blocks"]
    assert not ModelConfig(activation_checkpointing_unit="sublayer").validate()
    problems = ModelConfig(activation_checkpointing_unit="layer").validate()
    assert [key for key, _ in problems] == ["activation_checkpointing_unit"]


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_every_model_builder_checkpoints_only_the_configured_blocks(zero_stage):
    """`build_one4d` and the trainer's `One4DTask.build_model` (the path real runs take) both apply the count."""
    from contextlib import nullcontext

    from one4d_train.config import load_config
    from one4d_train.model.one4d import build_one4d
    from one4d_train.train.one4d_task import One4DTask

    cfg = load_config([f"config={ROOT}/configs/experiment/demo.yaml", "model.activation_checkpointing=selective",
                       "model.activation_checkpointing_blocks=1", f"train.zero_stage={zero_stage}",
                       "model.activation_checkpointing_unit=sublayer"])
    for model in (build_one4d(cfg.model, dtype=torch.float32), One4DTask(cfg).build_model(nullcontext)):
        kinds = [(getattr(b, "_checkpoint_mode", None), getattr(b, "_checkpoint_unit", None)) for b in model.base.blocks]
        assert kinds[0] == ("selective", "sublayer") and set(kinds[1:]) == {(None, None)} and len(kinds) > 1, kinds


@pytest.mark.parametrize("setting", [False, True])
def test_model_compile_compiles_every_block_of_the_trainers_model(setting):
    """model.compile: the trainer's build compiles each block's call (its numerics: test_gpu.py
    test_compiled_blocks_match_eager), and model.compile_vae the VAE encoder (test_compiled_vae_encoder_matches_eager)."""
    from contextlib import nullcontext

    from one4d_train.config import load_config
    from one4d_train.model.compile import is_compiled
    from one4d_train.model.encoders import build_encoders
    from one4d_train.train.one4d_task import One4DTask

    cfg = load_config([f"config={ROOT}/configs/experiment/demo.yaml", f"model.compile={setting}",
                       f"model.compile_vae={setting}", "train.zero_stage=2"])
    task = One4DTask(cfg)
    layers = wan_config(cfg.model.preset).num_layers
    assert [is_compiled(b) for b in task.build_model(nullcontext).base.blocks] == [setting] * layers
    vae = build_encoders(cfg.model, task.wan_cfg, torch.device("cpu"), torch.float32, cfg.seed)[0]
    assert (vae.model.encoder._compiled_call_impl is not None) == setting


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", ["full", "selective"])
def test_gpu_bf16_checkpointing_same_gradients(mode):
    torch.manual_seed(0)
    cfg = wan_config("tiny", dim=256, num_heads=2, ffn_dim=512, text_dim=64)  # head dim 128 as the real models
    model = WanDiT(cfg).cuda().to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    x = torch.randn(2, cfg.in_dim, 5, 16, 24, device="cuda")
    t = torch.tensor([900.0, 100.0], device="cuda")
    context = torch.randn(2, 512, cfg.text_dim, device="cuda")
    clip = torch.randn(2, 257, cfg.image_dim, device="cuda")

    def grads():
        model.zero_grad()
        out = model(x, t, context, clip)
        assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
        out.float().square().mean().backward()
        return {n: p.grad.float().clone() for n, p in model.named_parameters()}

    want = grads()
    apply_activation_checkpointing(model.blocks, mode)
    got = grads()
    for n in want:
        assert torch.allclose(got[n], want[n], rtol=2e-2, atol=1e-3 * want[n].abs().max().item() + 1e-6), n


@pytest.mark.parametrize("mode,recomputed", [("full", 3), ("selective", 0), ("selective_self", 2)])
def test_selective_checkpointing_recomputes_only_what_it_does_not_keep(mode, recomputed, monkeypatch):
    """Attention kernels run again in backward per block: all three under `full` (self, text and image
    cross-attention), none under `selective`, the two cross-attentions under `selective_self`."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from one4d_train.model.checkpointing import _saved_ops

    class CountAttention(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            CountAttention.calls += func in _saved_ops()
            return func(*args, **(kwargs or {}))

    from one4d_train.model import attention

    # one kernel per attention on CPU too (SDPA's flash attention for CPU), as on a GPU
    sdpa = attention._sdpa
    monkeypatch.setattr(attention, "_sdpa", lambda q, k, v, backends: sdpa(q, k, v, None))
    model = random_model(True)
    apply_activation_checkpointing(model.blocks, mode)
    x, t, context, clip = inputs(model.cfg, batch=1)
    loss = model(x, t[:1], context[:1, :16], clip[:1]).square().sum()
    with CountAttention():
        loss.backward()
    assert CountAttention.calls == recomputed * len(model.blocks), CountAttention.calls
