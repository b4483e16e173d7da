"""Evaluation configuration (the `eval.` subtree)."""
from __future__ import annotations

from dataclasses import dataclass, field

from one4d_train.configtools import INF_OK, choice, in_range


@dataclass
class EvalConfig:
    every: int = 0  # evaluate every N training steps on data.val_shards (0 = off)
    num_samples: int = 4
    sampler: str = "unipc"  # euler | unipc
    steps: int = 50
    cfg_scale: float = 6.0  # classifier-free guidance: 1 = none (one pass per step), 0 = unconditional; >= 0
    shift: float = 5.0
    modes: list[str] = field(default_factory=lambda: ["image", "sparse", "video"])
    # observed frames in sparse mode (first, last, evenly spaced); 0 = the middle of training's sparse range
    # (model.umc.sparse_*_frac x frames: 24 of 81)
    sparse_frames: int = 0
    # the video-depth protocol's L1 fits (l1_scale_shift, as Sintel/Bonn tables report; l1_scale), least squares
    # (scale_shift, scale) or the median ratio (eval/alignment.py)
    depth_align: str = "l1_scale_shift"
    # metres; 0 = the protocol's 70 m (MonST3R's depth_evaluation, for Sintel and Bonn alike); inf: none
    depth_cap: float = field(default=0.0, metadata={INF_OK: True})
    out_dir: str = ""  # empty = <checkpoint>/eval; set: the folder of one checkpoint's evaluation (refused for a run directory)
    seed: int = 0
    dataset: str = ""  # empty = data.val_shards; a shard directory/pattern; or sintel:<root> | bonn:<root> | tum:<root>
    benchmark_start: int = 0  # benchmark readers: first frame, frame stride (clips of data.num_frames frames)
    benchmark_stride: int = 1
    recovery_iters: int = 300  # geometry post-optimisation (eval/recovery.py)
    recovery_lr: float = 1e-3
    smooth_rot: float = 0.01
    smooth_centre: float = 0.01
    keyframes: int = 4  # rows of the contact sheet and PLY files per sample
    ply_every_frame: bool = False
    fps: float = 16.0
    # a run directory's checkpoints scored with other settings (or an earlier version's metrics): scored again
    # (changed), or their scores kept (never: the scan evaluates only unscored checkpoints)
    rescore: str = "changed"

    def validate(self):
        p = choice(self.sampler, ["euler", "unipc"], "sampler")
        p += choice(self.rescore, ["changed", "never"], "rescore")
        p += choice(self.depth_align, ["l1_scale_shift", "l1_scale", "scale_shift", "scale", "median"], "depth_align")
        for m in self.modes:
            p += choice(m, ["image", "sparse", "video"], "modes")
        if not self.modes or len(set(self.modes)) != len(self.modes):
            p.append(("modes", f"must name each mode to evaluate once, got {self.modes}"))
        p += in_range(self.steps, 1, None, "steps") + in_range(self.every, 0, None, "every")
        p += in_range(self.cfg_scale, 0.0, None, "cfg_scale")
        p += in_range(self.shift, 1e-6, None, "shift")  # as flow.shift: 0 or less makes the sigma grid NaN or inf
        p += in_range(self.num_samples, 1, None, "num_samples")
        p += in_range(self.seed, 0, 2**32 - 1, "seed")  # as the run's seed: the data reader takes no negative one
        p += in_range(self.recovery_iters, 0, None, "recovery_iters") + in_range(self.keyframes, 1, None, "keyframes")
        p += in_range(self.recovery_lr, 1e-12, None, "recovery_lr")
        p += in_range(self.smooth_rot, 0.0, None, "smooth_rot") + in_range(self.smooth_centre, 0.0, None, "smooth_centre")
        if not self.depth_cap >= 0:
            p.append(("depth_cap", f"must be >= 0 metres (0: the dataset's protocol, inf: no cap), got {self.depth_cap}"))
        p += in_range(self.benchmark_start, 0, None, "benchmark_start")
        p += in_range(self.benchmark_stride, 1, None, "benchmark_stride")
        p += in_range(self.fps, 1 / 1001, None, "fps")  # the lowest rate the video writer takes
        if self.dataset and ":" in self.dataset.split("/")[0]:
            p += choice(self.dataset.split(":", 1)[0], ["sintel", "bonn", "tum"], "dataset")
        return p

    def resolved_depth_cap(self) -> float:
        """The depth cap scored with: depth_cap, or where it is 0 the 70 m of the protocol whose alignment and Abs
        Rel the metrics follow (MonST3R's depth_evaluation, which scores Sintel and Bonn alike to 70 m). The 10 m of
        DepthCrafter's Bonn protocol goes with its disparity-space alignment; depth_cap=10 takes its cap alone."""
        return self.depth_cap or 70.0
