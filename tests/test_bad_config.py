"""Bad config values are refused with a message naming the key and where its value came from."""
from __future__ import annotations

import pytest

from one4d_train.config import ConfigError, load_config
from one4d_train.configtools import in_range


@pytest.mark.parametrize("item", ["optim.lr=nan", "optim.grad_clip=nan", "optim.lr=inf", "optim.weight_decay=nan",
                                  "flow.logit_mean=nan", "model.umc.p_image=nan", "model.lora.alpha=inf",
                                  "data.pointmap_percentiles=[2.0,nan]", "eval.cfg_scale=nan"])
def test_non_finite_numbers_are_refused(item):
    key = item.split("=")[0]
    with pytest.raises(ConfigError, match=rf"command line: key '{key}': must be a finite number"):
        load_config([item])


def test_in_range_refuses_non_finite_values():
    assert in_range(float("nan"), 0.0, None, "lr")
    assert in_range(float("inf"), 0.0, None, "lr")
    assert in_range(float("-inf"), None, 1.0, "lr")
    assert in_range(float("nan"), None, None, "lr")
    assert not in_range(0.5, 0.0, 1.0, "lr") and not in_range(3, 1, None, "steps")
