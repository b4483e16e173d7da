"""Unified Masked Conditioning (UMC): one model, three tasks, told apart only by which frames are observed.

Per sample a task is drawn from {image, sparse, video} (UMCConfig.p_image / p_sparse / p_video) with a
seeded `torch.Generator`, so the draws are reproducible. Its frame mask M [T] (True = observed) gives:
  condition video  = the clip with unobserved frames set to 0, VAE-encoded to z_c;
  folded mask      = M laid out as 4 channels x T_lat exactly as Wan I2V / Fun-InP does;
  RGB branch input = concat(noisy RGB latent, folded mask, z_c) -> 16 + 4 + 16 = 36 channels.
The XYZ branch's input carries no condition: it is the noisy XYZ latent plus zero channels up to the patch
embedding's width, so z_c and the mask reach it only through the control links. It shares the RGB branch's
cross-attention context, though: the caption and, on an I2V backbone, the CLIP tokens of the first observed
frame (One4DModel passes one context to both halves).

Sparse task (training): the first frame is always observed, because the pointmaps are expressed in the
first frame's camera and Wan's I2V prior is anchored on frame 0; the other observed frames are a uniform
random subset. The observed fraction is drawn uniformly in [sparse_min_frac, sparse_max_frac], giving
k = round(frac * T) frames, clamped to [2, T - 1] so the task differs from both others (T >= 3).
Evaluation's sparse mode (`eval_frame_mask`) keeps the first, the last and evenly spaced frames.
"""
from __future__ import annotations

from typing import Callable

import torch

from one4d_train.model.config import UMCConfig

TASKS = ("image", "sparse", "video")
TEMPORAL_STRIDE = 4


def sample_tasks(batch: int, cfg: UMCConfig, generator: torch.Generator) -> list[str]:
    """One task per sample, drawn with the configured probabilities."""
    u = torch.rand(batch, generator=generator, dtype=torch.float64, device=generator.device).cpu()
    cum = torch.tensor([cfg.p_image, cfg.p_image + cfg.p_sparse], dtype=torch.float64)
    return [TASKS[int(i)] for i in torch.bucketize(u, cum, right=True)]


def sample_frame_mask(task: str, num_frames: int, cfg: UMCConfig, generator: torch.Generator) -> torch.Tensor:
    """The observed frames [T] (bool) of one sample of `task` (sparse subsets drawn as the module says)."""
    mask = torch.zeros(num_frames, dtype=torch.bool)
    if task == "image":
        mask[0] = True
    elif task == "video":
        mask[:] = True
    elif task == "sparse":
        frac = cfg.sparse_min_frac + (cfg.sparse_max_frac - cfg.sparse_min_frac) * torch.rand(
            1, generator=generator, device=generator.device).cpu()
        k = min(max(round(float(frac) * num_frames), 2), max(num_frames - 1, 1))
        mask[0] = True
        mask[1 + torch.randperm(num_frames - 1, generator=generator, device=generator.device).cpu()[: k - 1]] = True
    else:
        raise ValueError(f"unknown UMC task {task!r}; expected one of {TASKS}")
    return mask


def sample_umc(batch: int, num_frames: int, cfg: UMCConfig,
               generator: torch.Generator) -> tuple[list[str], torch.Tensor]:
    """Tasks and frame masks [B, T] for a training batch."""
    tasks = sample_tasks(batch, cfg, generator)
    return tasks, torch.stack([sample_frame_mask(t, num_frames, cfg, generator) for t in tasks])


def eval_sparse_frames(num_frames: int, cfg: UMCConfig) -> int:
    """The observed frames of evaluation's sparse mode by default (eval.sparse_frames=0): the middle of what the
    training sparse task draws for a clip of `num_frames` (a fixed 5 was below training's range at 81 frames, 8-40,
    and above it at 9, 2-4)."""
    k = round((cfg.sparse_min_frac + cfg.sparse_max_frac) / 2 * num_frames)
    return min(max(k, 2), max(num_frames - 1, 2))


def eval_frame_mask(mode: str, num_frames: int, sparse_frames: int = 0) -> torch.Tensor:
    """Evaluation's fixed mask [T]: image = first frame; video = all; sparse = `sparse_frames` frames
    (>= 2) evenly spaced from the first to the last, both included."""
    mask = torch.zeros(num_frames, dtype=torch.bool)
    if mode == "image":
        mask[0] = True
    elif mode == "video":
        mask[:] = True
    elif mode == "sparse":
        if not 2 <= sparse_frames <= num_frames:
            raise ValueError(f"eval.sparse_frames must be in [2, {num_frames}] for a clip of {num_frames} frames, "
                             f"got {sparse_frames}")
        mask[torch.linspace(0, num_frames - 1, sparse_frames).round().long()] = True
    else:
        raise ValueError(f"unknown UMC mode {mode!r}; expected one of {TASKS}")
    return mask


