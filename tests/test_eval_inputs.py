"""What `one4d eval` is given: a checkpoint named explicitly must be complete (else exit 2 naming the path and
why), an export of `one4d export` loads as it is, a run directory is scanned for complete checkpoints not yet
scored, and a config without a dataset is refused before any model is built."""
import json
from dataclasses import replace
import os
from pathlib import Path

import pytest
import torch

from one4d_train.cli import main as cli
from one4d_train.config import load_config, to_yaml
from one4d_train.eval.pipeline import (EvalInputError, checkpoints_to_evaluate, dataset_tag, eval_dataset,
                                       evaluate_checkpoint, load_generator, scored, scoring_settings)
from one4d_train.model.adapters import export_adapters
from one4d_train.model.one4d import build_one4d
from one4d_train.train.checkpoint import MARKER, STATE_KEYS, _listing, checksums

TINY = ["model.num_links=2", "model.compute_dtype=fp32", "model.activation_checkpointing=none", "train.device=cpu",
        "model.lora.rank=4", "model.lora.alpha=8"]


def _run(tmp_path, *extra):
    """A run directory holding config.yaml; returns (run dir, config, exported trainable state)."""
    run = tmp_path / "run"
    cfg = load_config([f"run_dir={run}", *TINY, *extra])
    run.mkdir()
    (run / "config.yaml").write_text(to_yaml(cfg))
    model = build_one4d(cfg.model, seed=1)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.normal_(0, 0.02)
    return run, cfg, model.trainable_state_dict()


def _checkpoint(run, cfg, state, step=10, complete=True, crc=False, identity=None, window=None):
    """crc: the marker records CRC-32s as saves do now (else sizes alone, as written before); identity: the task
    identity its train state and adapters record, as a save writes them (else none, as written before); window:
    the data window its adapters record (data_window(cfg.data) as a save writes it; else none, as before)."""
    ckpt = run / "checkpoints" / f"step-{step:08d}"
    export_adapters(state, cfg.model, str(ckpt / "adapters"), base=identity, window=window)
    (ckpt / "train_state").mkdir()
    train_state = {k: None for k in STATE_KEYS} | {"step": step, **({"task_identity": identity} if identity else {})}
    (ckpt / "train_state" / "rank-00000.json").write_text(json.dumps(train_state))
    if complete:
        files = _listing(str(ckpt))
        marker = {"step": step, "world_size": 1, "files": files}
        if crc:
            marker["crc32"] = checksums(str(ckpt), [str(ckpt / rel) for rel in files])
        (ckpt / MARKER).write_text(json.dumps(marker))
    return ckpt


def test_a_missing_checkpoint_is_an_error(tmp_path, capsys):
    target = tmp_path / "run" / "checkpoints" / "step-0000001O"  # mistyped
    assert cli(["eval", f"checkpoint={target}"]) == 2
    err = capsys.readouterr().err
    assert str(target) in err and "no such directory" in err


