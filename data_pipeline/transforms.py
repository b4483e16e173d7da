"""Decoded clip -> training sample: one resize + crop for RGB and geometry, intrinsics that follow it,
pointmaps in the first sampled frame's camera, normalised to [-1, 1] (docs/data.md, "Samples").

Resize covers the target (the smaller scale side matches), then a random or centre crop. RGB is resized
bilinearly with antialiasing on uint8 (by the decoder when decode_clip was given the size, else here);
depth, pointmaps and validity are resized by nearest neighbour (pixel-centre convention of geometry.py), so
no value is invented across a depth edge.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import get_worker_info

from data_pipeline import shm_pool
from data_pipeline.decode import DecodedClip, SampleError, cover_size, resize_rgb
from data_pipeline.geometry import pointmap_normalisation

# normalisation percentiles are estimated on a regular pixel grid of at most this many points (2^18: at
# 81 x 352 x 624 a stride-9 grid of ~230k pixels). Measured on the benchmark clip against all 17.8M pixels:
# centre off by 0.7% of the scale and scale by 0.3% (2^20: 0.3% and 0.3%); the transform travels with the
# sample, so this only moves the box slightly. Cost ~35 ms instead of ~110 ms at 2^20.
NORMALISATION_POINTS = 1 << 18


@dataclass(frozen=True)
class Crop:
    resized_h: int
    resized_w: int
    top: int
    left: int
    height: int
    width: int


def plan_crop(src_h: int, src_w: int, height: int, width: int, mode: str, rng: np.random.Generator) -> Crop:
    """Resize so that height x width is covered, then crop `mode` ('random' or 'center')."""
    rh, rw = cover_size(src_h, src_w, height, width)
    if mode == "center":
        top, left = (rh - height) // 2, (rw - width) // 2
    elif mode == "random":
        top, left = int(rng.integers(0, rh - height + 1)), int(rng.integers(0, rw - width + 1))
    else:
        raise ValueError(f"crop mode must be 'random' or 'center', got {mode!r}")
    return Crop(rh, rw, top, left, height, width)


def crop_intrinsics(K: np.ndarray, src_h: int, src_w: int, crop: Crop) -> np.ndarray:
    """Intrinsics [..., 3, 3] after the resize and crop. A scale s maps pixel u -> (u + 0.5) s - 0.5."""
    sx, sy = crop.resized_w / src_w, crop.resized_h / src_h
    A = np.array([[sx, 0.0, 0.5 * sx - 0.5 - crop.left], [0.0, sy, 0.5 * sy - 0.5 - crop.top], [0.0, 0.0, 1.0]])
    return A @ np.asarray(K, np.float64)


def nearest_index(src: int, resized: int, offset: int, size: int) -> np.ndarray:
    """Source index of each output pixel for a nearest resize src -> resized, then a crop [offset, offset+size)."""
    dst = np.arange(offset, offset + size, dtype=np.float64)
    return np.minimum(np.floor((dst + 0.5) * src / resized), src - 1).astype(np.int64)


def resize_crop_nearest(x: np.ndarray, crop: Crop) -> np.ndarray:
    """[T, H, W, ...] -> [T, crop.height, crop.width, ...] by nearest neighbour: every output value is an input value."""
    rows = nearest_index(x.shape[1], crop.resized_h, crop.top, crop.height)
    cols = nearest_index(x.shape[2], crop.resized_w, crop.left, crop.width)
    # two takes keep C order (a broadcast fancy index returns a strided array that is slow to compute on)
    return np.take(np.take(x, rows, axis=1), cols, axis=2)


def resize_crop_rgb(frames: np.ndarray, crop: Crop) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> uint8 [T, 3, crop.height, crop.width] (bilinear, antialiased); frames already at
    the crop's resized size are only cropped."""
    x = torch.from_numpy(frames).permute(0, 3, 1, 2)  # a channels-last view: the fast uint8 resize path
    if x.shape[-2:] != (crop.resized_h, crop.resized_w):
        x = resize_rgb(x, (crop.resized_h, crop.resized_w))
    return x[:, :, crop.top:crop.top + crop.height, crop.left:crop.left + crop.width]


