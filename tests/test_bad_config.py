"""`one4d train` refuses a bad config before any process group starts: exit 2 and a message naming the key (and the
file or command line that set it). Values: non-finite numbers. Files: shards, resume checkpoint, model files.
Imports: train.task. Everything runs in-process through `main` (which returns 2 before `distributed.setup`), except
one launch of the real CLI for the exit code."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch.distributed as dist

from data_utils import make_shards, make_shards_of_lengths
from launch_utils import ROOT, _env, mlflow_run
from one4d_train.config import ConfigError, load_config
from one4d_train.configtools import in_range
from one4d_train.train import checkpoint as ckpt

DEMO = os.path.join(ROOT, "configs", "experiment", "demo.yaml")
MODEL_1_3B = "/models/Wan2.1-Fun-V1.1-1.3B-InP"


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("bad_config_data"), num_clips=2, frames=9, height=32, width=64,
                       samples_per_shard=1)


def args(shards, tmp_path, *extra):
    return [f"config={DEMO}", f"data.shards={shards}", f"run_dir={tmp_path / 'run'}", *extra]


def refused(capsys, argv) -> str:
    """Run `one4d train` in-process; it must exit 2 before starting a process group. Returns its stderr."""
    from one4d_train.train.main import main

    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert not dist.is_initialized()
    assert "Traceback" not in err
    return err


def preflight_config(argv):
    from one4d_train.train.config import preflight

    return load_config(argv, checks=preflight)


def fake_checkpoint(path, world_size=2, complete=True):
    os.makedirs(os.path.join(path, "ds"))
    with open(os.path.join(path, "ds", "model.pt"), "wb") as f:
        f.write(b"x" * 100)
    if complete:
        marker = {"step": 4, "world_size": world_size, "files": ckpt._listing(path)}
        ckpt.write_atomic(os.path.join(path, ckpt.MARKER), json.dumps(marker))
    return path


def test_the_demo_config_passes_every_check(shards, tmp_path):
    cfg = preflight_config(args(shards, tmp_path))
    assert cfg.data.shards == str(shards)


# ---- data -------------------------------------------------------------------------------------------------------

def test_shards_not_set(capsys, tmp_path):
    err = refused(capsys, [f"config={DEMO}", f"run_dir={tmp_path}"])
    assert "key 'data.shards'" in err and "one4d shard" in err
    err = refused(capsys, [f"config={DEMO}", f"run_dir={tmp_path}", "data.shards="])
    assert "command line: key 'data.shards'" in err


def test_shards_path_that_does_not_exist_is_named_itself(capsys, tmp_path):
    missing = tmp_path / "nonexist"
    err = refused(capsys, [f"config={DEMO}", f"run_dir={tmp_path}", f"data.shards={missing}"])
    assert f"command line: key 'data.shards': {missing}: no such directory" in err
    assert str(tmp_path / "index.json") not in err  # not the index of the folder above
    pattern = tmp_path / "gone" / "shard-{000000..000003}.tar"
    err = refused(capsys, [f"config={DEMO}", f"run_dir={tmp_path}", f"data.shards={pattern}"])
    assert f"key 'data.shards': {tmp_path / 'gone'}: no such directory" in err


def test_shards_folder_without_index_or_with_a_missing_shard(capsys, shards, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    err = refused(capsys, args(empty, tmp_path))
    assert "key 'data.shards'" in err and str(empty / "index.json") in err
    assert "one4d shard MANIFEST OUT" in err  # a folder of clips, or an empty one: what makes shards
    manifest = empty / "manifest.jsonl"
    manifest.write_text("{}\n")
    err = refused(capsys, args(manifest, tmp_path))
    assert f"key 'data.shards': {manifest} is a file, not a shard directory" in err and "one4d shard" in err
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in os.listdir(shards):
        if name != "shard-000001.tar":
            os.symlink(shards / name, broken / name)
    err = refused(capsys, args(broken, tmp_path))
    assert "key 'data.shards'" in err and str(broken / "shard-000001.tar") in err


@pytest.mark.parametrize("text", ["[" * 100000, None])
def test_an_index_that_does_not_parse_or_has_wrong_typed_statistics_is_refused_naming_it(capsys, shards, tmp_path,
                                                                                          text):
    """A RecursionError from the JSON parser and a TypeError from the frame window's check, after the start-up."""
    bad = tmp_path / "bad"
    shutil.copytree(shards, bad)
    index = json.loads((bad / "index.json").read_text())
    index["statistics"]["frames"]["max"] = "17"
    (bad / "index.json").write_text(text or json.dumps(index))
    err = refused(capsys, args(bad, tmp_path))
    why = "not valid JSON: nested too deeply" if text else "statistics.frames.max must be a non-negative integer"
    assert f"command line: key 'data.shards': {bad / 'index.json'}: {why}" in err


