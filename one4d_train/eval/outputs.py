"""What evaluation leaves on disk: RGB and colourised-depth mp4s, PLY point clouds, a PNG contact sheet
(rows of keyframes: RGB | depth | point-cloud render from a viewpoint beside the first camera), a metrics
JSON and a plain text table."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# Turbo colour map, polynomial fit (Mikhailov 2019): channel = c4 . (1, x, x^2, x^3) + c2 . (x^4, x^5)
_TURBO4 = np.array([[0.13572138, 4.61539260, -42.66032258, 132.13108234],
                    [0.09140261, 2.19418839, 4.84296658, -14.18503333],
                    [0.10667330, 12.64194608, -60.58204836, 110.36276771]])
_TURBO2 = np.array([[-152.94239396, 59.28637943], [4.27729857, 2.82956604], [-89.90310912, 27.34824973]])
BACKGROUND = (24, 24, 28)
PAD = 6
HEADER = 46
MIN_PANEL_WIDTH = 240


def turbo(x: np.ndarray) -> np.ndarray:
    """[...] in [0, 1] -> uint8 [..., 3]."""
    x = np.clip(np.asarray(x, np.float64), 0, 1)[..., None]
    v4 = np.concatenate([np.ones_like(x), x, x ** 2, x ** 3], -1)
    v2 = np.concatenate([x ** 4, x ** 5], -1)
    rgb = v4 @ _TURBO4.T + v2 @ _TURBO2.T
    return np.round(np.clip(rgb, 0, 1) * 255).astype(np.uint8)


def colourise_depth(depth: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """Depth [T, H, W] -> uint8 [T, H, W, 3]: inverse depth normalised over the whole sequence (2nd-98th
    percentile), so near is warm and colours mean the same depth in every frame; invalid pixels black."""
    depth = np.asarray(depth, np.float64)
    ok = np.isfinite(depth) & (depth > 0)
    if valid is not None:
        ok &= np.asarray(valid, bool)
    inv = np.where(ok, 1.0 / np.where(ok, depth, 1.0), 0.0)
    lo, hi = np.percentile(inv[ok], [2, 98]) if ok.any() else (0.0, 1.0)
    out = turbo((inv - lo) / max(hi - lo, 1e-12))
    out[~ok] = 0
    return out


def _even(frames: np.ndarray) -> np.ndarray:
    T, H, W, C = frames.shape
    return np.pad(frames, ((0, 0), (0, H % 2), (0, W % 2), (0, 0)), mode="edge")


def write_video(path, frames: np.ndarray, fps: float = 16.0) -> Path:
    """uint8 [T, H, W, 3] -> H.264 mp4 (odd sizes padded by one edge pixel)."""
    from data_pipeline.video import write_mp4

    write_mp4(path, _even(np.asarray(frames, np.uint8)), fps)
    return Path(path)


def write_ply(path, points: np.ndarray, colours: np.ndarray) -> Path:
    """Binary little-endian PLY with float32 x, y, z and uint8 red, green, blue."""
    points = np.asarray(points, np.float32).reshape(-1, 3)
    colours = np.asarray(colours, np.uint8).reshape(-1, 3)
    rec = np.empty(len(points), dtype=[("x", "<f4"), ("y", "<f4"), ("z", "<f4"),
                                       ("red", "u1"), ("green", "u1"), ("blue", "u1")])
    rec["x"], rec["y"], rec["z"] = points.T
    rec["red"], rec["green"], rec["blue"] = colours.T
    header = ("ply\nformat binary_little_endian 1.0\n"
              f"element vertex {len(points)}\n"
              "property float x\nproperty float y\nproperty float z\n"
              "property uchar red\nproperty uchar green\nproperty uchar blue\nend_header\n")
    with open(path, "wb") as f:
        f.write(header.encode("ascii"))
        f.write(rec.tobytes())
    return Path(path)


def read_ply(path) -> tuple[np.ndarray, np.ndarray]:
    """The PLY layout write_ply produces -> (points float32 [N, 3], colours uint8 [N, 3])."""
    data = Path(path).read_bytes()
    end = data.index(b"end_header\n") + len(b"end_header\n")
    header = data[:end].decode("ascii").splitlines()
    if header[1] != "format binary_little_endian 1.0":
        raise ValueError(f"{path}: not a binary little-endian PLY")
    n = int(next(line.split()[2] for line in header if line.startswith("element vertex")))
    rec = np.frombuffer(data[end:], dtype=[("x", "<f4"), ("y", "<f4"), ("z", "<f4"),
                                           ("red", "u1"), ("green", "u1"), ("blue", "u1")], count=n)
    return np.stack([rec["x"], rec["y"], rec["z"]], 1), np.stack([rec["red"], rec["green"], rec["blue"]], 1)


def orbit_view(points: np.ndarray, yaw_deg: float = 30.0, pitch_deg: float = -15.0) -> np.ndarray:
    """A camera-to-world pose that looks at the cloud's median point from the first camera's position
    rotated about that point (yaw about the camera's y axis, then pitch about x)."""
    pivot = np.median(points, axis=0) if len(points) else np.array([0, 0, 1.0])
    y, p = math.radians(yaw_deg), math.radians(pitch_deg)
    Ry = np.array([[math.cos(y), 0, math.sin(y)], [0, 1, 0], [-math.sin(y), 0, math.cos(y)]])
    Rx = np.array([[1, 0, 0], [0, math.cos(p), -math.sin(p)], [0, math.sin(p), math.cos(p)]])
    R = Ry @ Rx
    c2w = np.eye(4)
    c2w[:3, :3] = R
    c2w[:3, 3] = pivot - R @ pivot
    return c2w


def render_points(points: np.ndarray, colours: np.ndarray, K: np.ndarray, c2w: np.ndarray, height: int,
                  width: int, splat: int = 1) -> np.ndarray:
    """Z-buffered splat render of [N, 3] points (uint8 colours) seen by camera (K, c2w) -> uint8 [H, W, 3]."""
    img = np.empty((height, width, 3), np.uint8)
    img[:] = BACKGROUND
    R, o = c2w[:3, :3], c2w[:3, 3]
    cam = (np.asarray(points, np.float64) - o) @ R
    front = cam[:, 2] > 1e-6
    cam, col = cam[front], np.asarray(colours)[front]
    u = K[0, 0] * cam[:, 0] / cam[:, 2] + K[0, 2]
    v = K[1, 1] * cam[:, 1] / cam[:, 2] + K[1, 2]
    far_first = np.argsort(-cam[:, 2])
    u, v, col = np.round(u[far_first]).astype(np.int64), np.round(v[far_first]).astype(np.int64), col[far_first]
    # later (nearer) writes win; fill larger splats first so each point's exact pixel wins over neighbours
    for r in range(splat, -1, -1):
        for du in range(-r, r + 1):
            for dv in range(-r, r + 1):
                if max(abs(du), abs(dv)) != r:
                    continue
                uu, vv = u + du, v + dv
                ok = (uu >= 0) & (uu < width) & (vv >= 0) & (vv < height)
                img[vv[ok], uu[ok]] = col[ok]
    return img


def fit_intrinsics(points: np.ndarray, c2w: np.ndarray, height: int, width: int, margin: float = 0.06) -> np.ndarray:
    """Pinhole K that frames the 1st-99th percentile extent of the points seen from c2w in the image."""
    cam = (np.asarray(points, np.float64)[:: max(1, len(points) // 20000)] - c2w[:3, 3]) @ c2w[:3, :3]
    cam = cam[cam[:, 2] > 1e-6]
    if len(cam) == 0:
        return np.array([[width, 0, (width - 1) / 2], [0, width, (height - 1) / 2], [0, 0, 1.0]])
    (x0, y0), (x1, y1) = np.percentile(cam[:, :2] / cam[:, 2:], [1, 99], axis=0)
    f = (1 - 2 * margin) * min(width / max(x1 - x0, 1e-9), height / max(y1 - y0, 1e-9))
    return np.array([[f, 0, (width - 1) / 2 - f * (x0 + x1) / 2], [0, f, (height - 1) / 2 - f * (y0 + y1) / 2],
                     [0, 0, 1.0]])


def panel_scale(width: int) -> int:
    return max(1, math.ceil(MIN_PANEL_WIDTH / width))


def sheet_size(height: int, width: int, rows: int) -> tuple[int, int]:
    """(width, height) of a contact sheet of `rows` keyframes of H x W frames."""
    s = panel_scale(width)
    return 3 * width * s + 4 * PAD, HEADER + rows * (height * s + PAD) + PAD


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


def contact_sheet(rgb: np.ndarray, depth_vis: np.ndarray, points: np.ndarray, valid: np.ndarray | None,
                  keyframes: list[int], title: str = "") -> Image.Image:
    """rgb, depth_vis uint8 [T, H, W, 3], points [T, H, W, 3] (first camera's frame) -> a PNG-ready image:
    one row per keyframe with the frame, its colourised depth and its points seen from beside the camera."""
    T, H, W, _ = rgb.shape
    s = panel_scale(W)
    size = sheet_size(H, W, len(keyframes))
    sheet = Image.new("RGB", size, BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    font, small = _font(14), _font(12)
    if title:
        draw.text((PAD, 5), title, fill=(245, 245, 245), font=font)
    for c, label in enumerate(("RGB", "depth (inverse, one scale per sequence)", "points, seen from 30 deg to the side")):
        draw.text((PAD + c * (W * s + PAD), 26), label, fill=(170, 170, 180), font=small)
    ok = np.ones((T, H, W), bool) if valid is None else np.asarray(valid, bool)
    ok &= np.isfinite(points).all(-1)
    cloud = points[keyframes][ok[keyframes]].reshape(-1, 3)
    view = orbit_view(cloud)
    K = fit_intrinsics(cloud, view, H * s, W * s)
    for r, k in enumerate(keyframes):
        y = HEADER + r * (H * s + PAD)
        render = render_points(points[k][ok[k]], rgb[k][ok[k]], K, view, H * s, W * s, splat=max(1, s // 2))
        for c, panel in enumerate((rgb[k], depth_vis[k])):
            sheet.paste(Image.fromarray(panel).resize((W * s, H * s), Image.NEAREST), (PAD + c * (W * s + PAD), y))
        sheet.paste(Image.fromarray(render), (PAD + 2 * (W * s + PAD), y))
        draw.text((PAD + 4, y + 3), f"frame {k}", fill=(255, 255, 255), font=small, stroke_width=2,
                  stroke_fill=(0, 0, 0))
    return sheet


def keyframe_indices(num_frames: int, count: int = 4) -> list[int]:
    return sorted(set(np.linspace(0, num_frames - 1, min(count, num_frames)).round().astype(int).tolist()))


def write_sample_outputs(out_dir, rgb: np.ndarray, depth: np.ndarray, points: np.ndarray,
                         valid: np.ndarray | None = None, fps: float = 16.0, keyframes: list[int] | None = None,
                         title: str = "") -> dict:
    """All per-sample files into out_dir: rgb.mp4, depth.mp4, points_NNN.ply (keyframes), sheet.png."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    keyframes = keyframe_indices(len(rgb)) if keyframes is None else keyframes
    depth_vis = colourise_depth(depth, valid)
    files = {"rgb_video": write_video(out / "rgb.mp4", rgb, fps), "depth_video": write_video(out / "depth.mp4", depth_vis, fps)}
    ok = np.isfinite(points).all(-1) & (True if valid is None else np.asarray(valid, bool))
    for k in keyframes:
        files[f"ply_{k}"] = write_ply(out / f"points_{k:03d}.ply", points[k][ok[k]], rgb[k][ok[k]])
    contact_sheet(rgb, depth_vis, points, valid, keyframes, title).save(out / "sheet.png")
    files["sheet"] = out / "sheet.png"
    return {k: str(v) for k, v in files.items()}


def _clean(v):
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    if isinstance(v, (np.floating, float)):
        return float(v) if math.isfinite(v) else str(float(v))
    if isinstance(v, np.integer):
        return int(v)
    return v


def plain_json(v):
    """`v` as write_metrics_json writes and json reads it back: tuples as lists, non-finite floats as strings."""
    return json.loads(json.dumps(_clean(v)))


def write_metrics_json(path, metrics: dict) -> Path:
    """JSON with non-finite numbers written as strings ('inf', 'nan') so strict parsers read it; written whole or
    not at all (fsynced temporary file of this process, renamed): its presence marks a checkpoint as scored. The
    folder must exist: it is not recreated under a checkpoint removed meanwhile."""
    from one4d_train.train.checkpoint import write_atomic

    write_atomic(str(path), json.dumps(_clean(metrics), indent=2, sort_keys=True) + "\n")
    return Path(path)


def format_table(rows: list[dict], columns: list[str]) -> str:
    """Plain text table: one line per row, numbers with 4 significant digits."""
    def cell(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    cells = [[cell(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    line = lambda vals: "  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(vals, widths)))
    return "\n".join([line(columns), line(["-" * w for w in widths])] + [line(r) for r in cells])
