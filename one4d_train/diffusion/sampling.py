"""Joint flow-matching sampling of the RGB and XYZ branches on one shared timestep grid.

The objective (diffusion/objective.py) defines x_s = (1 - s) x0 + s * noise and v = noise - x0, so sampling
integrates dx/ds = v from s = 1 (pure noise) to s = 0. The model sees t = s * 1000. Both branches start from
their own seeded noise and step with the same s at every step.

`velocity_fn(x_rgb, x_xyz, t_model [B], cond) -> (v_rgb, v_xyz)` wraps the model and the UMC inputs. With
classifier-free guidance, cond and uncond are run as one batch of 2B: `cond` and `uncond` are whatever the
caller's velocity_fn understands, combined by `cat_cond` (default: concatenate every tensor of a dict on
the batch axis).
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

NUM_TRAIN_TIMESTEPS = 1000


def shift_sigmas(s, shift: float):
    """Wan's timestep shift s' = k s / (1 + (k - 1) s)."""
    return shift * s / (1 + (shift - 1) * s)


def euler_sigmas(steps: int, shift: float) -> torch.Tensor:
    """[steps + 1] float64 grid from 1 to 0, shifted."""
    return torch.as_tensor(shift_sigmas(np.linspace(1.0, 0.0, steps + 1), shift), dtype=torch.float64)


def initial_noise(shape_rgb, shape_xyz, seed: int, device="cpu", dtype=torch.float32):
    """Separate noise per branch from one seed; drawn on the CPU so every device gets the same numbers."""
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    n_rgb = torch.randn(tuple(shape_rgb), generator=g, dtype=torch.float32)
    n_xyz = torch.randn(tuple(shape_xyz), generator=g, dtype=torch.float32)
    return n_rgb.to(device, dtype), n_xyz.to(device, dtype)


def _cat_dicts(cond, uncond):
    if isinstance(cond, torch.Tensor):
        return torch.cat([cond, uncond])
    if isinstance(cond, dict):
        return {k: _cat_dicts(cond[k], uncond[k]) for k in cond}
    if isinstance(cond, (list, tuple)):
        return type(cond)(_cat_dicts(a, b) for a, b in zip(cond, uncond))
    return cond


def guided(velocity_fn: Callable, cond, uncond, cfg_scale: float, cat_cond: Callable = _cat_dicts) -> Callable:
    """velocity(x_rgb, x_xyz, t) with CFG: v = v_u + w (v_c - v_u) on both branches; w = 1 runs cond only."""
    if cfg_scale == 1.0 or uncond is None:
        return lambda x_rgb, x_xyz, t: velocity_fn(x_rgb, x_xyz, t, cond)
    both = cat_cond(cond, uncond)

    def v(x_rgb, x_xyz, t):
        v_rgb, v_xyz = velocity_fn(torch.cat([x_rgb, x_rgb]), torch.cat([x_xyz, x_xyz]), torch.cat([t, t]), both)
        out = []
        for vb in (v_rgb, v_xyz):
            vc, vu = vb.chunk(2)
            out.append(vu + cfg_scale * (vc - vu))
        return tuple(out)

    return v


def _euler(velocity, x_rgb, x_xyz, steps, shift, progress):
    sig = euler_sigmas(steps, shift)
    B = x_rgb.shape[0]
    for i in range(steps):
        t = torch.full((B,), float(sig[i]) * NUM_TRAIN_TIMESTEPS, device=x_rgb.device, dtype=torch.float32)
        v_rgb, v_xyz = velocity(x_rgb, x_xyz, t)
        ds = float(sig[i + 1] - sig[i])
        x_rgb = (x_rgb.double() + ds * v_rgb.double()).to(x_rgb.dtype)
        x_xyz = (x_xyz.double() + ds * v_xyz.double()).to(x_xyz.dtype)
        if progress:
            progress(i + 1, steps)
    return x_rgb, x_xyz


def unipc_scheduler(steps: int, shift: float, device="cpu"):
    from diffusers import UniPCMultistepScheduler

    sch = UniPCMultistepScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, use_flow_sigmas=True,
                                  prediction_type="flow_prediction", flow_shift=shift, solver_order=2)
    # unshifted grid 1 -> 1/steps, the same base grid as the Euler sampler; the scheduler applies the shift
    sch.set_timesteps(sigmas=np.linspace(1.0, 0.0, steps + 1)[:-1], device=device)
    # step i is the i-th grid point, as in diffusers' Wan pipeline: the integer timesteps repeat above ~200 steps
    # ([999, 999, 998, ...]) and a lookup by value starts at the second copy and runs off the end
    sch.set_begin_index(0)
    return sch


def _unipc(velocity, x_rgb, x_xyz, steps, shift, progress):
    sch_rgb, sch_xyz = unipc_scheduler(steps, shift, x_rgb.device), unipc_scheduler(steps, shift, x_rgb.device)
    B = x_rgb.shape[0]
    for i, ts in enumerate(sch_rgb.timesteps):
        t = torch.full((B,), float(sch_rgb.sigmas[i]) * NUM_TRAIN_TIMESTEPS, device=x_rgb.device,
                       dtype=torch.float32)
        v_rgb, v_xyz = velocity(x_rgb, x_xyz, t)
        x_rgb = sch_rgb.step(v_rgb.float(), ts, x_rgb.float(), return_dict=False)[0].to(x_rgb.dtype)
        x_xyz = sch_xyz.step(v_xyz.float(), ts, x_xyz.float(), return_dict=False)[0].to(x_xyz.dtype)
        if progress:
            progress(i + 1, steps)
    return x_rgb, x_xyz


@torch.no_grad()
def sample(velocity_fn: Callable, noise_rgb: torch.Tensor, noise_xyz: torch.Tensor, cond, uncond=None, *,
           sampler: str = "unipc", steps: int = 50, shift: float = 5.0, cfg_scale: float = 6.0,
           cat_cond: Callable = _cat_dicts, progress: Callable | None = None):
    """Integrate both branches from their noise (s = 1) to s = 0. Returns (x0_rgb, x0_xyz) latents."""
    velocity = guided(velocity_fn, cond, uncond, cfg_scale, cat_cond)
    if sampler == "euler":
        return _euler(velocity, noise_rgb, noise_xyz, steps, shift, progress)
    if sampler == "unipc":
        return _unipc(velocity, noise_rgb, noise_xyz, steps, shift, progress)
    raise ValueError(f"sampler must be 'euler' or 'unipc', got {sampler!r}")