def condition_video(rgb: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
    """rgb [B, 3, T, H, W] with the unobserved frames (frame_mask [B, T] False) set to 0."""
    return rgb * frame_mask[:, None, :, None, None].to(rgb.dtype)


def fold_frame_mask(frame_mask: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """frame_mask [B, T] -> [B, 4, T_lat, h, w], Wan I2V's layout (WanImageToVideoPipeline.prepare_latents):
    the first frame's mask repeated 4 times, then frames taken in groups of 4; channel c of latent frame t
    is frame 4t + c - 3 (frame 0 for t = 0)."""
    b, t = frame_mask.shape
    if (t - 1) % TEMPORAL_STRIDE:
        raise ValueError(f"frame mask of {t} frames: need T = 4k+1")
    m = frame_mask.float()
    m = torch.cat([m[:, :1].repeat(1, TEMPORAL_STRIDE), m[:, 1:]], dim=1)
    m = m.view(b, (t + TEMPORAL_STRIDE - 1) // TEMPORAL_STRIDE, TEMPORAL_STRIDE).transpose(1, 2)
    return m[..., None, None].expand(b, TEMPORAL_STRIDE, m.shape[2], h, w).contiguous()


def rgb_branch_input(z_rgb_t: torch.Tensor, mask4: torch.Tensor, z_cond: torch.Tensor) -> torch.Tensor:
    """concat(noisy RGB latent [B,16,...], folded mask [B,4,...], condition latent [B,16,...]) -> [B,36,...]."""
    return torch.cat([z_rgb_t, mask4.to(z_rgb_t.dtype), z_cond.to(z_rgb_t.dtype)], dim=1)


def xyz_branch_input(z_xyz_t: torch.Tensor, in_channels: int = 36) -> torch.Tensor:
    """The noisy XYZ latent followed by zero channels up to `in_channels`."""
    b, c, *rest = z_xyz_t.shape
    return torch.cat([z_xyz_t, z_xyz_t.new_zeros(b, in_channels - c, *rest)], dim=1)


def condition_latent(task: str, z_rgb: torch.Tensor, encode_fn: Callable[[torch.Tensor], torch.Tensor],
                     cond_video: torch.Tensor) -> torch.Tensor:
    """z_c of one task's samples. In the video task the condition video is the clip itself, so z_c is the
    RGB target latent (no encode; equal to encoding it when targets are posterior means, WanVAE's default);
    the image and sparse tasks encode their condition video. The image task's z_c depends only on the clip
    window, so it may also come precomputed from the shards."""
    if task == "video":
        return z_rgb
    if task in ("image", "sparse"):
        return encode_fn(cond_video)
    raise ValueError(f"unknown UMC task {task!r}; expected one of {TASKS}")


def fixed_per_clip(task: str) -> bool:
    """Whether the task's condition latent is a function of the clip window alone (so it can be stored with
    the shards): true for image (first frame only) and video (= the RGB target latent), false for sparse."""
    return task in ("image", "video")


def condition_latents(tasks: list[str], frame_mask: torch.Tensor, rgb: torch.Tensor, z_rgb: torch.Tensor,
                      encode_fn: Callable[[torch.Tensor], torch.Tensor],
                      z_image: torch.Tensor | None = None) -> torch.Tensor:
    """z_c [B, 16, T_lat, h, w] for a batch: the video-task samples reuse z_rgb, image-task samples use the
    precomputed `z_image` when given, and all remaining condition videos are encoded in one call."""
    z_c = z_rgb.clone()
    image = [i for i, t in enumerate(tasks) if t == "image"]
    if z_image is not None and image:
        z_c[image] = z_image[image].to(z_c)
    todo = [i for i, t in enumerate(tasks) if t == "sparse" or (t == "image" and z_image is None)]
    if todo:
        idx = torch.tensor(todo, device=rgb.device)
        z_c[idx] = encode_fn(condition_video(rgb[idx], frame_mask[todo].to(rgb.device))).to(z_c)
    return z_c


def first_observed_frame(rgb: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
    """rgb [B, 3, T, H, W] -> the first observed frame of each sample [B, 3, H, W] (CLIP image input)."""
    first = frame_mask.long().argmax(dim=1).to(rgb.device)
    return rgb[torch.arange(rgb.shape[0], device=rgb.device), :, first]
