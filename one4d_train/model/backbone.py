"""Wan2.1 DiT with the official module names, so official checkpoints load 1:1.

Numerics follow Wan2.1's arithmetic: time embedding, adaLN modulation, LayerNorm/RMSNorm statistics and RoPE are
computed in fp32 whatever the storage dtype; linears run in the activations' dtype; the residual stream keeps the
dtype of the tokens that enter the blocks. Storage differs: the whole module is stored in one dtype (bf16 in
training, as DeepSpeed's bf16 engine casts it), the modulation tables and time MLP included, where Wan and diffusers
keep those in fp32 (measured on a tiny model with large modulation: 0.62% from the fp32 output, 0.46% with those
kept in fp32).
Only parameters live in the module (no buffers), so it builds on the meta device.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from one4d_train.model.attention import attention
from one4d_train.model.presets import IMAGE_TOKENS, WanConfig, wan_config

__all__ = ["WanConfig", "WanDiT", "WanBlock", "wan_config", "sinusoidal_embedding", "apply_rope"]


class Float32Linear(nn.Linear):
    """A linear computed in fp32 whatever its storage dtype (Wan's time embedding)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.float()
        return F.linear(x.float(), self.weight.float(), bias)


class Float32LayerNorm(nn.LayerNorm):
    """LayerNorm with fp32 statistics; returns fp32 (callers cast after modulation)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps)


class RMSNorm(nn.Module):
    """Wan's RMSNorm over the whole feature axis (across heads); fp32 statistics, output in the input dtype."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).type_as(x)


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """[B] timesteps -> [B, dim] fp32 (cos half, then sin half), as Wan2.1."""
    half = dim // 2
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    args = torch.outer(t.to(torch.float64), freqs)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1).float()


