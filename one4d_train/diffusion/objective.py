"""Rectified-flow objective of One4D (as in the paper and Wan2.1).

  x_t = (1 - s) x0 + s noise,   target v = noise - x0,   s in (0, 1) (s = 1 is pure noise).
The DiT receives the timestep t = s * TIMESTEP_SCALE (1000), Wan's scale. One s is drawn per sample and
shared by the RGB and XYZ branches; each branch gets its own noise. Timesteps: uniform or logit-normal
(sigmoid of N(logit_mean, logit_std^2)), then Wan's shift s' = k s / (1 + (k - 1) s), k = FlowConfig.shift.

The XYZ loss is masked where geometry is missing, in latent space (`latent_validity`): the MSE is averaged
over the valid latent cells of each sample, then over the batch; a sample with no valid cell adds 0 to the
sum but still counts in the batch average, so a batch's loss scale does not jump with its validity.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from one4d_train.diffusion.config import FlowConfig

TIMESTEP_SCALE = 1000.0
TEMPORAL_STRIDE = 4
SPATIAL_STRIDE = 8
_EPS = 1e-6


def _gen_device(generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


def shift_timesteps(s: torch.Tensor, shift: float) -> torch.Tensor:
    """Wan's shift s' = k s / (1 + (k - 1) s); k > 1 moves mass towards noise."""
    return shift * s / (1 + (shift - 1) * s)


def sample_timesteps(batch: int, cfg: FlowConfig, generator: torch.Generator | None = None,
                     device: str | torch.device = "cpu") -> torch.Tensor:
    """s [B] in (0, 1), float32."""
    gd = _gen_device(generator)
    if cfg.timestep_sampling == "uniform":
        s = torch.rand(batch, generator=generator, device=gd)
    elif cfg.timestep_sampling == "logit_normal":
        s = torch.sigmoid(cfg.logit_mean + cfg.logit_std * torch.randn(batch, generator=generator, device=gd))
    else:
        raise ValueError(f"flow.timestep_sampling: unknown {cfg.timestep_sampling!r}")
    return shift_timesteps(s, cfg.shift).clamp(_EPS, 1 - _EPS).to(device)


def model_timestep(s: torch.Tensor) -> torch.Tensor:
    """The timestep the DiT is conditioned on: s scaled to [0, 1000] as Wan does."""
    return s * TIMESTEP_SCALE


def _per_sample(s: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return s.to(x.dtype).view(-1, *([1] * (x.dim() - 1)))


def add_noise(x0: torch.Tensor, noise: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    s = _per_sample(s, x0)
    return (1 - s) * x0 + s * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return noise - x0


def noisy_pair(z_rgb: torch.Tensor, z_xyz: torch.Tensor, cfg: FlowConfig,
               generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """The flow inputs of both branches: one s per sample, separate noise per branch.
    Returns s, timestep, x_rgb, x_xyz (noisy latents) and target_rgb, target_xyz."""
    s = sample_timesteps(z_rgb.shape[0], cfg, generator, z_rgb.device)
    gd = _gen_device(generator)
    noise_rgb = torch.randn(z_rgb.shape, generator=generator, device=gd).to(z_rgb)
    noise_xyz = torch.randn(z_xyz.shape, generator=generator, device=gd).to(z_xyz)
    return dict(s=s, timestep=model_timestep(s),
                x_rgb=add_noise(z_rgb, noise_rgb, s), x_xyz=add_noise(z_xyz, noise_xyz, s),
                target_rgb=velocity_target(z_rgb, noise_rgb), target_xyz=velocity_target(z_xyz, noise_xyz))


def latent_validity(valid: torch.Tensor, min_fraction: float = 1.0) -> torch.Tensor:
    """Pixel validity [B, T, 1, H, W] (the sample layout) or [B, 1, T, H, W] -> latent cells [B, 1, T_lat, h, w].

    Cells follow the Wan VAE grid: the first frame alone, then groups of 4 frames; 8 x 8 pixels. A cell
    counts when at least `min_fraction` of its pixels are valid; the default 1.0 (ALL pixels) because a
    partly invalid cell's latent also encodes the filler written where geometry is missing, so its target
    is not geometry.
    """
    if valid.dim() != 5:
        raise ValueError(f"valid must be 5-D, got shape {tuple(valid.shape)}")
    if valid.shape[2] == 1 and valid.shape[1] != 1:
        valid = valid.transpose(1, 2)
    v = valid.float()
    t = v.shape[2]
    if (t - 1) % TEMPORAL_STRIDE or v.shape[3] % SPATIAL_STRIDE or v.shape[4] % SPATIAL_STRIDE:
        raise ValueError(f"validity of {tuple(valid.shape)}: need T = 4k+1 and H, W multiples of 8")
    first = F.avg_pool3d(v[:, :, :1], (1, SPATIAL_STRIDE, SPATIAL_STRIDE))
    parts = [first]
    if t > 1:
        parts.append(F.avg_pool3d(v[:, :, 1:], (TEMPORAL_STRIDE, SPATIAL_STRIDE, SPATIAL_STRIDE)))
    return torch.cat(parts, dim=2) >= min_fraction - _EPS


def _sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (pred.float() - target.float()).pow(2).flatten(1).mean(1)


def masked_sample_mse(pred: torch.Tensor, target: torch.Tensor, cell_valid: torch.Tensor) -> torch.Tensor:
    """Per-sample MSE over the valid cells (cell_valid [B, 1, T_lat, h, w], broadcast over channels);
    0 for a sample without valid cells."""
    w = cell_valid.to(torch.float32).expand_as(pred)
    err = (pred.float() - target.float()).pow(2) * w
    count = w.flatten(1).sum(1)
    return err.flatten(1).sum(1) / count.clamp_min(1)


def flow_loss(v_pred_rgb: torch.Tensor, v_pred_xyz: torch.Tensor, target_rgb: torch.Tensor,
              target_xyz: torch.Tensor, latent_valid: torch.Tensor | None, cfg: FlowConfig) -> dict[str, torch.Tensor]:
    """Weighted per-branch MSE. loss = rgb_weight * loss_rgb + xyz_weight * loss_xyz (float32 scalars).
    `latent_valid` None (or cfg.xyz_valid_mask False) = every XYZ cell supervised."""
    loss_rgb = _sample_mse(v_pred_rgb, target_rgb).mean()
    if latent_valid is None or not cfg.xyz_valid_mask:
        loss_xyz = _sample_mse(v_pred_xyz, target_xyz).mean()
    else:
        loss_xyz = masked_sample_mse(v_pred_xyz, target_xyz, latent_valid.to(v_pred_xyz.device)).mean()
    return dict(loss=cfg.rgb_weight * loss_rgb + cfg.xyz_weight * loss_xyz, loss_rgb=loss_rgb, loss_xyz=loss_xyz)
