"""Analytic model FLOPs of one One4D training sample, for MFU.

What is counted (a frozen base, so no weight gradients for it):
- base linears: forward, plus the activation-gradient backward wherever autograd needs one
  (the cross-attention k/v projections of the text/image context need none: nothing trainable feeds them);
- LoRA adapters: forward, activation-gradient and weight-gradient (3x forward);
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
                              modalities: int = 2, attention_backward_factor: float = 2.5) -> float:
    """Model FLOPs of forward + backward for one sample (both branches when modalities == 2)."""
    shapes = block_linear_shapes(s)
    context_kv = set(CROSS_TEXT_KV + CROSS_IMG_KV)
    per_block = 0.0
    for name, (n, i, o) in shapes.items():
        fwd = _linear(n, i, o)
        per_block += fwd if name in context_kv else 2 * fwd
        if name in lora_targets:
            per_block += 3 * (_linear(n, i, lora_rank) + _linear(n, lora_rank, o))
    attn_fwd = 4.0 * s.tokens * s.tokens * s.dim + 4.0 * s.tokens * (s.text_len + s.image_tokens) * s.dim
    per_block += (1 + attention_backward_factor) * attn_fwd
    total = modalities * s.num_layers * per_block
    # links: both directions, trainable (3x forward), once per sample over the branch pair
    total += num_link_blocks * 2 * 3 * _linear(s.tokens, s.dim, s.dim)
    embed = _linear(s.tokens, s.in_dim * s.patch_volume, s.dim)
    head = _linear(s.tokens, s.dim, s.out_dim * s.patch_volume)
    total += embed  # RGB embedding: frozen, its input needs no gradient
    if modalities == 2:
        total += 2 * embed if xyz_patch_embedding else embed  # trainable XYZ copy: forward + weight gradient
    total += modalities * 2 * head  # frozen head: forward + activation gradient
    return total
