"""The shard stream on real shards written by `one4d shard` code: round trip, splitting, bad data."""
import dataclasses
import io
import logging
import re
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from data_utils import make_shards, make_shards_of_lengths, resum, write_cut_mp4, write_rotated_mp4

from data_pipeline.config import DataConfig
from data_pipeline.geometry import denormalise_pointmap, depth_to_pointmaps
from data_pipeline.loader import build_loader
from data_pipeline.decode import NpzReader, SampleError, decode_clip, read_frames, read_valid
from data_pipeline.shard import npz_bytes
from data_pipeline.shard_index import read_index
from data_pipeline.reader import (ShardStream, StreamPlan, dist_rank_world, list_shards, raw_samples,
                                  read_in_order, shuffle_order)
from data_pipeline.synthetic import render_clip
from data_pipeline.video import decode_frames

SRC = dict(frames=9, height=32, width=64)


def _cfg(shards, **kw):
    base = dict(shards=str(shards), num_workers=0, num_frames=5, frame_stride=2, height=32, width=48, crop="center",
                shuffle_buffer=3)
    return DataConfig(**{**base, **kw})


def _take(loader, n):
    batches = []
    for batch in loader:
        batches.append(batch)
        if len(batches) == n:
            break
    loader.close()
    return batches


@pytest.fixture(scope="module")
def depth_shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("depth"), num_clips=6, samples_per_shard=1, **SRC)


@pytest.mark.parametrize("geometry", ["depth", "xyz"])
def test_round_trip_matches_the_synthetic_scene(tmp_path, geometry):
    """manifest -> shards -> stream: frames within codec tolerance of the rendered ones, pointmaps equal to the
    scene's exact geometry (float16 storage precision). 32x64 -> 32x48 is a pure centre crop (8 px a side)."""
    shards = make_shards(tmp_path, num_clips=2, samples_per_shard=1, geometry=geometry, **SRC)
    # xyz without poses pins the window to frame 0; depth draws a random start among 0..2 (9 frames, span 7)
    cfg = _cfg(shards, frame_stride=1 if geometry == "depth" else 2, num_frames=7 if geometry == "depth" else 5)
    for batch in _take(build_loader(cfg, rank=0, world_size=1, seed=3, micro_batch_size=1), 2):
        row = int(batch["__key__"][0][1:])
        clip = render_clip(row, **{"num_frames": 9, "height": 32, "width": 64})
        xyz_n = batch["xyz"][0].permute(0, 2, 3, 1).numpy()
        metric = denormalise_pointmap(xyz_n, batch["xyz_centre"][0].numpy(), batch["xyz_scale"][0].item())
        K = clip["intrinsics"] - np.array([[0, 0, 8], [0, 0, 0], [0, 0, 0]])
        source = decode_frames(tmp_path / "raw" / "clips" / f"{row:06d}.mp4")[:, :, 8:56].astype(np.float32)
        rgb = (batch["rgb"][0].permute(0, 2, 3, 1).numpy() + 1) * 127.5
        if geometry == "depth":  # the window start is recovered from the frames themselves
            start = int(np.argmin([np.abs(rgb[0] - source[s]).mean() for s in range(3)]))
            idx = start + np.arange(7)
        else:
            idx = 2 * np.arange(5)
        np.testing.assert_allclose(rgb, source[idx], atol=1e-3)  # the source mp4's own frames
        codec = np.abs(rgb - clip["frames"][idx, :, 8:56])
        assert codec.mean() < 8, codec.mean()  # H.264 yuv420p on 32x64 high-contrast texture
        ref = depth_to_pointmaps(clip["depth"][idx][:, :, 8:56], K, clip["poses_c2w"][idx])
        valid = batch["valid"][0, :, 0].numpy()
        np.testing.assert_array_equal(valid, clip["valid"][idx][:, :, 8:56])
        inside = valid & (np.abs(xyz_n) < 1).all(-1)
        assert inside.mean() > 0.5
        np.testing.assert_allclose(metric[inside], ref[inside], atol=2e-3 * np.abs(ref[inside]).max())
        rel_err = np.linalg.norm(metric[inside] - ref[inside], axis=-1) / np.linalg.norm(ref[inside], axis=-1)
        assert rel_err.max() < 2 ** -10  # float16 keeps 11 significant bits
        if geometry == "depth":
            np.testing.assert_allclose(batch["intrinsics"][0].numpy(), np.broadcast_to(K, (7, 3, 3)), rtol=1e-6)
            rel = np.linalg.inv(clip["poses_c2w"][idx[0]]) @ clip["poses_c2w"][idx]
            np.testing.assert_allclose(batch["poses_c2w"][0].numpy(), rel, atol=1e-5)
        else:
            assert torch.isnan(batch["intrinsics"]).all() and torch.isnan(batch["poses_c2w"]).all()
        assert batch["caption"][0] == clip["caption"]


