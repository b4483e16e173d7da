"""Evaluation of a checkpoint: for each sample and UMC mode, sample RGB + pointmaps, undo the pointmap
normalisation, recover depth and cameras, score them against the ground truth and write outputs.

Layout written under the checkpoint, one folder per dataset (`dataset_tag`; eval.out_dir replaces it):
    eval/<dataset>/metrics.json              per sample and mode, plus means per mode
    eval/<dataset>/<sample>/<mode>/          rgb.mp4, depth.mp4, points_NNN.ply, sheet.png, geometry.npz
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from data_pipeline.geometry import denormalise_pointmap
from one4d_train.diffusion.sampling import initial_noise, sample
from one4d_train.eval.claim import claim
from one4d_train.eval.metrics import depth_metrics, pose_metrics, rgb_metrics
from one4d_train.eval.outputs import (format_table, keyframe_indices, plain_json, write_metrics_json,
                                      write_sample_outputs)
from one4d_train.eval.recovery import RecoveryConfig, recover_geometry

log = logging.getLogger(__name__)
METRICS_FILE = "metrics.json"
BENCHMARKS = ("sintel", "bonn", "tum")
TABLE_COLUMNS = ["sample", "mode", "abs_rel", "delta_1_25", "ate", "rpe_trans", "rpe_rot", "psnr", "ssim"]
# The rules metrics.json's numbers follow, in its settings: 2 since 2026-12-05 (a 70 m depth cap on every dataset,
# Abs Rel clipped at the cap only, a camera estimate that does not move scored at scale 0), 3 since 2026-12-05's
# evening (depth means over samples weighted by scored pixels); a file without it was scored by the earlier rules
# (1). Raised whenever a metric's formula changes, so older scores are made again.
METRICS_VERSION = 3
# settings recorded but not compared: the dataset folder's tag names the dataset already (a moved copy keeps its
# scores), and the sparse mode's observed frame counts follow from the window and the sparse settings
_NOT_COMPARED = ("dataset", "sparse_frames_observed")


class EvalInputError(ValueError):
    """A checkpoint, export or dataset that evaluation cannot use; the message names it and says why."""


@dataclass
class Generator:
    """What sampling needs besides the DiT: the VAE, text conditioning and (I2V) the CLIP image encoder."""
    model: torch.nn.Module
    vae: object  # model.vae.WanVAE
    text: object  # model.text_encoder.TextConditioning
    image_encoder: object | None
    device: torch.device


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def adapter_dir(checkpoint: str) -> str:
    """The export folder of a checkpoint (its adapters/), or an export of `one4d export` itself."""
    from one4d_train.model.adapters import CONFIG_NAME

    return checkpoint if os.path.isfile(os.path.join(checkpoint, CONFIG_NAME)) else os.path.join(checkpoint, "adapters")


def load_generator(cfg, checkpoint: str | None, device: torch.device) -> Generator:
    """The One4D model of cfg.model with the adapters of `checkpoint` (a checkpoint or an export folder); a
    checkpoint written without adapters/ (train.export_adapters=false) has them rebuilt from its ZeRO files. The
    checkpoint's files read are first verified against its marker's CRC-32s (CheckpointDamaged naming them)."""
    from one4d_train.model.adapters import load_adapters
    from one4d_train.model.encoders import build_encoders, encoder_dtype
    from one4d_train.model.one4d import build_one4d
    from one4d_train.train.checkpoint import verify_folder

    mcfg = cfg.model
    with tempfile.TemporaryDirectory(prefix="one4d-adapters-") as tmp:
        src = adapter_dir(checkpoint) if checkpoint else None
        rebuild = src and not os.path.isdir(src) and os.path.isdir(os.path.join(checkpoint, "ds"))
        if checkpoint:  # flipped bytes load silently: safetensors and torch.load check no data
            verify_folder(checkpoint, "ds" if rebuild else "adapters")
        if rebuild:
            src = _rebuild_adapters(checkpoint, tmp)  # before the model: a rebuild that fails costs no build
        model = build_one4d(mcfg, device=device, seed=cfg.seed)
        if src:
            load_adapters(model, src)
    model.eval().requires_grad_(False)
    dtype = encoder_dtype(mcfg, device)
    vae, text, image = build_encoders(mcfg, model.base.cfg, device, dtype, cfg.seed)
    return Generator(model, vae, text, image, device)


def _rebuild_adapters(checkpoint: str, out: str) -> str:
    """The adapters of a checkpoint written with train.export_adapters=false, rebuilt from its ZeRO partitions
    into `out`."""
    from one4d_train.model.adapters import AdapterError
    from one4d_train.train.export_cli import ExportError, rebuild_from_zero

    print(f"one4d eval: {checkpoint} has no adapters/; rebuilding them from its ZeRO partitions", file=sys.stderr)
    try:
        rebuild_from_zero(checkpoint, out)
    except ExportError as exc:
        raise AdapterError(f"{checkpoint}: its adapters cannot be rebuilt: {exc}") from None
    return out


def model_velocity(model: torch.nn.Module) -> Callable:
    """velocity_fn for diffusion.sampling: UMC RGB-branch input from the condition, then the model."""
    from one4d_train.model.umc import rgb_branch_input

    def v(x_rgb, x_xyz, t, cond):
        # the inputs in the model's dtype, as training gives them; no autocast: it would run the fp32 time
        # embedding (Float32Linear, as in Wan) and an fp32-trained model in bf16, neither as trained
        dtype = getattr(model, "compute_dtype", x_rgb.dtype)
        rgb_in = rgb_branch_input(x_rgb, cond["mask4"], cond["z_cond"])
        clip = cond.get("clip_fea")
        v_rgb, v_xyz = model(rgb_in.to(dtype), x_xyz.to(dtype), t, cond["context"].to(dtype),
                             None if clip is None else clip.to(dtype))
        return v_rgb.float(), v_xyz.float()

    return v


def umc_condition(gen: Generator, rgb: torch.Tensor, frame_mask: torch.Tensor, context: torch.Tensor) -> dict:
    """rgb [B, 3, T, H, W] in [-1, 1], frame_mask [B, T] -> the conditioning dict model_velocity reads."""
    from one4d_train.model.umc import condition_video, first_observed_frame, fold_frame_mask

    z_cond = gen.vae.encode(condition_video(rgb, frame_mask))
    cond = {"z_cond": z_cond, "mask4": fold_frame_mask(frame_mask, *z_cond.shape[-2:]).to(z_cond),
            "context": context}
    if gen.image_encoder is not None:
        cond["clip_fea"] = gen.image_encoder.encode(first_observed_frame(rgb, frame_mask))
    return cond


@torch.no_grad()
def generate(gen: Generator, batch: dict, mode: str, ecfg, seeds: list[int]) -> dict:
    """Sample one batch (docs/data.md layout, [B, T, 3, H, W]) in `mode`. Returns rgb [B, T, 3, H, W] in
    [-1, 1], xyz [B, T, 3, H, W] normalised, frame_mask [B, T]."""
    from one4d_train.model.text_encoder import batch_text_embeddings
    from one4d_train.model.config import UMCConfig
    from one4d_train.model.umc import eval_frame_mask, eval_sparse_frames

    rgb = batch["rgb"].to(gen.device).transpose(1, 2).float()  # [B, 3, T, H, W]
    B, _, T = rgb.shape[:3]
    umc = getattr(getattr(gen.model, "cfg", None), "umc", None) or UMCConfig()
    sparse = ecfg.sparse_frames or eval_sparse_frames(T, umc)
    frame_mask = eval_frame_mask(mode, T, sparse).expand(B, T).to(gen.device)
    captions = batch.get("caption", [""] * B)
    context = gen.text(captions, batch_text_embeddings(batch), keys=batch.get("__key__")).to(gen.device)
    cond = umc_condition(gen, rgb, frame_mask, context)
    empty = gen.text.empty.to(gen.device).expand_as(context)
    # no caption (benchmarks have none): the guided velocity is the conditional one whatever eval.cfg_scale says,
    # so its second pass per step is left out
    uncond = None if torch.equal(context, empty) else dict(cond, context=empty)
    shape = cond["z_cond"].shape[1:]
    noise = [initial_noise(shape, shape, s, gen.device) for s in seeds]
    n_rgb, n_xyz = torch.stack([n[0] for n in noise]), torch.stack([n[1] for n in noise])
    z_rgb, z_xyz = sample(model_velocity(gen.model), n_rgb, n_xyz, cond, uncond, sampler=ecfg.sampler,
                          steps=ecfg.steps, shift=ecfg.shift, cfg_scale=ecfg.cfg_scale)
    out_rgb, out_xyz = gen.vae.decode(torch.cat([z_rgb, z_xyz])).clamp(-1, 1).chunk(2)
    return {"rgb": out_rgb.transpose(1, 2).cpu(), "xyz": out_xyz.transpose(1, 2).cpu(), "frame_mask": frame_mask.cpu()}


def ground_truth(sample: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(metric pointmaps [T, H, W, 3], z-depth [T, H, W], c2w [T, 4, 4] or None) of one sample. Depth is the
    sample's own `depth` where present (benchmarks), else the pointmaps seen from each gt camera; pixels whose
    normalised pointmap was clipped at +-1 are then unknown and scored as invalid."""
    xyz_n = sample["xyz"].permute(0, 2, 3, 1).double().numpy()
    valid = sample["valid"][:, 0].numpy().astype(bool)
    pts = denormalise_pointmap(xyz_n, sample["xyz_centre"].double().numpy(), float(sample["xyz_scale"]))
    poses = sample["poses_c2w"].double().numpy()
    poses = None if not np.isfinite(poses).all() else poses
    if "depth" in sample:
        return pts, sample["depth"].double().numpy(), poses
    if poses is None:
        return pts, np.zeros(valid.shape), None
    cam = np.einsum("tji,thwj->thwi", poses[:, :3, :3], pts - poses[:, None, None, :3, 3])
    depth = np.where(valid & (np.abs(xyz_n).max(-1) < 1.0), cam[..., 2], 0.0)
    return pts, depth, poses


