"""Precomputed latents: `one4d encode-latents` on real shards with the tiny Wan VAE, and the reader's latent path."""
import io
import json
import os
import re
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from data_utils import kill_after_first_shard, make_shards

from data_pipeline import checksums
from data_pipeline.config import DataConfig
from data_pipeline.latents import (LatentsMismatchError, LatentsSpec, fixed_window_sample, image_condition,
                                   latents_spec, raw_of, tar_samples, vae_identity)
from data_pipeline.latents_cli import EncodeError, main as encode_main, run_encode
from data_pipeline.loader import build_loader
from data_pipeline.reader import ShardStream, StreamPlan, list_shards
from data_pipeline.shard_index import read_index, sha256_file
from one4d_train.config import load_config
from one4d_train.diffusion.objective import latent_validity
from one4d_train.model.vae import load_vae

ROOT = Path(__file__).resolve().parents[1]
CONFIG = [f"config={ROOT / 'configs/experiment/demo.yaml'}", "data.num_frames=5", "data.frame_stride=2"]
SPEC = LatentsSpec("tiny:0", 1.0)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tiny VAE's many small convolutions run ~10x slower with 2 threads on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _cfg(shards, **kw):
    # 5 frames, stride 2 over 9-frame clips: the window spans the clip, so every pixel sample starts at 0 too
    base = dict(shards=str(shards), num_workers=0, num_frames=5, frame_stride=2, height=32, width=48, crop="center",
                shuffle_buffer=3)
    return DataConfig(**{**base, **kw})


def _take(loader, n):
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == n:
            break
    loader.close()
    return out


@pytest.fixture(scope="module")
def encoded(tmp_path_factory):
    root = tmp_path_factory.mktemp("latents")
    src = make_shards(root, num_clips=4, frames=9, height=32, width=64, samples_per_shard=2)
    assert encode_main([str(src), str(root / "lat"), *CONFIG, "--device", "cpu", "--batch", "2", "--no-progress"]) == 0
    return src, root / "lat"


def test_stored_latents_equal_a_direct_encode_of_the_pipeline_sample(encoded):
    src, out = encoded
    cfg = load_config(CONFIG)
    vae = load_vae("", seed=0)
    index = read_index(out)
    assert [s["keys"] for s in index["shards"]] == [s["keys"] for s in read_index(src)["shards"]]
    assert index["latents"]["encoded"] == 4 and index["latents"]["vae"] == "tiny:0" and index["sample_format"] == 3
    assert index["latents"]["text_encoder"] == "tiny:0" and index["latents"]["text_encoded"] == 4
    errors = []
    for entry in index["shards"]:
        assert sha256_file(out / entry["name"]) == entry["sha256"]
        source = dict(tar_samples(src / entry["name"]))
        for key, members in tar_samples(out / entry["name"]):
            # every original member, byte for byte and in order, then the latents, then checksums of them all
            assert members[:-4] == [m for m in source[key] if m[0] != f"{key}.sums.json"]
            assert [n for n, _ in members[-4:]] == [f"{key}.latents.npz", f"{key}.latents.json", f"{key}.emb.npy",
                                                    f"{key}.sums.json"]
            raw = raw_of(key, members)
            assert sorted(json.loads(raw["sums.json"])) == sorted(k for k in raw if k not in ("__key__", "sums.json"))
            checksums.verify(raw)
            sample, info = fixed_window_sample(raw_of(key, source[key]), cfg.data)
            rgb, xyz = sample["rgb"].transpose(0, 1)[None], sample["xyz"].transpose(0, 1)[None]
            direct = {"z_rgb": vae.encode(rgb), "z_xyz": vae.encode(xyz), "z_image": vae.encode(image_condition(rgb))}
            meta = json.loads(raw["latents.json"])
            assert meta["window"] == {"start": 0, "stride": 2, "frames": 5} and meta["resolution"] == [32, 48]
            assert meta["crop"] == {"resized_h": 32, "resized_w": 64, "top": 0, "left": 8, "height": 32, "width": 48}
            assert meta["xyz_centre"] == info["xyz_centre"] and meta["xyz_scale"] == info["xyz_scale"]
            assert meta["vae"] == "tiny:0" and meta["dtype"] == "float16" and meta["latent_shape"] == [16, 2, 4, 6]
            assert meta["vae_latents_mean"] == [float(v) for v in vae.model.config.latents_mean]
            with np.load(io.BytesIO(raw["latents.npz"]), allow_pickle=False) as z:
                for name, ref in direct.items():
                    stored = z[name]
                    assert stored.dtype == np.float16 and stored.shape == (16, 2, 4, 6)
                    ref = ref[0].numpy()
                    err = np.abs(stored.astype(np.float32) - ref)
                    # float16 rounding (half an ulp: 2^-11 relative) plus batched-vs-single encode (~1e-5)
                    assert (err <= 2 ** -11 * np.abs(ref) + 1e-4).all(), (name, err.max())
                    errors.append(err / np.maximum(np.abs(ref), 1e-3))
                cells = np.unpackbits(z["latent_valid_packed"], axis=-1, count=6).view(bool)
            expect = latent_validity(sample["valid"][None], 1.0)[0].numpy()
            assert np.array_equal(cells, expect) and 0 < cells.mean() < 1
    assert np.concatenate([e.ravel() for e in errors]).max() <= 2 ** -11


def test_latent_sample_and_pixel_sample_agree_on_window_and_crop(encoded):
    src, out = encoded
    pixel = _take(build_loader(_cfg(src), rank=0, world_size=1, seed=3, micro_batch_size=1), 4)
    latent = _take(build_loader(_cfg(out), rank=0, world_size=1, seed=3, micro_batch_size=1, latents=SPEC), 4)
    assert [b["__key__"] for b in pixel] == [b["__key__"] for b in latent]
    for p, q in zip(pixel, latent):
        assert "xyz" not in q and "valid" not in q
        assert torch.equal(p["rgb"], q["rgb"])
        for key in ("intrinsics", "poses_c2w", "xyz_centre", "xyz_scale"):
            torch.testing.assert_close(p[key], q[key], rtol=1e-6, atol=1e-6)
        assert q["z_rgb"].shape == q["z_xyz"].shape == q["z_image"].shape == (1, 16, 2, 4, 6)
        assert q["z_rgb"].dtype == torch.float32 and q["latent_valid"].dtype == torch.bool
        assert torch.equal(q["latent_valid"], latent_validity(p["valid"], 1.0))
        assert p["caption"] == q["caption"]
    # with data.use_latents=false the same shards give pixel samples
    plain = _take(build_loader(_cfg(out, use_latents=False), rank=0, world_size=1, seed=3, micro_batch_size=1), 1)[0]
    assert torch.equal(plain["xyz"], pixel[0]["xyz"]) and "z_rgb" not in plain


def test_mismatched_latents_are_refused_with_the_reason(encoded):
    _, out = encoded
    kw = dict(rank=0, world_size=1, seed=3, micro_batch_size=1)
    with pytest.raises(LatentsMismatchError, match="data.num_frames=9"):
        build_loader(_cfg(out, num_frames=9, frame_stride=1), latents=SPEC, **kw)
    with pytest.raises(LatentsMismatchError, match="resolution 32x48 vs .* 64x64"):
        build_loader(_cfg(out, height=64, width=64), latents=SPEC, **kw)
    with pytest.raises(LatentsMismatchError, match="encoded with VAE 'tiny:0', the configured VAE is 'tiny:1'"):
        build_loader(_cfg(out), latents=LatentsSpec("tiny:1"), **kw)
    with pytest.raises(LatentsMismatchError, match="no VAE identity"):
        build_loader(_cfg(out), **kw)
    with pytest.raises(LatentsMismatchError, match="flow.xyz_valid_min_fraction=0.5"):
        build_loader(_cfg(out), latents=LatentsSpec("tiny:0", 0.5), **kw)
    # per sample (a stream built without the index check): the error names the shard and key, never skips
    shards = tuple(list_shards(str(out)))
    stream = ShardStream(StreamPlan(shards, seed=0, rank=0, world_size=1, workers=1), _cfg(out),
                         latents=LatentsSpec("/weights/Wan2.1_VAE.pth"), latents_only=True)
    with pytest.raises(LatentsMismatchError, match=r"shard=shard-00000\d.tar key=r00000000\d: .*'/weights/Wan2.1_VAE.pth'"):
        next(iter(stream))
    assert vae_identity("", 7) == "tiny:7" and vae_identity("/w/vae", 7) == "/w/vae"
    assert latents_spec(load_config(CONFIG + ["seed=5"])) == LatentsSpec("tiny:5", 1.0)


@pytest.mark.parametrize("workers", [0, 2])
def test_exact_loader_resume_with_latents(encoded, workers):
    _, out = encoded
    cfg = _cfg(out, num_workers=workers, crop="random")
    kw = dict(rank=0, world_size=1, seed=4, micro_batch_size=1, latents=SPEC)

    def run(loader, n):
        return [(b["__key__"], b["rgb"].sum().item(), b["z_xyz"].sum().item()) for b in _take(loader, n)]

    full = run(build_loader(cfg, **kw), 7)  # 4 samples an epoch: 7 batches cross into epoch 1
    first = build_loader(cfg, **kw)
    head = run(first, 3)
    state = json.loads(json.dumps(first.state_dict()))
    assert head + run(build_loader(cfg, position=state, **kw), 4) == full


