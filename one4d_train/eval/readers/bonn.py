"""Bonn RGB-D Dynamic (rgbd_bonn_<name>/ with rgb/, depth/, rgb.txt, depth.txt, groundtruth.txt): the TUM
formats (readers/tum.py), one Kinect calibration.

Unlike TUM's, groundtruth.txt holds the pose of the motion-capture marker body, not of the camera. Camera
poses follow by the dataset's published conversion, c2w = T_ros G T_ros T_m (T_ros: the ROS axis change, its
own inverse; T_m: the marker-to-camera calibration), which evaluation code for the dataset applies. T_m's
rotation block is published with a uniform scale of ~1.059; that is taken out (nearest rotation) so that the
poses stay rigid. The camera turns ~173 degrees from the marker, so marker poses used as camera poses would
put every later frame's pointmaps, and the pointmap normalisation of a clip, in the wrong place.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

from one4d_train.eval.readers import Sequence
from one4d_train.eval.readers.tum import list_tum, read_rgbd_sequence

BONN_INTRINSICS = (542.822841, 542.576870, 315.593520, 237.756098)  # fx, fy, cx, cy
BONN_T_ROS = np.array([[-1.0, 0, 0, 0], [0, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 1]])
BONN_T_M = np.array([[1.0157, 0.1828, -0.2389, 0.0113], [0.0009, -0.8431, -0.6413, -0.0098],
                     [-0.3009, 0.6147, -0.8085, 0.0111], [0, 0, 0, 1.0]])


def _rigid(transform: np.ndarray) -> np.ndarray:
    u, _, vt = np.linalg.svd(transform[:3, :3])
    out = transform.copy()
    out[:3, :3] = u @ np.diag([1.0, 1.0, np.linalg.det(u @ vt)]) @ vt
    return out


BONN_MARKER_TO_CAMERA = BONN_T_ROS @ _rigid(BONN_T_M)


def bonn_camera_poses(marker_c2w: np.ndarray) -> np.ndarray:
    """groundtruth.txt poses [T, 4, 4] (marker to motion-capture world) -> camera-to-world, OpenCV axes."""
    return BONN_T_ROS @ marker_c2w @ BONN_MARKER_TO_CAMERA


def read_bonn(root, sequences=None, start: int = 0, stride: int = 1, max_frames: int = 0) -> Iterator[Sequence]:
    """Sequences (folders holding rgb/ and depth/) under `root`."""
    root = Path(root)
    for name in list_tum(root) if sequences is None else sequences:
        seq = read_rgbd_sequence(root / name, name, BONN_INTRINSICS, start, stride, max_frames)
        if seq.poses_c2w is not None:
            seq.poses_c2w = bonn_camera_poses(seq.poses_c2w)
        yield seq
