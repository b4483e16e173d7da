"""The One4D task for real: tiny DLC model on synthetic shards, DeepSpeed ZeRO-3 on 2 CPU processes (gloo),
the real `one4d train` CLI; base weights loaded from a checkpoint file into ZeRO-3 partitions."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from data_utils import make_shards
from launch_utils import ROOT, metric, mlflow_run, torchrun

pytestmark = pytest.mark.slow
CONFIG = os.path.join(ROOT, "configs", "experiment", "demo.yaml")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("one4d_data"), num_clips=8, frames=9, height=32, width=64,
                       samples_per_shard=2)


def common(shards, run_dir, steps):
    return [f"config={CONFIG}", f"data.shards={shards}", f"run_dir={run_dir}", f"train.steps={steps}",
            "train.log_every=1", "data.num_workers=1", "tracking.system_metrics=false"]


@pytest.fixture(scope="module")
def straight(shards, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("one4d_straight")
    code, out = torchrun(run_dir, *common(shards, run_dir, 30), "train.checkpoint_every=15", timeout=900)
    assert code == 0, out[-4000:]
    return run_dir


def test_dlc_model_learns_on_two_ranks(straight):
    client, run = mlflow_run(straight)
    loss = metric(client, run, "loss")
    assert sorted(loss) == list(range(1, 31))
    first, last = sum(loss[s] for s in range(1, 6)) / 5, sum(loss[s] for s in range(26, 31)) / 5
    assert last < 0.7 * first, (first, last)  # the tiny DLC adapters fit the tiny set: loss falls by > 30%
    for key in ("loss_rgb", "loss_xyz", "lr", "grad_norm", "samples_per_s", "data_skipped_samples"):
        assert metric(client, run, key), key


def test_fp8_base_matmuls_train_like_the_full_precision_base(shards, straight, tmp_path):
    """The same run with the frozen linears in FP8 (`model.base_matmul=fp8`) through the real trainer (ZeRO-3,
    2 ranks), its first 15 steps: it learns, and its loss curve stays close to the fp32 base's (the demo config's
    precision; a constant learning rate after the warm-up, so a shorter run takes the same steps)."""
    run_dir = tmp_path / "fp8"
    code, out = torchrun(run_dir, *common(shards, run_dir, 15), "model.base_matmul=fp8", timeout=900)
    assert code == 0, out[-4000:]
    loss = metric(*mlflow_run(run_dir), "loss")
    ref = {s: v for s, v in metric(*mlflow_run(straight), "loss").items() if s <= 15}
    assert sorted(loss) == sorted(ref) == list(range(1, 16))
    mean = lambda curve, steps: sum(curve[s] for s in steps) / len(steps)  # noqa: E731
    first, last = mean(loss, range(1, 6)), mean(loss, range(11, 16))
    assert last < 0.8 * first, (first, last)
    assert loss != ref  # FP8 rounding really changed the computation
    assert all(abs(loss[s] - ref[s]) < 0.02 * ref[s] for s in ref), [(s, loss[s], ref[s]) for s in ref]


def test_fused_branch_lora_sublayer_checkpointing_and_offload_train_like_the_straight_run_under_zero3(
        shards, straight, tmp_path):
    """The same run with the branch layers on the fused operator (`model.lora_kernel=fused`), the base weights
    gathered by ZeRO-3 as their external parameters (`share_base_with_zero3`), each block checkpointed by sub-layer
    with the FFN split at its activation (`model.activation_checkpointing_unit=sublayer_ffn`: four regions per block,
    the attentions' as by `sublayer`, each re-gathering its own weights on recompute), and the first two blocks'
    saved tensors, whatever their size, moved to host memory between forward and backward (activation offload; the
    last block's kept) follows the straight run's loss curve (the separate products, one region per block, nothing
    moved) up to fp32 rounding over its first 10 steps. At these widths (one GEMM block deep, the base biases
    initialised to zero) the fused sums can equal the separate products' bit for bit, so the curves may match
    exactly: that the operator applies to ZeRO-3's partitioned weights is test_dlc's
    test_zero3_registers_the_base_weights_of_fused_layers_only."""
    run_dir = tmp_path / "fused"
    code, out = torchrun(run_dir, *common(shards, run_dir, 10), "model.lora_kernel=fused",
                         "model.activation_checkpointing_unit=sublayer_ffn", "model.activation_offload=true",
                         "model.activation_offload_min_mib=0", "model.activation_offload_blocks=2", timeout=900)
    assert code == 0, out[-4000:]
    client, run = mlflow_run(run_dir)
    held = metric(client, run, "host_offload_gib")
    assert sorted(held) == list(range(1, 11)) and all(gib > 0 for gib in held.values()), held  # really moved
    loss = metric(client, run, "loss")
    ref = {s: v for s, v in metric(*mlflow_run(straight), "loss").items() if s <= 10}
    assert sorted(loss) == sorted(ref) == list(range(1, 11))
    assert all(abs(loss[s] - ref[s]) < 1e-4 * ref[s] for s in ref), [(s, loss[s], ref[s]) for s in ref]


def test_resume_continues_exactly(shards, straight, tmp_path):
    """A job started from the uninterrupted run's step-15 checkpoint (weights, optimizer, schedule, data stream,
    UMC and noise RNG) trains steps 16-30 exactly as that run did: the same losses, the same final adapters."""
    run_dir = tmp_path / "resumed"
    start = os.path.join(straight, "checkpoints", "step-00000015")
    code, out = torchrun(run_dir, *common(shards, run_dir, 30), "train.checkpoint_every=15", f"resume={start}",
                         timeout=900)
    assert code == 0 and f"resumed from {start}" in out, out[-4000:]
    loss, ref = metric(*mlflow_run(run_dir), "loss"), metric(*mlflow_run(straight), "loss")
    assert sorted(loss) == list(range(16, 31)) and loss == {s: ref[s] for s in loss}, (loss, ref)
    final = os.path.join("checkpoints", "step-00000030", "adapters")
    for name in ("lora_rgb.safetensors", "lora_xyz.safetensors", "control_links.safetensors"):
        a, b = load_file(os.path.join(run_dir, final, name)), load_file(os.path.join(straight, final, name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_corrupt_samples_are_skipped_and_their_count_logged(shards, tmp_path):
    """One sample of every shard has a flipped bit in its mp4 (it would still decode): training goes on, and the
    skipped samples, summed over both ranks, reach MLflow. (With activation offload on, the host memory it holds is
    logged too: none here, the tiny model's activations are below its 16 MiB threshold; and the allocator's retries,
    none off CUDA.)"""
    import io
    import tarfile

    bad = tmp_path / "shards"
    shutil.copytree(shards, bad)
    for shard in sorted(bad.glob("*.tar")):
        with tarfile.open(shard) as tar:
            members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
        first = members[0][0].name.split(".", 1)[0]
        with tarfile.open(shard, "w", format=tarfile.GNU_FORMAT) as tar:
            for m, data in members:
                if m.name == f"{first}.mp4":
                    data = bytearray(data)
                    data[len(data) // 2] ^= 0x10
                    data = bytes(data)
                tar.addfile(m, io.BytesIO(data))
    run_dir = tmp_path / "run"
    code, out = torchrun(run_dir, *common(bad, run_dir, 4), "model.activation_offload=true", timeout=900)
    assert code == 0, out[-4000:]
    client, run = mlflow_run(run_dir)
    assert metric(client, run, "host_offload_gib") == {s: 0.0 for s in range(1, 5)}
    assert "host offload 0.0 GiB" in out
    skipped = metric(client, run, "data_skipped_samples")
    assert skipped[4] >= 2 and list(skipped.values()) == sorted(skipped.values()), skipped  # >= 1 per rank by then
    # reduced with the skipped counts, apart from them: the CUDA allocator's retries, none off CUDA
    assert metric(client, run, "alloc_retries") == {s: 0.0 for s in range(1, 5)}
    assert "allocator retries" not in out
    assert metric(client, run, "loss")[4] == metric(client, run, "loss")[4]  # finite


def test_base_weights_load_from_checkpoint_into_zero3_partitions(shards, tmp_path):
    """A Wan2.1-format checkpoint file is streamed into the ZeRO-3-partitioned frozen base; the trained
    adapters then sit on exactly those weights (checked by the XYZ patch embedding, copied from the base's). The
    checkpoint records the base's content: a resume onto other weights is refused, the same weights moved resume."""
    from one4d_train.model.backbone import WanDiT
    from one4d_train.model.presets import wan_config
    from one4d_train.model.state_dict import checkpoint_fingerprint

    torch.manual_seed(123)
    ref = WanDiT(wan_config("tiny"))
    ref.init_weights()
    torch.nn.init.normal_(ref.head.head.weight, std=0.1)
    ckpt_file = tmp_path / "wan_tiny.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(ckpt_file))
    run_dir = tmp_path / "from_ckpt"
    code, out = torchrun(run_dir, *common(shards, run_dir, 1), f"model.checkpoint={ckpt_file}",
                         "optim.lr=0", "optim.grad_clip=0", timeout=900)
    assert code == 0, out[-4000:]
    step1 = os.path.join(run_dir, "checkpoints", "step-00000001")
    links = load_file(os.path.join(step1, "adapters", "control_links.safetensors"))
    assert torch.equal(links["xyz_patch_embedding.weight"], ref.patch_embedding.weight)
    with open(os.path.join(step1, "adapters", "adapter_config.json")) as f:  # the export names its base
        assert json.load(f)["base"] == {"checkpoint": str(ckpt_file), "fingerprint": checkpoint_fingerprint(str(ckpt_file))}
    # a resume onto another base of the same shapes is refused by key before any process group; the same weights
    # at another path resume
    other = tmp_path / "other.safetensors"
    torch.nn.init.normal_(ref.head.head.weight, std=0.1)
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(other))
    code, out = torchrun(run_dir, *common(shards, run_dir, 2), f"model.checkpoint={other}", timeout=900)
    assert code != 0 and "exitcode  : 2" in out, out[-4000:]
    assert (f"key 'model.checkpoint': {other} (content fingerprint " in out and
            f"{os.path.join(run_dir, 'checkpoints', 'step-00000001')} was trained on {ckpt_file}" in out), out[-4000:]
    moved = tmp_path / "moved" / "wan_tiny.safetensors"
    moved.parent.mkdir()
    os.rename(ckpt_file, moved)
    code, out = torchrun(run_dir, *common(shards, run_dir, 2), f"model.checkpoint={moved}", "optim.lr=0",
                         "optim.grad_clip=0", timeout=900)
    assert code == 0 and "resumed from" in out, out[-4000:]


def test_mismatched_checkpoint_is_refused_naming_keys(shards, tmp_path):
    from one4d_train.model.backbone import WanDiT
    from one4d_train.model.presets import wan_config

    state = WanDiT(wan_config("tiny")).state_dict()
    del state["blocks.1.ffn.0.weight"]
    state["blocks.1.ffn.extra.weight"] = torch.zeros(2)
    bad = tmp_path / "bad.safetensors"
    save_file(state, str(bad))
    run_dir = tmp_path / "bad_ckpt"
    code, out = torchrun(run_dir, *common(shards, run_dir, 1), f"model.checkpoint={bad}", timeout=900)
    assert code != 0
    assert "missing keys (1): blocks.1.ffn.0.weight" in out and "blocks.1.ffn.extra.weight" in out


def test_resume_by_a_model_of_other_shapes_is_refused_naming_keys(shards, straight, tmp_path):
    """A checkpoint resumed with another adapter shape (here the LoRA rank) stops with exit 2 naming the checkpoint
    and the model key that differs from its run's config, not with DeepSpeed's bare tensor size error."""
    run_dir, chosen = tmp_path / "other_rank", os.path.join(straight, "checkpoints", "step-00000015")
    before = sorted(os.listdir(os.path.join(straight, "checkpoints")))
    code, out = torchrun(run_dir, *common(shards, run_dir, 20), f"resume={chosen}", "model.lora.rank=4", timeout=900)
    assert code != 0 and "exitcode  : 2" in out, out[-4000:]
    assert f"config error: key 'resume': {chosen} was trained with another model" in out, out[-4000:]
    assert f"config error: key 'model.lora.rank': 4 here, 8 in {os.path.join(straight, 'config.yaml')}" in out
    assert "size of tensor" not in out
    assert sorted(os.listdir(os.path.join(straight, "checkpoints"))) == before


def test_resume_with_another_data_stream_is_refused_before_the_model_is_built(shards, straight, tmp_path):
    """A resume whose data position cannot continue under this config (another data.num_workers, seed) exits 2
    before any process group, naming the keys, instead of with the loader's traceback after the model is built and
    the checkpoint loaded, with the run's config.yaml rewritten by the refused config."""
    chosen = os.path.join(straight, "checkpoints", "step-00000015")
    config_before = open(os.path.join(straight, "config.yaml")).read()
    code, out = torchrun(straight, *common(shards, straight, 20), f"resume={chosen}", "data.num_workers=2", "seed=5",
                         "data.mode=resampled", timeout=900)
    assert code != 0 and "exitcode  : 2" in out, out[-4000:]
    assert (f"key 'data.num_workers': 2 here, 1 in the data position of {chosen}" in out and
            f"key 'seed': 5 here, 0 in the data position of {chosen}" in out and
            f"key 'data.mode': 'resampled' here, 'exact' in the data position of {chosen}" in out), out[-4000:]
    assert "PositionError" not in out and "global batch" not in out
    assert open(os.path.join(straight, "config.yaml")).read() == config_before


def test_resume_under_another_scale_stage_or_precision_is_refused_by_key(shards, straight):
    """Another model.lora.alpha (the same LoRA weights as another function, and an export would carry the new
    scale), train.zero_stage or train.precision (DeepSpeed's optimizer files are laid out by both: it failed inside
    DeepSpeed after the model build) exits 2 before any process group, naming each key."""
    chosen = os.path.join(straight, "checkpoints", "step-00000015")
    code, out = torchrun(straight, *common(shards, straight, 20), f"resume={chosen}", "model.lora.alpha=16",
                         "train.zero_stage=2", "train.precision=bf16", "model.compute_dtype=bf16", timeout=900)
    assert code != 0 and "exitcode  : 2" in out, out[-4000:]
    assert f"key 'model.lora.alpha': 16.0 here, but {chosen} was trained with 8.0" in out, out[-4000:]
    assert f"key 'train.zero_stage': 2 here, 3 in {chosen}" in out and f"key 'train.precision': bf16 here, fp32" in out


def test_in_training_evaluation_all_ranks_take_part(shards, tmp_path):
    """3 held-out samples on 2 ranks: rank 1 samples a dummy in the second round, so the ZeRO-3 forwards stay
    collective; the means are reduced over ranks and logged to MLflow at the evaluation step."""
    val = make_shards(tmp_path / "val", num_clips=3, frames=9, height=32, width=64, samples_per_shard=1, seed=7)
    run_dir = tmp_path / "with_eval"
    code, out = torchrun(run_dir, *common(shards, run_dir, 2), f"data.val_shards={val}", "eval.every=2",
                         "eval.num_samples=3", "eval.steps=2", "eval.cfg_scale=1.0", "eval.recovery_iters=10",
                         "eval.modes=[image,video]", timeout=900)
    assert code == 0, out[-4000:]
    client, run = mlflow_run(run_dir)
    for key in ("eval/image/abs_rel", "eval/video/abs_rel", "eval/video/psnr"):
        assert list(metric(client, run, key)) == [2], key
    sheets = sorted(p.relative_to(run_dir) for p in run_dir.glob("eval/step-00000002/*/*/sheet.png"))
    assert len(sheets) == 3 * 2, sheets


def test_stored_latents_and_device_finished_samples_give_the_pixel_path_loss(shards, tmp_path):
    """`one4d encode-latents` shards train through the latent path (no target encode in the step) and give the
    pixel path's loss for the same window and crop (up to the stored float16 precision), both with samples finished
    by the task (data.finish_on_device, the shipped data config: uint8 frames and depth from the workers)."""
    latent_shards = tmp_path / "latents"
    enc = subprocess.run([sys.executable, "-m", "one4d_train.cli", "encode-latents", str(shards), str(latent_shards),
                          f"config={CONFIG}"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert enc.returncode == 0, enc.stdout[-2000:] + enc.stderr[-2000:]
    losses = {}
    # samples finished by the task on both paths (the pixel path's finish makes xyz from depth and cameras; the
    # latents were encoded from CPU-finished samples; the finish alone equals the CPU path up to float32 rounding:
    # tests/test_finish.py; the other trainer tests finish on the CPU)
    for name, data, finish in (("pixels-finished", shards, True), ("latents-finished", latent_shards, True)):
        run_dir = tmp_path / name
        code, out = torchrun(run_dir, *common(data, run_dir, 1), "data.crop=center", f"data.finish_on_device={finish}",
                             timeout=900)
        assert code == 0, out[-4000:]
        client, run = mlflow_run(run_dir)
        losses[name] = metric(client, run, "loss")[1]
    assert losses["latents-finished"] == pytest.approx(losses["pixels-finished"], rel=2e-3)


def test_export_copies_checkpoint_adapters_and_rebuilds_them_from_zero(straight, tmp_path):
    """`one4d export`: the checkpoint's adapters/ verified and copied; from_zero=true rebuilds the same files from
    the DeepSpeed partitions (read with weights_only=True) and the run's config, or the checkpoint's own config.yaml
    where it was copied out of its run."""
    ckpt = os.path.join(straight, "checkpoints", "step-00000030")
    alone = tmp_path / "copied" / "step-00000030"  # a checkpoint copied without its run: it holds its config.yaml
    shutil.copytree(ckpt, alone)
    outs = {}
    for name, source, extra in (("copy", ckpt, []), ("zero", ckpt, ["from_zero=true"]),
                                ("alone", alone, ["from_zero=true"])):
        outs[name] = tmp_path / name
        r = subprocess.run([sys.executable, "-m", "one4d_train.cli", "export", f"checkpoint={source}",
                            f"out={outs[name]}", *extra], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    for f in ("lora_rgb.safetensors", "lora_xyz.safetensors", "control_links.safetensors"):
        a, b, c = (load_file(str(outs[n] / f)) for n in ("copy", "zero", "alone"))
        assert a.keys() == b.keys() == c.keys() and all(torch.equal(a[k], b[k]) and torch.equal(a[k], c[k])
                                                         for k in a), f
    # each names the base it was trained on (the tiny preset's seeded random one), rebuilt or copied
    bases = [json.loads((outs[n] / "adapter_config.json").read_text()).get("base") for n in outs]
    assert bases == [{"checkpoint": "", "fingerprint": "random-seed-0"}] * 3, bases


def test_a_new_run_starts_from_an_earlier_runs_adapters(shards, straight, tmp_path):
    """model.init_adapters: an export (here; a run directory or a checkpoint alike) starts a new run's
    adapters and links (here at lr 0: they stay the source's), with a fresh optimizer; a resume of that run reads its
    own checkpoint, not the source (removed here). A source that does not fit, or was trained on another base, is
    refused by key before any process group."""
    from one4d_train.config import load_config
    from one4d_train.model.backbone import WanDiT
    from one4d_train.model.presets import wan_config
    from one4d_train.train.one4d_task import One4DTask

    # one launch: the source kinds (run directory, checkpoint, export) differ only in how init_source resolves them,
    # which tests/test_warm_start.py covers in-process; check_config below resolves a run directory
    source = os.path.join(straight, "checkpoints", "step-00000030", "adapters")
    export = tmp_path / "export"
    shutil.copytree(source, export)
    run_dir = tmp_path / "from_export"
    code, out = torchrun(run_dir, *common(shards, run_dir, 1), f"model.init_adapters={export}", "optim.lr=0",
                         "optim.grad_clip=0", "optim.warmup_steps=0", timeout=900)
    assert code == 0 and "adapters and control links start from" in out, out[-4000:]
    client, run = mlflow_run(run_dir)
    assert client.get_run(run.info.run_id).data.tags["one4d.init_adapters"].startswith(str(export))
    for f in ("lora_rgb.safetensors", "lora_xyz.safetensors", "control_links.safetensors"):
        a = load_file(os.path.join(source, f))
        b = load_file(str(run_dir / "checkpoints" / "step-00000001" / "adapters" / f))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f
    shutil.rmtree(export)
    code, out = torchrun(run_dir, *common(shards, run_dir, 2), f"model.init_adapters={export}", "optim.lr=0",
                         "optim.grad_clip=0", "optim.warmup_steps=0", timeout=900)
    assert code == 0 and "resumed from" in out and "start from" not in out, out[-4000:]

    def problems(*extra):
        cfg = load_config([*common(shards, tmp_path / "checked", 1), *extra])
        return {k: v for k, v in One4DTask.check_config(cfg) if k in ("model.init_adapters", "model.checkpoint")}

    assert problems(f"model.init_adapters={straight}") == {}
    assert "no such folder" in problems(f"model.init_adapters={export}")["model.init_adapters"]
    assert "lora.rank 8 (model.lora.rank 4)" in problems(f"model.init_adapters={straight}",
                                                         "model.lora.rank=4")["model.init_adapters"]
    base = tmp_path / "base.safetensors"
    save_file(WanDiT(wan_config("tiny")).state_dict(), str(base))
    found = problems(f"model.init_adapters={straight}", f"model.checkpoint={base}")
    assert ("was trained on the random base of seed 0" in found["model.checkpoint"] and
            "start from it with seed=0 and model.checkpoint empty" in found["model.checkpoint"]), found
    found = problems(f"model.init_adapters={straight}", "seed=7")  # the tiny preset's random base of another seed
    assert ("the random base of seed 7 here" in found["model.checkpoint"] and
            found["model.checkpoint"].endswith("start from it with seed=0")), found
    found = problems(f"model.init_adapters={straight}", "model.lora.targets=[self_attn.q,self_attn.k]")
    assert "(model.lora.targets) ['self_attn.k', 'self_attn.q']" in found["model.init_adapters"], found
    found = problems(f"model.init_adapters={straight}", "model.xyz_patch_embedding=false")
    assert "(model.xyz_patch_embedding) has none" in found["model.init_adapters"], found


def test_encoders_leave_the_global_rng_alone():
    from one4d_train.config import load_config
    from one4d_train.model.encoders import build_encoders
    from one4d_train.model.presets import wan_config

    cfg = load_config([f"config={CONFIG}"])
    torch.manual_seed(1234)
    expected = torch.rand(4)
    torch.manual_seed(1234)
    build_encoders(cfg.model, wan_config("tiny"), torch.device("cpu"), torch.float32, seed=0)
    assert torch.equal(torch.rand(4), expected)


def test_real_presets_refuse_missing_encoder_files():
    from one4d_train.config import load_config
    from one4d_train.model.encoders import build_encoders
    from one4d_train.model.presets import wan_config

    cfg = load_config([f"config={ROOT}/configs/experiment/one4d_1.3b.yaml", "model.image_encoder=",
                       "model.text_encoder="])
    with pytest.raises(ValueError, match="model.image_encoder.*model.text_encoder"):
        build_encoders(cfg.model, wan_config("1.3b"), torch.device("cpu"), torch.float32)


def test_in_training_evaluation_counts_the_non_finite_values_it_leaves_out(monkeypatch, tmp_path):
    """As `one4d eval`'s means: a NaN or inf metric is left out of its mean and counted per metric, and the depth
    scores are weighted by each sample's scored pixels (they were plain means: the training's eval/<mode>/abs_rel
    differed from one4d eval's for the same checkpoint)."""
    from types import SimpleNamespace

    from one4d_train.eval import pipeline
    from one4d_train.train.one4d_task import One4DTask

    scores = iter([{"abs_rel": 0.2, "psnr": float("inf"), "num_pixels": 300},
                   {"abs_rel": float("nan"), "psnr": 20.0, "num_pixels": 500},
                   {"abs_rel": 0.4, "psnr": 30.0, "num_pixels": 100}])
    monkeypatch.setattr(pipeline, "Generator", lambda *a, **k: None)
    monkeypatch.setattr(pipeline, "iter_samples", lambda cfg, strict=True: [{}, {}, {}])
    monkeypatch.setattr(pipeline, "generate", lambda *a: None)
    monkeypatch.setattr(pipeline, "score_and_write", lambda *a: next(scores))
    cfg = SimpleNamespace(eval=SimpleNamespace(dataset="d", modes=["video"], seed=0), data=SimpleNamespace())
    task = SimpleNamespace(cfg=cfg, EVAL_KEYS=("abs_rel", "psnr"), encoders=lambda device: ())
    out = One4DTask.evaluate(task, torch.nn.Linear(1, 1), 2, str(tmp_path))
    assert out == pytest.approx({"video/abs_rel": (0.2 * 300 + 0.4 * 100) / 400, "video/abs_rel_nonfinite": 1.0,
                                 "video/psnr": 25.0, "video/psnr_nonfinite": 1.0})


def test_eval_rebuilds_the_adapters_of_a_checkpoint_written_without_them(straight, tmp_path):
    """train.export_adapters=false leaves adapters/ out of the checkpoints; eval then rebuilds them from the ZeRO
    partitions (and the run's config, found from a checkpoint set aside too), to the same weights as the adapters/
    a checkpoint otherwise carries."""
    import json

    from one4d_train.config import load_config
    from one4d_train.eval.pipeline import checkpoints_to_evaluate, load_generator
    from one4d_train.train import checkpoint as ckpt

    src = os.path.join(straight, "checkpoints", "step-00000030")
    run = tmp_path / "run"
    copy = run / "checkpoints" / "abandoned-20261204T000000Z" / "step-00000030"  # set aside: still its run's
    shutil.copytree(src, copy, ignore=shutil.ignore_patterns("adapters", "eval"))
    shutil.copy(os.path.join(straight, "config.yaml"), run / "config.yaml")
    marker = ckpt.marker_of(src)  # as such a run writes it: the same files but adapters/
    marker["files"] = {k: v for k, v in marker["files"].items() if not k.startswith("adapters")}
    (copy / ckpt.MARKER).write_text(json.dumps(marker))
    assert ckpt.is_complete(str(copy)) and not (copy / "adapters").exists()
    assert checkpoints_to_evaluate(str(copy)) == [str(copy)]

    cfg = load_config([f"config={run / 'config.yaml'}"])
    rebuilt = load_generator(cfg, str(copy), torch.device("cpu")).model.state_dict()
    saved = load_generator(cfg, src, torch.device("cpu")).model.state_dict()
    assert rebuilt.keys() == saved.keys() and all(torch.equal(rebuilt[k], saved[k]) for k in saved)
    untrained = load_generator(cfg, None, torch.device("cpu")).model.state_dict()
    assert any(not torch.equal(untrained[k], saved[k]) for k in saved), "no adapter was loaded"
