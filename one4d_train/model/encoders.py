"""The frozen encoders of a model config, built one way for training and evaluation alike (outside ZeRO)."""
from __future__ import annotations

import torch

from one4d_train.model.image_encoder import CLIPImageEncoder, load_image_encoder, tiny_clip_vision
from one4d_train.model.presets import WanConfig
from one4d_train.model.text_encoder import TextConditioning, UMT5TextEncoder, build_text_conditioning
from one4d_train.model.text_encoder import tiny_tokenizer, tiny_umt5
from one4d_train.model.vae import WanVAE, load_vae


def build_encoders(mcfg, wan_cfg: WanConfig, device: torch.device, dtype: torch.dtype, seed: int = 0,
                   text_stored: bool = False, stored_empty: torch.Tensor | None = None
                   ) -> tuple[WanVAE, TextConditioning, CLIPImageEncoder | None]:
    """(VAE, text conditioning, CLIP image encoder or None) from ModelConfig paths. The tiny preset with empty
    paths gets tiny random towers of the real architectures (seeded on a forked RNG, so the global stream that
    training resumes exactly is untouched), so CPU runs take the same code path. Real presets need real files.
    `text_stored`: the data stores the captions' embeddings from this text encoder (text_encoder_device);
    `stored_empty`: its empty-prompt embedding, stored with them: an encoder in host memory is then loaded only at
    the first caption without a stored embedding."""
    if mcfg.preset != "tiny":
        missing = [k for k in ("vae", "image_encoder") if not getattr(mcfg, k) and
                   (k != "image_encoder" or wan_cfg.has_image_input)]
        if not (mcfg.text_encoder or mcfg.empty_prompt_embedding):
            missing.append("text_encoder (or empty_prompt_embedding, with text embeddings stored in the shards)")
        if missing:
            raise ValueError(f"preset {mcfg.preset!r} needs local encoder files: set model.{', model.'.join(missing)}")
    with torch.random.fork_rng(devices=[]):
        return _build(mcfg, wan_cfg, device, dtype, seed, text_stored, stored_empty)


def text_encoder_device(mcfg, device: torch.device, text_stored: bool = False) -> torch.device:
    """Where the UMT5 encoder lives and runs: the host with `text_encoder_device: cpu`, or with `auto` when the
    data stores the captions' embeddings (`text_stored`): its weights stay off the GPU, and it encodes only the
    empty prompt (once) and the captions of samples without a stored embedding (slowly, with a warning; the last
    128 cached, for evaluation's).
    Otherwise the training device."""
    mode = mcfg.text_encoder_device
    return torch.device("cpu") if mode == "cpu" or (mode == "auto" and text_stored) else torch.device(device)


def build_text(mcfg, wan_cfg: WanConfig, device: torch.device, dtype: torch.dtype, seed: int = 0,
               lazy_empty: torch.Tensor | None = None) -> TextConditioning:
    """The text conditioning of a model config on `device`: the configured UMT5 (or only the stored empty-prompt
    embedding), or for the tiny preset with no path the tiny random tower seeded with `seed`. The trainer and
    `one4d encode-latents` (which stores the embeddings) build it here, so both compute the same embeddings.
    `lazy_empty` (the empty prompt's embedding stored with the shards): the encoder is built at its first use."""
    tiny = None
    if not mcfg.text_encoder and mcfg.preset == "tiny":
        def tiny() -> UMT5TextEncoder:
            with torch.random.fork_rng(devices=[]):  # the tiny tower seeds torch: training's RNG stream is kept
                return UMT5TextEncoder(tiny_umt5(seed, d_model=wan_cfg.text_dim), tiny_tokenizer(), dtype=dtype,
                                       device=device)
    return build_text_conditioning(mcfg.text_encoder, mcfg.tokenizer, mcfg.empty_prompt_embedding,
                                   dim=wan_cfg.text_dim, dtype=dtype, device=device, make_encoder=tiny,
                                   stored_empty=lazy_empty)


def _build(mcfg, wan_cfg, device, dtype, seed, text_stored, stored_empty):
    vae = load_vae(mcfg.vae, seed=seed, dtype=dtype, device=device, compile=mcfg.compile_vae,
                   frames_per_call=mcfg.vae_frames_per_call)
    text_device = text_encoder_device(mcfg, device, text_stored)
    host = text_device.type != torch.device(device).type
    text = build_text(mcfg, wan_cfg, text_device, dtype, seed, lazy_empty=stored_empty if host else None)
    if text.has_encoder and host:
        text.slow_encode_warning = (
            f"captions without a stored text embedding are encoded by UMT5 in host memory "
            f"(model.text_encoder_device={mcfg.text_encoder_device}), seconds each; `one4d encode-latents` stores "
            f"them in the shards")
        text.cache_size = 128  # evaluation's captions come back every round
    image = None
    if wan_cfg.has_image_input:
        if mcfg.image_encoder:
            image = load_image_encoder(mcfg.image_encoder, dtype=dtype, device=device)
        else:  # 224 px / patch 14: Wan's 257 image tokens
            image = CLIPImageEncoder(tiny_clip_vision(seed, hidden=wan_cfg.image_dim, image_size=224),
                                     dtype=dtype, device=device)
    return vae, text, image