def test_killed_encode_resumes_to_identical_output(tmp_path):
    src = make_shards(tmp_path, num_clips=10, frames=9, height=32, width=64, samples_per_shard=1)
    cfg = load_config(CONFIG)
    ref = tmp_path / "ref"
    run_encode(src, ref, cfg, progress=False)

    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "one4d_train.cli", "encode-latents", str(src), str(out), *CONFIG, "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # as in this process (one_thread): same arithmetic
    done = kill_after_first_shard(cmd, out, ROOT, timeout=90, env=env)
    assert not (out / "index.json").exists() and 1 <= done < 10, f"kill landed after {done} shards"

    summary = run_encode(src, out, cfg, progress=False)
    assert summary["skipped"] >= done and summary["written"] == 10 - summary["skipped"]
    assert not list(out.glob(".*tmp*"))
    for name in ["index.json", "rejects.jsonl", "plan.json", "empty_prompt.npy"] + \
            [s["name"] for s in read_index(ref)["shards"]]:
        assert (out / name).read_bytes() == (ref / name).read_bytes(), name
    # the folder is tied to its settings
    with pytest.raises(EncodeError, match="other settings"):
        run_encode(src, out, load_config(CONFIG + ["data.height=64"]), progress=False)


def test_a_source_sharded_again_keeps_the_latents_of_its_unchanged_shards(tmp_path, capsys):
    """After the clips were sharded again (one replaced, then one dropped), encode-latents into the same folder was
    refused ('latents from another source index') and the whole set had to be encoded again in a new one: the latent
    shards of unchanged source shards are kept, changed ones encoded, dropped ones removed, and the folder ends as a
    fresh encode of the new source would."""
    from data_pipeline.shard import run_sharding
    from data_utils import make_dataset

    rows = make_dataset(tmp_path / "clips", num_clips=4, frames=9, height=32, width=64).read_text().splitlines()

    def sharded(name, picked):
        manifest = tmp_path / "clips" / "raw" / f"{name}.jsonl"
        manifest.write_text("".join(rows[i] + "\n" for i in picked))
        run_sharding(manifest, tmp_path / name, samples_per_shard=1, workers=1, progress=False)
        return tmp_path / name

    first, second = sharded("first", [0, 1, 2]), sharded("second", [0, 1, 3])
    names = [e["name"] for e in read_index(second)["shards"]]
    assert [sha256_file(first / n) == sha256_file(second / n) for n in names] == [True, True, False]
    out = tmp_path / "lat"
    args = [*CONFIG, "--device", "cpu", "--no-progress"]
    assert encode_main([str(first), str(out), *args]) == 0
    capsys.readouterr()
    kept = {n: (out / n).stat().st_mtime_ns for n in names[:2]}
    assert encode_main([str(second), str(out), *args]) == 0
    said = capsys.readouterr().out
    assert f"{second} was sharded again since {out} was encoded: the latents of its unchanged shards are kept" in said
    assert "3 shards (1 written, 2 already done)" in said, said
    assert {n: (out / n).stat().st_mtime_ns for n in names[:2]} == kept  # not written again
    fresh = tmp_path / "fresh"
    assert encode_main([str(second), str(fresh), *args]) == 0
    for name in ["index.json", "plan.json", *names]:
        assert (out / name).read_bytes() == (fresh / name).read_bytes(), name
    # a shard dropped from the source: its latents go with it, the index lists what is left
    third = sharded("third", [0, 1])
    assert encode_main([str(third), str(out), *args]) == 0
    assert "1 shard(s) of the old set removed (shard-000002.tar)" in capsys.readouterr().out
    assert sorted(p.name for p in out.glob("*.tar")) == names[:2] and not (out / "shard-000002.tar.record.json").exists()
    assert [e["name"] for e in read_index(out)["shards"]] == names[:2]
    assert read_index(out)["latents"]["source_index_sha256"] == sha256_file(third / "index.json")


def test_an_output_folder_that_is_a_file_is_named(tmp_path, capsys):
    """OUT_DIR naming a file is an error message and exit 1, not a traceback."""
    src = make_shards(tmp_path, num_clips=1, frames=9, height=32, width=64, samples_per_shard=1)
    (tmp_path / "file").write_text("")
    assert encode_main([str(src), str(tmp_path / "file"), *CONFIG, "--device", "cpu", "--no-progress"]) == 1
    assert f"{tmp_path / 'file'}: not a folder: OUT_DIR is the folder the latent shards go to" in \
        capsys.readouterr().err
    assert encode_main([str(src), str(tmp_path / "file" / "x"), *CONFIG, "--device", "cpu", "--no-progress"]) == 1
    assert f"Not a directory: '{tmp_path / 'file' / 'x'}'" in capsys.readouterr().err


def _member_offset(shard: Path, name: str) -> int:
    """Where the data of the member `name` of the tar `shard` starts."""
    import tarfile

    with tarfile.open(shard) as tar:
        return tar.getmember(name).offset_data


def test_a_damaged_source_shard_is_encoded_sample_by_sample(tmp_path, capsys):
    """A source shard that no longer matches its index (a flipped bit, a cut) failed whole: none of its samples got
    latents, the run exited 1 and wrote no index, though each sample carries the CRC-32s of its members. It is
    encoded sample by sample: the samples that verify get latents, the damaged ones and those the shard lacks are
    listed as failed with their reason, and the index is written. Re-made by re-running `one4d shard`, it is encoded
    again by a re-run. A shard that is missing or does not read as a tar is still named and left out while every
    other shard is encoded, and the run exits 1."""
    src = make_shards(tmp_path, num_clips=4, frames=9, height=32, width=64, samples_per_shard=2)
    flipped, cut = src / "shard-000000.tar", src / "shard-000001.tar"
    good = {p: p.read_bytes() for p in (flipped, cut)}
    data = bytearray(good[flipped])
    data[_member_offset(flipped, "r000000001.mp4") + 600] ^= 0x10  # the index's sha256 no longer matches
    flipped.write_bytes(bytes(data))
    cut.write_bytes(good[cut][:_member_offset(cut, "r000000003.mp4") + 600])  # in the last sample's video
    out = tmp_path / "lat"
    assert encode_main([str(src), str(out), *CONFIG, "--device", "cpu", "--no-progress"]) == 0
    said = capsys.readouterr().out
    for shard in (flipped, cut):
        assert f"  source shard {shard}: " in said and "encoded sample by sample" in said, said
    index = read_index(out)
    failed = {f["key"]: f["reason"] for f in index["latents"]["failed"]}
    assert index["latents"]["encoded"] == 2 and sorted(failed) == ["r000000001", "r000000003"], failed
    assert "members ['mp4'] are corrupt" in failed["r000000001"]
    assert failed["r000000003"].startswith(f"not in the source shard, which differs from its index ({cut}: "), failed
    assert [s["keys"] for s in index["shards"]] == [["r000000000", "r000000001"], ["r000000002"]]
    assert index["totals"]["samples"] == 3
    batches = _take(build_loader(_cfg(out), rank=0, world_size=1, seed=0, micro_batch_size=1, latents=SPEC), 4)
    assert {b["__key__"][0] for b in batches} == {"r000000000", "r000000002"}
    # the cut shard re-made (as re-running `one4d shard` does): the re-run encodes it again, whole
    cut.write_bytes(good[cut])
    summary = run_encode(src, out, load_config(CONFIG), progress=False)
    assert (summary["written"], summary["skipped"], summary["encoded"]) == (1, 1, 3)
    assert [f["key"] for f in summary["failed"]] == ["r000000001"] and not summary["resampled"]
    # a shard that is no tar at all, and a missing one: nothing to read samples from
    noise = np.random.default_rng(0).bytes(len(good[flipped]))
    for i, (broken, bad, problem) in enumerate(((flipped, bytes(len(noise)), "does not read as a tar \\(no member"),
                                                (flipped, noise, "does not read as a tar"), (cut, None, "missing"))):
        again = tmp_path / f"again-{i}"
        saved = broken.read_bytes()
        broken.write_bytes(bad) if bad is not None else broken.unlink()
        with pytest.raises(EncodeError, match=rf"1 of this run's 2 source shards could not be encoded \(the others "
                                              rf"were\): source shard does not match its index: {broken}: .*{problem}"):
            run_encode(src, again, load_config(CONFIG), progress=False)
        assert len(list(again.glob("*.tar"))) == 1 and not (again / "index.json").exists()
        broken.write_bytes(saved)


