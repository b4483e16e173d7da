import inspect

import pytest
import torch
from diffusers import AutoencoderKLWan

from one4d_train.model.vae import (WanVAE, diffusers_to_official_key, latent_shape, load_vae, official_to_diffusers_key,
                                 tiny_wan_vae)


@pytest.fixture(scope="module")
def vae():
    return WanVAE(tiny_wan_vae(0))


@pytest.fixture(scope="module")
def videos():
    g = torch.Generator().manual_seed(0)
    return torch.rand(2, 3, 5, 16, 16, generator=g) * 2 - 1


def test_wan21_latent_statistics_are_the_config_defaults(vae):
    defaults = inspect.signature(AutoencoderKLWan.__init__).parameters
    assert vae.mean.flatten().tolist() == pytest.approx(defaults["latents_mean"].default)
    assert vae.std.flatten().tolist() == pytest.approx(defaults["latents_std"].default)
    assert vae.mean.flatten()[0].item() == pytest.approx(-0.7571)
    assert vae.std.flatten()[0].item() == pytest.approx(2.8184)


def test_encode_decode_shapes(vae, videos):
    z = vae.encode(videos[:1])
    assert z.shape == (1, 16, 2, 2, 2) and z.dtype == torch.float32
    assert latent_shape(81, 352, 624) == (21, 44, 78)
    x = vae.decode(z)
    assert x.shape == (1, 3, 5, 16, 16) and x.min() >= -1 and x.max() <= 1
    with pytest.raises(ValueError):
        vae.encode(torch.zeros(1, 3, 4, 16, 16))


def test_normalise_round_trip_and_equals_diffusers_encode(vae, videos):
    z = torch.randn(2, 16, 2, 2, 2)
    assert torch.allclose(vae.denormalise(vae.normalise(z)), z, atol=1e-5)
    assert torch.allclose(vae.normalise(vae.denormalise(z)), z, atol=1e-5)
    raw = vae.model.encode(videos).latent_dist.mean
    mean = torch.tensor(vae.model.config.latents_mean).view(1, 16, 1, 1, 1)
    std = torch.tensor(vae.model.config.latents_std).view(1, 16, 1, 1, 1)
    assert torch.allclose(vae.encode(videos), (raw - mean) / std, atol=1e-6)


def test_chunked_encode_equals_unchunked_and_encode_many(vae, videos):
    whole = vae.encode(videos)
    chunked = WanVAE(vae.model, chunk_size=1)
    assert torch.allclose(chunked.encode(videos), whole, atol=1e-5)
    parts = vae.encode_many([videos[:1], videos[1:]])
    assert [p.shape[0] for p in parts] == [1, 1]
    assert torch.allclose(torch.cat(parts), whole, atol=1e-6)


@pytest.mark.parametrize("frames", [8, 12, 16, 80])
def test_longer_causal_calls_give_wans_latents(frames):
    """Any multiple of 4 frames per encoder call equals diffusers' own 4-frame loop (81 frames: 20 calls of 4
    against 10 of 8, 7 of 12 with a short last call, 5 of 16, one of 80); the tiny VAE has every causal cache and
    both temporal downsamplings of the real one."""
    video = torch.rand(1, 3, 81, 16, 24, generator=torch.Generator().manual_seed(3)) * 2 - 1
    wan = WanVAE(tiny_wan_vae(0)).encode(video)
    longer = WanVAE(tiny_wan_vae(0), frames_per_call=frames).encode(video)
    assert longer.shape == wan.shape == (1, 16, 21, 2, 3)
    assert (longer - wan).abs().max() < 1e-5 * wan.abs().max()


def test_frames_per_call_must_keep_the_downsampling_windows_aligned():
    for bad in (0, 2, 6):
        with pytest.raises(ValueError, match="frames_per_call"):
            WanVAE(tiny_wan_vae(0), frames_per_call=bad)


