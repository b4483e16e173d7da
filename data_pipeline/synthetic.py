"""Synthetic 4D clips with exact geometry: numpy ray casting of a small dynamic scene.

The scene (world axes as OpenCV's: x right, y down, z forward) has a checkered floor, a striped back wall,
a side wall, a sphere that rolls and bounces on its own path and a box that slides on its own path, seen by
a camera that moves and turns. Rays are scaled so their camera-frame z is 1, which makes the ray parameter
of every hit its z-depth: depth, colour and the analytic surfaces come from the same rays.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_pipeline.geometry import depth_to_pointmaps, pixel_rays
from data_pipeline.video import probe_and_check, write_mp4

SKY, FLOOR, BACK_WALL, SIDE_WALL, SPHERE, BOX = range(6)
NEAR, FAR = 0.05, 40.0
COLOURS = {
    "red": (0.85, 0.2, 0.15), "orange": (0.95, 0.55, 0.1), "yellow": (0.95, 0.85, 0.2),
    "green": (0.2, 0.7, 0.3), "teal": (0.1, 0.6, 0.6), "blue": (0.2, 0.35, 0.85),
    "purple": (0.55, 0.25, 0.75), "pink": (0.95, 0.5, 0.7), "white": (0.92, 0.92, 0.9),
}
LIGHT = np.array([0.4, -0.8, -0.45]) / np.linalg.norm([0.4, -0.8, -0.45])


def _a(word: str) -> str:
    """`word` with its indefinite article (the colour names: "an orange", "a red")."""
    return f"{'an' if word[0] in 'aeiou' else 'a'} {word}"


@dataclass(frozen=True)
class Scene:
    """Analytic description of one clip; surfaces are exact, so tests check geometry against it."""
    floor_y: float
    back_z: float
    side_x: float
    wall_top: float
    sphere_radius: float
    sphere_centres: np.ndarray  # [T, 3] world
    sphere_spin: np.ndarray  # [T] radians, texture rotation about the sphere's vertical axis
    box_half: np.ndarray  # [3]
    box_centres: np.ndarray  # [T, 3] world
    intrinsics: np.ndarray  # [3, 3]
    poses_c2w: np.ndarray  # [T, 4, 4]
    colours: dict  # surface name -> colour name
    caption: str


def _look_at(eye: np.ndarray, target: np.ndarray, roll: float) -> np.ndarray:
    z = target - eye
    z /= np.linalg.norm(z)
    x = np.cross(z, [0.0, -1.0, 0.0])
    x /= np.linalg.norm(x)
    y = np.cross(z, x)
    c, s = np.cos(roll), np.sin(roll)
    x, y = c * x + s * y, -s * x + c * y
    c2w = np.eye(4)
    c2w[:3, :3] = np.stack([x, y, z], axis=1)
    c2w[:3, 3] = eye
    return c2w


def make_scene(seed: int, num_frames: int, height: int, width: int) -> Scene:
    """The scene and camera path of clip `seed` (pure function of its arguments)."""
    rng = np.random.default_rng(seed)
    s = np.linspace(0.0, 1.0, num_frames) if num_frames > 1 else np.zeros(1)
    floor_y, back_z, side_x, wall_top = 1.0, rng.uniform(6.0, 8.0), rng.uniform(-2.6, -1.9), rng.uniform(-1.4, -0.9)

    r = rng.uniform(0.35, 0.55)
    x0, dx = rng.uniform(-1.2, -0.4), rng.uniform(1.0, 2.0) * rng.choice([-1, 1])
    bounce = rng.uniform(0.3, 0.8) * np.abs(np.sin(np.pi * rng.uniform(1.0, 2.5) * s))
    sphere = np.stack([x0 + dx * s, floor_y - r - bounce, np.full_like(s, rng.uniform(3.0, 4.0))], axis=1)
    spin = dx * s / r

    half = rng.uniform([0.3, 0.25, 0.3], [0.5, 0.45, 0.5])
    bz0, bdz = rng.uniform(4.0, 5.0), rng.uniform(0.8, 1.5) * rng.choice([-1, 1])
    box = np.stack([np.full_like(s, rng.uniform(0.8, 1.6)), np.full_like(s, floor_y - half[1]), bz0 + bdz * s], axis=1)

    fx = width / (2 * np.tan(np.radians(rng.uniform(50.0, 65.0)) / 2))
    K = np.array([[fx, 0, (width - 1) / 2], [0, fx, (height - 1) / 2], [0, 0, 1]])
    ax, az, phase = rng.uniform(0.4, 0.9), rng.uniform(0.3, 0.8), rng.uniform(0, 2 * np.pi)
    eyes = np.stack([ax * np.sin(phase + 1.5 * s) - ax * np.sin(phase), -0.3 - 0.4 * s, -1.0 + az * s], axis=1)
    targets = np.stack([0.3 * np.cos(2.0 * s), np.full_like(s, 0.2), np.full_like(s, back_z - 2.5)], axis=1)
    rolls = rng.uniform(-0.08, 0.08) * np.sin(np.pi * s)
    poses = np.stack([_look_at(e, t, rl) for e, t, rl in zip(eyes, targets, rolls)])

    names = list(COLOURS)
    picks = rng.choice(len(names), size=5, replace=False)
    colours = dict(zip(["floor", "back_wall", "side_wall", "sphere", "box"], [names[i] for i in picks]))
    caption = (f"{_a(colours['sphere']).capitalize()} ball bounces {'right' if dx > 0 else 'left'} across "
               f"{_a(colours['floor'])} checkered floor while {_a(colours['box'])} box slides "
               f"{'away' if bdz > 0 else 'closer'}, in front of {_a(colours['back_wall'])} striped wall; the camera "
               f"drifts and turns.")
    return Scene(floor_y, back_z, side_x, wall_top, r, sphere, spin, half, box, K, poses, colours, caption)


def _hits(scene: Scene, i: int, o: np.ndarray, d: tuple) -> list[tuple[int, np.ndarray]]:
    """(surface, ray parameter = z-depth) for rays o + t (dx, dy, dz), [H, W] each, inf where missed."""
    dx, dy, dz = d
    inf = np.inf
    with np.errstate(divide="ignore", invalid="ignore"):
        ix, iy, iz = 1 / dx, 1 / dy, 1 / dz
        t_floor = np.where(dy > 1e-9, (scene.floor_y - o[1]) * iy, inf)
        t_back = (scene.back_z - o[2]) * iz
        t_back[(t_back <= 0) | (o[1] + t_back * dy < scene.wall_top)] = inf
        t_side = np.where(dx < -1e-9, (scene.side_x - o[0]) * ix, inf)
        t_side[(o[1] + t_side * dy < scene.wall_top) | (o[2] + t_side * dz > scene.back_z)] = inf

        oc = o - scene.sphere_centres[i]
        a = dx * dx + dy * dy + dz * dz
        b = 2 * (dx * oc[0] + dy * oc[1] + dz * oc[2])
        disc = b * b - 4 * a * (oc @ oc - scene.sphere_radius ** 2)
        t_sphere = np.where(disc >= 0, (-b - np.sqrt(np.maximum(disc, 0))) / (2 * a), inf)

        lo = scene.box_centres[i] - scene.box_half - o
        hi = scene.box_centres[i] + scene.box_half - o
        tmin, tmax = np.full_like(dx, -inf), np.full_like(dx, inf)
        for k, inv in enumerate((ix, iy, iz)):
            t1, t2 = lo[k] * inv, hi[k] * inv
            tmin = np.fmax(tmin, np.minimum(t1, t2))
            tmax = np.fmin(tmax, np.maximum(t1, t2))
        t_box = np.where((tmax >= tmin) & (tmin > NEAR), tmin, inf)
    return [(FLOOR, t_floor), (BACK_WALL, t_back), (SIDE_WALL, t_side), (SPHERE, t_sphere), (BOX, t_box)]


def _checker(a: np.ndarray, b: np.ndarray, size: float) -> np.ndarray:
    return (np.floor(a / size) + np.floor(b / size)) % 2


def _texture(scene: Scene, i: int, surf: int, p: np.ndarray, col: dict) -> tuple[np.ndarray, np.ndarray]:
    """Procedural colour and surface normal of hit points p [N, 3] on surface `surf`."""
    x, y, z = p[:, 0], p[:, 1], p[:, 2]
    if surf == FLOOR:
        tone = 0.55 + 0.45 * _checker(x, z, 0.5)
        return col["floor"] * tone[:, None] + 0.08 * np.sin(13 * x + 7 * z)[:, None], np.array([0.0, -1, 0])
    if surf == BACK_WALL:
        fade = (y - scene.wall_top) / (scene.floor_y - scene.wall_top)
        tone = 0.45 + 0.4 * (0.5 + 0.5 * np.sin(2 * np.pi * x / 0.7))
        return col["back_wall"] * tone[:, None] + 0.15 * fade[:, None], np.array([0.0, 0, -1])
    if surf == SIDE_WALL:
        return col["side_wall"] * (0.5 + 0.4 * _checker(z + y, z - y, 0.6))[:, None], np.array([1.0, 0, 0])
    if surf == SPHERE:
        q = (p - scene.sphere_centres[i]) / scene.sphere_radius
        lon = np.arctan2(q[:, 2], q[:, 0]) + scene.sphere_spin[i]
        bands = (np.floor(lon / (np.pi / 4)) + np.floor((q[:, 1] + 1) / 0.5)) % 2
        return col["sphere"] * (0.45 + 0.55 * bands)[:, None] + 0.1 * (1 - bands)[:, None], q
    u = (p - scene.box_centres[i]) / scene.box_half
    face = np.argmax(np.abs(u), axis=-1)
    normal = np.eye(3)[face] * np.sign(np.take_along_axis(u, face[:, None], -1))
    return col["box"] * (0.5 + 0.5 * _checker(u[:, 0] + u[:, 2], u[:, 1], 0.5))[:, None], normal


def _shade(scene: Scene, i: int, surface: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Texture x Lambert shading per pixel, [H, W, 3] in [0, 1]; each pixel is shaded only for its surface."""
    col = {k: np.asarray(COLOURS[v]) for k, v in scene.colours.items()}
    height = surface.shape[0]
    rgb = np.broadcast_to(np.linspace(0.95, 0.6, height)[:, None, None] * np.array([0.55, 0.75, 1.0]), p.shape).copy()
    for surf in (FLOOR, BACK_WALL, SIDE_WALL, SPHERE, BOX):
        m = surface == surf
        if m.any():
            colour, normal = _texture(scene, i, surf, p[m], col)
            lambert = 0.35 + 0.65 * np.clip(-(np.atleast_2d(normal) @ LIGHT), 0, 1)
            rgb[m] = colour * lambert[:, None]
    return np.clip(rgb, 0, 1)


