"""benchmarks/train_step.py runs end to end (tiny preset on the CPU: ours under DeepSpeed, the diffusers + PEFT
peer, the report), so the GPU benchmark cannot rot between GPU sessions."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from launch_utils import ROOT, _env

pytestmark = pytest.mark.slow
SCRIPT = os.path.join(ROOT, "benchmarks", "train_step.py")


def _run(*args, timeout=300) -> str:
    proc = subprocess.run([sys.executable, SCRIPT, *args], cwd=ROOT, env=_env({"BENCH_COMMIT": "test"}),
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_benchmark_times_ours_and_the_peer_and_reports_both(tmp_path):
    results = str(tmp_path / "r.jsonl")
    common = ["--preset", "tiny", "--device", "cpu", "--warmup", "1", "--steps", "1", "--results", results]
    _run(*common, "--variants", "vae=latents,vae=mix+n=8")
    _run(*common, "--peer")
    rows = [json.loads(line) for line in open(results)]
    ours, mixed = (r for r in rows if r["kind"] == "ours")
    peer = next(r for r in rows if r["kind"] == "peer")
    for r in (ours, peer):
        assert r["steps"] == 1 and r["flops"] > 0 and r["step_s"] > 0, r
        assert r["dit_fwd_s"] > 0 and r["dit_bwd_s"] > 0, r
    assert ours["vae_cond_s"] > 0 and ours["vae"] == "latents"  # the condition encode is timed in our step
    table = _run("--report", results)
    lines = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")] for line in table.splitlines()
             if line.startswith("tiny ") and "vae=mix" not in line}
    head = next(line for line in table.splitlines() if line.startswith("preset"))
    cols = [c.strip() for c in head.split("|")]
    x_peer, x_dit = lines["z3"][cols.index("x peer")], lines["z3"][cols.index("x peer DiT")]
    assert x_peer == f"{peer['step_s'] / ours['step_s']:.2f}x"
    dit = lambda r: r["dit_fwd_s"] + r["dit_bwd_s"] + r["optimizer_s"]  # noqa: E731
    assert x_dit == f"{dit(peer) / dit(ours):.2f}x"
    assert lines["peer"][cols.index("x peer")] == "-"
    # averaged over the task mix: only the sparse task (p_sparse of the samples) encodes its condition live
    assert ours["p_live_encode"] == pytest.approx(0.30)
    # derived: the step less the VAE encode's share; vae/cond is everything before the DiT (VAE, then features)
    assert ours["vae_cond_s"] == pytest.approx(ours["vae_s"] + ours["cond_s"]) and ours["cond_s"] > 0
    mix = ours["step_s"] - ours["vae_s"] * (1 - ours["p_live_encode"])
    assert lines["z3"][cols.index("mix s")] == f"{mix:.3f}" and lines["peer"][cols.index("mix s")] == "-"
    assert lines["z3"][cols.index("x peer mix")] == f"{peer['step_s'] / mix:.2f}x"
    # vae=mix: each step drew its task as the trainer does (sample_umc, seeded), after the warm-up's one draw
    import torch
    from one4d_train.model.config import UMCConfig
    from one4d_train.model.umc import sample_umc
    draws = torch.Generator().manual_seed(0)
    tasks = [sample_umc(1, 9, UMCConfig(), draws)[0][0] for _ in range(1 + 8)][1:]
    k = tasks.count("sparse")
    assert mixed["mix_tasks"] == tasks and len(mixed["walls"]) == 8 and "error" not in mixed
    assert mixed["mix_encode_steps"] == k and mixed["conditioning"] == ["text", "image"]
    assert 0 < k < 8  # both groups drawn: the row has a measured mix
    # only the sparse steps encoded a condition (the image task's latent is stored, the video task's is the target)
    assert mixed["mix_encodes"] == k
    # its step s and n are the encoding steps' (the worst case); mix s the probability-weighted mean of both groups
    enc = [w for w, t in zip(mixed["walls"], tasks) if t == "sparse"]
    plain = [w for w, t in zip(mixed["walls"], tasks) if t != "sparse"]
    assert mixed["steps"] == k and mixed["step_s_max"] == max(enc)
    assert mixed["mix_s"] == pytest.approx(0.3 * sum(enc) / k + 0.7 * sum(plain) / (8 - k))
    (row,) = [[c.strip() for c in line.split("|")] for line in table.splitlines()
              if line.startswith("tiny ") and "vae=mix" in line]
    assert row[cols.index("mix s")] == f"{mixed['mix_s']:.3f}"
    assert row[cols.index("x peer mix")] == f"{peer['step_s'] / mixed['mix_s']:.2f}x"
    assert f"mix measured: {k} of 8 steps encode (few)" in row[cols.index("note")]
    assert "features: text+image" in row[cols.index("note")]
    # no matmul rate in this run: the header still names the device, MFUmm says so instead of printing nan
    assert table.splitlines()[0].startswith("device: ") and "matmul: not measured" in table.splitlines()[0]
    assert lines["z3"][cols.index("MFUmm")] == "-" and "nan" not in table


def test_attention_rates_per_shape_are_measured_and_reported(tmp_path):
    """The attention rates come per shape (self-attention, and the text / image cross-attentions, whose short key
    sequences run at other rates), each backend called through the model's attention(); the report names each row's
    shape."""
    import importlib.util
    import torch
    spec = importlib.util.spec_from_file_location("train_step_bench", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.attention_rates(1, 64, 32, 2, 16, ("math",), torch.device("cpu"))
    assert [r["backend"] for r in rows] == ["math"]  # no flash library on the CPU
    assert rows[0]["tflops_fwd"] > 0 and rows[0]["tflops_fwd_bwd"] > 0
    results = tmp_path / "r.jsonl"
    results.write_text("\n".join(json.dumps(r) for r in [
        {"kind": "attention", "backend": "cudnn", "tflops_fwd_bwd": 543.0},  # a row from before the shapes: self
        {"kind": "attention", "shape": "text", "backend": "fa4", "tflops_fwd_bwd": 400.0, "tflops_fwd": 500.0},
        {"kind": "attention", "shape": "image", "backend": "flash", "error": "RuntimeError: no kernel"}]) + "\n")
    table = bench.report([str(results)])
    assert "SDPA cudnn: 543 TFLOP/s fwd+bwd (self: 2x18018 x 18018 keys, 12x128)" in table
    assert "fa4: 400 TFLOP/s fwd+bwd, 500 fwd (text: 2x18018 x 512 keys, 40x128)" in table
    assert "SDPA flash: RuntimeError: no kernel (image: 2x18018 x 257 keys, 40x128)" in table


def test_report_marks_fp8_base_rows_and_prints_the_fp8_matmul_rate(tmp_path):
    """Rows of runs with `model.base_matmul=fp8` say so in the table, and the FP8 matmul rate is printed."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("train_step_bench", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    step = {"kind": "ours", "preset": "14b", "variant": "vae=latents", "zero_stage": 2, "flops": 3.755e15,
            "step_s": 7.0, "step_s_min": 6.9, "step_s_max": 7.1, "steps": 10, "vae_cond_s": 0.36, "dit_fwd_s": 2.0,
            "dit_bwd_s": 4.6, "optimizer_s": 0.03}
    results = tmp_path / "r.jsonl"
    results.write_text("\n".join(json.dumps(r) for r in [
        {"kind": "matmul", "tflops": 767.0}, {"kind": "matmul_fp8", "tflops": 1390.0},
        {**step, "base_matmul": "bf16"}, {**step, "lever": "fp8", "base_matmul": "fp8"}, step]) + "\n")
    table = bench.report([str(results)])
    assert "fp8 row-wise matmul 8192^3 (model.base_matmul=fp8's product): 1390 TFLOP/s" in table
    who = [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("14b ")]
    assert who == ["z2", "z2/fp8 [fp8 base]", "z2"]  # rows without the field are from bf16-only runs