def test_two_ranks_two_workers_cover_every_shard_once_per_epoch(depth_shards):
    shards = list_shards(str(depth_shards))
    keys = {k for s in shards for k in s.keys}
    per_epoch = {0: Counter(), 1: Counter()}
    slots_seen = set()
    for rank in range(2):
        loader = build_loader(_cfg(depth_shards, num_workers=2), rank=rank, world_size=2, seed=11, micro_batch_size=1)
        # 6 shards over 4 slots: 2, 2, 1, 1 samples per slot-epoch; 8 batches per rank finish epoch 1 everywhere
        for batch in _take(loader, 8):
            slots_seen.add(int(batch["__slot__"][0]))
            epoch = int(batch["__epoch__"][0])
            if epoch in per_epoch:
                per_epoch[epoch][(batch["__shard__"][0], batch["__key__"][0])] += 1
    assert slots_seen == {0, 1, 2, 3}
    for epoch, seen in per_epoch.items():
        assert {k for _, k in seen} == keys, epoch
        assert set(seen.values()) == {1}, epoch
    # each epoch deals the shards to slots anew
    plan = StreamPlan(tuple(shards), seed=11, rank=0, world_size=2, workers=2)
    assert [s.name for s in plan.sources(0, 0)] != [s.name for s in plan.sources(0, 1)] or \
           [s.name for s in plan.sources(1, 0)] != [s.name for s in plan.sources(1, 1)]


def test_exact_mode_refuses_more_slots_than_shards(depth_shards):
    with pytest.raises(ValueError, match="at least one shard per reader slot"):
        build_loader(_cfg(depth_shards, num_workers=4), rank=0, world_size=2, seed=0, micro_batch_size=1)


def test_shuffle_order_is_a_seeded_permutation():
    counts = [5, 3, 7]
    a = shuffle_order(counts, 4, np.random.default_rng(1))
    b = shuffle_order(counts, 4, np.random.default_rng(1))
    c = shuffle_order(counts, 4, np.random.default_rng(2))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert sorted(a.tolist()) == sorted(s * (1 << 32) + i for s, n in enumerate(counts) for i in range(n))
    assert not np.array_equal(a, np.sort(a))
    assert np.array_equal(shuffle_order(counts, 1, np.random.default_rng(1)), np.sort(a))


def _rewrite_member(path: Path, key: str, suffix: str, data: bytes):
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for m, content in members:
            if m.name == f"{key}.{suffix}":
                content = data
            m.size = len(content)
            tar.addfile(m, io.BytesIO(content))


def test_corrupt_members_and_truncated_shard_are_skipped_and_counted(tmp_path, caplog):
    shards_dir = make_shards(tmp_path, num_clips=8, samples_per_shard=2, **SRC)
    shards = list_shards(str(shards_dir))
    mp4_victim, npz_victim = shards[0].keys[1], shards[1].keys[0]
    _rewrite_member(Path(shards[0].path), mp4_victim, "mp4", b"\x00not an mp4 at all" * 50)
    _rewrite_member(Path(shards[1].path), npz_victim, "depth.npz", b"PK\x03\x04garbage")
    truncated = Path(shards[2].path)
    with tarfile.open(truncated) as tar:
        first = tar.getmembers()[0]
    truncated.write_bytes(truncated.read_bytes()[:first.offset_data + 100])  # cut inside the first member

    cfg = _cfg(shards_dir)
    loader = build_loader(cfg, rank=0, world_size=1, seed=5, micro_batch_size=1)
    with caplog.at_level(logging.WARNING, logger="data_pipeline.reader"):
        batches = _take(loader, 8)  # 8 samples, 4 bad: the stream goes on into epoch 1
    epoch0 = [b["__key__"][0] for b in batches if int(b["__epoch__"][0]) == 0]
    bad = {mp4_victim, npz_victim, *shards[2].keys}
    assert sorted(epoch0) == sorted({k for s in shards for k in s.keys} - bad)
    assert any(int(b["__epoch__"][0]) == 1 for b in batches)
    first1 = next(b for b in batches if int(b["__epoch__"][0]) == 1)
    # every bad sample of epoch 0, and every raw sample before the first good one of epoch 1, was skipped
    assert int(first1["__skipped__"][0]) == 4 + int(first1["__pos__"][0]) - 1
    assert loader.samples_skipped >= int(first1["__skipped__"][0])
    assert loader.samples_yielded == 8
    text = caplog.text
    for name, key in ((shards[0].name, mp4_victim), (shards[1].name, npz_victim), (shards[2].name, shards[2].keys[0])):
        assert f"shard={name} key={key}" in text
    # a damaged sample fails the same way at every epoch: logged once (the count goes on), as its shard's damage
    caplog.clear()
    loader = build_loader(cfg, rank=0, world_size=1, seed=5, micro_batch_size=1)
    with caplog.at_level(logging.WARNING, logger="data_pipeline.reader"):
        batches = _take(loader, 16)  # four epochs
    assert {int(b["__epoch__"][0]) for b in batches} >= {0, 1, 2}
    for name, key in ((shards[0].name, mp4_victim), (shards[1].name, npz_victim)):
        said = [r.getMessage() for r in caplog.records if f"shard={name} key={key} " in r.getMessage()]
        assert len(said) == 1 and said[0].endswith("(logged again only if it fails otherwise; data_skipped counts "
                                                   "every skip)"), said
    assert loader.samples_skipped >= 3 * 4  # every epoch's bad samples counted


