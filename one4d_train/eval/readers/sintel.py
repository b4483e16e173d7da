"""MPI Sintel: frames `training/<pass>/<seq>/frame_NNNN.png`, depth `training/depth/<seq>/frame_NNNN.dpt`,
cameras `training/camdata_left/<seq>/frame_NNNN.cam` (the Sintel depth/camera SDK formats).

.dpt: float32 tag 202021.25, int32 width, int32 height, then float32 z-depth row-major.
.cam: float32 tag 202021.25, float64 3x3 intrinsics M, float64 3x4 extrinsics N = [R | t] world-to-camera.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

from one4d_train.eval.readers import Sequence, check_depth_size, frame_window, read_rgb, stack_frames

TAG = np.float32(202021.25)


def _check_tag(path, tag):
    if tag != TAG:
        raise ValueError(f"{path}: wrong tag {tag} (expected {TAG}): not a Sintel file or wrong endianness")


def read_dpt(path) -> np.ndarray:
    with open(path, "rb") as f:
        _check_tag(path, np.fromfile(f, "<f4", 1)[0])
        width, height = np.fromfile(f, "<i4", 2)
        if width <= 0 or height <= 0 or width * height > 1e8:
            raise ValueError(f"{path}: implausible size {width}x{height}")
        data = np.fromfile(f, "<f4", -1)
    if data.size != width * height:
        raise ValueError(f"{path}: expected {width * height} values, found {data.size}")
    return data.reshape(height, width)


def write_dpt(path, depth: np.ndarray) -> None:
    depth = np.asarray(depth, "<f4")
    with open(path, "wb") as f:
        np.array([TAG], "<f4").tofile(f)
        np.array([depth.shape[1], depth.shape[0]], "<i4").tofile(f)
        depth.tofile(f)


def read_cam(path) -> tuple[np.ndarray, np.ndarray]:
    """-> (K [3, 3], world-to-camera [3, 4])."""
    with open(path, "rb") as f:
        _check_tag(path, np.fromfile(f, "<f4", 1)[0])
        M = np.fromfile(f, "<f8", 9)
        N = np.fromfile(f, "<f8", 12)
    if M.size != 9 or N.size != 12:
        raise ValueError(f"{path}: truncated camera file")
    return M.reshape(3, 3), N.reshape(3, 4)


def write_cam(path, K: np.ndarray, w2c: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.array([TAG], "<f4").tofile(f)
        np.asarray(K, "<f8").reshape(9).tofile(f)
        np.asarray(w2c, "<f8")[:3].reshape(12).tofile(f)


def w2c_to_c2w(w2c: np.ndarray) -> np.ndarray:
    E = np.eye(4)
    E[:3] = w2c[:3]
    return np.linalg.inv(E)


def list_sintel(root, render_pass: str = "final") -> list[str]:
    """The sequence folders of `root`/training/`render_pass`, by name."""
    return sorted(p.name for p in (Path(root) / "training" / render_pass).iterdir() if p.is_dir())


def read_sintel(root, sequences=None, render_pass: str = "final", start: int = 0, stride: int = 1,
                max_frames: int = 0) -> Iterator[Sequence]:
    """Sequences of the Sintel training set under `root` (the folder holding `training/`)."""
    train = Path(root) / "training"
    for name in list_sintel(root, render_pass) if sequences is None else sequences:
        frames = sorted((train / render_pass / name).glob("frame_*.png"))
        if not frames:
            raise FileNotFoundError(f"{train / render_pass / name}: no frame_*.png")
        window = frame_window(len(frames), start, stride, max_frames)
        if not window:
            raise ValueError(f"{train / render_pass / name}: no frame from frame {start} on (it has {len(frames)})")
        frames = [frames[i] for i in window]
        rgb = stack_frames([read_rgb(p) for p in frames], frames, "a frame")
        depth_paths = [train / "depth" / name / (p.stem + ".dpt") for p in frames]
        depth, Ks, poses = stack_frames([read_dpt(p) for p in depth_paths], depth_paths, "a depth map"), [], []
        check_depth_size(rgb, depth, depth_paths[0])
        for p in frames:
            cam = train / "camdata_left" / name / (p.stem + ".cam")
            K, w2c = read_cam(cam)
            if not (np.isfinite(K).all() and np.isfinite(w2c).all() and K[0, 0] > 0 and K[1, 1] > 0) \
                    or abs(np.linalg.det(w2c[:3, :3])) < 1e-9:
                raise ValueError(f"{cam}: not a camera (a zero focal length or rotation, or a number that is not "
                                 "finite)")
            Ks.append(K)
            poses.append(w2c_to_c2w(w2c))
        yield Sequence(name, rgb, depth.astype(np.float32), np.stack(Ks), np.stack(poses))