def test_task_mix_weights_each_groups_mean_step_by_its_probability():
    """The measured task mix: the mean step of the tasks that encode a condition (sparse) and of the others
    (image, video: their latents are stored), weighted by the configured probabilities; no figure where the draws
    left a group empty (a mean of nothing is no measurement)."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from train_step import task_mix

    from one4d_train.model.config import UMCConfig

    umc = UMCConfig(p_image=0.2, p_sparse=0.5, p_video=0.3)
    walls = [2.0, 1.0, 3.0, 1.2, 1.1, 9.0]
    tasks = ["sparse", "image", "sparse", "video", "video", "sparse"]
    out = task_mix(walls, tasks, umc)
    assert out["mix_s"] == pytest.approx(0.5 * (2.0 + 3.0 + 9.0) / 3 + 0.5 * 1.1)  # the expected step: means
    assert (out["mix_encode_median_s"], out["mix_plain_median_s"]) == (3.0, 1.1)
    assert (out["mix_encode_steps"], out["p_live_encode"], out["mix_tasks"]) == (3, 0.5, tasks)
    assert "mix_s" not in task_mix([1.0, 1.1], ["video", "image"], umc)
    assert "mix_s" not in task_mix([2.0], ["sparse"], umc)


def test_peer_flop_count_is_what_the_peer_model_runs():
    """The peer row's model FLOPs (the analytic formula with the peer's LoRA) against torch's flop counter on the
    benchmark's own tiny peer model, fed as the benchmark feeds it (RGB + XYZ as a batch of 2); math attention
    (backward = 2x forward) and no recompute (checkpointing off while counting), as model FLOPs count them."""
    import argparse
    import importlib.util
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    spec = importlib.util.spec_from_file_location("train_step_bench", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = argparse.Namespace(preset="tiny")
    model, lora = bench.build_peer("tiny", torch.device("cpu"))
    model.disable_gradient_checkpointing()
    t, h, w = bench.latent_shape(args)
    inp = torch.randn(2, 36, t, h, w, dtype=torch.bfloat16)
    ctx = torch.randn(2, bench.TEXT_LEN, bench.PEER_CONFIGS["tiny"]["text_dim"], dtype=torch.bfloat16)
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            pred = model(hidden_states=inp, timestep=torch.full((2,), 500.0), encoder_hidden_states=ctx,
                         return_dict=False)[0]
        pred.float().square().mean().backward()
    assert all(p.grad is not None for p in lora)
    # the time and text embedding MLPs are left out of the analytic count, as for our model
    mlps = sum(counter.get_flop_counts()["WanTransformer3DModel.condition_embedder"].values())
    assert counter.get_total_flops() - mlps == bench.peer_flops("tiny", args, attention_backward_factor=2.0)


def test_usage_examples_parse():
    """The variants of every command line in the script's usage text are valid variant settings."""
    import importlib.util
    import shlex
    spec = importlib.util.spec_from_file_location("train_step_bench", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    examples = [line.split("train_step.py", 1)[1] for line in bench.__doc__.splitlines()
                if line.strip().startswith("python benchmarks/train_step.py")]
    assert len(examples) == 4
    for example in examples:
        argv = shlex.split(example)
        if "--variants" in argv:
            assert bench.parse_variants(argv[argv.index("--variants") + 1]), example
    assert [v["offload"] for v in bench.parse_variants("offload=1@36,ckpt=full,offload=0")] == ["1@36", "1@36", "0"]
    assert [v["hostmem"] for v in bench.parse_variants("offload=1,hostmem=thp,hostmem=small")] == [None, "thp", "small"]
    for bad in ("offload=2", "offload=0@3", "offload=1@", "hostmem=huge"):
        with pytest.raises(SystemExit, match="unknown variant setting"):
            bench.parse_variants(bad)


def test_the_gpu_scripts_variants_parse():
    """Every fixed variant list of benchmarks/gpu_run.sh (its defaults included) is valid: a typo there would cost a
    GPU session its part."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("train_step_bench", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    script = (Path(SCRIPT).parent / "gpu_run.sh").read_text()
    lists = re.findall(r'--variants "(?:\$\{\w+:-)?([^"$}]+)\}?"', script)
    assert len(lists) >= 10, lists
    for text in lists:
        assert bench.parse_variants(text), text


def test_report_marks_rows_timed_with_fewer_than_ten_steps(tmp_path):
    """The step time is the median of at least 10 timed steps: a row with fewer says so in the table."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("train_step_bench", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    step = {"kind": "ours", "preset": "14b", "variant": "vae=latents", "zero_stage": 2, "flops": 3.755e15,
            "step_s": 7.0, "step_s_min": 6.9, "step_s_max": 7.1, "vae_cond_s": 0.36, "dit_fwd_s": 2.0,
            "dit_bwd_s": 4.6, "optimizer_s": 0.03}
    results = tmp_path / "r.jsonl"
    results.write_text("\n".join(json.dumps(r) for r in [{**step, "steps": 10, "lever": "a"},
                                                          {**step, "steps": 8, "lever": "b"}]) + "\n")
    notes = {line.split("|")[1].strip(): line.split("|")[-1].strip() for line in bench.report([str(results)]).splitlines()
             if line.startswith("14b ")}
    assert notes == {"z2/a": "n=10 [6.900,7.100]", "z2/b": "n=8 (too few) [6.900,7.100]"}
    # the allocator's retries where counted (0 included: counted, none), its peak reserved memory, huge pages asked
    results.write_text("\n".join(json.dumps({**step, "steps": 10, **r}) for r in [
        {"lever": "c", "alloc_alloc_retries": 16, "peak_reserved_gb": 83.25, "hostmem": "thp"},
        {"lever": "d", "alloc_alloc_retries": 0, "peak_reserved_gb": 79.5}]) + "\n")
    notes = {line.split("|")[1].strip(): line.split("|")[-1].strip() for line in bench.report([str(results)]).splitlines()
             if line.startswith("14b ")}
    assert notes == {"z2/c": "n=10 [6.900,7.100] thp retries 16 reserved 83.2 GB",
                     "z2/d": "n=10 [6.900,7.100] retries 0 reserved 79.5 GB"}


