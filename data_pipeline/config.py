"""Data configuration (the `data.` subtree)."""
from __future__ import annotations

from dataclasses import dataclass, field

from one4d_train.configtools import choice, in_range


@dataclass
class DataConfig:
    shards: str = ""  # a shard directory (holding index.json) or a brace pattern such as /d/shard-{000000..000099}.tar
    val_shards: str = ""  # held-out shards for evaluation during training
    mode: str = "exact"  # exact: every sample once per epoch, resumable position; resampled: infinite, fixed epoch length
    epoch_length: int = 0  # resampled mode: samples per rank per epoch (0 = dataset size / world size)
    num_workers: int = 2
    shuffle_buffer: int = 16
    num_frames: int = 81  # frames per training clip (4k+1 for the Wan VAE)
    frame_stride: int = 1
    height: int = 352
    width: int = 624
    crop: str = "random"  # random | center
    pointmap_percentiles: list[float] = field(default_factory=lambda: [2.0, 98.0])
    sample_dtype: str = "float32"  # rgb and xyz dtype: float32 | float16 | bfloat16 (half the bytes; the bf16 runs use it)
    use_latents: bool = True  # use precomputed latents from the shards when they are present
    # workers ship uint8 frames and cropped geometry; the trainer makes rgb/xyz on its device (data_pipeline/finish.py)
    finish_on_device: bool = False

    def validate(self):
        p = []
        p += choice(self.mode, ["exact", "resampled"], "mode")
        p += choice(self.crop, ["random", "center"], "crop")
        p += choice(self.sample_dtype, ["float32", "float16", "bfloat16"], "sample_dtype")
        p += in_range(self.shuffle_buffer, 0, None, "shuffle_buffer")
        p += in_range(self.epoch_length, 0, None, "epoch_length")
        p += in_range(self.num_workers, 0, None, "num_workers")
        p += in_range(self.num_frames, 1, None, "num_frames")
        p += in_range(self.frame_stride, 1, None, "frame_stride")
        if (self.num_frames - 1) % 4:
            p.append(("num_frames", f"must be 4k+1 for the Wan VAE, got {self.num_frames}"))
        if self.height % 16 or self.width % 16 or self.height < 16 or self.width < 16:
            p.append(("height", f"height and width must be positive multiples of 16, got {self.height}x{self.width}"))
        lo, hi = (self.pointmap_percentiles + [None, None])[:2]
        if len(self.pointmap_percentiles) != 2 or not (0 <= lo < hi <= 100):
            p.append(("pointmap_percentiles", f"must be [lo, hi] with 0 <= lo < hi <= 100, got {self.pointmap_percentiles}"))
        return p
