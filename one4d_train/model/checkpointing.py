"""Activation checkpointing of DiT blocks, applied from outside the model.

Modes:
- `none`: blocks keep every activation.
- `full`: each block keeps only its inputs; the whole block is recomputed in backward.
- `selective`: each block keeps its inputs and the outputs of its attention kernels (with their softmax
  statistics); backward recomputes only the linears, norms, modulation and RoPE, never the attention itself.

Checkpointing is non-reentrant (reentrant checkpointing breaks under ZeRO-3). The block's class is swapped for a
subclass whose `__call__` runs the ordinary module call inside `torch.utils.checkpoint`, so module names and
state-dict keys stay unchanged and the block's hooks (ZeRO-3 parameter gathering) run again on recompute.
"""
from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

MODES = ("none", "full", "selective")


def _attention_ops() -> set:
    names = [
        ("aten", "_scaled_dot_product_flash_attention"), ("aten", "_scaled_dot_product_cudnn_attention"),
        ("aten", "_scaled_dot_product_efficient_attention"), ("aten", "_scaled_dot_product_flash_attention_for_cpu"),
        ("flash_attn", "_flash_attn_forward"), ("flash_attn_3", "fwd"),
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


def _selective_context():
    return create_selective_checkpoint_contexts(_keep_attention)


class _Checkpointed:
    _checkpoint_mode = "full"

    def __call__(self, *args, **kwargs):
        if not torch.is_grad_enabled():
            return super().__call__(*args, **kwargs)
        if self._checkpoint_mode == "selective":
            return checkpoint(super().__call__, *args, use_reentrant=False, context_fn=_selective_context, **kwargs)
        return checkpoint(super().__call__, *args, use_reentrant=False, **kwargs)


@functools.lru_cache(maxsize=None)
def _checkpointed_class(cls: type) -> type:
    return type(f"Checkpointed{cls.__name__}", (_Checkpointed, cls), {"_original_class": cls})


def apply_activation_checkpointing(blocks: nn.ModuleList, mode: str) -> None:
    """Checkpoint every block of `blocks` in `mode` (none | full | selective); re-applying replaces the mode."""
    if mode not in MODES:
        raise ValueError(f"activation checkpointing mode {mode!r}: choose one of {', '.join(MODES)}")
    for block in blocks:
        cls = getattr(type(block), "_original_class", type(block))
        if mode == "none":
            block.__class__ = cls
            block.__dict__.pop("_checkpoint_mode", None)
            continue
        block.__class__ = _checkpointed_class(cls)
        block._checkpoint_mode = mode