def test_a_corrupt_source_sample_is_not_encoded_and_stays_detectable(tmp_path):
    """A source mp4 with a flipped bit (it would still decode): encode-latents lists the sample as failed and copies
    it with its original sums.json, so the reader still skips it instead of training on latents of wrong frames."""
    import tarfile

    src = make_shards(tmp_path, num_clips=2, frames=9, height=32, width=64, samples_per_shard=2)
    shard = src / "shard-000000.tar"
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(shard, "w", format=tarfile.GNU_FORMAT) as tar:
        for m, data in members:
            if m.name == "r000000000.mp4":
                data = bytearray(data)
                data[len(data) // 2] ^= 0x10
                data = bytes(data)
            tar.addfile(m, io.BytesIO(data))
    index = json.loads((src / "index.json").read_text())
    index["shards"][0].update(bytes=shard.stat().st_size, sha256=sha256_file(shard))
    index["totals"]["bytes"] = shard.stat().st_size
    (src / "index.json").write_text(json.dumps(index))
    out = tmp_path / "lat"
    run_encode(src, out, load_config(CONFIG), progress=False)
    failed = read_index(out)["latents"]["failed"]
    assert [f["key"] for f in failed] == ["r000000000"] and "corrupt" in failed[0]["reason"]
    samples = dict(tar_samples(out / "shard-000000.tar"))
    with pytest.raises(Exception, match="corrupt"):
        checksums.verify(raw_of("r000000000", samples["r000000000"]))
    checksums.verify(raw_of("r000000001", samples["r000000001"]))


def test_encode_latents_that_encodes_no_sample_fails(tmp_path, capsys):
    """Every clip shorter than the window: '0 samples encoded ... 4 without latents', exit 0, so a Slurm array
    reported success; `one4d shard` exits 1 when it rejects every row."""
    src = make_shards(tmp_path, num_clips=2, frames=9, height=32, width=64, samples_per_shard=2)
    assert encode_main([str(src), str(tmp_path / "lat"), *CONFIG, "data.num_frames=21", "data.frame_stride=1",
                        "--device", "cpu", "--no-progress"]) == 1
    captured = capsys.readouterr()
    assert "0 samples encoded" in captured.out and "ShortClipError: clip has 9 frames" in captured.out
    assert "no sample got latents (2 failed, reasons above)" in captured.err


def _trainer_text(cfg):
    from one4d_train.model.encoders import build_encoders
    from one4d_train.model.presets import wan_config

    return build_encoders(cfg.model, wan_config(cfg.model.preset), torch.device("cpu"), torch.float32, cfg.seed)[1]


def test_stored_text_embeddings_give_the_trainers_context(encoded):
    """emb.npy of each sample is the trainer's own encoder output for its caption (float16 storage), and a batch
    that carries it gets the context the trainer's encoder gives the caption, without running the encoder."""
    from one4d_train.model.text_encoder import TextConditioning

    _, out = encoded
    text = _trainer_text(load_config(CONFIG))
    batches = _take(build_loader(_cfg(out), rank=0, world_size=1, seed=3, micro_batch_size=1, latents=SPEC), 4)
    for b in batches:
        caption, stored = b["caption"][0], b["text_emb"][0]
        live = text.encoder.encode_rows([caption])[0]
        assert stored.shape == live.shape and 2 < stored.shape[0] < text.text_len
        torch.testing.assert_close(stored, live, rtol=2 ** -10, atol=1e-4)
        no_encoder = TextConditioning(None, dim=text.dim, empty=text.empty)  # the stored rows alone
        torch.testing.assert_close(no_encoder([caption], [stored]), text([caption]), rtol=2 ** -10, atol=1e-4)


def test_text_embeddings_are_optional_kept_and_pinned(tmp_path):
    """--no-text stores none; a sample whose manifest gave an embedding keeps exactly it; a folder encoded with
    text refuses a run without."""
    import tarfile

    from data_pipeline.shard import run_sharding
    from data_utils import make_dataset

    manifest = make_dataset(tmp_path, num_clips=2, frames=9, height=32, width=64)
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    given = np.random.default_rng(0).standard_normal((7, 4096)).astype(np.float16)
    np.save(tmp_path / "given.npy", given)
    rows[0]["text_embedding"] = str(tmp_path / "given.npy")
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    src = tmp_path / "shards"
    run_sharding(manifest, src, samples_per_shard=2, workers=1, progress=False)
    cfg = load_config(CONFIG)
    assert run_encode(src, tmp_path / "plain", cfg, progress=False, text=False)["text_encoded"] == 0
    summary = run_encode(src, tmp_path / "text", cfg, progress=False)
    assert summary["text_encoded"] == 1 and summary["encoded"] == 2
    # the indexes count the stored embeddings and their widths: the manifest's 4096, the tiny encoder's 64
    widths = {f: json.loads((tmp_path / f / "index.json").read_text())["statistics"]["text_embeddings"]
              for f in ("shards", "plain", "text")}
    assert widths == {"shards": {"samples": 1, "widths": [4096]}, "plain": {"samples": 1, "widths": [4096]},
                      "text": {"samples": 2, "widths": [64, 4096]}}
    for folder, expect in (("plain", [1, 0]), ("text", [1, 1])):
        with tarfile.open(tmp_path / folder / "shard-000000.tar") as tar:
            names = tar.getnames()
            embs = {n: np.load(io.BytesIO(tar.extractfile(n).read())) for n in names if n.endswith(".emb.npy")}
        assert [sum(n.startswith(f"r00000000{i}.") and n.endswith(".emb.npy") for n in names) for i in range(2)] \
            == expect, (folder, names)
        first = next(v for n, v in embs.items() if n.startswith("r000000000."))
        np.testing.assert_array_equal(first, given)
    with pytest.raises(EncodeError, match="other settings"):
        run_encode(src, tmp_path / "text", cfg, progress=False, text=False)
    with pytest.raises(EncodeError, match="needs model.text_encoder"):
        run_encode(src, tmp_path / "x", load_config(CONFIG + ["model.preset=1.3b"]), progress=False)


def test_a_host_text_encoder_warns_at_powers_of_ten_and_caches_recent_captions(caplog):
    text = _trainer_text(load_config(CONFIG))
    text.slow_encode_warning = "caption encoded in host memory"
    stored = text.encoder.encode_rows(["a cat"])[0]
    with caplog.at_level("WARNING"):
        text(["a dog"], [stored])  # stored: no encode, no warning
        assert text.encoded_captions == 0 and not caplog.records
        text(["a cat", "a dog"], [None, None])
        text(["a cat"], [None])
        for i in range(8):
            text([f"the car {'moves ' * i}"], None)
    assert text.encoded_captions == 11
    assert [r.getMessage() for r in caplog.records] == ["caption encoded in host memory: 2 so far",
                                                        "caption encoded in host memory: 10 so far"]
    # with a cache (an encoder in host memory), a caption seen again is not encoded again, and gives the same rows
    text.cache_size = 2
    first = text(["a dog runs"], None)
    again = text(["a dog runs", "a cat"], [None, stored])
    assert text.encoded_captions == 12 and torch.equal(again[0], first[0])
    torch.testing.assert_close(again[1], text(["a cat"], None)[0])
    text(["a car"], None), text(["the dog"], None)  # the cache keeps the last 2
    assert list(text._cache) == ["a car", "the dog"]


def test_a_batch_with_and_without_stored_text_embeddings(encoded):
    """Samples with and without emb.npy in one batch (an empty caption gets none): each keeps what it has."""
    from data_pipeline.loader import collate
    from one4d_train.model.text_encoder import batch_text_embeddings

    _, out = encoded
    text = _trainer_text(load_config(CONFIG))
    loader = build_loader(_cfg(out), rank=0, world_size=1, seed=3, micro_batch_size=1, latents=SPEC)
    a, b = [{k: (v[0] if isinstance(v, (torch.Tensor, list)) else v) for k, v in batch.items()}
            for batch in _take(loader, 2)]
    b.pop("text_emb")
    for samples in ([a, b], [b, a]):
        batch = collate(samples)
        embs = batch_text_embeddings(batch)
        have = [s.get("text_emb") for s in samples]
        assert [e is None for e in embs] == [h is None for h in have]
        for e, h in zip(embs, have):
            assert h is None or torch.equal(e, h)
        got = text(batch["caption"], embs)
        torch.testing.assert_close(got, text(batch["caption"]), rtol=2 ** -10, atol=1e-4)
    assert batch_text_embeddings(collate([b, dict(b)])) is None


def test_encode_folder_of_the_textless_version_is_finished_with_no_text(tmp_path):
    src = make_shards(tmp_path, num_clips=2, frames=9, height=32, width=64, samples_per_shard=1)
    cfg = load_config(CONFIG)
    out = tmp_path / "old"
    run_encode(src, out, cfg, progress=False, text=False)
    plan = json.loads((out / "plan.json").read_text())
    plan.pop("text_encoder")
    (out / "plan.json").write_text(json.dumps({**plan, "version": 1}))  # as the earlier encode-latents wrote it
    (out / "index.json").unlink()
    next(out.glob("*.record.json")).unlink()  # one shard still to do
    with pytest.raises(EncodeError, match="started without text embeddings .* --no-text"):
        run_encode(src, out, cfg, progress=False)
    summary = run_encode(src, out, cfg, progress=False, text=False)
    assert summary["written"] == 1 and summary["text_encoded"] == 0 and summary["index"]


def test_a_caption_embedding_that_cannot_be_stored_leaves_the_latents(tmp_path, monkeypatch):
    import data_pipeline.latents_cli as cli
    from data_pipeline.decode import SampleError

    src = make_shards(tmp_path, num_clips=2, frames=9, height=32, width=64, samples_per_shard=2)
    real = cli.text_member

    def overflow_first(key, emb):
        if key.endswith("0"):
            raise SampleError("the caption's text embedding has non-finite or float16-overflowing values")
        return real(key, emb)

    monkeypatch.setattr(cli, "text_member", overflow_first)
    summary = run_encode(src, tmp_path / "out", load_config(CONFIG), progress=False)
    assert summary["encoded"] == 2 and summary["text_encoded"] == 1 and not summary["failed"]
    assert [f["key"] for f in summary["text_failed"]] == ["r000000000"]
    members = dict(tar_samples(tmp_path / "out" / "shard-000000.tar"))
    names = {k: [n for n, _ in m] for k, m in members.items()}
    assert "r000000000.latents.npz" in names["r000000000"] and "r000000000.emb.npy" not in names["r000000000"]
    assert "r000000001.emb.npy" in names["r000000001"]


def test_the_recorded_text_encoder_and_vae_match_through_links(tmp_path, monkeypatch):
    """A VAE recorded as typed (`models/vae`, relative) was another VAE to a trainer given the same path, which it
    makes absolute: stored latents could never be trained on. Both identities compare as resolved paths."""
    from data_pipeline.config import DataConfig
    from data_pipeline.latents import LatentsSpec, check_settings, settings

    (tmp_path / "models" / "vae").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    check_settings(settings(DataConfig(), "models/vae", 0.5), DataConfig(),
                   LatentsSpec(str(tmp_path / "models" / "vae"), 0.5), "index.json")
    with pytest.raises(LatentsMismatchError, match="encoded with VAE 'models/vae', the configured VAE is '/elsewhere"):
        check_settings(settings(DataConfig(), "models/vae", 0.5), DataConfig(), LatentsSpec("/elsewhere/vae", 0.5),
                       "index.json")
    # encode-latents now records them absolute: a folder it started with the relative spelling is finished as it is
    from data_pipeline.latents_cli import _same_but_for_path_spellings

    plan = {"settings": {"vae": str(tmp_path / "models" / "vae"), "dtype": "float16"}, "text_encoder": None}
    old = {**plan, "settings": {**plan["settings"], "vae": "models/vae"}}
    assert _same_but_for_path_spellings(old, plan)
    assert not _same_but_for_path_spellings({**old, "settings": {**old["settings"], "dtype": "float32"}}, plan)
    assert not _same_but_for_path_spellings({**old, "settings": {**old["settings"], "vae": "other/vae"}}, plan)
    from data_pipeline.latents import same_source

    (tmp_path / "umt5").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "umt5")
    assert same_source(str(tmp_path / "umt5"), str(tmp_path / "link"))
    assert same_source(str(tmp_path / "umt5"), str(tmp_path / "x" / ".." / "umt5"))
    assert not same_source(str(tmp_path / "umt5"), str(tmp_path / "other"))
    assert same_source("tiny:0", "tiny:0") and not same_source("tiny:0", "tiny:1")
    assert not same_source(None, "tiny:0") and not same_source("/m/umt5", "")


