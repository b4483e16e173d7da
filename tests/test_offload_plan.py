"""`model.activation_checkpointing_unit: auto` (model/offload_plan.py): the prediction of what each unit offloads,
checked against what a compiled model's offload moves, and the choice by host memory, as the trainer makes it."""
from __future__ import annotations

import os
from contextlib import nullcontext

import pytest
import torch

from one4d_train.config import load_config
from one4d_train.model import host_memory, offload_plan
from one4d_train.model.checkpointing import apply_activation_checkpointing, apply_configured_checkpointing
from one4d_train.model.compile import compile_blocks
from one4d_train.model.config import ModelConfig
from one4d_train.model.offload import apply_activation_offload
from one4d_train.model.offload_plan import MARGIN, block_because, choose_unit, local_processes, offloaded_bytes
from one4d_train.model.presets import wan_config
from test_dlc import randomise_trainable, tiny_one4d

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
W14 = wan_config("14b")
TOKENS_14B = 2 * 21 * 22 * 39  # both branches of 81 x 352 x 624: 2 x 18,018 rows per block input


@pytest.mark.parametrize("unit", ["block", "sublayer", "sublayer_ffn"])
def test_the_prediction_is_what_a_compiled_model_offloads(unit):
    """Per block, the checkpointed regions' inputs: the block input; by sub-layer the residual stream after each
    attention too; sublayer_ffn also the FFN's pre-activation (ffn_dim wide). Counted in the compiled graphs'
    saved tensors, as the offload moves them (tensors below a block input's size left out: the prediction does not
    count them, MARGIN does). The attention outputs that selective modes keep add one block input each; CPU
    attention is not one of the kept operators, so that part is from the 14B measurements (PERF_NOTES.md)."""
    model, _ = tiny_one4d(activation_checkpointing="full")
    randomise_trainable(model)
    apply_activation_checkpointing(model.base.blocks, "full", unit=unit)
    compile_blocks(model.base.blocks)
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(1)
    b, t, h, w = 2, 3, 24, 24  # 432 tokens per sample, more than the 16 + 257 of the context
    inputs = (torch.randn(b, 36, t, h, w, generator=g), torch.randn(b, 16, t, h, w, generator=g),
              torch.tensor([999.0, 321.5]), torch.randn(b, 16, 64, generator=g), torch.randn(b, 257, 32, generator=g))
    cfg = model.base.cfg
    tokens = 2 * b * t * (h // 2) * (w // 2)
    block_input = tokens * cfg.dim * 4
    offload = apply_activation_offload(model, min_bytes=block_input)
    v_rgb, v_xyz = model(*inputs)
    (v_rgb.square().mean() + v_xyz.square().mean()).backward()
    mcfg = ModelConfig(activation_checkpointing="full", activation_offload=True)
    predicted = offloaded_bytes(mcfg, cfg.dim, cfg.ffn_dim, cfg.num_layers, tokens, 4, unit)
    assert offload.stats.bytes == pytest.approx(predicted / MARGIN, rel=1e-6), (offload.stats.bytes, predicted)


def test_the_14b_prediction_covers_the_measured_host_memory():
    """The H100/H200 measurements of 2026-12-07 (selective_self, 14B, 2 x 18,018 tokens): every prediction at least
    the measured bytes, and at most 12% above them."""
    measured = {("block", -1): 31.4e9, ("sublayer", -1): 60.9e9, ("sublayer", 36): 54.6e9,
                ("sublayer_ffn", -1): 100.7e9, ("sublayer_ffn", 36): 90.5e9, ("sublayer_ffn", 32): 80.6e9}
    for (unit, moved), real in measured.items():
        cfg = ModelConfig(preset="14b", activation_checkpointing="selective_self", activation_offload=True,
                          activation_offload_blocks=moved)
        predicted = offloaded_bytes(cfg, W14.dim, W14.ffn_dim, W14.num_layers, TOKENS_14B, 2, unit)
        assert real <= predicted <= 1.12 * real, (unit, moved, predicted / 1e9)


def auto_14b(**kw) -> ModelConfig:
    settings = dict(activation_checkpointing="selective_self", activation_checkpointing_unit="auto",
                    activation_offload=True, activation_offload_blocks=36, compile=True)
    return ModelConfig(preset="14b", **{**settings, **kw})


@pytest.mark.parametrize("node_gb,unit", [(2000, "sublayer_ffn"), (900, "sublayer_ffn"), (560, "sublayer"),
                                          (400, "block"), (200, "block")])
def test_auto_picks_the_finest_unit_that_fits_each_process(node_gb, unit):
    """8 GPU processes on a node with `node_gb` of host memory left: sublayer_ffn needs ~98 GB each (prediction with
    its margin), sublayer ~58, block ~29; with none fitting, the block (the offload's own check then speaks)."""
    got, why = choose_unit(auto_14b(), W14.dim, W14.ffn_dim, W14.num_layers, TOKENS_14B, 2, int(node_gb * 1e9), 8)
    assert got == unit, why
    assert ("exceed" in why) == (node_gb == 200)
    # one process alone on the node gets all of it
    alone, _ = choose_unit(auto_14b(), W14.dim, W14.ffn_dim, W14.num_layers, TOKENS_14B, 2, int(node_gb * 1e9), 1)
    assert alone == "sublayer_ffn"


def test_auto_is_the_block_where_a_finer_unit_gains_nothing_or_memory_is_unknown():
    args = (W14.dim, W14.ffn_dim, W14.num_layers, TOKENS_14B, 2, 10 ** 13, 1)
    assert choose_unit(auto_14b(), *args)[0] == "sublayer_ffn"
    for cfg, said in [(auto_14b(activation_offload=False), "nothing is offloaded"),
                      (auto_14b(compile=False), "without model.compile"),
                      (auto_14b(activation_checkpointing="none"), "nothing is checkpointed"),
                      (auto_14b(activation_checkpointing_blocks=20), "past model.activation_checkpointing_blocks")]:
        assert choose_unit(cfg, *args) == ("block", block_because(cfg)) and said in block_because(cfg)
    assert block_because(auto_14b(activation_checkpointing_blocks=36)) is None  # every offloaded block checkpointed
    assert choose_unit(auto_14b(), *args[:-2], None, 1)[0] == "block"
    assert choose_unit(auto_14b(activation_checkpointing_unit="sublayer"), *args) == ("sublayer", "as configured")


def test_local_processes_from_the_launchers_variables():
    assert local_processes({"LOCAL_WORLD_SIZE": "4", "SLURM_NTASKS_PER_NODE": "8"}) == 4
    assert local_processes({"SLURM_NTASKS_PER_NODE": "8"}) == 8
    assert local_processes({"SLURM_STEP_TASKS_PER_NODE": "8(x2),4"}) == 8
    assert local_processes({"SLURM_TASKS_PER_NODE": "2(x3)"}) == 2
    assert local_processes({}) == 1


def test_the_trainer_resolves_auto_once_applies_it_and_tags_the_run(monkeypatch, caplog):
    """One4DTask: `auto` resolved from this node's host memory at build time, applied to every block, logged and
    returned in the MLflow run tags; other builders (evaluation) take the block."""
    from one4d_train.model.one4d import build_one4d
    from one4d_train.train.one4d_task import One4DTask

    cfg = load_config([f"config={ROOT}/configs/experiment/demo.yaml", "model.activation_checkpointing=full",
                       "model.activation_checkpointing_unit=auto", "model.activation_offload=true",
                       "model.compile=true", "train.zero_stage=2"])
    assert not [n for n in One4DTask.ignored_settings(cfg) if n[0] == "model.activation_checkpointing_unit"]
    calls = []
    monkeypatch.setattr(host_memory, "available_bytes", lambda: calls.append(1) or 10 ** 12)
    task = One4DTask(cfg)
    with caplog.at_level("INFO"):
        model = task.build_model(nullcontext)
    assert {b._checkpoint_unit for b in model.base.blocks} == {"sublayer_ffn"}
    assert task.run_tags()["one4d.checkpointing_unit"] == "sublayer_ffn" and len(calls) == 1
    assert "auto -> sublayer_ffn" in caplog.text
    task = One4DTask(cfg)
    monkeypatch.setattr(host_memory, "available_bytes", lambda: 0)
    assert task.checkpointing_unit() == "block"
    assert {b._checkpoint_unit for b in build_one4d(cfg.model, dtype=torch.float32).base.blocks} == {"block"}
    blocks = build_one4d(cfg.model, dtype=torch.float32).base.blocks
    apply_configured_checkpointing(blocks, cfg.model, "sublayer")
    assert {b._checkpoint_unit for b in blocks} == {"sublayer"}
    eager = load_config([f"config={ROOT}/configs/experiment/demo.yaml", "model.activation_checkpointing=full",
                         "model.activation_checkpointing_unit=auto", "model.activation_offload=true"])
    assert dict(One4DTask.ignored_settings(eager))["model.activation_checkpointing_unit"].startswith(
        "auto is the block here: without model.compile")


def test_the_14b_config_resolves_auto():
    cfg = load_config([f"config={ROOT}/configs/experiment/one4d_14b.yaml"])
    assert cfg.model.activation_checkpointing_unit == "auto" and not cfg.model.validate()
    assert offload_plan.block_because(cfg.model) is None  # memory decides
