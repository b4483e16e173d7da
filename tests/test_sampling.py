import numpy as np
import pytest
import torch

from one4d_train.diffusion.sampling import euler_sigmas, initial_noise, sample, shift_sigmas

SHAPE_RGB, SHAPE_XYZ = (3, 16, 3, 4, 5), (3, 16, 3, 4, 5)


def _straight_to(x0_rgb, x0_xyz):
    """The exact velocity of x_s = (1 - s) x0 + s noise for known x0: v = noise - x0 = (x_s - x0) / s."""
    def v(x_rgb, x_xyz, t, cond):
        s = (t / 1000.0).view(-1, *[1] * (x_rgb.ndim - 1)).double()
        return (x_rgb.double() - x0_rgb) / s, (x_xyz.double() - x0_xyz) / s
    return v


@pytest.mark.parametrize("sampler", ["euler", "unipc"])
def test_recovers_known_x0(sampler):
    g = torch.Generator().manual_seed(1)
    x0_rgb, x0_xyz = torch.randn(SHAPE_RGB, generator=g).double(), torch.randn(SHAPE_XYZ, generator=g).double()
    n_rgb, n_xyz = initial_noise(SHAPE_RGB, SHAPE_XYZ, seed=3, dtype=torch.float64)
    out_rgb, out_xyz = sample(_straight_to(x0_rgb, x0_xyz), n_rgb, n_xyz, cond=None, sampler=sampler,
                              steps=7, shift=5.0, cfg_scale=1.0)
    assert torch.allclose(out_rgb, x0_rgb, atol=1e-5) and torch.allclose(out_xyz, x0_xyz, atol=1e-5)


def _gaussian_velocity(m, sd):
    """Exact marginal velocity when x0 ~ N(m, sd^2) independently per element."""
    def v(x_rgb, x_xyz, t, cond):
        out = []
        for x in (x_rgb, x_xyz):
            s = (t / 1000.0).view(-1, *[1] * (x.ndim - 1)).double()
            var = (1 - s) ** 2 * sd ** 2 + s ** 2
            r = x.double() - (1 - s) * m
            e_noise = s / var * r
            e_x0 = m + (1 - s) * sd ** 2 / var * r
            out.append((e_noise - e_x0).to(x.dtype))
        return tuple(out)
    return v


@pytest.mark.parametrize("sampler,steps", [("euler", 200), ("unipc", 20)])
def test_gaussian_data_distribution(sampler, steps):
    n_rgb, n_xyz = initial_noise((4000, 8), (4000, 8), seed=0, dtype=torch.float64)
    x_rgb, x_xyz = sample(_gaussian_velocity(2.0, 0.5), n_rgb, n_xyz, None, sampler=sampler, steps=steps,
                          shift=3.0, cfg_scale=1.0)
    for x in (x_rgb, x_xyz):
        assert abs(x.mean().item() - 2.0) < 0.02 and abs(x.std().item() - 0.5) < 0.02


def test_seeded_and_deterministic():
    def v(x_rgb, x_xyz, t, cond):
        return torch.tanh(x_rgb + cond["c"]) * t.view(-1, 1, 1) / 1000, torch.sin(x_xyz)
    cond = {"c": torch.ones(2, 1, 1)}
    runs = [sample(v, *initial_noise((2, 4, 4), (2, 4, 4), seed=s), cond, sampler="unipc", steps=5, cfg_scale=1.0)
            for s in (7, 7, 8)]
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    assert not torch.equal(runs[0][0], runs[2][0])
    a, b = initial_noise((2, 4), (2, 4), seed=7)
    assert not torch.equal(a, b)


def test_cfg_arithmetic_and_batching():
    calls = []

    def v(x_rgb, x_xyz, t, cond):
        calls.append(x_rgb.shape[0])
        return cond["a"].expand_as(x_rgb), 2 * cond["a"].expand_as(x_xyz)

    B, w = 3, 6.0
    cond, uncond = {"a": torch.full((B, 1), 1.0)}, {"a": torch.full((B, 1), 0.25)}
    n = torch.zeros(B, 4)
    x_rgb, x_xyz = sample(v, n, n, cond, uncond, sampler="euler", steps=4, shift=5.0, cfg_scale=w)
    guided_v = 0.25 + w * (1.0 - 0.25)
    # constant velocity integrated from s = 1 to s = 0: x0 = noise - v
    assert torch.allclose(x_rgb, torch.full_like(n, -guided_v)) and torch.allclose(x_xyz, torch.full_like(n, -2 * guided_v))
    assert calls == [2 * B] * 4
    calls.clear()
    sample(v, n, n, cond, uncond, sampler="euler", steps=4, cfg_scale=1.0)
    assert calls == [B] * 4