def test_a_window_longer_than_every_clip_is_refused_naming_the_key(shards, tmp_path):
    """9-frame clips: 9 frames 1 apart fit; 5 frames 3 apart (a span of 13) fit none, and every sample would be
    skipped until the loader gives up, after the start-up, with a traceback."""
    assert preflight_config(args(shards, tmp_path, "data.num_frames=9")).data.num_frames == 9
    with pytest.raises(ConfigError) as err:
        preflight_config(args(shards, tmp_path, "data.num_frames=5", "data.frame_stride=3"))
    assert "command line: key 'data.num_frames': the window needs 13 frames" in str(err.value)
    assert f"the longest clip of {shards} has 9" in str(err.value)


def test_shards_without_any_valid_geometry_are_refused_naming_the_key(shards, tmp_path):
    """Shards written before `one4d shard` rejected rows without valid geometry (negative or all-zero depth, a mask
    false everywhere) record statistics.valid_fraction 0: training ran with an xyz loss of 0 without a word."""
    none = tmp_path / "none_valid"
    shutil.copytree(shards, none)
    index = json.loads((none / "index.json").read_text())
    index["statistics"]["valid_fraction"] = 0.0
    (none / "index.json").write_text(json.dumps(index))
    with pytest.raises(ConfigError) as err:
        preflight_config(args(none, tmp_path))
    assert (f"command line: key 'data.shards': {none}: no pixel of any clip has valid geometry (index.json "
            "statistics.valid_fraction is 0") in str(err.value) and "re-shard" in str(err.value)


def test_clips_shorter_than_the_window_are_counted_in_a_warning(tmp_path):
    """Clips shorter than the window (but not all of them) are skipped at every epoch: the trainer's start-up warning
    says how many (index.json counts the clips of each length; an older index has only the shortest)."""
    from data_pipeline.shard_index import read_index
    from one4d_train.train.one4d_task import short_clip_warning

    shards = make_shards_of_lengths(tmp_path, (9, 5, 9, 5))
    cfg = preflight_config(args(shards, tmp_path, "data.num_frames=9"))  # the longest clips fit: no refusal
    stats = read_index(shards)["statistics"]
    assert short_clip_warning(cfg.data, str(shards), stats) == (
        f"2 of 4 clips of {shards} are shorter than the frame window of 9 frames (data.num_frames=9, "
        "data.frame_stride=1): they are skipped at every epoch (logged once per reader slot, and counted as shorter "
        "than the window); lower data.num_frames or data.frame_stride to train on them")
    del stats["clip_frames"]
    assert short_clip_warning(cfg.data, str(shards), stats).startswith(
        f"some clips of {shards} (the shortest has 5 frames; this index.json does not count them by length) are "
        "shorter than the frame window of 9 frames")
    assert short_clip_warning(dataclasses.replace(cfg.data, num_frames=5), str(shards), stats) is None


