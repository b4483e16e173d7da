import json
import math

import pytest
import torch

from one4d_train.config import ConfigError, load_config
from one4d_train.train.schedule import WarmupSchedule, apply_config, build_scheduler


def test_warmup_then_cosine_to_floor():
    s = WarmupSchedule(warmup_steps=4, total_steps=14, kind="cosine", min_lr_ratio=0.1)
    assert [s(i) for i in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert s(4) == pytest.approx(1.0)
    assert s(9) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))  # halfway: 0.55
    assert s(14) == pytest.approx(0.1) and s(100) == pytest.approx(0.1)
    values = [s(i) for i in range(4, 15)]
    assert all(a > b for a, b in zip(values, values[1:]))


def test_warmup_then_constant():
    s = WarmupSchedule(warmup_steps=2, total_steps=10)
    assert [s(i) for i in range(5)] == [0.5, 1.0, 1.0, 1.0, 1.0]
    assert WarmupSchedule(0, 10)(0) == 1.0


def test_scheduler_drives_the_optimizer_and_its_state_is_plain_data():
    cfg = load_config(["optim.lr=0.1", "optim.warmup_steps=2", "optim.schedule=cosine", "optim.min_lr_ratio=0.2"])
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=cfg.optim.lr)
    sched = build_scheduler(opt, cfg.optim, total_steps=6)
    lrs = []
    for _ in range(7):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:3] == pytest.approx([0.05, 0.1, 0.1])
    assert lrs[6] == pytest.approx(0.02)
    state = sched.state_dict()
    json.dumps(state)  # no closures: DeepSpeed checkpoints it and weights_only loading reads it back
    fresh = build_scheduler(torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=0.1), cfg.optim, 6)
    fresh.load_state_dict(state)
    assert fresh.get_last_lr() == sched.get_last_lr()


def test_bad_optim_values_name_the_key():
    with pytest.raises(ConfigError, match="optim.schedule"):
        load_config(["optim.schedule=linear"])
    with pytest.raises(ConfigError, match="optim.min_lr_ratio"):
        load_config(["optim.min_lr_ratio=2"])


def _resumed(cfg_written, cfg_now, steps_written, steps_now, done):
    """A scheduler and optimizer as DeepSpeed's load_checkpoint leaves them (state of `cfg_written` after `done`
    steps), with `cfg_now` applied."""
    p = torch.nn.Parameter(torch.zeros(2))
    o = cfg_written.optim
    opt = torch.optim.AdamW([p], lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
    sched = build_scheduler(opt, o, steps_written)
    for _ in range(done):
        opt.step()
        sched.step()
    written = (opt.state_dict(), sched.state_dict(), opt.param_groups[0]["lr"])
    n = cfg_now.optim
    opt2 = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=n.lr, betas=tuple(n.betas), eps=n.eps,
                             weight_decay=n.weight_decay)
    sched2 = build_scheduler(opt2, n, steps_now)
    opt2.load_state_dict(written[0])
    sched2.load_state_dict(written[1])
    return opt2, sched2, apply_config(sched2, n, steps_now), written[2]


def test_resume_applies_this_configs_schedule_and_hyperparameters():
    before = load_config(["optim.lr=0.1", "optim.warmup_steps=2", "optim.schedule=cosine", "optim.min_lr_ratio=0.2"])
    after = load_config(["optim.lr=0.01", "optim.warmup_steps=4", "optim.schedule=cosine", "optim.min_lr_ratio=0.5",
                         "optim.betas=[0.8,0.95]", "optim.eps=1e-6", "optim.weight_decay=0.1"])
    opt, sched, changes, _ = _resumed(before, after, 6, 20, done=3)
    assert changes == ["optim.warmup_steps: 2 -> 4", "train.steps: 6 -> 20", "optim.min_lr_ratio: 0.2 -> 0.5",
                       "optim.lr: 0.1 -> 0.01", "optim.betas: (0.9, 0.999) -> (0.8, 0.95)",
                       "optim.eps: 1e-08 -> 1e-06", "optim.weight_decay: 0.0 -> 0.1"]
    group = opt.param_groups[0]
    assert (group["betas"], group["eps"], group["weight_decay"]) == ((0.8, 0.95), 1e-6, 0.1)
    # the schedule is a function of (config, applied steps): the new one, from the restored count on
    new = WarmupSchedule(4, 20, "cosine", 0.5)
    lrs = []
    for _ in range(5):
        lrs.append(group["lr"])
        opt.step()
        sched.step()
    assert lrs == [0.01 * new(d) for d in range(3, 8)] and sched.get_last_lr() == [group["lr"]]


def test_resume_with_the_same_config_keeps_the_lr_bit_for_bit():
    cfg = load_config(["optim.lr=0.03", "optim.warmup_steps=3", "optim.schedule=cosine", "optim.min_lr_ratio=0.1"])
    opt, _, changes, written_lr = _resumed(cfg, cfg, 24, 24, done=7)
    assert changes == [] and opt.param_groups[0]["lr"] == written_lr