def test_shifted_grid():
    sig = euler_sigmas(10, 5.0)
    assert sig[0] == 1.0 and sig[-1] == 0.0 and bool((sig[1:] < sig[:-1]).all())
    assert abs(shift_sigmas(0.5, 5.0) - 5 / 6) < 1e-12
    with pytest.raises(ValueError, match="sampler"):
        sample(lambda *a: a[:2], torch.zeros(1), torch.zeros(1), None, sampler="ddim")


@pytest.mark.parametrize("steps,shift", [(50, 5.0), (250, 5.0), (400, 3.0)])
def test_unipc_at_many_steps_follows_the_exact_flow(steps, shift):
    """Above ~200 steps diffusers' integer timesteps repeat at the start ([999, 999, 998] at 250 steps,
    shift 5); the solver must still take every step in order. For Gaussian data the flow is the affine map
    x0 = m + sd * noise, so every step count is checked against the exact answer."""
    from one4d_train.diffusion.sampling import unipc_scheduler

    timesteps = unipc_scheduler(steps, shift).timesteps
    assert steps == 50 or int((timesteps == timesteps[0]).sum()) > 1  # the case that used to fail
    seen = []
    exact = _gaussian_velocity(2.0, 0.5)

    def v(x_rgb, x_xyz, t, cond):
        seen.append(float(t[0]))
        return exact(x_rgb, x_xyz, t, cond)

    n_rgb, n_xyz = initial_noise((64, 8), (64, 8), seed=0, dtype=torch.float64)
    x_rgb, x_xyz = sample(v, n_rgb, n_xyz, None, sampler="unipc", steps=steps, shift=shift, cfg_scale=1.0)
    want = torch.as_tensor(shift_sigmas(torch.linspace(1, 0, steps + 1, dtype=torch.float64)[:-1], shift)) * 1000
    torch.testing.assert_close(torch.tensor(seen, dtype=torch.float64), want, rtol=0, atol=5e-3)  # a skipped step is >= 0.8 away
    # as close at 250 and 400 steps as at 50 (2.9e-3; Euler is 0.18 at 50 steps, 0.036 at 250)
    torch.testing.assert_close(x_rgb, 2.0 + 0.5 * n_rgb, rtol=0, atol=3e-3)
    torch.testing.assert_close(x_xyz, 2.0 + 0.5 * n_xyz, rtol=0, atol=3e-3)


@pytest.mark.parametrize("shift", [0.0, -1.0])
def test_eval_shift_must_be_positive(shift):
    """Wan's shift k s / (1 + (k - 1) s) is 0/0 at s = 1 for k = 0 and leaves [0, 1] for k < 0: NaN or inf samples."""
    from one4d_train.config import ConfigError, load_config

    with np.errstate(divide="ignore", invalid="ignore"):
        assert not torch.isfinite(euler_sigmas(4, shift)).all()
    with pytest.raises(ConfigError, match=r"command line: key 'eval.shift'"):
        load_config([f"eval.shift={shift}"])
    assert load_config(["eval.shift=1.0"]).eval.shift == 1.0


def test_the_sampler_calls_the_model_as_training_does():
    """model_velocity gives the model its inputs in the model's dtype (as the training step casts them) and no
    autocast: a bf16 model got fp32 context (a dtype error off CUDA) and, under CUDA's bf16 autocast, its fp32 time
    embedding and an fp32-trained model ran in bf16, neither as trained."""
    from test_dlc import model_inputs, randomise_trainable, tiny_one4d

    from one4d_train.eval.pipeline import model_velocity

    model, _ = tiny_one4d()
    randomise_trainable(model)
    model = model.to(torch.bfloat16)
    model.compute_dtype = torch.bfloat16
    rgb_in, x_xyz, t, context, clip = model_inputs()
    x_rgb, mask4, z_cond = rgb_in[:, :16], rgb_in[:, 16:20], rgb_in[:, 20:]
    want = model(rgb_in.bfloat16(), x_xyz.bfloat16(), t, context.bfloat16(), clip.bfloat16())
    got = model_velocity(model)(x_rgb, x_xyz, t, {"mask4": mask4, "z_cond": z_cond, "context": context,
                                                   "clip_fea": clip})
    assert all(g.dtype == torch.float32 and torch.equal(g, w.float()) for g, w in zip(got, want))