def test_auto_keeps_the_text_encoder_in_host_memory_only_for_shards_that_store_its_embeddings(encoded, tmp_path):
    from one4d_train.config import ConfigError
    from one4d_train.model.encoders import text_encoder_device
    from one4d_train.train.one4d_task import One4DTask

    src, out = encoded
    assert One4DTask(load_config(CONFIG + [f"data.shards={out}"])).stored_text()[0]
    with pytest.raises(ConfigError, match="key 'model.text_encoder'"):  # another tower: refused, never used
        One4DTask(load_config(CONFIG + [f"data.shards={out}", "seed=5"])).stored_text()
    assert not One4DTask(load_config(CONFIG + [f"data.shards={out}", "data.use_latents=false"])).stored_text()[0]
    assert not One4DTask(load_config(CONFIG + [f"data.shards={src}"])).stored_text()[0]  # pixel shards
    assert not One4DTask(load_config(CONFIG + [f"data.shards={tmp_path}/missing"])).stored_text()[0]
    gpu = torch.device("cuda")
    for mode, stored, where in [("auto", True, "cpu"), ("auto", False, "cuda"), ("cpu", False, "cpu"),
                                ("device", True, "cuda")]:
        mcfg = load_config(CONFIG + [f"model.text_encoder_device={mode}"]).model
        assert text_encoder_device(mcfg, gpu, stored).type == where, (mode, stored)


def test_the_stored_empty_prompt_lets_a_host_encoder_load_only_when_needed(encoded, monkeypatch):
    """encode-latents stores the encoder's embedding of "" with the shards; a trainer keeping the encoder in host
    memory starts from it and builds the encoder only at the first caption without a stored embedding (without
    touching training's RNG stream), with the results of an encoder built up front."""
    import one4d_train.model.encoders as enc
    from one4d_train.model.presets import wan_config
    from one4d_train.train.one4d_task import One4DTask

    _, out = encoded
    cfg = load_config(CONFIG + [f"data.shards={out}"])
    eager = _trainer_text(cfg)
    assert read_index(out)["latents"]["empty_prompt"] == "empty_prompt.npy"
    stored = One4DTask(cfg).stored_text()[1]
    torch.testing.assert_close(stored, eager.encoder.encode_rows([""])[0], rtol=0, atol=0)

    # the trainer's build with the encoder in host memory and the model elsewhere (meta stands in for the GPU)
    monkeypatch.setattr(enc, "load_vae", lambda *a, **k: None)
    monkeypatch.setattr(enc, "CLIPImageEncoder", lambda *a, **k: None)
    _, text, _ = enc.build_encoders(cfg.model, wan_config(cfg.model.preset), torch.device("meta"), torch.float32,
                                    cfg.seed, text_stored=True, stored_empty=stored)
    assert text.has_encoder and text._encoder is None and text.slow_encode_warning and text.cache_size
    torch.testing.assert_close(text.empty, eager.empty, rtol=0, atol=0)
    cat = eager.encoder.encode_rows(["a cat"])[0]
    torch.testing.assert_close(text(["a cat", ""], [cat, None]), eager(["a cat", ""], [cat, None]))
    assert text._encoder is None  # stored embeddings and the empty prompt: nothing loaded
    rng = torch.get_rng_state()
    got = text(["a dog runs"], None)
    assert text._encoder is not None and torch.equal(torch.get_rng_state(), rng)
    torch.testing.assert_close(got, eager(["a dog runs"], None), rtol=0, atol=0)
    # on the device itself (not in host memory) the encoder is built up front, as before
    _, on_device, _ = enc.build_encoders(cfg.model, wan_config(cfg.model.preset), torch.device("cpu"), torch.float32,
                                         cfg.seed, text_stored=True, stored_empty=stored)
    assert on_device._encoder is not None and not on_device.slow_encode_warning


def test_the_empty_prompt_is_written_on_a_rerun_and_a_configured_one_wins(tmp_path):
    from one4d_train.model.encoders import build_text
    from one4d_train.model.presets import wan_config
    from one4d_train.model.text_encoder import TextConditioning

    src = make_shards(tmp_path, num_clips=1, frames=9, height=32, width=64, samples_per_shard=1)
    cfg = load_config(CONFIG)
    out = tmp_path / "out"
    run_encode(src, out, cfg, progress=False)
    stored = np.load(out / "empty_prompt.npy")
    (out / "empty_prompt.npy").unlink()  # a folder finished before encode-latents stored it
    (out / ".empty_prompt.npy.tmpx-1").write_bytes(b"partial")
    assert run_encode(src, out, cfg, progress=False)["written"] == 0
    np.testing.assert_array_equal(np.load(out / "empty_prompt.npy"), stored)
    assert read_index(out)["latents"]["empty_prompt"] == "empty_prompt.npy" and not list(out.glob(".empty_prompt*"))

    configured = np.full((3, 4096), 0.5, dtype=np.float32)
    np.save(tmp_path / "mine.npy", configured)
    mcfg = load_config(CONFIG + [f"model.empty_prompt_embedding={tmp_path / 'mine.npy'}"]).model
    lazy = build_text(mcfg, wan_config("tiny"), torch.device("cpu"), torch.float32, lazy_empty=torch.from_numpy(stored))
    assert torch.equal(lazy.empty[:3], torch.from_numpy(configured)) and lazy._encoder is None

    wrong = TextConditioning(None, dim=99, empty=torch.zeros(1, 99), load_encoder=lambda: _trainer_text(cfg).encoder)
    for _ in range(2):  # a failed width check leaves no encoder behind
        with pytest.raises(ValueError, match="width 64 != backbone text_dim 99"):
            wrong(["a cat"], None)


