"""The root config tree. Order: dataclass defaults -> YAML (`config=x.yaml`, with `_base_` includes) -> dotlist."""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace

from data_pipeline.config import DataConfig
from one4d_train.configtools import ConfigError, build_config, choice, in_range, to_yaml
from one4d_train.diffusion.config import FlowConfig
from one4d_train.eval.config import EvalConfig
from one4d_train.model.config import ModelConfig
from one4d_train.train.config import OptimConfig, TrackingConfig, TrainConfig


@dataclass
class One4DConfig:
    name: str = "one4d"
    run_dir: str = "runs/${name}"  # checkpoints, MLflow store and logs; survives requeues
    seed: int = 0
    resume: str = "auto"  # auto (latest complete checkpoint, else fresh) | never | <checkpoint path>
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self):
        p = [] if self.resume in ("auto", "never") or self.resume else [("resume", "must be auto, never or a path")]
        if not self.run_dir:
            p.append(("run_dir", "must name a folder (. for the working directory)"))
        p += in_range(self.seed, 0, 2**32 - 1, "seed")  # numpy's generators take no negative seed
        frames, sparse = self.data.num_frames, self.eval.sparse_frames
        if "sparse" not in self.eval.modes or frames < 1:  # (below 1: data.num_frames' own check)
            return p
        if frames == 1:
            p.append(("data.num_frames", "a clip of 1 frame has no sparse mode to evaluate (it observes the first and "
                      "the last frame at least): use 5 or more frames, or leave sparse out of eval.modes"))
        elif not 2 <= (sparse or 2) <= frames:
            p.append(("eval.sparse_frames", f"the sparse mode observes the first, the last and evenly spaced frames of "
                      f"a clip of data.num_frames={frames}: must be in [2, {frames}] (or 0: the middle of training's "
                      f"sparse range), got {sparse}"))
        return p


def load_config(args=(), checks=None, prepare=None) -> One4DConfig:
    """The merged, validated config (`prepare(cfg)`'s: absolute_paths for `one4d train`); `checks(cfg)` ->
    [(key, problem)] adds a command's own checks (files, imports), reported like value errors (see
    one4d_train.train.config.preflight)."""
    return build_config(One4DConfig, args, checks, prepare)


# keys naming files or folders (eval.dataset: also BENCHMARK:ROOT)
PATH_KEYS = ("data.shards", "data.val_shards", "model.checkpoint", "model.init_adapters", "model.vae",
             "model.text_encoder", "model.tokenizer", "model.empty_prompt_embedding", "model.image_encoder",
             "eval.dataset", "eval.out_dir")


def absolute_paths(cfg: One4DConfig) -> One4DConfig:
    """`cfg` with the relative paths of PATH_KEYS (and of a SQLite tracking.uri) resolved against the working
    directory. `one4d train` stores its config in the run directory, where the evaluation job, an export or a
    resume read it from other folders: a relative path there named other files, or none (the evaluation after
    training could not find data.val_shards when submitted from another folder)."""
    def resolved(value: str) -> str:
        name, sep, root = value.partition(":")
        if sep and name.isidentifier() and "/" not in name:  # sintel:ROOT
            return f"{name}:{resolved(root)}" if root else value
        return os.path.abspath(value) if value and not os.path.isabs(value) else value

    sections = {}
    for key in PATH_KEYS:
        section, name = key.split(".")
        changes = sections.setdefault(section, {})
        changes[name] = resolved(getattr(getattr(cfg, section), name))
    # a SQLite store named by a relative path (sqlite:///mlflow.db): `one4d eval` run from another folder made a new,
    # empty store there and logged nothing where the run is
    db = cfg.tracking.uri.removeprefix("sqlite:///")
    if db != cfg.tracking.uri and db and not db.startswith(("/", ":")):
        sections["tracking"] = {"uri": "sqlite:///" + os.path.abspath(db)}
    return replace(cfg, **{section: replace(getattr(cfg, section), **changes) for section, changes in sections.items()})


__all__ = ["One4DConfig", "load_config", "absolute_paths", "ConfigError", "to_yaml", "choice"]
