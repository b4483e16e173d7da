"""DLC: the branch-routed LoRA linear, control links and the One4D model's branch semantics."""
import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from one4d_train.model.config import LoRAConfig
from one4d_train.model.control_links import ControlLinks, evenly_spaced_blocks, resolve_link_blocks
from one4d_train.model.dlc import BranchLoRALinear, apply_dlc, only_branch


def randomise_lora(layer: BranchLoRALinear, seed: int):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g))


def branch_weights(layer: BranchLoRALinear, branch: str):
    i = layer.branches.index(branch)
    return layer.lora_A[i], layer.lora_B[i]


def merged(layer: BranchLoRALinear, branch: str) -> nn.Linear:
    """The base linear with one branch's LoRA folded into its weight: an independent reference."""
    ref = copy.deepcopy(layer.base_layer)
    a, b = branch_weights(layer, branch)
    with torch.no_grad():
        ref.weight += (layer.scaling * b.float() @ a.float()).to(ref.weight.dtype)
    return ref


def test_lora_step0_equals_base_exactly():
    torch.manual_seed(0)
    base = nn.Linear(24, 40)
    layer = BranchLoRALinear(copy.deepcopy(base), rank=4, alpha=8)
    x = torch.randn(4, 7, 24)
    assert torch.equal(layer(x), base(x))
    assert not any(p.requires_grad for p in layer.base_layer.parameters())
    assert layer.lora_A.dtype == layer.lora_B.dtype == torch.float32
    assert layer.lora_A.shape == (2, 4, 24) and layer.lora_B.shape == (2, 40, 4)


