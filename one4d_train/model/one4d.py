"""The One4D model: a frozen Wan2.1 DiT, branch LoRA, control links, and the two ablation designs.

Designs (ModelConfig.design), all on the backbone's public stages:
- `dlc` (the paper's): RGB and XYZ token sets stacked on the batch axis through the frozen blocks, each
  half with its own LoRA (dlc.py), control links after the configured blocks, the base's head for both.
  The XYZ input (16 latent channels + 20 zero channels) enters through its own trainable copy of the
  36-channel patch embedding; both halves cross-attend to the same context (caption, CLIP image tokens).
- `channel_concat`: one sequence from concat(RGB input, XYZ latent) channels through a widened patch
  embedding (base weights for the first 36 channels, zeros for the rest) and a widened head that
  predicts both velocities; one shared LoRA.
- `width_concat` (4DNeX): RGB input and zero-padded XYZ input side by side along the width, one
  sequence (RoPE over the doubled width), one shared LoRA, output split along the width.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from one4d_train.model.attention import set_attention_backend
from one4d_train.model.backbone import WanDiT, wan_config
from one4d_train.model.checkpointing import apply_configured_checkpointing
from one4d_train.model.config import ModelConfig
from one4d_train.model.control_links import ControlLinks, resolve_link_blocks
from one4d_train.model.dlc import BRANCHES, SHARED, InputDtypeConv3d, InputDtypeLinear, apply_dlc
from one4d_train.model.fp8 import convert_frozen_linears
from one4d_train.model.offload import apply_configured_offload
from one4d_train.model.state_dict import load_backbone_weights

LATENT_CHANNELS = 16


def trainable_conv_copy(conv: nn.Conv3d, in_channels: int) -> InputDtypeConv3d:
    """An fp32 trainable patch embedding with `in_channels` inputs: the base's weights on its own input
    channels, zeros on any extra ones."""
    new = InputDtypeConv3d(in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                           bias=conv.bias is not None, device=conv.weight.device, dtype=torch.float32)
    with torch.no_grad():
        new.weight.zero_()
        new.weight[:, :conv.in_channels].copy_(conv.weight)
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    return new


def widened_head(head: nn.Linear, patch_volume: int, out_dim: int) -> InputDtypeLinear:
    """An fp32 trainable head predicting RGB and XYZ velocities for every patch position.

    Wan's head rows are ordered (patch position, channel); the widened head keeps that order with
    2*out_dim channels, the RGB channels first. Both halves start from the base's rows.
    """
    new = InputDtypeLinear(head.in_features, 2 * head.out_features, bias=head.bias is not None,
                           device=head.weight.device, dtype=torch.float32)
    with torch.no_grad():
        w = head.weight.reshape(patch_volume, 1, out_dim, -1).expand(-1, 2, -1, -1)
        new.weight.copy_(w.reshape(new.weight.shape))
        if head.bias is not None:
            new.bias.copy_(head.bias.reshape(patch_volume, 1, out_dim).expand(-1, 2, -1).reshape(-1))
    return new


class One4DModel(nn.Module):
    """`base` (a WanDiT, frozen here) with the trainable parts of `cfg.design`; the base is modified in place."""

    def __init__(self, base: nn.Module, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.design = cfg.design
        self.base = base
        embedding = base.patch_embedding
        self.in_dim = embedding.in_channels
        self.dim = embedding.out_channels
        self.patch_volume = math.prod(embedding.kernel_size)
        self.out_dim = base.head.head.out_features // self.patch_volume
        device = embedding.weight.device
        self.compute_dtype = embedding.weight.dtype
        self.activation_offload = None  # a HostOffload (offload.py) around the blocks, set by apply_activation_offload

        if self.design == "dlc":
            apply_dlc(base, cfg.lora, BRANCHES, cfg.lora_kernel)
            self.xyz_patch_embedding = (trainable_conv_copy(embedding, self.in_dim)
                                        if cfg.xyz_patch_embedding else None)
            self.link_blocks = resolve_link_blocks(cfg.link_blocks, cfg.num_links, len(base.blocks))
            self.control_links = ControlLinks(self.dim, self.link_blocks, device)
        elif self.design in ("channel_concat", "width_concat"):
            apply_dlc(base, cfg.lora, SHARED, cfg.lora_kernel)
            self.link_blocks = []
            if self.design == "channel_concat":
                base.patch_embedding = trainable_conv_copy(embedding, self.in_dim + LATENT_CHANNELS)
                base.head.head = widened_head(base.head.head, self.patch_volume, self.out_dim)
        else:
            raise ValueError(f"model.design must be dlc, channel_concat or width_concat, got {self.design!r}")
        if cfg.base_matmul == "fp8":
            convert_frozen_linears(base.blocks)

    def forward(self, rgb_in: torch.Tensor, xyz_in: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                clip_fea: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """rgb_in [B,36,F,H,W] (noisy latent, mask, condition latent), xyz_in [B,16,F,H,W] noisy XYZ latent,
        t [B], context [B,L,4096] -> (v_rgb, v_xyz), each [B,16,F,H,W]."""
        base = self.base
        e, e0 = base.embed_time(t)
        ctx = base.embed_context(context, clip_fea)
        if self.design == "dlc":
            return self._forward_dlc(rgb_in, xyz_in, e, e0, ctx)
        if self.design == "channel_concat":
            tokens, grid = base.patchify(torch.cat([rgb_in, xyz_in.to(rgb_in.dtype)], dim=1))
            tokens = tokens.to(self.compute_dtype)
            tokens = base.head_out(self._run_blocks(tokens, e0, ctx, grid), e)
            rgb, xyz = tokens.unflatten(-1, (self.patch_volume, 2, self.out_dim)).unbind(-2)
            return base.unpatchify(rgb.flatten(-2), grid), base.unpatchify(xyz.flatten(-2), grid)
        wide = torch.cat([rgb_in, self._pad_xyz(xyz_in, rgb_in.dtype)], dim=-1)
        tokens, grid = base.patchify(wide)
        out = base.unpatchify(base.head_out(self._run_blocks(tokens, e0, ctx, grid), e), grid)
        return out.chunk(2, dim=-1)

    def _pad_xyz(self, xyz_in: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The XYZ latent plus zero channels up to the patch embedding's input width."""
        return F.pad(xyz_in.to(dtype), (0, 0, 0, 0, 0, 0, 0, self.in_dim - xyz_in.shape[1]))

    def _forward_dlc(self, rgb_in, xyz_in, e, e0, ctx):
        base = self.base
        rgb_tokens, grid = base.patchify(rgb_in)
        xyz_tokens, _ = base.patchify(self._pad_xyz(xyz_in, rgb_in.dtype), embedding=self.xyz_patch_embedding)
        tokens = torch.cat([rgb_tokens, xyz_tokens.to(self.compute_dtype)])
        tokens = self._run_blocks(tokens, e0.repeat(2, 1, 1), ctx.repeat(2, 1, 1), grid)
        out = base.unpatchify(base.head_out(tokens, e.repeat(2, 1)), grid)
        return out.chunk(2)

    def _run_blocks(self, tokens, e0, ctx, grid):
        freqs = self.base.rope_freqs(grid, tokens.device)
        with self.activation_offload() if self.activation_offload else contextlib.nullcontext() as offload:
            for i, block in enumerate(self.base.blocks):
                if offload is not None:  # each block's saved tensors a group: brought back a block ahead
                    offload.next_group()
                tokens = block(tokens, e0, ctx, freqs)
                if self.link_blocks and self.control_links.has(i):
                    tokens = self.control_links(i, tokens)
        return tokens

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """fp32 copies of the trainable tensors, by their names in this model (the export's input)."""
        return {n: p.detach().float() for n, p in self.named_parameters() if p.requires_grad}


DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def random_base_state(wan_cfg, seed: int) -> dict[str, torch.Tensor]:
    """The frozen base of runs without a checkpoint (tests, the CPU demo, benchmarks): Wan's initialisation,
    seeded on the CPU so every device and every caller gets the same weights, except the output head. A random
    base stands in for a pretrained one, and Wan's zero head (meant for pretraining from scratch) would stop
    every gradient from reaching the blocks' adapters."""
    with torch.device("meta"):
        ref = WanDiT(wan_cfg)
    ref.to_empty(device="cpu")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        ref.init_weights()
        nn.init.normal_(ref.head.head.weight, std=wan_cfg.dim ** -0.5)
    return ref.state_dict()


def build_one4d(cfg: ModelConfig, device="cpu", dtype: torch.dtype | None = None, seed: int = 0) -> One4DModel:
    """The backbone of `cfg.preset` (36 input channels) with `cfg.checkpoint`'s weights or `random_base_state`, stored in `dtype` (default: cfg.compute_dtype) on `device`, wrapped as One4D (trainable
    parts fp32, seeded too); activation checkpointing per block as configured. On the meta device nothing is
    materialised (planning, parameter counts)."""
    device = torch.device(device)
    dtype = DTYPES[cfg.compute_dtype] if dtype is None else dtype
    wan_cfg = wan_config(cfg.preset, in_dim=36, has_image_input=cfg.has_image_input)
    with torch.device("meta"):
        base = WanDiT(wan_cfg).to(dtype)
    set_attention_backend(cfg.attention)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        if device.type != "meta":
            base.to_empty(device=device)
            if cfg.checkpoint:
                load_backbone_weights(base, cfg.checkpoint)
            else:
                base.load_state_dict(random_base_state(wan_cfg, seed))
        model = One4DModel(base, cfg)
    apply_configured_checkpointing(base.blocks, cfg)
    apply_configured_offload(model, cfg)
    return model
