import io
import json
import os
import re
import shutil
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from data_pipeline.decode import NpzReader, read_frames, read_valid
from data_pipeline.geometry import depth_to_pointmaps
from data_pipeline.inspect_cli import main as inspect_main
from data_pipeline.manifest import read_manifest
from data_pipeline.shard import ShardingError, _estimated_bytes, merge, npz_bytes, run_sharding
from data_pipeline.shard_cli import main as shard_main
from data_pipeline.shard_index import read_index, sha256_file
from data_pipeline.synthetic import render_clip
from data_pipeline.video import decode_frames
from one4d_train.cli import main as one4d_main
from data_utils import kill_after_first_shard, make_dataset, make_shards, write_rotated_mp4

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("ds"), num_clips=5)


def rows_of(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def read_tar(path):
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar}


def npz(data, member):
    """A geometry member's whole array (one array per frame, docs/data.md), read by the reader's code."""
    return read_frames(NpzReader(data, member), member)


def valid_mask(data, frames, height, width):
    """A valid.npz member's bool mask (bit-packed), read by the reader's code."""
    return read_valid(NpzReader(data, "valid.npz"), frames, height, width)


@pytest.mark.parametrize("geometry", ["depth", "xyz"])
def test_round_trip_members(tmp_path, geometry):
    out = make_shards(tmp_path, num_clips=3, frames=9, height=32, width=64, geometry=geometry, samples_per_shard=2)
    index = read_index(out)
    assert [s["keys"] for s in index["shards"]] == [["r000000000", "r000000001"], ["r000000002"]]
    assert index["totals"] == {"shards": 2, "samples": 3, "bytes": sum(s["bytes"] for s in index["shards"]),
                               "rejected": 0}
    assert index["statistics"]["frames"] == {"total": 27, "min": 9, "max": 9}
    assert index["statistics"]["clip_frames"] == {"9": 3}
    assert index["statistics"]["resolutions"] == {"32x64": 3}
    assert index["statistics"]["text_embeddings"] == {"samples": 0, "widths": []}
    members = {**read_tar(out / "shard-000000.tar"), **read_tar(out / "shard-000001.tar")}
    raw = tmp_path / "raw"
    for n, row in enumerate(rows_of(raw / "manifest.jsonl")):
        key = f"r{n:09d}"
        ref = render_clip(n, 9, 32, 64)
        assert members[f"{key}.mp4"] == (raw / row["video"]).read_bytes()
        assert decode_frames(members[f"{key}.mp4"]).shape == (9, 32, 64, 3)
        valid = valid_mask(members[f"{key}.valid.npz"], 9, 32, 64)
        assert valid.dtype == bool and np.array_equal(valid, ref["valid"])
        meta = json.loads(members[f"{key}.json"])
        assert meta == {"row": n, "id": row["id"], "source": row["video"], "num_frames": 9, "height": 32,
                        "width": 64, "fps": 16.0, "geometry": geometry}
        assert members[f"{key}.txt"].decode() == ref["caption"]
        if geometry == "depth":
            depth = npz(members[f"{key}.depth.npz"], "depth")
            assert depth.dtype == np.float16
            np.testing.assert_allclose(depth[valid], ref["depth"][valid], rtol=2 ** -11, atol=0)
            cam = json.loads(members[f"{key}.cam.json"])
            np.testing.assert_allclose(cam["intrinsics"], np.broadcast_to(ref["intrinsics"], (9, 3, 3)))
            np.testing.assert_allclose(cam["poses_c2w"], ref["poses_c2w"])
            assert f"{key}.xyz.npz" not in members
        else:
            xyz = npz(members[f"{key}.xyz.npz"], "xyz")
            expect = depth_to_pointmaps(ref["depth"], ref["intrinsics"], ref["poses_c2w"])
            assert xyz.dtype == np.float16
            np.testing.assert_allclose(xyz[valid], expect[valid], rtol=2 ** -11, atol=2 ** -14)
            assert f"{key}.cam.json" not in members


def test_float16_storage_error(tmp_path):
    """The numbers quoted in docs/data.md."""
    rel, pm = [], []
    for seed in range(3):
        c = render_clip(seed, 9, 48, 80)
        v = c["valid"]
        d16 = c["depth"].astype(np.float16).astype(np.float32)
        rel.append(np.abs(d16[v] - c["depth"][v]) / c["depth"][v])
        xyz = depth_to_pointmaps(c["depth"], c["intrinsics"], c["poses_c2w"])
        xyz16 = depth_to_pointmaps(d16, c["intrinsics"], c["poses_c2w"])
        pm.append((np.linalg.norm(xyz16 - xyz, axis=-1) / np.linalg.norm(xyz, axis=-1))[v])
    rel, pm = np.concatenate(rel), np.concatenate(pm)
    assert rel.max() <= 2 ** -11 and 1e-5 < rel.mean() < 3e-4
    assert pm.max() <= 2 * 2 ** -11