def test_lora_routes_halves_to_their_branch():
    torch.manual_seed(0)
    layer = BranchLoRALinear(nn.Linear(24, 40), rank=4, alpha=8)
    randomise_lora(layer, 1)
    x = torch.randn(6, 5, 24)
    y = layer(x)
    torch.testing.assert_close(y[:3], merged(layer, "rgb")(x[:3]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y[3:], merged(layer, "xyz")(x[3:]), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(y[:3], merged(layer, "xyz")(x[:3]), atol=1e-3)


def test_only_branch_applies_one_adapter_to_whole_batch():
    torch.manual_seed(0)
    layer = BranchLoRALinear(nn.Linear(24, 40), rank=4, alpha=8)
    randomise_lora(layer, 1)
    x = torch.randn(3, 5, 24)
    with only_branch(layer, "xyz"):
        y = layer(x)
    torch.testing.assert_close(y, merged(layer, "xyz")(x), atol=1e-5, rtol=1e-5)
    assert layer.only_branch is None
    with pytest.raises(ValueError, match="does not split"):
        layer(x)


def test_shared_branch_applies_to_whole_batch():
    torch.manual_seed(0)
    layer = BranchLoRALinear(nn.Linear(24, 40), branches=("shared",), rank=4, alpha=4)
    randomise_lora(layer, 2)
    x = torch.randn(3, 5, 24)
    torch.testing.assert_close(layer(x), merged(layer, "shared")(x), atol=1e-5, rtol=1e-5)


def test_bf16_base_with_fp32_lora_gradients():
    torch.manual_seed(0)
    layer = BranchLoRALinear(nn.Linear(32, 32).to(torch.bfloat16), rank=8, alpha=8)
    randomise_lora(layer, 3)
    x = torch.randn(4, 3, 32, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().square().mean().backward()
    assert layer.lora_A.grad.dtype == torch.float32
    assert (layer.lora_A.grad.flatten(1).abs().sum(1) > 0).all()
    ref = merged(layer, "rgb").float()(x[:2].float())
    torch.testing.assert_close(y[:2].float(), ref, atol=0.1, rtol=0.05)


def _layer_pair(dtype=torch.float32, bias=True, branches=("rgb", "xyz"), seed=0):
    """The same layer on the fused operator and on the separate products (B random: every product non-zero)."""
    torch.manual_seed(seed)
    fused = BranchLoRALinear(nn.Linear(24, 40, bias=bias).to(dtype), branches, rank=4, alpha=8, kernel="fused")
    randomise_lora(fused, seed + 1)
    separate = copy.deepcopy(fused)
    separate.kernel = "bmm"
    return fused, separate


def _run(layer, x, weights):
    x = x.detach().clone().requires_grad_()
    y = layer(x)
    (y.float() * weights).square().sum().backward()
    grads = (x.grad, layer.lora_A.grad, layer.lora_B.grad)
    layer.zero_grad()
    return y.detach(), grads


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("branches,only", [(("rgb", "xyz"), None), (("rgb", "xyz"), "xyz"), (("shared",), None)])
def test_fused_kernel_gives_the_separate_products_output_and_gradients(bias, branches, only):
    """fp32: the fused operator (deltas accumulated in the base GEMM, its own backward) against the base linear plus
    the two batched products under autograd, for routed halves, one branch on the whole batch and a shared adapter."""
    fused, separate = _layer_pair(bias=bias, branches=branches)
    x = torch.randn(4, 3, 5, 24)
    weights = torch.linspace(0.5, 2.0, 40)
    results = []
    for layer in (fused, separate):
        with only_branch(layer, only) if only else contextlib.nullcontext():
            results.append(_run(layer, x, weights))
    (y_f, g_f), (y_s, g_s) = results
    assert y_f.shape == (4, 3, 5, 40)
    torch.testing.assert_close(y_f, y_s, rtol=1e-5, atol=1e-5)
    for name, a, b in zip(("x", "lora_A", "lora_B"), g_f, g_s):
        assert a.dtype == b.dtype and a.abs().max() > 0, name
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item(), msg=name)
    if only:  # the other adapter untouched
        assert fused.lora_A.grad is None or fused.lora_A.grad[0].abs().max() == 0


def test_fused_kernel_in_bf16_is_as_close_to_fp32_as_the_separate_products():
    fused, separate = _layer_pair(dtype=torch.bfloat16, seed=3)
    exact = copy.deepcopy(separate).float()
    x = torch.randn(8, 16, 24)
    weights = torch.linspace(0.5, 2.0, 40)
    y_e, g_e = _run(exact, x, weights)
    for layer in (fused, separate):
        y, g = _run(layer, x.bfloat16(), weights)
        assert y.dtype == torch.bfloat16 and g[1].dtype == g[2].dtype == torch.float32
        errors = [((a.float() - b).norm() / b.norm()).item() for a, b in zip((y,) + g, (y_e,) + g_e)]
        if layer is fused:
            fused_errors = errors
    for name, f, s in zip(("y", "x", "lora_A", "lora_B"), fused_errors, errors):
        assert f <= 2 * s + 1e-3, (name, f, s)


def test_fused_operator_registration_passes_opcheck():
    """Schema, fake (meta) functions and autograd registration of one4d::branch_lora_linear and its backward."""
    from one4d_train.model import lora_op

    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 24, generator=g, requires_grad=True)
    w, bias = torch.randn(40, 24, generator=g), torch.randn(40, generator=g)
    a = torch.randn(2, 4, 24, generator=g, requires_grad=True)
    b = torch.randn(2, 40, 4, generator=g, requires_grad=True)
    torch.library.opcheck(lora_op.branch_lora_linear_op, (x, w, bias, a, b, 2.0))
    torch.library.opcheck(lora_op.branch_lora_linear_op, (x, w, None, a, b, 0.5))
    y, h = lora_op.branch_lora_linear_op(x, w, bias, a, b, 2.0)
    for input_grad in (True, False):
        torch.library.opcheck(lora_op.branch_lora_linear_backward_op,
                              (torch.randn(6, 40, generator=g), x.detach(), h.detach(), w, a.detach(), b.detach(),
                               2.0, input_grad))


def test_fused_kernel_compiles_into_one_graph_under_selective_checkpointing():
    """Compiled (fullgraph: no break around the operator) inside a selectively checkpointed region, the layer gives
    the eager separate products' gradients."""
    from torch.utils.checkpoint import checkpoint

    from one4d_train.model.checkpointing import _selective_context

    fused, separate = _layer_pair(seed=5)
    x = torch.randn(4, 6, 24)

    def region(layer):
        return lambda t: checkpoint(lambda u: torch.sin(layer(u)), t, use_reentrant=False,
                                    context_fn=_selective_context)

    compiled = torch.compile(region(fused), fullgraph=True)
    xs = x.clone().requires_grad_()
    compiled(xs).square().sum().backward()
    xr = x.clone().requires_grad_()
    region(separate)(xr).square().sum().backward()
    torch.testing.assert_close(xs.grad, xr.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fused.lora_A.grad, separate.lora_A.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fused.lora_B.grad, separate.lora_B.grad, rtol=1e-4, atol=1e-5)


def test_fused_kernel_steps_aside_where_it_cannot_apply(monkeypatch):
    """Active LoRA dropout, autocast, a trainable or non-Linear (FP8) base, a base in another dtype and ZeRO-3's
    partitioned weights run the separate products; a frozen plain base runs the operator."""
    from one4d_train.model import dlc

    calls = []
    real = dlc.branch_lora_linear
    monkeypatch.setattr(dlc, "branch_lora_linear", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = torch.randn(2, 3, 24)

    def uses_operator(layer, inp=x):
        calls.clear()
        try:
            layer(inp)
        except RuntimeError:  # the separate products' own dtype check (a float64 input on a float32 base)
            pass
        return bool(calls)

    assert not uses_operator(BranchLoRALinear(nn.Linear(24, 40), rank=4, alpha=8))  # the default: bmm
    layer = BranchLoRALinear(nn.Linear(24, 40), rank=4, alpha=8, kernel="fused")
    assert uses_operator(layer)
    layer.kernel = "bmm"
    assert not uses_operator(layer)
    dropped = BranchLoRALinear(nn.Linear(24, 40), rank=4, alpha=8, dropout=0.1, kernel="fused")
    assert not uses_operator(dropped)
    assert uses_operator(dropped.eval())  # dropout inactive in eval
    layer = BranchLoRALinear(nn.Linear(24, 40), rank=4, alpha=8, kernel="fused")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not uses_operator(layer)
    assert not uses_operator(layer, x.double())
    layer.base_layer.weight.requires_grad_(True)
    assert not uses_operator(layer)
    layer.base_layer.weight.requires_grad_(False)
    assert uses_operator(layer)
    layer.base_layer.weight.ds_id = 7  # what ZeRO-3 marks its partitioned parameters with
    assert not uses_operator(layer)

    class Other(nn.Linear):  # FP8 bases and other linear types
        pass
    assert not uses_operator(BranchLoRALinear(Other(24, 40), rank=4, alpha=8, kernel="fused"))
    with pytest.raises(ValueError, match="branch LoRA kernel 'triton'"):
        BranchLoRALinear(nn.Linear(24, 40), kernel="triton")


def test_zero3_registers_the_base_weights_of_fused_layers_only():
    """Under ZeRO-3 the fused operator reads the base weight without the base linear's call, so the weight and bias
    become external parameters of the branch layer; a layer on the separate products gathers them by that call."""
    from one4d_train.model.dlc import share_base_with_zero3

    model = nn.Module()
    model.fused = BranchLoRALinear(nn.Linear(8, 8), rank=2, alpha=2, kernel="fused")
    model.separate = BranchLoRALinear(nn.Linear(8, 8), rank=2, alpha=2)
    share_base_with_zero3(model)
    registered = {id(p) for p in getattr(model.fused, "_external_params", {}).values()}
    assert registered == {id(model.fused.base_layer.weight), id(model.fused.base_layer.bias)}
    assert not getattr(model.separate, "_external_params", {})
    # partitioned (ZeRO-3 marks the weights), the registered layer still runs the operator, an unregistered one not
    x = torch.randn(2, 8)
    for layer, ds_id in ((model.fused, 7), (model.separate, 8)):
        layer.base_layer.weight.ds_id = ds_id
        layer.kernel = "fused"
    assert model.fused._fused_applies(x) and not model.separate._fused_applies(x)


def test_apply_dlc_replaces_targets_and_freezes_base():
    block = nn.Module()
    block.self_attn = nn.Module()
    block.self_attn.q = nn.Linear(8, 8)
    block.ffn = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))
    block.norm = nn.LayerNorm(8)
    model = nn.Module()
    model.blocks = nn.ModuleList([block])
    apply_dlc(model, LoRAConfig(rank=2, targets=["self_attn.q", "cross_attn.k_img", "ffn.0", "ffn.2"]))
    assert isinstance(block.self_attn.q, BranchLoRALinear)
    assert isinstance(block.ffn[0], BranchLoRALinear) and isinstance(block.ffn[2], BranchLoRALinear)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    assert "blocks.0.self_attn.q.lora_A" in trainable and "blocks.0.ffn.2.lora_B" in trainable