def test_clips_shorter_than_the_window_are_skipped_and_counted_as_such(tmp_path, caplog):
    """A clip shorter than the frame window is no corrupt sample: it is counted apart (the trainer's log line says
    which skips were which) and logged once per reader slot, not at every epoch. The index counts the clips of each
    length, for the trainer's warning at start-up. A position saved before the count was kept (3 numbers a slot)
    still resumes."""
    shards = make_shards_of_lengths(tmp_path, (9, 5, 9, 5))
    assert read_index(shards)["statistics"]["clip_frames"] == {"5": 2, "9": 2}
    cfg = _cfg(shards, num_frames=7, frame_stride=1)
    loader = build_loader(cfg, rank=0, world_size=1, seed=0, micro_batch_size=1)
    with caplog.at_level(logging.WARNING, logger="data_pipeline.reader"):
        keys = [b["__key__"][0] for b in _take(loader, 6)]  # 3 epochs of the 2 clips that fit
    assert sorted(set(keys)) == ["r000000000", "r000000002"]
    assert loader.samples_too_short == loader.samples_skipped >= 4
    short = [r.getMessage() for r in caplog.records if "shorter than the frame window" in r.getMessage()]
    assert len(short) == 2 and all("clip has 5 frames, the window needs 7" in m for m in short), short
    assert "SampleError" not in caplog.text
    old = loader.state_dict()
    old["slots"] = [s[:3] for s in old["slots"]]
    resumed = build_loader(cfg, rank=0, world_size=1, seed=0, micro_batch_size=1, position=old)
    assert (resumed.samples_skipped, resumed.samples_too_short) == (loader.samples_skipped, 0)
    assert [b["__key__"][0] for b in _take(resumed, 2)] == [b["__key__"][0] for b in _take(
        build_loader(cfg, rank=0, world_size=1, seed=0, micro_batch_size=1, position=loader.state_dict()), 2)]


@pytest.mark.parametrize("mode", ["exact", "resampled"])
def test_a_slot_whose_shards_are_all_bad_in_an_epoch_goes_on(tmp_path, mode):
    """2 ranks x 2 workers over 4 one-sample shards: each slot reads one shard per epoch, so the slot dealt the
    truncated shard has an epoch with no usable sample; it logs that and goes on with its next epoch."""
    shards_dir = make_shards(tmp_path, num_clips=4, samples_per_shard=1, **SRC)
    victim = list_shards(str(shards_dir))[2]
    Path(victim.path).write_bytes(Path(victim.path).read_bytes()[:300])
    cfg = _cfg(shards_dir, num_workers=2, mode=mode)
    loader = build_loader(cfg, rank=0, world_size=2, seed=0, micro_batch_size=1)
    batches = _take(loader, 16)  # (the workers' warnings go to their own processes' logs)
    assert len(batches) == 16 and victim.keys[0] not in {b["__key__"][0] for b in batches}
    assert loader.samples_skipped > 0
    epochs = {}
    for b in batches:
        epochs.setdefault(int(b["__slot__"][0]), []).append(int(b["__epoch__"][0]))
    # the slot that was dealt the dead shard passed over that epoch: its epochs have a gap
    assert any(sorted(e) != list(range(min(e), max(e) + 1)) for e in epochs.values()), epochs


def test_a_slot_with_no_usable_data_at_all_stops_with_the_reason(tmp_path, capsys):
    """Through a DataLoader worker too; `one4d train` reports it in one line (it printed the worker's traceback
    inside the main process's, exit 1, with nothing that said what to do)."""
    from data_pipeline.reader import NoUsableSamples
    from one4d_train.train.main import report_failure

    shards_dir = make_shards(tmp_path, num_clips=2, samples_per_shard=1, **SRC)
    for shard in list_shards(str(shards_dir)):
        Path(shard.path).write_bytes(Path(shard.path).read_bytes()[:300])
    for workers in (0, 1):
        loader = build_loader(_cfg(shards_dir, num_workers=workers), rank=0, world_size=1, seed=0,
                              micro_batch_size=1)
        with pytest.raises(NoUsableSamples, match="no usable sample in 16 epochs in a row") as caught:
            _take(loader, 1)
    assert report_failure(caught.value, None) == 1
    err = capsys.readouterr().err
    assert err.startswith("data error: reader slot 0: no usable sample in 16 epochs in a row (the last, epoch 15: "
                          "shards ['shard-000001.tar', 'shard-000000.tar']); the reason for each sample is logged "
                          "above; `one4d inspect-shards` checks the shards. The same command resumes"), err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_read_in_order_skips_whole_consumed_shards_unopened(depth_shards, monkeypatch, caplog):
    import data_pipeline.reader as reader

    shards = list_shards(str(depth_shards))
    missing = dataclasses.replace(shards[0], path=str(depth_shards / "does-not-exist.tar"))
    sources = [missing] + shards[1:3]
    opened = []
    real = reader.raw_samples
    monkeypatch.setattr(reader, "raw_samples", lambda shard: opened.append(shard.name) or real(shard))
    order = shuffle_order([s.count for s in sources], 1, np.random.default_rng(0))
    with caplog.at_level(logging.WARNING, logger=reader.log.name):
        out = list(read_in_order(sources, order, start=1))  # sample 0 (the unreadable shard) already consumed
    assert [(p, s.name) for p, s, _, _ in out] == [(2, shards[1].name), (3, shards[2].name)]
    assert all(raw is not None for *_, raw in out)
    assert opened == [shards[1].name, shards[2].name] and not caplog.records  # the consumed shard: never opened


def test_resampled_mode_fixed_epoch_length(depth_shards):
    cfg = _cfg(depth_shards, mode="resampled", epoch_length=5, num_workers=0)
    keys = [[b["__key__"][0], int(b["__epoch__"][0])] for b in
            _take(build_loader(cfg, rank=1, world_size=2, seed=9, micro_batch_size=1), 10)]
    again = [[b["__key__"][0], int(b["__epoch__"][0])] for b in
             _take(build_loader(cfg, rank=1, world_size=2, seed=9, micro_batch_size=1), 10)]
    assert keys == again
    assert [e for _, e in keys] == [0] * 5 + [1] * 5
    other = [b["__key__"][0] for b in _take(build_loader(cfg, rank=0, world_size=2, seed=9, micro_batch_size=1), 10)]
    assert other != [k for k, _ in keys]