def rgb_output(frames: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """uint8 [T, 3, H, W] -> [-1, 1] in `dtype` (shared memory in a worker), one pass per frame."""
    out = output_tensor(tuple(frames.shape), dtype)
    minus_one = torch.tensor(-1.0)
    for i in range(frames.shape[0]):
        torch.add(minus_one, frames[i], alpha=1 / 127.5, out=out[i])
    return out


def pointmap_affine(K, rel_c2w, centre, scale: float) -> np.ndarray:
    """float32 [3, 4] taking (u d, v d, d, 1) of a pixel (u, v) with z-depth d in a camera with intrinsics K and
    pose rel_c2w (relative to the reference camera) to its normalised pointmap (X - centre) / scale."""
    rel = np.asarray(rel_c2w, np.float64)
    M = rel[:3, :3] @ np.linalg.inv(np.asarray(K, np.float64)) / scale
    t = (rel[:3, 3] - np.asarray(centre, np.float64)) / scale
    return np.concatenate([M, t[:, None]], axis=1).astype(np.float32)


def camera_pointmaps(depth: torch.Tensor, K: torch.Tensor, rel_c2w: torch.Tensor) -> torch.Tensor:
    """z-depth [T, H, W], intrinsics [T, 3, 3], poses relative to the reference camera [T, 4, 4] ->
    pointmaps [T, 3, H, W] in the reference camera (geometry.depth_to_pointmaps, channels first, float32)."""
    out = torch.empty((depth.shape[0], 3) + depth.shape[1:])
    for i in range(depth.shape[0]):
        _pointmap_into(out[i], depth[i].float(), pointmap_affine(K[i], rel_c2w[i], np.zeros(3), 1.0))
    return out


def _pointmap_into(out: torch.Tensor, depth: torch.Tensor, affine: np.ndarray,
                   scratch: torch.Tensor | None = None, keep: torch.Tensor | None = None) -> None:
    """out [3, H, W] (contiguous) = affine (pointmap_affine) applied to one frame of z-depth [H, W] (any float
    dtype): (u d, v d, d, 1) in a float32 scratch [4, H, W], then one 3x4 matmul, which is ~2.4x faster than
    building each channel from its own ray. With `keep` (bool [H, W]; depth must be 0 where it is False) the
    fourth channel is the mask, so out is 0 outside it without a pass of its own."""
    H, W = depth.shape
    buf = torch.empty(4, H, W) if scratch is None else scratch
    buf[2].copy_(depth)
    torch.mul(buf[2], torch.arange(W, dtype=torch.float32).view(1, W), out=buf[0])
    torch.mul(buf[2], torch.arange(H, dtype=torch.float32).view(H, 1), out=buf[1])
    if keep is None:
        buf[3].fill_(1.0)
    else:
        buf[3].copy_(keep)
    torch.mm(torch.from_numpy(affine), buf.view(4, -1), out=out.view(3, -1))


def output_tensor(shape: tuple[int, ...], dtype=torch.float32) -> torch.Tensor:
    """An empty tensor; in a DataLoader worker it lives in shared memory, so handing it to the main
    process costs no copy (the large rgb/xyz outputs are hundreds of MB per clip), and comes from the
    worker's pool of reused buffers when it has one (shm_pool)."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    pooled = shm_pool.take(shape, dtype)
    if pooled is not None:
        return pooled
    proto = torch.empty(0, dtype=dtype)
    return proto.new(proto._typed_storage()._new_shared(math.prod(shape))).view(shape)


def _grid(valid: np.ndarray, limit: int) -> int:
    """Spatial stride of the subsample that estimates the normalisation percentiles."""
    return max(1, math.ceil(math.sqrt(valid.size / limit)))


# a grid holding fewer valid pixels than this (and than the mask has) leaves the percentiles to too few points
MIN_GRID_POINTS = 1024


def _off_grid_pixels(valid: np.ndarray, k: int) -> tuple[np.ndarray, ...] | None:
    """None where the k-strided grid holds its share of the valid pixels, and enough of them (the normalisation is
    estimated on it); else (t, v, u) of at most NORMALISATION_POINTS valid pixels, evenly strided over all of
    them: a mask the grid misses or barely meets (valid on every other column, an object a few grid steps across)
    left the percentiles to a few points or none, and clipped every valid point to the box's faces."""
    total = np.count_nonzero(valid)
    seen = np.count_nonzero(valid[:, ::k, ::k]) if k > 1 else total
    if seen == total or (seen >= MIN_GRID_POINTS and 4 * k * k * seen >= total):
        return None
    idx = np.flatnonzero(valid)  # ~0.1 s at 81 x 352 x 624: only for such masks
    return np.unravel_index(idx[::math.ceil(len(idx) / NORMALISATION_POINTS)], valid.shape)


def positive_finite(depth: np.ndarray) -> np.ndarray:
    """depth > 0 and finite, elementwise. For float16 on its bit pattern (numpy's float16 comparisons are
    slow): a positive finite half has bits in [1, 0x7BFF], so bits - 1 (wrapping) is below 0x7BFF."""
    if depth.dtype == np.float16:
        bits = depth.view(np.uint16) - np.uint16(1)
        return bits < np.uint16(0x7BFF)
    return np.isfinite(depth) & (depth > 0)


@dataclass
class Geometry:
    """A clip's cropped geometry, one affine map per frame away from its normalised pointmaps (finish.py
    applies the same maps on the training device)."""
    kind: str  # "depth": z-depth [T, H, W], 0 outside `valid`; "points": xyz [T, H, W, 3], 0 where not finite
    values: np.ndarray
    valid: np.ndarray  # bool [T, H, W]
    affine: np.ndarray  # float32 [T, 3, 4]: depth: A (u d, v d, d, valid); points: (A (x, y, z, 1)) * valid
    centre: np.ndarray  # float32 [3], metric = normalised * scale + centre
    scale: float

    def frame_into(self, out: torch.Tensor, i: int, scratch: torch.Tensor) -> None:
        """out [3, H, W] = frame i's normalised pointmap (0 outside the mask; not clamped)."""
        if self.kind == "depth":
            _pointmap_into(out, torch.from_numpy(self.values[i]), self.affine[i], scratch,
                           torch.from_numpy(self.valid[i]))
            return
        A = torch.from_numpy(self.affine[i])
        p = torch.from_numpy(self.values[i]).float().permute(2, 0, 1).reshape(3, -1)
        torch.mm(A[:, :3], p, out=out.view(3, -1))
        out.add_(A[:, 3].view(3, 1, 1)).mul_(torch.from_numpy(self.valid[i]))


def _depth_geometry(clip: DecodedClip, crop: Crop, K: np.ndarray, percentiles) -> Geometry:
    depth = resize_crop_nearest(clip.depth, crop)
    valid = positive_finite(depth)
    if clip.valid is not None:
        valid &= resize_crop_nearest(clip.valid, crop)
    # depth 0 outside the mask (a bit-and on float16): pointmap values are finite and 0 there (_pointmap_into)
    if depth.dtype == np.float16:
        np.bitwise_and(depth.view(np.uint16), np.negative(valid.view(np.uint8), dtype=np.uint16),
                       out=depth.view(np.uint16))
    else:
        depth = np.where(valid, depth, 0).astype(depth.dtype)
    k = _grid(valid, NORMALISATION_POINTS)
    pixels = _off_grid_pixels(valid, k)
    if pixels is None:
        # pixel (u, v) of the k-strided grid is pixel (k u, k v) of the crop: intrinsics divide by k, no shift
        K_sub = np.diag([1 / k, 1 / k, 1.0]) @ K
        sub = torch.from_numpy(depth[:, ::k, ::k].astype(np.float32))
        sub = camera_pointmaps(sub, torch.from_numpy(K_sub), torch.from_numpy(clip.poses_c2w))
        centre, scale = pointmap_normalisation(sub.permute(0, 2, 3, 1).numpy(), valid[:, ::k, ::k],
                                               tuple(percentiles))
    else:
        t, v, u = pixels
        d = depth[t, v, u].astype(np.float64)
        A = np.stack([pointmap_affine(K[i], clip.poses_c2w[i], np.zeros(3), 1.0) for i in range(len(depth))])
        pts = np.einsum("nij,nj->ni", A[t].astype(np.float64), np.stack([u * d, v * d, d, np.ones_like(d)], -1))
        centre, scale = pointmap_normalisation(pts, None, tuple(percentiles))
    affine = np.stack([pointmap_affine(K[i], clip.poses_c2w[i], centre, scale) for i in range(len(depth))])
    return Geometry("depth", depth, valid, affine, centre, scale)


def _points_geometry(clip: DecodedClip, crop: Crop, percentiles) -> Geometry:
    pts = resize_crop_nearest(clip.xyz, crop)
    to_ref = np.eye(4) if clip.xyz_to_ref is None else np.asarray(clip.xyz_to_ref, np.float64)
    finite = np.isfinite(pts).all(-1)
    if not finite.all():  # masking is a multiply: keep non-finite values out of the products
        pts = np.where(finite[..., None], pts, 0).astype(pts.dtype)
    valid = finite if clip.valid is None else resize_crop_nearest(clip.valid, crop) & finite
    k = _grid(valid, NORMALISATION_POINTS)
    pixels = _off_grid_pixels(valid, k)
    R, t = torch.from_numpy(to_ref[:3, :3]).float(), torch.from_numpy(to_ref[:3, 3]).float()
    sel = np.s_[:, ::k, ::k] if pixels is None else pixels
    sub = torch.from_numpy(pts[sel].astype(np.float32)) @ R.T + t
    centre, scale = pointmap_normalisation(sub.numpy(), valid[sel], tuple(percentiles))
    A = np.concatenate([to_ref[:3, :3], (to_ref[:3, 3] - centre)[:, None]], axis=1) / scale
    affine = np.broadcast_to(A.astype(np.float32), (len(pts), 3, 4)).copy()
    return Geometry("points", pts, valid, affine, centre, scale)


def clip_geometry(clip: DecodedClip, crop: Crop, K: np.ndarray, percentiles) -> Geometry:
    """The clip's geometry resized/cropped by `crop` (nearest), its mask, and its normalisation: per-axis
    geometry.pointmap_normalisation of the valid points on a regular subsample of at most
    NORMALISATION_POINTS pixels (all of them for clips that small; strided over the valid pixels themselves
    where the grid misses the mask, _off_grid_pixels). Centre 0 and scale 1 where no pixel is valid."""
    if clip.depth is not None:
        return _depth_geometry(clip, crop, K, percentiles)
    return _points_geometry(clip, crop, percentiles)


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _prepare(clip: DecodedClip, height: int, width: int, crop_mode: str, percentiles,
             rng: np.random.Generator, empty_ok: bool = False) -> tuple[Crop, Geometry, dict]:
    """What both sample forms share: the crop, the clip's geometry (clip_geometry) and the sample keys that do
    not depend on the form (mask, normalisation, cameras, caption, text embedding). A window with no valid pixel
    is a SampleError (skipped and counted: its xyz branch would train on nothing) unless `empty_ok` (a benchmark's
    sequence, whose depth then scores NaN and its cameras and frames still score)."""
    src_h, src_w = clip.source_hw
    crop = plan_crop(src_h, src_w, height, width, crop_mode, rng)
    K = crop_intrinsics(clip.intrinsics, src_h, src_w, crop)
    geo = clip_geometry(clip, crop, K, percentiles)
    if not empty_ok and not geo.valid.any():
        raise SampleError(f"no valid geometry in the window's {len(geo.valid)} frames at the crop (depth 0 or "
                          f"masked out everywhere), so its xyz branch would train on nothing")
    mask = output_tensor((geo.valid.shape[0], 1) + geo.valid.shape[1:], torch.bool)
    mask.copy_(torch.from_numpy(geo.valid).unsqueeze(1))
    sample = {
        "valid": mask,
        "xyz_centre": torch.from_numpy(geo.centre),
        "xyz_scale": torch.tensor(geo.scale, dtype=torch.float32),
        "intrinsics": torch.from_numpy(K.astype(np.float32)),
        "poses_c2w": torch.from_numpy(clip.poses_c2w.astype(np.float32)),
        "caption": clip.caption,
    }
    if clip.text_emb is not None:
        sample["text_emb"] = torch.from_numpy(clip.text_emb)
    return crop, geo, sample


def to_sample(clip: DecodedClip, height: int, width: int, crop_mode: str, percentiles,
              rng: np.random.Generator, dtype: str = "float32", empty_ok: bool = False) -> dict:
    """The sample dict of docs/data.md (without the origin keys the reader adds); rgb and xyz in `dtype`.
    Pointmaps are normalised as clip_geometry says; invalid pixels are 0. `empty_ok`: see _prepare."""
    T = clip.frames.shape[0]
    crop, geo, sample = _prepare(clip, height, width, crop_mode, percentiles, rng, empty_ok)
    frames = resize_crop_rgb(clip.frames, crop)
    out_dtype = DTYPES[dtype]
    rgb, xyz = output_tensor((T, 3, height, width), out_dtype), output_tensor((T, 3, height, width), out_dtype)
    # frame by frame in a float32 scratch while the frame is in cache; the output (shared memory in a
    # worker, slow to fault in when fresh) is written once per value
    scratch, scratch4 = torch.empty(3, height, width), torch.empty(4, height, width)
    minus_one = torch.tensor(-1.0)
    for i in range(T):
        geo.frame_into(scratch, i, scratch4)  # 0 outside the mask
        if out_dtype == torch.float32:
            torch.clamp(scratch, -1.0, 1.0, out=xyz[i])
        else:
            xyz[i].copy_(scratch.clamp_(-1.0, 1.0))
        torch.add(minus_one, frames[i], alpha=1 / 127.5, out=rgb[i])  # uint8 -> [-1, 1] in one pass
    return {"rgb": rgb, "xyz": xyz, **sample}


def to_staged_sample(clip: DecodedClip, height: int, width: int, crop_mode: str, percentiles,
                     rng: np.random.Generator) -> dict:
    """to_sample's work up to the per-pixel float passes, which finish.finish_batch does on the training
    device (data.finish_on_device): `rgb_u8` uint8 [T, 3, H, W] instead of `rgb`, and instead of `xyz` the
    cropped geometry (`depth` [T, H, W] or `points` [T, H, W, 3], in the stored dtype) with `xyz_affine`
    float32 [T, 3, 4]. The same crop, mask and normalisation as to_sample for the same rng."""
    T = clip.frames.shape[0]
    crop, geo, sample = _prepare(clip, height, width, crop_mode, percentiles, rng)
    rgb = output_tensor((T, 3, height, width), torch.uint8)
    rgb.copy_(resize_crop_rgb(clip.frames, crop))
    values = output_tensor(geo.values.shape, torch.from_numpy(geo.values[:0]).dtype)
    values.numpy()[...] = geo.values
    return {"rgb_u8": rgb, geo.kind: values, "xyz_affine": torch.from_numpy(geo.affine), **sample}