def test_clips_smaller_than_the_window_are_counted_in_a_warning(tmp_path):
    """A window larger than the clips trained on them upsampled, without a word: the start-up warning counts them
    from index.json's resolutions and gives the largest factor."""
    from data_pipeline.shard_index import read_index
    from one4d_train.train.one4d_task import upsampled_clip_warning

    shards = make_shards_of_lengths(tmp_path, (9, 9))
    stats = read_index(shards)["statistics"]
    (size,) = stats["resolutions"]
    h, w = map(int, size.split("x"))
    cfg = preflight_config(args(shards, tmp_path, "data.num_frames=9"))
    fits = dataclasses.replace(cfg.data, height=h // 16 * 16, width=w // 16 * 16)
    assert upsampled_clip_warning(fits, str(shards), stats) is None
    big = dataclasses.replace(cfg.data, height=2 * h, width=w)
    assert upsampled_clip_warning(big, str(shards), stats) == (
        f"2 of 2 clips of {shards} are smaller than the window {2 * h}x{w} (data.height x data.width): each is "
        f"upsampled to cover it, by up to 2.00x ({size}), which blurs its frames and pointmaps; lower "
        "data.height/data.width (multiples of 16) or shard larger clips")


def test_shard_files_whose_size_differs_from_the_index_are_named_in_a_warning(tmp_path):
    """A shard cut short or rewritten after its index trained on without a word (its unreadable samples skipped
    and counted, one by one, as they came): the start-up warning names it, a size check costing nothing."""
    from data_pipeline.shard_index import read_index
    from one4d_train.train.one4d_task import resized_shard_warning

    shards = make_shards_of_lengths(tmp_path, (9, 9))
    index = read_index(shards)
    assert resized_shard_warning(str(shards), index) is None
    first = index["shards"][0]
    path = shards / first["name"]
    path.write_bytes(path.read_bytes()[:2048])
    assert resized_shard_warning(str(shards), index) == (
        f"1 shard file(s) of {shards} differ in size from index.json, damaged or rewritten since: {first['name']} "
        f"(2048 bytes, index.json says {first['bytes']}); their unreadable samples are skipped and counted "
        f"(`one4d inspect-shards {shards}` names them; `one4d shard` run again rewrites them)")


def test_stored_text_embeddings_of_another_width_are_refused_naming_the_key(capsys, tmp_path):
    """The manifest's embeddings are UMT5-XXL's (4096 wide); the tiny preset's text input is 64 wide: every batch
    holding one would fail at its first step. The index's statistics name the widths, so it is refused before."""
    make_shards(tmp_path, num_clips=2, samples_per_shard=1, text_embeddings=(1,))
    err = refused(capsys, args(tmp_path / "shards", tmp_path))
    assert (f"key 'data.shards': {tmp_path / 'shards'} stores text embeddings 4096 wide (1 samples), the backbone "
            "of model.preset=tiny takes 64: use a preset whose text input is 4096 wide, or shards without stored "
            "embeddings (or with 64-wide ones, as `one4d encode-latents` under model.preset=tiny stores them)") in err
    err = refused(capsys, args(tmp_path / "shards", tmp_path, f"data.val_shards={tmp_path / 'shards'}",
                               f"data.shards={make_shards(tmp_path / 'plain', num_clips=2)}", "eval.every=5"))
    assert "key 'data.val_shards'" in err and "4096 wide" in err and "key 'data.shards'" not in err


@pytest.mark.parametrize("every", ["5", "0"])
def test_held_out_shards_of_in_training_evaluation_are_checked_too(capsys, shards, tmp_path, every):
    """Also without in-training evaluation (eval.every=0): the evaluation after the run reads the run's config, and a
    typo there surfaced only in that job, once the training job was over."""
    err = refused(capsys, args(shards, tmp_path, f"data.val_shards={tmp_path / 'val'}", f"eval.every={every}"))
    assert f"key 'data.val_shards': {tmp_path / 'val'}: no such directory" in err
    err = refused(capsys, args(shards, tmp_path, f"eval.dataset=sintel:{tmp_path / 'sintel'}", f"eval.every={every}"))
    assert "key 'eval.dataset'" in err and str(tmp_path / "sintel") in err


# ---- resume -----------------------------------------------------------------------------------------------------

def test_resume_path_must_be_a_complete_checkpoint(capsys, shards, tmp_path):
    err = refused(capsys, args(shards, tmp_path, "resume=/nonexistent"))
    assert "command line: key 'resume': /nonexistent: no such checkpoint directory" in err
    err = refused(capsys, args(shards, tmp_path, "resume=Auto"))
    assert "key 'resume'" in err and "auto" in err
    tmp_ckpt = fake_checkpoint(str(tmp_path / "run" / "checkpoints" / ".tmp-step-00000004"), complete=False)
    err = refused(capsys, args(shards, tmp_path, f"resume={tmp_ckpt}"))
    assert f"key 'resume': {tmp_ckpt}: not a complete checkpoint: no COMPLETE marker" in err, err
    cut = fake_checkpoint(str(tmp_path / "run" / "checkpoints" / "step-00000008"))
    with open(os.path.join(cut, "ds", "model.pt"), "wb") as f:  # the file was named nowhere
        f.write(b"x" * 10)
    err = refused(capsys, args(shards, tmp_path, f"resume={cut}"))
    assert f"key 'resume': {cut}: not a complete checkpoint: {cut}/ds/model.pt is 10 bytes, COMPLETE says 100" \
           in err, err


def test_a_run_directory_whose_only_checkpoint_is_damaged_is_refused_before_the_start(capsys, shards, tmp_path):
    """It started afresh from step 0 (exit 0), as if the damaged checkpoint were a save that never finished; the
    trainer now refuses it, and so do the checks before the process group (not after the model is built)."""
    cut = fake_checkpoint(str(tmp_path / "run" / "checkpoints" / "step-00000004"), world_size=1)
    with open(os.path.join(cut, "ds", "model.pt"), "wb") as f:
        f.write(b"x" * 10)
    err = refused(capsys, args(shards, tmp_path))
    assert (f"key 'resume': no intact checkpoint left in {tmp_path / 'run' / 'checkpoints'}, only damaged step folders "
            f"(step-00000004: {cut}/ds/model.pt is 10 bytes, COMPLETE says 100 (cut short or changed))") in err, err


def test_resume_from_a_checkpoint_of_another_world_size(capsys, shards, tmp_path):
    """This process is a job of 1 rank; the checkpoints were written by 2."""
    done = fake_checkpoint(str(tmp_path / "run" / "checkpoints" / ckpt.step_name(4)))
    err = refused(capsys, args(shards, tmp_path, f"resume={done}"))
    assert "key 'resume'" in err and "written by 2 ranks" in err and "1 rank" in err
    err = refused(capsys, args(shards, tmp_path))  # resume=auto finds the same checkpoint
    assert "key 'resume'" in err and "written by 2 ranks" in err
    assert preflight_config(args(shards, tmp_path, "resume=never")).resume == "never"


def test_a_damaged_train_state_is_refused_by_path_and_left_to_the_trainers_fall_back_by_auto(capsys, shards, tmp_path):
    """The checks before the process group read the resume checkpoint's train state: a file that fails its CRC-32
    exits 2 naming it with resume=PATH; with resume=auto the trainer sets the checkpoint aside (no exit here)."""
    done = fake_checkpoint(str(tmp_path / "run" / "checkpoints" / ckpt.step_name(4)), world_size=1)
    os.makedirs(os.path.join(done, "train_state"))
    state = os.path.join(done, "train_state", "rank-00000.json")
    with open(state, "w") as f:
        json.dump({k: 0 for k in ckpt.STATE_KEYS}, f)
    files = ckpt._listing(done)
    marker = {"step": 4, "world_size": 1, "files": files,
              "crc32": ckpt.checksums(done, [os.path.join(done, rel) for rel in files])}
    ckpt.write_atomic(os.path.join(done, ckpt.MARKER), json.dumps(marker))
    with open(state, "r+") as f:
        f.write('{"Xtep"')  # same size, still JSON
    err = refused(capsys, args(shards, tmp_path, f"resume={done}"))
    assert f"key 'resume': {done}: {state}: its bytes changed after the save" in err, err
    assert preflight_config(args(shards, tmp_path)).resume == "auto"


# ---- the run directory ------------------------------------------------------------------------------------------

def test_a_run_directory_this_user_cannot_write_is_refused_by_key(capsys, shards, tmp_path, monkeypatch):
    """A read-only checkpoints/ (another user's run) failed with a PermissionError traceback at `latest`'s write.
    (Root may write anywhere, so the permission is what os.access reports, made to say no here.)"""
    from one4d_train.train import config as train_config

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    real = os.access
    monkeypatch.setattr(train_config.os, "access",
                        lambda path, mode: False if str(path).endswith("checkpoints") else real(path, mode))
    err = refused(capsys, args(shards, tmp_path))
    assert f"key 'run_dir': {run / 'checkpoints'} is not writable by this user, and the run writes into it" in err, err


@pytest.mark.parametrize("name,held", [("q?b", "?"), ("h#b", "#"), ("p%41b", "%41")])
def test_a_run_dir_the_default_stores_address_would_misread_is_refused(capsys, shards, tmp_path, name, held):
    """sqlite:///RUN_DIR/mlflow.db is a URL: with '?' the records went to a file 'q' beside the run directory and
    the run exited 0; with '#' the artifacts went to another folder; '%41' failed after the model was built. A
    tracking.uri of its own is unaffected, and so is a '%' that escapes nothing (runs/job-%j)."""
    run = tmp_path / name
    err = refused(capsys, [*args(shards, tmp_path), f"run_dir={run}"])
    assert f"key 'run_dir': {run} holds {held}, which the address of the run's MLflow store" in err, err
    assert not run.exists() and not (tmp_path / name[0]).exists()
    from one4d_train.config import load_config
    from one4d_train.train.config import run_dir_problems

    for ok, uri in ((run, f"sqlite:///{tmp_path / 'store.db'}"), (tmp_path / "job-%j", "")):
        cfg = load_config([f"config={DEMO}", f"run_dir={ok}", f"tracking.uri={uri}"])
        assert run_dir_problems(cfg.run_dir, cfg.tracking) == []


def test_a_damaged_run_directory_is_refused_by_key_before_any_process_group(capsys, shards, tmp_path):
    """run_dir/checkpoints as a file failed at the first checkpoint, after the steps since the start (FileExistsError);
    a damaged MLflow store failed when rank 0 opened it (sqlite3.DatabaseError), after the model was built."""
    from one4d_train.train.tracking import build_tracker

    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoints").write_text("not a folder")
    err = refused(capsys, args(shards, tmp_path))
    assert f"key 'run_dir': {run / 'checkpoints'} is a file, not a folder" in err, err
    (run / "checkpoints").unlink()
    tracker = build_tracker(load_config([f"run_dir={run}", "tracking.system_metrics=false"]), is_main=True)
    tracker.start(None, {"seed": 0})  # a real MLflow store
    tracker.end()
    db = run / "mlflow.db"
    store = db.read_bytes()
    for damaged, why in ((store[: len(store) // 2], "cut short"), (b"\x5a" * 100 + store[100:], "not an SQLite")):
        db.write_bytes(damaged)
        err = refused(capsys, args(shards, tmp_path))
        assert f"key 'run_dir': {db}, the run's MLflow store, cannot be read: " in err and why in err, err
    db.write_bytes(store)
    assert preflight_config(args(shards, tmp_path)).run_dir == str(run)
    # a writer killed mid-transaction leaves a hot journal, which the next writer rolls back: no damage, and a store
    # another process holds locked is no damage either (the header alone is read)
    import sqlite3
    (run / "mlflow.db-journal").write_bytes(b"\xd9\xd5\x05\xf9\x20\xa1\x63\xd7" + bytes(504))
    con = sqlite3.connect(db)
    con.execute("BEGIN EXCLUSIVE")
    try:
        assert preflight_config(args(shards, tmp_path)).run_dir == str(run)
    finally:
        con.rollback()
        con.close()


def test_a_garbage_run_config_is_named_where_another_model_is_refused(tmp_path):
    """The refusal of a resume onto another model compares model.* with the run's config.yaml: binary garbage there
    raised UnicodeDecodeError instead of the refusal."""
    from one4d_train.train.trainer import other_model_message

    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "config.yaml").write_bytes(bytes(range(128, 256)) * 4)
    message = other_model_message(str(tmp_path / "checkpoints" / ckpt.step_name(4)), ["w: checkpoint [2], this "
                                  "model [4]"], load_config([f"run_dir={tmp_path}"]))
    assert message.startswith("key 'resume': ") and "1 trainable parameters differ (w: checkpoint [2]" in message
    assert f"{tmp_path / 'config.yaml'} cannot be read (UnicodeDecodeError" in message, message


# ---- model and task ---------------------------------------------------------------------------------------------

def test_compute_dtype_must_match_precision(capsys, shards, tmp_path):
    err = refused(capsys, args(shards, tmp_path, "model.compute_dtype=bf16"))
    assert "command line: key 'model.compute_dtype'" in err and "train.precision=fp32" in err


def test_task_that_cannot_be_imported(capsys, shards, tmp_path):
    err = refused(capsys, args(shards, tmp_path, "train.task=foo:Bar"))
    assert "command line: key 'train.task': cannot import module 'foo'" in err
    err = refused(capsys, args(shards, tmp_path, "train.task=one4d_train.train.task:NoSuchTask"))
    assert "key 'train.task'" in err and "NoSuchTask" in err
    # a function, or a class that is no training task: tracebacks once the process group had started
    err = refused(capsys, args(shards, tmp_path, "train.task=os:getcwd"))
    assert "key 'train.task': 'os:getcwd' is not a class" in err
    err = refused(capsys, args(shards, tmp_path, "train.task=one4d_train.config:One4DConfig"))
    assert "key 'train.task': 'one4d_train.config:One4DConfig' is not a training task: it has no build_model" in err
    err = refused(capsys, args(shards, tmp_path, "train.task=tests.train_toy_task:ToyTaskWithoutExport"))
    assert "key 'train.export_adapters': the task tests.train_toy_task:ToyTaskWithoutExport has no export method" in err


@pytest.mark.skipif(os.path.exists(MODEL_1_3B), reason="the 1.3B model files exist on this machine")
def test_real_model_config_without_its_files_names_every_missing_one(capsys, shards, tmp_path):
    exp = os.path.join(ROOT, "configs", "experiment", "one4d_1.3b.yaml")
    err = refused(capsys, [f"config={exp}", f"data.shards={shards}", f"run_dir={tmp_path}"])
    source = os.path.join(ROOT, "configs", "model", "wan2.1-fun-1.3b-inp.yaml")
    assert f"{source}: key 'model.checkpoint': {MODEL_1_3B}: not found" in err
    for key in ("vae", "text_encoder", "tokenizer", "image_encoder"):
        assert f"key 'model.{key}': {MODEL_1_3B}/" in err, key


def test_model_file_set_on_the_command_line(capsys, shards, tmp_path):
    err = refused(capsys, args(shards, tmp_path, f"model.vae={tmp_path / 'vae'}"))
    assert f"command line: key 'model.vae': {tmp_path / 'vae'}: not found" in err


def test_a_vae_folder_without_its_weights_file_is_refused_by_key(capsys, shards, tmp_path):
    """diffusers' own error came only when the VAE was loaded, after the process group had started."""
    from one4d_train.model.vae import tiny_wan_vae

    tiny_wan_vae(0).save_pretrained(tmp_path / "vae")
    assert preflight_config(args(shards, tmp_path, f"model.vae={tmp_path / 'vae'}")).model.vae == str(tmp_path / "vae")
    (tmp_path / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    err = refused(capsys, args(shards, tmp_path, f"model.vae={tmp_path / 'vae'}"))
    assert (f"command line: key 'model.vae': {tmp_path / 'vae'}: no weights file (diffusion_pytorch_model.safetensors "
            "or diffusion_pytorch_model.bin) beside its config.json") in err, err


def test_backbone_weights_that_do_not_fit_are_refused_before_any_process_group(capsys, shards, tmp_path):
    """model.checkpoint is read against the configured backbone from the files' headers: text-to-video weights
    (16 input channels, no image cross-attention) and a truncated shard are refused by key, the matching file passes."""
    from safetensors.torch import save_file

    from one4d_train.model.one4d import random_base_state
    from one4d_train.model.presets import wan_config

    good = tmp_path / "dit.safetensors"
    save_file(random_base_state(wan_config("tiny"), 0), str(good))
    assert preflight_config(args(shards, tmp_path, f"model.checkpoint={good}")).model.checkpoint == str(good)
    t2v = tmp_path / "t2v.safetensors"
    save_file(random_base_state(wan_config("tiny", in_dim=16, has_image_input=False), 0), str(t2v))
    err = refused(capsys, args(shards, tmp_path, f"model.checkpoint={t2v}"))
    assert f"command line: key 'model.checkpoint': backbone checkpoint {t2v} does not match the model" in err
    assert "missing keys (23): blocks.0.cross_attn.k_img.bias" in err
    assert "16 input channels, the model's 36: a text-to-video checkpoint" in err
    assert "no CLIP image cross-attention (img_emb, k_img/v_img), the model has (model.has_image_input)" in err
    err = refused(capsys, args(shards, tmp_path, f"model.checkpoint={good}", "model.has_image_input=false"))
    assert "unexpected keys (23)" in err and "the checkpoint has CLIP image cross-attention" in err
    assert "model.has_image_input=true for it" in err
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-64])
    err = refused(capsys, args(shards, tmp_path, f"model.checkpoint={truncated}"))
    assert f"key 'model.checkpoint': {truncated}: not a readable safetensors file" in err


def test_encoder_files_that_do_not_fit_the_backbone_are_refused_before_any_process_group(capsys, shards, tmp_path):
    """The VAE, text encoder, tokenizer, CLIP and empty-prompt files are read against the backbone from their
    config.json files: each would otherwise fail at the first step, deep in the model (or its tokenizer)."""
    import numpy as np
    from diffusers import AutoencoderKLWan

    from one4d_train.model.image_encoder import tiny_clip_vision
    from one4d_train.model.text_encoder import tiny_tokenizer, tiny_umt5
    from one4d_train.model.vae import tiny_wan_vae

    tiny_wan_vae(0).save_pretrained(tmp_path / "vae")
    tiny_umt5(0, d_model=64).save_pretrained(tmp_path / "umt5")
    tiny_tokenizer().save_pretrained(tmp_path / "tokenizer")
    tiny_clip_vision(0, hidden=32, image_size=224).save_pretrained(tmp_path / "clip")
    np.save(tmp_path / "empty.npy", np.zeros((3, 64), np.float32))
    good = [f"model.vae={tmp_path / 'vae'}", f"model.text_encoder={tmp_path / 'umt5'}",
            f"model.tokenizer={tmp_path / 'tokenizer'}", f"model.image_encoder={tmp_path / 'clip'}",
            f"model.empty_prompt_embedding={tmp_path / 'empty.npy'}"]
    assert preflight_config(args(shards, tmp_path, *good)).model.vae == str(tmp_path / "vae")
    AutoencoderKLWan(base_dim=8, z_dim=48, latents_mean=[0.0] * 48, latents_std=[1.0] * 48).save_pretrained(
        tmp_path / "vae48")
    tiny_umt5(0, d_model=32).save_pretrained(tmp_path / "umt5_32")
    tiny_clip_vision(0, hidden=48, image_size=224).save_pretrained(tmp_path / "clip_48")
    np.save(tmp_path / "empty_32.npy", np.zeros((3, 32), np.float32))
    (tmp_path / "no_tokenizer").mkdir()
    err = refused(capsys, args(shards, tmp_path, f"model.vae={tmp_path / 'vae48'}",
                               f"model.text_encoder={tmp_path / 'umt5_32'}",
                               f"model.tokenizer={tmp_path / 'no_tokenizer'}",
                               f"model.image_encoder={tmp_path / 'umt5'}",
                               f"model.empty_prompt_embedding={tmp_path / 'empty_32.npy'}"))
    assert f"key 'model.vae': {tmp_path / 'vae48'}: AutoencoderKLWan with 48 latent channels, not the Wan2.1 VAE" in err
    assert f"key 'model.text_encoder': {tmp_path / 'umt5_32'}: umt5 of width 32, the backbone's text input is 64" in err
    assert f"key 'model.tokenizer': {tmp_path / 'no_tokenizer'}: no tokenizer.json or spiece.model" in err
    assert f"key 'model.image_encoder': {tmp_path / 'umt5'}: a model of type umt5, not CLIP" in err
    assert f"key 'model.empty_prompt_embedding': {tmp_path / 'empty_32.npy'}: shape (3, 32), need [tokens, 64]" in err
    err = refused(capsys, args(shards, tmp_path, f"model.image_encoder={tmp_path / 'clip_48'}",
                               f"model.text_encoder={tmp_path / 'umt5' / 'model.safetensors'}"))
    assert (f"key 'model.image_encoder': {tmp_path / 'clip_48'}: CLIP of width 48, the backbone's image input is 32"
            in err)
    assert f"key 'model.text_encoder': {tmp_path / 'umt5' / 'model.safetensors'}: not a folder" in err
    for folder in ("umt5", "clip"):  # a truncated download: safetensors' own error names no file
        weights = tmp_path / folder / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-64])
    err = refused(capsys, args(shards, tmp_path, f"model.text_encoder={tmp_path / 'umt5'}",
                               f"model.tokenizer={tmp_path / 'tokenizer'}", f"model.image_encoder={tmp_path / 'clip'}"))
    for folder, key in (("umt5", "text_encoder"), ("clip", "image_encoder")):
        assert (f"key 'model.{key}': {tmp_path / folder / 'model.safetensors'}: not a readable safetensors file "
                "(truncated or damaged" in err), key
    import torch  # VAE weight files: read from their headers, not loaded
    from safetensors.torch import load_file, save_file
    from one4d_train.model.vae import diffusers_to_official_key

    state = load_file(tmp_path / "vae48" / "diffusion_pytorch_model.safetensors")
    torch.save({diffusers_to_official_key(k): v for k, v in state.items()}, tmp_path / "vae48.pth")
    save_file({"patch_embedding.weight": torch.zeros(2)}, tmp_path / "dit.safetensors")
    err = refused(capsys, args(shards, tmp_path, f"model.vae={tmp_path / 'vae48.pth'}"))
    assert f"key 'model.vae': {tmp_path / 'vae48.pth'}: a VAE of 48 latent channels, where the Wan2.1 VAE" in err
    err = refused(capsys, args(shards, tmp_path, f"model.vae={tmp_path / 'dit.safetensors'}"))
    assert f"key 'model.vae': {tmp_path / 'dit.safetensors'}: holds no Wan VAE weights" in err
    from transformers import T5Config, T5EncoderModel  # T5 (one relative attention bias) where UMT5 is expected
    T5EncoderModel(T5Config(vocab_size=64, d_model=64, d_kv=8, d_ff=128, num_layers=2, num_heads=4)).save_pretrained(
        tmp_path / "t5")
    err = refused(capsys, args(shards, tmp_path, f"model.text_encoder={tmp_path / 't5'}"))
    assert f"key 'model.text_encoder': {tmp_path / 't5'}: a model of type t5, not UMT5" in err