def test_padded_first_convolution_gives_the_same_latents(videos):
    """pad_channels: the first convolution runs on 8 input channels (5 of them zero), its stored weight, the state
    dict and the wrapped model's own 3-channel API unchanged."""
    plain = WanVAE(tiny_wan_vae(0))
    padded = WanVAE(tiny_wan_vae(0), pad_channels=True, frames_per_call=8)
    conv = padded.model.encoder.conv_in
    assert conv._extra_in == 5 and conv.weight.shape[1] == 3
    seen = []
    conv.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[1]))
    assert (padded.encode(videos) - plain.encode(videos)).abs().max() < 1e-5
    assert seen and set(seen) == {3}  # the module gets the video; the padding happens inside its call
    state, want = padded.model.state_dict(), plain.model.state_dict()
    assert list(state) == list(want) and all(torch.equal(state[k], want[k]) for k in want)
    raw = padded.model.encode(videos).latent_dist.mean  # diffusers' own call on 3-channel videos still works
    assert torch.allclose(raw, plain.model.encode(videos).latent_dist.mean, atol=1e-5)
    assert not hasattr(WanVAE(tiny_wan_vae(0)).model.encoder.conv_in, "_extra_in")  # CPU default: unpadded
    again = WanVAE(padded.model, pad_channels=True)  # a model wrapped twice is padded once
    assert again.model.encoder.conv_in._extra_in == 5
    assert (again.encode(videos) - plain.encode(videos)).abs().max() < 1e-5


