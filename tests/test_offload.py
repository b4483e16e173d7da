"""Activation offload (model/offload.py): same gradients as without it, only activations moved, each once.
The GPU side (pinned copies on a side stream, peak memory) is in test_gpu.py."""
from __future__ import annotations

import copy
import os

import pytest
import torch
from torch._dynamo.utils import counters

from one4d_train.model.checkpointing import apply_activation_checkpointing
from one4d_train.model.compile import compile_blocks, is_compiled
from one4d_train.model.offload import HostOffload, apply_activation_offload
from test_dlc import model_inputs, randomise_trainable, tiny_one4d


def loss_and_grads(model, inputs):
    v_rgb, v_xyz = model(*inputs)
    loss = v_rgb.square().mean() + v_xyz.square().mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("ckpt,compiled", [("none", False), ("full", False), ("selective", False), ("full", True)])
def test_offload_keeps_loss_and_gradients(ckpt, compiled):
    model, _ = tiny_one4d(activation_checkpointing=ckpt)
    randomise_trainable(model)  # zero-initialised links would hide the XYZ branch
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
    # a parameter is packed itself (ZeRO-3 swaps its .data between gathered and released: backward must read the
    # parameter, not a detached alias of the storage it had in forward)
    assert session.pack(weight) is weight
    swapped = torch.nn.Parameter(torch.zeros(3))
    packed = session.pack(swapped)
    swapped.data = torch.ones(3)
    assert torch.equal(session.unpack(packed), torch.ones(3))
    assert isinstance(session.pack(weight.detach()), torch.Tensor) and offload.stats.tensors == 0  # its storage
    # a view of a weight gathered after the session began (ZeRO-3: the storages it knows are the released, empty ones)
    gathered = torch.nn.Parameter(torch.randn(64, 32), requires_grad=False)
    view = gathered.t()
    assert _Session(offload, set()).pack(view) is view and offload.stats.tensors == 0
    x = torch.randn(4, 8)
    first, again = session.pack(x), session.pack(x)
    assert first == again and offload.stats.tensors == 1 and offload.stats.bytes == x.numel() * 4
    y = x * 2
    second = session.pack(y)
    assert second[1] == 1 and torch.equal(session.unpack(second), y) and torch.equal(session.unpack(first), x)
    small = HostOffload(min_bytes=1 << 20)
    assert _Session(small, set()).pack(x) is x  # a leaf stays itself (only a tensor with a grad_fn is detached)


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
    assert on.activation_offload.blocks == -1 and off.activation_offload is None
    first = build_one4d(ModelConfig(preset="tiny", num_links=1, activation_offload=True, activation_offload_blocks=2,
                                    compute_dtype="fp32"), "cpu")
    assert first.activation_offload.blocks == 2
    with pytest.raises(ValueError, match="blocks >= -1"):
        HostOffload(blocks=-2)
    small = build_one4d(ModelConfig(preset="tiny", num_links=1, activation_offload=True,
                                    activation_offload_min_mib=0.5, compute_dtype="fp32"), "cpu")
    assert small.activation_offload.min_bytes == 1 << 19 and on.activation_offload.min_bytes == 16 << 20


def test_a_model_with_a_used_offload_copies():
    """copy.deepcopy of a model whose offload holds page-locked host buffers (an EMA copy, say): the copy offloads
    with the same settings into host memory of its own, excluding its own parameters, and trains alike."""
    model, _ = tiny_one4d(activation_checkpointing="full")
    randomise_trainable(model)
    offload = apply_activation_offload(model, min_bytes=0, blocks=2)
    loss, grads = loss_and_grads(model, model_inputs())
    held = offload.host_bytes
    assert held > 0
    model.zero_grad()
    twin = copy.deepcopy(model)
    copied = twin.activation_offload
    assert copied is not offload and copied.exclude is twin and (copied.min_bytes, copied.blocks) == (0, 2)
    assert copied.host_bytes == 0 and copied.stats.tensors == 0
    alone = copy.deepcopy(offload)  # (the offload itself: its model copied with it, once)
    assert alone.exclude.activation_offload is alone and alone.exclude is not model
    twin_loss, twin_grads = loss_and_grads(twin, model_inputs())
    assert copied.stats.tensors > 0 and offload.host_bytes == held
    assert torch.equal(twin_loss, loss) and all(torch.equal(twin_grads[n], g) for n, g in grads.items())


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
    # a tensor saved by several blocks (the context, a block's output that is the next one's input) comes back with
    # the last of them, not with the first: block 0's tensors are not brought back at the start of backward
    shared = torch.full((2,), -1.0)
    session.pack(shared)  # in block 2's group now; first saved ...
    shared_session = _Session(HostOffload(min_bytes=0), set())
    shared_session.next_group()
    first = shared_session.pack(shared)[1]
    shared_session.pack(torch.zeros(2))
    shared_session.next_group()
    shared_session.next_group()
    assert shared_session.pack(shared)[1] == first and shared_session.entries[first].group == 2
    last = shared_session.pack(torch.ones(2))[1]
    assert list(shared_session._ahead(first)) == [] and list(shared_session._ahead(last)) == []
    # every tensor still comes back as it was, in any order
    assert [session.unpack((session, index[key])).tolist()[0] for key in sorted(index)] == [
        10 * b + k for b, k in sorted(index)]