def test_a_tracking_uri_mlflow_has_no_store_for_is_refused_before_the_run_directory_is_locked(capsys, shards,
                                                                                               tmp_path):
    err = refused(capsys, args(shards, tmp_path, "tracking.uri=ftp://x"))
    assert "command line: key 'tracking.uri': 'ftp://x': MLflow has no tracking store for scheme 'ftp'" in err
    assert not (tmp_path / "run").exists()
    # only the commands that open the store check it: a run's config still loads to be exported or printed
    assert load_config(args(shards, tmp_path, "tracking.uri=ftp://x")).tracking.uri == "ftp://x"


# ---- values -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("item", ["optim.lr=nan", "optim.grad_clip=nan", "optim.lr=inf", "optim.weight_decay=nan",
                                  "flow.logit_mean=nan", "model.umc.p_image=nan", "model.lora.alpha=inf",
                                  "data.pointmap_percentiles=[2.0,nan]", "eval.cfg_scale=nan"])
def test_non_finite_numbers_are_refused(item):
    key = item.split("=")[0]
    with pytest.raises(ConfigError, match=rf"command line: key '{key}': must be a finite number"):
        load_config([item])


def test_infinity_where_it_means_no_limit():
    """eval.depth_cap=inf: no cap (the evaluation's metrics and readers take it as such); NaN is refused there too."""
    assert load_config(["eval.depth_cap=inf"]).eval.depth_cap == float("inf")
    for item in ("eval.depth_cap=nan", "eval.depth_cap=-inf"):
        with pytest.raises(ConfigError, match=r"key 'eval.depth_cap': must be a number \(inf allowed\)"):
            load_config([item])