def test_lora_targets_must_be_block_linears():
    """A misspelt target would otherwise be skipped like k_img/v_img in t2v: fewer adapters, silently."""
    from one4d_train.config import ConfigError, load_config

    assert load_config(["model.lora.targets=[self_attn.q,ffn.2]"]).model.lora.targets == ["self_attn.q", "ffn.2"]
    with pytest.raises(ConfigError, match=r"command line: key 'model.lora.targets'.*unknown: \['self_attn.kk'\]"):
        load_config(["model.lora.targets=[self_attn.q,self_attn.kk]"])
    with pytest.raises(ConfigError, match=r"key 'model.lora.targets'"):
        load_config(["model.lora.targets=[]"])


def test_lora_alpha_must_be_positive():
    """alpha 0 scales every delta, and so both adapter gradients, to 0: the adapters would never train."""
    from one4d_train.config import ConfigError, load_config

    layer = BranchLoRALinear(nn.Linear(8, 8), rank=4, alpha=0.0)
    layer(torch.randn(4, 3, 8)).square().sum().backward()
    assert layer.lora_A.grad.abs().max() == 0 and layer.lora_B.grad.abs().max() == 0
    for alpha in (0.0, -8.0):
        with pytest.raises(ConfigError, match=r"command line: key 'model.lora.alpha'"):
            load_config([f"model.lora.alpha={alpha}"])
    assert load_config(["model.lora.alpha=16"]).model.lora.alpha == 16


