"""Bonn RGB-D Dynamic (rgbd_bonn_<name>/ with rgb/, depth/, rgb.txt, depth.txt, groundtruth.txt): the TUM
formats (readers/tum.py), one Kinect calibration. groundtruth.txt (motion capture) is used as given."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

from one4d_train.eval.readers import Sequence
from one4d_train.eval.readers.tum import read_rgbd_sequence

BONN_INTRINSICS = (542.822841, 542.576870, 315.593520, 237.756098)  # fx, fy, cx, cy


def read_bonn(root, sequences=None, start: int = 0, stride: int = 1, max_frames: int = 0) -> Iterator[Sequence]:
    """Sequences (folders holding rgb/ and depth/) under `root`."""
    root = Path(root)
    names = sorted(p.name for p in root.iterdir() if (p / "rgb").is_dir()) if sequences is None else sequences
    for name in names:
        yield read_rgbd_sequence(root / name, name, BONN_INTRINSICS, start, stride, max_frames)