def rope_tables(grid: tuple[int, int, int], head_dim: int, device, theta: float = 10000.0):
    """(cos, sin), each [f*h*w, 1, head_dim/2] fp32: per rotated pair, frames/height/width angles in Wan's split."""
    c = head_dim // 2
    parts = []
    for axis, n in enumerate((c - 2 * (c // 3), c // 3, c // 3)):
        inv = 1.0 / theta ** (torch.arange(0, 2 * n, 2, dtype=torch.float64) / (2 * n))
        angles = torch.outer(torch.arange(grid[axis], dtype=torch.float64), inv)
        shape = [1, 1, 1, n]
        shape[axis] = grid[axis]
        parts.append(angles.view(shape).expand(*grid, n))
    angles = torch.cat(parts, dim=-1).reshape(math.prod(grid), 1, c)
    return torch.cos(angles).float().to(device), torch.sin(angles).float().to(device)


def apply_rope(x: torch.Tensor, freqs: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotate interleaved channel pairs of x [B, S, H, D] by the angles of `freqs` (fp32 math)."""
    cos, sin = freqs
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2).type_as(x)


class SelfAttention(nn.Module):
    def __init__(self, cfg: WanConfig):
        super().__init__()
        dim = cfg.dim
        self.num_heads = cfg.num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q = RMSNorm(dim, cfg.eps) if cfg.qk_norm else nn.Identity()
        self.norm_k = RMSNorm(dim, cfg.eps) if cfg.qk_norm else nn.Identity()

    def forward(self, x: torch.Tensor, freqs) -> torch.Tensor:
        heads = (self.num_heads, -1)
        q = apply_rope(self.norm_q(self.q(x)).unflatten(-1, heads), freqs)
        k = apply_rope(self.norm_k(self.k(x)).unflatten(-1, heads), freqs)
        v = self.v(x).unflatten(-1, heads)
        return self.o(attention(q, k, v).flatten(2))


class CrossAttention(nn.Module):
    """Attention from video tokens to the text tokens, plus (I2V) to the first IMAGE_TOKENS image tokens."""

    def __init__(self, cfg: WanConfig):
        super().__init__()
        dim = cfg.dim
        self.num_heads = cfg.num_heads
        self.has_image_input = cfg.has_image_input
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q = RMSNorm(dim, cfg.eps) if cfg.qk_norm else nn.Identity()
        self.norm_k = RMSNorm(dim, cfg.eps) if cfg.qk_norm else nn.Identity()
        if cfg.has_image_input:
            self.k_img = nn.Linear(dim, dim)
            self.v_img = nn.Linear(dim, dim)
            self.norm_k_img = RMSNorm(dim, cfg.eps) if cfg.qk_norm else nn.Identity()

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        heads = (self.num_heads, -1)
        if self.has_image_input:
            context_img, context = context[:, :IMAGE_TOKENS], context[:, IMAGE_TOKENS:]
        q = self.norm_q(self.q(x)).unflatten(-1, heads)
        k = self.norm_k(self.k(context)).unflatten(-1, heads)
        out = attention(q, k, self.v(context).unflatten(-1, heads)).flatten(2)
        if self.has_image_input:
            k_img = self.norm_k_img(self.k_img(context_img)).unflatten(-1, heads)
            out = out + attention(q, k_img, self.v_img(context_img).unflatten(-1, heads)).flatten(2)
        return self.o(out)


class WanBlock(nn.Module):
    """adaLN-modulated self-attention, un-modulated cross-attention, modulated FFN; gates in fp32."""

    def __init__(self, cfg: WanConfig):
        super().__init__()
        dim = cfg.dim
        self.norm1 = Float32LayerNorm(dim, cfg.eps, elementwise_affine=False)
        self.self_attn = SelfAttention(cfg)
        self.norm3 = Float32LayerNorm(dim, cfg.eps) if cfg.cross_attn_norm else nn.Identity()
        self.cross_attn = CrossAttention(cfg)
        self.norm2 = Float32LayerNorm(dim, cfg.eps, elementwise_affine=False)
        self.ffn = nn.Sequential(nn.Linear(dim, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, dim))
        self.modulation = nn.Parameter(torch.empty(1, 6, dim))

    def forward(self, x: torch.Tensor, e0: torch.Tensor, context: torch.Tensor, freqs) -> torch.Tensor:
        """x [B, N, dim], e0 [B, 6, dim] fp32, context [B, L, dim], freqs from `WanDiT.rope_freqs`."""
        for update in self.sublayers(e0, context, freqs):
            x = self.run_sublayer(update, x)
        return x

    def sublayers(self, e0: torch.Tensor, context: torch.Tensor, freqs) -> tuple:
        """The block as its three residual updates x -> x, in order: self-attention, cross-attention, FFN (whose
        `parts` split it at its activation: x -> hidden, then (x, hidden) -> x)."""
        shift, scale, gate, c_shift, c_scale, c_gate = (self.modulation.float() + e0.float()).chunk(6, dim=1)

        def self_attention(x):
            y = self.self_attn((self.norm1(x) * (1 + scale) + shift).type_as(x), freqs)
            return (x.float() + y.float() * gate).type_as(x)

        def cross_attention(x):
            return x + self.cross_attn(self.norm3(x).type_as(x), context)

        def ffn_hidden(x):  # the FFN's first linear: its pre-activation
            return self.ffn[0]((self.norm2(x) * (1 + c_scale) + c_shift).type_as(x))

        def ffn_out(x, hidden):
            y = self.ffn[2](self.ffn[1](hidden))
            # = (x.float() + y.float() * c_gate), with no x.float() of its own: a compiled graph would share
            # ffn_hidden's (its norm's) and then keep that fp32 copy of x across the split (twice x's bytes)
            return (y.float() * c_gate + x).type_as(x)

        def ffn(x):
            return ffn_out(x, ffn_hidden(x))

        ffn.parts = (ffn_hidden, ffn_out)  # checkpointing by `sublayer_ffn` makes each part a region
        return self_attention, cross_attention, ffn

    def run_sublayer(self, update, x: torch.Tensor) -> torch.Tensor:
        """One residual update (activation checkpointing per sub-layer recomputes each on its own)."""
        return update(x)


class Head(nn.Module):
    def __init__(self, cfg: WanConfig):
        super().__init__()
        self.norm = Float32LayerNorm(cfg.dim, cfg.eps, elementwise_affine=False)
        self.head = nn.Linear(cfg.dim, cfg.out_dim * math.prod(cfg.patch_size))
        self.modulation = nn.Parameter(torch.empty(1, 2, cfg.dim))

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        shift, scale = (self.modulation.float() + e.float().unsqueeze(1)).chunk(2, dim=1)
        return self.head((self.norm(x) * (1 + scale) + shift).type_as(x))


class MLPProj(nn.Module):
    """CLIP image features -> image context tokens (`img_emb.proj.{0,1,3,4}`)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.proj = nn.Sequential(
            Float32LayerNorm(in_dim), nn.Linear(in_dim, in_dim), nn.GELU(), nn.Linear(in_dim, out_dim),
            Float32LayerNorm(out_dim),
        )

    def forward(self, clip_fea: torch.Tensor) -> torch.Tensor:
        norm_in, fc1, act, fc2, norm_out = self.proj
        x = act(fc1(norm_in(clip_fea).to(fc1.weight.dtype)))
        return norm_out(fc2(x)).to(fc1.weight.dtype)


class WanDiT(nn.Module):
    """Wan2.1 DiT. `forward` is the composition of the public stages the DLC model reuses:
    patchify -> embed_time -> embed_context -> rope_freqs -> blocks[i](x, e0, context, freqs) -> head_out ->
    unpatchify."""

    def __init__(self, cfg: WanConfig):
        super().__init__()
        self.cfg = cfg
        dim = cfg.dim
        self.patch_embedding = nn.Conv3d(cfg.in_dim, dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim))
        self.time_embedding = nn.Sequential(Float32Linear(cfg.freq_dim, dim), nn.SiLU(), Float32Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), Float32Linear(dim, dim * 6))
        self.blocks = nn.ModuleList(WanBlock(cfg) for _ in range(cfg.num_layers))
        self.head = Head(cfg)
        if cfg.has_image_input:
            self.img_emb = MLPProj(cfg.image_dim, dim)
        self._rope_cache: dict = {}
        if not hasattr(self.patch_embedding.weight, "ds_id"):  # under ZeRO-3 zero.Init the loader fills the weights
            self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Wan2.1's initialisation (also materialises a model moved off the meta device with `to_empty`)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.LayerNorm, RMSNorm)) and m.weight is not None:
                nn.init.ones_(m.weight)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.patch_embedding.weight.view(self.cfg.dim, -1))
        nn.init.zeros_(self.patch_embedding.bias)
        for m in [*self.text_embedding, *self.time_embedding]:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
        for block in self.blocks:
            block.modulation.normal_(0, self.cfg.dim ** -0.5)
        self.head.modulation.normal_(0, self.cfg.dim ** -0.5)
        nn.init.zeros_(self.head.head.weight)

    def embed_time(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """t [B] (0..1000) -> e [B, dim] fp32 (head modulation), e0 [B, 6, dim] fp32 (block modulation)."""
        e = self.time_embedding(sinusoidal_embedding(t, self.cfg.freq_dim))
        return e, self.time_projection(e).unflatten(1, (6, self.cfg.dim))

    def embed_context(self, context: torch.Tensor, clip_fea: torch.Tensor | None = None) -> torch.Tensor:
        """Text [B, L, text_dim] (zero-padded to text_len by the caller) and, for I2V, CLIP features
        [B, 257, image_dim] -> [B, (257 +) L, dim], image tokens first."""
        x = self.text_embedding(context.to(self.text_embedding[0].weight.dtype))
        if self.cfg.has_image_input:
            if clip_fea is None or clip_fea.shape[1] != IMAGE_TOKENS:
                got = None if clip_fea is None else tuple(clip_fea.shape)
                raise ValueError(f"this backbone has image cross-attention: clip_fea [B, {IMAGE_TOKENS}, "
                                 f"{self.cfg.image_dim}] is required, got {got}")
            x = torch.cat([self.img_emb(clip_fea).to(x.dtype), x], dim=1)
        elif clip_fea is not None:
            raise ValueError("clip_fea given but this backbone has no image cross-attention")
        return x

    def patchify(self, x: torch.Tensor, embedding: nn.Module | None = None):
        """x [B, C, F, H, W] -> tokens [B, f*h*w, dim] (frame-major), grid (f, h, w)."""
        embedding = self.patch_embedding if embedding is None else embedding
        y = embedding(x.to(embedding.weight.dtype))
        return y.flatten(2).transpose(1, 2).contiguous(), tuple(y.shape[2:])

    def rope_freqs(self, grid: tuple[int, int, int], device) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE (cos, sin) tables for a token grid, cached per (grid, device)."""
        key = (tuple(grid), torch.device(device))
        if key not in self._rope_cache:
            self._rope_cache[key] = rope_tables(key[0], self.cfg.head_dim, key[1])
        return self._rope_cache[key]

    def head_out(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """[B, N, dim] -> [B, N, out_dim * prod(patch_size)] in the tokens' dtype."""
        return self.head(x, e)

    def unpatchify(self, x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """[B, f*h*w, out_dim * prod(patch)] -> [B, out_dim, f*pt, h*ph, w*pw]."""
        (f, h, w), (pt, ph, pw) = grid, self.cfg.patch_size
        x = x.view(x.shape[0], f, h, w, pt, ph, pw, self.cfg.out_dim)
        return x.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(x.shape[0], self.cfg.out_dim, f * pt, h * ph, w * pw)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                clip_fea: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, in_dim, F, H, W], t [B], context [B, L, text_dim], clip_fea [B, 257, image_dim] (I2V)
        -> [B, out_dim, F, H, W] in the model's dtype."""
        tokens, grid = self.patchify(x)
        e, e0 = self.embed_time(t)
        context = self.embed_context(context, clip_fea)
        freqs = self.rope_freqs(grid, tokens.device)
        for block in self.blocks:
            tokens = block(tokens, e0, context, freqs)
        return self.unpatchify(self.head_out(tokens, e), grid)
