"""Precomputed VAE latents stored with the shards (docs/data.md, "Latents").

`one4d encode-latents` reads shards through the deterministic pipeline with a FIXED window per clip (start
0, data.frame_stride, data.num_frames) and a centre crop, VAE-encodes the RGB target, the XYZ target and the
image-task condition video (first frame observed, the others 0), and writes new shards that carry every
original member plus

  {key}.latents.npz   z_rgb, z_xyz, z_image: float16 [16, T_lat, h, w] (normalised latents);
                      latent_valid_packed: np.packbits(cells, axis=-1), cells bool [1, T_lat, h, w]
  {key}.latents.json  window, crop, resolution, source size, xyz centre/scale, percentiles, VAE identity (and
                      content fingerprint) and its latents mean/std, valid_min_fraction, dtype, latent shape
  {key}.emb.npy       float16 [L, D]: the caption's UMT5 embedding (its L tokens), for a sample with a caption
                      and no stored embedding, unless --no-text; then the trainer keeps its text encoder in host
                      memory (model.text_encoder_device: auto) and encodes no caption per step

Shard names, keys and the sample-to-shard assignment are those of the source; each output shard is written
atomically and recorded (NAME.record.json), so a re-run after a kill finishes the job with identical bytes.

With data.use_latents, the reader takes a sample that carries latents through `latent_sample`: the stored
window and crop (no random start or crop: latents fix them), RGB decoded for the sparse-frame task's live
condition encode, and the stored latents instead of geometry (depth/pointmaps are not decoded at all).
"""
from __future__ import annotations

import json
import os
import tarfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from data_pipeline.config import DataConfig
from data_pipeline.decode import (NpzReader, SampleError, cameras, decode_clip, decode_window, open_video,
                                  text_members, window_indices)
from data_pipeline.transforms import Crop, crop_intrinsics, output_tensor, plan_crop, resize_crop_rgb, rgb_output

LATENTS_VERSION = 1
LATENT_DTYPE = "float16"
LATENT_MEMBERS = ("latents.npz", "latents.json")  # the members `latent_members` writes
Z_KEYS = ("z_rgb", "z_xyz", "z_image")


class LatentsMismatchError(RuntimeError):
    """Stored latents that do not fit the configuration (window, resolution, VAE, ...). Not a bad sample:
    the reader raises it instead of skipping, since every sample of such shards would be wrong."""


@dataclass(frozen=True)
class LatentsSpec:
    """What the trainer expects of stored latents beyond the data config."""
    vae: str  # vae_identity(model.vae, seed)
    valid_min_fraction: float | None = None  # flow.xyz_valid_min_fraction (None: not checked)
    vae_fingerprint: str | None = None  # model.vae's content (state_dict.vae_fingerprint; None: the tiny VAE)


def vae_identity(path: str, seed: int) -> str:
    """The configured VAE as recorded with latents: its path as configured, or 'tiny:SEED' for the tiny
    random VAE that an empty model.vae gives (load_vae(path='', seed=SEED))."""
    return path if path else f"tiny:{seed}"


def latents_spec(cfg) -> LatentsSpec:
    """The LatentsSpec of a full One4DConfig (model.vae and its content fingerprint, seed,
    flow.xyz_valid_min_fraction)."""
    from one4d_train.model.state_dict import vae_fingerprint

    return LatentsSpec(vae_identity(cfg.model.vae, cfg.seed), float(cfg.flow.xyz_valid_min_fraction),
                       vae_fingerprint(cfg.model.vae))


def settings(cfg: DataConfig, vae: str, valid_min_fraction: float, vae_fingerprint: str | None = None) -> dict:
    """The settings every latent sample of a run shares (also recorded in index.json under 'latents'); the VAE's
    content fingerprint where it has one (not the tiny VAE)."""
    out = {"version": LATENTS_VERSION, "window": {"start": 0, "stride": cfg.frame_stride, "frames": cfg.num_frames},
           "resolution": [cfg.height, cfg.width], "crop": "center",
           "pointmap_percentiles": [float(p) for p in cfg.pointmap_percentiles], "vae": vae,
           "valid_min_fraction": float(valid_min_fraction), "dtype": LATENT_DTYPE}
    return {**out, "vae_fingerprint": vae_fingerprint} if vae_fingerprint else out