def test_an_incomplete_checkpoint_is_an_error_naming_why(tmp_path, capsys):
    run, cfg, state = _run(tmp_path)
    ckpt = _checkpoint(run, cfg, state)
    lora = ckpt / "adapters" / "lora_rgb.safetensors"
    size = lora.stat().st_size
    os.truncate(lora, size // 2)  # half copied
    assert cli(["eval", f"checkpoint={ckpt}"]) == 2
    err = capsys.readouterr().err
    assert str(ckpt) in err and "adapters/lora_rgb.safetensors" in err and f"{size // 2} bytes" in err, err
    with pytest.raises(EvalInputError, match="lora_rgb.safetensors"):
        checkpoints_to_evaluate(str(ckpt / "adapters"))  # its adapters named directly: the same check

    (ckpt / MARKER).unlink()  # adapters/ present, COMPLETE not (yet) written
    os.truncate(lora, size)
    for target in (ckpt, ckpt / "adapters"):
        assert cli(["eval", f"checkpoint={target}"]) == 2
        err = capsys.readouterr().err
        assert str(ckpt) in err and f"no {MARKER} marker" in err, err
    (ckpt / MARKER).write_text('{"step": 10, "files": {')
    with pytest.raises(EvalInputError, match=f"{MARKER} marker is damaged"):
        checkpoints_to_evaluate(str(ckpt))


def test_a_directory_that_is_no_checkpoint_export_or_run_is_an_error(tmp_path, capsys):
    (tmp_path / "somewhere").mkdir()
    assert cli(["eval", f"checkpoint={tmp_path / 'somewhere'}"]) == 2
    assert "neither" in capsys.readouterr().err


def test_adapters_are_evaluated_only_on_the_base_they_were_trained_on(tmp_path, capsys):
    """Was: `one4d eval` loaded a checkpoint's or an export's adapters onto whatever model.checkpoint named; a base
    of the same shapes (another fine-tune, another precision) scored silently wrong. Both record the base's content
    fingerprint; another base is refused by key before any model is built, the same files at any path pass."""
    from safetensors.torch import save_file

    from data_utils import make_shards
    from one4d_train.model.backbone import WanDiT
    from one4d_train.model.presets import wan_config
    from one4d_train.model.state_dict import checkpoint_fingerprint
    from one4d_train.train.export_cli import main as export
    from one4d_train.train.one4d_task import identity_problems

    base = WanDiT(wan_config("tiny")).state_dict()
    trained_on, other = tmp_path / "base.safetensors", tmp_path / "other.safetensors"
    save_file(base, str(trained_on))
    save_file({k: v + 1 for k, v in base.items()}, str(other))
    identity = {"checkpoint": str(trained_on), "fingerprint": checkpoint_fingerprint(str(trained_on)),
                "lora_alpha": 8}
    shards = make_shards(tmp_path, num_clips=1, frames=5, height=32, width=64)
    run, cfg, state = _run(tmp_path, f"data.val_shards={shards}", "data.num_frames=5")
    ckpt = _checkpoint(run, cfg, state, crc=True, identity=identity)
    assert export([f"checkpoint={ckpt}", f"out={tmp_path / 'export'}"]) == 0
    for target in (ckpt, tmp_path / "export"):
        for given in (other, ""):  # another base; none (the random base)
            assert cli(["eval", f"checkpoint={target}", f"config={run / 'config.yaml'}",
                        f"model.checkpoint={given}"]) == 2
            err = capsys.readouterr().err
            assert (f"key 'model.checkpoint': {given or 'the random base of seed 0'}" in err and
                    f"{target} was trained on {trained_on} (content fingerprint {identity['fingerprint']})" in err
                    and "evaluate with model.checkpoint pointing at those weights" in err), err
    moved = tmp_path / "moved"
    moved.mkdir()
    os.rename(trained_on, moved / "diffusion_pytorch_model.safetensors")
    ok = load_config([f"config={run / 'config.yaml'}", f"model.checkpoint={moved}"])
    assert identity_problems(ok, str(ckpt), identity, action="evaluate") == []
    wrong_scale = load_config([f"config={run / 'config.yaml'}", f"model.checkpoint={moved}", "model.lora.alpha=4"])
    assert [k for k, _ in identity_problems(wrong_scale, str(ckpt), identity, action="evaluate")] == ["model.lora.alpha"]


def _metrics(run, ckpt):
    """Where `one4d eval` writes the scores of `ckpt` on its run's configured dataset."""
    cfg = load_config([f"config={run / 'config.yaml'}"])
    return ckpt / "eval" / dataset_tag(eval_dataset(cfg)) / "metrics.json"


def _scored(run, ckpt, *overrides, **settings):
    """A finished metrics.json for `ckpt` as `one4d eval` with the run's config and `overrides` writes it;
    `settings` replace recorded ones (None: left out)."""
    from one4d_train.eval.outputs import write_metrics_json

    cfg = load_config([f"config={run / 'config.yaml'}", *overrides])
    recorded = {**scoring_settings(cfg, eval_dataset(cfg)), **settings}
    path = _metrics(run, ckpt)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_metrics_json(path, {"settings": {k: v for k, v in recorded.items() if v is not None}, "means": {}})


def test_run_directory_scan_skips_incomplete_checkpoints_as_damaged(tmp_path, capsys):
    from data_utils import make_shards

    shards = make_shards(tmp_path, num_clips=1, frames=5, height=32, width=64)
    run, cfg, state = _run(tmp_path, f"data.val_shards={shards}", "data.num_frames=5")
    assert checkpoints_to_evaluate(str(run)) == []
    assert cli(["eval", f"checkpoint={run}"]) == 0
    assert "nothing to evaluate" in capsys.readouterr().out
    done = _checkpoint(run, cfg, state, step=10)
    _scored(run, done)
    # a step folder is renamed from its .tmp- folder once complete: one without its marker was damaged since
    half = _checkpoint(run, cfg, state, step=20, complete=False)
    assert cli(["eval", f"checkpoint={run}"]) == 2
    out = capsys.readouterr()
    assert "nothing to evaluate" in out.out and "1 complete checkpoint(s) are scored on this dataset" in out.out, out.out
    assert f"skipping {half}, damaged: no {MARKER} marker" in out.err, out.err
    assert f"1 damaged checkpoint(s) not evaluated: {half}" in out.err, out.err
    new = _checkpoint(run, cfg, state, step=30)
    assert checkpoints_to_evaluate(str(run)) == [str(done), str(new)]
    assert checkpoints_to_evaluate(str(half.parent.parent)) == [str(done), str(new)]
    tag = dataset_tag(str(shards))
    wanted = scoring_settings(cfg, str(shards))
    assert scored(str(done), tag, wanted) == [] and scored(str(new), tag, wanted) is None


def test_a_scan_scores_again_what_was_scored_with_other_settings_or_rules(tmp_path, capsys, monkeypatch):
    """A run directory's checkpoints scored with other eval settings, or by the metrics of an earlier version (no
    metrics_version: before the 70 m cap and MonST3R's clipping), are scored again, saying why: skipped, the run's
    table mixed them. A dataset recorded by another path (the folder moved) is the same dataset by its tag."""
    from data_utils import make_shards

    from one4d_train.eval import main as eval_main

    shards = make_shards(tmp_path, num_clips=1, frames=5, height=32, width=64)
    run, cfg, state = _run(tmp_path, f"data.val_shards={shards}", "data.num_frames=5")
    same, moved, older, other = (_checkpoint(run, cfg, state, step=s) for s in (10, 20, 30, 40))
    _scored(run, same)
    _scored(run, moved, dataset="/elsewhere/shards")
    _scored(run, older, metrics_version=None, depth_cap=10.0)
    _scored(run, other, "eval.steps=5")
    evaluated = []
    monkeypatch.setattr(eval_main, "evaluate_checkpoint", lambda c, ckpt, **kw: evaluated.append(ckpt) or {})
    assert cli(["eval", f"checkpoint={run}"]) == 0
    err = capsys.readouterr().err
    assert evaluated == [str(older), str(other)], evaluated
    assert f"skipping {same}: scored on this dataset already" in err and f"skipping {moved}: scored" in err, err
    assert f"scoring {older} again: its scores on this dataset were made with other settings (depth_cap, " \
           f"metrics_version)" in err, err
    assert f"scoring {other} again: its scores on this dataset were made with other settings (steps)" in err, err
    evaluated.clear()
    assert cli(["eval", f"checkpoint={run}", "eval.rescore=never"]) == 0  # scores of other settings kept
    assert evaluated == [] and f"skipping {older}: scored on this dataset with other settings (depth_cap, " \
        f"metrics_version), kept (eval.rescore=never)" in capsys.readouterr().err
    assert cli(["eval", f"checkpoint={run}", "eval.steps=5"]) == 0  # now `other` is the one scored alike
    assert str(other) not in evaluated and str(same) in evaluated, evaluated
    # settings as written: no depth cap (inf, stored as "inf"), the modes in another order
    _scored(run, same, "eval.depth_cap=inf", "eval.modes=[video,image,sparse]")
    evaluated.clear()
    assert cli(["eval", f"checkpoint={run}", "eval.depth_cap=inf", "eval.modes=[sparse,image,video]"]) == 0
    assert str(same) not in evaluated, evaluated
    # one scored since the scan with other settings than these is scored again, not taken for done
    (same / "eval" / _metrics(run, same).parent.name / "metrics.json").write_text(
        json.dumps({"settings": {"metrics_version": 1}}))
    monkeypatch.setattr("one4d_train.eval.pipeline.load_generator", lambda *a: pytest.fail("scored") or None)
    with pytest.raises(pytest.fail.Exception, match="scored"):
        evaluate_checkpoint(load_config([f"config={run / 'config.yaml'}"]), str(same), unscored_only=True)


def test_a_vae_kernel_that_cannot_run_here_is_refused_by_key_before_the_model_is_built(tmp_path, capsys, monkeypatch):
    """The 1.3B config's Triton VAE convolutions evaluated on a CPU failed with a traceback after the DiT was built."""
    import one4d_train.eval.pipeline as pipeline

    run, cfg, state = _run(tmp_path)
    ckpt = _checkpoint(run, cfg, state)
    monkeypatch.setattr(pipeline, "load_generator", lambda *a: pytest.fail("built the model"))
    assert cli(["eval", f"checkpoint={ckpt}", "model.vae_conv_kernel=triton"]) == 2
    err = capsys.readouterr().err
    assert "key 'model.vae_conv_kernel': triton: the Triton kernel runs on CUDA devices, not cpu" in err, err
    assert "model.vae_conv_kernel=cudnn model.vae_frames_per_call=8" in err and "Traceback" not in err


def test_exports_load_as_they_are(tmp_path):
    """`one4d export out=DIR` writes the adapter files and adapter_config.json (last) into DIR, no COMPLETE:
    DIR itself is evaluated; a complete checkpoint's adapters/ named directly stands for its checkpoint."""
    run, cfg, state = _run(tmp_path)
    export = tmp_path / "export"
    export_adapters(state, cfg.model, str(export))
    assert checkpoints_to_evaluate(str(export)) == [str(export)]
    gen = load_generator(cfg, str(export), torch.device("cpu"))
    got = dict(gen.model.named_parameters())
    for name, tensor in state.items():
        torch.testing.assert_close(got[name], tensor, rtol=1e-6, atol=0)
    ckpt = _checkpoint(run, cfg, state)
    assert checkpoints_to_evaluate(str(ckpt / "adapters")) == [str(ckpt)]


def test_a_checkpoint_of_another_lora_scale_is_an_error(tmp_path, capsys):
    run, cfg, state = _run(tmp_path)
    ckpt = _checkpoint(run, cfg, state)
    assert cli(["eval", f"checkpoint={ckpt}", "model.lora.alpha=16", "data.val_shards=/nowhere"]) == 2
    err = capsys.readouterr().err
    assert "data.val_shards=/nowhere" in err  # the dataset is checked first
    from data_utils import make_shards

    shards = make_shards(tmp_path, num_clips=1, frames=5, height=32, width=64)
    assert cli(["eval", f"checkpoint={ckpt}", "model.lora.alpha=16", f"data.val_shards={shards}",
                "data.num_frames=5"]) == 2
    err = capsys.readouterr().err
    assert "lora.alpha 8" in err and "model.lora.alpha 16" in err, err


def test_no_dataset_is_reported_before_the_model_is_built(tmp_path, capsys, monkeypatch):
    run, cfg, state = _run(tmp_path)
    ckpt = _checkpoint(run, cfg, state)

    def no_model(*args, **kwargs):
        raise AssertionError("the model was built before the config was checked")

    monkeypatch.setattr("one4d_train.model.one4d.build_one4d", no_model)
    with pytest.raises(EvalInputError, match="eval.dataset.*data.val_shards"):
        evaluate_checkpoint(cfg, str(ckpt))
    assert cli(["eval", f"checkpoint={ckpt}"]) == 2
    assert "eval.dataset" in capsys.readouterr().err
    bonn = load_config([*TINY, f"eval.dataset=bonn:{tmp_path / 'nowhere'}"])
    with pytest.raises(EvalInputError, match="nowhere.*not a directory"):
        evaluate_checkpoint(bonn, str(ckpt))
    missing = tmp_path / "val_shardz"  # a typo: named by the key the user set, data.shards named nowhere
    assert cli(["eval", f"checkpoint={ckpt}", f"data.val_shards={missing}"]) == 2
    err = capsys.readouterr().err
    assert f"data.val_shards={missing}: {missing}: no such shard directory" in err and "data.shards" not in err


EVAL = ["data.num_frames=5", "data.height=32", "data.width=64", "eval.steps=2", "eval.num_samples=1",
        "eval.recovery_iters=5", "eval.keyframes=2", "eval.modes=[video]", "tracking.system_metrics=false"]


def _scored_run(tmp_path, steps=(10, 20), crc=False):
    """A run directory with held-out shards and complete checkpoints at `steps`, none evaluated yet."""
    from data_utils import make_shards

    torch.set_num_threads(1)
    shards = make_shards(tmp_path, num_clips=1, frames=5, height=32, width=64)
    run, cfg, state = _run(tmp_path, f"data.val_shards={shards}", *EVAL)
    return run, [_checkpoint(run, cfg, state, step=s, crc=crc) for s in steps]


def test_flipped_bytes_in_adapters_exit_2_naming_the_file_and_a_scan_scores_the_rest(tmp_path, capsys):
    """Bytes flipped in adapter weights (same size: still complete by the marker's sizes) were scored without a
    word. Named, the checkpoint exits 2 naming the file; a run directory's scan skips it, scores the others, exits 2."""
    run, (good, bad) = _scored_run(tmp_path, crc=True)
    damaged = bad / "adapters" / "lora_rgb.safetensors"
    data = bytearray(damaged.read_bytes())
    data[-20] ^= 0x01
    damaged.write_bytes(bytes(data))
    assert cli(["eval", f"checkpoint={bad}"]) == 2
    err = capsys.readouterr().err
    assert f"checkpoint {bad} is damaged: {damaged}: its bytes changed after the save" in err, err
    assert cli(["eval", f"checkpoint={run}"]) == 2
    err = capsys.readouterr().err
    assert f"skipping {bad}: checkpoint {bad} is damaged: {damaged}" in err and "1 damaged checkpoint(s)" in err, err
    assert _metrics(run, good).is_file() and not _metrics(run, bad).exists()


@pytest.mark.parametrize("when", ["load_generator", "iter_samples"])
def test_a_checkpoint_pruned_while_a_run_directory_is_evaluated_is_skipped_not_recreated(tmp_path, capsys,
                                                                                          monkeypatch, when):
    """The training run prunes (train.keep_last) a listed checkpoint before its model is built, or while its
    samples are generated: the scan goes on with the next one, and no step folder holding eval/ alone comes back."""
    import one4d_train.eval.pipeline as pipeline
    from one4d_train.train.checkpoint import Checkpointer, complete_checkpoints

    run, (old, new) = _scored_run(tmp_path)
    real, calls = getattr(pipeline, when), []

    def pruned_first(*args):
        if not calls:  # in the first (oldest) checkpoint's evaluation
            Checkpointer(str(run), 0, 1, keep_last=1)._prune()  # what the trainer does after saving step 20
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(pipeline, when, pruned_first)
    assert cli(["eval", f"checkpoint={run}"]) == 0
    err = capsys.readouterr().err
    assert f"skipping {old}: removed by the training run" in err, err
    assert not old.exists()
    assert _metrics(run, new).is_file()
    assert complete_checkpoints(str(run / "checkpoints")) == [str(new)]


def test_two_evaluations_of_one_run_directory_never_score_the_same_checkpoint(tmp_path, capsys):
    """A checkpoint another evaluation holds is skipped by a scan and refused when named; one scored since the
    scan listed it is not scored again."""
    from one4d_train.eval.claim import claim

    run, (first, second) = _scored_run(tmp_path)
    (first / "eval").mkdir()
    with claim(str(_metrics(run, first).parent)):
        assert cli(["eval", f"checkpoint={run}"]) == 0
        err = capsys.readouterr().err
        assert f"skipping {first}" in err and "being evaluated by another process" in err, err
        assert not _metrics(run, first).exists() and _metrics(run, second).is_file()
        assert cli(["eval", f"checkpoint={first}"]) == 2
        assert "being evaluated by another process" in capsys.readouterr().err
    cfg = load_config([f"config={run / 'config.yaml'}"])
    assert evaluate_checkpoint(cfg, str(second), unscored_only=True, progress=False) is None
    assert [c for c in checkpoints_to_evaluate(str(run)) if not _metrics(run, Path(c)).exists()] == [str(first)]


def test_an_evaluation_killed_mid_way_leaves_the_checkpoint_unscored(tmp_path, monkeypatch):
    """Re-evaluating a scored checkpoint removes its metrics.json first: an evaluation that dies before writing
    the new one leaves the checkpoint to the next scan instead of passing off the old score for the new outputs."""
    import one4d_train.eval.pipeline as pipeline

    run, (ckpt,) = _scored_run(tmp_path, steps=(10,))
    assert cli(["eval", f"checkpoint={run}"]) == 0
    assert _metrics(run, ckpt).is_file()

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # SIGINT / scancel mid-way through the samples

    monkeypatch.setattr(pipeline, "score_and_write", killed)
    assert cli(["eval", f"checkpoint={ckpt}"]) == 130  # one line, the shell's code for SIGINT
    assert not _metrics(run, ckpt).exists()


def test_one_out_dir_for_a_run_directorys_checkpoints_is_refused(tmp_path, capsys):
    """eval.out_dir names one evaluation's folder: with a run directory every checkpoint would overwrite the last
    (and the second would be skipped as already scored)."""
    run, cfg, state = _run(tmp_path)
    for step in (10, 20):
        _checkpoint(run, cfg, state, step=step)
    assert cli(["eval", f"checkpoint={run}", f"eval.out_dir={tmp_path / 'scores'}"]) == 2
    err = capsys.readouterr().err
    assert "key 'eval.out_dir'" in err and str(run) in err
    assert not (tmp_path / "scores").exists()


def test_an_out_dir_that_is_a_file_is_refused_by_key(tmp_path, capsys, monkeypatch):
    """A FileExistsError (exit 1) once the model was built; a lock file was left beside it."""
    run, cfg, state = _run(tmp_path)
    ckpt = _checkpoint(run, cfg, state)
    (tmp_path / "afile").write_text("")
    for out, why in ((tmp_path / "afile", "is a file"), (tmp_path / "afile" / "sub", f"is under {tmp_path / 'afile'}")):
        assert cli(["eval", f"checkpoint={ckpt}", f"eval.out_dir={out}"]) == 2
        err = capsys.readouterr().err
        assert f"command line: key 'eval.out_dir': {out} {why}" in err and "Traceback" not in err
    assert sorted(os.listdir(tmp_path)) == ["afile", "run"]
    from one4d_train.eval.main import out_dir_problems

    # inside a checkpoint (another's scores overwritten, then trusted; outputs copied into an export) or an export
    other = _checkpoint(run, cfg, state, step=20)
    export = tmp_path / "export"
    export_adapters(state, cfg.model, str(export))
    for out, inside in ((other / "eval" / "x", f"checkpoint {other}"), (other, f"checkpoint {other}"),
                        (export / "out", f"export {export}"), (ckpt / "adapters" / "x", f"export {ckpt / 'adapters'}"),
                        (ckpt, f"checkpoint {ckpt}")):
        assert cli(["eval", f"checkpoint={ckpt}", f"eval.out_dir={out}"]) == 2
        assert f"key 'eval.out_dir': {out} is inside {inside}" in capsys.readouterr().err
    # the eval/ folder of the checkpoint evaluated is its own: a subfolder of it is taken
    ((key, why),) = out_dir_problems(replace(cfg.eval, out_dir=str(other / "eval" / "x")), str(ckpt))
    assert out_dir_problems(replace(cfg.eval, out_dir=str(ckpt / "eval" / "steps20")), str(ckpt)) == []
    assert out_dir_problems(replace(cfg.eval, out_dir=str(export / "eval" / "other")), str(export)) == []
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    monkeypatch.setattr(os, "access", lambda path, mode: path != str(locked))  # as for a user who is not root
    ((key, why),) = out_dir_problems(replace(cfg.eval, out_dir=str(locked / "out")))
    assert key == "eval.out_dir" and why.startswith(f"{locked / 'out'}: {locked} is not writable by this user")


def test_model_files_that_do_not_fit_are_refused_before_the_model_is_built(tmp_path, capsys):
    """`one4d eval` reads the configured model files as `one4d train` does before building anything: a truncated
    backbone shard gave a traceback (exit 1) from deep in the model build, naming no key."""
    from safetensors.torch import save_file

    from one4d_train.model.one4d import random_base_state
    from one4d_train.model.presets import wan_config

    run, cfg, state = _run(tmp_path)
    ckpt = _checkpoint(run, cfg, state)
    good = tmp_path / "dit.safetensors"
    save_file(random_base_state(wan_config("tiny"), 0), str(good))
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-64])
    assert cli(["eval", f"checkpoint={ckpt}", f"model.checkpoint={truncated}", f"eval.dataset={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert f"key 'model.checkpoint': {truncated}: not a readable safetensors file" in err, err
    assert "Traceback" not in err and not (ckpt / "eval").exists()


def test_an_export_without_config_is_built_as_it_was_trained(tmp_path, capsys):
    """An export outside its run (no config.yaml to find) was built from the defaults (5 links on the tiny preset's
    3 blocks: a traceback); its adapter_config.json now gives the model settings, and the command line still wins."""
    from data_utils import make_shards

    run, cfg, state = _run(tmp_path, "model.link_blocks=[0,2]", "model.lora.rank=4", "model.lora.alpha=2")
    export = tmp_path / "elsewhere" / "export"
    export_adapters(state, cfg.model, str(export))
    shards = make_shards(tmp_path, num_clips=1, frames=5, height=32, width=64)
    common = [f"checkpoint={export}", f"data.val_shards={shards}", "data.num_frames=5", "data.height=32",
              "data.width=64", "eval.num_samples=1", "eval.steps=1", "eval.cfg_scale=1", "eval.modes=[video]",
              "eval.recovery_iters=1", "model.compute_dtype=fp32", "model.activation_checkpointing=none",
              "train.device=cpu"]
    assert cli(["eval", *common]) == 0, capsys.readouterr().err
    report = json.loads((export / "eval" / dataset_tag(str(shards)) / "metrics.json").read_text())
    assert report["means"]["video"]["num_samples"] == 1
    stale = export / "eval" / dataset_tag(str(shards)) / "r_of_other_adapters"  # a sample of an earlier evaluation
    stale.mkdir()
    assert cli(["eval", *common]) == 0 and not stale.exists()
    scores = (export / "eval" / dataset_tag(str(shards)) / "metrics.json").read_text()
    assert cli(["eval", *common, "model.lora.alpha=16"]) == 2  # the command line over the export's settings
    assert "model.lora.alpha 16" in capsys.readouterr().err
    # refused while the model is built: the earlier evaluation is kept (it was cleared before the build)
    assert (export / "eval" / dataset_tag(str(shards)) / "metrics.json").read_text() == scores
    assert cli(["eval", *common, "model.link_blocks=[]", "model.num_links=5"]) == 2  # checked before the model build
    assert "key 'model.num_links': model.num_links must be in [0, 3]" in capsys.readouterr().err
    unlinked = tmp_path / "unlinked"  # no control links: [] alone meant num_links (5) evenly spaced
    (tmp_path / "r2").mkdir()
    run2, cfg2, state2 = _run(tmp_path / "r2", "model.num_links=0", "model.lora.rank=4", "model.lora.alpha=2")
    export_adapters(state2, cfg2.model, str(unlinked))
    assert cli(["eval", *[a if not a.startswith("checkpoint=") else f"checkpoint={unlinked}" for a in common]]) == 0


def test_a_frame_window_longer_than_the_held_out_clips_is_refused_by_key(tmp_path, capsys):
    """Every sample skipped as too short, then the loader's RuntimeError (exit 1): now exit 2 naming
    data.num_frames before the model is built, as `one4d train` does (and stored text embeddings the model cannot
    take); scored checkpoints of a scan are named."""
    from data_utils import make_shards

    run, (ckpt,) = _scored_run(tmp_path, steps=(10,))
    assert cli(["eval", f"checkpoint={ckpt}", "data.num_frames=9"]) == 2
    err = capsys.readouterr().err
    assert "key 'data.num_frames': the window needs 9 frames" in err and "has 5" in err, err
    wide = make_shards(tmp_path / "wide", num_clips=1, frames=5, height=32, width=64, text_embeddings=(0,))
    assert cli(["eval", f"checkpoint={ckpt}", f"eval.dataset={wide}"]) == 2  # 4096-wide embeddings, a tiny model
    assert f"key 'eval.dataset': {wide} stores text embeddings 4096 wide" in capsys.readouterr().err
    assert cli(["eval", f"checkpoint={run}"]) == 0
    assert cli(["eval", f"checkpoint={run}"]) == 0
    assert f"skipping {ckpt}: scored on this dataset already" in capsys.readouterr().err
    # scores of the layout before per-dataset folders (eval/metrics.json) predate today's metrics: scored again
    new = _scored_run(tmp_path / "legacy", steps=(10,))[1][0]
    legacy = new / "eval" / "metrics.json"
    legacy.parent.mkdir()
    legacy.write_text(json.dumps({"settings": {"dataset": ""}}))  # the run's data.val_shards
    assert cli(["eval", f"checkpoint={new.parent.parent}"]) == 0
    assert f"skipping {new}" not in capsys.readouterr().err
    assert _metrics(new.parent.parent, new).exists()


def test_a_held_out_sample_that_does_not_read_stops_the_evaluation_naming_it(tmp_path, caplog):
    """A truncated held-out shard was skipped (its sample logged) and the rest scored, exit 0: metrics.json then
    covered fewer samples than the set, and a scan trusted it. `one4d eval` refuses such a set now; the evaluation
    inside training (strict=False) scores what reads, the same samples at every step. Samples after the last one
    an evaluation takes are not read."""
    import logging

    from data_pipeline.reader import list_shards
    from data_utils import make_shards
    from one4d_train.eval.pipeline import iter_samples

    shards = make_shards(tmp_path, num_clips=3, frames=5, height=32, width=64, samples_per_shard=1)
    cfg = load_config([f"data.val_shards={shards}", *TINY, *EVAL, "eval.num_samples=3"])
    order = [b["__shard__"][0] for b in iter_samples(cfg)]  # the evaluation's order of the intact set
    victim = next(s for s in list_shards(str(shards)) if s.name == order[-1])
    Path(victim.path).write_bytes(Path(victim.path).read_bytes()[:3000])
    with caplog.at_level(logging.WARNING, logger="data_pipeline.reader"), pytest.raises(EvalInputError) as err:
        list(iter_samples(cfg))
    assert f"data.val_shards={shards}: 1 held-out sample(s) do not read" in str(err.value)
    assert f"shard={victim.name}" in caplog.text
    assert [b["__shard__"][0] for b in iter_samples(cfg, strict=False)] == order[:2]
    assert [b["__shard__"][0] for b in iter_samples(replace(cfg, eval=replace(cfg.eval, num_samples=2)))] == order[:2]
    # a clip shorter than the window is no damage: left out (as at every evaluation at this window), not refused
    from data_utils import make_shards_of_lengths

    mixed = make_shards_of_lengths(tmp_path / "mixed", (5, 3, 5))
    cfg = load_config([f"data.val_shards={mixed}", *TINY, *EVAL, "eval.num_samples=3"])
    assert len(list(iter_samples(cfg))) == 2


def test_outputs_that_cannot_be_written_end_the_evaluation_in_one_line(tmp_path, capsys, monkeypatch):
    """A full disk mid-evaluation was PIL's or PyAV's OSError traceback."""
    import errno

    from one4d_train.eval import pipeline

    _, (ckpt,) = _scored_run(tmp_path, steps=(10,))

    def full(out_dir, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(out_dir / "depth.mp4"))
    monkeypatch.setattr(pipeline, "write_outputs", full)
    assert cli(["eval", f"checkpoint={ckpt}"]) == 1
    err = capsys.readouterr().err
    assert (f"one4d eval: {ckpt}: its outputs cannot be written: No space left on device: {ckpt}/eval/" in err
            and "GB free there); it does not count as scored" in err and "Traceback" not in err), err
    assert not list(ckpt.glob("eval/*/metrics.json"))

    def refused(where):
        def write(out_dir, *args, **kwargs):
            raise PermissionError(errno.EACCES, "Permission denied", str(where(out_dir)))
        return write
    monkeypatch.setattr(pipeline, "write_outputs", refused(lambda out: out / "sheet.png"))  # its own output: said
    assert cli(["eval", f"checkpoint={ckpt}"]) == 1
    assert "its outputs cannot be written: Permission denied" in capsys.readouterr().err
    # a file it reads that it may not (another user's model files): not said as an output it cannot write
    monkeypatch.setattr(pipeline, "write_outputs", refused(lambda out: tmp_path / "models" / "vae.safetensors"))
    with pytest.raises(PermissionError):
        cli(["eval", f"checkpoint={ckpt}"])


def test_an_out_dir_scored_again_keeps_no_sample_folder_of_the_earlier_scoring(tmp_path, capsys):
    """eval.out_dir scored again with fewer samples kept the earlier scoring's other sample folders beside a
    metrics.json that no longer lists them; what else the folder holds is the user's, left alone."""
    from data_utils import make_shards

    shards = make_shards(tmp_path, num_clips=2, frames=5, height=32, width=64, samples_per_shard=1)
    run, cfg, state = _run(tmp_path, f"data.val_shards={shards}", *EVAL)
    ckpt = _checkpoint(run, cfg, state)
    out = tmp_path / "scores"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert cli(["eval", f"checkpoint={ckpt}", f"eval.out_dir={out}", "eval.num_samples=2"]) == 0
    first = {r["sample"] for r in json.loads((out / "metrics.json").read_text())["samples"]}
    assert len(first) == 2 and all((out / name).is_dir() for name in first)
    assert cli(["eval", f"checkpoint={ckpt}", f"eval.out_dir={out}", "eval.num_samples=1"]) == 0
    (kept,) = {r["sample"] for r in json.loads((out / "metrics.json").read_text())["samples"]}
    assert sorted(p.name for p in out.iterdir()) == sorted([kept, "metrics.json", "notes.txt"])


def test_a_shard_set_replaced_at_the_same_path_is_scored_again(tmp_path, capsys):
    """The scores were keyed by the set's path alone: a new held-out set copied to the old path kept the old scores
    ("scored on this dataset already"). Its index.json's hash is recorded and compared now; scores made before it
    was recorded are not scored again for it."""
    import shutil

    from data_utils import make_shards

    run, (ckpt,) = _scored_run(tmp_path, steps=(10,))
    assert cli(["eval", f"checkpoint={run}"]) == 0
    assert cli(["eval", f"checkpoint={run}"]) == 0
    assert "scored on this dataset already" in capsys.readouterr().err
    shards = tmp_path / "shards"
    other = make_shards(tmp_path / "other", num_clips=1, frames=5, height=32, width=64, seed=7)
    shutil.rmtree(shards)
    shutil.copytree(other, shards)
    assert cli(["eval", f"checkpoint={run}"]) == 0
    assert f"scoring {ckpt} again: its scores on this dataset were made with other settings (dataset_content)" in \
        capsys.readouterr().err
    metrics = _metrics(run, ckpt)
    report = json.loads(metrics.read_text())
    del report["settings"]["dataset_content"]  # as scores made before it was recorded
    metrics.write_text(json.dumps(report))
    assert cli(["eval", f"checkpoint={run}"]) == 0
    assert "scored on this dataset already" in capsys.readouterr().err


def test_a_held_out_set_smaller_than_eval_num_samples_is_scored_whole_saying_so(tmp_path, capsys):
    _, (ckpt,) = _scored_run(tmp_path, steps=(10,))
    assert cli(["eval", f"checkpoint={ckpt}", "eval.num_samples=3"]) == 0
    assert "holds 1 sample(s): scoring all of them (eval.num_samples=3)" in capsys.readouterr().err


def test_samples_without_a_caption_take_one_pass_per_step_as_guidance_changes_nothing(tmp_path, monkeypatch):
    """A benchmark's samples have no caption: the guided velocity v_u + w (v_c - v_u) was v_c whatever w, at two
    passes per step. Such samples sample unguided; a captioned one is guided. A benchmark's settings leave the
    guidance scale out (a scan does not score again for it), shards' keep it."""
    import one4d_train.eval.pipeline as pipeline

    run, cfg, state = _run(tmp_path, "data.num_frames=5", "data.height=32", "data.width=64", "eval.steps=1")
    gen = load_generator(cfg, None, torch.device("cpu"))
    passes = []
    real = gen.model.forward
    monkeypatch.setattr(gen.model, "forward", lambda x, *a, **kw: passes.append(x.shape[0]) or real(x, *a, **kw))
    batch = {"rgb": torch.rand(1, 5, 3, 32, 64) * 2 - 1}
    plain = pipeline.generate(gen, {**batch, "caption": [""]}, "video", cfg.eval, [0])
    assert passes == [1]  # one pass (its batch: the one sample)
    passes.clear()
    pipeline.generate(gen, {**batch, "caption": ["a red car drives down a street"]}, "video", cfg.eval, [0])
    assert passes == [2] and cfg.eval.cfg_scale != 1  # conditional and unconditional, batched
    unguided = pipeline.generate(gen, {**batch, "caption": [""]}, "video", replace(cfg.eval, cfg_scale=1.0), [0])
    torch.testing.assert_close(plain["xyz"], unguided["xyz"])

    assert "cfg_scale" not in scoring_settings(cfg, "sintel:/data/sintel")
    assert scoring_settings(cfg, "/data/shards")["cfg_scale"] == cfg.eval.cfg_scale


def test_a_scan_scores_again_what_was_scored_with_other_pointmap_percentiles(tmp_path, capsys, monkeypatch):
    """data.pointmap_percentiles sets the ground truth's normalisation, so the scores (a perfect prediction's Abs
    Rel is ~0.004 at 2-98, ~1e-4 at 0-100): scores of other percentiles are scored again, and scores recorded
    before the setting was are taken as made with its default."""
    from data_utils import make_shards

    from one4d_train.eval import main as eval_main

    shards = make_shards(tmp_path, num_clips=1, frames=5, height=32, width=64)
    run, cfg, state = _run(tmp_path, f"data.val_shards={shards}", "data.num_frames=5")
    before, other = (_checkpoint(run, cfg, state, step=s) for s in (10, 20))
    _scored(run, before, pointmap_percentiles=None)
    _scored(run, other, "data.pointmap_percentiles=[0.0,100.0]")
    evaluated = []
    monkeypatch.setattr(eval_main, "evaluate_checkpoint", lambda c, ckpt, **kw: evaluated.append(ckpt) or {})
    assert cli(["eval", f"checkpoint={run}"]) == 0
    assert evaluated == [str(other)], evaluated
    assert "made with other settings (pointmap_percentiles)" in capsys.readouterr().err


def test_an_export_of_a_full_size_model_without_its_model_files_is_refused_by_key(tmp_path, capsys):
    """An export names its model's settings, not its files: `one4d eval checkpoint=EXPORT` of a 14B export, with no
    config.yaml beside it, built a randomly initialised 14B base with the tiny VAE and scored that, saying nothing.
    A preset other than tiny needs its files set, as training does."""
    run, cfg, state = _run(tmp_path)
    export = tmp_path / "export"
    export_adapters(state, cfg.model, str(export))
    settings = json.loads((export / "adapter_config.json").read_text())
    (export / "adapter_config.json").write_text(json.dumps({**settings, "preset": "14b"}))
    assert cli(["eval", f"checkpoint={export}", "eval.dataset=sintel:/nowhere"]) == 2
    err = capsys.readouterr().err
    assert "key 'model.checkpoint': preset '14b' needs local files: set it" in err and "Traceback" not in err, err


def test_a_checkpoint_is_sampled_at_the_window_it_was_trained_at_not_at_a_later_resumes(tmp_path, capsys):
    """A resume under another data window rewrites the run's config.yaml: the run's earlier checkpoints were scored
    at the new window (their export at their own). The window a checkpoint's adapters record decides now."""
    from data_utils import make_shards

    from one4d_train.model.adapters import data_window

    shards = make_shards(tmp_path, num_clips=1, frames=5, height=32, width=64)
    run, cfg, state = _run(tmp_path, f"data.val_shards={shards}", *EVAL)  # the run's config.yaml: 32 x 64
    trained = replace(cfg.data, width=48)
    ckpt = _checkpoint(run, cfg, state, crc=True, window=data_window(trained))
    assert cli(["eval", f"checkpoint={ckpt}"]) == 0, capsys.readouterr().err
    settings = json.loads(_metrics(run, ckpt).read_text())["settings"]
    assert (settings["height"], settings["width"]) == (32, 48), settings
    assert cli(["eval", f"checkpoint={ckpt}", "data.width=64"]) == 0  # asked for on the command line: taken
    assert json.loads(_metrics(run, ckpt).read_text())["settings"]["width"] == 64


def test_an_export_is_sampled_in_the_precision_it_was_trained_in(tmp_path, capsys):
    """An export of an fp32 run was sampled in the default bf16 (another Abs Rel from the same adapters), and
    metrics.json said fp32 (the encoders' precision on the CPU). adapter_config.json records the precision now,
    which the evaluation takes; the settings name the DiT's precision, and the encoders' where it differs."""
    from data_utils import make_shards

    from one4d_train.model.adapters import data_window

    run, cfg, state = _run(tmp_path, "data.num_frames=5", "data.height=32", "data.width=48")  # TINY: fp32
    export = tmp_path / "export"
    config = export_adapters(state, cfg.model, str(export), window=data_window(cfg.data))
    assert (config["compute_dtype"], config["base_matmul"]) == ("fp32", "bf16")
    shards = make_shards(tmp_path, num_clips=1, frames=5, height=32, width=64)
    common = [f"checkpoint={export}", f"data.val_shards={shards}", "eval.num_samples=1", "eval.steps=1",
              "eval.modes=[video]", "eval.recovery_iters=1", "train.device=cpu"]
    metrics = export / "eval" / dataset_tag(str(shards)) / "metrics.json"
    assert cli(["eval", *common]) == 0, capsys.readouterr().err
    assert json.loads(metrics.read_text())["settings"]["precision"] == "fp32"
    assert cli(["eval", *common, "model.compute_dtype=bf16"]) == 0, capsys.readouterr().err  # asked for: taken
    assert json.loads(metrics.read_text())["settings"]["precision"] == "bf16 (encoders fp32)"
    edited = json.loads((export / "adapter_config.json").read_text()) | {"compute_dtype": "fp16"}
    (export / "adapter_config.json").write_text(json.dumps(edited))
    assert cli(["eval", *common]) == 2
    assert "adapter_config.json: key 'compute_dtype' must be one of ['bf16', 'fp32'], got 'fp16'" in capsys.readouterr().err


def test_an_export_is_sampled_at_the_window_it_was_trained_at_wherever_it_lies(tmp_path, capsys):
    """An export outside its run was sampled at the defaults (81 frames at 352x624; with no word) unless a
    config.yaml happened to lie beside it: the window its adapter_config.json records now decides, and one that
    records none (written before) is named in a warning giving the window used."""
    from data_utils import make_shards

    from one4d_train.model.adapters import data_window

    run, cfg, state = _run(tmp_path, "data.num_frames=5", "data.height=32", "data.width=48")
    export = tmp_path / "elsewhere" / "export"
    export_adapters(state, cfg.model, str(export), window=data_window(cfg.data))
    shards = make_shards(tmp_path, num_clips=1, frames=5, height=32, width=64)
    common = [f"checkpoint={export}", f"data.val_shards={shards}", "eval.num_samples=1", "eval.steps=1",
              "eval.cfg_scale=1", "eval.modes=[video]", "eval.recovery_iters=1", *TINY]
    assert cli(["eval", *common]) == 0, capsys.readouterr().err
    settings = json.loads((export / "eval" / dataset_tag(str(shards)) / "metrics.json").read_text())["settings"]
    assert (settings["num_frames"], settings["height"], settings["width"]) == (5, 32, 48), settings
    assert "records no data window" not in capsys.readouterr().err

    older = tmp_path / "older"
    export_adapters(state, cfg.model, str(older))  # written before exports recorded their window
    assert cli(["eval", *[f"checkpoint={older}" if a.startswith("checkpoint=") else a for a in common]]) == 2
    err = capsys.readouterr().err
    assert (f"{older} records no data window" in err and "num_frames=81 frame_stride=1 height=352 width=624 from "
            "the defaults" in err and "key 'data.num_frames': the window needs 81 frames" in err), err


def test_an_export_scores_the_held_out_samples_its_checkpoint_scores(tmp_path, capsys):
    """The loader's shuffle buffer (data.shuffle_buffer) orders the held-out set, so it picks the samples scored: an
    export recorded the window alone, and its evaluation (at the default buffer) scored other samples than its
    checkpoint's (at the run's), both metrics.json saying the same settings. The export records it, its evaluation
    takes it, and metrics.json's settings hold it (scores made before it was recorded are not scored again)."""
    from data_utils import make_shards

    from one4d_train.model.adapters import data_window
    from one4d_train.train.export_cli import main as export

    shards = make_shards(tmp_path, num_clips=4, frames=5, height=32, width=64, samples_per_shard=1)
    run, cfg, state = _run(tmp_path, f"data.val_shards={shards}", *EVAL, "data.shuffle_buffer=0")
    ckpt = _checkpoint(run, cfg, state, crc=True, window=data_window(cfg.data))
    exported = tmp_path / "elsewhere" / "export"
    assert export([f"checkpoint={ckpt}", f"out={exported}"]) == 0
    assert cli(["eval", f"checkpoint={ckpt}"]) == 0, capsys.readouterr().err
    assert cli(["eval", f"checkpoint={exported}", f"data.val_shards={shards}", *TINY, *EVAL]) == 0, \
        capsys.readouterr().err
    tag = dataset_tag(str(shards))
    scores = [json.loads((where / "eval" / tag / "metrics.json").read_text()) for where in (ckpt, exported)]
    assert [r["sample"] for r in scores[0]["samples"]] == [r["sample"] for r in scores[1]["samples"]], scores
    assert scores[0]["settings"]["shuffle_buffer"] == scores[1]["settings"]["shuffle_buffer"] == 0
    wanted = scoring_settings(cfg, str(shards))
    assert scored(str(ckpt), tag, wanted) == []
    assert scored(str(ckpt), tag, {**wanted, "shuffle_buffer": 16}) == ["shuffle_buffer"]
    metrics = ckpt / "eval" / tag / "metrics.json"
    report = json.loads(metrics.read_text())
    del report["settings"]["shuffle_buffer"]  # as scores made before it was recorded
    metrics.write_text(json.dumps(report))
    assert scored(str(ckpt), tag, wanted) == []


def test_a_checkpoint_or_export_this_user_cannot_write_into_exits_2_naming_eval_out_dir(capsys):
    """A read-only checkpoint or export (another user's) was a PermissionError traceback where <checkpoint>/eval was
    made: it is refused before the model is built, naming the folder and eval.out_dir."""
    import shutil
    import tempfile

    from data_utils import make_shards
    from test_export_cli import as_another_user

    shared = Path(tempfile.mkdtemp(prefix="one4d-test-"))
    try:
        shared.chmod(0o755)  # every user may enter it; the checkpoint and export in it are this user's alone to write
        shards = make_shards(shared, num_clips=1, frames=5, height=32, width=64)
        run, cfg, state = _run(shared, f"data.val_shards={shards}", *EVAL)
        ckpt = _checkpoint(run, cfg, state)
        exported = shared / "export"
        export_adapters(state, cfg.model, str(exported))
        for target in (ckpt, exported):
            with as_another_user():
                code = cli(["eval", f"checkpoint={target}", f"data.val_shards={shards}", *TINY, *EVAL])
            err = capsys.readouterr().err
            assert code == 2 and f"key 'eval.out_dir': not set, and {target} is not writable by this user" in err, err
            assert f"name a folder of yours for them with eval.out_dir=DIR" in err and "Traceback" not in err, err
            assert not (target / "eval").exists()
    finally:
        shutil.rmtree(shared)
