"""Regional torch.compile: each DiT block's call (its activation checkpointing included) is compiled on its own.

Compiling per block keeps compile time to one block's graph (all blocks share the code, so the graph is reused)
and lets Inductor fuse the elementwise work around the matmuls (fp32 LayerNorm/RMSNorm statistics, RoPE,
adaLN modulation, gated residuals), which at One4D's shape is memory-bound time of the same order as the
matmuls. The checkpoint sits inside the compiled region, so selective checkpointing policies are traced as
well (torch's supported order: checkpoint first, then compile). Parameter-fetching hooks (ZeRO-3) cause
graph breaks: use it with ZeRO-2 or a persistence threshold that keeps the frozen base resident.
"""
from __future__ import annotations

import functools

import torch
from torch import nn


class _Compiled:
    def __call__(self, *args, **kwargs):
        fn = self.__dict__.get("_compiled_call")
        if fn is None:
            return super().__call__(*args, **kwargs)
        return fn(self, *args, **kwargs)


def _block_call(block, *args, **kwargs):
    """The block's uncompiled call (checkpointing included). One function for every block: the block is an input
    (its parameters are graph inputs), so one compiled graph serves all blocks of the same structure."""
    return block._uncompiled_class.__call__(block, *args, **kwargs)


@functools.lru_cache(maxsize=None)
def _compiled_class(cls: type) -> type:
    return type(f"Compiled{cls.__name__}", (_Compiled, cls), {"_uncompiled_class": cls})


def compile_blocks(blocks, **compile_kwargs) -> None:
    """Compile the call of every block in `blocks` (after activation checkpointing has been applied)."""
    fn = torch.compile(_block_call, **compile_kwargs)
    for block in blocks:
        cls = getattr(type(block), "_uncompiled_class", type(block))
        block.__class__ = _compiled_class(cls)
        block.__dict__["_compiled_call"] = fn


def uncompile_blocks(blocks) -> None:
    for block in blocks:
        cls = getattr(type(block), "_uncompiled_class", None)
        if cls is not None:
            block.__class__ = cls
            block.__dict__.pop("_compiled_call", None)


def is_compiled(block: nn.Module) -> bool:
    return "_compiled_call" in block.__dict__