def test_evenly_spaced_blocks():
    assert evenly_spaced_blocks(40, 5) == [4, 12, 20, 28, 36]
    assert evenly_spaced_blocks(30, 5) == [3, 9, 15, 21, 27]
    assert evenly_spaced_blocks(4, 4) == [0, 1, 2, 3]
    assert evenly_spaced_blocks(10, 1) == [5]
    assert evenly_spaced_blocks(10, 0) == []
    for n in range(1, 41):
        for k in range(n + 1):
            blocks = evenly_spaced_blocks(n, k)
            assert len(set(blocks)) == k and all(0 <= b < n for b in blocks) and blocks == sorted(blocks)
    with pytest.raises(ValueError):
        evenly_spaced_blocks(4, 5)
    assert resolve_link_blocks([7, 2], 5, 10) == [2, 7]
    with pytest.raises(ValueError, match="link_blocks"):
        resolve_link_blocks([10], 5, 10)


@pytest.mark.parametrize("setting, key", [("model.num_links=41", "model.num_links"),
                                          ("model.link_blocks=[3,40]", "model.link_blocks"),
                                          ("model.link_blocks=[4,4]", "model.link_blocks")])
def test_link_blocks_checked_before_any_process_group(setting, key):
    """Valid values alone, these failed in One4DModel, after every rank had loaded the frozen base."""
    from one4d_train.config import load_config
    from one4d_train.train.one4d_task import One4DTask

    cfg = load_config(["model.preset=14b", setting])
    assert [k for k, _ in One4DTask.config_problems(cfg) if "link" in k] == [key]
    assert not [k for k, _ in One4DTask.config_problems(load_config(["model.preset=14b"])) if "link" in k]
    ablation = load_config(["model.preset=14b", "model.design=width_concat", setting])  # no links to place
    assert not [k for k, _ in One4DTask.config_problems(ablation) if "link" in k]


def test_links_zero_init_and_pre_update_values():
    torch.manual_seed(0)
    links = ControlLinks(6, [1])
    x = torch.randn(4, 3, 6)
    assert torch.equal(links(1, x), x)
    with torch.no_grad():
        for p in links.parameters():
            p.copy_(torch.randn_like(p))
    link = links.links["1"]
    rgb, xyz = x[:2], x[2:]
    expected = torch.cat([rgb + xyz @ link.rgb_from_xyz.weight.T, xyz + rgb @ link.xyz_from_rgb.weight.T])
    torch.testing.assert_close(links(1, x), expected)
    assert not links.has(0)


# ---- the One4D model on the tiny backbone --------------------------------------------------------------------

from one4d_train.model.backbone import WanDiT, wan_config  # noqa: E402
from one4d_train.model.config import ModelConfig  # noqa: E402
from one4d_train.model.one4d import One4DModel, build_one4d  # noqa: E402
from one4d_train.model.params import count_parameters  # noqa: E402