def test_checkpointed_block_count_variant_runs_and_is_recorded(tmp_path):
    """`ckpt=MODE@K` (the first K blocks in MODE, as model.activation_checkpointing_blocks=K) and `unit=sublayer` run
    real steps, and rows record the checkpointing and the VAE's frames per call."""
    results = str(tmp_path / "r.jsonl")
    _run("--preset", "tiny", "--device", "cpu", "--zero-stage", "2", "--warmup", "1", "--steps", "1", "--results",
         results, "--set", "model.vae_frames_per_call=8", "--variants", "ckpt=selective@1+vae=latents")
    (row,) = [json.loads(line) for line in open(results)]
    assert "error" not in row and row["steps"] == 1 and row["step_s"] > 0, row
    assert row["ckpt"] == "selective@1" and row["vae_frames_per_call"] == 8
    # the frozen text and image towers are held for the peak (tiny ones here); in host memory the text one is not
    assert row["encoders_gb"] > 0
    assert row["ckpt_blocks"] == 1  # counted on the model
    # the configured count reaches the benchmark's model too (a CPU run's host is its device: both towers held;
    # test_resident_encoders_... covers the text tower left out of a GPU's peak)
    _run("--preset", "tiny", "--device", "cpu", "--zero-stage", "2", "--warmup", "1", "--steps", "1", "--results",
         results, "--set", "model.text_encoder_device=cpu", "--set", "model.activation_checkpointing=full",
         "--set", "model.activation_checkpointing_blocks=2", "--variants", "vae=none,lora=fused,unit=sublayer,offload=1@1")
    *_, separate, fused, sublayer, first_offloaded = [json.loads(line) for line in open(results)]
    assert separate["encoders_held"] == row["encoders_held"] == ["UMT5Encoder", "CLIPVision"]
    assert separate["encoders_gb"] == row["encoders_gb"] and separate["ckpt_blocks"] == 2
    assert separate["ckpt"] == "full@2" and separate["ckpt_unit"] == "block"
    # the checkpointed region as a variant: each residual update of the same two blocks
    assert "error" not in sublayer and (sublayer["ckpt"], sublayer["ckpt_unit"], sublayer["ckpt_blocks"]) == (
        "full@2", "sublayer", 2)
    # the branch LoRA's kernel as a variant: the shipped one, then the fused operator on the same engine
    assert (row["lora_kernel"], separate["lora_kernel"], fused["lora_kernel"]) == ("bmm", "bmm", "fused")
    assert "error" not in fused and fused["steps"] == 1
    # activation offload of the first block only (model.activation_offload_blocks=1), the default being no offload
    assert (separate["offload"], first_offloaded["offload"]) == ("0", "1@1") and "error" not in first_offloaded
    assert first_offloaded["offload_blocks"] == 1 and "offload_kept_gb_per_step" in first_offloaded