def test_shard_stream_is_a_pure_function_of_its_plan(depth_shards):
    shards = tuple(list_shards(str(depth_shards)))

    def keys(seed):
        stream = ShardStream(StreamPlan(shards, seed=seed, rank=0, world_size=1, workers=1, shuffle_buffer=4),
                             _cfg(depth_shards, crop="random"))
        out = []
        for s in stream:
            out.append((s["__key__"], s["rgb"].sum().item()))
            if len(out) == 8:
                return out

    assert keys(1) == keys(1)
    assert keys(1) != keys(2)


def test_rank_and_world_from_the_launcher(monkeypatch, tmp_path):
    for var in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(var, raising=False)
    assert dist_rank_world() == (0, 1)
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    assert dist_rank_world() == (3, 8)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert dist_rank_world() == (1, 4)  # torchrun's variables win over srun's
    shards = make_shards(tmp_path, num_clips=4, samples_per_shard=1, **SRC)
    loader = build_loader(DataConfig(shards=str(shards), num_workers=0), seed=0, micro_batch_size=1)  # the launcher's
    assert (loader.plan.rank, loader.plan.world_size) == (1, 4)


def test_text_embedding_member_is_decoded_without_pickle(depth_shards):
    raw = next(raw_samples(list_shards(str(depth_shards))[0]))
    emb = np.random.default_rng(0).standard_normal((7, 16)).astype(np.float16)
    buf = io.BytesIO()
    np.save(buf, emb, allow_pickle=False)
    sample = ShardStream(StreamPlan(tuple(list_shards(str(depth_shards))), seed=0, rank=0, world_size=1, workers=1),
                         _cfg(depth_shards)).decode(resum({**raw, "emb.npy": buf.getvalue()}), np.random.default_rng(0))
    assert sample["text_emb"].dtype == torch.float32
    np.testing.assert_array_equal(sample["text_emb"].numpy(), emb.astype(np.float32))
    pickled = io.BytesIO()
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(SampleError, match="emb.npy"):
        decode_clip({**raw, "emb.npy": pickled.getvalue()}, 5, 2, np.random.default_rng(0))


def test_an_empty_text_embedding_member_is_refused(depth_shards):
    """A batch of a sample with a [0, D] emb.npy and one without would collate to two empty embeddings (the length
    that marks "none" is then not recorded): the second sample's caption would be replaced by an all-zero text
    context. Such a member makes its sample a bad one."""
    from data_pipeline.loader import collate
    from one4d_train.model.text_encoder import batch_text_embeddings

    shards = list_shards(str(depth_shards))
    stream = ShardStream(StreamPlan(tuple(shards), seed=0, rank=0, world_size=1, workers=1), _cfg(depth_shards))
    raws = [next(raw_samples(s)) for s in shards[:2]]
    buf = io.BytesIO()
    np.save(buf, np.zeros((0, 4096), np.float16), allow_pickle=False)
    with pytest.raises(SampleError, match=r"emb.npy has shape \(0, 4096\), expected \[L, D\] with L > 0"):
        stream.decode(resum({**raws[0], "emb.npy": buf.getvalue()}), np.random.default_rng(0))
    # a batch of a sample with an embedding and one without keeps the second's caption to be encoded
    buf = io.BytesIO()
    np.save(buf, np.ones((3, 4096), np.float16), allow_pickle=False)
    samples = [stream.decode(resum({**raws[0], "emb.npy": buf.getvalue()}), np.random.default_rng(0)),
               stream.decode(raws[1], np.random.default_rng(0))]
    embs = batch_text_embeddings(collate(samples))
    assert embs[0].shape == (3, 4096) and embs[1] is None


