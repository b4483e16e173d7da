"""Key adapter (official <-> diffusers names) and loading from every on-disk layout."""
import dataclasses
import json
import os

import pytest
import torch
from safetensors.torch import save_file

from one4d_train.model.backbone import WanDiT, wan_config
from one4d_train.model.state_dict import (
    checkpoint_files, diffusers_to_official, load_backbone_weights, official_to_diffusers,
    wan_config_from_checkpoint,
)


def tiny(has_image_input=True, seed=0):
    torch.manual_seed(seed)
    model = WanDiT(wan_config("tiny", in_dim=36 if has_image_input else 16, has_image_input=has_image_input))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    return model


def diffusers_tiny(cfg):
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(
        patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
        in_channels=cfg.in_dim, out_channels=cfg.out_dim, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
        ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers, image_dim=cfg.image_dim if cfg.has_image_input else None,
        added_kv_proj_dim=cfg.dim if cfg.has_image_input else None,
    )


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("has_image_input", [False, True], ids=["t2v", "i2v"])
def test_round_trip_covers_diffusers_model(has_image_input):
    ours = tiny(has_image_input)
    with torch.device("meta"):
        ref = diffusers_tiny(ours.cfg)
    ours_keys = list(ours.state_dict())
    mapped = [official_to_diffusers(k) for k in ours_keys]
    assert sorted(mapped) == sorted(ref.state_dict())  # a bijection onto diffusers' own names
    assert [diffusers_to_official(k) for k in mapped] == ours_keys
    for k in ours_keys:  # same shapes on both sides
        assert ref.state_dict()[official_to_diffusers(k)].shape == ours.state_dict()[k].shape, k


def test_names_follow_diffusers_converter():
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    ours = tiny(True)
    converted = convert_wan_transformer_to_diffusers({k: torch.zeros(1) for k in ours.state_dict()})
    assert sorted(converted) == sorted(official_to_diffusers(k) for k in ours.state_dict())


def test_module_names_and_unknown_names():
    assert official_to_diffusers("blocks.7.self_attn.q") == "blocks.7.attn1.to_q"
    assert official_to_diffusers("blocks.7.cross_attn.o") == "blocks.7.attn2.to_out.0"
    assert official_to_diffusers("blocks.7.norm3.weight") == "blocks.7.norm2.weight"
    assert official_to_diffusers("blocks.7.ffn.0.lora_A.weight") == "blocks.7.ffn.net.0.proj.lora_A.weight"
    assert diffusers_to_official("blocks.3.attn2.norm_added_k.weight") == "blocks.3.cross_attn.norm_k_img.weight"
    assert diffusers_to_official("scale_shift_table") == "head.modulation"
    assert diffusers_to_official("blocks.3.scale_shift_table") == "blocks.3.modulation"
    assert official_to_diffusers("blocks.7.self_attn") == "blocks.7.attn1"
    for bad in ["blocks.0.self_attn.qq.weight", "blocks.0.ffn.1.weight", "head.extra", "vace_blocks.0.x", "blocks.x.norm1"]:
        with pytest.raises(KeyError):
            official_to_diffusers(bad)
    with pytest.raises(KeyError):
        diffusers_to_official("blocks.0.self_attn.q.weight")


def test_load_single_file_official(tmp_path):
    src = tiny(True)
    path = str(tmp_path / "dit.safetensors")
    save_file(src.state_dict(), path)
    dst = tiny(True, seed=1)
    load_backbone_weights(dst, path)
    assert_same_weights(src, dst)


