"""Flow-matching objective and sampler configuration (the `flow.` subtree)."""
from __future__ import annotations

from dataclasses import dataclass

from one4d_train.configtools import choice, in_range


@dataclass
class FlowConfig:
    timestep_sampling: str = "uniform"  # uniform | logit_normal
    logit_mean: float = 0.0
    logit_std: float = 1.0
    shift: float = 1.0  # Wan's shift s' = k s / (1 + (k - 1) s) applied to the sampled s (1 = none)
    rgb_weight: float = 1.0
    xyz_weight: float = 1.0
    xyz_valid_mask: bool = True  # mask the XYZ loss where geometry is missing (latent-space mask, see diffusion/objective.py)
    xyz_valid_min_fraction: float = 1.0  # latent cell supervised when this fraction of its pixels is valid (1 = all)

    def validate(self):
        p = choice(self.timestep_sampling, ["uniform", "logit_normal"], "timestep_sampling")
        p += in_range(self.shift, 1e-6, None, "shift")
        p += in_range(self.rgb_weight, 0.0, None, "rgb_weight") + in_range(self.xyz_weight, 0.0, None, "xyz_weight")
        p += in_range(self.xyz_valid_min_fraction, 0.0, 1.0, "xyz_valid_min_fraction")
        p += in_range(self.logit_std, 1e-6, None, "logit_std")
        return p
