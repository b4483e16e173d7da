"""`train.deepspeed_overrides`: tuning keys merge into the generated DeepSpeed config; keys the trainer derives from
train.* / optim.* (or relies on) and keys DeepSpeed does not read are refused, naming the key to set instead."""
from __future__ import annotations

import pytest

from one4d_train.config import ConfigError, load_config
from one4d_train.train import deepspeed_config


def cfg_with(overrides: str, *extra):
    return load_config(["train.micro_batch_size=2", "train.grad_accum=1", "train.precision=fp32", *extra,
                        f"train.deepspeed_overrides={overrides}"])


def problems(overrides: str, *extra, world_size=2) -> dict[str, str]:
    return dict(deepspeed_config.problems(cfg_with(overrides, *extra), world_size))


def test_accumulation_and_batch_size_are_the_trainers():
    """Overriding them made every other step count as skipped and the logged global batch wrong."""
    found = problems("{gradient_accumulation_steps: 2, train_batch_size: 8}")
    assert "train.grad_accum" in found["train.deepspeed_overrides.gradient_accumulation_steps"]
    assert "train.micro_batch_size" in found["train.deepspeed_overrides.train_batch_size"]
    with pytest.raises(ConfigError, match=r"train.deepspeed_overrides.gradient_accumulation_steps.*train.grad_accum"):
        deepspeed_config.build(cfg_with("{gradient_accumulation_steps: 2}"), world_size=2)


@pytest.mark.parametrize("overrides,instead", [
    ("{train_micro_batch_size_per_gpu: 4}", "train.micro_batch_size"),
    ("{managed_gradient_accumulation: false}", "train.grad_accum"),
    ("{zero_optimization: {stage: 2}}", "train.zero_stage"),
    ("{zero_optimization: {stage3_param_persistence_threshold: 0}}", "train.zero3_param_persistence_threshold"),
    ("{zero_optimization: {param_persistence_threshold: 0}}", "train.zero3_param_persistence_threshold"),
    ("{zero_optimization: 2}", "train.zero_stage"),
    ("{bf16: {enabled: true}}", "train.precision"),
    ("{fp16: {enabled: true}}", "train.precision"),
    ("{gradient_clipping: 0.0}", "optim.grad_clip"),
    ("{zero_force_ds_cpu_optimizer: true}", "torch AdamW"),
    ("{optimizer: {type: Adam, params: {lr: 0.1}}}", "optim.lr"),
    ("{scheduler: {type: WarmupLR}}", "optim.schedule"),
    ("{zero_allow_untested_optimizer: false}", "AdamW"),
    ("{zero_optimization: {elastic_checkpoint: true}}", "CRC-32"),
])
def test_keys_the_trainer_sets_are_refused_naming_what_to_set(overrides, instead):
    found = problems(overrides)
    assert len(found) == 1 and instead in next(iter(found.values())), found


def test_bf16_overflow_check_is_the_trainers():
    found = problems("{bf16: {check_grad_overflow: false}}", "train.precision=bf16")
    assert "non-finite" in found["train.deepspeed_overrides.bf16.check_grad_overflow"]


def test_an_override_equal_to_the_derived_value_changes_nothing():
    cfg = cfg_with("{gradient_accumulation_steps: 1, train_batch_size: 4, bf16: {enabled: false}, "
                   "zero_optimization: {stage: 3}}")
    ds, changed = deepspeed_config.build(cfg, world_size=2)
    assert ds["gradient_accumulation_steps"] == 1 and ds["train_batch_size"] == 4 and changed == []
    assert "train.deepspeed_overrides.train_batch_size" in dict(deepspeed_config.problems(cfg, world_size=4))


def test_misspelt_top_level_key_is_refused_with_a_suggestion():
    found = problems("{zero_optimisation: {stage: 2}}")
    assert "did you mean 'zero_optimization'" in found["train.deepspeed_overrides.zero_optimisation"]
    assert "train.deepspeed_overrides.made_up" in problems("{made_up: 1}")


def test_removed_and_misspelt_nested_keys_are_refused_by_deepspeed():
    found = problems("{zero_optimization: {overlap_com: false}}")
    assert "overlap_com" in found["train.deepspeed_overrides"]
    assert "Nebula" in problems("{nebula: {enabled: true}}")["train.deepspeed_overrides"]


def test_values_deepspeed_accepts_and_its_engine_then_fails_on_are_refused():
    """NVMe offload without nvme_path was a TypeError in the engine's build, steps_per_print 0 a ZeroDivisionError in
    the first step, both after the model was built."""
    key = "train.deepspeed_overrides.zero_optimization.offload_optimizer.nvme_path"
    assert "device nvme needs nvme_path" in problems("{zero_optimization: {offload_optimizer: {device: nvme}}}")[key]
    assert problems("{zero_optimization: {offload_optimizer: {device: nvme, nvme_path: /local}}}") == {}
    assert problems("{steps_per_print: 0}")["train.deepspeed_overrides.steps_per_print"] == "must be >= 1, got 0"
    assert problems("{steps_per_print: null}") == {}  # DeepSpeed's own default: no prints


