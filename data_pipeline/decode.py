"""Raw shard sample (member bytes) -> the sampled frame window and its geometry, as numpy arrays.

Only the frames up to the end of the window are decoded (from memory: PyAV sequentially for windows near the
start, decord `get_batch` with keyframe seeking otherwise; identical pixels at source size), and of the
per-frame geometry (docs/data.md) only the window's frames are inflated. Given the
training crop's size, frames come out already resized to cover it (on the PyAV path by swscale in the
YUV -> RGB conversion, after decord by torch: the same bilinear kernel, chroma handled differently), while
geometry stays at source resolution for the transforms' nearest resize. Nothing is unpickled: npz members
are parsed as plain .npy arrays (object dtypes refused), cameras come from JSON.
"""
from __future__ import annotations

import io
import json
import struct
import zipfile
from dataclasses import dataclass

import numpy as np

from data_pipeline.video import REENCODE, display_rotation, hidden_frames, hidden_frames_problem

try:  # ISA-L's inflate reads the same deflate streams as zlib's, ~2.4x faster (a clip's depth: ~81 members); its
    # CRC-32 is the same function, ~6x faster (5 ms for a clip window's 66 MB of inflated depth)
    from isal.isal_zlib import crc32, decompress as inflate
except ImportError:  # no wheel for this platform
    from zlib import crc32, decompress as inflate


class SampleError(ValueError):
    """A shard sample that cannot be used; the reader logs it with its shard and key and skips it."""


class ShortClipError(SampleError):
    """A clip shorter than the frame window: no damage, and counted apart from the corrupt samples."""


def why(exc: BaseException) -> str:
    """An exception's message, or its type where it has none (MemoryError(), say): a skip is never unexplained."""
    return str(exc) or type(exc).__name__


@dataclass
class DecodedClip:
    """The sampled window: geometry at source resolution, in its stored dtype and not yet masked (transforms
    resize first and then check finiteness, so full-resolution passes are avoided); frames at source
    resolution or already resized to cover the training crop (decode_clip's `size`)."""
    frames: np.ndarray  # uint8 [T, H, W, 3], or [T, h, w, 3] resized by cover_size (planar in memory)
    depth: np.ndarray | None  # [T, H, W] z-depth (depth geometry)
    xyz: np.ndarray | None  # [T, H, W, 3] pointmaps in the clip's first frame's camera (pointmap geometry)
    xyz_to_ref: np.ndarray | None  # 4x4 taking xyz into the first sampled frame's camera (None: already there)
    valid: np.ndarray | None  # bool [T, H, W], the stored mask; None: implied by depth (the writer stores
    # invalid depth as 0, so valid == depth > 0 and finite)
    intrinsics: np.ndarray  # float64 [T, 3, 3], NaN when unknown
    poses_c2w: np.ndarray  # float64 [T, 4, 4] relative to the first sampled frame, NaN when unknown
    caption: str
    text_emb: np.ndarray | None  # float32 [L, D]
    frame_indices: np.ndarray  # int64 [T] indices into the source clip

    @property
    def source_hw(self) -> tuple[int, int]:
        """The source resolution: the geometry's (the frames may come resized)."""
        return tuple((self.depth if self.depth is not None else self.xyz).shape[1:3])


