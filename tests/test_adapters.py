"""Adapter export/import: standard LoRA files that diffusers loads, links on their own, exact round trip."""
import json
import os
import stat

import pytest
import torch
from safetensors import safe_open
from torch import nn

from one4d_train.model.adapters import AdapterError, export_adapters, load_adapters, read_adapters
from one4d_train.model.backbone import sinusoidal_embedding
from one4d_train.model.one4d import One4DModel, build_one4d
from one4d_train.model.state_dict import official_to_diffusers
from test_dlc import model_inputs, random_base, randomise_trainable, tiny_cfg, tiny_one4d


class WanSinusoid(nn.Module):
    """Wan's fp64 timestep sinusoid in place of diffusers' fp32 one (they differ by ~1e-4 at t ~ 1000)."""

    def __init__(self, dim):
        super().__init__()
        self.dim = dim

    def forward(self, t):
        return sinusoidal_embedding(t, self.dim)


def diffusers_twin(base):
    """diffusers' WanTransformer3DModel with `base`'s weights and Wan's fp64 timestep sinusoid."""
    from diffusers import WanTransformer3DModel

    cfg = base.cfg
    ref = WanTransformer3DModel(
        patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
        in_channels=cfg.in_dim, out_channels=cfg.out_dim, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
        ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers, cross_attn_norm=cfg.cross_attn_norm, eps=cfg.eps,
        image_dim=cfg.image_dim, added_kv_proj_dim=cfg.dim).eval()
    ref.load_state_dict({official_to_diffusers(k): v for k, v in base.state_dict().items()})
    ref.condition_embedder.timesteps_proj = WanSinusoid(cfg.freq_dim)
    return ref


def randomise_all_trainable(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=g))