def test_padding_leaves_a_wider_first_convolution_alone():
    """A patchified VAE's first convolution (12 input channels) is wider than the padding target: unchanged."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d
    from one4d_train.model.vae import _pad_input_channels
    conv = WanCausalConv3d(12, 4, 3, padding=1)
    _pad_input_channels(conv, 8)
    assert type(conv) is WanCausalConv3d and not hasattr(conv, "_extra_in")


def test_bf16_compute_returns_float32_latents_close_to_fp32(vae, videos):
    bf16 = WanVAE(tiny_wan_vae(0), dtype=torch.bfloat16)
    z = bf16.encode(videos[:1])
    assert z.dtype == torch.float32 and next(bf16.model.parameters()).dtype == torch.bfloat16
    assert (z - vae.encode(videos[:1])).abs().max() < 0.05


def test_sampled_encode_is_seeded_and_differs_from_mean(vae, videos):
    a = vae.encode(videos[:1], sample=True, generator=torch.Generator().manual_seed(1))
    b = vae.encode(videos[:1], sample=True, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.allclose(a, vae.encode(videos[:1]))


def test_frozen_and_loads_from_folder(vae, videos, tmp_path):
    assert not any(p.requires_grad for p in vae.model.parameters()) and not vae.model.training
    vae.model.save_pretrained(tmp_path / "vae")
    loaded = load_vae(str(tmp_path / "vae"))
    assert torch.equal(loaded.encode(videos[:1]), vae.encode(videos[:1]))
    with pytest.raises(FileNotFoundError):
        load_vae(str(tmp_path / "missing"))


# pairs spelled out by diffusers' scripts/convert_wan_to_diffusers.py (convert_vae) for the released file
OFFICIAL_TO_DIFFUSERS = {
    "conv1.weight": "quant_conv.weight",
    "conv2.bias": "post_quant_conv.bias",
    "encoder.conv1.weight": "encoder.conv_in.weight",
    "decoder.conv1.bias": "decoder.conv_in.bias",
    "encoder.head.0.gamma": "encoder.norm_out.gamma",
    "decoder.head.2.weight": "decoder.conv_out.weight",
    "encoder.middle.0.residual.0.gamma": "encoder.mid_block.resnets.0.norm1.gamma",
    "decoder.middle.2.residual.6.weight": "decoder.mid_block.resnets.1.conv2.weight",
    "encoder.middle.1.to_qkv.weight": "encoder.mid_block.attentions.0.to_qkv.weight",
    "decoder.middle.1.norm.gamma": "decoder.mid_block.attentions.0.norm.gamma",
    "encoder.downsamples.3.shortcut.weight": "encoder.down_blocks.3.conv_shortcut.weight",
    "encoder.downsamples.5.time_conv.bias": "encoder.down_blocks.5.time_conv.bias",
    "encoder.downsamples.2.resample.1.weight": "encoder.down_blocks.2.resample.1.weight",
    "encoder.downsamples.9.residual.3.gamma": "encoder.down_blocks.9.norm2.gamma",
    "decoder.upsamples.2.residual.2.weight": "decoder.up_blocks.0.resnets.2.conv1.weight",
    "decoder.upsamples.3.resample.1.weight": "decoder.up_blocks.0.upsamplers.0.resample.1.weight",
    "decoder.upsamples.4.shortcut.weight": "decoder.up_blocks.1.resnets.0.conv_shortcut.weight",
    "decoder.upsamples.7.time_conv.weight": "decoder.up_blocks.1.upsamplers.0.time_conv.weight",
    "decoder.upsamples.11.resample.1.bias": "decoder.up_blocks.2.upsamplers.0.resample.1.bias",
    "decoder.upsamples.13.residual.6.bias": "decoder.up_blocks.3.resnets.1.conv2.bias",
}


def test_official_key_names_match_diffusers_conversion():
    for official, diffusers in OFFICIAL_TO_DIFFUSERS.items():
        assert official_to_diffusers_key(official) == diffusers
        assert diffusers_to_official_key(diffusers) == official
    with torch.device("meta"):
        full = AutoencoderKLWan()
    keys = list(full.state_dict())
    official = [diffusers_to_official_key(k) for k in keys]
    assert len(set(official)) == len(keys) and set(OFFICIAL_TO_DIFFUSERS) <= set(official)
    assert [official_to_diffusers_key(k) for k in official] == keys
    assert max(int(k.split(".")[2]) for k in official if k.startswith("decoder.upsamples.")) == 14


def test_loads_official_layout_pth(vae, videos, tmp_path):
    state = {diffusers_to_official_key(k): v for k, v in vae.model.state_dict().items()}
    torch.save(state, tmp_path / "Wan2.1_VAE.pth")
    loaded = load_vae(str(tmp_path / "Wan2.1_VAE.pth"))
    assert torch.equal(loaded.encode(videos[:1]), vae.encode(videos[:1]))
    del state["decoder.upsamples.4.shortcut.bias"]
    state["decoder.upsamples.98.residual.0.gamma"] = torch.zeros(1)
    state["decoder.extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "broken.pth")
    with pytest.raises(KeyError) as err:
        load_vae(str(tmp_path / "broken.pth"))
    assert "decoder.up_blocks.1.resnets.0.conv_shortcut.bias" in str(err.value)
    assert "decoder.up_blocks.24.resnets.2.norm1.gamma" in str(err.value) and "decoder.extra.weight" in str(err.value)


def test_model_config_checks_frames_per_call_and_the_encoders_use_it():
    from one4d_train.model.config import ModelConfig
    from one4d_train.model.encoders import build_encoders
    from one4d_train.model.presets import wan_config
    assert not ModelConfig(vae_frames_per_call=16).validate()
    assert [key for key, _ in ModelConfig(vae_frames_per_call=6).validate()] == ["vae_frames_per_call"]
    vae, _, _ = build_encoders(ModelConfig(vae_frames_per_call=16), wan_config("tiny"), torch.device("cpu"),
                               torch.float32)
    assert vae.frames_per_call == 16 and vae.chunk_size == 0
    assert [key for key, _ in ModelConfig(vae_videos_per_call=-1).validate()] == ["vae_videos_per_call"]
    vae, _, _ = build_encoders(ModelConfig(vae_videos_per_call=1), wan_config("tiny"), torch.device("cpu"),
                               torch.float32)
    assert vae.chunk_size == 1


def test_vae_files_that_are_not_the_wan21_vae_are_refused_naming_them(vae, videos, tmp_path):
    """A diffusers folder missing a weight (left on the meta device by diffusers: 'Cannot copy out of meta tensor'
    at first use), a VAE of 48 latent channels (a shape error deep in the DiT), and a pickled module are refused
    naming the file; the released weights repackaged as one .safetensors file (official or diffusers names) load."""
    from safetensors.torch import load_file, save_file

    vae.model.save_pretrained(tmp_path / "vae")
    weights = tmp_path / "vae" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    save_file({k: v for k, v in state.items() if k != "decoder.conv_in.bias"}, weights, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=f"VAE {tmp_path / 'vae'}: 1 weight.* not in its files: decoder.conv_in.bias"):
        load_vae(str(tmp_path / "vae"))
    AutoencoderKLWan(base_dim=8, z_dim=48, latents_mean=[0.0] * 48, latents_std=[1.0] * 48).save_pretrained(
        tmp_path / "z48")
    with pytest.raises(ValueError, match=f"VAE {tmp_path / 'z48'}: 48 latent channels, where the Wan2.1 VAE"):
        load_vae(str(tmp_path / "z48"))
    torch.save(vae.model, tmp_path / "module.pth")  # a pickled module: never unpickled
    with pytest.raises(ValueError, match="module.pth: holds objects other than tensors"):
        load_vae(str(tmp_path / "module.pth"))
    for names, convert in (("official", diffusers_to_official_key), ("diffusers", lambda k: k)):
        save_file({convert(k): v for k, v in state.items()}, tmp_path / f"{names}.safetensors")
        loaded = load_vae(str(tmp_path / f"{names}.safetensors"))
        assert torch.equal(loaded.encode(videos[:1]), vae.encode(videos[:1])), names