def recovery_config(ecfg) -> RecoveryConfig:
    return RecoveryConfig(iters=ecfg.recovery_iters, lr=ecfg.recovery_lr, smooth_rot=ecfg.smooth_rot,
                          smooth_centre=ecfg.smooth_centre)


def score(pred_rgb: torch.Tensor, pred_xyz_n: torch.Tensor, frame_mask: torch.Tensor, sample: dict, ecfg,
          device="cpu") -> tuple[dict, dict]:
    """One sample's scores and geometry. pred_rgb / pred_xyz_n: [T, 3, H, W] in [-1, 1] (normalised
    pointmaps, metric after the sample's xyz_centre / xyz_scale)."""
    centre, scale = sample["xyz_centre"].double(), sample["xyz_scale"].double()
    points = denormalise_pointmap(pred_xyz_n.permute(0, 2, 3, 1).double(), centre, scale)
    rec = recover_geometry(points.to(device), None, recovery_config(ecfg))
    depth, c2w = rec.depth.cpu().numpy(), rec.c2w.cpu().numpy()
    _, gt_depth, gt_poses = ground_truth(sample)
    metrics = depth_metrics(depth, gt_depth, ecfg.depth_align, ecfg.resolved_depth_cap(), device=device)
    if gt_poses is None and "depth" not in sample:  # pointmaps without cameras: no per-frame depth to score
        metrics["depth_truth"] = "none (pointmaps stored without cameras)"
    metrics["focal"] = float(rec.focal.mean())
    if gt_poses is not None and len(gt_poses) >= 3:
        metrics.update(pose_metrics(c2w, gt_poses))
    else:  # the camera means are then over the other samples: said under the table
        metrics["pose_truth"] = "none" if gt_poses is None else f"{len(gt_poses)} frames (ATE and RPE need 3)"
    observed = frame_mask.bool()
    metrics.update(rgb_metrics((pred_rgb.float() + 1) / 2, (sample["rgb"].float() + 1) / 2, observed))
    geometry = {"points": points.numpy(), "depth": depth, "focal": rec.focal.cpu().numpy(), "c2w": c2w,
                "xyz_centre": centre.float().numpy(), "xyz_scale": np.float32(scale)}
    return metrics, geometry


