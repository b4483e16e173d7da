"""Wan2.1 DiT architecture sizes: the `WanConfig` dataclass and the named presets."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

# CLIP ViT-H/14 penultimate-layer tokens per image (256 patches + class token), as Wan2.1 I2V uses
IMAGE_TOKENS = 257


@dataclass(frozen=True)
class WanConfig:
    in_dim: int
    dim: int
    ffn_dim: int
    num_heads: int
    num_layers: int
    freq_dim: int = 256
    text_dim: int = 4096
    out_dim: int = 16
    patch_size: tuple[int, int, int] = (1, 2, 2)
    window_size: tuple[int, int] = (-1, -1)
    qk_norm: bool = True
    cross_attn_norm: bool = True
    eps: float = 1e-6
    has_image_input: bool = False
    image_dim: int = 1280
    text_len: int = 512

    def __post_init__(self):
        object.__setattr__(self, "patch_size", tuple(self.patch_size))
        object.__setattr__(self, "window_size", tuple(self.window_size))
        if self.dim % self.num_heads:
            raise ValueError(f"WanConfig: dim {self.dim} is not divisible by num_heads {self.num_heads}")
        head_dim = self.dim // self.num_heads
        if head_dim % 2 or head_dim < 6:
            raise ValueError(f"WanConfig: head dim {head_dim} must be even and >= 6 for the 3D RoPE split")
        if self.window_size != (-1, -1):
            raise ValueError("WanConfig: only global attention (window_size (-1, -1)) is supported, as in Wan2.1")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads


PRESETS: dict[str, dict] = {
    "1.3b": dict(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30),
    "14b": dict(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40),
    # head dim 16 splits into RoPE parts 8 (frames) + 4 (height) + 4 (width)
    "tiny": dict(dim=64, ffn_dim=128, num_heads=4, num_layers=3, text_dim=64, image_dim=32),
}


def wan_config(preset: str, in_dim: int = 36, has_image_input: bool = True, **overrides) -> WanConfig:
    """A preset as i2v/InP (defaults: 36 input channels, image cross-attention) or t2v (in_dim=16,
    has_image_input=False); `overrides` replace any other WanConfig field."""
    if preset not in PRESETS:
        raise ValueError(f"unknown backbone preset {preset!r}; choose one of {', '.join(PRESETS)}")
    unknown = set(overrides) - {f.name for f in dataclasses.fields(WanConfig)}
    if unknown:
        raise ValueError(f"unknown WanConfig fields: {', '.join(sorted(unknown))}")
    return WanConfig(**{**PRESETS[preset], "in_dim": in_dim, "has_image_input": has_image_input, **overrides})