def test_export_layout_and_round_trip(tmp_path):
    model, _ = tiny_one4d()
    randomise_all_trainable(model, 1)
    config = export_adapters(model.trainable_state_dict(), model.cfg, str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "control_links.safetensors",
                                            "lora_rgb.safetensors", "lora_xyz.safetensors"]
    on_disk = json.loads((tmp_path / "adapter_config.json").read_text())
    assert on_disk == config
    assert config["design"] == "dlc" and config["branches"] == ["rgb", "xyz"]
    assert config["link_blocks"] == [0, 2] and config["xyz_patch_embedding"] is True
    assert config["lora"]["rank"] == 4 and config["lora"]["alpha"] == 8
    assert config["lora"]["targets"] == model.cfg.lora.targets
    with safe_open(str(tmp_path / "lora_rgb.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        metadata = json.loads(f.metadata()["lora_adapter_metadata"])
    assert "transformer.blocks.0.attn1.to_q.lora_A.weight" in keys
    assert "transformer.blocks.2.attn2.add_k_proj.lora_B.weight" in keys
    assert "transformer.blocks.1.ffn.net.0.proj.lora_B.weight" in keys
    assert len(keys) == 3 * 12 * 2
    assert metadata["transformer.r"] == 4 and metadata["transformer.lora_alpha"] == 4
    with safe_open(str(tmp_path / "control_links.safetensors"), framework="pt") as f:
        links = {f"control_links.links.{i}.{d}.weight" for i in (0, 2) for d in ("rgb_from_xyz", "xyz_from_rgb")}
        assert set(f.keys()) == links | {"xyz_patch_embedding.weight", "xyz_patch_embedding.bias"}

    fresh, _ = tiny_one4d(seed=7)
    load_adapters(fresh, str(tmp_path))
    want = model.trainable_state_dict()
    got = fresh.trainable_state_dict()
    assert set(got) == set(want)
    for name in want:
        assert torch.equal(got[name], want[name]), name


def test_shared_adapter_design_round_trip(tmp_path):
    model, _ = tiny_one4d("channel_concat")
    randomise_all_trainable(model, 2)
    config = export_adapters(model.trainable_state_dict(), model.cfg, str(tmp_path))
    assert config["branches"] == ["shared"] and set(config["files"]) == {"lora.shared", "io"}
    fresh, _ = tiny_one4d("channel_concat", seed=3)
    load_adapters(fresh, str(tmp_path))
    for name, tensor in model.trainable_state_dict().items():
        assert torch.equal(fresh.trainable_state_dict()[name], tensor), name
    dlc, _ = tiny_one4d("dlc")
    with pytest.raises(ValueError, match="design"):
        load_adapters(dlc, str(tmp_path))


def test_load_reports_missing_parameters(tmp_path):
    model, _ = tiny_one4d()
    state = model.trainable_state_dict()
    del state["control_links.links.2.xyz_from_rgb.weight"]
    export_adapters(state, model.cfg, str(tmp_path))
    with pytest.raises(AdapterError, match="xyz_from_rgb"):
        load_adapters(model, str(tmp_path))


def _edit_config(folder, edit):
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_exported_files_are_as_readable_as_the_umask_allows(tmp_path, umask):
    """safetensors creates its files 0600 whatever the umask: teammates could not read exported adapters."""
    model, _ = tiny_one4d()
    old = os.umask(umask)
    try:
        export_adapters(model.trainable_state_dict(), model.cfg, str(tmp_path))
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    assert len(modes) == 4 and set(modes.values()) == {0o666 & ~umask}, modes


def test_damaged_exports_name_the_file_and_key(tmp_path):
    model, _ = tiny_one4d()
    export_adapters(model.trainable_state_dict(), model.cfg, str(tmp_path))
    config_file, lora = tmp_path / "adapter_config.json", tmp_path / "lora_rgb.safetensors"
    good_config, good_lora = config_file.read_text(), lora.read_bytes()

    lora.write_bytes(good_lora[: len(good_lora) // 2])  # a copy cut short
    with pytest.raises(AdapterError, match=r"lora_rgb\.safetensors.*(truncated|incomplete)"):
        read_adapters(str(tmp_path))
    lora.unlink()
    with pytest.raises(AdapterError, match=r"lora_rgb\.safetensors.*missing"):
        load_adapters(model, str(tmp_path))
    lora.write_bytes(good_lora)
    # the xyz branch's file from an export of another LoRA rank: it was torch.stack's traceback, naming no file
    from safetensors.torch import load_file, save_file

    wider = {k: torch.cat([v, v], dim=0 if ".lora_A." in k else 1) for k, v in load_file(str(lora)).items()}
    save_file(wider, str(tmp_path / "lora_xyz.safetensors"))
    with pytest.raises(AdapterError, match=r"is \[\d+, \d+\] in lora_rgb\.safetensors, \[\d+, \d+\] in "
                                           r"lora_xyz\.safetensors: the branches' files are of different exports"):
        read_adapters(str(tmp_path))
    export_adapters(model.trainable_state_dict(), model.cfg, str(tmp_path))

    config_file.write_text(good_config[:40])
    with pytest.raises(AdapterError, match=r"adapter_config\.json.*not valid JSON"):
        load_adapters(model, str(tmp_path))
    config_file.write_text(good_config)
    _edit_config(tmp_path, lambda c: c["lora"].pop("alpha"))
    with pytest.raises(AdapterError, match=r"adapter_config\.json.*'lora\.alpha'"):
        read_adapters(str(tmp_path))
    config_file.write_text(good_config)
    _edit_config(tmp_path, lambda c: c["lora"].update(rank="4"))
    with pytest.raises(AdapterError, match=r"adapter_config\.json.*'lora\.rank'"):
        read_adapters(str(tmp_path))
    # hand edits that swapped the branches (loaded rc=0, the XYZ adapters on the RGB half) or crashed with a TypeError
    edits = {"branches": (lambda c: c.update(branches=["xyz", "rgb"]), r"key 'branches' must be \['rgb', 'xyz'\]"),
             "swapped files": (lambda c: c["files"].update({"lora.rgb": "lora_xyz.safetensors",
                                                            "lora.xyz": "lora_rgb.safetensors"}),
                               r"key 'files' maps 'lora\.rgb' to 'lora_xyz\.safetensors'; an export names it "
                               r"'lora_rgb\.safetensors'"),
             "a number for a file": (lambda c: c["files"].update(links=5), r"key 'files' maps 'links' to 5"),
             "numbers for targets": (lambda c: c["lora"].update(targets=[1, 2]),
                                     r"key 'lora\.targets' must be a list of module names, got \[1, 2\]")}
    for name, (edit, message) in edits.items():
        config_file.write_text(good_config)
        _edit_config(tmp_path, edit)
        with pytest.raises(AdapterError, match=r"adapter_config\.json: " + message):
            read_adapters(str(tmp_path))
    config_file.unlink()
    with pytest.raises(AdapterError, match=r"adapter_config\.json.*missing"):
        load_adapters(model, str(tmp_path))


@pytest.mark.parametrize("key,value", [("alpha", 16.0), ("rank", 8)])
def test_lora_scale_must_match_the_model(tmp_path, key, value):
    """The export's alpha / rank scale is taken out of lora_B on reading and the model applies its own: a
    model of another alpha would load silently with every adapter scaled wrongly."""
    model, _ = tiny_one4d()
    export_adapters(model.trainable_state_dict(), model.cfg, str(tmp_path))
    cfg = tiny_cfg()
    setattr(cfg.lora, key, value)
    other = One4DModel(random_base(), cfg)
    with pytest.raises(AdapterError, match=f"lora.{key} {getattr(model.cfg.lora, key)}.*model.lora.{key} {value}"):
        load_adapters(other, str(tmp_path))


@pytest.mark.parametrize("key,value", [("preset", "1.3b"), ("has_image_input", False)])
def test_backbone_mismatch_is_reported_before_the_links(tmp_path, key, value):
    model, _ = tiny_one4d()
    export_adapters(model.trainable_state_dict(), model.cfg, str(tmp_path))
    # an export from another backbone also links other blocks; the backbone is what to report
    _edit_config(tmp_path, lambda c: c.update({key: value, "link_blocks": [5, 10, 15]}))
    with pytest.raises(AdapterError, match=f"{key}.*{value!r}.*model.{key}") as err:
        load_adapters(model, str(tmp_path))
    assert "link" not in str(err.value)


def test_rgb_adapter_loads_in_diffusers_and_matches(tmp_path):
    model, base = tiny_one4d()
    randomise_trainable(model, links=False)
    export_adapters(model.trainable_state_dict(), model.cfg, str(tmp_path))
    ref = diffusers_twin(base)
    rgb, xyz, t, ctx, clip = model_inputs(text_len=512)
    with torch.no_grad():
        plain = ref(rgb, t, ctx, clip, return_dict=False)[0]
        ref.load_lora_adapter(str(tmp_path / "lora_rgb.safetensors"), adapter_name="rgb")
        with_lora = ref(rgb, t, ctx, clip, return_dict=False)[0]
        v_rgb, _ = model(rgb, xyz, t, ctx, clip)
    assert not torch.allclose(with_lora, plain, atol=1e-2)  # the adapter was applied
    torch.testing.assert_close(v_rgb, with_lora, rtol=1e-4, atol=2e-4)


def test_xyz_adapter_loads_in_diffusers_with_every_weight(tmp_path):
    """lora_xyz.safetensors is a diffusers LoRA of the same base (the XYZ branch's patch embedding and the links
    are in control_links.safetensors): every tensor lands in its PEFT layer, none is dropped as unmatched."""
    from safetensors.torch import load_file

    model, base = tiny_one4d()
    randomise_trainable(model, links=False)
    export_adapters(model.trainable_state_dict(), model.cfg, str(tmp_path))
    ref = diffusers_twin(base)
    ref.load_lora_adapter(str(tmp_path / "lora_xyz.safetensors"), adapter_name="xyz")
    loaded, stored = ref.state_dict(), load_file(tmp_path / "lora_xyz.safetensors")
    peft = {k for k in loaded if ".lora_" in k}
    assert len(peft) == len(stored) > 0
    for key, value in stored.items():
        name = key.removeprefix("transformer.").replace(".lora_A.", ".lora_A.xyz.").replace(".lora_B.", ".lora_B.xyz.")
        assert torch.equal(loaded[name], value), key


def test_config_targets_follow_the_model(tmp_path):
    cfg = tiny_cfg()
    cfg.lora.targets = ["self_attn.q", "ffn.2"]
    model = build_one4d(cfg, "cpu", torch.float32)
    config = export_adapters(model.trainable_state_dict(), cfg, str(tmp_path))
    assert config["lora"]["targets"] == ["self_attn.q", "ffn.2"]
    with safe_open(str(tmp_path / "lora_xyz.safetensors"), framework="pt") as f:
        modules = {k.rsplit(".", 2)[0] for k in f.keys()}
    assert modules == {f"transformer.blocks.{i}.{m}" for i in range(3) for m in ("attn1.to_q", "ffn.net.2")}