def test_a_vae_that_does_not_fit_is_refused_before_anything_is_encoded(tmp_path, capsys):
    """encode-latents reads the model files as `one4d train` does (the DiT's own weights aside): a VAE of 48 latent
    channels (Wan2.2's) failed with a traceback from the first encode; it is refused by key, nothing written."""
    from diffusers import AutoencoderKLWan

    src = make_shards(tmp_path / "src", num_clips=1, frames=9, height=32, width=64, samples_per_shard=1)
    AutoencoderKLWan(base_dim=8, z_dim=48, latents_mean=[0.0] * 48, latents_std=[1.0] * 48).save_pretrained(
        tmp_path / "vae48")
    out = tmp_path / "out"
    assert encode_main([str(src), str(out), *CONFIG, f"model.vae={tmp_path / 'vae48'}", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert f"key 'model.vae': {tmp_path / 'vae48'}: AutoencoderKLWan with 48 latent channels" in err, err
    assert "Traceback" not in err and not out.exists()
    # the 1.3B config's Triton VAE kernel on a CPU: refused by key before the plan is pinned or UMT5 runs
    assert encode_main([str(src), str(out), *CONFIG, "model.vae_conv_kernel=triton", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "key 'model.vae_conv_kernel': triton: the Triton kernel runs on CUDA devices" in err, err
    assert "Traceback" not in err and not out.exists()


def test_videos_per_call_encodes_one_video_at_a_time_to_the_same_latents(encoded, tmp_path, monkeypatch):
    """model.vae_videos_per_call=1 (the 1.3B config: 80 frames per causal call, ~28 GB a video) splits the
    batch's 2 clips x 3 videos into one VAE call per video; the stored latents are the batched run's."""
    from one4d_train.model.vae import WanVAE

    src, batched = encoded
    calls = []
    posterior = WanVAE._posterior
    monkeypatch.setattr(WanVAE, "_posterior", lambda self, x: calls.append(x.shape[0]) or posterior(self, x))
    out = tmp_path / "one"
    assert encode_main([str(src), str(out), *CONFIG, "model.vae_videos_per_call=1", "--device", "cpu", "--batch",
                        "2", "--no-progress"]) == 0
    assert calls == [1] * 12  # 4 clips x (RGB, XYZ, image condition)
    for entry in read_index(out)["shards"]:
        ours, theirs = dict(tar_samples(out / entry["name"])), dict(tar_samples(batched / entry["name"]))
        for key in ours:
            with np.load(io.BytesIO(raw_of(key, ours[key])["latents.npz"])) as a, \
                    np.load(io.BytesIO(raw_of(key, theirs[key])["latents.npz"])) as b:
                for name in ("z_rgb", "z_xyz", "z_image"):
                    np.testing.assert_allclose(a[name].astype(np.float32), b[name].astype(np.float32),
                                               rtol=2 ** -10, atol=1e-4)


def test_encoding_a_latent_folder_again_replaces_its_latents(encoded, tmp_path, capsys):
    """Latent shards keep every source member, so they can be encoded again (another resolution, say): the old
    latents are replaced, not written a second time beside the new (a reader kept one of the two duplicate names
    and skipped every sample as corrupt), and `inspect-shards` names a member a sample repeats."""
    import tarfile

    from data_pipeline.inspect_cli import main as inspect_main

    _, lat = encoded
    again = tmp_path / "again"
    assert encode_main([str(lat), str(again), *CONFIG, "data.height=16", "data.width=32", "--device", "cpu",
                        "--no-progress"]) == 0
    for shard in sorted(again.glob("*.tar")):
        with tarfile.open(shard) as tar:
            names = tar.getnames()
        assert len(names) == len(set(names)) and sum(n.endswith(".latents.npz") for n in names) == 2, names
    assert inspect_main([str(again)]) == 0
    batch = _take(build_loader(_cfg(again, height=16, width=32), rank=0, world_size=1, seed=0, micro_batch_size=1,
                               latents=SPEC), 1)[0]
    assert batch["z_rgb"].shape[-2:] == (2, 4)
    # a shard holding a repeated member (what the encode wrote before)
    shard = again / "shard-000000.tar"
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(shard, "w", format=tarfile.GNU_FORMAT) as tar:
        for m, data in members + [members[0]]:
            tar.addfile(m, io.BytesIO(data))
    capsys.readouterr()
    assert inspect_main([str(again)]) != 0
    key, ext = members[0][0].name.split(".", 1)
    assert f"shard-000000.tar: {key}: member {ext} repeated" in capsys.readouterr().err
    # with another text encoder: the kept caption embeddings are the first run's encoder's, recorded as this one's
    assert encode_main([str(lat), str(tmp_path / "other"), *CONFIG, "seed=1", "--device", "cpu", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert f"{lat} is one4d encode-latents' output, whose stored caption embeddings are text encoder tiny:0's, not " \
           f"this run's (tiny:1)" in err and not (tmp_path / "other").exists(), err


@pytest.mark.parametrize("device, cuda_devices, message", [
    ("cuda", 0, "--device cuda: no CUDA device is available"),
    ("cuda:0", 0, "--device cuda:0: no CUDA device is available"),
    ("cuda:1", 1, "--device cuda:1: this machine has 1 CUDA device (cuda:0)"),
    ("gpu", 1, "--device gpu: expected cpu, cuda or cuda:N"),
    ("meta", 0, "--device meta: expected cpu, cuda or cuda:N"),
])
def test_an_unusable_device_is_refused_before_anything_is_written(tmp_path, capsys, monkeypatch, device,
                                                                   cuda_devices, message):
    """--device cuda without a CUDA device was a traceback (exit 1) after plan.json had pinned the device, so a
    retry on the CPU was refused; an invalid name was a traceback from torch. Both are usage errors now: one line
    naming --device, exit 2, nothing written."""
    src = make_shards(tmp_path, num_clips=1, frames=9, height=32, width=64, samples_per_shard=1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda_devices > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: cuda_devices)
    out = tmp_path / "lat"
    assert encode_main([str(src), str(out), *CONFIG, "--device", device, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"one4d encode-latents: error: {message}" in err, err
    assert len([line for line in err.splitlines() if "--device" in line]) == 1, err
    assert not out.exists()


def test_a_batch_or_task_index_out_of_range_is_a_usage_error(tmp_path, capsys):
    """Exit 2 as the other options that cannot be honoured, not 1 (a run that failed)."""
    src = make_shards(tmp_path, num_clips=1, frames=9, height=32, width=64, samples_per_shard=1)
    out = tmp_path / "lat"
    for opts in (["--batch", "0"], ["--num-tasks", "2", "--task-index", "2"]):
        assert encode_main([str(src), str(out), *CONFIG, "--device", "cpu", *opts]) == 2, opts
        assert capsys.readouterr().err.startswith(f"one4d encode-latents: error: {opts[0]}")
    # folders that cannot be right (exit 1, or accepted: latent shards written among their source's)
    for args, said in (([src, src], "OUT_DIR must differ from SRC_SHARDS"),
                       ([src, src / "sub"], f"OUT_DIR {src / 'sub'} is inside SRC_SHARDS {src}"),
                       ([tmp_path / "nowhere", out], f"SRC_SHARDS {tmp_path / 'nowhere'}: no index.json")):
        assert encode_main([*map(str, args), *CONFIG, "--device", "cpu", "--no-progress"]) == 2, args
        assert f"one4d encode-latents: error: {said}" in capsys.readouterr().err
    assert not (src / "sub").exists()
    assert not out.exists()

def test_running_out_of_memory_names_the_settings_to_lower(tmp_path, monkeypatch):
    """An out-of-memory VAE call came out as a traceback, and a re-run with the same settings ran out again: it is
    an error naming the call's settings and what takes less, and whether the folder's plan still lets them change."""
    import data_pipeline.latents_cli as cli_mod

    src = make_shards(tmp_path, num_clips=2, frames=9, height=32, width=64, samples_per_shard=1)
    out = tmp_path / "lat"
    calls = []

    def encode_batch(*a):
        calls.append(1)
        if len(calls) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 28.00 GiB")
        return real(*a)

    real = cli_mod.encode_batch
    monkeypatch.setattr(cli_mod, "encode_batch", encode_batch)
    with pytest.raises(EncodeError) as exc:
        run_encode(src, out, load_config(CONFIG), progress=False, text=False)
    msg = str(exc.value)
    assert "shard-000001.tar: out of host memory in a VAE call of 1 clip(s) x 3 videos" in msg, msg
    assert "model.vae_videos_per_call=0 at a time" in msg and "Tried to allocate 28.00 GiB" in msg, msg
    assert "holds 1 finished shard(s): use a new output folder" in msg, msg


def test_a_refused_plan_names_the_keys_that_differ(tmp_path):
    """The refusal named no difference: it printed the whole recorded plan."""
    src = make_shards(tmp_path, num_clips=1, frames=9, height=32, width=64, samples_per_shard=1)
    out = tmp_path / "lat"
    run_encode(src, out, load_config(CONFIG), progress=False)
    with pytest.raises(EncodeError) as exc:
        run_encode(src, out, load_config(CONFIG + ["data.height=64", "model.vae_videos_per_call=1"]), batch=2,
                   progress=False, text=False)
    msg = str(exc.value)
    for diff in ("settings.resolution: [32, 48] -> [64, 48]", "compute.batch: 1 -> 2", "text_encoder: tiny:0 -> none",
                 "compute.vae.videos_per_call: 0 -> 1"):  # the VAE's call shapes round the latents as the batch does
        assert diff in msg, msg
    assert "pointmap_percentiles" not in msg and "source_index" not in msg and "use the same options" in msg
    # a plan from before plans recorded the VAE's calls is finished under this run's, not refused
    plan = json.loads((out / "plan.json").read_text())
    del plan["compute"]["vae"]
    (out / "plan.json").write_text(json.dumps(plan))
    assert run_encode(src, out, load_config(CONFIG), progress=False)["skipped"] == 1


def _plan_of_another_device(out):
    """plan.json as a run with --device cuda wrote it before failing to use the device."""
    plan = json.loads((out / "plan.json").read_text())
    plan["compute"].update(device="cuda", dtype="bfloat16")
    (out / "plan.json").write_text(json.dumps(plan))


def test_a_plan_with_nothing_encoded_under_it_gives_way_to_other_settings(tmp_path):
    """A plan keeps latents of other settings from being mixed in one folder. A folder where nothing was encoded
    under it (no shard, record or index; no temp file of a writer that may still run) mixes nothing when its plan
    is replaced, so a retry with other options goes ahead instead of being refused; the output is that of a run
    into a new folder (the old plan's empty-prompt embedding is not kept). A folder holding a finished shard, or
    one being written, is still refused."""
    import socket
    import subprocess

    src = make_shards(tmp_path, num_clips=2, frames=9, height=32, width=64, samples_per_shard=1)
    cfg = load_config(CONFIG)
    ref = tmp_path / "ref"
    run_encode(src, ref, cfg, progress=False, text=False)
    names = ["index.json", "rejects.jsonl", "plan.json"] + [s["name"] for s in read_index(ref)["shards"]]

    out = tmp_path / "lat"
    out.mkdir()
    (out / "plan.json").write_bytes((ref / "plan.json").read_bytes())
    _plan_of_another_device(out)
    (out / "empty_prompt.npy").write_bytes(b"the other plan's")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (out / f".shard-000000.tar.tmp{socket.gethostname()}-{dead.stdout.strip()}").write_bytes(b"killed")
    summary = run_encode(src, out, cfg, progress=False, text=False)
    assert summary["written"] == 2 and summary["index"]
    assert summary["replaced_plan"] == ["compute.device: cuda -> cpu", "compute.dtype: bfloat16 -> float32"]
    for name in names:
        assert (out / name).read_bytes() == (ref / name).read_bytes(), name
    assert not list(out.glob(".*tmp*")) and not (out / "empty_prompt.npy").exists()

    # one finished shard of the other plan: its latents would be mixed with this run's
    next(out.glob("*.record.json")).unlink()
    (out / "index.json").unlink()
    _plan_of_another_device(out)
    with pytest.raises(EncodeError, match=r"compute.device: cuda -> cpu; compute.dtype: bfloat16 -> float32\).*"
                                          r"holds shard-00000\d.tar.record.json"):
        run_encode(src, out, cfg, progress=False, text=False)
    # a shard being written by a run that may still be going (elsewhere: its host is another)
    for p in [*out.glob("*.record.json"), *out.glob("*.tar")]:
        p.unlink()
    (out / ".shard-000001.tar.tmpanother-host-12").write_bytes(b"")
    with pytest.raises(EncodeError, match=r"holds \.shard-000001\.tar\.tmpanother-host-12"):
        run_encode(src, out, cfg, progress=False, text=False)


def test_a_run_whose_plan_was_replaced_publishes_nothing(tmp_path, monkeypatch):
    """A run that pinned its plan and was still loading its models when a run with other options replaced the plan
    (the folder held nothing encoded yet) must not publish shards under the old settings beside the new run's."""
    import one4d_train.model.vae as vae_module

    src = make_shards(tmp_path, num_clips=1, frames=9, height=32, width=64, samples_per_shard=1)
    out = tmp_path / "lat"
    real = vae_module.load_vae

    def replaced_meanwhile(*args, **kw):
        _plan_of_another_device(out)
        return real(*args, **kw)

    monkeypatch.setattr(vae_module, "load_vae", replaced_meanwhile)
    with pytest.raises(EncodeError, match=r"plan.json was replaced by a run with other settings .*compute.device: "
                                          r"cpu -> cuda"):
        run_encode(src, out, load_config(CONFIG), progress=False)
    assert not list(out.glob("*.tar*")) and not list(out.glob(".*tmp*")) and not (out / "index.json").exists()


HOLD = ("import sys, time; from pathlib import Path; from data_pipeline.shard import lock_out_dir; "
        "lock = lock_out_dir(Path(sys.argv[1]), None, command='encode-latents'); print('held', flush=True); "
        "time.sleep(600)")


def test_a_second_run_into_a_folder_in_use_is_refused_naming_the_first(tmp_path, capsys):
    """A second encode-latents into a folder in use deleted the first one's temporary files of the same shards
    (each run clears its shards' stale ones) and could pin another plan under it: refused, naming the first, before
    anything is written; the tasks of one array share the folder."""
    import subprocess

    from launch_utils import _env

    src = make_shards(tmp_path, num_clips=2, frames=9, height=32, width=64, samples_per_shard=1)
    out = tmp_path / "out"
    out.mkdir()
    first = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                             text=True)
    try:
        assert first.stdout.readline().strip() == "held"
        assert encode_main([str(src), str(out), *CONFIG, "--device", "cpu", "--no-progress"]) == 1
        err = capsys.readouterr().err
        assert f"{out} is in use by pid {first.pid} on " in err and f"delete {out / 'encode-latents.lock'}" in err
        assert not (out / "plan.json").exists()
        assert encode_main([str(src), str(out), *CONFIG, "--device", "cpu", "--no-progress", "--num-tasks", "2",
                            "--task-index", "0"]) == 1
        assert f"{out} is in use by a run over every shard (pid {first.pid} on " in capsys.readouterr().err
    finally:
        first.kill()
        first.wait()
    assert encode_main([str(src), str(out), *CONFIG, "--device", "cpu", "--no-progress"]) == 0


def test_an_output_folder_with_other_content_is_refused(tmp_path, capsys):
    """A non-empty OUT_DIR that holds no plan of encode-latents was written over without a word: a foreign
    index.json and shard-000001.tar replaced, notes.txt mixed in; OUT_DIR = the source's parent overwrote the index
    beside it. Refused as `one4d shard` refuses one, naming what it holds; a shard folder of `one4d shard` is named as
    such (it was 'latents from another source index', with every plan key)."""
    src = make_shards(tmp_path / "data", num_clips=1, frames=9, height=32, width=64, samples_per_shard=1)
    out = tmp_path / "out"
    out.mkdir()
    theirs = {"index.json": b"{}", "notes.txt": b"mine", "shard-000001.tar": b"not yours"}
    for name, data in theirs.items():
        (out / name).write_bytes(data)
    assert encode_main([str(src), str(out), *CONFIG, "--device", "cpu", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err == (f"one4d encode-latents: error: {out}: not empty (it holds index.json, notes.txt, shard-000001.tar, "
                   "and no plan.json of an earlier `one4d encode-latents` into it: the latent shards, index.json and "
                   "rejects.jsonl would overwrite its files or mix with them): OUT_DIR must be a new or empty folder, "
                   "or one `one4d encode-latents` wrote into\n"), err
    assert sorted(p.name for p in out.iterdir()) == sorted(theirs)
    assert all((out / name).read_bytes() == data for name, data in theirs.items())
    index = (src / "index.json").read_bytes()
    assert encode_main([str(src), str(tmp_path / "data"), *CONFIG, "--device", "cpu", "--no-progress"]) == 1
    assert f"{tmp_path / 'data'}: not empty (it holds raw, shards, and no plan.json" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["raw", "shards"]
    assert (src / "index.json").read_bytes() == index
    # a shard folder of `one4d shard`
    other = make_shards(tmp_path / "other", num_clips=1, frames=9, height=32, width=64, samples_per_shard=1)
    index = (other / "index.json").read_bytes()
    assert encode_main([str(src), str(other), *CONFIG, "--device", "cpu", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"one4d encode-latents: error: {other}: a shard folder made by `one4d shard` (its plan.json "
                          "plans shards from a manifest), not an output of `one4d encode-latents`"), err
    assert "another source index" not in err and "manifest_sha256" not in err and len(err.splitlines()) == 1
    assert (other / "index.json").read_bytes() == index and not (other / "encode-latents.lock").exists()


def test_shards_of_another_text_encoder_are_refused_before_the_start(encoded, tmp_path):
    """Caption embeddings stored by encode-latents with one text encoder were used by a run configured with another
    (a warning, and none with data.use_latents=false): captioned samples conditioned on encoder A, the empty prompt
    and the captions stored without an embedding on encoder B. Refused by key, with or without the latents."""
    from one4d_train.config import ConfigError
    from one4d_train.model.text_encoder import tiny_tokenizer, tiny_umt5
    from one4d_train.train.config import preflight
    from one4d_train.train.one4d_task import One4DTask

    _, out = encoded
    run = [f"data.shards={out}", f"run_dir={tmp_path / 'run'}"]
    assert load_config(CONFIG + run, checks=preflight).data.shards == str(out)
    tiny_umt5(0, d_model=64).save_pretrained(tmp_path / "umt5")
    tiny_tokenizer().save_pretrained(tmp_path / "umt5")
    for other, ours, fix in (([f"model.text_encoder={tmp_path / 'umt5'}"], str(tmp_path / "umt5"),
                              "set seed=0 with model.text_encoder empty"),
                             (["seed=5", "data.use_latents=false"], "the tiny preset's random text tower of seed 5",
                              "set seed=0 with model.text_encoder empty")):
        with pytest.raises(ConfigError) as exc:
            load_config(CONFIG + run + other, checks=preflight)
        assert (f"key 'model.text_encoder': {ours} here, but the caption embeddings stored in {out} were made by the "
                "tiny preset's random text tower of seed 0 (index.json latents.text_encoder): its captioned samples "
                f"would be conditioned on that encoder and the empty prompt on this one; {fix}, or re-run `one4d "
                "encode-latents` with this model.text_encoder") in str(exc.value), str(exc.value)
    with pytest.raises(ConfigError, match="key 'model.text_encoder': the tiny preset's random text tower of seed 5"):
        One4DTask(load_config(CONFIG + run + ["seed=5"])).stored_text()  # a task built without the checks


def test_the_vae_of_stored_latents_is_known_by_its_content(tmp_path):
    """The VAE was known by its path: other weights at the same path were taken for it, and a byte-identical copy at
    another path (a node-local copy) was refused. The latents record its content fingerprint, compared where both
    have one; latents recorded before fingerprints are still compared by path."""
    import shutil

    from data_pipeline.latents import check_settings, settings
    from one4d_train.model.state_dict import vae_fingerprint
    from one4d_train.model.vae import tiny_wan_vae

    src = make_shards(tmp_path, num_clips=2, frames=9, height=32, width=64, samples_per_shard=2)
    vae, copy = tmp_path / "vae", tmp_path / "node-local" / "vae"
    tiny_wan_vae(0).save_pretrained(vae)
    shutil.copytree(vae, copy)

    def cfg(path):
        return load_config(CONFIG + [f"model.vae={path}"])

    out = tmp_path / "lat"
    run_encode(src, out, cfg(vae), progress=False)
    meta = read_index(out)["latents"]
    assert meta["vae"] == str(vae) and meta["vae_fingerprint"] == vae_fingerprint(str(vae)) == vae_fingerprint(str(copy))
    kw = dict(rank=0, world_size=1, seed=0, micro_batch_size=1)
    assert _take(build_loader(_cfg(out), latents=latents_spec(cfg(copy)), **kw), 1)[0]["z_rgb"].shape[1] == 16
    assert run_encode(src, out, cfg(copy), progress=False)["skipped"] == 1  # the folder is finished with the copy
    # a folder started before plans recorded the fingerprint is finished as it was started: by path
    older = tmp_path / "older"
    shutil.copytree(out, older)
    plan = json.loads((older / "plan.json").read_text())
    del plan["settings"]["vae_fingerprint"]
    (older / "plan.json").write_text(json.dumps(plan))
    (older / "index.json").unlink()
    (older / "shard-000000.tar.record.json").unlink()
    assert run_encode(src, older, cfg(vae), progress=False)["written"] == 1
    assert "vae_fingerprint" not in read_index(older)["latents"]
    tiny_wan_vae(1).save_pretrained(vae)  # other weights at the same path
    with pytest.raises(LatentsMismatchError, match=rf"encoded with VAE '{vae}', the configured VAE is '{vae}' \(other "
                                                   r"weights: content fingerprint \w+ when encoded, \w+ now\)"):
        build_loader(_cfg(out), latents=latents_spec(cfg(vae)), **kw)
    # latents recorded before fingerprints: by path
    before = settings(DataConfig(), str(vae), 1.0)
    check_settings(before, DataConfig(), LatentsSpec(str(vae), 1.0, vae_fingerprint(str(vae))), "index.json")
    with pytest.raises(LatentsMismatchError, match=f"the configured VAE is '{copy}'"):
        check_settings(before, DataConfig(), LatentsSpec(str(copy), 1.0, vae_fingerprint(str(copy))), "index.json")


def test_a_real_preset_without_its_vae_or_with_a_vae_folder_without_weights_is_refused(tmp_path, capsys):
    """A 1.3b/14b preset with no model.vae was encoded with the tiny random VAE (exit 0; train refused the shards
    later); a VAE folder without its weights file was a traceback after plan.json and the empty prompt were written.
    Both are config errors by key before anything is written, as train and eval check them."""
    from one4d_train.model.vae import tiny_wan_vae

    src = make_shards(tmp_path, num_clips=1, frames=9, height=32, width=64, samples_per_shard=1)
    out = tmp_path / "out"
    assert encode_main([str(src), str(out), *CONFIG, "model.preset=1.3b", "--no-text", "--device", "cpu",
                        "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "key 'model.vae': preset '1.3b' needs local files: set it" in err and "model.checkpoint" not in err, err
    assert "Traceback" not in err and not out.exists()
    tiny_wan_vae(0).save_pretrained(tmp_path / "vae")
    (tmp_path / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    assert encode_main([str(src), str(out), *CONFIG, f"model.vae={tmp_path / 'vae'}", "--device", "cpu",
                        "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert (f"key 'model.vae': {tmp_path / 'vae'}: no weights file (diffusion_pytorch_model.safetensors or "
            "diffusion_pytorch_model.bin) beside its config.json") in err, err
    assert "Traceback" not in err and not out.exists()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_FSIZE and SIGXFSZ")
def test_a_shard_that_cannot_be_written_is_named_and_leaves_no_temp_file(tmp_path):
    """A full disk was '[Errno 28] No space left on device', naming nothing, with the shard's temp file left behind.
    The write fails here by a file-size limit of 20 kB set in a child process (EFBIG, as the disk's ENOSPC, from the
    same write): the plan and the empty prompt fit, the shard does not."""
    import subprocess

    src = make_shards(tmp_path, num_clips=1, frames=9, height=32, width=64, samples_per_shard=1)
    out = tmp_path / "out"
    script = ("import resource, signal, sys\n"
              "from data_pipeline.latents_cli import main\n"
              "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
              "resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), int(sys.argv[1])))\n"
              "sys.exit(main(sys.argv[2:]))\n")

    def encode(limit: int):
        done = subprocess.run([sys.executable, "-c", script, str(limit), str(src), str(out), *CONFIG, "--device",
                               "cpu", "--no-progress"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert done.returncode == 1, done.stderr[-2000:]
        return done.stderr

    err = encode(20000)
    assert re.fullmatch(rf"one4d encode-latents: error: {re.escape(str(out / 'shard-000000.tar'))}: cannot write the "
                        rf"shard: File too large \(\d+\.\d MiB free in {re.escape(str(out))}\): make room \(or write "
                        r"into another folder\) and re-run the same command; finished shards are kept\n", err), err
    assert sorted(p.name for p in out.iterdir()) == ["empty_prompt.npy", "encode-latents.lock", "plan.json"]
    # the index of a finished folder (a file whose error names none): the folder is named
    run_encode(src, out, load_config(CONFIG), progress=False)
    (out / "index.json").unlink()
    err = encode(1000)
    assert re.fullmatch(rf"one4d encode-latents: error: {re.escape(str(out))}: cannot be written: File too large "
                        rf"\(\d+\.\d MiB free in {re.escape(str(out))}\): make room \(or write into another folder\) "
                        r"and re-run the same command; finished shards are kept\n", err), err
    assert not (out / "index.json").exists() and not list(out.glob(".*tmp*"))


def test_a_latents_mismatch_found_by_a_worker_is_one_line(encoded, capsys):
    """A sample's latents that do not fit the run, met in a DataLoader worker, ended `one4d train` in the worker's
    traceback inside the main process's; its message is printed as one line, as NoUsableSamples', exit 1."""
    from torch.utils.data import DataLoader

    from one4d_train.train.main import report_failure

    _, out = encoded
    stream = ShardStream(StreamPlan(tuple(list_shards(str(out))), seed=0, rank=0, world_size=1, workers=1), _cfg(out),
                         latents=LatentsSpec("/weights/Wan2.1_VAE.pth"), latents_only=True)
    with pytest.raises(LatentsMismatchError) as caught:
        next(iter(DataLoader(stream, batch_size=None, num_workers=1)))
    assert "Traceback" in str(caught.value)  # the worker's, in the message
    assert report_failure(caught.value, None) == 1
    err = capsys.readouterr().err
    assert re.match(r"data error: shard=shard-00000\d\.tar key=r00000000\d: stored latents do not fit this run: "
                    r"encoded with VAE 'tiny:0', the configured VAE is '/weights/Wan2.1_VAE.pth'\. Re-encode with "
                    r"`one4d encode-latents`", err), err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_clips_shorter_than_the_window_are_counted_as_short_in_latent_shards(tmp_path, capsys):
    """A sample encode-latents could not encode for being shorter than the window was counted as a corrupt sample
    when training on latents; it is counted as short, as in pixel shards. encode-latents notes the clips longer than
    the window: only the window's frames are encoded, with the centre crop."""
    from data_utils import make_shards_of_lengths

    src = make_shards_of_lengths(tmp_path, (13, 5, 9, 5))
    out = tmp_path / "lat"
    assert encode_main([str(src), str(out), *CONFIG, "--device", "cpu", "--no-progress"]) == 0
    said = capsys.readouterr().out
    assert ("note: 1 of 4 clips are longer than the window of 9 frames (data.num_frames x data.frame_stride): their "
            "latents hold frames 0 to 8 only, centre-cropped") in said and "data.crop=random" in said, said
    loader = build_loader(_cfg(out), rank=0, world_size=1, seed=0, micro_batch_size=1, latents=SPEC)
    assert sorted({b["__key__"][0] for b in _take(loader, 4)}) == ["r000000000", "r000000002"]
    assert loader.samples_too_short == loader.samples_skipped >= 2


def test_training_on_an_unfinished_encode_folder_says_so(encoded, tmp_path):
    """It said the folder 'is no shard directory: shards are made from a manifest by `one4d shard`'."""
    import shutil

    from one4d_train.config import ConfigError
    from one4d_train.train.config import preflight

    _, out = encoded
    unfinished = tmp_path / "unfinished"
    shutil.copytree(out, unfinished)
    (unfinished / "index.json").unlink()
    with pytest.raises(ConfigError) as exc:
        load_config(CONFIG + [f"data.shards={unfinished}", f"run_dir={tmp_path / 'run'}"], checks=preflight)
    assert (f"key 'data.shards': {unfinished / 'index.json'}: not found: {unfinished} is the output folder of a "
            "`one4d encode-latents` run that has not finished (its plan.json is there; index.json comes once every "
            "shard is done): re-run the same command") in str(exc.value), str(exc.value)
    assert "one4d shard MANIFEST" not in str(exc.value)
    src, _ = encoded
    sharding = tmp_path / "sharding"
    shutil.copytree(src, sharding)
    (sharding / "index.json").unlink()
    with pytest.raises(ConfigError, match=rf"{sharding} is the output folder of a `one4d shard` run that has not "
                                          rf"finished .*then `one4d shard --merge {sharding}`"):
        load_config(CONFIG + [f"data.shards={sharding}", f"run_dir={tmp_path / 'run'}"], checks=preflight)


def test_a_source_of_no_sample_is_refused(tmp_path, capsys):
    """Shards whose rows were all rejected: encode-latents exited 0 with '0 samples encoded'."""
    from data_pipeline.shard import run_sharding
    from data_utils import make_dataset

    manifest = make_dataset(tmp_path, num_clips=2, frames=9, height=32, width=64)
    rows = [{**json.loads(line), "video": "missing.mp4"} for line in manifest.read_text().splitlines()]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    src = tmp_path / "shards"
    run_sharding(manifest, src, samples_per_shard=1, workers=1, progress=False)
    assert read_index(src)["totals"]["samples"] == 0
    out = tmp_path / "lat"
    assert encode_main([str(src), str(out), *CONFIG, "--device", "cpu", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"one4d encode-latents: error: SRC_SHARDS {src} holds no sample ({src / 'index.json'}: ")
    assert f"`one4d shard` rejected all 2 rows of its manifest, each listed with its reason in {src / 'rejects.jsonl'}" \
        in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_a_copy_of_the_recorded_text_encoder_at_another_path_is_the_same_encoder(tmp_path):
    """Stored caption embeddings name the text encoder that made them by its path; a node-local copy of it (11 GB of
    UMT5 copied to local disk) is the same encoder, known by its files' content; other weights are not."""
    import shutil

    from data_pipeline.latents import same_source

    shared = tmp_path / "shared" / "umt5"
    shared.mkdir(parents=True)
    (shared / "config.json").write_text('{"d_model": 4096}')
    (shared / "model.safetensors").write_bytes(os.urandom(300_000))
    local = tmp_path / "local" / "umt5"
    shutil.copytree(shared, local)
    assert same_source(str(shared), str(local)) and same_source(str(shared), str(shared / ".." / "umt5"))
    data = bytearray((local / "model.safetensors").read_bytes())
    data[0] ^= 1
    (local / "model.safetensors").write_bytes(bytes(data))
    assert not same_source(str(shared), str(local))
    assert not same_source(str(shared), str(tmp_path / "gone")) and not same_source("tiny:0", str(shared))


def test_an_array_task_starting_as_another_writes_its_plan_does_not_take_the_folder_for_foreign(tmp_path,
                                                                                                 monkeypatch):
    """Two tasks of one array start side by side. The second looked for plan.json, found none, then listed the
    folder after the first had written plan.json and its empty prompt: it refused them as foreign files and failed
    (seen in CI as a task of `slurm/encode_latents.sbatch` exiting 1). Here the first task's files appear between
    the second's look for plan.json and whatever it does next."""
    from data_pipeline import shard_index as si

    out = tmp_path / "out"
    out.mkdir()
    (out / "encode-latents.lock").touch()
    (out / "encode-latents.task-0.lock").touch()
    is_file, appeared = Path.is_file, []

    def first_task_writes(path):
        found = is_file(path)
        if path == out / "plan.json" and not appeared:  # the other task's plan, then its first files
            appeared.append(path)
            (out / "plan.json").write_text("{}")
            (out / "empty_prompt.npy").write_bytes(b"rows")
        return found

    monkeypatch.setattr(Path, "is_file", first_task_writes)
    assert si.foreign_files_problem(out, "one4d encode-latents", "encode-latents", "the latent shards") is None
    assert appeared
    monkeypatch.undo()
    # what it refuses still: files with no plan.json, beside the locks and the plan's temp file
    (out / "plan.json").unlink()
    (out / f".plan.json.tmp{socket.gethostname()}-1").touch()
    assert si.foreign_files_problem(out, "one4d encode-latents", "encode-latents", "the latent shards").startswith(
        f"{out}: not empty (it holds empty_prompt.npy, and no plan.json")


def test_an_array_task_leaves_the_empty_prompt_another_task_is_writing(tmp_path):
    """Each task of an array writes empty_prompt.npy as it starts. A task cleared every temp file of it first, the
    one another task was writing included, whose rename then failed. An array task clears only those whose writer
    cannot be running (this machine's, of a process that is gone); a run over every shard holds the folder alone
    and clears them all (test_the_empty_prompt_is_written_on_a_rerun_and_a_configured_one_wins)."""
    import subprocess

    src = make_shards(tmp_path, num_clips=2, frames=9, height=32, width=64, samples_per_shard=1)
    cfg = load_config(CONFIG)
    out = tmp_path / "out"
    assert run_encode(src, out, cfg, num_tasks=2, task_index=0, progress=False)["written"] == 1
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    task = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])  # the task writing it
    host = socket.gethostname()
    writing = out / f".empty_prompt.npy.tmp{host}-{task.pid}"
    dead = out / f".empty_prompt.npy.tmp{host}-{int(gone.stdout)}"
    elsewhere = out / ".empty_prompt.npy.tmpother-host-7"  # another machine's: whether it runs is unknown
    for path in (writing, dead, elsewhere):
        path.write_bytes(b"partial")
    try:
        summary = run_encode(src, out, cfg, num_tasks=2, task_index=1, progress=False)
    finally:
        task.kill()
        task.wait()
    assert summary["written"] == 1 and summary["index"] == str(out / "index.json")
    assert writing.exists() and elsewhere.exists() and not dead.exists()
    assert np.load(out / "empty_prompt.npy").shape[0] >= 1


def test_an_array_task_finds_the_plan_another_task_of_its_array_replaced_a_moment_before(tmp_path, monkeypatch):
    """An array re-run with other options into a folder where nothing was encoded: every task reads the old plan as
    it starts. The first replaces it and encodes; one that read the old plan before that, and looked at the folder
    after, found the first one's files, took them for latents of the old settings and failed. It now sees that the
    plan is already its own and goes on."""
    from data_pipeline import shard_index as si

    src = make_shards(tmp_path, num_clips=2, frames=9, height=32, width=64, samples_per_shard=1)
    cfg = load_config(CONFIG)
    out = tmp_path / "lat"
    first = run_encode(src, out, cfg, num_tasks=2, task_index=0, progress=False, text=False)
    assert first["written"] == 1 and first["index"] is None
    for p in [*out.glob("*.record.json"), *out.glob("*.tar")]:  # a failed first attempt: nothing encoded under it
        p.unlink()
    _plan_of_another_device(out)
    old = json.loads((out / "plan.json").read_text())
    task0 = run_encode(src, out, cfg, num_tasks=2, task_index=0, progress=False, text=False)
    assert task0["written"] == 1 and task0["replaced_plan"] == ["compute.device: cuda -> cpu",
                                                                 "compute.dtype: bfloat16 -> float32"]
    real = si.pin_plan
    monkeypatch.setattr(si, "pin_plan", lambda out_dir, plan: (real(out_dir, plan), old)[1])  # read before task 0
    task1 = run_encode(src, out, cfg, num_tasks=2, task_index=1, progress=False, text=False)
    assert task1["written"] == 1 and task1["replaced_plan"] == [] and task1["index"] == str(out / "index.json")
    assert read_index(out)["latents"]["encoded"] == 2


def test_a_shards_temp_files_are_its_own_whatever_its_name_holds(tmp_path):
    """A task clears the temp files of its own shards as it starts. Source shard names may hold the glob's [ ] * ?:
    read as a pattern, 'clips[1].tar' named another task's 'clips1.tar' temp file and missed its own."""
    from data_pipeline import shard_index as si

    own, other = tmp_path / ".clips[1].tar.tmphost-1", tmp_path / ".clips1.tar.tmphost-2"
    for path in (own, other, tmp_path / "clips[1].tar"):
        path.write_bytes(b"partial")
    assert si.temp_files(tmp_path, "clips[1].tar") == [own]
    assert si.temp_files(tmp_path, "clips1.tar") == [other]
    assert si.temp_files(tmp_path, "clips*.tar") == []
