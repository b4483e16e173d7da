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
from one4d_train.model.offload_plan import (MARGIN, block_because, choose_unit, coarsest, local_processes,
                                            offloaded_bytes, per_node, weights_bytes)
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
    layers = W14.num_layers
    for cfg, said in [(auto_14b(activation_offload=False), "nothing is offloaded"),
                      (auto_14b(compile=False), "without model.compile"),
                      (auto_14b(activation_checkpointing="none"), "nothing is checkpointed"),
                      (auto_14b(activation_checkpointing_blocks=20), "past model.activation_checkpointing_blocks"),
                      (auto_14b(activation_checkpointing_blocks=39, activation_offload_blocks=-1), "past model.")]:
        assert choose_unit(cfg, *args) == ("block", block_because(cfg, layers)) and said in block_because(cfg, layers)
    # every offloaded block checkpointed (counts past the layers are all of them)
    for checkpointed, moved in [(36, 36), (40, -1), (99, -1), (-1, 99), (20, 10)]:
        cfg = auto_14b(activation_checkpointing_blocks=checkpointed, activation_offload_blocks=moved)
        assert block_because(cfg, layers) is None, (checkpointed, moved)
    assert choose_unit(auto_14b(), *args[:-2], None, 1)[0] == "block"
    assert choose_unit(auto_14b(activation_checkpointing_unit="sublayer"), *args) == ("sublayer", "as configured")
    # what each process takes besides the offload (a text encoder in host memory) counts against its share
    share = int(8 * (105e9 + offload_plan.RESERVE))
    assert choose_unit(auto_14b(), *args[:-2], share, 8)[0] == "sublayer_ffn"
    assert choose_unit(auto_14b(), *args[:-2], share, 8, other=int(12e9))[0] == "sublayer"


def test_local_processes_from_the_launchers_variables():
    assert local_processes({"LOCAL_WORLD_SIZE": "4", "SLURM_NTASKS_PER_NODE": "8"}) == 4
    assert local_processes({"LOCAL_SIZE": "8", "RANK": "3", "WORLD_SIZE": "8"}) == 8  # the deepspeed launcher
    assert local_processes({"OMPI_COMM_WORLD_LOCAL_SIZE": "4"}) == 4
    assert local_processes({"SLURM_NTASKS_PER_NODE": "8"}) == 8
    assert local_processes({"SLURM_STEP_TASKS_PER_NODE": "4", "SLURM_NTASKS_PER_NODE": "8"}) == 4  # the step's
    assert local_processes({"SLURM_STEP_TASKS_PER_NODE": "8(x2),4"}) == 8
    assert local_processes({"SLURM_TASKS_PER_NODE": "2(x3)"}) == 2
    assert local_processes({}) == 1


def test_ranks_agree_on_the_coarsest_of_their_nodes_choices():
    """In a process group, each node's share is the least host memory its ranks saw over its ranks; every rank then
    runs the coarsest of the nodes' choices."""
    seen = [("a", 900 * 10 ** 9), ("a", 880 * 10 ** 9), ("b", 500 * 10 ** 9), ("b", None), ("c", 10 ** 12)]
    assert per_node(seen) == {"a": (880 * 10 ** 9, 2), "b": (None, 2), "c": (10 ** 12, 1)}
    assert coarsest(["sublayer_ffn", "block", "sublayer"]) == "block"
    assert coarsest(["sublayer_ffn", "sublayer"]) == "sublayer" and coarsest(["sublayer_ffn"]) == "sublayer_ffn"


def test_weights_bytes_counts_the_weight_files(tmp_path):
    (tmp_path / "enc").mkdir()
    (tmp_path / "enc" / "model-00001.safetensors").write_bytes(b"x" * 300)
    (tmp_path / "enc" / "model.bin").write_bytes(b"x" * 20)
    (tmp_path / "enc" / "config.json").write_bytes(b"x" * 5000)
    assert weights_bytes(str(tmp_path / "enc")) == 320
    assert weights_bytes(str(tmp_path / "enc" / "model.bin")) == 20


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
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    monkeypatch.setattr(host_memory, "available_bytes", lambda: calls.append(1) or 10 ** 12)
    task = One4DTask(cfg)
    with caplog.at_level("INFO"):
        model = task.build_model(nullcontext)
    assert {b._checkpoint_unit for b in model.base.blocks} == {"sublayer_ffn"}
    assert task.run_tags()["one4d.checkpointing_unit"] == "sublayer_ffn" and len(calls) == 1
    assert "activation_checkpointing_unit auto on" in caplog.text and ": sublayer_ffn (" in caplog.text
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