def test_report_prints_vae_settings_with_their_latent_differences(tmp_path):
    import importlib.util
    spec = importlib.util.spec_from_file_location("train_step_bench", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    results = tmp_path / "r.jsonl"
    results.write_text(json.dumps({"kind": "vae", "videos": "condition, + 8 frames per call", "encode_s": 0.338,
                                   "tflops": 266.0, "peak_gb": 5.8, "rel_to_first": 5.5e-3, "rel_to_fp32": 3.2e-3})
                       + "\n")
    assert ("VAE encode (condition, + 8 frames per call): 0.338 s, 266 TFLOP/s, peak 5.8 GB, latents vs first row "
            "5.5e-03, vs fp32 3.2e-03") in bench.report([str(results)])


def test_resident_encoders_hold_each_tower_parameter_once():
    """The towers held for the peak are the sizes a loaded model has: UMT5's shared and encoder embeddings are one
    tensor (materialising from the meta device unties them); the text tower is left out where the trainer keeps
    it in host memory."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import torch
    from train_step import resident_encoders

    from one4d_train.model.config import ModelConfig
    from one4d_train.model.image_encoder import tiny_clip_vision
    from one4d_train.model.text_encoder import tiny_umt5

    def unique_bytes(modules):
        seen = {p.data_ptr(): p.numel() * p.element_size() for m in modules for p in m.parameters()}
        return sum(seen.values())

    text = tiny_umt5().to(torch.bfloat16)
    image = tiny_clip_vision(image_size=224).to(torch.bfloat16)
    towers = resident_encoders(ModelConfig(preset="tiny"), torch.device("cpu"), tiny=True)
    umt5 = towers[0]
    assert umt5.shared.weight is umt5.encoder.embed_tokens.weight
    assert sum(p.numel() * p.element_size() for t in towers for p in t.parameters()) == unique_bytes([text, image])
    n_image = sum(p.numel() for p in image.parameters())
    for mode, stored in (("cpu", False), ("auto", True)):  # where the trainer keeps the text encoder in host memory
        host = resident_encoders(ModelConfig(preset="tiny", text_encoder_device=mode), torch.device("meta"), tiny=True,
                                 text_stored=stored)
        assert len(host) == 1 and sum(p.numel() for p in host[0].parameters()) == n_image, (mode, stored)
    assert len(resident_encoders(ModelConfig(preset="tiny", text_encoder_device="device"), torch.device("meta"),
                                 tiny=True, text_stored=True)) == 2


def test_step_conditioning_runs_the_held_towers_on_the_first_observed_frame_and_a_caption():
    """The benchmark's step makes its text and image features as the trainer does: CLIP on the first observed frame
    (the task's), UMT5 on a caption where its tower is held; towers initialised (to_empty leaves garbage)."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import torch
    from train_step import IMAGE_TOKENS, TEXT_LEN, StepConditioning, resident_encoders

    from one4d_train.model.config import ModelConfig
    from one4d_train.model.image_encoder import CLIPImageEncoder

    towers = resident_encoders(ModelConfig(preset="tiny"), torch.device("cpu"), tiny=True)
    # initialised, not whatever to_empty's memory held: layer norms at one, CLIP's position ids counted
    assert all(torch.equal(m.weight, torch.ones_like(m.weight)) for t in towers for m in t.modules()
               if isinstance(m, torch.nn.LayerNorm))
    assert torch.equal(towers[1].get_buffer("embeddings.position_ids"), torch.arange(IMAGE_TOKENS)[None])
    assert all(torch.isfinite(p).all() for t in towers for p in t.parameters())
    cond = StepConditioning(towers, torch.device("cpu"), 64, 32, torch.Generator().manual_seed(0))
    rgb = torch.rand(1, 3, 9, 32, 48) * 2 - 1
    mask = torch.zeros(1, 9, dtype=torch.bool)
    mask[0, [3, 6]] = True  # a sparse task whose first observed frame is frame 3
    context, clip = cond(rgb, mask)
    assert context.shape == (1, TEXT_LEN, 64) and clip.shape == (1, IMAGE_TOKENS, 32)
    assert context.dtype == clip.dtype == torch.bfloat16 and context.abs().sum() > 0
    image = CLIPImageEncoder(towers[1], dtype=torch.bfloat16)
    torch.testing.assert_close(clip, image.encode(rgb[:, :, 3]).to(torch.bfloat16))
    assert not torch.equal(clip, image.encode(rgb[:, :, 0]).to(torch.bfloat16))
    # without towers (text stored, --no-encoders): fixed features of the same shapes
    bare = StepConditioning([], torch.device("cpu"), 64, 32, torch.Generator().manual_seed(0))
    assert bare.text is None and bare.image is None
    assert [x.shape for x in bare(rgb, mask)] == [(1, TEXT_LEN, 64), (1, IMAGE_TOKENS, 32)]
    # text stored (UMT5 in host memory): CLIP runs, the text features are fixed
    image_only = StepConditioning(towers[1:], torch.device("cpu"), 64, 32, torch.Generator().manual_seed(0))
    assert image_only.text is None and image_only.image is not None
    assert torch.equal(image_only(rgb, mask)[0], image_only.context)
    # a backbone without image input holds no CLIP tower (as the trainer builds none)
    assert resident_encoders(ModelConfig(preset="tiny", has_image_input=False), torch.device("meta"), tiny=True,
                             text_stored=True) == []


def test_rows_name_the_code_run_even_from_a_copied_tree(tmp_path):
    """A row's commit is HEAD's where the files are HEAD's; where they differ (a tree copied beside stale repository
    metadata, or uncommitted changes) it adds the git tree the files make, which the commit holding them has, and
    the repository's own index is left as it was."""
    import importlib.util
    import subprocess

    spec = importlib.util.spec_from_file_location("train_step_bench", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    repo = tmp_path / "repo"
    repo.mkdir()

    def git(*args):
        return subprocess.check_output(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo,
                                       text=True).strip()
    git("init", "-q")
    (repo / "a.py").write_text("x = 1\n")
    (repo / ".gitignore").write_text("*.whl\n")
    git("add", "-A")
    git("commit", "-q", "-m", "one")
    head = git("rev-parse", "--short", "HEAD")
    (repo / "big.whl").write_text("ignored")
    assert bench.commit(repo) == head
    (repo / "a.py").write_text("x = 2\n")
    (repo / "new.py").write_text("y = 1\n")  # untracked files travel with a copied tree too
    got = bench.commit.__wrapped__(repo)
    assert git("diff", "--cached", "--name-only") == ""  # the real index untouched
    git("add", "-A")
    git("commit", "-q", "-m", "two")
    assert got == f"{head}+tree:{git('rev-parse', 'HEAD^{tree}')[:12]}"