def sessions_during(run):
    """(run()'s result, the offload session of each block it ran)."""
    from one4d_train.model import offload as offload_module

    sessions = []
    real = offload_module._Session.next_group
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(offload_module._Session, "next_group", lambda self: sessions.append(self) or real(self))
        result = run()
    return result, sessions


@pytest.mark.parametrize("unit", ["block", "sublayer", "sublayer_ffn"])
def test_the_model_marks_one_offload_group_per_block(unit):
    """One4DModel starts a group before each block: what a block saves (its input; by sub-layer the residual
    stream after each attention too) is its block's group."""
    model, _ = tiny_one4d(activation_checkpointing="full")
    apply_activation_checkpointing(model.base.blocks, "full", unit=unit)
    apply_activation_offload(model, min_bytes=0)
    _, sessions = sessions_during(lambda: loss_and_grads(model, model_inputs()))
    session = sessions[0]
    blocks = len(model.base.blocks)
    assert all(s is session for s in sessions)
    assert len(sessions) == blocks and session.group == blocks - 1
    groups = [e.group for e in session.entries]
    assert set(groups) == set(range(blocks)), groups  # (a tensor several blocks save is in the last one's group)
    per_block = [groups.count(g) for g in range(blocks)]
    tokens = [e for e in session.entries if e.host.shape == session.entries[0].host.shape]
    assert len(tokens) == blocks * (1 if unit == "block" else 3), (len(tokens), per_block)
    hidden = [e for e in session.entries if e.host.shape[-1] == model.base.cfg.ffn_dim]
    assert len(hidden) == (blocks if unit == "sublayer_ffn" else 0)  # (eager: only the region boundary's)


@pytest.mark.parametrize("moved", [0, 1, 2])
def test_the_last_blocks_activations_can_stay_on_the_device(moved):
    """HostOffload(blocks=K) (model.activation_offload_blocks): only the first K blocks' saved tensors are moved, the
    later blocks' stay as they are (no copy, no host buffer), with the gradients of no offload. Unpacking a kept
    block's tensor brings back the block before it, the last one moved, as a moved block's unpack does."""
    model, _ = tiny_one4d(activation_checkpointing="full")
    randomise_trainable(model)
    apply_activation_checkpointing(model.base.blocks, "full", unit="sublayer")
    inputs = model_inputs()
    want_loss, want = loss_and_grads(model, inputs)
    model.zero_grad(set_to_none=True)
    everything = apply_activation_offload(model, min_bytes=0)
    loss_and_grads(model, inputs)
    model.zero_grad(set_to_none=True)
    offload = apply_activation_offload(model, min_bytes=0, blocks=moved)
    (loss, got), sessions = sessions_during(lambda: loss_and_grads(model, inputs))
    assert torch.equal(loss, want_loss) and all(torch.equal(got[n], g) for n, g in want.items())
    entries = sessions[0].entries
    # a tensor is kept by the blocks past `moved` (one that earlier blocks save too, such as the text context, is
    # moved for those, in the group of the last of them)
    kept = [e for e in entries if e.kept]
    assert all(e.host is None and e.loaded is None and e.group >= moved for e in kept)
    assert all(e.host is not None and e.buffer is not None for e in entries if not e.kept)
    moved_bytes = sum(e.host.numel() * e.host.element_size() for e in entries if not e.kept)
    assert offload.stats.bytes == moved_bytes < everything.stats.bytes and offload.stats.kept_bytes > 0
    assert offload.host_bytes < everything.host_bytes and (moved > 0) == (offload.host_bytes > 0)
    if moved:  # the first kept tensor's unpack brings back the last moved block
        first_kept = next(j for j, e in enumerate(entries) if e.kept)
        last_moved = {j for j, e in enumerate(entries) if e.group == moved - 1}
        assert last_moved and last_moved <= set(sessions[0]._ahead(first_kept))


