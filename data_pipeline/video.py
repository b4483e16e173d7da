"""H.264 writing (PyAV/libx264) and checked decoding (decord) of mp4 clips."""
from __future__ import annotations

import io
import math
import re
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np


class VideoError(ValueError):
    """A video that cannot be written or decoded; the message names the file."""


@dataclass(frozen=True)
class VideoInfo:
    num_frames: int
    height: int
    width: int
    fps: float


def write_mp4(path, frames: np.ndarray, fps: float = 16.0, crf: int = 10) -> None:
    """uint8 frames [T, H, W, 3] -> H.264 yuv420p mp4 (low crf: near-lossless)."""
    import av

    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise VideoError(f"{path}: frames must be uint8 [T, H, W, 3], got {frames.dtype} {frames.shape}")
    T, H, W, _ = frames.shape
    if H % 2 or W % 2:
        raise VideoError(f"{path}: yuv420p needs even height and width, got {H}x{W}")
    rate = frame_rate(fps)
    if rate is None:
        raise VideoError(f"{path}: fps must be a positive number of at least 1/1001, got {fps}")
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=rate)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        stream.options = {"crf": str(crf), "preset": "medium"}
        for frame in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        out.mux(stream.encode())


def frame_rate(fps: float) -> Fraction | None:
    """The stored frame rate of `fps` (denominator at most 1001), or None where it is not a positive number (a rate
    that rounds to 0 would make libx264 silently use 24 fps; a negative one fails inside it)."""
    if not math.isfinite(fps):
        return None
    rate = Fraction(fps).limit_denominator(1001)
    return rate if rate > 0 else None


def _short(exc: Exception) -> str:
    """decord's message without its leading timestamp and source location."""
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
    return re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", text)


def open_reader(src):
    """A decord VideoReader on a path or on mp4 bytes (decoded from memory)."""
    import decord

    source = io.BytesIO(src) if isinstance(src, (bytes, bytearray)) else str(src)
    return decord.VideoReader(source, ctx=decord.cpu(0), num_threads=1)


def decode_frames(src, indices=None) -> np.ndarray:
    """Decode an mp4 (path or bytes) to uint8 [T, H, W, 3]; all frames unless `indices` is given."""
    name = "<bytes>" if isinstance(src, (bytes, bytearray)) else str(src)
    try:
        vr = open_reader(src)
        idx = list(range(len(vr))) if indices is None else list(indices)
        return vr.get_batch(idx).asnumpy()
    except Exception as exc:
        raise VideoError(f"{name}: video does not decode with decord: {_short(exc)}") from None


ATTACHED_PIC = 0x0400  # FFmpeg's AV_DISPOSITION_ATTACHED_PIC: a cover picture stored as a video stream


def video_streams(src) -> int:
    """How many video streams the container at path or in bytes `src` holds, cover art (an attached picture)
    left out; 0 where PyAV cannot open it (the decode check reports why)."""
    import av
    import av.error

    try:
        with av.open(io.BytesIO(src) if isinstance(src, bytes) else str(src)) as container:
            return sum(not int(getattr(s, "disposition", 0)) & ATTACHED_PIC for s in container.streams.video)
    except (av.error.FFmpegError, OSError, ValueError):
        return 0


def probe_and_check(path, chunk: int = 16) -> VideoInfo:
    """Open `path` with decord and decode every frame (in chunks, so memory stays small): a truncated or
    corrupt stream fails here, not in training. Returns its frame count, size and frame rate."""
    if not Path(path).is_file():
        raise VideoError(f"{path}: video file not found")
    streams = video_streams(path)
    if streams > 1:  # decoders disagree on which one a clip is: decord takes the 'best', PyAV the first
        raise VideoError(f"{path}: {streams} video streams (a second angle, or cover art?): keep the clip's own alone, "
                         f"e.g. ffmpeg -i IN -map 0:v:0 -c copy OUT.mp4")
    try:
        vr = open_reader(path)
        n = len(vr)
        if n == 0:
            raise VideoError(f"{path}: video has no frames")
        height = width = None
        for start in range(0, n, chunk):
            batch = vr.get_batch(list(range(start, min(n, start + chunk)))).asnumpy()
            height, width = batch.shape[1:3]
        return VideoInfo(n, int(height), int(width), float(vr.get_avg_fps()))
    except (VideoError, MemoryError):  # out of memory is no fault of the video's
        raise
    except Exception as exc:
        raise VideoError(f"{path}: video does not decode with decord: {_short(exc)}") from None