def render_clip(seed: int, num_frames: int, height: int, width: int) -> dict:
    """Render one clip. Returns frames uint8 [T, H, W, 3], depth float32 [T, H, W] (z-depth; 0 where
    invalid), intrinsics float64 [3, 3], poses_c2w float64 [T, 4, 4], valid bool [T, H, W], caption str,
    and surface uint8 [T, H, W] (SKY, FLOOR, BACK_WALL, SIDE_WALL, SPHERE, BOX) for analytic checks."""
    if min(num_frames, height, width) < 1:
        raise ValueError(f"num_frames, height and width must be >= 1, got {num_frames}, {height}, {width}")
    scene = make_scene(seed, num_frames, height, width)
    rays_cam = pixel_rays(scene.intrinsics, height, width)
    frames = np.empty((num_frames, height, width, 3), np.uint8)
    depth = np.empty((num_frames, height, width), np.float32)
    surface = np.empty((num_frames, height, width), np.uint8)
    for i, c2w in enumerate(scene.poses_c2w):
        o, R = c2w[:3, 3], c2w[:3, :3]
        d = tuple(rays_cam[..., 0] * R[k, 0] + rays_cam[..., 1] * R[k, 1] + R[k, 2] for k in range(3))
        ti = np.full((height, width), np.inf)
        surf = np.full((height, width), SKY, np.uint8)
        for sid, t in _hits(scene, i, o, d):
            closer = (t < ti) & (t > NEAR) & (t < FAR)
            ti[closer], surf[closer] = t[closer], sid
        hit = surf != SKY
        ti[~hit] = 0.0
        p = np.stack([o[k] + ti * d[k] for k in range(3)], axis=-1)
        frames[i] = np.round(_shade(scene, i, surf, p) * 255).astype(np.uint8)
        depth[i] = ti
        surface[i] = surf
    return {"frames": frames, "depth": depth, "intrinsics": scene.intrinsics, "poses_c2w": scene.poses_c2w,
            "valid": surface != SKY, "caption": scene.caption, "surface": surface}


