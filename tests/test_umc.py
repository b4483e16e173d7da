import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, WanImageToVideoPipeline

from one4d_train.model.config import UMCConfig
from one4d_train.model.umc import (condition_latent, condition_latents, condition_video, eval_frame_mask,
                                   first_observed_frame, fold_frame_mask, rgb_branch_input, sample_frame_mask,
                                   sample_tasks, sample_umc, xyz_branch_input)
from one4d_train.model.vae import WanVAE, tiny_wan_vae


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_task_mix_matches_config_within_4_sigma():
    cfg = UMCConfig(p_image=0.35, p_sparse=0.30, p_video=0.35)
    n = 10_000
    tasks = sample_tasks(n, cfg, gen(0))
    for name, p in (("image", cfg.p_image), ("sparse", cfg.p_sparse), ("video", cfg.p_video)):
        count = sum(t == name for t in tasks)
        assert abs(count - n * p) < 4 * math.sqrt(n * p * (1 - p)), (name, count)
    skewed = sample_tasks(n, UMCConfig(p_image=0.1, p_sparse=0.0, p_video=0.9), gen(1))
    assert "sparse" not in skewed and abs(skewed.count("image") - 1000) < 4 * math.sqrt(n * 0.09)


def test_same_seed_same_tasks_and_masks():
    cfg = UMCConfig()
    a_tasks, a_mask = sample_umc(64, 21, cfg, gen(3))
    b_tasks, b_mask = sample_umc(64, 21, cfg, gen(3))
    c_tasks, _ = sample_umc(64, 21, cfg, gen(4))
    assert a_tasks == b_tasks and torch.equal(a_mask, b_mask) and a_tasks != c_tasks


def test_frame_masks_per_task():
    cfg = UMCConfig(sparse_min_frac=0.2, sparse_max_frac=0.4)
    t = 21
    assert sample_frame_mask("image", t, cfg, gen()).tolist() == [True] + [False] * (t - 1)
    assert sample_frame_mask("video", t, cfg, gen()).all()
    g = gen(5)
    for _ in range(200):
        m = sample_frame_mask("sparse", t, cfg, g)
        assert m[0] and round(0.2 * t) <= m.sum() <= round(0.4 * t)
    with pytest.raises(ValueError):
        sample_frame_mask("depth", t, cfg, gen())


def test_eval_sparse_mask_first_last_evenly_spaced():
    m = eval_frame_mask("sparse", 17, 5)
    assert torch.nonzero(m).flatten().tolist() == [0, 4, 8, 12, 16]
    m = eval_frame_mask("sparse", 21, 4)
    assert torch.nonzero(m).flatten().tolist() == [0, 7, 13, 20]
    assert eval_frame_mask("image", 9).tolist() == [True] + [False] * 8
    assert eval_frame_mask("video", 9).all()
    with pytest.raises(ValueError):
        eval_frame_mask("sparse", 9, 1)


@pytest.mark.parametrize("frames", [1, -1, 10])
def test_eval_sparse_frames_checked_against_the_clip_length(frames):
    """Accepted, a bad count only failed at the first evaluation (in training: after eval.every steps)."""
    from one4d_train.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"command line: key 'eval.sparse_frames'.*\[2, 9\]"):
        load_config(["data.num_frames=9", f"eval.sparse_frames={frames}"])
    assert load_config(["data.num_frames=9", f"eval.sparse_frames={frames}", "eval.modes=[image,video]"])
    assert load_config(["data.num_frames=9", "eval.sparse_frames=9"]).eval.sparse_frames == 9
    with pytest.raises(ConfigError, match=r"key 'data.num_frames': a clip of 1 frame has no sparse mode"):
        load_config(["data.num_frames=1"])  # the default count needs 2 frames too (named by the key that was set)
    with pytest.raises(ValueError, match="eval.sparse_frames"):  # a benchmark clip shorter than the configured count
        eval_frame_mask("sparse", 5, 6)