def test_in_range_refuses_non_finite_values():
    assert in_range(float("nan"), 0.0, None, "lr")
    assert in_range(float("inf"), 0.0, None, "lr")
    assert in_range(float("-inf"), None, 1.0, "lr")
    assert in_range(float("nan"), None, None, "lr")
    assert not in_range(0.5, 0.0, 1.0, "lr") and not in_range(3, 1, None, "steps")


def test_every_problem_of_the_checks_is_reported(capsys, tmp_path):
    err = refused(capsys, [f"config={DEMO}", f"run_dir={tmp_path}", "resume=/nonexistent", "train.task=foo:Bar"])
    assert "key 'resume'" in err and "key 'train.task'" in err
    assert all(line.startswith("config error: ") for line in err.strip().splitlines())


# ---- failures after the start ----------------------------------------------------------------------------------

def test_a_crash_ends_the_mlflow_run_as_failed(tmp_path, capsys):
    from one4d_train.train.main import report_failure
    from one4d_train.train.tracking import build_tracker

    cfg = load_config([f"run_dir={tmp_path}", "tracking.system_metrics=false"])
    tracker = build_tracker(cfg, is_main=True)
    tracker.start(None, {"seed": 0})
    try:
        raise RuntimeError("boom in step 3")
    except RuntimeError as exc:
        code = report_failure(exc, tracker)
    assert code == 1
    assert "boom in step 3" in capsys.readouterr().err
    _, run = mlflow_run(tmp_path)
    assert run.info.status == "FAILED"