def test_a_kept_tensor_is_held_by_autograd_alone():
    """A kept block's tensor lives as long as autograd holds what was packed (freed block by block in backward, as
    without offload), not as long as the offload session; saved again, it is packed the same way."""
    import weakref

    from one4d_train.model.offload import _Session

    session = _Session(HostOffload(min_bytes=0, blocks=0), set())
    session.next_group()
    t = torch.randn(4, 8)
    packed = session.pack(t)
    assert session.pack(t)[:2] == packed[:2] and packed[2].data_ptr() == t.data_ptr()
    assert session.unpack(packed) is packed[2]
    storage = weakref.ref(t.untyped_storage())
    del t
    assert storage() is not None
    del packed
    assert storage() is None and len(session.entries) == 1
    # moved for a moved block and saved again by a kept one: that one keeps the tensor itself and the moved copy
    # stays in its own block's group (the kept block's backward does not wait for it)
    shared = _Session(HostOffload(min_bytes=0, blocks=1), set())
    shared.next_group()
    ctx = torch.randn(3)
    moved = shared.pack(ctx)
    shared.next_group()
    kept = shared.pack(ctx)
    assert len(moved) == 2 and len(kept) == 3 and kept[2].data_ptr() == ctx.data_ptr()
    assert shared.entries[moved[1]].group == 0 and shared.pack(ctx)[:2] == kept[:2]
    assert torch.equal(shared.unpack(moved), ctx) and shared.unpack(kept) is kept[2]


def test_kept_bytes_count_what_the_kept_tensors_hold():
    """stats.kept_bytes is the device memory the kept tensors hold: a view holds its whole storage, and views of one
    storage (q, k and v cut from one product) hold it once."""
    from one4d_train.model.offload import _Session

    offload = HostOffload(min_bytes=0, blocks=0)
    session = _Session(offload, set())
    session.next_group()
    qkv = torch.randn(6, 3, 8)
    packed = [session.pack(qkv[:, i]) for i in range(2)]  # two views, each a third of the storage
    assert offload.stats.kept_bytes == qkv.numel() * qkv.element_size()
    other = torch.randn(5)
    packed.append(session.pack(other[1:]))
    assert offload.stats.kept_bytes == (qkv.numel() + other.numel()) * 4 and len(session.entries) == 3


@pytest.mark.parametrize("blocks", [-1, 0])
def test_a_dropped_graph_frees_what_it_saved(blocks):
    """A forward whose graph is dropped without backward (an error, an out-of-memory step skipped) leaves nothing
    alive: saved outputs are packed detached, else each would hold its grad_fn, which holds it, in a cycle that
    autograd's nodes keep from the garbage collector (with the offload session and its host buffers)."""
    import gc
    import weakref

    model, _ = tiny_one4d(activation_checkpointing="none")  # every activation saved, outputs (softmax, exp) too
    offload = apply_activation_offload(model, min_bytes=1 << 12, blocks=blocks)

    def forward_only():
        model(*model_inputs())  # output and graph dropped here

    _, sessions = sessions_during(forward_only)
    session = weakref.ref(sessions[0])
    del sessions
    gc.collect()
    assert session() is None  # (with it, its host buffers are free for the next step)
    assert (offload.stats.tensors > 0) == (blocks == -1) and sum(map(len, offload.buffers._free.values())) == len(
        offload.buffers._all)


def _fake_root(tmp_path, cgroup: str, files: dict[str, str], meminfo_kb: int = 64 << 20):
    (tmp_path / "proc" / "self").mkdir(parents=True)
    (tmp_path / "proc" / "meminfo").write_text(f"MemTotal: {128 << 20} kB\nMemAvailable: {meminfo_kb} kB\n")
    (tmp_path / "proc" / "self" / "cgroup").write_text(cgroup)
    for name, text in files.items():
        path = tmp_path / "sys" / "fs" / "cgroup" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return str(tmp_path)


