"""Benchmark readers (Sintel, Bonn RGB-D Dynamic, TUM RGB-D): on-disk formats -> `Sequence`s in the project's
conventions (OpenCV camera axes, z-depth in metres, camera-to-world poses, intrinsics in pixels)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np


@dataclass
class Sequence:
    name: str
    rgb: np.ndarray  # uint8 [T, H, W, 3]
    depth: np.ndarray | None  # float32 [T, H, W] metres, 0 = no measurement
    intrinsics: np.ndarray | None  # float64 [T, 3, 3], None when unknown
    poses_c2w: np.ndarray | None  # float64 [T, 4, 4], None when unknown
    timestamps: np.ndarray | None = None  # float64 [T] seconds, where the format has them


def read_rgb(path) -> np.ndarray:
    """An image file as RGB uint8 [H, W, 3]; ValueError naming the file where it does not read (PIL's "image file
    is truncated" named none)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except (OSError, ValueError, SyntaxError) as exc:
        raise ValueError(f"{path}: not a readable image ({exc})") from None


def stack_frames(arrays: list[np.ndarray], paths: list, what: str) -> np.ndarray:
    """One sequence's per-frame arrays stacked; ValueError naming the first file whose size is not the first's
    (numpy's "all input arrays must have the same shape" named none)."""
    h, w = arrays[0].shape[:2]
    for array, path in zip(arrays, paths):
        if array.shape[:2] != (h, w):
            raise ValueError(f"{path}: {what} of {array.shape[1]}x{array.shape[0]}, the sequence's first "
                             f"({paths[0]}) {w}x{h}")
    return np.stack(arrays)


def check_depth_size(rgb: np.ndarray, depth: np.ndarray, depth_path) -> None:
    """Depth maps at the frames' resolution (scored pixel by pixel, another size scored other pixels)."""
    if depth.shape[1:3] != rgb.shape[1:3]:
        raise ValueError(f"{depth_path}: depth of {depth.shape[2]}x{depth.shape[1]}, its frames are "
                         f"{rgb.shape[2]}x{rgb.shape[1]}")


def frame_window(n: int, start: int = 0, stride: int = 1, max_frames: int = 0) -> list[int]:
    """Indices start, start + stride, ... (at most max_frames; 0 = all) of n frames."""
    idx = list(range(start, n, max(stride, 1)))
    return idx[:max_frames] if max_frames > 0 else idx


LAYOUTS = {"sintel": "ROOT/training/final/<sequence>/frame_*.png with training/depth and training/camdata_left",
           "bonn": "ROOT/<sequence>/ with rgb/, depth/, rgb.txt, depth.txt and groundtruth.txt",
           "tum": "ROOT/rgbd_dataset_freiburgN_<name>/ with rgb/, depth/, rgb.txt, depth.txt and groundtruth.txt"}


def _reader(name: str):
    """(read, list) functions of benchmark `name`."""
    if name == "sintel":
        from one4d_train.eval.readers.sintel import list_sintel, read_sintel
        return read_sintel, list_sintel
    if name == "bonn":
        from one4d_train.eval.readers.bonn import read_bonn
        from one4d_train.eval.readers.tum import list_tum
        return read_bonn, list_tum
    if name == "tum":
        from one4d_train.eval.readers.tum import list_tum, read_tum
        return read_tum, list_tum
    raise ValueError(f"benchmark must be sintel, bonn or tum, got {name!r}")


def benchmark_sequences(name: str, root) -> list[str]:
    """The names of benchmark `name`'s sequences under `root`, from folder listings alone (no frame read); a root
    holding none raises ValueError saying the layout the reader expects."""
    try:
        names = _reader(name)[1](root)
    except OSError as exc:
        names, why = [], f" ({exc})"
    else:
        why = ""
    if not names:
        raise ValueError(f"{root}: no {name} sequence there{why}; the reader expects {LAYOUTS[name]}")
    return names


def read_benchmark(name: str, root, sequences=None, **window) -> Iterator[Sequence]:
    """Sequences of benchmark `name` (sintel | bonn | tum) under `root` (`sequences`: these names only, in this
    order; None: every one); `window`: start, stride, max_frames."""
    return _reader(name)[0](root, sequences=sequences, **window)


def to_sample(seq: Sequence, height: int, width: int, percentiles=(2.0, 98.0), max_depth: float = np.inf) -> dict:
    """A benchmark sequence as a sample dict of docs/data.md (centre crop, poses relative to the first frame,
    pointmaps normalised as the data pipeline does over 0 < depth < max_depth, so that sky and far
    outliers do not set the scale), plus `depth` [T, H, W]: the resized ground-truth depth before any
    clipping, which scoring uses."""
    import torch

    from data_pipeline.decode import DecodedClip
    from data_pipeline.transforms import plan_crop, resize_crop_nearest, to_sample as clip_to_sample

    if seq.intrinsics is None or seq.depth is None:
        raise ValueError(f"{seq.name}: scoring needs depth and intrinsics")
    T = len(seq.rgb)
    poses = np.full((T, 4, 4), np.nan) if seq.poses_c2w is None else np.linalg.inv(seq.poses_c2w[0]) @ seq.poses_c2w
    clip = DecodedClip(frames=seq.rgb, depth=seq.depth, xyz=None, xyz_to_ref=None, valid=(seq.depth > 0) & (seq.depth < max_depth),
                       intrinsics=np.asarray(seq.intrinsics, np.float64), poses_c2w=poses, caption="",
                       text_emb=None, frame_indices=np.arange(T))
    rng = np.random.default_rng(0)
    # a window with no valid depth (under the cap) still scores its cameras and frames; its depth scores NaN
    sample = clip_to_sample(clip, height, width, "center", list(percentiles), rng, empty_ok=True)
    crop = plan_crop(seq.rgb.shape[1], seq.rgb.shape[2], height, width, "center", rng)
    sample["depth"] = torch.from_numpy(np.ascontiguousarray(resize_crop_nearest(seq.depth, crop), np.float32))
    sample["__key__"] = seq.name
    return sample
