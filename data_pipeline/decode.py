"""Raw shard sample (member bytes) -> the sampled frame window and its geometry, as numpy arrays.

Only the frames of the window are decoded (decord `get_batch` on an in-memory mp4). Nothing is unpickled:
npz/npy members load with `allow_pickle=False`, cameras come from JSON.
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass

import numpy as np


class SampleError(ValueError):
    """A shard sample that cannot be used; the reader logs it with its shard and key and skips it."""


@dataclass
class DecodedClip:
    """The sampled window at source resolution. Geometry stays in its stored dtype and is not yet masked:
    transforms resize first and then check finiteness, so full-resolution passes are avoided."""
    frames: np.ndarray  # uint8 [T, H, W, 3]
    depth: np.ndarray | None  # [T, H, W] z-depth (depth geometry)
    xyz: np.ndarray | None  # [T, H, W, 3] pointmaps in the clip's first frame's camera (pointmap geometry)
    xyz_to_ref: np.ndarray | None  # 4x4 taking xyz into the first sampled frame's camera (None: already there)
    valid: np.ndarray  # bool [T, H, W], the stored mask (all True when absent)
    intrinsics: np.ndarray  # float64 [T, 3, 3], NaN when unknown
    poses_c2w: np.ndarray  # float64 [T, 4, 4] relative to the first sampled frame, NaN when unknown
    caption: str
    text_emb: np.ndarray | None  # float32 [L, D]
    frame_indices: np.ndarray  # int64 [T] indices into the source clip


def _npz_member(raw: dict, member: str, name: str) -> np.ndarray:
    try:
        with np.load(io.BytesIO(raw[member]), allow_pickle=False) as z:
            if name not in z.files:
                raise SampleError(f"member {member} has no array '{name}' (has {z.files})")
            return z[name]
    except SampleError:
        raise
    except Exception as exc:
        raise SampleError(f"member {member} is not a readable npz: {exc}") from None


def _json_member(raw: dict, member: str) -> dict:
    try:
        value = json.loads(raw[member].decode("utf-8"))
    except Exception as exc:
        raise SampleError(f"member {member} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise SampleError(f"member {member} must hold a JSON object")
    return value


def _cameras(raw: dict, n: int) -> tuple[np.ndarray | None, np.ndarray | None]:
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
    return K, c2w


def _open_video(data: bytes):
    import decord

    try:
        # one decode thread: the DataLoader's worker processes are the parallelism
        return decord.VideoReader(io.BytesIO(data), ctx=decord.cpu(0), num_threads=1)
    except Exception as exc:
        raise SampleError(f"member mp4 does not open as a video: {str(exc).splitlines()[0] if str(exc) else exc!r}") from None


def decode_clip(raw: dict, num_frames: int, frame_stride: int, rng: np.random.Generator) -> DecodedClip:
    """Decode a window of `num_frames` frames, `frame_stride` apart, starting at a random frame (from `rng`).

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

    vr = _open_video(raw["mp4"])
    n = len(vr)
    geo = _npz_member(raw, f"{geometry}.npz", geometry)
    want_ndim = 3 if geometry == "depth" else 4
    if geo.ndim != want_ndim or (geometry == "xyz" and geo.shape[-1] != 3) or geo.dtype.kind != "f":
        raise SampleError(f"member {geometry}.npz array is {geo.dtype} {geo.shape}, expected float "
                          f"{'[T, H, W]' if geometry == 'depth' else '[T, H, W, 3]'}")
    if geo.shape[0] != n:
        raise SampleError(f"video has {n} frames but {geometry}.npz has {geo.shape[0]}")
    K, c2w = _cameras(raw, n)
    if geometry == "depth" and (K is None or c2w is None):
        raise SampleError("depth geometry needs cam.json with intrinsics and poses_c2w")

    span = (num_frames - 1) * frame_stride + 1
    if n < span:
        raise SampleError(f"clip has {n} frames, the window needs {span} (num_frames={num_frames}, "
                          f"frame_stride={frame_stride})")
    pinned = geometry == "xyz" and c2w is None
    start = 0 if pinned else int(rng.integers(0, n - span + 1))
    idx = start + frame_stride * np.arange(num_frames, dtype=np.int64)

    try:
        frames = vr.get_batch(idx.tolist()).asnumpy()
    except Exception as exc:
        raise SampleError(f"member mp4 does not decode: {str(exc).splitlines()[0] if str(exc) else exc!r}") from None
    if frames.shape[1:3] != geo.shape[1:3]:
        raise SampleError(f"video is {frames.shape[2]}x{frames.shape[1]} but {geometry}.npz is "
                          f"{geo.shape[2]}x{geo.shape[1]}")

    window = slice(int(idx[0]), int(idx[-1]) + 1, frame_stride)
    if "valid.npz" in raw:
        valid = _npz_member(raw, "valid.npz", "valid")
        if valid.shape != (n,) + frames.shape[1:3]:
            raise SampleError(f"member valid.npz has shape {valid.shape}, expected {(n,) + frames.shape[1:3]}")
        valid = valid[window].astype(bool, copy=False)
    else:
        valid = np.ones((num_frames,) + frames.shape[1:3], bool)

    nan = np.full((num_frames, 4, 4), np.nan)
    rel = nan if c2w is None else np.linalg.inv(c2w[idx[0]]) @ c2w[idx]
    to_ref = None
    if geometry == "xyz" and c2w is not None and idx[0] != 0:
        to_ref = np.linalg.inv(c2w[idx[0]]) @ c2w[0]

    caption = raw["txt"].decode("utf-8", errors="replace") if "txt" in raw else ""
    text_emb = None
    if "emb.npy" in raw:
        try:
            text_emb = np.load(io.BytesIO(raw["emb.npy"]), allow_pickle=False).astype(np.float32)
        except Exception as exc:
            raise SampleError(f"member emb.npy is not a readable npy: {exc}") from None
        if text_emb.ndim != 2:
            raise SampleError(f"member emb.npy has shape {text_emb.shape}, expected [L, D]")
    return DecodedClip(frames=frames, depth=geo[window] if geometry == "depth" else None,
                       xyz=geo[window] if geometry == "xyz" else None, xyz_to_ref=to_ref, valid=valid,
                       intrinsics=K[idx] if K is not None else nan[:, :3, :3].copy(), poses_c2w=rel,
                       caption=caption, text_emb=text_emb, frame_indices=idx)