def test_a_late_config_error_still_exits_2(tmp_path, capsys):
    from one4d_train.train.main import report_failure
    from one4d_train.train.tracking import NullTracker

    try:
        raise ConfigError("key 'x': bad")
    except ConfigError as exc:
        assert report_failure(exc, NullTracker()) == 2
    assert "key 'x': bad" in capsys.readouterr().err


def test_a_damaged_checkpoint_file_found_late_exits_2_naming_it(capsys):
    from one4d_train.train.main import report_failure
    from one4d_train.train.tracking import NullTracker

    try:
        raise ckpt.CheckpointDamaged("/x/ds/zero_pp_rank_1_mp_rank_00_optim_states.pt: cannot be read")
    except ckpt.CheckpointDamaged as exc:
        assert report_failure(exc, NullTracker()) == 2
    err = capsys.readouterr().err
    assert err == "checkpoint error: /x/ds/zero_pp_rank_1_mp_rank_00_optim_states.pt: cannot be read\n", err


def test_cli_exit_code_for_a_bad_config(tmp_path):
    """The real entry point, as srun or torchrun start it: exit 2 before DeepSpeed or a process group."""
    run_dir = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "one4d_train.cli", "train", f"config={DEMO}",
                        f"data.shards={tmp_path / 'nonexist'}", f"run_dir={run_dir}"],
                       cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    assert f"key 'data.shards': {tmp_path / 'nonexist'}: no such directory" in r.stderr
    assert "Traceback" not in r.stderr and not run_dir.exists()