LINK_BLOCKS = [0, 2]


def tiny_cfg(design="dlc", **kw) -> ModelConfig:
    kw = {"activation_checkpointing": "none", **kw}
    return ModelConfig(preset="tiny", design=design, lora=LoRAConfig(rank=4, alpha=8), link_blocks=list(LINK_BLOCKS),
                       compute_dtype="fp32", attention="math", **kw)


def random_base(seed=0, has_image_input=True) -> WanDiT:
    """A tiny backbone with every weight random (Wan's init zeroes the head, which would hide everything)."""
    torch.manual_seed(seed)
    base = WanDiT(wan_config("tiny", has_image_input=has_image_input))
    with torch.no_grad():
        for p in base.parameters():
            p.normal_(0, 0.2)
    return base


def tiny_one4d(design="dlc", seed=0, **kw):
    """(One4D model, untouched copy of its base)."""
    base = random_base(seed)
    reference = copy.deepcopy(base)
    return One4DModel(base, tiny_cfg(design, **kw)), reference


def model_inputs(batch=2, seed=1, text_len=16):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 36, 3, 4, 6, generator=g), torch.randn(batch, 16, 3, 4, 6, generator=g),
            torch.tensor([999.0, 321.5][:batch]), torch.randn(batch, text_len, 64, generator=g),
            torch.randn(batch, 257, 32, generator=g))


