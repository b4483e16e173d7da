"""The frozen encoders of a model config, built one way for training and evaluation alike (outside ZeRO)."""
from __future__ import annotations

import glob
import json
import os

import numpy as np
import torch

from one4d_train.model.image_encoder import CLIPImageEncoder, load_image_encoder, tiny_clip_vision
from one4d_train.model.presets import WanConfig
from one4d_train.model.pretrained import open_safetensors
from one4d_train.model.state_dict import VAE_WEIGHTS, vae_files
from one4d_train.model.text_encoder import TextConditioning, UMT5TextEncoder, build_text_conditioning
from one4d_train.model.text_encoder import tiny_tokenizer, tiny_umt5
from one4d_train.model.vae import Z_DIM, WanVAE, conv_kernel_problem, load_vae, vae_file_problem


def encoder_dtype(mcfg, device: torch.device) -> torch.dtype:
    """The precision the frozen encoders run in (training, evaluation, `one4d encode-latents`): model.compute_dtype
    on CUDA, float32 elsewhere."""
    return torch.bfloat16 if (mcfg.compute_dtype == "bf16" and device.type == "cuda") else torch.float32


def vae_kernel_problems(mcfg, device: torch.device) -> list[tuple[str, str]]:
    """model.vae_conv_kernel where the VAE runs (`device`, encoder_dtype), by key: the 1.3B config's Triton kernel
    needs CUDA and bf16 (or fp16); elsewhere the message names the cuDNN settings to use."""
    problem = conv_kernel_problem(mcfg.vae_conv_kernel, device, encoder_dtype(mcfg, device))
    return [("model.vae_conv_kernel", f"{mcfg.vae_conv_kernel}: {problem} (set model.vae_conv_kernel=cudnn "
                                      "model.vae_frames_per_call=8 to run the VAE here)")] if problem else []


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
                   frames_per_call=mcfg.vae_frames_per_call, chunk_size=mcfg.vae_videos_per_call,
                   conv_kernel=mcfg.vae_conv_kernel)
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