def same_vae(meta: dict, vae: str, fingerprint: str | None) -> bool:
    """Whether the VAE recorded in `meta` (settings) is the VAE `vae` of content `fingerprint`: by content where
    both have a fingerprint (a copy at another path is the same VAE, other weights at the same path are not), else
    (latents written before fingerprints were recorded, the tiny VAE) by same_source."""
    recorded = meta.get("vae_fingerprint")
    if recorded and fingerprint:
        return recorded == fingerprint
    return same_source(meta.get("vae"), vae)


def check_settings(meta: dict, cfg: DataConfig, spec: LatentsSpec | None, where: str) -> None:
    """Raise LatentsMismatchError (naming `where`) unless `meta` (a latents.json or the index's 'latents')
    fits the data config and the expected VAE."""
    try:
        window, res = meta["window"], list(meta["resolution"])
        problems = []
        if meta.get("version") != LATENTS_VERSION:
            problems.append(f"version {meta.get('version')!r}, this code reads {LATENTS_VERSION}")
        if (window["frames"], window["stride"]) != (cfg.num_frames, cfg.frame_stride):
            problems.append(f"window of {window['frames']} frames, stride {window['stride']} vs data.num_frames="
                            f"{cfg.num_frames}, data.frame_stride={cfg.frame_stride}")
        if res != [cfg.height, cfg.width]:
            problems.append(f"resolution {res[0]}x{res[1]} vs data.height x data.width = {cfg.height}x{cfg.width}")
        if [float(p) for p in meta["pointmap_percentiles"]] != [float(p) for p in cfg.pointmap_percentiles]:
            problems.append(f"pointmap_percentiles {meta['pointmap_percentiles']} vs data.pointmap_percentiles="
                            f"{list(cfg.pointmap_percentiles)}")
        if spec is None:
            problems.append(f"encoded with VAE '{meta['vae']}' but the loader was given no VAE identity to check "
                            f"(build_loader(..., latents=latents_spec(cfg)))")
        else:
            if not same_vae(meta, spec.vae, spec.vae_fingerprint):
                recorded = meta.get("vae_fingerprint")
                problems.append(f"encoded with VAE '{meta['vae']}', the configured VAE is '{spec.vae}'"
                                + (f" (other weights: content fingerprint {recorded} when encoded, "
                                   f"{spec.vae_fingerprint} now)" if recorded and spec.vae_fingerprint else ""))
            if spec.valid_min_fraction is not None and float(meta["valid_min_fraction"]) != spec.valid_min_fraction:
                problems.append(f"latent validity cells at valid_min_fraction {meta['valid_min_fraction']} vs "
                                f"flow.xyz_valid_min_fraction={spec.valid_min_fraction}")
    except (KeyError, TypeError, ValueError) as exc:
        raise LatentsMismatchError(f"{where}: malformed latents metadata ({exc!r})") from None
    if problems:
        raise LatentsMismatchError(f"{where}: stored latents do not fit this run: " + "; ".join(problems) +
                                   ". Re-encode with `one4d encode-latents` and this config, or set "
                                   "data.use_latents=false to train from pixels")


# ---- reading (DataLoader workers: no VAE, no diffusers import) ------------------------------------------------

