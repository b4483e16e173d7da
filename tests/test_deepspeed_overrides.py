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
