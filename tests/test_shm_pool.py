"""Reused shared-memory buffers (data_pipeline/shm_pool.py): a pooled loader gives exactly the batches of an
unpooled one whatever the consumer keeps, reuses buffers the main process dropped, and gets back the buffers
of skipped samples. Real DataLoader workers on real shards; the test samples are small, so every tensor is
pooled (MIN_BYTES 0, inherited by the forked workers)."""
import itertools
import pickle

import pytest
import torch
import torch.multiprocessing as mp
from data_utils import make_shards

import data_pipeline.reader as reader
from data_pipeline import shm_pool, transforms
from data_pipeline.config import DataConfig
from data_pipeline.decode import SampleError
from data_pipeline.loader import build_loader
from data_pipeline.reader import ShardStream, StreamPlan, list_shards

BATCHES = 16


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    if mp.get_start_method() != "fork":
        pytest.skip("the tests change pool settings in this process for its forked workers")
    return make_shards(tmp_path_factory.mktemp("pool"), num_clips=6, frames=9, height=32, width=64,
                       samples_per_shard=1)


@pytest.fixture(autouse=True)
def pool_everything(monkeypatch):
    monkeypatch.setattr(shm_pool, "MIN_BYTES", 0)


def _loader(shards, batch_size=1, pin_memory=False):
    cfg = DataConfig(shards=str(shards), num_workers=2, num_frames=5, frame_stride=1, height=32, width=48,
                     crop="random", shuffle_buffer=3)
    return build_loader(cfg, rank=0, world_size=1, seed=7, micro_batch_size=batch_size, pin_memory=pin_memory)


def _run(loader, keep: bool):
    """BATCHES batches: kept as delivered, or copied on arrival and dropped (as a training step does)."""
    out = []
    for batch in loader:
        out.append(batch if keep else {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in batch.items()})
        if len(out) == BATCHES:
            break
    stats = loader.pool_stats()
    loader.close()
    return out, stats


@pytest.fixture(scope="module")
def unpooled(shards):
    with pytest.MonkeyPatch.context() as m:
        m.setattr(shm_pool, "MIN_BYTES", 0)
        m.setattr(shm_pool, "SLOTS", 0)  # every buffer fresh: the loader as it was without a pool
        return {b: _run(_loader(shards, b), keep=True)[0] for b in (1, 2)}


@pytest.fixture
def pin_thread(monkeypatch):
    """pin_memory=True runs the DataLoader's pin thread; without an accelerator it copies instead of pinning."""
    if torch.accelerator.is_available():
        return
    import torch.utils.data._utils.pin_memory as pin

    monkeypatch.setattr(torch.accelerator, "is_available", lambda: True)
    monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda: torch.device("cpu"))
    monkeypatch.setattr(torch.accelerator, "current_device_index", lambda: 0)
    monkeypatch.setattr(torch.accelerator, "set_device_index", lambda index: None)
    monkeypatch.setattr(pin, "pin_memory", lambda data, device=None: {
        k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in data.items()})


def _assert_same(batches, reference):
    assert len(batches) == len(reference)
    for got, ref in zip(batches, reference):
        assert got.keys() == ref.keys()
        for key, value in ref.items():
            if isinstance(value, torch.Tensor):
                assert type(got[key]) is torch.Tensor and got[key].dtype == value.dtype, key
                assert torch.equal(got[key], value), (key, got["__key__"])
            else:
                assert got[key] == value, key


@pytest.mark.parametrize("pin, keep, batch_size", [(False, False, 1), (True, False, 1), (False, True, 1),
                                                   (True, True, 1), (False, False, 2), (False, True, 2)])
def test_pooled_batches_equal_unpooled_ones(shards, unpooled, request, pin, keep, batch_size):
    if pin:
        request.getfixturevalue("pin_thread")
    batches, stats = _run(_loader(shards, batch_size, pin_memory=pin), keep)
    _assert_same(batches, unpooled[batch_size])  # kept batches compared only now: none was rewritten meanwhile
    if keep and not pin:
        assert stats["fresh"] > 0, stats  # every pooled buffer still held: the workers allocated afresh
    else:
        assert stats["reused"] > 0 and stats["fresh"] == 0, stats


def test_buffers_are_reused_once_the_main_process_drops_them(shards):
    _, stats = _run(_loader(shards), keep=False)
    # 3 pooled tensors a sample; a pool that never got buffers back would grow by 3 each
    assert stats["reused"] > stats["grown"] and stats["fresh"] == 0, stats
    assert stats["reused"] + stats["grown"] >= 3 * BATCHES