class NpzReader:
    """The arrays of an in-memory npz, inflated one at a time on request with a single inflate call each (no
    zipfile stream) and checked against the zip's CRC-32. Plain .npy only: an object dtype is refused, so
    nothing is ever unpickled."""

    def __init__(self, data: bytes, member: str):
        self.data, self.member = data, member
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as zf:
                self.infos = {i.filename.removesuffix(".npy"): i for i in zf.infolist()}
        except Exception as exc:
            raise SampleError(f"member {member} is not a readable npz: {why(exc)}") from None

    @property
    def files(self) -> list[str]:
        return list(self.infos)

    def __contains__(self, name: str) -> bool:
        return name in self.infos

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self.infos:
            raise SampleError(f"member {self.member} has no array '{name}' (has {self.files[:8]})")
        info = self.infos[name]
        try:
            off = info.header_offset
            if self.data[off:off + 4] != b"PK\x03\x04":
                raise ValueError("bad local file header")
            n, m = struct.unpack_from("<HH", self.data, off + 26)
            start = off + 30 + n + m
            body = memoryview(self.data)[start:start + info.compress_size]
            if info.compress_type == zipfile.ZIP_DEFLATED:
                buf = inflate(body, -15, info.file_size)
            elif info.compress_type == zipfile.ZIP_STORED:
                buf = bytes(body)
            else:
                raise ValueError(f"compression method {info.compress_type} not supported")
            if len(buf) != info.file_size:
                raise ValueError(f"inflated to {len(buf)} bytes, expected {info.file_size}")
            if crc32(buf) != info.CRC:  # a flipped bit that still inflates: corrupt, not silently different depth
                raise ValueError("CRC-32 mismatch (the member is corrupt)")
            f = io.BytesIO(buf)
            major, _ = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read(f)
            if dtype.hasobject:
                raise ValueError("object arrays are not accepted (they would need unpickling)")
            count = int(np.prod(shape, dtype=np.int64))
            a = np.frombuffer(buf, dtype, count=count, offset=f.tell())
            return a.reshape(shape[::-1]).T if fortran else a.reshape(shape)
        except Exception as exc:
            raise SampleError(f"member {self.member} array '{name}' is not readable: {why(exc)}") from None


GEOMETRY_MEMBERS = ("depth.npz", "xyz.npz")


def member_problem(members) -> str | None:
    """What a sample with members `members` (suffixes, sums.json aside) lacks of what every sample of `one4d shard`
    has (docs/data.md: mp4, one geometry member, valid.npz, txt, json, and cam.json with depth geometry;
    latents.json with latents.npz from `one4d encode-latents`), or None."""
    have = set(members)
    geometry = [g for g in GEOMETRY_MEMBERS if g in have]
    if len(geometry) > 1:
        return "has both depth.npz and xyz.npz"
    need = {"mp4", "valid.npz", "txt", "json"} | ({"cam.json"} if geometry == ["depth.npz"] else set())
    if "latents.npz" in have or "latents.json" in have:
        need |= {"latents.npz", "latents.json"}
    missing = sorted(need - have) + ([] if geometry else ["depth.npz or xyz.npz"])
    return f"missing members {missing}" if missing else None


def frame_member(name: str, i: int) -> str:
    """Name of frame i's array in a per-frame geometry npz."""
    return f"{name}_{i:06d}"


def frame_count(z: NpzReader, name: str) -> int:
    """The number of per-frame arrays `name_000000`, ... of a geometry npz."""
    found = {f for f in z.files if f.startswith(name + "_")}
    n = len(found)
    if n == 0:
        raise SampleError(f"member {z.member} has no per-frame arrays '{frame_member(name, 0)}'...")
    expected = {frame_member(name, i) for i in range(n)}
    if found != expected:  # a frame missing: read as one frame fewer, the cameras' count was blamed
        missing, unexpected = sorted(expected - found), sorted(found - expected)
        raise SampleError(f"member {z.member}: its {n} per-frame arrays are not {frame_member(name, 0)} .. "
                          f"{frame_member(name, n - 1)}: missing {', '.join(missing[:3])}"
                          f"{' ...' if len(missing) > 3 else ''}; beyond them {', '.join(unexpected[:3])}"
                          f"{' ...' if len(unexpected) > 3 else ''}")
    return n


def read_frames(z: NpzReader, name: str, window: np.ndarray | None = None) -> np.ndarray:
    """The [T, ...] array `name` of a geometry npz (one array per frame), restricted to frame indices `window`
    (all when None): only the window's frames are inflated."""
    n = frame_count(z, name)
    idx = np.arange(n) if window is None else np.asarray(window)
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        raise SampleError(f"member {z.member} has {n} frames, frames {idx.min()}..{idx.max()} requested")
    first = z[frame_member(name, int(idx[0]))]
    out = np.empty((len(idx),) + first.shape, first.dtype)
    out[0] = first
    for j, i in enumerate(idx[1:].tolist(), start=1):
        f = z[frame_member(name, i)]
        if f.shape != first.shape or f.dtype != first.dtype:
            raise SampleError(f"member {z.member}: frame {i} is {f.dtype} {f.shape}, frame {idx[0]} {first.dtype} {first.shape}")
        out[j] = f
    return out