def write_dataset(out_dir, num_clips: int, num_frames: int, height: int, width: int, seed: int = 0,
                  geometry: str = "depth", fps: float = 16.0) -> Path:
    """Render `num_clips` clips (seeds seed, seed+1, ...) into out_dir: clips/NNNNNN.mp4 plus geometry
    files, and manifest.jsonl (docs/data.md) with paths relative to out_dir. Returns the manifest path."""
    if geometry not in ("depth", "xyz"):
        raise ValueError(f"geometry must be 'depth' or 'xyz', got {geometry!r}")
    out = Path(out_dir)
    (out / "clips").mkdir(parents=True, exist_ok=True)
    rows = []
    for n in range(num_clips):
        clip = render_clip(seed + n, num_frames, height, width)
        stem = f"clips/{n:06d}"
        write_mp4(out / f"{stem}.mp4", clip["frames"], fps)
        if n == 0:  # decord cannot read some frame sizes (docs/data.md): fail here, not when sharding
            probe_and_check(out / f"{stem}.mp4")
        np.savez_compressed(out / f"{stem}.valid.npz", valid=clip["valid"])
        row = {"id": f"synth_{seed + n:06d}", "video": f"{stem}.mp4", "valid": f"{stem}.valid.npz",
               "caption": clip["caption"]}
        if geometry == "depth":
            np.save(out / f"{stem}.depth.npy", clip["depth"])
            np.save(out / f"{stem}.poses.npy", clip["poses_c2w"])
            row.update(depth=f"{stem}.depth.npy", intrinsics=clip["intrinsics"].tolist(), poses=f"{stem}.poses.npy")
        else:
            xyz = depth_to_pointmaps(clip["depth"], clip["intrinsics"], clip["poses_c2w"])
            xyz[~clip["valid"]] = 0.0
            np.save(out / f"{stem}.xyz.npy", xyz)
            row.update(xyz=f"{stem}.xyz.npy")
        rows.append(row)
    manifest = out / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return manifest