def _every_third_survives(monkeypatch):
    real, calls = reader.to_sample, itertools.count()

    def to_sample(*args, **kwargs):
        sample = real(*args, **kwargs)  # its rgb, xyz and valid are lent by now
        if next(calls) % 3:
            raise SampleError("dropped by the test")
        return sample

    monkeypatch.setattr(reader, "to_sample", to_sample)


def test_a_skipped_sample_gives_its_buffers_back_at_once(shards, monkeypatch):
    token, flags = shm_pool.new_flags(1)
    monkeypatch.setattr(shm_pool, "_pool", shm_pool.Pool(token, flags, 0))
    monkeypatch.setattr(transforms, "get_worker_info", lambda: True)  # output_tensor as in a worker
    _every_third_survives(monkeypatch)
    cfg = _loader(shards).cfg
    plan = StreamPlan(tuple(list_shards(str(shards))), seed=7, rank=0, world_size=1, workers=1)
    stream = iter(ShardStream(plan, cfg))
    for n in range(1, 4):
        next(stream)  # two samples were dropped before it
        assert (flags[0, :shm_pool.SLOTS] == shm_pool.LENT).sum() == 3 * n  # only the yielded samples' buffers
    assert shm_pool.stats(flags)["grown"] == 9


def test_skipped_samples_in_workers_leak_no_buffers(shards, monkeypatch):
    _every_third_survives(monkeypatch)
    batches, stats = _run(_loader(shards), keep=False)
    assert stats["fresh"] == 0 and stats["reused"] > 2 * stats["grown"], stats
    assert int(batches[-1]["__skipped__"][0]) > 0


def test_buffer_states(monkeypatch):
    token, flags = shm_pool.new_flags(2)
    pool = shm_pool.Pool(token, flags, 1)
    monkeypatch.setattr(shm_pool, "_pool", pool)
    row = flags[1].tolist

    a, b = shm_pool.take((4, 5), torch.float32), shm_pool.take((7,), torch.float32)
    small = shm_pool.take((3,), torch.bfloat16)
    assert row()[:3] == [shm_pool.LENT] * 3 and a.is_shared()
    since = shm_pool.mark()
    shm_pool.take((4, 5), torch.float32)
    shm_pool.release(since)  # a dropped sample's buffer
    assert row()[3] == shm_pool.FREE
    sent = shm_pool.dispatch({"rgb": a.unsqueeze(0), "caption": ["x"]})
    assert row()[:4] == [shm_pool.LENT, shm_pool.FREE, shm_pool.FREE, shm_pool.FREE]  # b, small: not in the batch
    assert shm_pool.take((7,), torch.float32).data_ptr() == b.data_ptr()
    assert shm_pool.take((4, 5), torch.float32).data_ptr() != a.data_ptr()  # a is still on its way
    data = pickle.dumps(sent)  # what the worker's queue does
    assert row()[0] == shm_pool.SENT
    received = pickle.loads(data)  # the main process: a plain tensor, its buffer freed with its last view
    view = received["rgb"][0, 1:]
    del received
    assert row()[0] == shm_pool.SENT
    del view
    assert row()[0] == shm_pool.FREE
    assert shm_pool.take((4, 5), torch.float32).data_ptr() == a.data_ptr()
    assert small is not None
    assert shm_pool.stats(flags) == {"reused": 3, "grown": 4, "fresh": 0}


def test_a_full_pool_gives_a_free_buffer_of_another_size_to_a_new_size(monkeypatch):
    monkeypatch.setattr(shm_pool, "SLOTS", 3)
    token, flags = shm_pool.new_flags(1)
    monkeypatch.setattr(shm_pool, "_pool", shm_pool.Pool(token, flags, 0))
    old = [shm_pool.take((n,), torch.uint8) for n in (10, 11, 12)]
    assert shm_pool.take((13,), torch.uint8) is None  # every slot LENT
    shm_pool.release(1)  # sizes 11 and 12 dropped
    new = shm_pool.take((13,), torch.uint8)
    assert new is not None and shm_pool.take((12,), torch.uint8).data_ptr() == old[2].data_ptr()
    assert shm_pool.stats(flags) == {"reused": 1, "grown": 4, "fresh": 1}