def write_outputs(out_dir: Path, pred_rgb: torch.Tensor, geometry: dict, metrics: dict, title: str, ecfg) -> dict:
    rgb = ((pred_rgb.float().permute(0, 2, 3, 1) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    T = len(rgb)
    keys = list(range(T)) if ecfg.ply_every_frame else keyframe_indices(T, ecfg.keyframes)
    headline = "  ".join(f"{k} {metrics[k]:.4g}" for k in ("abs_rel", "delta_1_25", "ate", "psnr") if k in metrics)
    files = write_sample_outputs(out_dir, rgb, geometry["depth"], geometry["points"], fps=ecfg.fps,
                                 keyframes=keys, title=f"{title}   {headline}")
    np.savez_compressed(out_dir / "geometry.npz", depth=geometry["depth"].astype(np.float32),
                        focal=geometry["focal"], c2w=geometry["c2w"], xyz_centre=geometry["xyz_centre"],
                        xyz_scale=geometry["xyz_scale"])
    return files


def score_and_write(pred: dict, batch: dict, ecfg, device, out_dir: Path, title: str) -> dict:
    """Score one generated sample (a batch of one) against its ground truth and write its outputs; returns the
    metrics, with the written files under 'files'."""
    single = {k: (v[0] if isinstance(v, (torch.Tensor, list)) else v) for k, v in batch.items()}
    metrics, geometry = score(pred["rgb"][0], pred["xyz"][0], pred["frame_mask"][0], single, ecfg, device)
    metrics["files"] = write_outputs(out_dir, pred["rgb"][0], geometry, metrics, title, ecfg)
    return metrics


def eval_dataset(cfg) -> str:
    """eval.dataset (default data.val_shards), checked without reading any sample: a benchmark's root is a
    directory holding its sequences, a shard set's index.json lists the shards. EvalInputError otherwise."""
    spec = cfg.eval.dataset or cfg.data.val_shards
    key = "eval.dataset" if cfg.eval.dataset else "data.val_shards"
    if not spec:
        raise EvalInputError("nothing to evaluate on: set eval.dataset=<shard directory or pattern | sintel:ROOT | "
                             "bonn:ROOT | tum:ROOT> or data.val_shards=<shard directory or pattern>")
    name, sep, root = spec.partition(":")
    if sep and name in BENCHMARKS:
        from one4d_train.eval.readers import benchmark_sequences

        if not os.path.isdir(root):
            raise EvalInputError(f"{key}={spec}: {root} is not a directory")
        try:
            benchmark_sequences(name, root)
        except ValueError as exc:
            raise EvalInputError(f"{key}={spec}: {exc}") from exc
        return spec
    from data_pipeline.reader import list_shards

    try:
        list_shards(spec)
    except (OSError, ValueError) as exc:
        raise EvalInputError(f"{key}={spec}: {exc}") from exc
    return spec


def dataset_tag(spec: str) -> str:
    """The folder name (under <checkpoint>/eval/) and MLflow key part of a dataset's scores: its kind (the benchmark,
    or the shard directory's name) and a hash of where it is, so that each dataset keeps its own scores."""
    from data_pipeline.reader import shard_directory

    name, sep, root = spec.partition(":")
    if sep and name in BENCHMARKS:
        kind, where = name, f"{name}:{os.path.realpath(root)}"
    else:
        folder = shard_directory(spec)
        kind = folder.resolve().name or "shards"
        where = os.path.realpath(spec) if os.path.isdir(spec) else os.path.join(folder.resolve(), os.path.basename(spec))
    kind = "".join(c if c.isalnum() or c in "-_." else "_" for c in kind)
    return f"{kind}-{hashlib.sha256(where.encode()).hexdigest()[:8]}"


# settings recorded since a later release, as scores made before it had them (the schema's defaults)
SETTINGS_ADDED = {"pointmap_percentiles": [2.0, 98.0]}
# settings recorded since a later release and compared only with scores that record them (their value then is not
# known): the shard set's content, which a set replaced at the same path changes; the loader's shuffle buffer, which
# orders the held-out set and so picks its first eval.num_samples samples
COMPARED_WHERE_RECORDED = ("dataset_content", "shuffle_buffer")


def dataset_content(spec: str) -> str | None:
    """A shard set's content as its index.json's SHA-256 (which lists every shard's own): scores of a set replaced
    at the same path are not those of this one. None for a benchmark (its files are not hashed)."""
    from data_pipeline.reader import shard_directory

    if spec.partition(":")[0] in BENCHMARKS:
        return None
    try:
        return hashlib.sha256((shard_directory(spec) / "index.json").read_bytes()).hexdigest()
    except (OSError, ValueError):
        return None


def settings_differ(path, wanted: dict) -> list[str] | None:
    """The keys of the scoring settings `wanted` (scoring_settings) under other values of which the finished scores
    of metrics.json `path` were made ([]: the same), or None where there is no readable one. A file without a
    metrics version is of version 1, one without a setting of SETTINGS_ADDED made with its default."""
    try:
        with open(path) as f:
            recorded = json.load(f).get("settings", {})
        recorded = {"metrics_version": 1, **SETTINGS_ADDED, **recorded}
    except (OSError, ValueError, AttributeError, TypeError):  # unreadable, not JSON, settings not an object
        return None
    wanted = plain_json(wanted)  # as written: tuples as lists, inf as "inf"
    return sorted(k for k, v in wanted.items() if k not in _NOT_COMPARED and recorded.get(k) != v
                  and (k not in COMPARED_WHERE_RECORDED or k in recorded))


def scored(checkpoint: str, tag: str, wanted: dict) -> list[str] | None:
    """settings_differ for `checkpoint`'s finished scores of the dataset of `tag` (its metrics.json, written last).
    Scores of the layout before per-dataset folders (eval/metrics.json) predate the metrics' version: unscored."""
    return settings_differ(os.path.join(checkpoint, "eval", tag, METRICS_FILE), wanted)


def iter_samples(cfg, strict: bool = True) -> Iterator[dict]:
    """eval.num_samples samples (batches of one) of eval.dataset (default data.val_shards): shards through
    the data pipeline with centre crops, or a benchmark through its reader. strict: a held-out sample that does not
    read is EvalInputError (the reader names it in its 'skipped sample' line): scores of a set that silently lost a
    sample would be compared with scores of the whole set. The evaluation inside training passes strict=False and
    scores what reads (every evaluation of the run then misses the same sample)."""
    spec = eval_dataset(cfg)
    head = spec.split(":", 1)
    if len(head) == 2 and head[0] in BENCHMARKS:
        yield from _benchmark_samples(cfg, spec, *head)
        return
    from data_pipeline.loader import build_loader
    from data_pipeline.reader import NoUsableSamples

    key_name = "eval.dataset" if cfg.eval.dataset else "data.val_shards"
    unreadable = (f"{key_name}={spec}: {{}} held-out sample(s) do not read (named in the 'skipped sample' lines "
                  "above); an evaluation scores every sample of its set: re-shard or remove them (`one4d "
                  "inspect-shards` checks a shard set)")

    # evaluation scores pixels and geometry: never the stored latents, and in float32 whatever the training
    # samples' dtype (bfloat16 pointmaps alone put a floor of ~0.007 under a perfect prediction's Abs Rel)
    data_cfg = replace(cfg.data, crop="center", num_workers=0, mode="exact", use_latents=False,
                       finish_on_device=False, sample_dtype="float32")
    loader = build_loader(data_cfg, rank=0, world_size=1, seed=cfg.eval.seed, micro_batch_size=1, shards=spec)
    seen = set()
    try:
        for batch in loader:
            key = (batch["__shard__"][0], batch["__key__"][0])
            # (counted before this sample: a bad last one shows at the wrap); clips shorter than the window are no
            # damage: left out, the same at every evaluation at this window, and said by the reader
            skipped = int(batch["__skipped__"][0]) - int(batch["__short__"][0])
            if strict and skipped:
                raise EvalInputError(unreadable.format(skipped))
            if key in seen:  # the loader ran on into the next epoch: the set holds fewer than eval.num_samples
                break
            seen.add(key)
            yield batch
            if len(seen) >= cfg.eval.num_samples:
                break
    except NoUsableSamples as exc:
        raise EvalInputError(f"{key_name}={spec}: no held-out sample reads ({exc})") from None
    finally:
        loader.close()


def _benchmark_samples(cfg, spec: str, name: str, root: str) -> Iterator[dict]:
    """The first eval.num_samples sequences of a benchmark, each cut to its window (eval.benchmark_start and
    _stride, at most data.num_frames, then to 4k + 1 frames). Bad input (a malformed file, a root without
    sequences, a window too short to score) is EvalInputError naming the file or sequence."""
    from one4d_train.eval.readers import benchmark_sequences, read_benchmark, to_sample

    ecfg = cfg.eval
    try:
        names = benchmark_sequences(name, root)
    except ValueError as exc:
        raise EvalInputError(f"eval.dataset={spec}: {exc}") from exc
    if len(names) > ecfg.num_samples:  # say so: a benchmark is meant to be scored whole
        print(f"one4d eval: scoring the first {ecfg.num_samples} of the {len(names)} sequences of {spec} "
              f"(eval.num_samples={ecfg.num_samples}): eval.num_samples={len(names)} scores them all", file=sys.stderr)
    # the pose scores need 3 frames (so 5 in 4k + 1); a sparse-mode run observes eval.sparse_frames of them
    need = max(5, ecfg.sparse_frames if "sparse" in ecfg.modes else 0)
    sequences = read_benchmark(name, root, sequences=names[:ecfg.num_samples], start=ecfg.benchmark_start,
                               stride=ecfg.benchmark_stride, max_frames=cfg.data.num_frames)
    for seq_name in names[:ecfg.num_samples]:
        try:  # a malformed benchmark file is bad input (exit 2), its message names the file
            seq = next(sequences)
            keep = (len(seq.rgb) - 1) // 4 * 4 + 1
            if keep < need:
                raise ValueError(f"{seq_name}: {len(seq.rgb)} frame(s) in its window (eval.benchmark_start="
                                 f"{ecfg.benchmark_start}, eval.benchmark_stride={ecfg.benchmark_stride}, "
                                 f"data.num_frames={cfg.data.num_frames}), {need} needed to score (4k + 1 frames)")
            for field in ("rgb", "depth", "intrinsics", "poses_c2w", "timestamps"):
                if getattr(seq, field) is not None:
                    setattr(seq, field, getattr(seq, field)[:keep])
            s = to_sample(seq, cfg.data.height, cfg.data.width, cfg.data.pointmap_percentiles,
                          ecfg.resolved_depth_cap())
        except (OSError, ValueError) as exc:
            raise EvalInputError(f"eval.dataset={spec}: {exc}") from exc
        yield {k: ([v] if isinstance(v, str) else v[None] if isinstance(v, torch.Tensor) else v) for k, v in s.items()}


def _earlier_samples(metrics_file: Path) -> list[str]:
    """The sample folders an earlier evaluation's metrics.json lists (names as _sample_name makes them: no path)."""
    try:
        names = {r["sample"] for r in json.loads(metrics_file.read_text())["samples"]}
    except (OSError, ValueError, KeyError, TypeError):
        return []
    return sorted(n for n in names if isinstance(n, str) and n and "/" not in n and n not in (".", ".."))


def _sample_name(batch: dict, index: int) -> str:
    key = batch.get("__key__", [f"sample{index:04d}"])
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(key[0]))


PIXEL_WEIGHTED = ("abs_rel", "delta_1_25")  # the video-depth protocol's means weight sequences by scored pixels


def mean_weight(key: str, scores: dict) -> int:
    """The weight of one sample's score `key` in a mean over samples: its scored pixels for the depth scores
    (PIXEL_WEIGHTED), else 1. Shared by summarise and the in-training evaluation's all-reduced means."""
    return scores.get("num_pixels", 1) if key in PIXEL_WEIGHTED else 1


def summarise(results: list[dict]) -> dict:
    """Means per mode over samples: the depth scores (PIXEL_WEIGHTED) weighted by each sample's scored pixels
    (num_pixels), as the video-depth protocol averages sequences, the others plain. NaN and inf are left out of a
    metric's mean and counted as `<metric>_nonfinite` (present only where there were any): a perfect frame's
    PSNR is inf, a failed recovery's depth error NaN."""
    by_mode: dict[str, dict] = {}
    for r in results:
        by_mode.setdefault(r["mode"], []).append(r)
    out = {}
    for mode, rows in by_mode.items():
        keys = sorted({k for r in rows for k, v in r.items() if isinstance(v, (int, float)) and k != "num_pixels"})
        means = {}
        for k in keys:
            vals = [(float(r[k]), mean_weight(k, r)) for r in rows if k in r]
            finite = [(v, w) for v, w in vals if math.isfinite(v)]
            weight = sum(w for _, w in finite)
            means[k] = (float(sum(v * w for v, w in finite) / weight) if weight
                        else float(np.mean([v for v, _ in finite])) if finite else float("nan"))
            if len(finite) < len(vals):
                means[f"{k}_nonfinite"] = len(vals) - len(finite)
        means["num_samples"] = len(rows)
        out[mode] = means
    return out


def left_out_lines(means: dict) -> list[str]:
    """What the mean rows leave out, per mode: samples whose metric is NaN or inf (an unscorable sequence, a
    failed prediction, a perfect frame's PSNR), so a mean over fewer samples is not read as one over all."""
    lines = []
    for mode, m in means.items():
        left = {k.removesuffix("_nonfinite"): int(v) for k, v in m.items() if k.endswith("_nonfinite")}
        if left:
            listed = ", ".join(f"{k} of {n}" for k, n in sorted(left.items()))
            lines.append(f"{mode} mean: left out (NaN or inf, see metrics.json) {listed} of "
                         f"{m['num_samples']} samples")
    return lines


def no_truth_lines(results: list[dict]) -> list[str]:
    """Samples with no ground truth to score against, said under the table: no depth (pointmap (xyz) geometry stored
    without cameras gives no per-frame depth: ground_truth; score marks it `depth_truth`), whose NaN read like a
    failed prediction; no cameras (`pose_truth`), whose missing ATE and RPE left the camera means over fewer samples
    without a word."""
    lines = []
    for mode in dict.fromkeys(r["mode"] for r in results):
        blind = [r["sample"] for r in results if r["mode"] == mode and r.get("depth_truth")]
        if blind:
            lines.append(f"{mode}: {len(blind)} sample(s) have no ground-truth depth ({', '.join(blind[:3])}"
                         f"{' ...' if len(blind) > 3 else ''}): pointmaps stored without cameras (intrinsics and "
                         "poses) give none, so their abs_rel and delta_1_25 are NaN; their PSNR/SSIM are scored")
        unposed = [r["sample"] for r in results if r["mode"] == mode and r.get("pose_truth")]
        if unposed:
            lines.append(f"{mode}: {len(unposed)} sample(s) have no ground-truth cameras to score ATE and RPE against "
                         f"({', '.join(unposed[:3])}{' ...' if len(unposed) > 3 else ''}; a benchmark sequence without "
                         "its groundtruth.txt, say): the camera means are over the others")
    return lines


def evaluate_checkpoint(cfg, checkpoint: str | None, out_dir: str | None = None, run_id: str | None = None,
                        step: int | None = None, progress: bool = True, gen: Generator | None = None,
                        unscored_only: bool = False) -> dict | None:
    """Evaluate one checkpoint in every eval.modes mode; writes outputs and metrics.json into out_dir
    (default <checkpoint>/eval); logs means and files to MLflow run `run_id` when given. Returns the
    metrics dict (also printed as a table).

    The eval folder is held locked throughout (eval/claim.py: Busy when another process evaluates it). A
    metrics.json already there is removed first, so a run killed mid-way leaves the checkpoint unscored;
    unscored_only: return None instead, doing nothing, where the scores there were made with these settings, or
    with any under eval.rescore=never (another job scored it since the scan). The default
    folder is only ever created inside an existing checkpoint: one removed meanwhile (train.keep_last) raises
    FileNotFoundError rather than coming back as a step folder holding eval/ alone."""
    from tqdm import tqdm

    ecfg = cfg.eval
    spec = eval_dataset(cfg)
    tag = dataset_tag(spec)  # the dataset is checked before the model is built
    chosen = out_dir or ecfg.out_dir
    out = Path(chosen or os.path.join(checkpoint or ".", "eval", tag))
    # <checkpoint>/eval without parents: a checkpoint removed meanwhile raises instead of coming back
    out.parent.mkdir(parents=bool(chosen), exist_ok=True)
    with claim(str(out)):
        differ = settings_differ(out / METRICS_FILE, scoring_settings(cfg, spec)) if unscored_only else None
        if differ == [] or (differ and ecfg.rescore == "never"):
            return None
        # the model and the samples first: an evaluation refused there (adapters that do not fit, a dataset that
        # does not read) leaves the earlier scores as they were
        device = resolve_device(cfg.train.device)
        gen = gen or load_generator(cfg, checkpoint, device)
        samples = list(iter_samples(cfg))
        if len(samples) < ecfg.num_samples and spec.partition(":")[0] not in BENCHMARKS:  # (benchmarks say so)
            print(f"one4d eval: {spec} holds {len(samples)} sample(s): scoring all of them "
                  f"(eval.num_samples={ecfg.num_samples})", file=sys.stderr)
        if (out / METRICS_FILE).exists():
            if chosen:  # a folder of the user's: the sample folders its earlier evaluation listed go, nothing else
                for name in _earlier_samples(out / METRICS_FILE):
                    shutil.rmtree(out / name, ignore_errors=True)
            (out / METRICS_FILE).unlink()
        if not chosen and out.is_dir():  # our own folder: no sample folder of an earlier evaluation stays beside
            shutil.rmtree(out)
        out.mkdir(exist_ok=True)
        results = []
        bar = tqdm(total=len(samples) * len(ecfg.modes), desc="eval", disable=not progress, unit="run")
        for i, batch in enumerate(samples):
            name = _sample_name(batch, i)
            (out / name).mkdir(exist_ok=True)
            for mode in ecfg.modes:
                pred = generate(gen, batch, mode, ecfg, [ecfg.seed + i])
                (out / name / mode).mkdir(exist_ok=True)
                metrics = score_and_write(pred, batch, ecfg, gen.device, out / name / mode, f"{name} | {mode} mode")
                results.append({"sample": name, "mode": mode, **metrics})
                bar.update(1)
        bar.close()
        report = {"checkpoint": checkpoint, "step": step, "samples": results, "means": summarise(results),
                  "settings": evaluation_settings(cfg, spec, results)}
        write_metrics_json(out / METRICS_FILE, report)
        rows = [{k: r.get(k, "") for k in TABLE_COLUMNS} for r in results]
        rows += [{"sample": "mean", "mode": m, **v} for m, v in report["means"].items()]
        print(format_table(rows, TABLE_COLUMNS))
        for line in left_out_lines(report["means"]) + no_truth_lines(results):
            print(line)
        if run_id is not None:
            why = log_to_mlflow(cfg, run_id, report, out, step or 0, tag)
            if why:  # the scores stay; marked, so that a later evaluation of the run directory logs them
                write_metrics_json(out / METRICS_FILE, {**report, NOT_LOGGED: {"run_id": run_id, "reason": why}})
                print(f"one4d eval: warning: {checkpoint}'s scores are in {out / METRICS_FILE} but were not logged to "
                      f"MLflow run {run_id}: {why}; an evaluation of its run directory logs them", file=sys.stderr)
    return report


NOT_LOGGED = "mlflow_not_logged"  # metrics.json: the MLflow run its scores could not be logged to, and why


def log_pending(cfg, checkpoint: str, tag: str, step: int) -> str | None:
    """Log the scores that `checkpoint`'s metrics.json of the dataset of `tag` holds but could not log to its MLflow
    run when they were made (a store locked or unreachable then); returns what happened, None when nothing was
    pending."""
    path = Path(checkpoint) / "eval" / tag / METRICS_FILE
    try:
        report = json.loads(path.read_text())
        run_id = report[NOT_LOGGED]["run_id"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    pending = report.pop(NOT_LOGGED)
    write_metrics_json(path, report)  # the copy logged as an artifact carries no marker
    why = log_to_mlflow(cfg, run_id, report, path.parent, step, tag)
    if why:
        write_metrics_json(path, {**report, NOT_LOGGED: {**pending, "reason": why}})
        return f"its scores are still not logged to MLflow run {run_id}: {why}"
    return f"logged its scores (made earlier) to MLflow run {run_id}"


def scoring_settings(cfg, spec: str) -> dict:
    """What a score depends on: the dataset scored (`spec`, resolved), the frame window (a benchmark's start and
    stride, or the shards' stride and the shuffle buffer that picks their samples) and resolution, the ground truth's
    normalisation percentiles, the sampler (its guidance scale only for shards: benchmarks have no captions), the
    sparse mode's frame count (or, where it is 0, the UMC fractions it is drawn from), recovery and alignment, the
    precision and base products the samples are made with, and the metrics' version (METRICS_VERSION). The modes as
    a set: each sample's seed is the mode's."""
    from one4d_train.model.encoders import encoder_dtype

    ecfg, d, m = cfg.eval, cfg.data, cfg.model
    benchmark = spec.partition(":")[0] in BENCHMARKS
    keys = ("sampler", "steps", "shift", "sparse_frames", "depth_align", "seed", "num_samples",
            "recovery_iters", "recovery_lr", "smooth_rot", "smooth_centre")
    # a benchmark's samples have no caption, so guidance has nothing to apply (generate): cfg_scale changes nothing
    keys += ("benchmark_start", "benchmark_stride") if benchmark else ("cfg_scale",)
    # the DiT's precision (model.compute_dtype on every device), and the encoders' where it differs (fp32 off CUDA)
    encoders = "bf16" if encoder_dtype(m, resolve_device(cfg.train.device)) == torch.bfloat16 else "fp32"
    out = {**{k: getattr(ecfg, k) for k in keys}, "modes": sorted(ecfg.modes), "dataset": spec,
           "depth_cap": ecfg.resolved_depth_cap(), "metrics_version": METRICS_VERSION, "num_frames": d.num_frames,
           "height": d.height, "width": d.width, "pointmap_percentiles": list(d.pointmap_percentiles),
           "precision": m.compute_dtype + ("" if encoders == m.compute_dtype else f" (encoders {encoders})"),
           "base_matmul": m.base_matmul}
    if not benchmark:
        out["frame_stride"] = d.frame_stride
        out["dataset_content"] = dataset_content(spec)
        out["shuffle_buffer"] = d.shuffle_buffer  # (iter_samples: the loader's order picks the samples scored)
    if not ecfg.sparse_frames:
        out["sparse_fracs"] = [m.umc.sparse_min_frac, m.umc.sparse_max_frac]
    return out


def evaluation_settings(cfg, spec: str, results: list[dict]) -> dict:
    """metrics.json's settings: scoring_settings and the sparse mode's observed frame counts (the setting 0
    resolves per clip length)."""
    return {**scoring_settings(cfg, spec),
            "sparse_frames_observed": sorted({r["num_frames"] for r in results if r["mode"] == "sparse"})}


def log_to_mlflow(cfg, run_id: str, report: dict, out_dir: Path, step: int, tag: str) -> str | None:
    """Means per mode as metrics `eval/<dataset tag>/<mode>/<name>` at `step` (in-training evaluation logs
    `eval/<mode>/<name>`); the eval folder as artifacts under eval/<dataset tag>/step-N. Returns why it failed (a
    store locked by another writer past its timeout, a server down), None when logged."""
    from one4d_train.train.tracking import MlflowTracker

    metrics = {f"eval/{tag}/{mode}/{k}": v for mode, means in report["means"].items() for k, v in means.items()}
    try:
        tracker = MlflowTracker(cfg.run_dir, replace(cfg.tracking, system_metrics=False), cfg.name)
        tracker.add_to_run(run_id, metrics, step, str(out_dir), f"eval/{tag}/step-{step:08d}")
    except Exception as exc:  # noqa: BLE001 - whatever the store raises: the scores are kept either way
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".rstrip(": ")
    return None


def tracked_run(cfg, run_dir: str | None, run_id: str | None) -> tuple[str | None, str]:
    """(the MLflow run a checkpoint's scores are logged into, or None; why None, or ""): its training run `run_id`
    where the store holding it is at hand, else none: a checkpoint copied out of its run directory has no store
    beside it (the run's own store; a server's, tracking.uri, is opened wherever it is), and a store without the
    run (deleted, another server) would fail once the scores are in. Opens no store that is not there already."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    if run_id is None:
        return None, ""
    uri = cfg.tracking.uri
    if not uri:
        if run_dir is None:
            return None, "copied out of its run directory, away from its run's store"
        db = os.path.join(run_dir, "mlflow.db")
        if not os.path.isfile(db):
            return None, f"its run's store {db} is not there"
        uri = f"sqlite:///{db}"
    try:
        MlflowClient(tracking_uri=uri).get_run(run_id)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        return None, f"its run {run_id} is not in the store {uri}"
    return run_id, ""


def checkpoints_to_evaluate(path: str) -> list[str]:
    """What `one4d eval checkpoint=path` evaluates. A checkpoint -> [it], and it must be complete; its adapters/
    named directly -> [the checkpoint]; an export folder of `one4d export` (adapter_config.json) -> [it]; a run
    directory -> its complete checkpoints (possibly none; `scored` tells which hold a dataset's scores). Anything
    else, or a checkpoint that is missing or incomplete, raises EvalInputError naming the path and why."""
    from one4d_train.model.adapters import CONFIG_NAME
    from one4d_train.train.checkpoint import MARKER, STEP_DIR, checkpoint_problem, complete_checkpoints

    def looks_like_checkpoint(p: str) -> bool:
        name = os.path.basename(os.path.normpath(p))
        return (os.path.exists(os.path.join(p, MARKER)) or bool(STEP_DIR.match(name)) or name.startswith(".tmp-")
                or os.path.isdir(os.path.join(p, "train_state")))

    def checked(ckpt: str) -> str:
        problem = checkpoint_problem(ckpt)
        if problem:
            raise EvalInputError(f"checkpoint {ckpt} is not complete: {problem}")
        return ckpt

    if not os.path.exists(path):
        raise EvalInputError(f"checkpoint={path}: no such directory")
    if not os.path.isdir(path):
        raise EvalInputError(f"checkpoint={path}: not a directory")
    parent = os.path.dirname(os.path.normpath(path))
    if os.path.basename(os.path.normpath(path)) == "adapters" and looks_like_checkpoint(parent):
        return [checked(parent)]
    if looks_like_checkpoint(path):
        return [checked(path)]
    if os.path.isfile(os.path.join(path, CONFIG_NAME)):
        return [path]
    ckpt_dir = os.path.join(path, "checkpoints")
    if not (os.path.isdir(ckpt_dir) or os.path.isfile(os.path.join(path, "config.yaml"))):
        hint = (f"; it holds adapters/ without a {MARKER} marker, so it is no complete checkpoint (an export "
                f"there is evaluated as checkpoint={os.path.join(path, 'adapters')})"
                if os.path.isdir(os.path.join(path, "adapters")) else "")
        raise EvalInputError(f"checkpoint={path} is neither a checkpoint ({MARKER}), an export "
                             f"({CONFIG_NAME}) nor a run directory (checkpoints/, config.yaml){hint}")
    return complete_checkpoints(ckpt_dir)  # (its damaged step folders: one4d eval names them, and exits 2)


def run_of(checkpoint: str) -> tuple[str | None, str | None, int | None]:
    """(run directory, MLflow run id from the train state, step) of a checkpoint; the run directory is None for one
    outside a run's layout (a copy). A set-aside checkpoint gets no run id: the run goes on along another timeline
    (a resume from an earlier step), which logs its own scores at the same steps, so this one's are written to its
    eval/ folder only."""
    from one4d_train.train.checkpoint import MARKER, CheckpointDamaged, damaged_files, is_set_aside, run_dir_of

    run_dir = run_dir_of(str(Path(checkpoint).resolve()))
    state_file = os.path.join(checkpoint, "train_state", "rank-00000.json")
    if not os.path.exists(state_file):
        return run_dir, None, None
    marked = os.path.isfile(os.path.join(checkpoint, MARKER))
    damaged = damaged_files(checkpoint, ["train_state/rank-00000.json"]) if marked else []
    if not damaged:
        try:
            with open(state_file) as f:
                state = json.load(f)
        except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
            damaged = [f"{state_file}: not valid JSON ({exc})"]
        else:
            damaged = [] if isinstance(state, dict) else [f"{state_file}: holds no mapping"]
    if damaged:
        raise CheckpointDamaged(f"checkpoint {checkpoint} is damaged: {damaged[0]}. Use another checkpoint, or put "
                                "back an intact copy of the file")
    return run_dir, None if is_set_aside(checkpoint) else state.get("mlflow_run_id"), state.get("step")
