"""Activation checkpointing of DiT blocks, applied from outside the model.

Modes:
- `none`: blocks keep every activation.
- `full`: each block keeps only its inputs; the whole block is recomputed in backward.
- `selective`: each block keeps its inputs and the outputs of its attention kernels (with their softmax
  statistics); backward recomputes only the linears, norms, modulation and RoPE, never the attention itself.
- `selective_self`: as `selective` for self-attention only; the cross-attentions (to 512 text and 257 image
  tokens: ~3% of a block's attention FLOPs) are recomputed. A third of `selective`'s kept memory.

A count (`ModelConfig.activation_checkpointing_blocks`) limits the mode to the first N blocks; the others keep
every activation (`none`): recompute traded for memory where the GPU has room (1.3B on one GPU).

Units (`ModelConfig.activation_checkpointing_unit`):
- `block`: the block is one checkpointed region; it keeps its input.
- `sublayer`: each of the block's three residual updates (self-attention, cross-attention, FFN) is a region of its
  own, so the residual stream after the self- and after the cross-attention is kept as well (two more tensors of
  the block input's size per block). Backward then never runs the two attentions' output projections again: their
  outputs only feed the residual adds, whose gradients do not need them. That holds in compiled blocks
  (model/compile.py: the graph partitioner recomputes only what backward reads); eager recompute runs each region
  to its last saved tensor, the gate of its residual add, so there the projections run again and the unit only
  costs memory.
- `sublayer_ffn`: as `sublayer`, and the FFN split at its activation into two regions, so its pre-activation (the
  first linear's output, `ffn_dim` wide: 2.7 block inputs' size at 14B, 1 GB a block) is kept too and a compiled
  backward never runs the FFN's first linear again (GELU is recomputed from it). The same eager caveat.

Checkpointing is non-reentrant (reentrant checkpointing breaks under ZeRO-3). The block's class is swapped for a
subclass whose `__call__` runs the ordinary module call inside `torch.utils.checkpoint`, so module names and
state-dict keys stay unchanged and the block's hooks (ZeRO-3 parameter gathering) run again on recompute.
"""
from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from one4d_train.model import attention as _attention  # registers one4d::fa4_fwd; imports the flash libraries
from one4d_train.model.config import CHECKPOINT_MODES as MODES
from one4d_train.model.config import CHECKPOINT_UNITS as UNITS


def _attention_ops() -> set:
    for library in ("fa4", "fa3", "fa2"):  # importing a flash library registers its ops
        _attention._flash_attn_func(library)
    names = [
        ("aten", "_scaled_dot_product_flash_attention"), ("aten", "_scaled_dot_product_cudnn_attention"),
        ("aten", "_scaled_dot_product_efficient_attention"), ("aten", "_scaled_dot_product_flash_attention_for_cpu"),
        ("flash_attn", "_flash_attn_forward"), ("flash_attn_3", "fwd"),
        ("one4d", "fa4_fwd"),  # FlashAttention-4, registered by model/attention.py
    ]
    ops = set()
    for namespace, name in names:
        try:
            ops.add(getattr(getattr(torch.ops, namespace), name).default)
        except (AttributeError, RuntimeError):
            continue
    return ops


@functools.lru_cache(maxsize=None)
def _saved_ops() -> frozenset:
    return frozenset(_attention_ops())


def _keep_attention(ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE if op in _saved_ops() else CheckpointPolicy.PREFER_RECOMPUTE


def _keep_self_attention(ctx, op, *args, **kwargs):
    # self-attention: keys as long as the queries (SDPA [B, H, S, D] and flash-attn [B, S, H, D] layouts alike)
    if op in _saved_ops() and args[0].shape == args[1].shape:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _selective_context():
    return create_selective_checkpoint_contexts(_keep_attention)


def _selective_self_context():
    return create_selective_checkpoint_contexts(_keep_self_attention)


_CONTEXTS = {"selective": _selective_context, "selective_self": _selective_self_context}


def _checkpoint(fn, mode: str, *args, **kwargs):
    context_fn = _CONTEXTS.get(mode)
    if context_fn is not None:
        return checkpoint(fn, *args, use_reentrant=False, context_fn=context_fn, **kwargs)
    return checkpoint(fn, *args, use_reentrant=False, **kwargs)


class _Checkpointed:
    _checkpoint_mode = "full"
    _checkpoint_unit = "block"

    def __call__(self, *args, **kwargs):
        if not torch.is_grad_enabled() or self._checkpoint_unit != "block":  # then per update: run_sublayer
            return super().__call__(*args, **kwargs)
        return _checkpoint(super().__call__, self._checkpoint_mode, *args, **kwargs)

    def run_sublayer(self, update, x):
        if self._checkpoint_unit == "block" or not torch.is_grad_enabled():
            return update(x)
        parts = getattr(update, "parts", None)
        if self._checkpoint_unit == "sublayer_ffn" and parts is not None:
            first, second = parts  # the region boundary keeps what passes between them
            return _checkpoint(second, self._checkpoint_mode, x, _checkpoint(first, self._checkpoint_mode, x))
        return _checkpoint(update, self._checkpoint_mode, x)


@functools.lru_cache(maxsize=None)
def _checkpointed_class(cls: type) -> type:
    return type(f"Checkpointed{cls.__name__}", (_Checkpointed, cls), {"_original_class": cls})


def apply_configured_checkpointing(blocks: nn.ModuleList, cfg, unit: str | None = None) -> None:
    """`ModelConfig.activation_checkpointing` on its first `activation_checkpointing_blocks` blocks, by `unit` or
    else `activation_checkpointing_unit` (every builder of the model, the trainer's included, goes through here).
    The trainer resolves `auto` (model/offload_plan.py: it knows the clip shape and the node); elsewhere, as in
    evaluation, `auto` is the block."""
    unit = unit or cfg.activation_checkpointing_unit
    if cfg.activation_checkpointing != "none":
        apply_activation_checkpointing(blocks, cfg.activation_checkpointing, cfg.activation_checkpointing_blocks,
                                       "block" if unit == "auto" else unit)


def apply_activation_checkpointing(blocks: nn.ModuleList, mode: str, num_blocks: int = -1,
                                   unit: str = "block") -> None:
    """Checkpoint the first `num_blocks` blocks of `blocks` (-1: all) in `mode` (one of MODES) by `unit` (one of
    UNITS), the rest not at all; re-applying replaces the modes."""
    if mode not in MODES:
        raise ValueError(f"activation checkpointing mode {mode!r}: choose one of {', '.join(MODES)}")
    if unit not in UNITS:
        raise ValueError(f"activation checkpointing unit {unit!r}: choose one of {', '.join(UNITS)}")
    if num_blocks < -1:
        raise ValueError(f"activation checkpointing of {num_blocks} blocks: need -1 (all) or a count >= 0")
    if mode != "none" and unit != "block":  # before any block changes
        for block in blocks:
            cls = getattr(type(block), "_original_class", type(block))
            if not hasattr(cls, "sublayers"):
                raise ValueError(f"activation checkpointing by sub-layer: {cls.__name__} has no sub-layers")
    for i, block in enumerate(blocks):
        cls = getattr(type(block), "_original_class", type(block))
        if mode == "none" or 0 <= num_blocks <= i:
            block.__class__ = cls
            block.__dict__.pop("_checkpoint_mode", None)
            block.__dict__.pop("_checkpoint_unit", None)
            continue
        block.__class__ = _checkpointed_class(cls)
        block._checkpoint_mode = mode
        block._checkpoint_unit = unit
