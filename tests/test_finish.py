"""data.finish_on_device: staged samples (uint8 frames, cropped geometry, per-frame affine maps) finished by
finish.finish_batch give the samples transforms.to_sample makes on the CPU, through the real loader too."""
import numpy as np
import pytest
import torch

from data_pipeline.config import DataConfig
from data_pipeline.decode import DecodedClip
from data_pipeline.finish import batchable, finish_batch
from data_pipeline.geometry import depth_to_pointmaps
from data_pipeline.loader import build_loader, collate
from data_pipeline.synthetic import render_clip
from data_pipeline.transforms import to_sample, to_staged_sample
from data_utils import make_shards

TOL = {"float32": 2e-6, "bfloat16": 2 ** -8, "float16": 2 ** -11}  # float32 rounding; one half-precision step


def _clip(seed: int, geometry: str, depth_dtype=np.float16) -> DecodedClip:
    clip = render_clip(seed, 5, 45, 80)
    idx = np.array([1, 2, 4])
    rel = np.linalg.inv(clip["poses_c2w"][idx[0]]) @ clip["poses_c2w"][idx]
    depth, xyz, to_ref = clip["depth"][idx].astype(depth_dtype), None, None
    if geometry == "points":  # stored in the clip's first camera, some points not finite
        xyz = depth_to_pointmaps(clip["depth"], clip["intrinsics"], clip["poses_c2w"], ref=0)[idx]
        xyz[:, 3:6, 10:20] = np.nan
        depth, to_ref = None, np.linalg.inv(clip["poses_c2w"][idx[0]]) @ clip["poses_c2w"][0]
    return DecodedClip(frames=clip["frames"][idx], depth=depth, xyz=xyz, xyz_to_ref=to_ref, valid=clip["valid"][idx],
                       intrinsics=np.broadcast_to(clip["intrinsics"], (3, 3, 3)).copy(), poses_c2w=rel,
                       caption=clip["caption"], text_emb=None, frame_indices=idx)


def _assert_same(finished: dict, ref: dict, dtype: str):
    assert set(finished) == set(ref), set(finished) ^ set(ref)
    for key, value in ref.items():
        got = finished[key]
        if key in ("rgb", "xyz"):
            assert got.dtype == value.dtype and got.shape == value.shape, key
            torch.testing.assert_close(got.float(), value.float(), atol=TOL[dtype], rtol=0, msg=key)
        elif isinstance(value, torch.Tensor):  # exactly (NaN where cameras are unknown)
            torch.testing.assert_close(got, value, rtol=0, atol=0, equal_nan=True, msg=key)
        else:
            assert got == value, key


@pytest.mark.parametrize("geometry, depth_dtype", [("depth", np.float16), ("depth", np.float32), ("points", None)])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_finished_batch_equals_the_cpu_sample(geometry, depth_dtype, dtype):
    clips = [_clip(s, geometry, depth_dtype) for s in (3, 8)]
    ref = collate([to_sample(c, 32, 48, "random", (2.0, 98.0), np.random.default_rng(i), dtype)
                   for i, c in enumerate(clips)])
    staged = collate([to_staged_sample(c, 32, 48, "random", (2.0, 98.0), np.random.default_rng(i))
                      for i, c in enumerate(clips)])
    assert staged["rgb_u8"].dtype == torch.uint8 and "rgb" not in staged and "xyz" not in staged
    assert staged["xyz_affine"].shape == (2, 3, 3, 4)
    kind = "depth" if geometry == "depth" else "points"
    assert staged[kind].dtype == torch.from_numpy(np.empty(0, depth_dtype or np.float32)).dtype
    finished = finish_batch(staged, dtype)
    _assert_same(finished, ref, dtype)
    assert (finished["xyz"][~finished["valid"].expand_as(finished["xyz"])] == 0).all()


def test_a_finished_batch_is_left_alone():
    batch = {"rgb": torch.zeros(1, 3, 3, 8, 8), "caption": ["x"]}
    assert finish_batch(batch, "float32") is batch


