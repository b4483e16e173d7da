"""CLIP vision embedding of the first observed frame, for backbones with Wan's image projection.

Wan2.1 I2V feeds the DiT all tokens of the penultimate CLIP ViT-H/14 layer (`use_31_block`, i.e.
transformers' `hidden_states[-2]`, no final layer norm): 257 x 1280 at 224 px. Preprocessing follows Wan's
`CLIPModel.visual`: the frame (in [-1, 1]) is resized without cropping to the model's square input size
(bicubic, align_corners=False), mapped to [0, 1] and normalised with CLIP's mean/std - all in torch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import CLIPVisionConfig, CLIPVisionModel

from one4d_train.model.pretrained import load_complete

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class CLIPImageEncoder:
    """Frozen CLIP vision tower. `encode(frames [B, 3, H, W] in [-1, 1]) -> [B, tokens, hidden]`."""

    def __init__(self, model: CLIPVisionModel, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu"):
        self.model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.dtype = dtype
        self.device = torch.device(device)
        self.size = model.config.image_size
        self.mean = torch.tensor(CLIP_MEAN, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(CLIP_STD, device=device).view(1, 3, 1, 1)

    @classmethod
    def from_pretrained(cls, path: str, dtype: torch.dtype = torch.float32, **kwargs) -> "CLIPImageEncoder":
        return cls(load_complete(CLIPVisionModel, path, "image encoder", dtype=dtype), dtype=dtype, **kwargs)

    def preprocess(self, frames: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(frames.to(self.device).float(), size=(self.size, self.size), mode="bicubic",
                          align_corners=False)
        return (x * 0.5 + 0.5 - self.mean) / self.std

    @torch.no_grad()
    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        pixels = self.preprocess(frames).to(self.dtype)
        return self.model(pixel_values=pixels, output_hidden_states=True).hidden_states[-2].float()


def tiny_clip_vision(seed: int = 0, hidden: int = 32, image_size: int = 28, patch: int = 14) -> CLIPVisionModel:
    """The CLIP ViT architecture with a small random config (tokens = (image_size / patch)^2 + 1)."""
    torch.manual_seed(seed)
    config = CLIPVisionConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=3,
                              num_attention_heads=4, image_size=image_size, patch_size=patch, hidden_act="gelu")
    return CLIPVisionModel(config).eval()


def load_image_encoder(path: str = "", seed: int = 0, hidden: int = 32, **kwargs) -> CLIPImageEncoder:
    """`ModelConfig.image_encoder`: a transformers CLIP vision folder; empty = the tiny random tower of width
    `hidden` (the tiny backbone's image_dim)."""
    return CLIPImageEncoder.from_pretrained(path, **kwargs) if path else CLIPImageEncoder(
        tiny_clip_vision(seed, hidden=hidden), **kwargs)