@pytest.mark.parametrize("item", ["eval.num_samples=0", "eval.modes=[]", "eval.modes=[video,video]",
                                  "eval.depth_cap=-1", "eval.recovery_lr=-1", "eval.smooth_rot=-1",
                                  "eval.benchmark_start=-3", "eval.fps=0", "eval.cfg_scale=-2", "eval.cfg_scale=nan",
                                  "eval.seed=-1", "eval.seed=99999999999999999999999"])
def test_evaluation_values_that_would_fail_or_score_nothing_are_refused(item):
    """Each of these evaluated nothing (and marked the checkpoint scored), scored NaN, read the wrong frames, or
    failed with a traceback after the model was built and the first modes were sampled."""
    key = item.split("=")[0]
    with pytest.raises(ConfigError, match=rf"command line: key '{key}': "):
        load_config([f"config={DEMO}", item])


@pytest.mark.parametrize("item", ["data.height=0", "data.width=0", "data.height=-16", "data.width=-32"])
def test_clip_size_must_be_positive(item):
    """0 passed the multiple-of-16 check and failed in the VAE's first convolution with a traceback."""
    with pytest.raises(ConfigError, match=r"command line.*: key 'data.height': height and width must be positive"):
        load_config([item])


def test_the_train_help_example_passes_every_check(shards, tmp_path, capsys):
    """`one4d train --help`'s first example, on shards like the demo's: it named no shards, which every run needs."""
    from one4d_train.train.main import main

    assert main(["--help"]) == 0
    example = next(line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("one4d train"))
    argv = [a.replace("runs/demo/shards", str(shards)).replace("runs/mine", str(tmp_path / "mine"))
            for a in example.split()[2:]]
    argv = [f"config={os.path.join(ROOT, a[7:])}" if a.startswith("config=") else a for a in argv]
    assert preflight_config(argv).train.steps == 20