def test_a_batch_mixing_depth_and_pointmap_clips_is_finished_before_stacking():
    """A shard set may hold both geometry kinds; their staged members differ, so such a batch is finished in the
    worker (on the CPU) and stacks like any CPU-finished batch."""
    clips = [_clip(3, "depth"), _clip(8, "points")]
    ref = collate([to_sample(c, 32, 48, "random", (2.0, 98.0), np.random.default_rng(i), "bfloat16")
                   for i, c in enumerate(clips)])
    staged = [to_staged_sample(c, 32, 48, "random", (2.0, 98.0), np.random.default_rng(i)) for i, c in enumerate(clips)]
    with pytest.raises(KeyError):
        collate(staged)
    batch = collate(batchable(staged, "bfloat16"))
    assert "rgb_u8" not in batch
    _assert_same(batch, ref, "bfloat16")
    same_kind = [to_staged_sample(_clip(s, "depth"), 32, 48, "center", (2.0, 98.0), None) for s in (1, 2)]
    assert batchable(same_kind, "bfloat16") is same_kind


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("finish"), num_clips=4, frames=9, height=32, width=64,
                       samples_per_shard=1)


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_ships_staged_batches_that_finish_to_the_cpu_batches(shards, workers):
    """Same seed, same position: the staged stream finishes to the CPU-finished stream, batch for batch, while
    its workers hand over fewer bytes (uint8 frames and half-precision depth instead of two float clips)."""
    batches = {}
    for finish in (False, True):
        cfg = DataConfig(shards=str(shards), num_workers=workers, num_frames=5, frame_stride=1, height=32, width=48,
                         crop="random", shuffle_buffer=2, sample_dtype="bfloat16", finish_on_device=finish)
        loader = build_loader(cfg, rank=0, world_size=1, seed=5, micro_batch_size=2)
        it = iter(loader)
        batches[finish] = [next(it) for _ in range(3)]
        loader.close()
    for ref, staged in zip(batches[False], batches[True]):
        assert "depth" in staged and staged["depth"].dtype == torch.float16
        staged_bytes = sum(v.nbytes for k, v in staged.items() if k in ("rgb_u8", "depth"))
        assert staged_bytes < 0.5 * (ref["rgb"].nbytes + ref["xyz"].nbytes)
        _assert_same(finish_batch(staged, "bfloat16"), ref, "bfloat16")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("geometry", ["depth", "points"])
def test_finish_on_cuda_equals_the_cpu_sample(geometry, monkeypatch):
    """On the GPU, with TF32 matmuls allowed (as training sets them), the finish is still float32-exact."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    clips = [_clip(s, geometry) for s in (3, 8)]
    ref = collate([to_sample(c, 32, 48, "random", (2.0, 98.0), np.random.default_rng(i), "bfloat16")
                   for i, c in enumerate(clips)])
    staged = collate([to_staged_sample(c, 32, 48, "random", (2.0, 98.0), np.random.default_rng(i))
                      for i, c in enumerate(clips)])
    on_gpu = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in staged.items()}
    finished = finish_batch(on_gpu, "bfloat16")
    assert finished["rgb"].is_cuda and finished["xyz"].is_cuda
    _assert_same({k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in finished.items()}, ref, "bfloat16")


def test_loader_over_a_shard_set_of_both_geometry_kinds(tmp_path):
    """Depth and pointmap clips in one shard set, batches of 2, finished on the device: every batch finishes to
    the CPU-finished batch."""
    import json

    from data_pipeline.shard import run_sharding
    from data_utils import make_dataset

    rows = []
    for name, geometry, seed in (("a", "depth", 0), ("b", "xyz", 10)):
        manifest = make_dataset(tmp_path / name, num_clips=2, frames=9, height=32, width=64, geometry=geometry, seed=seed)
        for line in manifest.read_text().splitlines():
            row = json.loads(line)
            for key in ("video", "valid", "depth", "poses", "xyz"):
                if key in row:
                    row[key] = str(manifest.parent / row[key])
            rows.append(row)
    (tmp_path / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run_sharding(tmp_path / "manifest.jsonl", tmp_path / "shards", samples_per_shard=1, workers=1, progress=False)
    batches = {}
    for finish in (False, True):
        cfg = DataConfig(shards=str(tmp_path / "shards"), num_workers=2, num_frames=5, frame_stride=1, height=32,
                         width=48, crop="random", shuffle_buffer=2, sample_dtype="bfloat16", finish_on_device=finish)
        loader = build_loader(cfg, rank=0, world_size=1, seed=1, micro_batch_size=2)
        it = iter(loader)
        batches[finish] = [next(it) for _ in range(4)]
        loader.close()
    kinds = set()
    for ref, got in zip(batches[False], batches[True]):
        kinds.add("depth" if "depth" in got else "points" if "points" in got else "mixed")
        _assert_same(finish_batch(got, "bfloat16"), ref, "bfloat16")
    assert "mixed" in kinds, kinds  # the seed gives at least one batch of both kinds