def test_the_14b_config_resolves_auto_by_the_memory(monkeypatch):
    """The 14B config's `auto` on an 8-GPU node (6 data workers a process): sublayer_ffn from ~870 GB of host memory
    free, sublayer from ~550 GB (the lent 560 GiB node's: the shipped choice before), block below."""
    cfg = load_config([f"config={ROOT}/configs/experiment/one4d_14b.yaml"])
    assert cfg.model.activation_checkpointing_unit == "auto" and not cfg.model.validate()
    assert offload_plan.block_because(cfg.model, W14.num_layers) is None  # memory decides
    tokens = 2 * 21 * 22 * 39
    for node_gb, unit in [(2000, "sublayer_ffn"), (900, "sublayer_ffn"), (820, "sublayer"), (560, "sublayer"),
                          (450, "block")]:
        monkeypatch.setattr(host_memory, "available_bytes", lambda: int(node_gb * 1e9))
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
        got, why = offload_plan.resolve_unit(cfg.model, W14, tokens, other=cfg.data.num_workers << 30)
        assert got == unit, (node_gb, why)


def _resolve_on_rank(rank, port, out):
    import json

    import torch.distributed as dist

    from one4d_train.train.one4d_task import One4DTask

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        with pytest.MonkeyPatch.context() as mp:  # two nodes of one GPU process each: a large one and a small one
            mp.setattr(host_memory, "available_bytes", lambda: [2000, 80][rank] * 10 ** 9)
            mp.setattr("socket.gethostname", lambda: f"node{rank}")
            task = One4DTask(load_config([f"config={ROOT}/configs/experiment/one4d_14b.yaml",  # (its VAE on CPU)
                                          "model.vae_conv_kernel=cudnn", "model.vae_frames_per_call=8"]))
            with open(out[rank], "w") as f:
                json.dump({"unit": task.checkpointing_unit(), "tags": task.run_tags()}, f)
    finally:
        dist.destroy_process_group()


def test_every_rank_runs_the_coarsest_of_the_nodes_choices(tmp_path):
    """Two ranks on two nodes (gloo): the node with 2 TB alone would take sublayer_ffn, the one with 80 GB
    sublayer; both run sublayer and tag it."""
    import json
    import socket

    import torch.multiprocessing as mp

    out = [str(tmp_path / "rank0.json"), str(tmp_path / "rank1.json")]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_resolve_on_rank, args=(port, out), nprocs=2)
    got = [json.load(open(f)) for f in out]
    assert [g["unit"] for g in got] == ["sublayer", "sublayer"]
    assert got[0]["tags"]["one4d.checkpointing_unit"] == "sublayer"


def test_a_text_encoder_built_in_host_memory_counts_against_the_share(tmp_path):
    """What the trainer counts besides the offload: 1 GiB per data worker, and the text encoder's weight files where
    it is built in host memory at the start (model.text_encoder_device=cpu)."""
    from one4d_train.train.one4d_task import One4DTask

    enc = tmp_path / "umt5"
    enc.mkdir()
    (enc / "model.safetensors").write_bytes(b"x" * 1000)
    base = [f"config={ROOT}/configs/experiment/demo.yaml", f"model.text_encoder={enc}", f"model.tokenizer={enc}",
            "data.num_workers=2", "train.device=cpu"]
    on_host = One4DTask(load_config(base + ["model.text_encoder_device=cpu"]))
    assert on_host._host_bytes_besides_offload() == 2 * offload_plan.WORKER_RESERVE + 1000
    assert offload_plan.WORKER_RESERVE == 1 << 30
