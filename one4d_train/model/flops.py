"""Analytic model FLOPs of one One4D training sample, for MFU.

What is counted (a frozen base, so no weight gradients for it):
- base linears: forward, plus the activation-gradient backward wherever autograd needs one
  (the cross-attention k/v projections of the text/image context need none: nothing trainable feeds them);
- LoRA adapters: forward, activation-gradient and weight-gradient (3x forward; 2x for the down-projection
  of the cross-attention k/v, whose context input needs no gradient);
- control links and trainable embeddings/heads: the same rules;
- attention: forward 4*S_q*S_k*d; backward `attention_backward_factor` x forward. Fused kernels
  (cuDNN/flash SDPA, FlashAttention) recompute the scores, 2.5x; the unfused math path does not, 2.0x.
Recomputation by activation checkpointing is never counted (model FLOPs, not hardware FLOPs).
"""
from __future__ import annotations

from dataclasses import dataclass

SELF = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o")
CROSS_Q_O = ("cross_attn.q", "cross_attn.o")
CROSS_TEXT_KV = ("cross_attn.k", "cross_attn.v")
CROSS_IMG_KV = ("cross_attn.k_img", "cross_attn.v_img")
FFN = ("ffn.0", "ffn.2")


@dataclass
class FlopShape:
    dim: int
    ffn_dim: int
    num_layers: int
    tokens: int  # video tokens per modality (T_lat * h/2 * w/2)
    text_len: int = 512
    image_tokens: int = 0  # 257 with the I2V image cross-attention, else 0
    in_dim: int = 36
    out_dim: int = 16
    patch_volume: int = 4  # 1 x 2 x 2


def _linear(tokens: int, n_in: int, n_out: int) -> float:
    return 2.0 * tokens * n_in * n_out


def block_linear_shapes(s: FlopShape) -> dict[str, tuple[int, int, int]]:
    """name -> (tokens, in, out) of every block linear, official names."""
    d = s.dim
    shapes = {n: (s.tokens, d, d) for n in SELF + CROSS_Q_O}
    shapes.update({n: (s.text_len, d, d) for n in CROSS_TEXT_KV})
    if s.image_tokens:
        shapes.update({n: (s.image_tokens, d, d) for n in CROSS_IMG_KV})
    shapes["ffn.0"] = (s.tokens, d, s.ffn_dim)
    shapes["ffn.2"] = (s.tokens, s.ffn_dim, d)
    return shapes


def training_flops_per_sample(s: FlopShape, *, lora_rank: int, lora_targets: list[str] | tuple[str, ...],
                              num_link_blocks: int = 0, xyz_patch_embedding: bool = True,
                              modalities: int = 2, attention_backward_factor: float = 2.5,
                              trainable_embedding: bool = False, trainable_head: bool = False) -> float:
    """Model FLOPs of forward + backward for one sample (both branches when modalities == 2).
    `trainable_embedding` / `trainable_head`: the one sequence's patch embedding / head is trained (the
    channel-concat design's widened copies); with modalities == 2 only the XYZ embedding copy can be."""
    shapes = block_linear_shapes(s)
    context_kv = set(CROSS_TEXT_KV + CROSS_IMG_KV)
    per_block = 0.0
    for name, (n, i, o) in shapes.items():
        fwd = _linear(n, i, o)
        per_block += fwd if name in context_kv else 2 * fwd
        if name in lora_targets:  # up: forward, weight and input gradients; down: forward, weight gradient,
            # and the input gradient unless its input is the context, which needs none
            per_block += 3 * _linear(n, lora_rank, o) + (2 if name in context_kv else 3) * _linear(n, i, lora_rank)
    attn_fwd = 4.0 * s.tokens * s.tokens * s.dim + 4.0 * s.tokens * (s.text_len + s.image_tokens) * s.dim
    per_block += (1 + attention_backward_factor) * attn_fwd
    total = modalities * s.num_layers * per_block
    if not (trainable_embedding or (modalities == 2 and xyz_patch_embedding)):
        # the first block's input comes from a frozen embedding: its self-attention q/k/v (and their LoRA
        # down-projections) need no input gradient
        total -= modalities * sum(_linear(s.tokens, s.dim, s.dim) + (_linear(s.tokens, s.dim, lora_rank)
                                                                     if n in lora_targets else 0)
                                  for n in SELF[:3])
    # links: both directions, trainable (3x forward), once per sample over the branch pair
    total += num_link_blocks * 2 * 3 * _linear(s.tokens, s.dim, s.dim)
    embed = _linear(s.tokens, s.in_dim * s.patch_volume, s.dim)
    head = _linear(s.tokens, s.dim, s.out_dim * s.patch_volume)
    # an embedding's input never needs a gradient: forward, plus the weight gradient where it is trained
    total += 2 * embed if trainable_embedding else embed
    if modalities == 2:
        total += 2 * embed if xyz_patch_embedding else embed
    # the head: forward + activation gradient, plus the weight gradient where it is trained
    total += modalities * (3 if trainable_head else 2) * head
    return total


def model_flops_per_sample(model_cfg, wan_cfg, tokens: int, *, image_tokens: int,
                           attention_backward_factor: float = 2.5) -> float:
    """Model FLOPs of one training sample of `model_cfg` (a ModelConfig: design, LoRA, links) on the Wan
    config `wan_cfg`, `tokens` video tokens per modality, `image_tokens` CLIP tokens (0 without the image
    cross-attention). What the trainer logs as MFU and the benchmark prints."""
    base = dict(dim=wan_cfg.dim, ffn_dim=wan_cfg.ffn_dim, num_layers=wan_cfg.num_layers, text_len=wan_cfg.text_len,
                image_tokens=image_tokens, in_dim=wan_cfg.in_dim, out_dim=wan_cfg.out_dim)
    common = dict(lora_rank=model_cfg.lora.rank, lora_targets=model_cfg.lora.targets,
                  attention_backward_factor=attention_backward_factor)
    if model_cfg.design == "dlc":
        links = len(model_cfg.link_blocks) or model_cfg.num_links
        return training_flops_per_sample(FlopShape(tokens=tokens, **base), num_link_blocks=links,
                                         xyz_patch_embedding=model_cfg.xyz_patch_embedding, **common)
    if model_cfg.design == "channel_concat":  # one sequence, 16 more input channels, a head for both
        base.update(in_dim=wan_cfg.in_dim + wan_cfg.out_dim, out_dim=2 * wan_cfg.out_dim)
        return training_flops_per_sample(FlopShape(tokens=tokens, **base), modalities=1, trainable_embedding=True,
                                         trainable_head=True, **common)
    if model_cfg.design == "width_concat":  # one sequence of both token sets: attention over twice the tokens
        return training_flops_per_sample(FlopShape(tokens=2 * tokens, **base), modalities=1, **common)
    raise ValueError(f"model.design must be dlc, channel_concat or width_concat, got {model_cfg.design!r}")
