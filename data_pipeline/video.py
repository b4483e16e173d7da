"""H.264 writing (PyAV/libx264) and checked decoding (decord) of mp4 clips."""
from __future__ import annotations

import errno
import io
import math
import os
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


def clip_streams(container) -> list:
    """A PyAV container's video streams, cover art (an attached picture) left out."""
    return [s for s in container.streams.video if not int(getattr(s, "disposition", 0)) & ATTACHED_PIC]


def container_problem(path) -> str | None:
    """What keeps the file at `path` from being one clip decord reads, from its container alone (no decoding), or
    None: an empty file, one FFmpeg cannot open (no video, or a truncated one), one without a video stream (audio
    only), several video streams (decoders disagree on which one a clip is: decord takes the 'best', PyAV the first;
    cover art, an attached picture, left out). These read as decord's own messages before ("cannot find video
    stream with wanted index: -1")."""
    import av
    import av.error

    if os.path.getsize(path) == 0:
        return "empty file (0 bytes)"
    try:
        with av.open(str(path)) as container:
            streams = clip_streams(container)
            kinds = sorted({"cover art" if s.type == "video" else s.type for s in container.streams})
    except MemoryError:
        raise
    except (av.error.FFmpegError, OSError, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or exc
        if getattr(exc, "errno", None) in (errno.EACCES, errno.EPERM):
            return f"cannot be read ({reason})"
        return f"FFmpeg cannot open it ({reason}): not a video, or a damaged or cut one"
    if not streams:
        return f"no video stream (it holds {', '.join(kinds) + ' only' if kinds else 'no streams'})"
    if len(streams) > 1:
        return (f"{len(streams)} video streams (a second angle, or cover art?): keep the clip's own alone, "
                f"e.g. ffmpeg -i IN -map 0:v:0 -c copy OUT.mp4")
    return None


def container_format(path) -> str:
    """FFmpeg's name of the container format of `path` ('mov,mp4,m4a,3gp,3g2,mj2', 'mpegts', ...); '' where it
    cannot open it."""
    import av
    import av.error

    try:
        with av.open(str(path)) as container:
            return container.format.name
    except MemoryError:
        raise
    except (av.error.FFmpegError, OSError, ValueError):
        return ""


REENCODE = "ffmpeg -i IN.mp4 -c:v libx264 -crf 18 OUT.mp4"  # ffmpeg applies a display rotation by default


def display_rotation(frame) -> str | None:
    """In words, the turn that a decoded PyAV frame's display matrix asks players to apply, or None for none, from
    VideoFrame.rotation (counter-clockwise, as FFmpeg's av_display_rotation_get gives it; walking the frame's side
    data instead crashed forked DataLoader workers under PyAV 18). A PyAV without the property checks nothing."""
    angle = round(getattr(frame, "rotation", 0) or 0) % 360
    if angle == 0:
        return None
    return {90: "90 degrees counter-clockwise", 180: "180 degrees", 270: "90 degrees clockwise"}.get(
        angle, f"{angle} degrees counter-clockwise")


def rotation_problem(path) -> str | None:
    """What is wrong with the display rotation that the first video stream of `path` carries (a phone's portrait
    clip stored landscape, say), or None: decord applies it, PyAV's frames (the reader's early windows) do not, so
    one clip's frames would come upright or turned by where its window starts, against one geometry. None too where
    PyAV cannot open or decode it (the decode check reports why)."""
    import av
    import av.error

    try:
        with av.open(str(path)) as container:
            stream = next(iter(clip_streams(container)), None)
            if stream is None:
                return None
            tag = stream.metadata.get("rotate", "0").strip()  # the older way of stating it
            stream.thread_type, stream.codec_context.thread_count = "NONE", 1  # one frame: no threads' buffers
            frame = next(container.decode(stream), None)
            turn = (f"{tag} degrees clockwise (its 'rotate' tag)" if tag not in ("", "0")
                    else display_rotation(frame) if frame is not None else None)
    except MemoryError:  # av.error.MemoryError is an FFmpegError too: out of memory is no answer
        raise
    except (av.error.FFmpegError, OSError, ValueError):
        return None
    if turn is None:
        return None
    return (f"the video carries a display rotation of {turn} (as phones store portrait video), which decoders apply "
            f"or not (decord does, PyAV does not), so its frames would be paired turned against its geometry: "
            f"re-encode it with the rotation applied, e.g. {REENCODE} (ffmpeg applies it by default), and give its "
            f"geometry as the upright frames show it")


def hidden_frames(src) -> int:
    """How many stored frames of the first video stream of `src` (a path or mp4 bytes) its edit list hides, by
    demuxing alone (no decoding): what a stream-copy cut (ffmpeg -ss T -c copy) keeps of the group of pictures it
    cuts into. decord counts them and returns repeats of the last shown frame for indices past the shown ones, PyAV
    drops them, so one clip's frames would shift against its geometry by where its window starts. 0 where PyAV
    cannot open it (the decode check reports why)."""
    import av
    import av.error

    try:
        with av.open(io.BytesIO(src) if isinstance(src, (bytes, bytearray)) else str(src)) as container:
            stream = next(iter(clip_streams(container)), None)
            if stream is None:
                return 0
            return sum(1 for packet in container.demux(stream) if packet.size and packet.is_discard)
    except MemoryError:
        raise
    except (av.error.FFmpegError, OSError, ValueError):
        return 0


def hidden_frames_problem(hidden: int, stored: int) -> str:
    return (f"{hidden} of its {stored} stored frames are hidden by its edit list (as a stream-copy cut, "
            f"ffmpeg -ss T -c copy, leaves them), which decoders count or not (decord does, PyAV does not), so its "
            f"frames would be paired shifted against its geometry: re-encode it, e.g. {REENCODE}, so that it stores "
            f"only the frames it shows, and give its geometry for those")


def probe_and_check(path, chunk: int = 16) -> VideoInfo:
    """Open `path` with decord and decode every frame (in chunks, so memory stays small): a truncated or
    corrupt stream fails here, not in training, as does a file of several clips, with a display rotation or with
    frames its edit list hides (decoders differ on those). Returns its frame count, size and frame rate."""
    if not Path(path).is_file():
        raise VideoError(f"{path}: video file not found")
    problem = container_problem(path)
    if problem:
        raise VideoError(f"{path}: {problem}")
    info = _decode_all(path, chunk)
    rotation = rotation_problem(path)  # after decord's pass, whose memory is then free again
    if rotation:
        raise VideoError(f"{path}: {rotation}")
    hidden = hidden_frames(path)
    if hidden:
        raise VideoError(f"{path}: {hidden_frames_problem(hidden, info.num_frames)}")
    return info


def _decode_all(path, chunk: int) -> VideoInfo:
    """probe_and_check's decord pass: every frame, `chunk` at a time."""
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
        # decord's failure at the end of an MPEG-TS advises a retry limit, which does not help; a remux does
        if "DECORD_REWIND_RETRY_MAX" in str(exc) and container_format(path) == "mpegts":
            raise VideoError(f"{path}: an MPEG-TS stream, which decord does not read to its end: remux it to MP4 "
                             f"(same frames), e.g. ffmpeg -i IN.ts -c copy OUT.mp4") from None
        raise VideoError(f"{path}: video does not decode with decord: {_short(exc)}") from None