def bad_rows(raw):
    """Append bad rows to a good manifest; returns {row: expected reason fragment}."""
    good = rows_of(raw / "manifest.jsonl")
    r0 = good[0]
    depth = np.load(raw / r0["depth"], allow_pickle=False)
    np.save(raw / "short.npy", depth[:5])
    nan = depth.copy()
    nan[2, 3, 4] = np.nan
    np.save(raw / "nan.npy", nan)
    (raw / "garbage.mp4").write_bytes(np.random.default_rng(0).bytes(5000))  # fixed: a few random files open as audio
    video = (raw / r0["video"]).read_bytes()
    (raw / "truncated.mp4").write_bytes(video[: len(video) * 2 // 3])
    write_rotated_mp4(raw / "phone.mp4", decode_frames(raw / r0["video"]), 90)
    extra = [
        (dict(r0, video="clips/missing.mp4"), "video file not found"),
        (dict(r0, depth="short.npy"), "does not match the video"),
        (dict(r0, depth="nan.npy"), "non-finite depth at valid pixel (frame 2, y 3, x 4)"),
        (dict(r0, video="garbage.mp4"), "FFmpeg cannot open it"),
        (dict(r0, intrinsics=[[1.0, 0, 0], [0, 1.0, 0]]), "'intrinsics' has shape [2, 3]"),
        (dict(r0, video="truncated.mp4"), "FFmpeg cannot open it"),
        (dict(r0, video="phone.mp4"), "the video carries a display rotation of 90 degrees counter-clockwise"),
        ("{broken json", "not valid JSON"),
        # each aborted the whole run: int()'s digit limit (ValueError) and the parser's recursion limit
        (json.dumps(r0)[:-1] + ', "caption": 1' + "0" * 5000 + "}", "not valid JSON: an integer of 5001 digits"),
        ('{"video": ' + "[" * 100000 + "]" * 100000 + "}", "not valid JSON: nested too deeply"),
        (dict(r0, video="clips"), "video file is a folder, not a file"),
    ]
    lines = [json.dumps(r) for r in good] + [e if isinstance(e, str) else json.dumps(e) for e, _ in extra]
    (raw / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return {len(good) + i: reason for i, (_, reason) in enumerate(extra)}


def test_bad_rows_are_rejected_with_reasons(tmp_path, capsys):
    manifest = make_dataset(tmp_path, num_clips=3)
    expected = bad_rows(tmp_path / "raw")
    out = tmp_path / "shards"
    assert shard_main([str(manifest), str(out), "--samples-per-shard", "3", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    index = read_index(out)
    assert [k for s in index["shards"] for k in s["keys"]] == ["r000000000", "r000000001", "r000000002"]
    rejects = {r["row"]: r for r in index["rejects"]}
    assert set(rejects) == set(expected)
    for row, reason in expected.items():
        assert reason in rejects[row]["reason"], (row, rejects[row])
        assert f"rejected row {row} " in printed
    assert rejects[3]["path"].endswith("missing.mp4") and rejects[6]["path"].endswith("garbage.mp4")
    assert rejects[5]["path"].endswith("nan.npy")
    assert [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()] == index["rejects"]
    assert "ffmpeg -i IN.mp4 -c:v libx264 -crf 18 OUT.mp4" in rejects[9]["reason"]
    assert "missing" in rejects[3] and "missing" not in rejects[13]  # a re-run retries a missing file, not a folder
    assert index["totals"]["rejected"] == 11 and index["totals"]["samples"] == 3


def test_killed_run_resumes_to_the_identical_index(tmp_path, manifest):
    many = tmp_path / "many.jsonl"
    rows = rows_of(manifest) * 8  # 40 rows: long enough to kill mid-run
    base = manifest.parent
    many.write_text("".join(json.dumps(dict(r, video=str(base / r["video"]), depth=str(base / r["depth"]),
                                             poses=str(base / r["poses"]), valid=str(base / r["valid"]))) + "\n"
                            for r in rows))
    ref = tmp_path / "ref"
    run_sharding(many, ref, samples_per_shard=1, progress=False)

    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "one4d_train.cli", "shard", str(many), str(out), "--samples-per-shard", "1"]
    done = kill_after_first_shard(cmd, out, ROOT, timeout=60)
    assert not (out / "index.json").exists() and 1 <= done < 40, f"kill landed after {done} shards"

    summary = run_sharding(many, out, samples_per_shard=1, progress=False)
    assert summary["skipped"] >= done and summary["written"] == 40 - summary["skipped"]
    assert (out / "index.json").read_bytes() == (ref / "index.json").read_bytes()
    assert not list(out.glob(".*tmp*"))
    for s in read_index(ref)["shards"]:
        assert (out / s["name"]).read_bytes() == (ref / s["name"]).read_bytes()


def test_rerun_skips_finished_shards_and_rewrites_tampered_ones(tmp_path, manifest):
    out = tmp_path / "out"
    first = run_sharding(manifest, out, samples_per_shard=2, progress=False)
    index = (out / "index.json").read_bytes()
    again = run_sharding(manifest, out, samples_per_shard=2, progress=False)
    assert (first["written"], again["written"], again["skipped"]) == (3, 0, 3)
    with open(out / "shard-000001.tar", "r+b") as f:
        f.seek(700)
        f.write(b"XXXX")
    third = run_sharding(manifest, out, samples_per_shard=2, progress=False)
    assert third["written"] == 1 and (out / "index.json").read_bytes() == index
    with pytest.raises(ShardingError, match="samples_per_shard 2 when planned, 3 now"):
        run_sharding(manifest, out, samples_per_shard=3, progress=False)


def test_resume_does_not_depend_on_how_the_manifest_path_is_spelled(tmp_path, manifest, monkeypatch):
    """A re-run naming the manifest relatively, absolutely or through a link finishes the same job (the plan holds
    rejects that name the manifest); a re-run with another manifest or options is refused, saying what differs."""
    (tmp_path / "m").mkdir()
    shutil.copytree(manifest.parent / "clips", tmp_path / "m" / "clips")
    text = manifest.read_text() + "{broken json\n"
    (tmp_path / "m" / "manifest.jsonl").write_text(text)
    (tmp_path / "link").symlink_to(tmp_path / "m")
    monkeypatch.chdir(tmp_path)
    first = run_sharding("m/manifest.jsonl", "out", samples_per_shard=2, progress=False)
    assert first["written"] == 3 and [r["row"] for r in first["rejects"]] == [5]
    for spelling in (tmp_path / "m" / "manifest.jsonl", "./m/../m/manifest.jsonl", "link/manifest.jsonl"):
        again = run_sharding(spelling, tmp_path / "out", samples_per_shard=2, progress=False)
        assert (again["written"], again["skipped"]) == (0, 3), spelling
    (tmp_path / "m" / "manifest.jsonl").write_text(text + "{more broken json\n")
    with pytest.raises(ShardingError, match=r"manifest sha256 [0-9a-f]{12}\.\.\. when planned, [0-9a-f]{12}\.\.\. now"):
        run_sharding("m/manifest.jsonl", "out", samples_per_shard=2, progress=False)


def test_task_split_and_merge_equal_a_single_run(tmp_path, manifest, capsys):
    single = tmp_path / "single"
    assert shard_main([str(manifest), str(single), "--samples-per-shard", "1", "--no-progress"]) == 0
    split = tmp_path / "split"
    for i in range(3):
        assert shard_main([str(manifest), str(split), "--samples-per-shard", "1", "--num-tasks", "3",
                           "--task-index", str(i), "--no-progress"]) == 0
        assert not (split / "index.json").exists()
    part = json.loads((split / "index.task-1.json").read_text())
    assert [r["name"] for r in part["records"]] == ["shard-000001.tar", "shard-000004.tar"]
    assert shard_main(["--merge", str(split)]) == 0
    assert (split / "index.json").read_bytes() == (single / "index.json").read_bytes()
    assert (split / "rejects.jsonl").read_bytes() == (single / "rejects.jsonl").read_bytes()
    capsys.readouterr()

    partial = split / "index.task-2.json"
    saved = partial.read_bytes()
    partial.unlink()
    assert shard_main(["--merge", str(split)]) == 1
    assert "missing partial index for task(s) [2] of 3" in capsys.readouterr().err
    partial.write_bytes(saved)

    shard = split / "shard-000003.tar"
    shard.write_bytes(shard.read_bytes()[:-512] + b"\1" * 512)
    with pytest.raises(ShardingError, match="shard-000003.tar: sha256 differs"):
        merge(split)
    shard.unlink()
    with pytest.raises(ShardingError, match="shard-000003.tar: missing"):
        merge(split)


def test_an_array_of_another_size_over_a_finished_folder_merges_its_own_partials(tmp_path, manifest, caplog):
    """A 3-task array's folder sharded again by a 2-task array (everything already done): its index.task-2.json was
    never rewritten, the merge refused the two sizes, and the merge job then set the good index.json aside."""
    split = tmp_path / "split"
    for tasks in (3, 2):
        for i in range(tasks):
            assert shard_main([str(manifest), str(split), "--samples-per-shard", "1", "--num-tasks", str(tasks),
                               "--task-index", str(i), "--no-progress"]) == 0
        if tasks == 3:
            assert shard_main(["--merge", str(split)]) == 0
            first = (split / "index.json").read_bytes()
    assert shard_main(["--merge", str(split)]) == 0
    assert "leaving out index.task-2.json, of an earlier array of another size" in caplog.text
    assert (split / "index.json").read_bytes() == first
    assert sorted(p.name for p in split.glob("index.task-*.json")) == ["index.task-0.json", "index.task-1.json"]


HOLD = ("import sys, time; from pathlib import Path; from data_pipeline.shard import lock_out_dir; "
        "lock = lock_out_dir(Path(sys.argv[1]), None if sys.argv[2] == '-' else int(sys.argv[2])); "
        "print('held', flush=True); time.sleep(600)")


@pytest.fixture
def holding(tmp_path):
    """holding(folder, task_index or None): a live process that holds the folder's lock as `one4d shard` takes it."""
    import subprocess
    from launch_utils import ROOT as SRC, _env

    procs = []

    def hold(folder, task=None):
        folder.mkdir(parents=True, exist_ok=True)
        proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder), "-" if task is None else str(task)],
                                cwd=SRC, env=_env(), stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        assert proc.stdout.readline().strip() == "held"
        return proc

    yield hold
    for proc in procs:
        proc.kill()
        proc.wait()


def test_a_second_run_into_a_folder_in_use_is_refused_naming_the_first(tmp_path, manifest, capsys, holding):
    """Two runs into one folder deleted each other's temporary shard files: the loser failed with a raw
    FileNotFoundError from the rename. The tasks of one array run side by side (each locks its own task index and
    shares the folder's lock), but never beside a whole run or a merge."""
    out = tmp_path / "out"
    first = holding(out)
    task = ["--num-tasks", "2", "--no-progress", "--samples-per-shard", "1", "--task-index"]
    assert shard_main([str(manifest), str(out), "--samples-per-shard", "1", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert f"one4d shard: error: {out} is in use by pid {first.pid} on " in err
    assert f"delete {out / 'shard.lock'}" in err and "Traceback" not in err
    assert not (out / "plan.json").exists()  # refused before anything was written
    assert shard_main([str(manifest), str(out), *task, "0"]) == 1
    assert f"{out} is in use by a run of the whole manifest or a --merge (pid {first.pid} on " in \
        capsys.readouterr().err
    first.kill()
    first.wait()  # however the holder dies, the system releases its lock
    other = holding(out, task=1)  # a running array task
    assert shard_main([str(manifest), str(out), *task, "0"]) == 0
    assert shard_main([str(manifest), str(out), *task, "1"]) == 1
    assert f"{out} is in use by another array task 1 (pid {other.pid} on " in capsys.readouterr().err
    for whole in ([str(manifest), str(out), "--samples-per-shard", "1", "--no-progress"], ["--merge", str(out)]):
        assert shard_main(whole) == 1
        assert f"{out} is in use by the tasks of a job array (shard.task-*.lock)" in capsys.readouterr().err
    other.kill()
    other.wait()
    assert shard_main([str(manifest), str(out), "--samples-per-shard", "1", "--no-progress"]) == 0
    assert read_index(out)["totals"]["samples"] == 5


def test_parallel_workers_and_byte_sized_shards(tmp_path, manifest):
    one = run_sharding(manifest, tmp_path / "w1", samples_per_shard=1, workers=1, progress=False)
    two = run_sharding(manifest, tmp_path / "w2", samples_per_shard=1, workers=2, progress=False)
    assert one["written"] == two["written"] == 5
    assert (tmp_path / "w1/index.json").read_bytes() == (tmp_path / "w2/index.json").read_bytes()

    # byte-sized shards come out near the target as written (samples estimated without encoding them)
    single = [s["bytes"] for s in read_index(tmp_path / "w1")["shards"]]
    target = int(2.5 * sum(single) / len(single))
    run_sharding(manifest, tmp_path / "bytes", shard_bytes=target, progress=False)
    plan = json.loads((tmp_path / "bytes/plan.json").read_text())
    assert [len(s["rows"]) for s in plan["shards"]] == [2, 2, 1]
    index = read_index(tmp_path / "bytes")
    assert index["totals"]["samples"] == 5
    written = [s["bytes"] for s in index["shards"]]
    assert max(written) <= target and min(written[:-1]) >= 0.6 * target, (written, target)
    rows, _ = read_manifest(manifest)
    for r, size in zip(rows, single):
        assert 0.8 <= _estimated_bytes(r) / size <= 1.25, (r.row, _estimated_bytes(r), size)


def test_inspect_shards(tmp_path, capsys):
    out = make_shards(tmp_path, num_clips=3, samples_per_shard=2)
    assert inspect_main([str(out)]) == 0
    printed = capsys.readouterr().out
    assert "OK: 2 shards, 3 samples" in printed and "32x64 x3" in printed
    assert "stored text embeddings: 0 samples\n" in printed

    shard = out / "shard-000001.tar"
    good = shard.read_bytes()
    shard.write_bytes(good[:1000] + bytes([good[1000] ^ 0xFF]) + good[1001:])
    assert inspect_main([str(out)]) == 1
    assert "shard-000001.tar: sha256 differs" in capsys.readouterr().err

    # a shard whose index entry matches but whose member is broken: the member and key are named
    members = read_tar(out / "shard-000000.tar")
    members["r000000001.depth.npz"] = members["r000000001.depth.npz"][:100]
    with tarfile.open(shard, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    index = json.loads((out / "index.json").read_text())
    index["shards"][1].update(bytes=shard.stat().st_size, sha256=sha256_file(shard),
                              keys=["r000000000", "r000000001"], samples=2)
    (out / "index.json").write_text(json.dumps(index))
    assert inspect_main([str(out)]) == 1
    assert "totals" in capsys.readouterr().err
    index["totals"].update(samples=4, bytes=sum(s["bytes"] for s in index["shards"]))
    (out / "index.json").write_text(json.dumps(index))
    assert inspect_main([str(out)]) == 1
    assert "r000000001.depth.npz: does not parse" in capsys.readouterr().err

    # a member that still parses but is not what was written: the sample's sums.json names it
    members = read_tar(out / "shard-000000.tar")
    mp4 = bytearray(members["r000000000.mp4"])
    mp4[len(mp4) // 2] ^= 0x10
    members["r000000000.mp4"] = bytes(mp4)
    with tarfile.open(shard, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    index["shards"][1].update(bytes=shard.stat().st_size, sha256=sha256_file(shard))
    index["totals"].update(bytes=sum(s["bytes"] for s in index["shards"]))
    (out / "index.json").write_text(json.dumps(index))
    assert inspect_main([str(out)]) == 1
    assert "r000000000: members ['mp4'] are corrupt" in capsys.readouterr().err
    shutil.rmtree(out)
    assert inspect_main([str(out)]) == 1


def test_inspect_names_every_bad_shard_and_the_samples_at_fault(tmp_path, capsys):
    """A flipped bit in one mp4 changes its shard's sha256: the sample is named too (the shard is still read), and
    a second bad shard (truncated) is reported in the same run instead of after the first is mended."""
    out = make_shards(tmp_path, num_clips=6, samples_per_shard=2)
    first, last = out / "shard-000000.tar", out / "shard-000002.tar"
    with tarfile.open(first) as tar:
        mp4 = tar.getmember("r000000001.mp4")
    data = bytearray(first.read_bytes())
    data[mp4.offset_data + mp4.size // 2] ^= 0x10
    first.write_bytes(bytes(data))
    with tarfile.open(last) as tar:
        cut = tar.getmember("r000000004.sums.json").offset_data + 2
    last.write_bytes(last.read_bytes()[:cut])
    assert inspect_main([str(out)]) == 1
    err = capsys.readouterr().err
    assert f"{first}: sha256 differs from the index" in err
    assert "shard-000000.tar: r000000001: members ['mp4'] are corrupt" in err
    assert f"{last}: {cut} bytes, index says" in err and "shard-000002.tar: tar does not read: unexpected end" in err
    assert "shard-000002.tar: r000000004: no sums.json" in err
    assert "shard-000002.tar: keys ['r000000004'] differ from the index's ['r000000004', 'r000000005']" in err
    assert err.splitlines()[-1] == "one4d inspect-shards: FAILED: 2 of 3 shards: shard-000000.tar, shard-000002.tar"
    assert "shard-000001.tar" not in err


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="limits the address space read from /proc")
def test_a_row_that_ran_out_of_memory_is_retried_by_the_re_run(tmp_path):
    """Out of memory (too many --workers for the node) is no fault of the row's: it is reported as such, and the
    shard gets no record, so that re-running the same command writes the row. It was a reject recorded for good
    (in the probe as 'video does not decode'), which every re-run kept; and the run exited 0, so that a job after it
    started on a dataset missing those rows. The run is limited in a child process: its address space to what it
    holds after the imports plus 180 MiB, less than the 1024x1536 clip needs."""
    import subprocess

    from data_pipeline.video import write_mp4

    T, H, W = 9, 1024, 1536
    write_mp4(tmp_path / "big.mp4", np.zeros((T, H, W, 3), np.uint8))
    np.save(tmp_path / "big.npy", np.full((T, H, W), 2.0, np.float32))
    np.save(tmp_path / "poses.npy", np.broadcast_to(np.eye(4), (T, 4, 4)))
    row = {"video": "big.mp4", "depth": "big.npy", "poses": "poses.npy",
           "intrinsics": [[500, 0, (W - 1) / 2], [0, 500, (H - 1) / 2], [0, 0, 1]]}
    (tmp_path / "m.jsonl").write_text(json.dumps(row) + "\n")
    out = tmp_path / "out"
    script = (
        "import json, resource, sys\n"
        "import av, decord, numpy\n"
        "from data_pipeline.shard import run_sharding\n"
        "size = int(next(l for l in open('/proc/self/status') if l.startswith('VmSize')).split()[1]) << 10\n"
        "resource.setrlimit(resource.RLIMIT_AS, (size + (180 << 20), resource.RLIM_INFINITY))\n"
        "from data_pipeline.shard_cli import main\n"
        "sys.exit(main([sys.argv[1], sys.argv[2], '--samples-per-shard', '1', '--no-progress']))\n")
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "m.jsonl"), str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr[-2000:]
    assert done.stderr.splitlines() == ["one4d shard: error: out of memory: rows [0] were not written: re-run the same "
                                        "command with fewer --workers to write them (finished shards are kept)"]
    rejects = read_index(out)["rejects"]
    assert len(rejects) == 1 and rejects[0]["retry"] and f"rejected row 0 ({tmp_path / 'big.mp4'}): MemoryError: " \
        in done.stdout, done.stdout
    reason = rejects[0]["reason"]
    assert reason.startswith("MemoryError: ") and "re-run the same command, with fewer --workers" in reason, reason
    assert not list(out.glob("*.record.json"))
    again = run_sharding(tmp_path / "m.jsonl", out, samples_per_shard=1, progress=False)
    assert (again["written"], again["samples"], again["rejects"]) == (1, 1, [])


def test_a_row_whose_file_was_missing_is_written_once_the_file_is_back(tmp_path, capsys):
    """A row rejected because its video or geometry file was not there (an unfinished copy, a moved folder) was lost
    for good: its shard was recorded and every re-run skipped it. The reject now says so, and a re-run after the
    file is back writes that shard again with the row; rejects of other kinds stay recorded."""
    src = make_dataset(tmp_path / "data", num_clips=3, frames=9, height=32, width=64)
    held = tmp_path / "held.mp4"
    video = src.parent / json.loads(src.read_text().splitlines()[1])["video"]
    os.rename(video, held)
    out = tmp_path / "out"
    assert shard_main([str(src), str(out), "--samples-per-shard", "2", "--no-progress"]) == 0
    assert f"rejected row 1 ({video}): video file not found (put the file there and run the same command" \
        in capsys.readouterr().out
    again = run_sharding(src, out, samples_per_shard=2, progress=False)
    assert (again["written"], again["samples"]) == (0, 2)  # still missing: nothing to do
    os.rename(held, video)
    again = run_sharding(src, out, samples_per_shard=2, progress=False)
    assert (again["written"], again["samples"], again["rejects"]) == (1, 3, [])
    assert read_index(out)["totals"]["samples"] == 3
    from data_pipeline.shard import _unless_changed  # records written before rejects carried `missing`
    old = {"rejects": [{"row": 1, "path": str(video), "reason": "video file not found"}]}
    assert _unless_changed(old, []) is None
    assert _unless_changed({"rejects": [{"row": 1, "path": str(video), "reason": "video does not decode"}]}, [])


def test_npz_bytes_are_deterministic_and_plain():
    a = np.arange(12, dtype=np.float16).reshape(3, 4)
    assert npz_bytes("depth", a) == npz_bytes("depth", a.copy())
    with np.load(io.BytesIO(npz_bytes("depth", a)), allow_pickle=False) as z:
        assert z.files == ["depth"] and np.array_equal(z["depth"], a)


@pytest.mark.parametrize("command", ["synth", "shard", "inspect-shards", "encode-latents"])
def test_cli_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        one4d_main([command, "--help"])
    assert e.value.code == 0
    assert f"one4d {command}" in capsys.readouterr().out


def test_cli_errors(tmp_path, capsys):
    assert shard_main([str(tmp_path / "none.jsonl"), str(tmp_path / "o"), "--no-progress"]) == 1
    assert "manifest not found" in capsys.readouterr().err
    assert shard_main(["--merge", str(tmp_path)]) == 1
    assert "plan.json: not found" in capsys.readouterr().err
    for flag in ("--samples-per-shard", "--shard-bytes"):
        with pytest.raises(SystemExit):
            shard_main([str(tmp_path / "m.jsonl"), str(tmp_path / "o"), flag, "0"])
        assert f"{flag} must be >= 1, got 0" in capsys.readouterr().err


@pytest.mark.parametrize("flags, said", [
    (["--num-tasks", "2"], "--num-tasks needs --task-index, which defaults to $SLURM_ARRAY_TASK_ID, not set here"),
    (["--task-index", "1"], "--task-index needs --num-tasks"),
    (["--num-tasks", "2", "--task-index", "5"], "--task-index must be in [0, 1] with --num-tasks 2, got 5"),
    (["--num-tasks", "0", "--task-index", "0"], "--num-tasks must be >= 1, got 0")])
def test_array_task_flags_are_usage_errors_exit_2(tmp_path, capsys, monkeypatch, flags, said):
    """Were exit 1 (as a failed run), where the other usage errors exit 2; without $SLURM_ARRAY_TASK_ID the message
    now says why --task-index is missing."""
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID", raising=False)
    with pytest.raises(SystemExit) as e:
        shard_main([str(tmp_path / "m.jsonl"), str(tmp_path / "o"), *flags])
    assert e.value.code == 2 and said in capsys.readouterr().err


def test_a_folder_given_as_the_manifest_is_named_as_such(tmp_path, manifest, capsys):
    """'manifest not found: DIR' for a folder that exists read as a wrong path, not a wrong kind of argument."""
    assert shard_main([str(tmp_path), str(tmp_path / "o"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert f"{tmp_path} is a folder: MANIFEST is a file of JSON Lines (.jsonl, one clip per line)" in err
    assert shard_main([str(manifest.parent), str(tmp_path / "o"), "--no-progress"]) == 1
    assert f"is a folder: MANIFEST is a file of JSON Lines (.jsonl, one clip per line), such as {manifest}" in (
        capsys.readouterr().err)
    assert not (tmp_path / "o").exists()


def test_an_output_folder_that_is_a_file_is_named(tmp_path, manifest, capsys):
    """OUT_DIR naming a file (or a path under one) is an error message and exit 1, not a traceback."""
    (tmp_path / "file").write_text("")
    assert shard_main([str(manifest), str(tmp_path / "file"), "--no-progress"]) == 1
    assert f"{tmp_path / 'file'}: not a folder: OUT_DIR is the folder the shards go to" in capsys.readouterr().err
    assert shard_main([str(manifest), str(tmp_path / "file" / "sub"), "--no-progress"]) == 1
    assert f"Not a directory: '{tmp_path / 'file' / 'sub'}'" in capsys.readouterr().err


def test_a_clip_or_id_listed_again_is_sharded_and_named(tmp_path, manifest, capsys):
    """A manifest concatenated twice, or a clip added again, would train that clip twice as often without a word:
    a written row whose inputs all equal an earlier one's (file paths however spelled) or that has an earlier
    row's id is still sharded (clips may be repeated on purpose) but named in a warning. Other cameras or another
    caption make another sample."""
    base = manifest.parent
    r0, r1 = rows_of(manifest)[:2]
    rows = [r0, r1,
            dict(r0, video=str(base / r0["video"]), id="again"),  # r0's clip, the path spelled another way
            dict(r1, caption="another caption"),  # r1's id
            dict(r0, id="other_cameras", intrinsics=[[50.0, 0, 31.5], [0, 50.0, 15.5], [0, 0, 1]]),
            dict(r0, id="rejected", video="missing.mp4"),
            dict(r0, id="rejected")]  # r0's clip again, with the id of a rejected row
    m = base / "repeats.jsonl"
    m.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert shard_main([str(m), str(tmp_path / "out"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    warnings = [line.strip() for line in out.splitlines() if "warning" in line]
    assert warnings == [
        f"warning: row 2 ({base / r0['video']}) is row 0's clip again (every input equal): it is sharded as often "
        "as it is listed",
        f"warning: row 3 ({base / r1['video']}) has row 1's id '{r1['id']}': it is sharded as often as it is listed",
        f"warning: row 6 ({base / r0['video']}) is row 0's clip again (every input equal): it is sharded as often "
        "as it is listed"]
    assert read_index(tmp_path / "out")["totals"]["samples"] == 6


@pytest.mark.parametrize("text", ["", "\n\n"])
def test_an_empty_manifest_is_an_error_and_makes_no_folder(tmp_path, capsys, text):
    (tmp_path / "m.jsonl").write_text(text)
    assert shard_main([str(tmp_path / "m.jsonl"), str(tmp_path / "out"), "--no-progress"]) == 1
    assert "m.jsonl: the manifest has no rows" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("layout", ["array", "object"])
def test_a_manifest_that_is_one_json_document_is_refused_up_front(tmp_path, manifest, capsys, layout):
    """A pretty-printed JSON array (or object) gave a reject for every line, exit 1, and a plan.json of no shards
    that then refused the corrected manifest in that folder: it is refused before anything is written."""
    rows = rows_of(manifest)
    m = manifest.parent / f"pretty_{layout}.json"
    m.write_text(json.dumps(rows if layout == "array" else rows[0], indent=2) + "\n")
    assert shard_main([str(m), str(tmp_path / "out"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    kind = "an array" if layout == "array" else "an object"
    assert f"{m}: not JSON Lines: one JSON object per line (this file is {kind} written over " in err
    assert not (tmp_path / "out").exists()


def test_a_plan_under_which_nothing_was_written_gives_way_to_new_settings(tmp_path, manifest, capsys):
    """Every row of the first manifest was unparsable: its plan has no shards, nothing was written under it, and the
    corrected manifest in its folder was refused as another manifest. A whole run replaces such a plan, saying so;
    an array task does not (a task beside it may be writing under the old one), and a plan under which a shard was
    written still holds."""
    rows = rows_of(manifest)
    m = manifest.parent / "typo.jsonl"
    m.write_text("".join(json.dumps({("vidoe" if k == "video" else k): v for k, v in r.items()}) + "\n" for r in rows))
    out = tmp_path / "out"
    assert shard_main([str(m), str(out), "--no-progress"]) == 1
    capsys.readouterr()
    m.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tasks = ["--num-tasks", "2", "--task-index", "0"]
    assert shard_main([str(m), str(out), "--no-progress", *tasks]) == 1
    err = capsys.readouterr().err
    assert "manifest sha256" in err and "no sample was written under it, but an array task does not replace" in err
    assert shard_main([str(m), str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert f"{out / 'plan.json'}: replaced, no sample having been written under it: manifest sha256" in printed
    assert read_index(out)["totals"]["samples"] == len(rows) and read_index(out)["rejects"] == []
    m.write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    assert shard_main([str(m), str(out), "--no-progress"]) == 1
    assert "it holds shard-000000.tar, shard-000000.tar.record.json, written under that plan: re-run" in capsys.readouterr().err


def test_a_run_whose_rows_were_all_rejected_fails_naming_them(tmp_path, manifest, capsys):
    """An index of no samples is written (the rejects are in it), but the exit status says the run failed: a job
    after it (training, a dependent Slurm job) must not start on an empty dataset. An array task whose own rows
    were all rejected is no failure; the merge of such tasks is."""
    r0 = rows_of(manifest)[0]
    m = manifest.parent / "all_bad.jsonl"
    m.write_text(json.dumps(dict(r0, video="missing.mp4")) + "\n" + json.dumps(dict(r0, depth="missing.npy")) + "\n")
    assert shard_main([str(m), str(tmp_path / "out"), "--no-progress"]) == 1
    captured = capsys.readouterr()
    assert "rejected row 0" in captured.out and "rejected row 1" in captured.out
    assert "no sample was written: all 2 rows were rejected" in captured.err
    assert read_index(tmp_path / "out")["totals"] == {"shards": 1, "samples": 0, "bytes": 10240, "rejected": 2}
    assert inspect_main([str(tmp_path / "out")]) == 1  # consistent, but empty: it said OK with exit 0
    said = capsys.readouterr()
    assert f"{tmp_path / 'out'} holds no sample: every row was rejected (2, listed above)" in said.err
    assert said.out.startswith(f"{tmp_path / 'out'}: EMPTY: 1 shards, 0 samples") and " OK" not in said.out
    for i in range(2):
        assert shard_main([str(m), str(tmp_path / "tasks"), "--samples-per-shard", "1", "--num-tasks", "2",
                           "--task-index", str(i), "--no-progress"]) == 0
    assert shard_main(["--merge", str(tmp_path / "tasks")]) == 1
    assert "no sample was written: all 2 rows were rejected" in capsys.readouterr().err


def test_optional_members_text_embedding_and_xyz_cameras(tmp_path):
    manifest = make_dataset(tmp_path, num_clips=2, geometry="xyz")
    raw = manifest.parent
    emb = np.random.default_rng(0).standard_normal((7, 4096)).astype(np.float32)
    np.save(raw / "emb.npy", emb)
    ref = render_clip(1, 9, 32, 64)
    np.save(raw / "poses.npy", ref["poses_c2w"])
    rows = rows_of(manifest)
    rows[0]["text_embedding"] = "emb.npy"
    rows[1].update(intrinsics=ref["intrinsics"].tolist(), poses="poses.npy")
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run_sharding(manifest, tmp_path / "out", samples_per_shard=2, progress=False)
    members = read_tar(tmp_path / "out/shard-000000.tar")
    stored = np.load(io.BytesIO(members["r000000000.emb.npy"]), allow_pickle=False)
    assert stored.dtype == np.float16 and np.allclose(stored, emb, rtol=2 ** -10, atol=1e-4)
    assert "r000000001.emb.npy" not in members and "r000000000.cam.json" not in members
    np.testing.assert_allclose(json.loads(members["r000000001.cam.json"])["poses_c2w"], ref["poses_c2w"])


def test_byte_planning_survives_bad_geometry_and_is_made_once(tmp_path, manifest, monkeypatch):
    """--shard-bytes: rows whose geometry the size estimate cannot map (an empty file; an npz under a .npy name,
    which the loader then reads by its content) do not stop the planning: the writer validates them as usual.
    A re-run takes the recorded plan without estimating again."""
    import data_pipeline.shard as shard_mod

    raw = manifest.parent
    (tmp_path / "empty.npy").write_bytes(b"")
    np.savez(tmp_path / "zip.npy", depth=np.ones((9, 32, 64), np.float32))
    (tmp_path / "zip.npy.npz").rename(tmp_path / "zip.npy")
    rows = rows_of(manifest)[:2]
    for r in rows:
        for k in ("video", "depth", "poses", "valid"):
            r[k] = str(raw / r[k])
    rows += [{**rows[0], "depth": str(tmp_path / "empty.npy")}, {**rows[1], "depth": str(tmp_path / "zip.npy")}]
    m = tmp_path / "m.jsonl"
    m.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    summary = run_sharding(m, out, shard_bytes=10 ** 6, progress=False)
    assert summary["samples"] == 3 and [r["row"] for r in read_index(out)["rejects"]] == [2]

    def no_estimates(*args):
        raise AssertionError("estimated again")

    monkeypatch.setattr(shard_mod, "_estimated_bytes", no_estimates)
    assert run_sharding(m, out, shard_bytes=10 ** 6, progress=False)["samples"] == 3


@pytest.mark.parametrize("field, value, message", [
    ("bytes", "123", "shards[1].bytes must be a non-negative integer, got '123'"),
    ("samples", True, "shards[1].samples must be a non-negative integer, got True"),
    ("samples", -1, "shards[1].samples must be a non-negative integer, got -1"),
    ("sha256", 5, "shards[1].sha256 must be 64 lowercase hex digits, got 5"),
    ("name", "../shard-000001.tar", "shards[1].name must be the plain name of a .tar file in the folder (no ':', '/' "
                                    "or '\\'), got '../shard-000001.tar'"),
    ("name", None, "shards[1].name must be the plain name of a .tar file in the folder (no ':', '/' or '\\'), got "
                   "None"),
    ("keys", "r000000002", "shards[1].keys must be a list of sample keys, got 'r000000002'"),
    ("keys", [2], "shards[1].keys must be a list of sample keys, got [2]"),
    (None, "shard-000001.tar", "shards[1] must be a JSON object, got 'shard-000001.tar'"),
])
def test_an_index_with_a_wrong_typed_field_is_refused_naming_it(tmp_path, capsys, field, value, message):
    """A hand-edited or damaged index.json is an error naming the file and the field (not a raw TypeError)."""
    from data_pipeline.reader import list_shards
    from data_pipeline.shard_index import ShardIndexError

    out = make_shards(tmp_path, num_clips=3, samples_per_shard=2)
    index = json.loads((out / "index.json").read_text())
    if field is None:
        index["shards"][1] = value
    else:
        index["shards"][1][field] = value
    (out / "index.json").write_text(json.dumps(index))
    with pytest.raises(ShardIndexError, match=re.escape(f"{out / 'index.json'}: {message}")):
        list_shards(str(out))
    assert inspect_main([str(out)]) == 1
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("top, value", [("shards", {}), ("rejects", 3), ("totals", []), ("statistics", None)])
def test_an_index_with_a_wrong_typed_section_is_refused(tmp_path, top, value):
    from data_pipeline.shard_index import ShardIndexError

    out = make_shards(tmp_path, num_clips=1, samples_per_shard=1)
    index = json.loads((out / "index.json").read_text())
    index[top] = value
    (out / "index.json").write_text(json.dumps(index))
    with pytest.raises(ShardIndexError, match=rf"index.json: '{top}' must be a JSON (list|object)"):
        read_index(out)


@pytest.mark.parametrize("text, message", [("[" * 100000, "not valid JSON: nested too deeply to parse"),
                                           ('{"version": 1' + "0" * 5000 + "}", "not valid JSON: Exceeds the limit")])
def test_an_index_the_json_parser_cannot_take_is_refused_naming_it(tmp_path, capsys, text, message):
    """Nesting past the parser's recursion limit (RecursionError) and an integer past int()'s digit limit (a
    ValueError that is no JSONDecodeError) came out of inspect-shards, train, eval and encode-latents as tracebacks."""
    from data_pipeline.reader import list_shards
    from data_pipeline.shard_index import ShardIndexError

    out = make_shards(tmp_path, num_clips=1, samples_per_shard=1)
    (out / "index.json").write_text(text)
    with pytest.raises(ShardIndexError, match=re.escape(f"{out / 'index.json'}: {message}")):
        list_shards(str(out))
    assert inspect_main([str(out)]) == 1
    assert f"FAILED: {out / 'index.json'}: {message}" in capsys.readouterr().err


@pytest.mark.parametrize("edit, message", [
    (lambda st: st["frames"].update(max="17"), "statistics.frames.max must be a non-negative integer, got '17'"),
    (lambda st: st.pop("frames"), "statistics.frames must be a JSON object, got None"),
    (lambda st: st.update(frames="x"), "statistics.frames must be a JSON object, got 'x'"),
    (lambda st: st["resolutions"].update({"32x64": -1}), "statistics.resolutions.32x64 must be a non-negative integer"),
    (lambda st: st.update(geometry=[]), "statistics.geometry must be a JSON object, got []"),
    (lambda st: st.update(depth_range=None), "statistics.depth_range must be [min, max] (numbers or nulls), got None"),
    (lambda st: st.update(valid_fraction="1"), "statistics.valid_fraction must be a number or null, got '1'"),
    (lambda st: st.update(clip_frames=[9]), "statistics.clip_frames must be a JSON object, got [9]"),
    (lambda st: st.update(clip_frames={"nine": 1}),
     "statistics.clip_frames must map frame counts (digits) to clip counts, got {'nine': 1}"),
    (lambda st: st.update(clip_frames={"9": "1"}), "statistics.clip_frames.9 must be a non-negative integer, got '1'"),
    (lambda st: st.update(text_embeddings={"samples": 1}), "statistics.text_embeddings must be a JSON object"),
    (lambda st: st.update(text_embeddings={"samples": "1", "widths": [4096]}),
     "statistics.text_embeddings.samples must be a non-negative integer (null where widths is null), got '1'"),
    (lambda st: st.update(text_embeddings={"samples": 1, "widths": ["4096"]}),
     "statistics.text_embeddings.widths must be a list of positive integers or null, got ['4096']"),
])
def test_an_index_with_wrong_typed_statistics_is_refused_naming_the_field(tmp_path, capsys, edit, message):
    """Train's and eval's checks, inspect-shards and encode-latents read these fields: a hand-edited or damaged one
    was a TypeError, KeyError or AttributeError in whichever read it first."""
    from data_pipeline.shard_index import ShardIndexError

    out = make_shards(tmp_path, num_clips=1, samples_per_shard=1)
    index = json.loads((out / "index.json").read_text())
    edit(index["statistics"])
    (out / "index.json").write_text(json.dumps(index))
    with pytest.raises(ShardIndexError, match=re.escape(f"{out / 'index.json'}: {message}")):
        read_index(out)
    assert inspect_main([str(out)]) == 1
    assert message in capsys.readouterr().err


def test_an_index_written_before_text_embeddings_or_clip_lengths_were_counted_is_read(tmp_path, capsys):
    out = make_shards(tmp_path, num_clips=1, samples_per_shard=1)
    index = json.loads((out / "index.json").read_text())
    del index["statistics"]["clip_frames"]
    for text in ({"samples": None, "widths": None}, "missing"):
        if text == "missing":
            del index["statistics"]["text_embeddings"]
        else:
            index["statistics"]["text_embeddings"] = text
        (out / "index.json").write_text(json.dumps(index))
        assert read_index(out)["statistics"]["frames"] == index["statistics"]["frames"]
        assert inspect_main([str(out)]) == 0
        assert "stored text embeddings" not in capsys.readouterr().out


@pytest.mark.parametrize("name", ["pipe:touch RAN; cat shard-000000.tar", "file:shard-000000.tar",
                                  "sub/shard-000000.tar", "..\\shard-000000.tar", "shard-000000", "shard-000000.tar.gz",
                                  ".tar", "..", ""])
def test_an_index_naming_a_shard_other_than_by_a_plain_tar_file_name_is_refused(tmp_path, capsys, name):
    """A name such as 'pipe:CMD' reached webdataset's opener, which ran CMD in a shell when the shard spec was
    relative: an index file is data, and names only the folder's own tar files."""
    from data_pipeline.reader import list_shards
    from data_pipeline.shard_index import ShardIndexError

    out = make_shards(tmp_path, num_clips=1, samples_per_shard=1)
    index = json.loads((out / "index.json").read_text())
    index["shards"][0]["name"] = name
    (out / "index.json").write_text(json.dumps(index))
    message = (f"{out / 'index.json'}: shards[0].name must be the plain name of a .tar file in the folder (no ':', "
               f"'/' or '\\'), got {name!r}")
    with pytest.raises(ShardIndexError, match=re.escape(message)):
        list_shards(str(out))
    assert inspect_main([str(out)]) == 1
    assert message in capsys.readouterr().err
    assert not (out / "RAN").exists() and not Path("RAN").exists()


def test_an_index_listing_a_shard_twice_is_refused(tmp_path, capsys):
    """The reader would silently read such a shard once; inspect-shards would pass it. Both refuse it, as a sample
    key listed twice within a shard."""
    from data_pipeline.reader import list_shards
    from data_pipeline.shard_index import ShardIndexError

    out = make_shards(tmp_path, num_clips=3, samples_per_shard=2)
    good = json.loads((out / "index.json").read_text())
    index = json.loads(json.dumps(good))
    index["shards"].append(index["shards"][0])
    index["totals"] = {"shards": 3, "samples": 5, "bytes": sum(s["bytes"] for s in index["shards"]), "rejected": 0}
    (out / "index.json").write_text(json.dumps(index))
    with pytest.raises(ShardIndexError, match=r"shards\[2\]: shard-000000.tar is listed twice \(also shards\[0\]\)"):
        list_shards(str(out))
    assert inspect_main([str(out)]) == 1
    assert "shard-000000.tar is listed twice" in capsys.readouterr().err

    index = json.loads(json.dumps(good))
    index["shards"][1].update(keys=["r000000002", "r000000002"], samples=2)
    index["totals"]["samples"] = 4
    (out / "index.json").write_text(json.dumps(index))
    with pytest.raises(ShardIndexError, match=r"shards\[1\]: sample key r000000002 is listed twice"):
        list_shards(str(out))


def _rewrite_sample(shard: Path, key: str, edit) -> None:
    """Rewrite one sample's members (`edit`: suffix -> bytes, returns the new dict) with its sums.json remade to
    match, and the shard's entry in index.json, as a writer leaving the result on disk would have."""
    from data_utils import resum

    members = read_tar(shard)
    raw = {n.split(".", 1)[1]: d for n, d in members.items() if n.startswith(key + ".")}
    raw = edit({k: v for k, v in raw.items()})
    with tarfile.open(shard, "w", format=tarfile.GNU_FORMAT) as tar:
        done = False
        for name, data in members.items():
            if name.startswith(key + "."):
                if not done:
                    for suffix, content in raw.items():
                        info = tarfile.TarInfo(f"{key}.{suffix}")
                        info.size = len(content)
                        tar.addfile(info, io.BytesIO(content))
                    done = True
                continue
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    out = shard.parent
    index = json.loads((out / "index.json").read_text())
    entry = next(s for s in index["shards"] if s["name"] == shard.name)
    entry.update(bytes=shard.stat().st_size, sha256=sha256_file(shard))
    index["totals"]["bytes"] = sum(s["bytes"] for s in index["shards"])
    (out / "index.json").write_text(json.dumps(index))


@pytest.mark.parametrize("geometry", ["depth", "xyz"])
def test_inspect_checks_the_members_of_each_geometry(tmp_path, capsys, geometry):
    """A depth sample needs cam.json (the reader skips one without); an xyz sample may go without. Every sample
    needs its sums.json."""
    from data_utils import resum

    out = make_shards(tmp_path, num_clips=2, samples_per_shard=2, geometry=geometry)
    shard = out / "shard-000000.tar"
    if geometry == "xyz":
        assert "r000000000.cam.json" not in read_tar(shard)
        assert inspect_main([str(out)]) == 0
        capsys.readouterr()
    else:
        _rewrite_sample(shard, "r000000001", lambda raw: resum({k: v for k, v in raw.items() if k != "cam.json"}))
        assert inspect_main([str(out)]) == 1
        assert "shard-000000.tar: r000000001: missing members ['cam.json']" in capsys.readouterr().err
    _rewrite_sample(shard, "r000000000", lambda raw: {k: v for k, v in raw.items() if k != "sums.json"})
    assert inspect_main([str(out)]) == 1
    assert "shard-000000.tar: r000000000: no sums.json" in capsys.readouterr().err


def _children(pid: int) -> list[int]:
    """Live processes whose parent is `pid` (from /proc; zombies count as gone)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] not in "ZX":
            out.append(int(stat.parent.name))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in "ZX"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="workers follow their parent through Linux prctl")
def test_workers_die_with_a_killed_parent(tmp_path, manifest):
    """SIGKILL of `one4d shard --workers 3` (an out-of-memory kill, a scancel) takes its pool workers with it:
    orphans would go on writing shards (and using the memory) beside the re-run."""
    import signal
    import subprocess
    import time

    many = tmp_path / "many.jsonl"
    base = manifest.parent
    many.write_text("".join(json.dumps(dict(r, video=str(base / r["video"]), depth=str(base / r["depth"]),
                                             poses=str(base / r["poses"]), valid=str(base / r["valid"]))) + "\n"
                            for r in rows_of(manifest) * 12))
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "one4d_train.cli", "shard", str(many), str(out),
                             "--samples-per-shard", "1", "--workers", "3", "--no-progress"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while (len(_children(proc.pid)) < 3 or not list(out.glob("*.record.json"))) and time.time() < deadline:
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.005)
    workers = _children(proc.pid)
    assert len(workers) >= 3
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 20
    while any(_alive(w) for w in workers) and time.time() < deadline:
        time.sleep(0.05)
    left = [w for w in workers if _alive(w)]
    for w in left:  # leave no orphans behind a failing test either
        os.kill(w, signal.SIGKILL)
    assert not left, f"workers {left} outlived their killed parent"
    assert len(list(out.glob("*.record.json"))) < 60 and not (out / "index.json").exists()


def test_inspect_names_samples_whose_members_do_not_fit_each_other(tmp_path, capsys):
    """Members that parse and match their sums.json but not each other (cameras of another shape, geometry of fewer
    frames than the video): every epoch's reader would skip the sample, and inspect-shards said OK."""
    from data_pipeline.shard import frames_npz_bytes
    from data_utils import resum

    out = make_shards(tmp_path, num_clips=2, samples_per_shard=2)
    shard = out / "shard-000000.tar"
    assert inspect_main([str(out)]) == 0
    capsys.readouterr()
    fewer = frames_npz_bytes("depth", np.ones((5, 32, 64), np.float16))
    _rewrite_sample(shard, "r000000000", lambda raw: resum({**raw, "cam.json": b'{"intrinsics": "x"}'}))
    _rewrite_sample(shard, "r000000001", lambda raw: resum({**raw, "depth.npz": fewer}))
    assert inspect_main([str(out)]) == 1
    err = capsys.readouterr().err
    assert "shard-000000.tar: r000000000: the reader would skip it: ValueError: could not convert string" in err
    assert "shard-000000.tar: r000000001: the reader would skip it: SampleError: cam.json intrinsics have shape " \
           "(9, 3, 3), expected (5, 3, 3)" in err, err  # 9 cameras for 5 frames of depth (and 9 of video)


def test_inspect_names_geometry_frames_the_reader_would_skip_and_singular_cameras(tmp_path, capsys):
    """inspect-shards decoded the first frame only: a later geometry frame of another dtype, a frame missing from
    the run of names (read as one frame fewer, and blamed on the cameras' count) and singular intrinsics ("Singular
    matrix" at every epoch, no member named) all passed as OK."""
    from data_pipeline.shard import npz_arrays_bytes
    from data_utils import resum

    out = make_shards(tmp_path, num_clips=3, samples_per_shard=3)
    shard = out / "shard-000000.tar"
    depth = [(f"depth_{i:06d}", np.ones((32, 64), np.float32 if i == 3 else np.float16)) for i in range(9)]
    gap = [(f"depth_{i:06d}", np.ones((32, 64), np.float16)) for i in range(10) if i != 4]
    cam = json.loads(read_tar(shard)["r000000002.cam.json"])
    cam["intrinsics"] = [[[0.0, 0.0, 32.0], [0.0, 0.0, 16.0], [0.0, 0.0, 1.0]]] * 9
    _rewrite_sample(shard, "r000000000", lambda raw: resum({**raw, "depth.npz": npz_arrays_bytes(depth)}))
    _rewrite_sample(shard, "r000000001", lambda raw: resum({**raw, "depth.npz": npz_arrays_bytes(gap)}))
    _rewrite_sample(shard, "r000000002", lambda raw: resum({**raw, "cam.json": json.dumps(cam).encode()}))
    assert inspect_main([str(out)]) == 1
    err = capsys.readouterr().err
    assert "r000000000.depth.npz: depth_000003 is float32 (32, 64), depth_000000 float16 (32, 64): the reader " \
           "would skip the sample" in err, err
    assert "r000000001: the reader would skip it: SampleError: member depth.npz: its 9 per-frame arrays are not " \
           "depth_000000 .. depth_000008: missing depth_000004; beyond them depth_000009" in err, err
    assert "r000000002: the reader would skip it: SampleError: cam.json intrinsics of frame 0 are singular" in err, err


def test_inspect_says_why_a_tar_does_not_read_and_names_a_member_outside_any_sample(tmp_path, capsys):
    """An empty shard whose index entry matches read "tar does not read: file could not be opened successfully:"
    (tarfile's first line, the reason on the lines after it); a member named like a path printed an empty key."""
    out = make_shards(tmp_path, num_clips=2, samples_per_shard=1)
    index = json.loads((out / "index.json").read_text())
    empty = out / "shard-000000.tar"
    empty.write_bytes(b"")
    shard = out / "shard-000001.tar"
    with tarfile.open(shard, "a", format=tarfile.GNU_FORMAT) as tar:
        info = tarfile.TarInfo("../escape.mp4")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    for name in (empty, shard):
        entry = next(s for s in index["shards"] if s["name"] == name.name)
        entry.update(bytes=name.stat().st_size, sha256=sha256_file(name))
    index["totals"]["bytes"] = sum(s["bytes"] for s in index["shards"])
    (out / "index.json").write_text(json.dumps(index))
    assert inspect_main([str(out)]) == 1
    err = capsys.readouterr().err
    assert "shard-000000.tar: tar does not read: ReadError('empty file')" in err, err
    assert "shard-000001.tar: unexpected tar member '../escape.mp4'" in err, err


def test_a_rerun_writes_again_the_shards_whose_input_files_changed(tmp_path, capsys):
    """A row rejected for a bad video that was then fixed in place was never retried (its reject kept describing the
    old file), and a written row whose depth changed kept its stale sample: a re-run skipped every recorded shard.
    Each row's input files are fingerprinted (size, mtime) in its shard's record; a shard any of whose rows' inputs
    changed, appeared or went is written again."""
    manifest = make_dataset(tmp_path, num_clips=3)
    raw, rows = manifest.parent, rows_of(manifest)
    video = raw / rows[1]["video"]
    good = video.read_bytes()
    video.write_bytes(good[: len(good) // 3])
    out = tmp_path / "out"
    args = [str(manifest), str(out), "--samples-per-shard", "2", "--no-progress"]
    assert shard_main(args) == 0
    assert [r["row"] for r in read_index(out)["rejects"]] == [1]
    capsys.readouterr()
    assert shard_main(args) == 0
    assert "2 shards (0 written, 2 already done)" in capsys.readouterr().out  # nothing changed

    video.write_bytes(good)  # fixed in place
    assert shard_main(args) == 0
    assert "2 shards (1 written, 1 of them again as their input files changed, 1 already done), 3 samples, 0 rejected" \
        in capsys.readouterr().out
    assert read_index(out)["rejects"] == [] and read_index(out)["totals"]["samples"] == 3

    depth = raw / rows[2]["depth"]
    np.save(depth, np.load(depth) * 2)  # the same size: its mtime tells
    summary = run_sharding(manifest, out, samples_per_shard=2, progress=False)
    assert (summary["written"], summary["changed"], summary["skipped"]) == (1, 1, 1)
    stored = npz(read_tar(out / "shard-000001.tar")["r000000002.depth.npz"], "depth")
    np.testing.assert_array_equal(stored, np.load(depth).astype(np.float16))

    (raw / rows[2]["valid"]).unlink()  # an input that went
    summary = run_sharding(manifest, out, samples_per_shard=2, progress=False)
    assert (summary["written"], summary["changed"]) == (1, 1)
    assert [(r["row"], r["reason"]) for r in read_index(out)["rejects"]] == [(2, "file not found")]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="limits the address space read from /proc")
def test_geometry_of_another_shape_is_refused_from_its_header(tmp_path):
    """A full-resolution depth next to a small video was read whole before its shape was checked: under a memory
    limit that was a MemoryError reject naming the video, to be retried for ever. The shape comes from the .npy
    header (or the .npz member's), before any data is read. Here a 113 MB depth of a 32x64 clip, read in a child
    process whose address space is what it holds after the imports plus 100 MiB."""
    import subprocess
    import zipfile

    manifest = make_dataset(tmp_path, num_clips=1)
    raw, row = manifest.parent, rows_of(manifest)[0]
    shape = (9, 1024, 3072)
    np.lib.format.open_memmap(raw / "big.npy", mode="w+", dtype=np.float32, shape=shape).flush()  # sparse zeros
    with zipfile.ZipFile(raw / "big.npz", "w", zipfile.ZIP_DEFLATED) as zf:
        with zf.open("depth.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": shape})
            for _ in range(27):
                f.write(bytes(1 << 22))
    m = raw / "big.jsonl"
    m.write_text(json.dumps(dict(row, depth="big.npy")) + "\n" + json.dumps(dict(row, depth="big.npz")) + "\n")
    script = (
        "import json, resource, sys\n"
        "import av, decord, numpy\n"
        "from data_pipeline.shard import run_sharding\n"
        "size = int(next(l for l in open('/proc/self/status') if l.startswith('VmSize')).split()[1]) << 10\n"
        "resource.setrlimit(resource.RLIMIT_AS, (size + (100 << 20), resource.RLIM_INFINITY))\n"
        "print(json.dumps(run_sharding(sys.argv[1], sys.argv[2], samples_per_shard=2, progress=False)))\n")
    done = subprocess.run([sys.executable, "-c", script, str(m), str(tmp_path / "out")], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    rejects = json.loads(done.stdout.splitlines()[-1])["rejects"]
    assert [(r["row"], r["path"]) for r in rejects] == [(0, str(raw / "big.npy")), (1, str(raw / "big.npz"))]
    for r in rejects:
        assert r["reason"] == "depth shape [9, 1024, 3072] does not match the video (9 frames, 32x64): expected " \
                              "[9, 32, 64]", r


def test_an_output_folder_holding_other_files_is_refused(tmp_path, manifest, capsys):
    """Any existing folder was taken as OUT_DIR: an unrelated dataset's index.json and rejects.jsonl were replaced,
    and OUT_DIR given as the clips' folder put shards among the clips. A non-empty folder without this command's
    plan.json is refused, naming what it holds; an empty one, one holding only a starting run's locks (the tasks
    of an array start side by side) and one this command wrote into are fine."""
    mine = tmp_path / "mydata"
    mine.mkdir()
    (mine / "index.json").write_text("{}")
    (mine / "rejects.jsonl").write_text("mine\n")
    clips = manifest.parent / "clips"
    before = sorted(p.name for p in clips.iterdir())
    for folder, held in ((mine, "index.json, rejects.jsonl"), (clips, ", ".join(before[:5]))):
        assert shard_main([str(manifest), str(folder), "--no-progress"]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"one4d shard: error: {folder}: not empty (it holds {held}") and \
            "and no plan.json of an earlier `one4d shard` into it" in err and \
            "OUT_DIR must be a new or empty folder, or one `one4d shard` wrote into" in err, err
    assert (mine / "index.json").read_text() == "{}" and (mine / "rejects.jsonl").read_text() == "mine\n"
    assert sorted(p.name for p in clips.iterdir()) == before
    for folder, files in ((tmp_path / "empty", ()), (tmp_path / "locked", ("shard.lock", "shard.task-1.lock"))):
        folder.mkdir()
        for name in files:
            (folder / name).write_text("")
        assert shard_main([str(manifest), str(folder), "--no-progress"]) == 0
        assert shard_main([str(manifest), str(folder), "--no-progress"]) == 0  # holds its plan now
        assert read_index(folder)["totals"]["samples"] == 5


def test_the_index_records_the_depth_range_as_stored(tmp_path):
    """The index's depth range is that of the float16 values the shards hold (depth x 1e-9 was recorded as
    [3.2e-09, ...] while every stored value was 0)."""
    out = make_shards(tmp_path, num_clips=2, samples_per_shard=2)
    members = read_tar(out / "shard-000000.tar")
    depth = np.concatenate([npz(members[f"r00000000{i}.depth.npz"], "depth").ravel() for i in range(2)])
    stored = depth[depth > 0]
    assert read_index(out)["statistics"]["depth_range"] == [float(stored.min()), float(stored.max())]


def test_a_corrected_manifest_replaces_a_plan_whose_shards_hold_no_sample(tmp_path, capsys, monkeypatch):
    """Every row was rejected ('video file not found': its paths were written relative to the current folder, not
    to the manifest's), which left a shard of 0 samples; the corrected manifest was then refused as another
    manifest's. Such shards are removed and the plan replaced; the reject says where the paths resolve."""
    data = make_dataset(tmp_path / "data", num_clips=2)
    rows = rows_of(data)
    lists = tmp_path / "lists"
    lists.mkdir()
    m = lists / "manifest.jsonl"
    keys = ("video", "depth", "poses", "valid")
    m.write_text("".join(json.dumps({k: f"data/raw/{v}" if k in keys else v for k, v in r.items()}) + "\n"
                         for r in rows))
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    assert shard_main([str(m), str(out), "--no-progress"]) == 1
    printed = capsys.readouterr().out
    assert f"video file not found (a file data/raw/{rows[0]['video']} is there relative to the current folder, " \
           f"{tmp_path}, but the manifest's relative paths resolve against its own folder, {lists}: write them " \
           "relative to that folder, or absolute)" in printed, printed
    assert read_index(out)["totals"]["samples"] == 0 and (out / "shard-000000.tar").is_file()
    m.write_text("".join(json.dumps({k: f"../data/raw/{v}" if k in keys else v for k, v in r.items()}) + "\n"
                         for r in rows))
    assert shard_main([str(m), str(out), "--no-progress"]) == 0
    assert f"{out / 'plan.json'}: replaced, no sample having been written under it: manifest sha256" in \
        capsys.readouterr().out
    assert read_index(out)["totals"]["samples"] == 2 and read_index(out)["rejects"] == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_FSIZE and SIGXFSZ")
def test_a_shard_that_cannot_be_written_is_named_and_leaves_no_temp_file(tmp_path, manifest):
    """A full disk ended the run with '[Errno 28] No space left on device', naming nothing, and left the shard's temp
    file behind. The write fails here by a file-size limit of 20 kB set in a child process (EFBIG, as the disk's
    ENOSPC, from the same write)."""
    import subprocess

    out = tmp_path / "out"
    script = ("import resource, signal, sys\n"
              "from data_pipeline.shard_cli import main\n"
              "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
              "resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))\n"
              "sys.exit(main([sys.argv[1], sys.argv[2], '--samples-per-shard', '2', '--no-progress']))\n")
    done = subprocess.run([sys.executable, "-c", script, str(manifest), str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 1, done.stderr[-2000:]
    assert re.fullmatch(rf"one4d shard: error: {re.escape(str(out / 'shard-000000.tar'))}: cannot write the shard: "
                        rf"File too large \(\d+\.\d MiB free in {re.escape(str(out))}\): make room \(or write into "
                        r"another folder\) and re-run the same command; finished shards are kept\n", done.stderr), \
        done.stderr
    assert sorted(p.name for p in out.iterdir()) == ["plan.json", "shard.lock"]


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-32"])
def test_a_utf16_or_utf32_manifest_is_refused_up_front(tmp_path, manifest, capsys, encoding):
    """What Windows PowerShell's `>` writes (UTF-16 with a byte-order mark) gave one confusing reject per line."""
    m = manifest.parent / f"{encoding}.jsonl"
    m.write_bytes(manifest.read_text().encode(encoding))
    assert shard_main([str(m), str(tmp_path / "out"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    wide = "UTF-32" if encoding == "utf-32" else "UTF-16"
    assert err.startswith(f"one4d shard: error: {m}: not UTF-8 text: the file is {wide} text (as Windows "
                          "PowerShell's `>` writes): save it as UTF-8, e.g. iconv") and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("entry", ["oops", {"row": "3", "path": "a.mp4", "reason": "r"}, {"row": 3, "reason": "r"},
                                   {"row": 3, "path": "a.mp4", "reason": None}])
def test_an_index_with_a_malformed_reject_is_refused_naming_it(tmp_path, capsys, entry):
    """inspect-shards printed OK, then a traceback, for a rejects entry that is no {row, path, reason} object."""
    from data_pipeline.shard_index import ShardIndexError

    out = make_shards(tmp_path, num_clips=1, samples_per_shard=1)
    index = json.loads((out / "index.json").read_text())
    index.update(rejects=[entry], totals={**index["totals"], "rejected": 1})
    (out / "index.json").write_text(json.dumps(index))
    message = f"{out / 'index.json'}: rejects[0] must be a JSON object with 'row' (a row number), 'path' and " \
              f"'reason' (texts), got {entry!r}"
    with pytest.raises(ShardIndexError, match=re.escape(message)):
        read_index(out)
    assert inspect_main([str(out)]) == 1
    said = capsys.readouterr()
    assert message in said.err and "Traceback" not in said.err and "OK" not in said.out


def test_paths_that_are_not_utf8_are_printed(tmp_path, manifest, capsys):
    """A file name of a Latin-1 file system (held as a surrogate escape) crashed the reject lines of `one4d shard` and
    `one4d inspect-shards` with UnicodeEncodeError under a strict UTF-8 stdout (as capsys's is)."""
    latin1 = os.fsdecode(b"caf\xe9.mp4")
    m = manifest.parent / "latin1.jsonl"
    m.write_text(manifest.read_text() + json.dumps(dict(rows_of(manifest)[0], video=latin1)) + "\n")
    out = tmp_path / "out"
    assert shard_main([str(m), str(out), "--no-progress"]) == 0
    shown = str(manifest.parent / "caf\\udce9.mp4")
    assert f"rejected row 5 ({shown}): video file not found" in capsys.readouterr().out
    assert inspect_main([str(out)]) == 0
    assert f"rejected row 5 ({shown}): video file not found" in capsys.readouterr().out
