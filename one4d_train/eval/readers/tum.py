"""TUM RGB-D (https://cvg.cit.tum.de/data/datasets/rgbd-dataset/file_formats) and the formats it shares with
Bonn RGB-D Dynamic: `rgb.txt` / `depth.txt` ('timestamp filename'), `groundtruth.txt`
('timestamp tx ty tz qx qy qz qw': the colour camera's optical centre and orientation in the world, i.e.
camera-to-world with OpenCV camera axes), 16-bit depth PNGs with 5000 units per metre. Frames are matched
by timestamp like the benchmark's associate.py (greedy by smallest difference, at most 0.02 s apart).
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image
from scipy.spatial.transform import Rotation

from one4d_train.eval.readers import Sequence, check_depth_size, frame_window, read_rgb, stack_frames

DEPTH_FACTOR = 5000.0
MAX_DIFFERENCE = 0.02
# published calibrations of the three Kinects (fx, fy, cx, cy)
TUM_INTRINSICS = {"freiburg1": (517.3, 516.5, 318.6, 255.3), "freiburg2": (520.9, 521.0, 325.1, 249.7),
                  "freiburg3": (535.4, 539.2, 320.1, 247.6)}


def read_list(path, min_fields: int = 1) -> tuple[np.ndarray, list[list[str]]]:
    """A TUM list file -> (timestamps [N], the remaining fields of each line); '#' lines are comments. Each line
    holds a timestamp and at least `min_fields` more fields (ValueError naming the file and line otherwise)."""
    stamps, rest = [], []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        fields = line.replace(",", " ").split()
        if not fields or fields[0].startswith("#"):
            continue
        try:
            stamp = float(fields[0])
        except ValueError:
            raise ValueError(f"{path}, line {number}: {fields[0]!r} is not a timestamp") from None
        if len(fields) - 1 < min_fields:
            raise ValueError(f"{path}, line {number}: expected a timestamp and {min_fields} more fields, got "
                             f"{line.strip()!r}")
        stamps.append(stamp)
        rest.append(fields[1:])
    return np.asarray(stamps, np.float64), rest


def associate(a: np.ndarray, b: np.ndarray, max_difference: float = MAX_DIFFERENCE) -> list[tuple[int, int]]:
    """Index pairs (i, j) matching timestamps a[i] ~ b[j], each used once, greedily by |a[i] - b[j]|."""
    order = np.argsort(b)
    bs = b[order]
    cands = []
    for i, t in enumerate(a):
        lo, hi = np.searchsorted(bs, t - max_difference, "right"), np.searchsorted(bs, t + max_difference, "left")
        cands += [(abs(t - bs[k]), i, int(order[k])) for k in range(lo, hi)]
    cands.sort()
    used_a, used_b, pairs = set(), set(), []
    for _, i, j in cands:
        if i not in used_a and j not in used_b:
            used_a.add(i)
            used_b.add(j)
            pairs.append((i, j))
    return sorted(pairs)


def tum_pose_to_c2w(fields) -> np.ndarray:
    tx, ty, tz, qx, qy, qz, qw = map(float, fields[:7])
    c2w = np.eye(4)
    c2w[:3, :3] = Rotation.from_quat([qx, qy, qz, qw]).as_matrix()
    c2w[:3, 3] = (tx, ty, tz)
    return c2w


def c2w_to_tum_pose(c2w: np.ndarray) -> list[float]:
    qx, qy, qz, qw = Rotation.from_matrix(np.asarray(c2w)[:3, :3]).as_quat()
    return [*map(float, np.asarray(c2w)[:3, 3]), float(qx), float(qy), float(qz), float(qw)]


def read_depth_png(path) -> np.ndarray:
    try:
        with Image.open(path) as image:
            raw = np.asarray(image)
    except (OSError, ValueError, SyntaxError) as exc:
        raise ValueError(f"{path}: not a readable depth PNG ({exc})") from None
    if raw.dtype not in (np.uint16, np.int32):
        raise ValueError(f"{path}: expected a 16-bit depth PNG, got {raw.dtype}")
    return (raw.astype(np.float64) / DEPTH_FACTOR).astype(np.float32)


def _listing(folder: Path, name: str, sub: str):
    if (folder / name).is_file():
        return read_list(folder / name)
    files = sorted((folder / sub).glob("*.png"))  # Bonn-style folders name files by their timestamp
    try:
        stamps = [float(p.stem) for p in files]
    except ValueError:
        odd = next(p for p in files if not _is_number(p.stem))
        raise ValueError(f"{odd}: not named by its timestamp, and no {folder / name} lists the frames with theirs") \
            from None
    return np.asarray(stamps), [[f"{sub}/{p.name}"] for p in files]


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def read_rgbd_sequence(folder, name: str, intrinsics: tuple | None, start: int = 0, stride: int = 1,
                       max_frames: int = 0) -> Sequence:
    folder = Path(folder)
    t_rgb, rgb_files = _listing(folder, "rgb.txt", "rgb")
    t_depth, depth_files = _listing(folder, "depth.txt", "depth")
    pairs = associate(t_rgb, t_depth)
    gt_rows = None  # per matched frame, its groundtruth.txt row
    if (folder / "groundtruth.txt").is_file():
        t_gt, gt = read_list(folder / "groundtruth.txt", min_fields=7)
        try:
            gt = np.asarray([row[:7] for row in gt], np.float64).reshape(-1, 7)
        except ValueError as exc:
            raise ValueError(f"{folder / 'groundtruth.txt'}: a pose that is not 7 numbers ({exc})") from None
        with_gt = dict(associate(t_rgb[[i for i, _ in pairs]], t_gt))
        pairs = [(pairs[k], with_gt[k]) for k in range(len(pairs)) if k in with_gt]
        gt_rows = [g for _, g in pairs]
        pairs = [p for p, _ in pairs]
    keep = frame_window(len(pairs), start, stride, max_frames)
    if not keep:
        raise ValueError(f"{folder}: no frame left: {len(t_rgb)} rgb and {len(t_depth)} depth timestamps, "
                         f"{len(pairs)} matched within {MAX_DIFFERENCE} s"
                         f"{' and to groundtruth.txt' if gt_rows is not None else ''}, from frame {start}")
    poses = None
    if gt_rows is not None:
        # a NaN or a zero quaternion among the poses scored made NaN cameras, and the sequence's ATE and RPE silently
        # went missing (rows no scored frame is matched to, of a trajectory at the motion capture's rate, are not read)
        bad = [gt_rows[k] for k in keep if not np.isfinite(gt[gt_rows[k]]).all()
               or np.linalg.norm(np.nan_to_num(gt[gt_rows[k], 3:7])) == 0]
        if bad:
            raise ValueError(f"{folder / 'groundtruth.txt'}: the pose at timestamp {t_gt[bad[0]]} is not a camera pose "
                             f"(a number that is not finite, or a zero quaternion): {' '.join(map(str, gt[bad[0]]))}")
        poses = np.stack([tum_pose_to_c2w(gt[gt_rows[k]]) for k in keep])
    pairs = [pairs[k] for k in keep]
    rgb_paths = [folder / rgb_files[i][0] for i, _ in pairs]
    depth_paths = [folder / depth_files[j][0] for _, j in pairs]
    rgb = stack_frames([read_rgb(p) for p in rgb_paths], rgb_paths, "a frame")
    depth = stack_frames([read_depth_png(p) for p in depth_paths], depth_paths, "a depth map")
    check_depth_size(rgb, depth, depth_paths[0])
    K = None
    if intrinsics is not None:
        fx, fy, cx, cy = intrinsics
        K = np.tile(np.array([[fx, 0, cx], [0, fy, cy], [0, 0, 1.0]]), (len(pairs), 1, 1))
    return Sequence(name, rgb, depth, K, poses, t_rgb[[i for i, _ in pairs]])


def tum_intrinsics(name: str):
    return next((v for k, v in TUM_INTRINSICS.items() if k in name), None)


def list_tum(root) -> list[str]:
    """The sequence folders (holding rgb/) under `root`, by name."""
    return sorted(p.name for p in Path(root).iterdir() if (p / "rgb").is_dir())


def read_tum(root, sequences=None, start: int = 0, stride: int = 1, max_frames: int = 0) -> Iterator[Sequence]:
    """Sequences (folders named rgbd_dataset_freiburgN_*) under `root`; the camera (freiburg1/2/3) and so the
    intrinsics come from the folder's name."""
    root = Path(root)
    for name in list_tum(root) if sequences is None else sequences:
        K = tum_intrinsics(name)
        if K is None:
            raise ValueError(f"{root / name}: no freiburg1, freiburg2 or freiburg3 in the folder's name, which says "
                             "the camera and its intrinsics (keep TUM's names: rgbd_dataset_freiburgN_...)")
        yield read_rgbd_sequence(root / name, name, K, start, stride, max_frames)
