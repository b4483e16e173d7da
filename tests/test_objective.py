import math

import pytest
import torch

from one4d_train.diffusion.config import FlowConfig
from one4d_train.diffusion.objective import (add_noise, flow_loss, latent_validity, model_timestep, noisy_pair,
                                             sample_timesteps, shift_timesteps, velocity_target)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_interpolation_and_target_identities():
    x0, noise = torch.randn(3, 16, 2, 4, 4, generator=gen(1)), torch.randn(3, 16, 2, 4, 4, generator=gen(2))
    s = torch.tensor([0.0, 0.25, 1.0])
    xt = add_noise(x0, noise, s)
    assert torch.equal(xt[0], x0[0]) and torch.allclose(xt[2], noise[2])
    assert torch.allclose(xt[1], 0.75 * x0[1] + 0.25 * noise[1])
    v = velocity_target(x0, noise)
    # the exact ODE: d x_t / d s = v, and x0 is recovered from x_t and v
    assert torch.allclose(xt - _col(s) * v, x0, atol=1e-6)
    assert torch.allclose(add_noise(x0, noise, s + 0.1) - xt, 0.1 * v, atol=1e-6)
    assert torch.allclose(model_timestep(s), s * 1000)


def _col(s):
    return s.view(-1, 1, 1, 1, 1)


def test_shift_formula():
    s = torch.linspace(0, 1, 11)
    assert torch.allclose(shift_timesteps(s, 1.0), s)
    k = 3.0
    expected = torch.tensor([k * v / (1 + (k - 1) * v) for v in s.tolist()])
    assert torch.allclose(shift_timesteps(s, k), expected)
    assert shift_timesteps(torch.tensor(0.5), 5.0).item() == pytest.approx(5 / 6)
    cfg = FlowConfig(shift=3.0)
    raw = sample_timesteps(1000, FlowConfig(), gen(7))
    assert torch.allclose(sample_timesteps(1000, cfg, gen(7)), shift_timesteps(raw, 3.0).clamp(1e-6, 1 - 1e-6))


def test_uniform_and_logit_normal_statistics():
    n = 20000
    u = sample_timesteps(n, FlowConfig(), gen(3))
    assert 0 < u.min() and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 4 * math.sqrt(1 / 12 / n)
    cfg = FlowConfig(timestep_sampling="logit_normal", logit_mean=0.5, logit_std=0.8)
    s = sample_timesteps(n, cfg, gen(4)).double()
    logit = torch.log(s / (1 - s))
    assert abs(logit.mean().item() - 0.5) < 4 * 0.8 / math.sqrt(n)
    assert abs(logit.std().item() - 0.8) < 4 * 0.8 / math.sqrt(2 * n)
    assert torch.equal(sample_timesteps(8, cfg, gen(9)), sample_timesteps(8, cfg, gen(9)))


def test_one_timestep_shared_separate_noise():
    z_rgb, z_xyz = torch.randn(2, 16, 2, 4, 4), torch.randn(2, 16, 2, 4, 4)
    out = noisy_pair(z_rgb, z_xyz, FlowConfig(), gen(5))
    s = out["s"]
    noise_rgb, noise_xyz = out["target_rgb"] + z_rgb, out["target_xyz"] + z_xyz
    assert torch.allclose(out["x_rgb"], add_noise(z_rgb, noise_rgb, s), atol=1e-6)
    assert torch.allclose(out["x_xyz"], add_noise(z_xyz, noise_xyz, s), atol=1e-6)
    assert not torch.allclose(noise_rgb, noise_xyz)
    assert torch.allclose(out["timestep"], s * 1000)


def test_latent_validity_grid_and_layouts():
    valid = torch.ones(1, 9, 1, 16, 16, dtype=torch.bool)
    valid[0, 0, 0, 0, 0] = False  # first frame, cell (0, 0)
    valid[0, 6, 0, 9, 15] = False  # frames 5-8 -> latent frame 2, cell (1, 1)
    cells = latent_validity(valid)
    assert cells.shape == (1, 1, 3, 2, 2)
    expected = torch.ones(1, 1, 3, 2, 2, dtype=torch.bool)
    expected[0, 0, 0, 0, 0] = False
    expected[0, 0, 2, 1, 1] = False
    assert torch.equal(cells, expected)
    assert torch.equal(latent_validity(valid.transpose(1, 2)), expected)
    assert latent_validity(valid, min_fraction=0.5).all()


def test_masked_loss_hand_computed_and_ignores_invalid_cells():
    cfg = FlowConfig(rgb_weight=1.0, xyz_weight=0.5)
    target = torch.zeros(2, 2, 1, 1, 2)
    pred_xyz = torch.tensor([[[[[1.0, 3.0]]], [[[2.0, 5.0]]]], [[[[4.0, 4.0]]], [[[4.0, 4.0]]]]])
    valid = torch.tensor([[True, False], [False, False]]).view(2, 1, 1, 1, 2)
    pred_rgb = torch.ones(2, 2, 1, 1, 2) * 2
    out = flow_loss(pred_rgb, pred_xyz, target, target, valid, cfg)
    # sample 0: valid cell 0 across 2 channels -> (1 + 4) / 2 = 2.5; sample 1: no valid cell -> 0, still counted
    assert out["loss_xyz"].item() == pytest.approx(2.5 / 2)
    assert out["loss_rgb"].item() == pytest.approx(4.0)
    assert out["loss"].item() == pytest.approx(4.0 + 0.5 * 1.25)
    changed = pred_xyz.clone()
    changed[0, :, :, :, 1] = 100.0
    changed[1] = -7.0
    assert torch.equal(flow_loss(pred_rgb, changed, target, target, valid, cfg)["loss_xyz"], out["loss_xyz"])
    changed[0, 0, 0, 0, 0] = 0.0
    assert flow_loss(pred_rgb, changed, target, target, valid, cfg)["loss_xyz"] != out["loss_xyz"]
    unmasked = flow_loss(pred_rgb, pred_xyz, target, target, valid, FlowConfig(xyz_valid_mask=False))
    assert unmasked["loss_xyz"].item() == pytest.approx(pred_xyz.pow(2).mean().item())


def test_loss_gradients_reach_only_valid_cells():
    pred = torch.randn(1, 16, 3, 2, 2, requires_grad=True)
    valid = torch.zeros(1, 1, 3, 2, 2, dtype=torch.bool)
    valid[0, 0, 1] = True
    zero = torch.zeros(1, 1)
    flow_loss(zero, pred, zero, torch.zeros_like(pred), valid, FlowConfig())["loss"].backward()
    assert pred.grad[:, :, 1].abs().sum() > 0
    assert pred.grad[:, :, 0].abs().sum() == 0 and pred.grad[:, :, 2].abs().sum() == 0