def test_host_memory_left_is_the_machines_or_the_control_groups(tmp_path):
    """MemAvailable, or less where the process's cgroup (v2 or v1), or a group above it, limits memory: the limit less
    what the group holds beyond its page cache (shared memory counts as held); a group not mounted at its own path
    (a cgroup namespace) is read at the mount's root."""
    from one4d_train.model.host_memory import available_bytes

    gb = 1 << 30
    step = "slurm/uid_1/job_7/step_0"
    v2 = _fake_root(tmp_path / "v2", f"0::/{step}\n", {
        f"{step}/memory.max": f"{40 * gb}\n", f"{step}/memory.current": f"{30 * gb}\n",
        f"{step}/memory.stat": f"anon {20 * gb}\nfile {10 * gb}\nshmem {2 * gb}\ninactive_file {6 * gb}\n"})
    assert available_bytes(v2) == 18 * gb  # 40 - (30 - 10 + 2), below the machine's 64
    # the job's limit one level up (Slurm puts --mem on the job; its step and task groups say "max")
    parent = _fake_root(tmp_path / "parent", f"0::/{step}/user/task_0\n", {
        f"{step}/user/task_0/memory.max": "max\n", f"{step}/user/task_0/memory.current": f"{gb}\n",
        f"{step}/memory.max": "max\n", f"{step}/memory.current": f"{gb}\n",
        "slurm/uid_1/job_7/memory.max": f"{40 * gb}\n", "slurm/uid_1/job_7/memory.current": f"{39 * gb}\n"})
    assert available_bytes(parent) == 1 * gb
    # page cache, active or not, is the kernel's to drop before anything is killed: no false alarm
    cached = _fake_root(tmp_path / "cache", "0::/job\n", {
        "job/memory.max": f"{100 * gb}\n", "job/memory.current": f"{90 * gb}\n",
        "job/memory.stat": f"anon {40 * gb}\nfile {50 * gb}\nactive_file {45 * gb}\ninactive_file {5 * gb}\n"})
    assert available_bytes(cached) == 60 * gb
    unlimited = _fake_root(tmp_path / "v2max", "0::/user.slice\n", {"user.slice/memory.max": "max\n",
                                                                    "user.slice/memory.current": "5\n"})
    assert available_bytes(unlimited) == 64 * gb
    namespaced = _fake_root(tmp_path / "ns", "0::/\n", {"memory.max": f"{8 * gb}\n", "memory.current": f"{2 * gb}\n"})
    assert available_bytes(namespaced) == 6 * gb
    v1 = _fake_root(tmp_path / "v1", "9:cpu,cpuacct:/\n4:memory:/slurm/job_7/step_0\n0::/\n", {
        "memory/slurm/job_7/step_0/memory.limit_in_bytes": "9223372036854771712\n",
        "memory/slurm/job_7/step_0/memory.usage_in_bytes": f"{90 * gb}\n",
        "memory/slurm/job_7/memory.limit_in_bytes": f"{100 * gb}\n",
        "memory/slurm/job_7/memory.usage_in_bytes": f"{90 * gb}\n",
        "memory/slurm/job_7/memory.stat": f"total_cache {9 * gb}\ntotal_shmem {1 * gb}\n"})
    assert available_bytes(v1) == 18 * gb  # 100 - (90 - 9 + 1), from the job's group above the step's
    v1_free = _fake_root(tmp_path / "v1free", "4:memory:/docker/x\n", {
        "memory/memory.limit_in_bytes": "9223372036854771712\n", "memory/memory.usage_in_bytes": "1000\n"})
    assert available_bytes(v1_free) == 64 * gb
    garbled = _fake_root(tmp_path / "bad", "0::/\n", {"memory.max": "lots\n", "memory.current": "1\n"})
    assert available_bytes(garbled) == 64 * gb  # an unreadable group says nothing; the machine's figure stands
    assert available_bytes(str(tmp_path / "nothing")) is None  # no /proc (another OS): no check


def test_offload_stops_with_a_clear_error_before_host_memory_runs_out(monkeypatch):
    """Where the saved activations of a step would leave the process less than `host_reserve` of host memory, the
    forward stops with HostMemoryError naming what to change, instead of the out-of-memory killer ending it; memory
    is looked up only for what goes beyond the most an earlier step held (that memory stays cached)."""
    from one4d_train.model import host_memory
    from one4d_train.model.offload import HostMemoryError

    model, _ = tiny_one4d()
    left = {"bytes": 1 << 40}
    calls = []
    monkeypatch.setattr(host_memory, "available_bytes", lambda: calls.append(1) or left["bytes"])
    offload = apply_activation_offload(model, min_bytes=0, host_reserve=1 << 20)
    loss_and_grads(model, model_inputs())
    first, held = len(calls), offload.host_bytes
    assert first == offload.stats.tensors > 0 and held >= offload.stats.bytes
    loss_and_grads(model, model_inputs())
    assert len(calls) == first and offload.host_bytes == held  # the same step again: its buffers reused
    # another shape (batch 1): before a step gives up, the free buffers of sizes it does not use are let go
    grown = offload.buffers.take(3 << 20, pinned=False)
    offload.buffers.give([grown])
    limit = offload.buffers.held + (1 << 20)  # a machine with room for what is held and the reserve, no more
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(host_memory, "available_bytes", lambda: limit - offload.buffers.held)
        loss_and_grads(model, model_inputs(batch=1))
    assert grown.data is None and 0 < offload.host_bytes < held
    left["bytes"] = (1 << 20) + 1000  # a little above the reserve
    offload = apply_activation_offload(model, min_bytes=0, host_reserve=1 << 20)
    with pytest.raises(HostMemoryError, match=r"GB of host memory left to this process .* out-of-memory killer.*"
                                              r"activation_checkpointing_unit=sublayer_ffn.*--mem=0"):
        model(*model_inputs())
    with pytest.raises(ValueError, match="host_reserve"):
        HostOffload(host_reserve=-1)