def read_valid(z: NpzReader, n: int, height: int, width: int, window: np.ndarray | None = None) -> np.ndarray:
    """bool [T, H, W] validity of a valid.npz's `valid_packed` (np.packbits along the width: uint8
    [T, H, ceil(W / 8)]); only the window's frames are unpacked."""
    packed = z["valid_packed"]
    if packed.shape != (n, height, (width + 7) // 8) or packed.dtype != np.uint8:
        raise SampleError(f"member {z.member} valid_packed is {packed.dtype} {packed.shape}, expected uint8 "
                          f"{(n, height, (width + 7) // 8)}")
    if window is not None:
        packed = packed[window]
    return np.unpackbits(packed, axis=-1, count=width).view(bool)


def _npz_member(raw: dict, member: str, name: str) -> np.ndarray:
    return NpzReader(raw[member], member)[name]


def _json_member(raw: dict, member: str) -> dict:
    try:
        value = json.loads(raw[member].decode("utf-8"))
    except Exception as exc:
        raise SampleError(f"member {member} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise SampleError(f"member {member} must hold a JSON object")
    return value


def cameras(raw: dict, n: int) -> tuple[np.ndarray | None, np.ndarray | None]:
    if "cam.json" not in raw:
        return None, None
    cam = _json_member(raw, "cam.json")
    K = c2w = None
    if cam.get("intrinsics") is not None:
        K = np.asarray(cam["intrinsics"], np.float64)
        K = np.broadcast_to(K, (n, 3, 3)).copy() if K.shape == (3, 3) else K
        if K.shape != (n, 3, 3):
            raise SampleError(f"cam.json intrinsics have shape {K.shape}, expected ({n}, 3, 3) or (3, 3)")
    if cam.get("poses_c2w") is not None:
        c2w = np.asarray(cam["poses_c2w"], np.float64)
        if c2w.shape != (n, 4, 4):
            raise SampleError(f"cam.json poses_c2w have shape {c2w.shape}, expected ({n}, 4, 4)")
    for name, m in (("intrinsics", K), ("poses_c2w", c2w)):
        if m is not None and not np.isfinite(m).all():
            raise SampleError(f"cam.json {name} are not finite")
        if m is not None:  # unprojection and the pose's inverse would fail on it ("Singular matrix", no member named)
            singular = np.flatnonzero(np.abs(np.linalg.det(m)) < 1e-12)
            if singular.size:
                raise SampleError(f"cam.json {name} of frame {int(singular[0])} are singular (determinant 0)")
    return K, c2w


def open_video(data: bytes):
    import decord

    try:
        # one decode thread: the DataLoader's worker processes are the parallelism
        return decord.VideoReader(io.BytesIO(data), ctx=decord.cpu(0), num_threads=1)
    except Exception as exc:
        raise SampleError(f"member mp4 does not open as a video: {str(exc).splitlines()[0] if str(exc) else exc!r}") from None


def text_members(raw: dict) -> tuple[str, np.ndarray | None]:
    """(caption, float32 [L, D] text embedding or None) of a raw sample."""
    if "txt" not in raw:  # one4d shard writes one for every sample, empty captions too
        raise SampleError("missing member txt")
    try:
        caption = raw["txt"].decode("utf-8")  # one4d shard writes UTF-8: other bytes are damage (as inspect says)
    except UnicodeDecodeError as exc:
        raise SampleError(f"member txt is not UTF-8 text ({exc})") from None
    text_emb = None
    if "emb.npy" in raw:
        try:
            text_emb = np.load(io.BytesIO(raw["emb.npy"]), allow_pickle=False).astype(np.float32)
        except Exception as exc:
            raise SampleError(f"member emb.npy is not a readable npy: {why(exc)}") from None
        if text_emb.ndim != 2 or text_emb.shape[0] == 0:  # collate reads length 0 as "no embedding"
            raise SampleError(f"member emb.npy has shape {text_emb.shape}, expected [L, D] with L > 0")
    return caption, text_emb


def window_span(num_frames: int, frame_stride: int) -> int:
    """The source frames a window of `num_frames` taken every `frame_stride` spans, first to last."""
    return (num_frames - 1) * frame_stride + 1


def window_indices(n: int, num_frames: int, frame_stride: int, pinned: bool = False,
                   rng: np.random.Generator | None = None, start: int | None = None) -> np.ndarray:
    """Frame indices of a window of `num_frames` frames `frame_stride` apart in a clip of `n` frames: from
    `start` when given, else 0 when `pinned`, else a random start drawn from `rng`."""
    span = window_span(num_frames, frame_stride)
    if n < span:
        raise ShortClipError(f"clip has {n} frames, the window needs {span} (num_frames={num_frames}, "
                             f"frame_stride={frame_stride})")
    if start is None:
        start = 0 if pinned else int(rng.integers(0, n - span + 1))
    elif not 0 <= start <= n - span:
        raise SampleError(f"window start {start} does not fit a clip of {n} frames (span {span})")
    return start + frame_stride * np.arange(num_frames, dtype=np.int64)


# windows starting before this frame are decoded sequentially with PyAV from the stream's start: at 480p it is
# ~25% cheaper than decord's get_batch and gives identical pixels (both use FFmpeg's decoder and RGB24
# conversion); later windows use decord, which seeks to the nearest keyframe
SEQUENTIAL_START = 64


def cover_size(src_h: int, src_w: int, height: int, width: int) -> tuple[int, int]:
    """The size a src_h x src_w frame is resized to so that it covers height x width (aspect kept up to
    rounding: the tight side matches); the crop is taken from it (transforms.plan_crop)."""
    s = max(height / src_h, width / src_w)
    return max(height, round(src_h * s)), max(width, round(src_w * s))


def decode_window(data: bytes, idx: np.ndarray, n: int, source_hw: tuple[int, int] | None = None,
                  resized_hw: tuple[int, int] | None = None) -> np.ndarray:
    """uint8 [T, H, W, 3]: frames `idx` of an in-memory mp4 that should have `n` frames and, when given, size
    `source_hw` (SampleError if not). With `resized_hw` the frames are resized to it (bilinear, antialiased
    on downscale; pixel centres map as u -> (u + 0.5) s - 0.5, as in transforms) and planar in memory."""
    if resized_hw is not None and source_hw is not None and tuple(resized_hw) == tuple(source_hw):
        resized_hw = None
    if int(idx[0]) < SEQUENTIAL_START:
        frames = _decode_sequential(data, idx, n, source_hw, resized_hw)
        if frames is not None:
            return frames
    vr = open_video(data)
    if len(vr) != n:
        raise SampleError(f"video has {len(vr)} frames but the geometry has {n}")
    frames = decode_frames_at(vr, idx)
    _check_size(frames.shape[1:3], source_hw)
    return frames if resized_hw is None else _resize_rgb(frames, resized_hw)


def _check_size(hw, source_hw) -> None:
    if source_hw is not None and tuple(hw) != tuple(source_hw):
        raise SampleError(f"video is {hw[1]}x{hw[0]} but the geometry is {source_hw[1]}x{source_hw[0]}")


def resize_rgb(x, size: tuple[int, int]):
    """uint8 tensor [T, 3, H, W] (best a channels-last view: the fast uint8 path) -> [T, 3, h, w], bilinear,
    antialiased: the one RGB resize kernel (it matches swscale's BILINEAR to rounding: same pixel-centre
    mapping, same widened triangle on downscale)."""
    import torch.nn.functional as F

    return F.interpolate(x, size=tuple(size), mode="bilinear", antialias=True, align_corners=False)


def _resize_rgb(frames: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 [T, H, W, 3] -> [T, h, w, 3] by resize_rgb."""
    import torch

    return resize_rgb(torch.from_numpy(frames).permute(0, 3, 1, 2), size).permute(0, 2, 3, 1).numpy()


def _scaled_planes(scaler, frame, out: np.ndarray) -> None:
    """out uint8 [3, h, w] = the frame resized and converted to RGB in one swscale call. Planar GBR output
    (gbrp) takes swscale's full-chroma path: on the benchmark clip 45.7 dB PSNR against the resized source
    frames, where packed rgb24 output gives 41.2 dB and full-size rgb24 plus a separate resize 43.3 dB."""
    h, w = out.shape[1:]
    g = scaler.reformat(frame, width=w, height=h, format="gbrp", interpolation="BILINEAR", threads=1)
    for c, plane in zip((1, 2, 0), g.planes):  # gbrp planes are G, B, R
        out[c] = np.frombuffer(plane, np.uint8).reshape(h, plane.line_size)[:, :w]


def _check_upright(frame) -> None:
    """SampleError for a PyAV frame whose display matrix turns it (a clip sharded before `one4d shard` refused such
    videos): PyAV leaves the turn unapplied where decord, which the shard check used, applies it."""
    turn = display_rotation(frame)
    if turn:
        raise SampleError(f"the video carries a display rotation of {turn}, which decord applies and PyAV does not: "
                          f"re-encode it with the rotation applied ({REENCODE}) and re-shard it")


def _decode_sequential(data: bytes, idx: np.ndarray, n: int, source_hw: tuple[int, int] | None,
                       resized_hw: tuple[int, int] | None) -> np.ndarray | None:
    """PyAV, one thread, frames counted in presentation order from the first; None (use decord) when the
    container does not state `n` frames or holds several video streams. Frames are resized to `resized_hw` by
    swscale when given. A display rotation, which PyAV leaves unapplied, is a SampleError.

    Frames are converted by a scaler of this call's, on one thread, never by `frame.to_ndarray(format=...)`: PyAV
    (18.1.1 on) keeps one swscale context per thread for that, slice threads included, and a DataLoader worker
    forked from a main thread that had used it (an in-process decode, any library's conversion) inherits the
    context without its threads and waits for them forever at its first frame."""
    import av
    from av.video.reformatter import VideoReformatter

    want = {int(i): j for j, i in enumerate(idx)}
    last, out, seen, hw = int(idx[-1]), None, -1, None
    scaler = VideoReformatter()
    try:
        with av.open(io.BytesIO(data)) as container:
            stream = container.streams.video[0]
            if stream.frames != n or len(container.streams.video) > 1:  # decord picks among several, as sharding did
                return None
            stream.thread_type = "NONE"
            stream.codec_context.thread_count = 1
            for seen, frame in enumerate(_shown_frames(container, stream, data, n)):
                if hw is None:
                    _check_upright(frame)
                hw = hw or (frame.height, frame.width)
                if source_hw is not None and hw != tuple(source_hw):
                    break
                j = want.get(seen)
                if j is not None and resized_hw is not None:
                    if out is None:
                        out = np.empty((len(idx), 3) + tuple(resized_hw), np.uint8)
                    _scaled_planes(scaler, frame, out[j])
                elif j is not None:
                    a = scaler.reformat(frame, format="rgb24", threads=1).to_ndarray()
                    if out is None:
                        out = np.empty((len(idx),) + a.shape, np.uint8)
                    out[j] = a
                if seen >= last:
                    break
    except SampleError:
        raise
    except Exception as exc:
        raise SampleError(f"member mp4 does not decode: {str(exc).splitlines()[0] if str(exc) else exc!r}") from None
    if hw is not None:
        _check_size(hw, source_hw)
    if seen < last or out is None:
        raise SampleError(f"member mp4 decodes to {seen + 1} frames, the window needs frame {last}")
    return out if resized_hw is None else out.transpose(0, 2, 3, 1)


def _shown_frames(container, stream, data: bytes, n: int):
    """container.decode(stream), packet by packet: a packet its edit list hides (a stream-copy cut's; they come
    first) is a SampleError, since PyAV would drop its frame where decord, which sharding checked the clip with,
    counts it, and the window would come shifted against its geometry (a clip sharded before `one4d shard` refused
    such videos)."""
    for packet in container.demux(stream):
        if packet.size and packet.is_discard:
            raise SampleError(f"member mp4: {hidden_frames_problem(hidden_frames(data), n)} (then re-shard it)")
        yield from packet.decode()


def decode_frames_at(vr, idx: np.ndarray) -> np.ndarray:
    try:
        return vr.get_batch(idx.tolist()).asnumpy()
    except Exception as exc:
        raise SampleError(f"member mp4 does not decode: {str(exc).splitlines()[0] if str(exc) else exc!r}") from None


def decode_clip(raw: dict, num_frames: int, frame_stride: int, rng: np.random.Generator | None,
                start: int | None = None, size: tuple[int, int] | None = None) -> DecodedClip:
    """Decode a window of `num_frames` frames, `frame_stride` apart, starting at a random frame (from `rng`),
    or at `start` when given (the fixed window of precomputed latents). With `size` (the training crop's
    height, width) the frames come resized to cover_size(H, W, *size), ready for transforms' crop.

    Pointmap (xyz) geometry is stored in the clip's first frame's camera. With known poses it is re-expressed
    in the first sampled frame's camera; without poses it cannot be, so the window then always starts at
    frame 0 (where the stored frame is the first sampled one).
    """
    if "mp4" not in raw:
        raise SampleError(f"missing member mp4 (has {sorted(k for k in raw if not k.startswith('__'))})")
    if "depth.npz" in raw:
        geometry = "depth"
    elif "xyz.npz" in raw:
        geometry = "xyz"
    else:
        raise SampleError("missing geometry member depth.npz or xyz.npz")

    gz = NpzReader(raw[f"{geometry}.npz"], f"{geometry}.npz")
    n = frame_count(gz, geometry)
    K, c2w = cameras(raw, n)
    if geometry == "depth" and (K is None or c2w is None):
        raise SampleError("depth geometry needs cam.json with intrinsics and poses_c2w")
    idx = window_indices(n, num_frames, frame_stride, pinned=geometry == "xyz" and c2w is None, rng=rng, start=start)
    geo = read_frames(gz, geometry, idx)
    want_ndim = 3 if geometry == "depth" else 4
    if geo.ndim != want_ndim or (geometry == "xyz" and geo.shape[-1] != 3) or geo.dtype.kind != "f":
        raise SampleError(f"member {geometry}.npz array is {geo.dtype} {geo.shape[1:]} per frame, expected float "
                          f"{'[H, W]' if geometry == 'depth' else '[H, W, 3]'}")
    hw = geo.shape[1:3]
    resized = None if size is None else cover_size(*hw, *size)
    frames = decode_window(raw["mp4"], idx, n, hw, resized)  # checks the video's frame count and size too
    if geometry == "depth":
        valid = None  # the writer stores 0 wherever the mask is false, so depth > 0 is the mask
    elif "valid.npz" in raw:
        valid = read_valid(NpzReader(raw["valid.npz"], "valid.npz"), n, *hw, window=idx)
    else:  # one4d shard writes one for every sample: no mask is a damaged sample, not an all-valid one
        raise SampleError("missing member valid.npz")

    nan = np.full((num_frames, 4, 4), np.nan)
    rel = nan if c2w is None else np.linalg.inv(c2w[idx[0]]) @ c2w[idx]
    to_ref = None
    if geometry == "xyz" and c2w is not None and idx[0] != 0:
        to_ref = np.linalg.inv(c2w[idx[0]]) @ c2w[0]

    caption, text_emb = text_members(raw)
    return DecodedClip(frames=frames, depth=geo if geometry == "depth" else None,
                       xyz=geo if geometry == "xyz" else None, xyz_to_ref=to_ref, valid=valid,
                       intrinsics=K[idx] if K is not None else nan[:, :3, :3].copy(), poses_c2w=rel,
                       caption=caption, text_emb=text_emb, frame_indices=idx)