def test_tuning_keys_merge_and_are_reported():
    cfg = cfg_with("{zero_optimization: {overlap_comm: false, reduce_bucket_size: 1000}, wall_clock_breakdown: true, "
                   "communication_data_type: fp32}")
    assert deepspeed_config.problems(cfg, world_size=2) == []
    ds, changed = deepspeed_config.build(cfg, world_size=2)
    assert ds["zero_optimization"]["overlap_comm"] is False and ds["zero_optimization"]["stage"] == 3
    assert sorted(changed) == ["communication_data_type: '<unset>' -> 'fp32'", "wall_clock_breakdown: False -> True",
                               "zero_optimization.overlap_comm: True -> False",
                               "zero_optimization.reduce_bucket_size: '<unset>' -> 1000"]


def test_one4d_train_refuses_a_bad_override_before_any_process_group(capsys, tmp_path):
    import torch.distributed as dist

    from one4d_train.train.main import main

    code = main(["train.task=tests.train_toy_task:ToyTask", "train.precision=fp32", f"run_dir={tmp_path}",
                 "train.deepspeed_overrides={zero_optimisation: {stage: 2}}"])
    assert code == 2 and not dist.is_initialized()
    assert "command line: key 'train.deepspeed_overrides.zero_optimisation'" in capsys.readouterr().err


def _checkpoint(run_dir, stage: int, overrides: dict, recorded: bool = True) -> str:
    """A one-rank checkpoint folder as far as resume_problems reads it, written under ZeRO `stage` with
    `overrides`: its optimizer-state layout recorded in the train state as the trainer records it, or (recorded
    False, as checkpoints written before the record) only in the config.yaml its job ran with."""
    import json
    import os

    import yaml

    from one4d_train.train import checkpoint as ckpt
    from one4d_train.train.config import TrainConfig

    path = os.path.join(run_dir, "checkpoints", ckpt.step_name(4))
    os.makedirs(os.path.join(path, "train_state"))
    state = {**{k: 0 for k in ckpt.STATE_KEYS}, "step": 4, "zero_stage": stage, "precision": "fp32"}
    if recorded:
        state["zero_layout"] = deepspeed_config.optimizer_layout(
            TrainConfig(zero_stage=stage, precision="fp32", deepspeed_overrides=overrides))
    with open(os.path.join(path, "train_state", "rank-00000.json"), "w") as f:
        json.dump(state, f)
    with open(os.path.join(path, "config.yaml"), "w") as f:
        yaml.safe_dump({"train": {"zero_stage": stage, "precision": "fp32", "deepspeed_overrides": overrides}}, f)
    marker = {"step": 4, "world_size": 1, "files": ckpt._listing(path)}
    ckpt.write_atomic(os.path.join(path, ckpt.MARKER), json.dumps(marker))
    return path


def resume_problems(run_dir, stage: int, overrides: str) -> dict[str, str]:
    from one4d_train.train.config import resume_problems as found

    cfg = cfg_with(overrides, f"train.zero_stage={stage}")
    return dict(found("auto", str(run_dir), 1, cfg.train))


@pytest.mark.parametrize("recorded", [True, False])
def test_a_resume_under_another_zero3_optimizer_layout_is_refused_by_key(tmp_path, recorded):
    """ZeRO-3 splits the optimizer state into sub-groups of sub_group_size elements: a resume under another size
    failed inside DeepSpeed with a traceback. Offloading the state moves it; prefetch, buckets and persistence only
    move work around and may change. A checkpoint written before train states recorded the layout is read from its
    config.yaml."""
    path = _checkpoint(tmp_path, 3, {"zero_optimization": {"sub_group_size": 1000}}, recorded)
    key = "train.deepspeed_overrides.zero_optimization.sub_group_size"
    found = resume_problems(tmp_path, 3, "{zero_optimization: {sub_group_size: 100}}")
    assert list(found) == [key] and found[key].startswith(f"100 here, 1000 in {path}: "), found
    assert f"resume with {key}: 1000" in found[key]
    assert list(resume_problems(tmp_path, 3, "{}")) == [key]  # DeepSpeed's default, 1e9, is another layout too
    found = resume_problems(tmp_path, 3, "{zero_optimization: {sub_group_size: 1000, "
                                         "offload_optimizer: {device: cpu}}}")
    assert list(found) == ["train.deepspeed_overrides.zero_optimization.offload_optimizer.device"], found
    assert resume_problems(tmp_path, 3, "{zero_optimization: {sub_group_size: 1000, stage3_prefetch_bucket_size: 10, "
                                        "reduce_bucket_size: 1000, overlap_comm: false, "
                                        "stage3_max_live_parameters: 1000}}") == {}


def test_a_resume_under_another_zero2_optimizer_layout_is_refused_by_key(tmp_path):
    """ZeRO-2's round_robin_gradients reorders the parameters in the flat partitions: a resume that changed it loaded
    the optimizer state into the wrong places with no error. sub_group_size, which ZeRO-2 does not read, may change."""
    _checkpoint(tmp_path, 2, {})
    found = resume_problems(tmp_path, 2, "{zero_optimization: {round_robin_gradients: true}}")
    assert list(found) == ["train.deepspeed_overrides.zero_optimization.round_robin_gradients"], found
    assert found["train.deepspeed_overrides.zero_optimization.round_robin_gradients"].startswith("True here, False in")
    assert list(resume_problems(tmp_path, 2, "{zero_optimization: {parameter_alignment: true}}")) == [
        "train.deepspeed_overrides.zero_optimization.parameter_alignment"]
    assert resume_problems(tmp_path, 2, "{zero_optimization: {sub_group_size: 100, allgather_bucket_size: 1000}}") == {}
    # a stage change is refused as such (train.zero_stage), not key by key
    assert list(resume_problems(tmp_path, 3, "{}")) == ["train.zero_stage"]