def randomise_trainable(model, *, lora=True, links=True, seed=5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if (lora and name.endswith("lora_B")) or (links and name.startswith("control_links.")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def merged_backbone(model: One4DModel, branch: str) -> WanDiT:
    """The base with only `branch`'s LoRA folded into its weights (links ignored)."""
    ref = copy.deepcopy(model.base)
    for block in ref.blocks:
        for name, module in list(block.named_modules()):
            if isinstance(module, BranchLoRALinear):
                parent, _, child = name.rpartition(".")
                block.get_submodule(parent).add_module(child, merged(module, branch))
    if branch == "xyz":
        ref.patch_embedding = model.xyz_patch_embedding
    return ref


def padded_xyz(xyz):
    return torch.cat([xyz, xyz.new_zeros(xyz.shape[0], 20, *xyz.shape[2:])], dim=1)


def test_rgb_branch_equals_base_at_step0():
    model, base = tiny_one4d()
    rgb, xyz, t, ctx, clip = model_inputs()
    with torch.no_grad():
        v_rgb, v_xyz = model(rgb, xyz, t, ctx, clip)
        want_rgb = base(rgb, t, ctx, clip)
        want_xyz = base(padded_xyz(xyz), t, ctx, clip)
    assert v_rgb.shape == v_xyz.shape == (2, 16, 3, 4, 6)
    assert want_rgb.abs().max() > 1.0
    assert torch.equal(v_rgb, want_rgb)
    assert torch.equal(v_xyz, want_xyz)  # the XYZ embedding starts as the base's


def test_one_optimiser_step_changes_only_trainable_parameters():
    model, _ = tiny_one4d()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2, weight_decay=0.0)
    v_rgb, v_xyz = model(*model_inputs())
    (v_rgb.square().mean() + v_xyz.square().mean()).backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed <= trainable
    for n, p in model.named_parameters():
        if n not in trainable:
            assert torch.equal(p, before[n]), n
    # B moves first (A's gradient is zero while B is); links and the XYZ embedding move at once
    params = dict(model.named_parameters())
    for n in trainable:
        if n.endswith("lora_B"):
            assert all(not torch.equal(p, q) for p, q in zip(params[n], before[n])), n  # both branches
        if n.endswith("lora_A"):
            assert n not in changed
    assert {n for n in changed if n.startswith("control_links.")} == {n for n in trainable
                                                                       if n.startswith("control_links.")}
    assert "xyz_patch_embedding.weight" in changed


def test_batched_branches_match_separate_runs():
    model, _ = tiny_one4d()
    randomise_trainable(model, links=False)
    with torch.no_grad():
        model.xyz_patch_embedding.weight.add_(0.05)
    rgb, xyz, t, ctx, clip = model_inputs()
    with torch.no_grad():
        v_rgb, v_xyz = model(rgb, xyz, t, ctx, clip)
        want_rgb = merged_backbone(model, "rgb")(rgb, t, ctx, clip)
        want_xyz = merged_backbone(model, "xyz")(padded_xyz(xyz), t, ctx, clip)
    torch.testing.assert_close(v_rgb, want_rgb, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(v_xyz, want_xyz, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(v_rgb, merged_backbone(model, "xyz")(rgb, t, ctx, clip), atol=1e-2)


def two_sequence_reference(model, rgb, xyz, t, ctx, clip):
    """Each branch its own sequence through its own merged backbone, links applied in a plain loop."""
    ref = {b: merged_backbone(model, b) for b in ("rgb", "xyz")}
    e, e0 = ref["rgb"].embed_time(t)
    context = ref["rgb"].embed_context(ctx, clip)
    x = {"rgb": ref["rgb"].patchify(rgb)[0]}
    x["xyz"], grid = ref["xyz"].patchify(padded_xyz(xyz))
    freqs = ref["rgb"].rope_freqs(grid, rgb.device)
    for i in range(len(model.base.blocks)):
        x = {b: ref[b].blocks[i](x[b], e0, context, freqs) for b in x}
        if i in LINK_BLOCKS:
            link = model.control_links.links[str(i)]
            x = {"rgb": x["rgb"] + x["xyz"] @ link.rgb_from_xyz.weight.T,
                 "xyz": x["xyz"] + x["rgb"] @ link.xyz_from_rgb.weight.T}
    return tuple(ref[b].unpatchify(ref[b].head_out(x[b], e), grid) for b in ("rgb", "xyz"))


def test_links_match_two_sequence_loop():
    model, _ = tiny_one4d()
    randomise_trainable(model)
    rgb, xyz, t, ctx, clip = model_inputs()
    with torch.no_grad():
        got = model(rgb, xyz, t, ctx, clip)
        want = two_sequence_reference(model, rgb, xyz, t, ctx, clip)
        no_links = merged_backbone(model, "rgb")(rgb, t, ctx, clip)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(got[0], no_links, atol=1e-2)  # the links do act


EXPECTED_GROUPS = {
    "dlc": {"lora.rgb", "lora.xyz", "links"},
    "channel_concat": {"lora.shared", "io"},
    "width_concat": {"lora.shared"},
}


@pytest.mark.parametrize("design", list(EXPECTED_GROUPS))
def test_design_forward_backward_and_groups(design):
    model, _ = tiny_one4d(design)
    v_rgb, v_xyz = model(*model_inputs())
    assert v_rgb.shape == v_xyz.shape == (2, 16, 3, 4, 6)
    (v_rgb.square().mean() + v_xyz.square().mean()).backward()
    counts = count_parameters(model)
    groups = {g for g, n in counts.items() if n and g not in ("lora", "base", "trainable")}
    assert groups == EXPECTED_GROUPS[design]
    for n, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, n
        assert not p.requires_grad or p.dtype == torch.float32
    assert counts["trainable"] == sum(counts[g] for g in EXPECTED_GROUPS[design])


def test_channel_concat_starts_from_the_base():
    model, base = tiny_one4d("channel_concat")
    rgb, xyz, t, ctx, clip = model_inputs()
    with torch.no_grad():
        v_rgb, v_xyz = model(rgb, xyz, t, ctx, clip)
        want = base(rgb, t, ctx, clip)
    torch.testing.assert_close(v_rgb, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(v_xyz, want, rtol=1e-5, atol=1e-5)


def test_width_concat_is_one_wide_sequence():
    model, base = tiny_one4d("width_concat")
    rgb, xyz, t, ctx, clip = model_inputs()
    with torch.no_grad():
        v_rgb, v_xyz = model(rgb, xyz, t, ctx, clip)
        want = base(torch.cat([rgb, padded_xyz(xyz)], dim=-1), t, ctx, clip)
    assert torch.equal(torch.cat([v_rgb, v_xyz], dim=-1), want)
    assert (3, 2, 6) in {k[0] for k in model.base._rope_cache}  # RoPE over the doubled width


def test_xyz_branch_without_own_embedding_uses_the_base():
    model, base = tiny_one4d(xyz_patch_embedding=False)
    assert model.xyz_patch_embedding is None
    rgb, xyz, t, ctx, clip = model_inputs()
    with torch.no_grad():
        _, v_xyz = model(rgb, xyz, t, ctx, clip)
    assert torch.equal(v_xyz, base(padded_xyz(xyz), t, ctx, clip))
    assert not any(n.startswith("xyz_patch_embedding") for n, _ in model.named_parameters())


def test_xyz_branch_sees_the_condition_latent_only_through_links_but_shares_the_context():
    """What umc.py says of the XYZ branch: with zero links the RGB input (mask, z_c) cannot reach it, the CLIP
    tokens of the observed frame do (both halves cross-attend to one context)."""
    model, _ = tiny_one4d()
    rgb, xyz, t, ctx, clip = model_inputs()
    with torch.no_grad():
        _, v_xyz = model(rgb, xyz, t, ctx, clip)
        _, other_rgb_input = model(torch.randn_like(rgb), xyz, t, ctx, clip)
        _, other_image = model(rgb, xyz, t, ctx, torch.randn_like(clip))
    assert torch.equal(v_xyz, other_rgb_input)
    assert not torch.allclose(v_xyz, other_image, atol=1e-3)


def test_build_one4d_seeded_checkpointed_and_bf16():
    a = build_one4d(tiny_cfg(), "cpu", torch.float32, seed=3)
    c = build_one4d(tiny_cfg(activation_checkpointing="full"), "cpu", torch.float32, seed=3)
    assert type(c.base.blocks[0]).__name__.startswith("Checkpointed")
    for (n, p), q in zip(a.named_parameters(), c.parameters()):
        assert torch.equal(p, q), n  # the seed covers the base and the trainable parts
    for m in (a, c):
        randomise_trainable(m)
        with torch.no_grad():
            m.base.head.head.weight.normal_(0, 0.2, generator=torch.Generator().manual_seed(0))
        v_rgb, v_xyz = m(*model_inputs())
        (v_rgb.square().mean() + v_xyz.square().mean()).backward()
    for (n, p), q in zip(a.named_parameters(), c.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=n)

    low = build_one4d(tiny_cfg(), "cpu", torch.bfloat16, seed=3)
    assert low.base.blocks[0].self_attn.q.base_layer.weight.dtype == torch.bfloat16
    v_rgb, v_xyz = low(*model_inputs())
    assert v_rgb.dtype == torch.bfloat16
    (v_rgb.float().square().mean() + v_xyz.float().square().mean()).backward()
    grads = [p.grad for p in low.trainable_parameters()]
    assert all(g is not None and g.dtype == torch.float32 for g in grads)
    assert set(low.trainable_state_dict()) == {n for n, p in low.named_parameters() if p.requires_grad}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kernel", ["bmm", "fused"])
def test_bf16_batched_layer_matches_per_branch_reference_on_gpu(kernel):
    torch.manual_seed(0)
    layer = BranchLoRALinear(nn.Linear(1536, 8960, device="cuda", dtype=torch.bfloat16), rank=64, alpha=32,
                             kernel=kernel)
    randomise_lora(layer, 4)
    with torch.no_grad():
        layer.lora_B.mul_(0.02)
    x = torch.randn(4, 1024, 1536, device="cuda", dtype=torch.bfloat16)
    y = layer(x)
    y.float().square().mean().backward()
    assert y.dtype == torch.bfloat16 and layer.lora_A.grad.dtype == layer.lora_B.grad.dtype == torch.float32
    base = layer.base_layer
    for i, b in enumerate(layer.branches):
        half = x[2 * i:2 * i + 2]
        a, b_ = (w.detach().clone().requires_grad_() for w in branch_weights(layer, b))
        exact = F.linear(half.float(), base.weight.float(), base.bias.float())
        exact = exact + layer.scaling * half.float() @ a.T @ b_.T
        # that branch alone in bf16: its own base matmul and LoRA
        separate = base(half) + layer.scaling * (half @ a.detach().bfloat16().T) @ b_.detach().bfloat16().T
        err = (y[2 * i:2 * i + 2].float() - exact.detach()).abs().max()
        assert err <= 2 * (separate.float() - exact.detach()).abs().max() + 1e-3, b
        (exact.square().sum() / y.numel()).backward()
        torch.testing.assert_close(layer.lora_B.grad[i], b_.grad, rtol=3e-2, atol=3e-2 * b_.grad.abs().max())
        torch.testing.assert_close(layer.lora_A.grad[i], a.grad, rtol=3e-2, atol=3e-2 * a.grad.abs().max())