def encoder_file_problems(mcfg, wan_cfg: WanConfig) -> list[tuple[str, str]]:
    """The configured encoder files against the backbone, from their config.json files and headers (no weights
    read), by key (`model.vae`, ...): what would otherwise fail only at the first step, deep in the model. Paths that
    do not exist are left to the caller."""
    p = []

    def config(key: str, path: str, what: str) -> dict | None:
        cfg_path = os.path.join(path, "config.json")
        if not os.path.isdir(path):
            p.append((f"model.{key}", f"{path}: not a folder: {what} is a folder with config.json and its weights"))
        elif not os.path.isfile(cfg_path):
            p.append((f"model.{key}", f"{cfg_path}: not found: {what} is a folder with config.json and its weights"))
        else:
            damaged = _unreadable_safetensors(path)
            if damaged:
                p.append((f"model.{key}", damaged))
            try:
                with open(cfg_path) as f:
                    return json.load(f)
            except ValueError as exc:
                p.append((f"model.{key}", f"{cfg_path}: not JSON: {exc}"))
        return None

    if mcfg.vae and os.path.isdir(mcfg.vae):
        cfg = config("vae", mcfg.vae, "a diffusers AutoencoderKLWan")
        if cfg is not None and (cfg.get("_class_name", "AutoencoderKLWan") != "AutoencoderKLWan" or
                                cfg.get("z_dim", Z_DIM) != Z_DIM):
            p.append(("model.vae", f"{mcfg.vae}: {cfg.get('_class_name')} with "
                      f"{cfg.get('z_dim', cfg.get('latent_channels'))} latent channels, not the Wan2.1 VAE "
                      f"(AutoencoderKLWan, z_dim {Z_DIM})"))
        elif cfg is not None:
            try:
                weights = vae_files(mcfg.vae)[1:]
            except (OSError, ValueError) as exc:  # a shard index naming files that are not there
                p.append(("model.vae", str(exc)))
                weights = None
            if weights == []:
                p.append(("model.vae", f"{mcfg.vae}: no weights file ({' or '.join(VAE_WEIGHTS)}) beside its "
                          "config.json: an interrupted download or copy? Give the complete diffusers AutoencoderKLWan "
                          "folder"))
    elif mcfg.vae and os.path.isfile(mcfg.vae):
        problem = vae_file_problem(mcfg.vae)
        if problem:
            p.append(("model.vae", f"{mcfg.vae}: {problem}"))
    if mcfg.text_encoder and os.path.exists(mcfg.text_encoder):
        cfg = config("text_encoder", mcfg.text_encoder, "a transformers UMT5 encoder (the official .pth is not read)")
        if cfg is not None and cfg.get("model_type") != "umt5":  # T5's own weights: one relative bias, not one a layer
            p.append(("model.text_encoder", f"{mcfg.text_encoder}: a model of type {cfg.get('model_type')}, not UMT5 "
                      "(Wan's text encoder is umt5-xxl)"))
        elif cfg is not None and cfg.get("d_model") != wan_cfg.text_dim:
            p.append(("model.text_encoder", f"{mcfg.text_encoder}: {cfg.get('model_type')} of width "
                      f"{cfg.get('d_model')}, the backbone's text input is {wan_cfg.text_dim} wide (umt5-xxl: 4096)"))
    tokenizer = mcfg.tokenizer or mcfg.text_encoder
    if tokenizer and os.path.isdir(tokenizer) and not any(
            os.path.isfile(os.path.join(tokenizer, f)) for f in ("tokenizer.json", "spiece.model")):
        p.append((f"model.{'tokenizer' if mcfg.tokenizer else 'text_encoder'}",
                  f"{tokenizer}: no tokenizer.json or spiece.model: not a UMT5 tokenizer folder"
                  + ("" if mcfg.tokenizer else " (set model.tokenizer to the folder of google/umt5-xxl's)")))
    elif mcfg.tokenizer and os.path.isfile(mcfg.tokenizer):
        p.append(("model.tokenizer", f"{mcfg.tokenizer}: a file; give the tokenizer's folder"))
    if mcfg.image_encoder and os.path.exists(mcfg.image_encoder) and wan_cfg.has_image_input:
        cfg = config("image_encoder", mcfg.image_encoder, "a transformers CLIP vision model")
        if cfg is not None:
            vision = cfg.get("vision_config", cfg) if cfg.get("model_type") == "clip" else cfg
            if cfg.get("model_type") not in ("clip", "clip_vision_model"):
                p.append(("model.image_encoder",
                          f"{mcfg.image_encoder}: a model of type {cfg.get('model_type')}, not CLIP"))
            elif vision.get("hidden_size") != wan_cfg.image_dim:
                p.append(("model.image_encoder", f"{mcfg.image_encoder}: CLIP of width {vision.get('hidden_size')}, "
                          f"the backbone's image input is {wan_cfg.image_dim} wide (ViT-H/14: 1280)"))
    if mcfg.empty_prompt_embedding and os.path.exists(mcfg.empty_prompt_embedding):
        try:
            shape = np.load(mcfg.empty_prompt_embedding, mmap_mode="r", allow_pickle=False).shape
        except (OSError, ValueError) as exc:
            p.append(("model.empty_prompt_embedding", f"{mcfg.empty_prompt_embedding}: not a .npy array: {exc}"))
        else:
            if len(shape) != 2 or shape[1] != wan_cfg.text_dim:
                p.append(("model.empty_prompt_embedding", f"{mcfg.empty_prompt_embedding}: shape {shape}, need "
                          f"[tokens, {wan_cfg.text_dim}] (the text encoder's embedding of the empty prompt)"))
    return p


def _unreadable_safetensors(folder: str) -> str | None:
    """The first *.safetensors file of `folder` whose header cannot be read (a truncated download), said why."""
    for path in sorted(glob.glob(os.path.join(folder, "*.safetensors"))):
        try:
            with open_safetensors(path):
                pass
        except ValueError as exc:
            return str(exc)
    return None