def test_host_buffers_have_exact_sizes_and_are_reused_by_size():
    """host_buffers.py: a buffer maps its size in whole pages (not the next power of two), lays a tensor out as
    `empty_like` does (strides included: compiled backward graphs check them), and comes back only once given back."""
    from one4d_train.model.host_buffers import PAGE, HostBuffers

    buffers = HostBuffers()
    nbytes = 5 * (1 << 20) + 1
    a = buffers.take(nbytes, pinned=False)
    assert buffers.held == 5 * (1 << 20) + PAGE and buffers.new_bytes(nbytes, False) == 5 * (1 << 20) + PAGE
    b = buffers.take(nbytes, pinned=False)
    assert b is not a and buffers.held == 2 * (5 * (1 << 20) + PAGE)
    buffers.give([a])
    assert buffers.new_bytes(nbytes, False) == 0 and buffers.new_bytes(nbytes, True) > 0
    assert buffers.take(nbytes, pinned=False) is a and buffers.new_bytes(nbytes, False) > 0
    t = torch.randn(6, 4, 5).transpose(0, 2)  # dense, not contiguous
    view = buffers.take(t.numel() * 4, pinned=False).view(t)
    assert view.shape == t.shape and view.stride() == t.stride() == torch.empty_like(t).stride()
    view.copy_(t)
    assert torch.equal(view, t)
    gappy = torch.randn(4, 10)[:, ::2]  # not dense: laid out contiguously, as empty_like does
    assert buffers.take(gappy.numel() * 4, pinned=False).view(gappy).stride() == (5, 1)
    # a forked process (a DataLoader worker) inherits none of them: page-locked pages would be copied at fork
    address = a.data.data_ptr()

    def mapped():  # (adjacent mappings alike may be merged into one range)
        with open("/proc/self/maps") as maps:
            ranges = [[int(x, 16) for x in line.split()[0].split("-")] for line in maps]
        return any(lo <= address < hi for lo, hi in ranges)

    pid = os.fork()
    if pid == 0:
        os._exit(int(mapped()))
    assert os.waitpid(pid, 0)[1] == 0 and mapped()
    held = buffers.held
    buffers.give([b])
    assert buffers.trim() == 5 * (1 << 20) + PAGE and buffers.held == held - 5 * (1 << 20) - PAGE
    assert b.data is None and a.data is not None and buffers.new_bytes(nbytes, False) > 0
    buffers.close()
    assert buffers.held == 0
    buffers.give([a])  # a graph that outlived them gives nothing back; nothing more is taken
    with pytest.raises(RuntimeError, match="closed"):
        buffers.take(nbytes, pinned=False)


def test_offload_reuses_its_host_memory_from_step_to_step_and_never_shares_a_buffer_in_use():
    """A step's buffers go back with its graph: the next step reuses every one (the host memory held is one step's
    saved tensors); two graphs alive at once hold two sets, and both backwards give the gradients of no offload."""
    model, _ = tiny_one4d(activation_checkpointing="full")
    randomise_trainable(model)  # zero-initialised links would hide the XYZ branch
    apply_activation_checkpointing(model.base.blocks, "full", unit="sublayer_ffn")
    plain = copy.deepcopy(model)
    offload = apply_activation_offload(model, min_bytes=0)
    loss_and_grads(model, model_inputs())
    held = offload.host_bytes
    assert held > 0
    for _ in range(2):
        model.zero_grad()
        loss_and_grads(model, model_inputs())
        assert offload.host_bytes == held
    # two forwards before either backward: the second cannot take the first one's buffers
    model.zero_grad()
    plain.zero_grad()
    one, two = model_inputs(), model_inputs(seed=2)
    outs = [model(*one), model(*two)]
    assert offload.host_bytes == 2 * held
    for v_rgb, v_xyz in outs:
        (v_rgb.square().mean() + v_xyz.square().mean()).backward()
    for inp in (one, two):
        v_rgb, v_xyz = plain(*inp)
        (v_rgb.square().mean() + v_xyz.square().mean()).backward()
    for (n, p), q in zip(model.named_parameters(), plain.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=n)