def test_an_empty_run_dir_is_refused():
    """It passed, and the trainer failed after the process group had started (os.makedirs(''): a traceback), having
    created mlflow.db in the working directory."""
    with pytest.raises(ConfigError, match=r"command line: key 'run_dir': must name a folder"):
        load_config(["run_dir="])
    assert load_config(["run_dir=."]).run_dir == "."


def test_more_reader_slots_than_shards_is_refused_before_any_process_group(capsys, shards, tmp_path):
    """Exact mode gives each reader slot (ranks x data.num_workers) its own shards: with fewer shards the loader
    failed with a traceback after the model was built and the run's MLflow store created."""
    err = refused(capsys, args(shards, tmp_path, "data.num_workers=3"))
    assert ("key 'data.num_workers': exact mode needs at least one shard per reader slot: 2 shards for 1 ranks x 3 "
            "workers" in err), err
    assert not (tmp_path / "run").exists()


def test_in_training_evaluation_with_nothing_to_evaluate_on_is_refused(capsys, shards, tmp_path):
    """eval.every without data.val_shards or eval.dataset evaluated nothing at every interval, in silence."""
    err = refused(capsys, args(shards, tmp_path, "eval.every=5"))
    assert "key 'eval.every': 5, but there is nothing to evaluate on: set data.val_shards=" in err, err
