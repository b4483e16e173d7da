"""Activation offload (model/offload.py): same gradients as without it, only activations moved, each once.
The GPU side (pinned copies on a side stream, peak memory) is in test_gpu.py."""
from __future__ import annotations

import copy

import pytest
import torch
from torch._dynamo.utils import counters

from one4d_train.model.checkpointing import apply_activation_checkpointing
from one4d_train.model.compile import compile_blocks, is_compiled
from one4d_train.model.offload import HostOffload, apply_activation_offload
from test_dlc import model_inputs, tiny_one4d


def loss_and_grads(model, inputs):
    v_rgb, v_xyz = model(*inputs)
    loss = v_rgb.square().mean() + v_xyz.square().mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("ckpt,compiled", [("none", False), ("full", False), ("selective", False), ("full", True)])
def test_offload_keeps_loss_and_gradients(ckpt, compiled):
    model, _ = tiny_one4d(activation_checkpointing=ckpt)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)  # zero-initialised links would hide the XYZ branch
    apply_activation_checkpointing(model.base.blocks, ckpt)
    offloaded = copy.deepcopy(model)
    if compiled:  # the compiled region's saved tensors pass through the same hooks
        compile_blocks(offloaded.base.blocks)
        torch._dynamo.reset()
        counters.clear()
    offload = apply_activation_offload(offloaded, min_bytes=0)
    inputs = model_inputs()
    want_loss, want = loss_and_grads(model, inputs)
    loss, got = loss_and_grads(offloaded, inputs)
    assert offload.stats.tensors > 0
    if compiled:  # the blocks ran compiled (else the test would only show eager offload again)
        assert all(is_compiled(b) for b in offloaded.base.blocks) and counters["stats"]["unique_graphs"] > 0
    assert torch.allclose(loss, want_loss, rtol=1e-6) if compiled else torch.equal(loss, want_loss)
    for name, g in want.items():
        if compiled:  # Inductor's fused kernels round differently
            assert (got[name] - g).abs().max() <= 1e-4 * g.abs().max(), name
        else:
            assert torch.equal(got[name], g), name


def test_offload_moves_activations_only_and_each_once():
    from one4d_train.model.offload import _Session

    model, _ = tiny_one4d()
    offload = HostOffload(exclude=model, min_bytes=0)
    session = _Session(offload, offload._param_storages())
    weight = model.base.patch_embedding.weight
    assert session.pack(weight) is weight  # a parameter
    assert isinstance(session.pack(weight.detach()), torch.Tensor) and offload.stats.tensors == 0  # its storage
    x = torch.randn(4, 8)
    first, again = session.pack(x), session.pack(x)
    assert first == again and offload.stats.tensors == 1 and offload.stats.bytes == x.numel() * 4
    y = x * 2
    second = session.pack(y)
    assert second[1] == 1 and torch.equal(session.unpack(second), y) and torch.equal(session.unpack(first), x)
    small = HostOffload(min_bytes=1 << 20)
    assert _Session(small, set()).pack(x) is x


def test_offload_threshold_and_no_grad():
    model, _ = tiny_one4d()
    offload = apply_activation_offload(model, min_bytes=1 << 30)
    model(*model_inputs())[0].sum().backward()
    assert offload.stats.tensors == 0  # nothing that large in the tiny model
    offload = apply_activation_offload(model, min_bytes=0)
    with torch.no_grad():
        model(*model_inputs())
    assert offload.stats.tensors == 0
    assert apply_activation_offload(model, enabled=False) is None and model.activation_offload is None
    with pytest.raises(ValueError, match="min_bytes"):
        HostOffload(min_bytes=-1)


def test_model_config_switches_offload_on():
    from one4d_train.model.config import ModelConfig
    from one4d_train.model.one4d import build_one4d

    on = build_one4d(ModelConfig(preset="tiny", num_links=1, activation_offload=True, compute_dtype="fp32"), "cpu")
    off = build_one4d(ModelConfig(preset="tiny", num_links=1, compute_dtype="fp32"), "cpu")
    assert isinstance(on.activation_offload, HostOffload) and on.activation_offload.exclude is on
    assert off.activation_offload is None


def test_backward_brings_back_the_rest_of_a_block_and_the_block_before_it():
    """A compiled block unpacks all its saved tensors at once in forward order: prefetching a count of tensors
    below the one unpacked left the first ones of each block to be waited for where a block saves more than the
    count. By group: an unpack brings back the rest of its block and the `prefetch` blocks before it."""
    from one4d_train.model.offload import _Session

    offload = HostOffload(min_bytes=0)  # prefetch: one group
    session = _Session(offload, set())
    index = {}
    for block, count in enumerate((3, 4, 4)):
        session.next_group()
        for k in range(count):
            index[block, k] = session.pack(torch.full((2,), float(10 * block + k)))[1]
    first_of_last = index[2, 0]
    assert list(session._ahead(first_of_last)) == [index[2, 1], index[2, 2], index[2, 3],
                                                   index[1, 3], index[1, 2], index[1, 1], index[1, 0]]
    assert list(session._ahead(index[0, 1])) == [index[0, 2], index[0, 0]]  # no block before the first
    # unmarked (each tensor its own group): `prefetch` tensors below the one unpacked, as before
    plain = _Session(HostOffload(min_bytes=0, prefetch=2), set())
    for k in range(5):
        plain.pack(torch.full((2,), float(k)))
    assert list(plain._ahead(4)) == [3, 2] and list(plain._ahead(1)) == [0]
    # every tensor still comes back as it was, in any order
    assert [session.unpack((session, index[key])).tolist()[0] for key in sorted(index)] == [
        10 * b + k for b, k in sorted(index)]


@pytest.mark.parametrize("unit", ["block", "sublayer"])
def test_the_model_marks_one_offload_group_per_block(unit):
    """One4DModel starts a group before each block: what a block saves (its input; by sub-layer the residual
    stream after each attention too) is its block's group."""
    from one4d_train.model import offload as offload_module

    model, _ = tiny_one4d(activation_checkpointing="full")
    apply_activation_checkpointing(model.base.blocks, "full", unit=unit)
    offload = apply_activation_offload(model, min_bytes=0)
    sessions = []
    real = offload_module._Session.next_group
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(offload_module._Session, "next_group", lambda self: sessions.append(self) or real(self))
        loss_and_grads(model, model_inputs())
    session = sessions[0]
    blocks = len(model.base.blocks)
    assert all(s is session for s in sessions)
    assert len(sessions) == blocks and session.group == blocks - 1
    groups = [e.group for e in session.entries]
    assert groups == sorted(groups) and set(groups) == set(range(blocks)), groups
    per_block = [groups.count(g) for g in range(blocks)]
    tokens = [e for e in session.entries if e.host.shape == session.entries[0].host.shape]
    assert len(tokens) == blocks * (3 if unit == "sublayer" else 1), (len(tokens), per_block)