def test_condition_video_and_branch_inputs():
    rgb = torch.rand(2, 3, 5, 8, 8) + 0.5
    mask = torch.tensor([[1, 0, 0, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    cond = condition_video(rgb, mask)
    assert torch.equal(cond[0, :, [0, 3]], rgb[0, :, [0, 3]]) and cond[0, :, [1, 2, 4]].eq(0).all()
    assert torch.equal(cond[1], rgb[1])
    folded = fold_frame_mask(mask, 1, 1)
    assert folded.shape == (2, 4, 2, 1, 1)
    assert folded[0, :, 0].flatten().tolist() == [1, 1, 1, 1]
    assert folded[0, :, 1].flatten().tolist() == [0, 0, 1, 0]  # frames 1..4
    x = rgb_branch_input(torch.randn(2, 16, 2, 1, 1), folded, torch.randn(2, 16, 2, 1, 1))
    assert x.shape == (2, 36, 2, 1, 1) and torch.equal(x[:, 16:20], folded)
    z = torch.randn(2, 16, 2, 1, 1)
    y = xyz_branch_input(z)
    assert y.shape == (2, 36, 2, 1, 1) and torch.equal(y[:, :16], z) and y[:, 16:].eq(0).all()
    assert torch.equal(first_observed_frame(rgb, torch.tensor([[0, 0, 1, 1, 0], [1] * 5], dtype=torch.bool)),
                       torch.stack([rgb[0, :, 2], rgb[1, :, 0]]))


@pytest.fixture(scope="module")
def tiny_pipeline():
    vae = tiny_wan_vae(0)
    return WanImageToVideoPipeline(tokenizer=None, text_encoder=None, vae=vae,
                                   scheduler=FlowMatchEulerDiscreteScheduler()), WanVAE(vae)


@pytest.mark.parametrize("with_last", [False, True])
def test_mask_and_condition_equal_wan_i2v(tiny_pipeline, with_last):
    pipe, vae = tiny_pipeline
    t, h, w = 5, 16, 16
    image = torch.rand(1, 3, h, w) * 2 - 1
    last = torch.rand(1, 3, h, w) * 2 - 1 if with_last else None
    _, wan = pipe.prepare_latents(image, 1, 16, h, w, t, torch.float32, torch.device("cpu"), gen(0),
                                  last_image=last)
    frame_mask = torch.zeros(1, t, dtype=torch.bool)
    frame_mask[0, 0] = True
    rgb = torch.zeros(1, 3, t, h, w)
    rgb[:, :, 0] = image
    if with_last:
        frame_mask[0, -1] = True
        rgb[:, :, -1] = last
    ours_mask = fold_frame_mask(frame_mask, h // 8, w // 8)
    assert torch.equal(ours_mask, wan[:, :4])
    z_c = condition_latent("image", None, vae.encode, condition_video(rgb, frame_mask))
    assert torch.allclose(z_c, wan[:, 4:], atol=1e-5)


def test_condition_latent_reuses_rgb_latent_for_video_task():
    calls = []

    def encode(video):
        calls.append(video.shape[0])
        return torch.full((video.shape[0], 16, 2, 1, 1), 7.0)

    z_rgb = torch.randn(3, 16, 2, 1, 1)
    assert condition_latent("video", z_rgb, encode, None) is z_rgb and not calls
    rgb = torch.rand(3, 3, 5, 8, 8)
    mask = torch.stack([eval_frame_mask("video", 5), eval_frame_mask("image", 5), eval_frame_mask("sparse", 5, 3)])
    z_c = condition_latents(["video", "image", "sparse"], mask, rgb, z_rgb, encode)
    assert calls == [2] and torch.equal(z_c[0], z_rgb[0]) and z_c[1:].eq(7).all()
    z_image = torch.full_like(z_rgb, -1.0)
    z_c = condition_latents(["video", "image", "sparse"], mask, rgb, z_rgb, encode, z_image=z_image)
    assert calls == [2, 1] and z_c[1].eq(-1).all() and z_c[2].eq(7).all()


@pytest.mark.parametrize("frames", [9, 49, 81])
def test_eval_sparse_mode_observes_as_many_frames_as_training_does(frames):
    """eval.sparse_frames=0 (the default): evaluation's sparse mode observes a count the training sparse task draws
    (a fixed 5 was below training's 8-40 at 81 frames and above its 2-4 at 9: a setting never trained on)."""
    from one4d_train.model.config import UMCConfig
    from one4d_train.model.umc import eval_sparse_frames

    cfg = UMCConfig()
    g = torch.Generator().manual_seed(0)
    drawn = {int(sample_frame_mask("sparse", frames, cfg, g).sum()) for _ in range(2000)}
    k = eval_sparse_frames(frames, cfg)
    assert min(drawn) <= k <= max(drawn), (k, sorted(drawn))
    assert int(eval_frame_mask("sparse", frames, k).sum()) == k
