"""`one4d synth OUT_DIR`: render a synthetic 4D dataset (mp4 + exact geometry) and its manifest."""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from data_pipeline.synthetic import write_dataset
from data_pipeline.video import VideoError, frame_rate, probe_and_check, write_mp4


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="one4d synth", description=__doc__.split(":", 1)[1].strip())
    p.add_argument("out_dir", help="output folder, new or empty (clips/ and manifest.jsonl are written there)")
    p.add_argument("--clips", type=int, default=8, help="number of clips (default 8)")
    p.add_argument("--frames", type=int, default=17, help="frames per clip (default 17)")
    p.add_argument("--height", type=int, default=64, help="frame height, even (default 64)")
    p.add_argument("--width", type=int, default=112, help="frame width, even (default 112)")
    p.add_argument("--geometry", choices=["depth", "xyz"], default="depth",
                   help="store per-frame depth + cameras, or first-frame pointmaps (default depth)")
    p.add_argument("--seed", type=int, default=0, help="clip n uses seed + n (default 0)")
    p.add_argument("--fps", type=float, default=16.0, help="video frame rate (default 16)")
    return p


def decodable(height: int, width: int) -> str | None:
    """None when decord reads H.264 frames of this size back, else why not (decord 0.6 cannot batch-decode some
    widths, docs/data.md): found out on a 2-frame black clip before anything is rendered."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "size.mp4"
        try:
            write_mp4(path, np.zeros((2, height, width, 3), np.uint8))
            probe_and_check(path)
        except VideoError as exc:
            return str(exc).removeprefix(f"{path}: ")
    return None


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    for name in ("clips", "frames", "height", "width"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    if args.seed < 0:
        p.error(f"--seed must be >= 0, got {args.seed}")
    if frame_rate(args.fps) is None:
        p.error(f"--fps must be a positive number of at least 1/1001, got {args.fps}")
    if args.height % 2 or args.width % 2:
        p.error("--height and --width must be even (H.264 yuv420p)")
    if Path(args.out_dir).exists() and not Path(args.out_dir).is_dir():
        p.error(f"{args.out_dir}: not a folder: OUT_DIR is the folder clips/ and manifest.jsonl go to")
    if Path(args.out_dir).is_dir() and any(Path(args.out_dir).iterdir()):  # an earlier dataset would be overwritten
        p.error(f"{args.out_dir}: not empty (an earlier dataset's manifest.jsonl and clips/ would be overwritten, "
                "or mixed with this one's): OUT_DIR must be a new or empty folder")
    problem = decodable(args.height, args.width)
    if problem:
        p.error(f"decord cannot decode H.264 frames of {args.width}x{args.height} (width x height): {problem}; "
                f"choose another size (docs/data.md: widths 16, 24 and 48 fail, for example)")
    start = time.perf_counter()
    try:
        manifest = write_dataset(args.out_dir, args.clips, args.frames, args.height, args.width, seed=args.seed,
                                 geometry=args.geometry, fps=args.fps)
    except (VideoError, OSError) as exc:  # OSError: a folder it cannot make or write (a path under a file, a full disk)
        print(f"one4d synth: error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {args.clips} clips of {args.frames}x{args.height}x{args.width} ({args.geometry}) "
          f"in {time.perf_counter() - start:.1f} s; manifest: {manifest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
