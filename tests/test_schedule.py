import json
import math

import pytest
import torch

from one4d_train.config import ConfigError, load_config
from one4d_train.train.schedule import WarmupSchedule, build_scheduler


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
