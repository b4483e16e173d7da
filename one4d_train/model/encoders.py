"""The frozen encoders of a model config, built one way for training and evaluation alike (outside ZeRO)."""
from __future__ import annotations

import torch

from one4d_train.model.image_encoder import CLIPImageEncoder, load_image_encoder, tiny_clip_vision
from one4d_train.model.presets import WanConfig
from one4d_train.model.text_encoder import TextConditioning, UMT5TextEncoder, build_text_conditioning
from one4d_train.model.text_encoder import tiny_tokenizer, tiny_umt5
from one4d_train.model.vae import WanVAE, load_vae


def build_encoders(mcfg, wan_cfg: WanConfig, device: torch.device, dtype: torch.dtype,
                   seed: int = 0) -> tuple[WanVAE, TextConditioning, CLIPImageEncoder | None]:
    """(VAE, text conditioning, CLIP image encoder or None) from ModelConfig paths. The tiny preset with empty
    paths gets tiny random towers of the real architectures (seeded on a forked RNG, so the global stream that
    training resumes exactly is untouched), so CPU runs take the same code path. Real presets need real files."""
    if mcfg.preset != "tiny":
        missing = [k for k in ("vae", "image_encoder") if not getattr(mcfg, k) and
                   (k != "image_encoder" or wan_cfg.has_image_input)]
        if not (mcfg.text_encoder or mcfg.empty_prompt_embedding):
            missing.append("text_encoder (or empty_prompt_embedding, with text embeddings stored in the shards)")
        if missing:
            raise ValueError(f"preset {mcfg.preset!r} needs local encoder files: set model.{', model.'.join(missing)}")
    with torch.random.fork_rng(devices=[]):
        return _build(mcfg, wan_cfg, device, dtype, seed)


def text_encoder_device(mcfg, device: torch.device) -> torch.device:
    """Where the UMT5 encoder lives and runs: the training device, or the host (`text_encoder_device: cpu`: its
    weights stay off the GPU; it then encodes only the empty prompt and captions whose samples carry no stored
    embedding, slowly)."""
    return torch.device("cpu") if mcfg.text_encoder_device == "cpu" else torch.device(device)


def _build(mcfg, wan_cfg, device, dtype, seed):
    vae = load_vae(mcfg.vae, seed=seed, dtype=dtype, device=device, compile=mcfg.compile_vae,
                   frames_per_call=mcfg.vae_frames_per_call)
    if mcfg.text_encoder or mcfg.preset != "tiny":
        text = build_text_conditioning(mcfg.text_encoder, mcfg.tokenizer, mcfg.empty_prompt_embedding,
                                       dim=wan_cfg.text_dim, dtype=dtype, device=text_encoder_device(mcfg, device))
    else:
        encoder = UMT5TextEncoder(tiny_umt5(seed, d_model=wan_cfg.text_dim), tiny_tokenizer(), dtype=dtype,
                                  device=text_encoder_device(mcfg, device))
        text = TextConditioning(encoder, dim=wan_cfg.text_dim)
    image = None
    if wan_cfg.has_image_input:
        if mcfg.image_encoder:
            image = load_image_encoder(mcfg.image_encoder, dtype=dtype, device=device)
        else:  # 224 px / patch 14: Wan's 257 image tokens
            image = CLIPImageEncoder(tiny_clip_vision(seed, hidden=wan_cfg.image_dim, image_size=224),
                                     dtype=dtype, device=device)
    return vae, text, image
