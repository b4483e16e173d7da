"""Small real datasets for tests: synthetic clips -> mp4 + geometry + manifest -> tar shards + index,
built by the project's own code paths (data_pipeline.synthetic, data_pipeline.shard)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np

from data_pipeline.shard import run_sharding
from data_pipeline.synthetic import write_dataset


def make_dataset(tmp_dir, num_clips: int = 4, frames: int = 9, height: int = 32, width: int = 64,
                 geometry: str = "depth", seed: int = 0) -> Path:
    """Render `num_clips` synthetic clips under tmp_dir/raw; returns the manifest path."""
    return write_dataset(Path(tmp_dir) / "raw", num_clips, frames, height, width, seed=seed, geometry=geometry)


def make_shards(tmp_dir, num_clips: int = 4, frames: int = 9, height: int = 32, width: int = 64,
                geometry: str = "depth", samples_per_shard: int = 2, seed: int = 0,
                text_embeddings: tuple[int, ...] = ()) -> Path:
    """make_dataset, then shard it into tmp_dir/shards (index.json included); returns the shard folder. The rows
    numbered in `text_embeddings` get a stored caption embedding (zeros, [5, 4096] as the manifest takes)."""
    manifest = make_dataset(tmp_dir, num_clips, frames, height, width, geometry, seed)
    if text_embeddings:
        np.save(Path(tmp_dir) / "raw" / "emb.npy", np.zeros((5, 4096), np.float32))
        rows = [json.loads(line) for line in manifest.read_text().splitlines()]
        for i in text_embeddings:
            rows[i]["text_embedding"] = "emb.npy"
        manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = Path(tmp_dir) / "shards"
    run_sharding(manifest, out, samples_per_shard=samples_per_shard, workers=1, progress=False)
    return out


def kill_after_first_shard(cmd: list[str], out: Path, cwd, timeout: float, env: dict | None = None) -> int:
    """Run a shard-writing command and SIGKILL it as soon as its first finished-shard record appears in `out`;
    returns how many records it had written by then."""
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + timeout
    while not list(out.glob("*.record.json")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return len(list(out.glob("*.record.json")))



def resum(raw: dict) -> dict:
    """A raw sample (member suffix -> bytes, as the reader groups it) edited by a test, with its sums.json
    rewritten to match its members, as the shard writers would have written it."""
    from data_pipeline.checksums import MEMBER, with_sums

    key = raw.get("__key__", "r000000000")
    members = [(f"{key}.{k}", v) for k, v in raw.items() if not k.startswith("__") and k != MEMBER]
    return {**{k: v for k, v in raw.items() if k.startswith("__")},
            **{name.split(".", 1)[1]: data for name, data in with_sums(key, members)}}


def write_rotated_mp4(path, frames: np.ndarray, degrees: int, fps: int = 16) -> Path:
    """uint8 frames [T, H, W, 3] as H.264 with a display matrix turning them `degrees` counter-clockwise for
    display, as phones store portrait video (the frames stay stored as given)."""
    import av
    import pytest

    path = Path(path)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        if not hasattr(stream, "set_display_rotation"):
            pytest.skip("this PyAV cannot write a display matrix (no VideoStream.set_display_rotation)")
        stream.set_display_rotation(degrees)
        for f in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        out.mux(stream.encode())
    return path


def write_cut_mp4(src, path, hidden: int) -> Path:
    """The mp4 `src` remuxed (no re-encoding) with its timestamps moved `hidden` frames earlier, so that its edit
    list hides its first `hidden` frames: what a stream-copy cut (ffmpeg -ss T -c copy) into a group of pictures
    leaves."""
    import av

    path = Path(path)
    with av.open(str(src)) as inp, av.open(str(path), "w") as out:
        stream = inp.streams.video[0]
        copy = out.add_stream_from_template(stream)
        step = int(round(1 / (stream.average_rate * stream.time_base)))
        for packet in inp.demux(stream):
            if packet.dts is None:  # the demuxer's final empty packet
                continue
            packet.pts -= hidden * step
            packet.dts -= hidden * step
            packet.stream = copy
            out.mux(packet)
    return path


def make_shards_of_lengths(tmp_dir, lengths: tuple[int, ...], height: int = 32, width: int = 64,
                           samples_per_shard: int = 1) -> Path:
    """One synthetic clip of each frame count in `lengths` (row i: lengths[i] frames), sharded together into
    tmp_dir/shards; returns the shard folder."""
    rows = []
    for i, frames in enumerate(lengths):
        manifest = make_dataset(Path(tmp_dir) / f"clip{i}", 1, frames, height, width, seed=i)
        for row in (json.loads(line) for line in manifest.read_text().splitlines()):
            rows.append({k: str(manifest.parent / v) if k in ("video", "valid", "depth", "poses") else v
                         for k, v in row.items()})
    manifest = Path(tmp_dir) / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = Path(tmp_dir) / "shards"
    run_sharding(manifest, out, samples_per_shard=samples_per_shard, workers=1, progress=False)
    return out