def write_sharded(sd, folder, prefix, n=3, rename=lambda k: k):
    os.makedirs(folder, exist_ok=True)
    keys = sorted(sd)
    weight_map = {}
    for i in range(n):
        name = f"{prefix}-{i + 1:05d}-of-{n:05d}.safetensors"
        part = {rename(k): sd[k].contiguous() for k in keys[i * len(keys) // n:(i + 1) * len(keys) // n]}
        save_file(part, os.path.join(folder, name))
        weight_map.update({k: name for k in part})
    with open(os.path.join(folder, f"{prefix}.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


def test_load_index_json_into_meta_model(tmp_path):
    src = tiny(True)
    write_sharded(src.state_dict(), str(tmp_path), "diffusion_pytorch_model")
    with torch.device("meta"):
        dst = WanDiT(src.cfg)
    load_backbone_weights(dst, str(tmp_path / "diffusion_pytorch_model.safetensors.index.json"), dtype=torch.bfloat16)
    assert all(p.device.type == "cpu" and p.dtype == torch.bfloat16 for p in dst.parameters())
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v.bfloat16()), k


def test_load_folder_of_shards_with_repackaged_prefix(tmp_path):
    src = tiny(False)
    folder = str(tmp_path / "official")
    write_sharded(src.state_dict(), folder, "model", rename=lambda k: "model.diffusion_model." + k)
    os.remove(os.path.join(folder, "model.safetensors.index.json"))
    assert len(checkpoint_files(folder)) == 3
    dst = tiny(False, seed=1)
    load_backbone_weights(dst, folder)
    assert_same_weights(src, dst)


@pytest.mark.parametrize("has_image_input", [False, True], ids=["t2v", "i2v"])
def test_load_diffusers_save_pretrained(tmp_path, has_image_input):
    src = tiny(has_image_input)
    ref = diffusers_tiny(src.cfg)
    ref.load_state_dict({official_to_diffusers(k): v for k, v in src.state_dict().items()})
    ref.save_pretrained(str(tmp_path / "transformer"), max_shard_size="200KB")
    assert len(checkpoint_files(str(tmp_path))) > 1  # pipeline root -> transformer/ -> sharded index
    cfg = wan_config_from_checkpoint(str(tmp_path))
    if not has_image_input:  # image_dim means nothing without image cross-attention
        cfg = dataclasses.replace(cfg, image_dim=src.cfg.image_dim)
    assert cfg == src.cfg
    with torch.device("meta"):
        dst = WanDiT(cfg)
    load_backbone_weights(dst, str(tmp_path))
    assert_same_weights(src, dst)


def test_naming_is_decided_over_all_shards(tmp_path):
    src = tiny(True)
    diffusers_sd = {official_to_diffusers(k): v for k, v in src.state_dict().items()}
    # the last shard holds only names that also read as official ones (norm2 <-> norm3 swap)
    ambiguous = {k: v for k, v in diffusers_sd.items() if k.startswith("blocks.2.norm2.")}
    assert ambiguous
    rest = {k: v for k, v in diffusers_sd.items() if k not in ambiguous}
    write_sharded(rest, str(tmp_path), "diffusion_pytorch_model", n=2)
    save_file(ambiguous, str(tmp_path / "extra.safetensors"))
    index = tmp_path / "diffusion_pytorch_model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"].update({k: "extra.safetensors" for k in ambiguous})
    index.write_text(json.dumps(data))
    dst = tiny(True, seed=1)
    load_backbone_weights(dst, str(tmp_path))
    assert_same_weights(src, dst)


def test_config_from_official_checkpoint(tmp_path):
    src = tiny(True)
    save_file(src.state_dict(), str(tmp_path / "model.safetensors"))
    with open(tmp_path / "config.json", "w") as f:
        json.dump({"_class_name": "WanModel", "num_heads": 4}, f)
    assert wan_config_from_checkpoint(str(tmp_path)) == src.cfg


def test_mismatch_lists_missing_and_unexpected(tmp_path):
    src = tiny(True)
    sd = src.state_dict()
    del sd["blocks.1.cross_attn.k_img.weight"]
    sd["blocks.1.cross_attn.extra.weight"] = torch.zeros(2)
    sd["something_else"] = torch.zeros(2)
    path = str(tmp_path / "dit.safetensors")
    save_file(sd, path)
    dst = tiny(True, seed=1)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(RuntimeError) as err:
        load_backbone_weights(dst, path)
    msg = str(err.value)
    assert "missing keys (1): blocks.1.cross_attn.k_img.weight" in msg
    assert "unexpected keys (2)" in msg and "blocks.1.cross_attn.extra.weight" in msg and "something_else" in msg
    for k, v in dst.state_dict().items():  # nothing was loaded
        assert torch.equal(v, before[k]), k


def test_i2v_checkpoint_into_t2v_model_is_refused_with_truncated_list(tmp_path):
    path = str(tmp_path / "dit.safetensors")
    save_file(tiny(True).state_dict(), path)
    dst = tiny(False)
    with pytest.raises(RuntimeError, match=r"unexpected keys \(23\): .* \.\.\. and 3 more") as err:
        load_backbone_weights(dst, path)
    assert "shape mismatches (1): patch_embedding.weight" in str(err.value)


def test_load_torch_file_and_missing_path(tmp_path):
    src = tiny(False)
    path = str(tmp_path / "dit.pth")
    torch.save(src.state_dict(), path)
    dst = tiny(False, seed=1)
    load_backbone_weights(dst, path)
    assert_same_weights(src, dst)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_backbone_weights(dst, str(tmp_path / "nothing_here"))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        checkpoint_files(str(tmp_path / "empty"))


def test_unreadable_files_are_named_with_what_is_wrong(tmp_path):
    """A truncated shard, an index naming a shard that is not there, an index that is no JSON and a pickled module
    are each refused naming the file, before any tensor is loaded (safetensors' and torch's own errors name none)."""
    src = tiny(True)
    folder = tmp_path / "sharded"
    write_sharded(src.state_dict(), str(folder), "model")
    shard = folder / "model-00002-of-00003.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])  # an interrupted download
    dst = tiny(True, seed=1)
    with pytest.raises(ValueError, match=f"{shard}: not a readable safetensors file .*truncated"):
        load_backbone_weights(dst, str(folder))
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=f"model.safetensors.index.json names 1 shard file.*{shard}"):
        load_backbone_weights(dst, str(folder))
    (folder / "model.safetensors.index.json").write_text("<html>not found</html>")
    with pytest.raises(ValueError, match="index.json: not a safetensors shard index"):
        load_backbone_weights(dst, str(folder))
    pickled = tmp_path / "dit.pth"
    torch.save(src, pickled)  # the whole module, not its state dict: never unpickled
    with pytest.raises(ValueError, match=f"{pickled}: holds objects other than tensors"):
        load_backbone_weights(dst, str(pickled))
    not_torch = tmp_path / "dit.bin"
    not_torch.write_bytes(shard.with_name("model-00001-of-00003.safetensors").read_bytes())
    with pytest.raises(ValueError, match=f"{not_torch}: not a readable torch file"):
        load_backbone_weights(dst, str(not_torch))


def test_integer_tensors_are_refused_not_cast(tmp_path):
    """An integer or 8-bit float tensor where the model has a float weight (a quantised export) was cast to the
    compute dtype as if its codes were the weights; it is refused, named, from the header alone. bf16 and fp16
    files load."""
    src = tiny(True)
    sd = {k: v.to(torch.float16 if "ffn" in k else torch.bfloat16) for k, v in src.state_dict().items()}
    save_file(sd, str(tmp_path / "half.safetensors"))
    dst = tiny(True, seed=1)
    load_backbone_weights(dst, str(tmp_path / "half.safetensors"))
    assert torch.equal(dst.state_dict()["blocks.0.ffn.0.weight"], sd["blocks.0.ffn.0.weight"].float())
    weight = sd["blocks.0.ffn.0.weight"]
    # an fp8 export (its scales elsewhere) loaded ~3% off every weight, silently
    for name, codes in (("int8", (weight * 64).to(torch.int8)), ("fp8", weight.to(torch.float8_e4m3fn))):
        sd["blocks.0.ffn.0.weight"] = codes
        for path in (tmp_path / f"{name}.safetensors", tmp_path / f"{name}.pth"):
            save_file(sd, str(path)) if path.suffix == ".safetensors" else torch.save(sd, path)
            with pytest.raises(RuntimeError, match=r"not 16/32/64-bit floating-point \(a quantised checkpoint\? use "
                                                   r"the bf16 or fp32 release\) \(1\): blocks\.0\.ffn\.0\.weight"):
                load_backbone_weights(dst, str(path))


def test_other_files_beside_the_dit_are_named(tmp_path):
    """A folder read as a checkpoint takes every *.safetensors in it: a LoRA (diffusers names) beside official
    shards turns the whole folder's naming, and hundreds of 'unexpected keys' hid which file was at fault."""
    src = tiny(True)
    write_sharded(src.state_dict(), str(tmp_path), "model", n=2)
    os.remove(tmp_path / "model.safetensors.index.json")
    save_file({"blocks.0.attn1.to_q.lora_A.weight": torch.zeros(4, 64)}, str(tmp_path / "my_lora.safetensors"))
    with pytest.raises(RuntimeError) as err:
        load_backbone_weights(tiny(True, seed=1), str(tmp_path))
    assert "missing keys" not in str(err.value)  # the shards are still read with official names
    assert "unexpected keys (1): blocks.0.attn1.to_q.lora_A.weight" in str(err.value)
    assert ("unexpected keys by file: my_lora.safetensors (1); holding none of the model's weights: my_lora"
            in str(err.value))


def test_checkpoint_fingerprint_follows_the_content_not_the_path(tmp_path):
    """The same files at another path (or a folder of them) agree; other weights of the same shapes differ."""
    from one4d_train.model.state_dict import checkpoint_fingerprint

    torch.manual_seed(0)
    state = {f"blocks.{i}.w": torch.randn(64, 300) for i in range(4)}
    save_file(state, tmp_path / "a.safetensors")
    (tmp_path / "copy").mkdir()
    save_file(state, tmp_path / "copy" / "model.safetensors")
    save_file({k: v + 1e-3 for k, v in state.items()}, tmp_path / "b.safetensors")
    a = checkpoint_fingerprint(str(tmp_path / "a.safetensors"))
    assert a == checkpoint_fingerprint(str(tmp_path / "copy")) == checkpoint_fingerprint(str(tmp_path / "copy" /
                                                                                           "model.safetensors"))
    assert a != checkpoint_fingerprint(str(tmp_path / "b.safetensors"))