@pytest.mark.parametrize("member", ["mp4", "depth.npz", "cam.json", "txt"])
def test_a_flipped_bit_in_any_member_is_caught_by_the_sample_checksums(depth_shards, member):
    """A flipped bit mostly still decodes (to other frames or depth); the sample's sums.json catches it."""
    raw = next(raw_samples(list_shards(str(depth_shards))[0]))
    stream = ShardStream(StreamPlan(tuple(list_shards(str(depth_shards))), seed=0, rank=0, world_size=1, workers=1),
                         _cfg(depth_shards))
    stream.decode(raw, np.random.default_rng(0))
    data = bytearray(raw[member])
    data[len(data) // 2] ^= 0x10
    with pytest.raises(SampleError, match=rf"members \['{member}'\] are corrupt"):
        stream.decode({**raw, member: bytes(data)}, np.random.default_rng(0))


def test_npz_members_are_checked_against_their_crc():
    """A flipped bit inside a deflate stream that still inflates to the right length gives other depth values:
    the zip's CRC-32 turns that into a SampleError (shards without sums.json rely on it)."""
    depth = np.random.default_rng(0).uniform(1, 5, (16, 24)).astype(np.float16)
    good = npz_bytes("depth", depth)
    np.testing.assert_array_equal(NpzReader(good, "depth.npz")["depth"], depth)
    crc_caught = 0
    for pos in range(80, len(good) - 120):  # inside the compressed body
        bad = bytearray(good)
        bad[pos] ^= 0x01
        try:
            NpzReader(bytes(bad), "depth.npz")["depth"]
        except SampleError as exc:
            crc_caught += "CRC-32 mismatch" in str(exc)
            continue
        raise AssertionError(f"a flipped bit at byte {pos} was read as valid depth")
    assert crc_caught > 0


def test_a_sample_that_ran_out_of_memory_says_so(monkeypatch):
    """MemoryError() has no message: the skipped sample's reason read 'member depth.npz array 'depth' is not
    readable: ' with nothing after it. It names the error now."""
    good = npz_bytes("depth", np.ones((4, 6), np.float16))

    def no_memory(*args, **kwargs):
        raise MemoryError()

    monkeypatch.setattr(np, "frombuffer", no_memory)
    with pytest.raises(SampleError, match=r"array 'depth' is not readable: MemoryError$"):
        NpzReader(good, "depth.npz")["depth"]


@pytest.mark.parametrize("recorded", [None, 1, 4])
def test_other_sample_formats_are_refused(depth_shards, tmp_path, recorded):
    """Formats 2 and 3 are read; format 1 (and an index without the key) of this project's first days and formats
    of later code are refused with what to do."""
    import json
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(depth_shards, copy)
    index = json.loads((copy / "index.json").read_text())
    assert index["sample_format"] == 3
    if recorded is None:
        del index["sample_format"]
    else:
        index["sample_format"] = recorded
    (copy / "index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=rf"sample_format {recorded}, this code reads \[2, 3\]: re-shard"):
        list_shards(str(copy))


def test_format_2_shards_load_when_their_samples_carry_sums_and_are_skipped_without(depth_shards, tmp_path):
    """Format 2 is format 3's layout: written with sums.json (2026-12-03 on) its shards load as they are; the
    earlier ones' samples lack it and are skipped and counted, naming the reason."""
    import json
    import shutil

    copy = tmp_path / "v2"
    shutil.copytree(depth_shards, copy)
    index = json.loads((copy / "index.json").read_text())
    index["sample_format"] = 2
    (copy / "index.json").write_text(json.dumps(index))
    first = list_shards(str(copy))[0]
    assert [k for k, _ in _keys_and_problems(first)] == list(first.keys)
    assert all(p is None for _, p in _keys_and_problems(first))
    stripped = tmp_path / "stripped.tar"
    with tarfile.open(first.path) as src, tarfile.open(stripped, "w") as dst:
        for m in src.getmembers():
            if not m.name.endswith(".sums.json"):
                dst.addfile(m, src.extractfile(m))
    shutil.copy(stripped, first.path)
    assert all(p is not None and "no sums.json" in p for _, p in _keys_and_problems(first))


def _keys_and_problems(shard):
    """(key, the reader's sample check's complaint or None) per sample of a shard."""
    from data_pipeline.checksums import verify

    out = []
    for raw in raw_samples(shard):
        try:
            verify(raw)
            out.append((raw["__key__"], None))
        except SampleError as exc:
            out.append((raw["__key__"], str(exc)))
    return out


def test_sequential_and_seeking_decoders_give_identical_frames(depth_shards, monkeypatch):
    import data_pipeline.decode as dec

    mp4 = next(raw_samples(list_shards(str(depth_shards))[0]))["mp4"]
    ref = decode_frames(mp4)
    for idx in (np.arange(9), np.array([1, 3, 5, 7]), np.array([8])):
        np.testing.assert_array_equal(dec.decode_window(mp4, idx, 9), ref[idx])  # PyAV, from the first frame
        monkeypatch.setattr(dec, "SEQUENTIAL_START", 0)
        np.testing.assert_array_equal(dec.decode_window(mp4, idx, 9), ref[idx])  # decord get_batch
        monkeypatch.undo()
    for seq in (64, 0):
        monkeypatch.setattr(dec, "SEQUENTIAL_START", seq)
        with pytest.raises(SampleError, match="video has 9 frames but the geometry has 10"):
            dec.decode_window(mp4, np.arange(3), 10)


def test_files_that_hold_no_clip_are_rejected_saying_what_they_are(tmp_path):
    """An empty file, one that is no media, an audio-only file and an MPEG-TS stream read as decord's messages
    ("cannot find video stream with wanted index: -1", a retry-limit advice); each is said plainly now, the TS with
    the remux that makes it readable (checked: the remuxed file passes)."""
    import av

    from data_pipeline.video import VideoError, probe_and_check

    empty, text, audio, ts, mp4 = (tmp_path / n for n in ("empty.mp4", "text.mp4", "audio.m4a", "clip.ts", "clip.mp4"))
    empty.write_bytes(b"")
    text.write_text("not a video\n" * 10)
    with av.open(str(audio), "w") as out:
        s = out.add_stream("aac", rate=16000)
        for _ in range(8):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate = 16000
            out.mux(s.encode(frame))
        out.mux(s.encode())
    with av.open(str(ts), "w", format="mpegts") as out:
        s = out.add_stream("libx264", rate=16)
        s.width, s.height, s.pix_fmt = 64, 32, "yuv420p"
        for f in render_clip(0, 9, 32, 64)["frames"]:
            out.mux(s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        out.mux(s.encode())
    song = tmp_path / "song.mp4"  # audio with cover art (a picture stored as a video stream marked attached_pic)
    with av.open(str(song), "w") as out:
        s, art = out.add_stream("aac", rate=16000), out.add_stream("mjpeg", rate=1)
        art.width, art.height, art.pix_fmt = 64, 32, "yuvj420p"
        art.disposition = av.stream.Disposition.attached_pic
        for _ in range(8):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate = 16000
            out.mux(s.encode(frame))
        picture = render_clip(1, 1, 32, 64)["frames"][0]
        out.mux(art.encode(av.VideoFrame.from_ndarray(picture, format="rgb24").reformat(format="yuvj420p")))
        for stream in (s, art):
            out.mux(stream.encode())
    for path, reason in ((empty, "empty file (0 bytes)"), (text, "FFmpeg cannot open it (Invalid data"),
                         (audio, "no video stream (it holds audio only)"),
                         (song, "no video stream (it holds audio, cover art only)"),
                         (ts, "an MPEG-TS stream, which decord does not read to its end: remux it to MP4")):
        with pytest.raises(VideoError) as exc:
            probe_and_check(path)
        assert str(exc.value).startswith(f"{path}: {reason}"), str(exc.value)
    with av.open(str(ts)) as src, av.open(str(mp4), "w") as out:  # ffmpeg -i clip.ts -c copy clip.mp4
        stream = out.add_stream_from_template(src.streams.video[0])
        for packet in src.demux(src.streams.video[0]):
            if packet.dts is not None:
                packet.stream = stream
                out.mux(packet)
    assert probe_and_check(mp4).num_frames == 9


def test_a_video_of_two_streams_is_rejected_and_read_by_one_decoder_cover_art_kept(tmp_path):
    """Stream 0 one clip, stream 1 another: decord (the shard check, late windows) took stream 1, PyAV (early
    windows) stream 0, so one sample gave frames of two clips. Sharding rejects it naming the file; a shard written
    before reads it with decord alone."""
    import av

    import data_pipeline.decode as dec
    from data_pipeline.video import VideoError, probe_and_check

    clips = [render_clip(i, 9, 32, 64)["frames"] for i in (0, 1)]
    path = tmp_path / "two.mp4"
    with av.open(str(path), "w") as out:
        streams = [out.add_stream("libx264", rate=16) for _ in clips]
        for s in streams:
            s.width, s.height, s.pix_fmt = 64, 32, "yuv420p"
        for frames in zip(*clips):
            for s, f in zip(streams, frames):
                out.mux(s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        for s in streams:
            out.mux(s.encode())
    with pytest.raises(VideoError, match=rf"{path}: 2 video streams"):
        probe_and_check(path)
    data = path.read_bytes()
    np.testing.assert_array_equal(dec.decode_window(data, np.arange(3), 9), decode_frames(data)[:3])

    # cover art (a picture stored as a video stream marked attached_pic) is no second clip: kept, and read as one
    cover = tmp_path / "cover.mp4"
    with av.open(str(cover), "w") as out:
        video, art = out.add_stream("libx264", rate=16), out.add_stream("mjpeg", rate=1)
        video.width, video.height, video.pix_fmt = 64, 32, "yuv420p"
        art.width, art.height, art.pix_fmt = 64, 32, "yuvj420p"
        art.disposition = av.stream.Disposition.attached_pic
        for f in clips[0]:
            out.mux(video.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        out.mux(art.encode(av.VideoFrame.from_ndarray(clips[1][0], format="rgb24").reformat(format="yuvj420p")))
        for s in (video, art):
            out.mux(s.encode())
    assert probe_and_check(cover).num_frames == 9
    data = cover.read_bytes()
    np.testing.assert_array_equal(dec.decode_window(data, np.arange(3), 9), decode_frames(data)[:3])


@pytest.mark.parametrize("degrees, said", [(90, "90 degrees counter-clockwise"), (180, "180 degrees"),
                                            (-90, "90 degrees clockwise")])
def test_a_video_with_a_display_rotation_is_rejected_naming_it(tmp_path, degrees, said):
    """A phone's portrait clip is stored landscape with a display matrix: decord (the shard check, late windows)
    turns its frames upright, PyAV (early windows) does not, so a square clip trained turned against its depth. The
    shard check refuses it, naming the file, the rotation and the re-encode; a shard written before skips it on the
    PyAV path, saying why, instead of training on turned frames."""
    import data_pipeline.decode as dec
    from data_pipeline.video import VideoError, probe_and_check

    frames = render_clip(0, 9, 32, 32)["frames"]
    path = write_rotated_mp4(tmp_path / "phone.mp4", frames, degrees)
    with pytest.raises(VideoError, match=rf"{re.escape(str(path))}: the video carries a display rotation of {said} "
                                         r".*ffmpeg -i IN.mp4 -c:v libx264 -crf 18 OUT.mp4"):
        probe_and_check(path)
    with pytest.raises(SampleError, match=rf"display rotation of {said}.*re-shard"):
        dec.decode_window(path.read_bytes(), np.arange(3), 9, (32, 32))
    assert probe_and_check(write_rotated_mp4(tmp_path / "upright.mp4", frames, 0)).num_frames == 9


def test_a_video_whose_edit_list_hides_frames_is_rejected_naming_it(tmp_path):
    """A stream-copy cut keeps the frames before the cut point of the group of pictures it cuts into, hidden by the
    mp4's edit list: decord counts them (and returns repeats of the last shown frame past the shown ones), PyAV
    drops them, so a window's frames came shifted or frozen against its geometry by where it started. The shard check
    refuses it, naming the file and the re-encode; inspect-shards names it in a shard written before, and the PyAV
    path (early windows, encode-latents' fixed one) says why it skips it, whether or not the window runs past the
    shown frames (within them, its frames came shifted)."""
    import data_pipeline.decode as dec
    from data_pipeline.inspect_cli import ShardProblem, _check_member
    from data_pipeline.video import VideoError, hidden_frames, probe_and_check, write_mp4

    frames = render_clip(0, 90, 32, 64)["frames"]
    write_mp4(tmp_path / "whole.mp4", frames)
    path = write_cut_mp4(tmp_path / "whole.mp4", tmp_path / "cut.mp4", hidden=5)
    assert len(decode_frames(path)) == 90 and hidden_frames(path) == 5  # decord counts the hidden ones
    with pytest.raises(VideoError, match=rf"{re.escape(str(path))}: 5 of its 90 stored frames are hidden by its "
                                         r"edit list .*ffmpeg -i IN.mp4 -c:v libx264 -crf 18 OUT.mp4"):
        probe_and_check(path)
    data = path.read_bytes()
    with pytest.raises(ShardProblem, match=r"s.tar: k.mp4: 5 of its 90 stored frames are hidden .*re-shard it"):
        _check_member("s.tar", "k", "mp4", data)
    for idx in (2 + 6 * np.arange(15), np.arange(0, 40, 2)):  # past the shown frames, and within them
        with pytest.raises(SampleError, match=r"5 of its 90 stored frames are hidden .*re-shard it"):
            dec.decode_window(data, idx, 90)
    assert probe_and_check(tmp_path / "whole.mp4").num_frames == 90 and hidden_frames(tmp_path / "whole.mp4") == 0
    _check_member("s.tar", "k", "mp4", (tmp_path / "whole.mp4").read_bytes())


@pytest.mark.parametrize("size", [(24, 42), (48, 96)])
def test_resized_decode_matches_decoding_then_resizing(depth_shards, monkeypatch, size):
    """Frames resized in the decoder (swscale on the PyAV path, torch after decord) are those of a full decode
    resized with antialiased bilinear, up to chroma handling (swscale resizes the 4:2:0 chroma before
    upsampling it), and as close to the rendered source frames (within 10%; closer at 480p, docs/data.md)."""
    import data_pipeline.decode as dec
    import torch.nn.functional as F

    raw = next(raw_samples(list_shards(str(depth_shards))[0]))
    idx = np.array([1, 3, 5, 7])
    source = render_clip(int(raw["__key__"][1:]), **{"num_frames": 9, "height": 32, "width": 64})["frames"][idx]

    def resized(frames):
        x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()
        return F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False).permute(0, 2, 3, 1).numpy()

    ref = resized(decode_frames(raw["mp4"])[idx])
    for seq in (64, 0):  # PyAV from the first frame, decord get_batch
        monkeypatch.setattr(dec, "SEQUENTIAL_START", seq)
        frames = dec.decode_window(raw["mp4"], idx, 9, (32, 64), size)
        assert frames.shape == (4, *size, 3) and frames.dtype == np.uint8
        diff = np.abs(frames - ref)
        assert diff.mean() < (2.0 if seq else 0.5), (seq, diff.mean())
        assert np.abs(frames - resized(source)).mean() < 1.1 * np.abs(ref - resized(source)).mean()
        with pytest.raises(SampleError, match="video is 64x32 but the geometry is 60x32"):
            dec.decode_window(raw["mp4"], idx, 9, (32, 60), size)
    monkeypatch.undo()
    frames = dec.decode_window(raw["mp4"], idx, 9, (32, 64), size)
    assert frames.transpose(0, 3, 1, 2).flags.c_contiguous  # planar: each channel's conversion reads contiguous rows


def _one_shard_stream(shards_dir, **kw):
    shard = list_shards(str(shards_dir))[0]
    return shard, iter(ShardStream(StreamPlan((shard,), seed=0, rank=0, world_size=1, workers=1, shuffle_buffer=0),
                                   _cfg(shards_dir, **kw)))


def _first_epoch(stream):
    """(keys of epoch 0's samples, skipped count at the first sample of epoch 1)."""
    keys = []
    for s in stream:
        if s["__epoch__"] > 0:
            return keys, s["__skipped__"]
        keys.append(s["__key__"])


@pytest.mark.parametrize("how", ["truncated", "header"])
@pytest.mark.parametrize("victim", ["valid.npz", "txt", "sums.json"])
def test_a_partly_read_sample_is_skipped_and_the_rest_of_the_shard_counted(tmp_path, caplog, how, victim):
    """A shard cut inside a sample's member, or one whose member header has a flipped bit (tarfile reads a bad
    header as the end of the archive), yields that sample's earlier members as a sample: without its sums.json it
    is skipped as incomplete, never trained on with an empty caption or an all-true mask; the samples after it are
    counted as skipped, and the shard's shortfall is logged."""
    shards_dir = make_shards(tmp_path, num_clips=3, samples_per_shard=3, **SRC)
    path = Path(list_shards(str(shards_dir))[0].path)
    with tarfile.open(path) as tar:
        info = tar.getmember(f"r000000001.{victim}")
    data = bytearray(path.read_bytes())
    if how == "truncated":
        data = data[:info.offset_data + max(1, info.size // 2)]
    else:
        data[info.offset + 130] ^= 0x01  # inside the header's uid field: its checksum no longer matches
    path.write_bytes(bytes(data))
    shard, stream = _one_shard_stream(shards_dir, crop="random")
    with caplog.at_level(logging.WARNING, logger="data_pipeline.reader"):
        keys, skipped = _first_epoch(stream)
    assert keys == ["r000000000"] and skipped == 2
    text = caplog.text
    assert f"shard={shard.name} key=r000000001" in text and "no sums.json" in text
    assert f"shard={shard.name} key=r000000002" in text
    assert f"shard={shard.name}: the tar ended after 2 of the 3 samples index.json lists" in text


def test_a_sample_missing_a_member_its_sums_list_is_skipped(depth_shards):
    raw = next(raw_samples(list_shards(str(depth_shards))[0]))
    stream = ShardStream(StreamPlan(tuple(list_shards(str(depth_shards))), seed=0, rank=0, world_size=1, workers=1),
                         _cfg(depth_shards))
    for member in ("valid.npz", "txt", "cam.json", "json"):
        with pytest.raises(SampleError, match=rf"members \['{member}'\] listed in sums.json are missing"):
            stream.decode({k: v for k, v in raw.items() if k != member}, np.random.default_rng(0))
    with pytest.raises(SampleError, match="no sums.json"):
        stream.decode({k: v for k, v in raw.items() if k != "sums.json"}, np.random.default_rng(0))


@pytest.mark.parametrize("member", ["valid.npz", "txt", "json", "cam.json", "mp4", "depth.npz"])
def test_a_sample_without_a_member_every_sample_has_is_skipped(depth_shards, member):
    """Even with sums.json rewritten to match (a writer that left a member out), a sample lacking a member that
    `one4d shard` always writes is not read with a default in its place."""
    raw = next(raw_samples(list_shards(str(depth_shards))[0]))
    stream = ShardStream(StreamPlan(tuple(list_shards(str(depth_shards))), seed=0, rank=0, world_size=1, workers=1),
                         _cfg(depth_shards))
    with pytest.raises(SampleError, match=r"missing members \[.*'" + re.escape(member)):
        stream.decode(resum({k: v for k, v in raw.items() if k != member}), np.random.default_rng(0))
    with pytest.raises(SampleError, match="both depth.npz and xyz.npz"):
        stream.decode(resum({**raw, "xyz.npz": raw["depth.npz"]}), np.random.default_rng(0))


def test_a_shard_is_opened_as_a_plain_file_never_as_a_url_or_command(depth_shards, tmp_path, monkeypatch, caplog):
    """webdataset's opener runs 'pipe:CMD' in a shell (and reads URLs): the reader opens shard files itself."""
    shard = list_shards(str(depth_shards))[0]
    assert [raw["__key__"] for raw in raw_samples(shard)] == list(shard.keys)
    monkeypatch.chdir(tmp_path)
    evil = dataclasses.replace(shard, path=f"pipe:touch RAN; cat {shard.path}")
    with caplog.at_level(logging.WARNING, logger="data_pipeline.reader"):
        assert list(raw_samples(evil)) == []
    assert not (tmp_path / "RAN").exists()
    assert "pipe:touch RAN" in caplog.text and "No such file or directory" in caplog.text


def test_shards_are_found_by_directory_pattern_or_file_and_a_missing_path_is_named(depth_shards, tmp_path):
    names = [s.name for s in list_shards(str(depth_shards))]
    assert [s.name for s in list_shards(str(depth_shards / "*.tar"))] == names
    assert [s.name for s in list_shards(str(depth_shards / names[0]))] == names[:1]
    missing = tmp_path / "no-such-folder"
    with pytest.raises(ValueError, match=f"^{missing}: no such shard directory or shard file"):
        list_shards(str(missing))


def test_a_caption_that_is_not_utf8_is_skipped_as_inspect_shards_reports_it():
    """The reader trained on such a caption with replacement characters while inspect-shards failed the shard."""
    from data_pipeline.decode import SampleError, text_members

    assert text_members({"txt": "café".encode()})[0] == "café"
    with pytest.raises(SampleError, match="member txt is not UTF-8 text"):
        text_members({"txt": b"\xff\xfe bad"})


FORKED_AFTER_PYAV = """
import sys
import av
import numpy as np
from data_pipeline.config import DataConfig
from data_pipeline.loader import build_loader
from data_pipeline.video import write_mp4

shards, mp4, height, width = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
write_mp4(mp4, np.zeros((2, 32, 64, 3), np.uint8))
with av.open(mp4) as container:  # the main thread converts a frame as PyAV does by default (two slice threads)
    next(container.decode(video=0)).to_ndarray(format="rgb24", threads=2)
cfg = DataConfig(shards=shards, num_workers=2, num_frames=5, frame_stride=2, height=height, width=width,
                 crop="center", shuffle_buffer=3)
loader = build_loader(cfg, rank=0, world_size=1, seed=0, micro_batch_size=1)
for n, batch in enumerate(loader, 1):
    if n == 4:
        break
loader.close()
print("batches", n)
"""


@pytest.mark.parametrize("size", [(32, 48), (16, 24)], ids=["as stored", "resized"])
def test_workers_decode_after_the_main_thread_converted_frames_with_pyav(depth_shards, tmp_path, size):
    """PyAV 18.1.1 keeps one swscale context per thread for frame.to_ndarray(format=...), with its slice threads.
    A DataLoader worker forked from a main thread that had used it (an in-process decode first, as a loader without
    workers does, or any library's frame conversion) inherited the context without its threads, and its first frame
    conversion waited for them forever: the suite hung in CI. The decode converts with a scaler of its own."""
    import subprocess

    from launch_utils import ROOT, _env, communicate

    with open(tmp_path / "stderr.txt", "w") as err:  # a hang kills the job, its hung data workers with it
        proc = subprocess.Popen([sys.executable, "-c", FORKED_AFTER_PYAV, str(depth_shards), str(tmp_path / "a.mp4"),
                                 *map(str, size)], cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=err, text=True,
                                start_new_session=True)
        try:
            out = communicate(proc, 120)
        except subprocess.TimeoutExpired:
            pytest.fail("the loader's workers hung decoding after the main thread's PyAV frame conversion")
    assert proc.returncode == 0 and out.split() == ["batches", "4"], (tmp_path / "stderr.txt").read_text()[-3000:]