def latent_sample(raw: dict, cfg: DataConfig, spec: LatentsSpec | None, where: str) -> dict:
    """The training sample of a raw sample carrying latents: rgb at the stored window/crop in data.sample_dtype,
    z_rgb / z_xyz / z_image float32 [16, T_lat, h, w], latent_valid bool [1, T_lat, h, w], normalisation,
    cameras, caption. Geometry members are not read."""
    from data_pipeline.transforms import DTYPES

    try:
        meta = json.loads(raw["latents.json"].decode("utf-8"))
    except Exception as exc:
        raise SampleError(f"member latents.json is not valid JSON: {exc}") from None
    check_settings(meta, cfg, spec, where)
    try:
        n, w = int(meta["source_size"][0]), meta["window"]
        idx = window_indices(n, w["frames"], w["stride"], start=w["start"])
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise SampleError(f"member latents.json has no usable window / source_size: {exc!r}") from None
    try:
        src_h, src_w = int(meta["source_size"][1]), int(meta["source_size"][2])
        crop = Crop(**meta["crop"])
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise SampleError(f"member latents.json has no usable crop / source_size: {exc!r}") from None
    if crop != plan_crop(src_h, src_w, cfg.height, cfg.width, "center", None):
        raise LatentsMismatchError(f"{where}: latents.json crop {meta['crop']} does not match its source size "
                                   f"{meta['source_size']} and data.height x data.width = {cfg.height}x{cfg.width}")
    # checks the video's frame count and size against source_size (a bad sample, skipped, if they differ)
    frames = decode_window(raw["mp4"], idx, n, (src_h, src_w), (crop.resized_h, crop.resized_w))
    frames = resize_crop_rgb(frames, crop)
    if cfg.finish_on_device:  # uint8 frames; finish.finish_batch converts them on the training device
        out = {"rgb_u8": output_tensor(tuple(frames.shape), torch.uint8).copy_(frames)}
    else:
        out = {"rgb": rgb_output(frames, DTYPES[cfg.sample_dtype])}
    z = NpzReader(raw["latents.npz"], "latents.npz")
    shape = tuple(meta["latent_shape"])
    for name in Z_KEYS:
        a = z[name]
        if a.shape != shape:
            raise SampleError(f"member latents.npz {name} has shape {a.shape}, latents.json says {shape}")
        t = output_tensor(shape, torch.float32)
        t.numpy()[...] = a
        out[name] = t
    packed = z["latent_valid_packed"]
    cells = (1,) + shape[1:]
    if packed.shape != cells[:-1] + ((cells[-1] + 7) // 8,) or packed.dtype != np.uint8:
        raise SampleError(f"member latents.npz latent_valid_packed is {packed.dtype} {packed.shape} for cells {cells}")
    out["latent_valid"] = torch.from_numpy(np.unpackbits(packed, axis=-1, count=cells[-1]).view(bool).copy())
    K, c2w = cameras(raw, n)
    nan = np.full((len(idx), 4, 4), np.nan)
    Kc = crop_intrinsics(K[idx], src_h, src_w, crop) if K is not None else nan[:, :3, :3]
    rel = np.linalg.inv(c2w[idx[0]]) @ c2w[idx] if c2w is not None else nan
    caption, text_emb = text_members(raw)
    out.update(xyz_centre=torch.tensor(meta["xyz_centre"], dtype=torch.float32),
               xyz_scale=torch.tensor(meta["xyz_scale"], dtype=torch.float32),
               intrinsics=torch.from_numpy(Kc.astype(np.float32)), poses_c2w=torch.from_numpy(rel.astype(np.float32)),
               caption=caption)
    if text_emb is not None:
        out["text_emb"] = torch.from_numpy(text_emb)
    return out


# ---- encoding (`one4d encode-latents`) --------------------------------------------------------------------------

def fixed_window_sample(raw: dict, cfg: DataConfig) -> tuple[dict, dict]:
    """(float32 pixel sample, per-sample latents.json fields) of the fixed window (start 0) and centre crop;
    the same code path as training samples (decode_clip + to_sample), with no randomness."""
    from data_pipeline.transforms import to_sample

    clip = decode_clip(raw, cfg.num_frames, cfg.frame_stride, rng=None, start=0, size=(cfg.height, cfg.width))
    sample = to_sample(clip, cfg.height, cfg.width, "center", cfg.pointmap_percentiles, None, "float32")
    src_h, src_w = clip.source_hw
    n = len(open_video(raw["mp4"]))
    crop = plan_crop(src_h, src_w, cfg.height, cfg.width, "center", None)
    info = {"crop": asdict(crop), "source_size": [n, src_h, src_w],
            "xyz_centre": [float(v) for v in sample["xyz_centre"]], "xyz_scale": float(sample["xyz_scale"])}
    return sample, info


def image_condition(rgb: torch.Tensor) -> torch.Tensor:
    """The image task's condition video of rgb [B, 3, T, H, W]: the first frame observed, the others 0
    (umc.condition_video with the image-task frame mask)."""
    from one4d_train.model.umc import condition_video, eval_frame_mask

    mask = eval_frame_mask("image", rgb.shape[2]).unsqueeze(0).expand(rgb.shape[0], -1)
    return condition_video(rgb, mask)


def encode_batch(vae, samples: list[dict], valid_min_fraction: float) -> list[dict[str, np.ndarray]]:
    """VAE-encode the pixel samples' RGB, XYZ and image-condition videos in one call; float32 latents per sample
    plus the latent validity cells (objective.latent_validity at `valid_min_fraction`)."""
    from one4d_train.diffusion.objective import latent_validity

    rgb = torch.stack([s["rgb"] for s in samples]).transpose(1, 2)  # [B, 3, T, H, W]
    xyz = torch.stack([s["xyz"] for s in samples]).transpose(1, 2)
    z_rgb, z_xyz, z_image = vae.encode_many([rgb, xyz, image_condition(rgb)])
    cells = latent_validity(torch.stack([s["valid"] for s in samples]), valid_min_fraction)
    return [{"z_rgb": z_rgb[i].float().cpu().numpy(), "z_xyz": z_xyz[i].float().cpu().numpy(),
             "z_image": z_image[i].float().cpu().numpy(), "cells": cells[i].cpu().numpy()} for i in range(len(samples))]


def text_identity(mcfg, seed: int) -> str:
    """The text encoder as recorded with stored embeddings: its path, or 'tiny:SEED' for the tiny random tower
    that the tiny preset with an empty model.text_encoder gets ('' when there is no encoder)."""
    if mcfg.text_encoder:
        return mcfg.text_encoder
    return f"tiny:{seed}" if mcfg.preset == "tiny" else ""


def same_source(recorded: str | None, configured: str) -> bool:
    """Whether the VAE or text encoder recorded with stored latents or embeddings is the configured one
    (vae_identity / text_identity: 'tiny:SEED', or a path compared after resolving links and relative parts, so
    `models/vae` recorded by a run in /work is /work/models/vae; where both paths are there, by their files'
    content: a node-local copy of the recorded encoder is the same encoder)."""
    from one4d_train.model.state_dict import model_folder_fingerprint

    if not recorded or not configured:
        return False
    if recorded == configured:
        return True
    if recorded.startswith("tiny:") or configured.startswith("tiny:"):
        return False
    if os.path.realpath(recorded) == os.path.realpath(configured):
        return True
    theirs = model_folder_fingerprint(recorded)
    return theirs is not None and theirs == model_folder_fingerprint(configured)


def text_member(key: str, emb: torch.Tensor) -> tuple[str, bytes]:
    """The `emb.npy` member of one caption's embedding rows [L, D] (float16, as the latents)."""
    a = emb.float().cpu().numpy()
    if not np.isfinite(a).all() or np.abs(a).max() > 65000:
        raise SampleError("the caption's text embedding has non-finite or float16-overflowing values")
    from data_pipeline.shard import npy_bytes

    return f"{key}.emb.npy", npy_bytes(a.astype(np.float16))


def latent_members(key: str, enc: dict, info: dict, run: dict, vae_mean: list, vae_std: list) -> list[tuple[str, bytes]]:
    """The two shard members of one encoded sample (latents.npz, latents.json)."""
    from data_pipeline.shard import npz_arrays_bytes

    arrays = []
    for name in Z_KEYS:
        a = enc[name]
        if not np.isfinite(a).all() or np.abs(a).max() > 65000:
            raise SampleError(f"{name} has non-finite or float16-overflowing values")
        arrays.append((name, a.astype(np.float16)))
    arrays.append(("latent_valid_packed", np.packbits(enc["cells"].astype(bool), axis=-1)))
    meta = {**run, **info, "latent_shape": list(enc["z_rgb"].shape), "vae_latents_mean": vae_mean,
            "vae_latents_std": vae_std}
    return [(f"{key}.{LATENT_MEMBERS[0]}", npz_arrays_bytes(arrays)),
            (f"{key}.{LATENT_MEMBERS[1]}", json.dumps(meta, sort_keys=True).encode())]


def tar_samples(path) -> Iterator[tuple[str, list[tuple[str, bytes]]]]:
    """(key, [(member name, bytes)] in tar order) for each sample of a shard written by `one4d shard`."""
    with tarfile.open(path) as tar:
        key, members = None, []
        for m in tar:
            if not m.isfile():
                continue
            k = Path(m.name).name.split(".", 1)[0]
            if k != key and members:
                yield key, members
                members = []
            key = k
            members.append((m.name, tar.extractfile(m).read()))
        if members:
            yield key, members


def raw_of(key: str, members: list[tuple[str, bytes]]) -> dict:
    """The reader's raw sample dict (suffix -> bytes) of a sample's members."""
    return {"__key__": key, **{Path(name).name.split(".", 1)[1]: data for name, data in members}}
