"""`one4d export` arguments and the checkpoint it accepts: from_zero parsed strictly, only complete checkpoints
exported. In-process on a checkpoint folder holding a tiny model's real adapters (the ZeRO rebuild itself runs in
test_one4d_training.py on a trained run)."""
from __future__ import annotations

import filecmp
import json
import os
from pathlib import Path
from unittest import mock

import pytest

from one4d_train.model.adapters import export_adapters
from one4d_train.train import checkpoint as ckpt
from one4d_train.train.export_cli import main, parse_bool
from test_dlc import tiny_one4d


def make_checkpoint(run_dir, name=ckpt.step_name(4), complete=True):
    path = os.path.join(run_dir, "checkpoints", name)
    model, _ = tiny_one4d()
    export_adapters(model.trainable_state_dict(), model.cfg, os.path.join(path, "adapters"))
    os.makedirs(os.path.join(path, "ds"))
    with open(os.path.join(path, "ds", "mp_rank_00_model_states.pt"), "wb") as f:
        f.write(b"x" * 64)
    if complete:
        mark_complete(path)
    return path


def mark_complete(path: str) -> None:
    """The COMPLETE marker a save writes over `path`'s files as they are (sizes and CRC-32s)."""
    files = ckpt._listing(path)
    marker = {"step": 4, "world_size": 1, "files": files,
              "crc32": ckpt.checksums(path, [os.path.join(path, rel) for rel in files])}
    ckpt.write_atomic(os.path.join(path, ckpt.MARKER), json.dumps(marker))


def export(capsys, *argv) -> tuple[int, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out + out.err


@pytest.mark.parametrize("text,value", [("true", True), ("True", True), ("YES", True), ("1", True), ("on", True),
                                        ("false", False), ("False", False), ("no", False), ("0", False),
                                        ("off", False)])
def test_booleans_in_the_usual_spellings(text, value):
    assert parse_bool("from_zero", text) is value


@pytest.mark.parametrize("text", ["maybe", "", "2", "tru", "yes please"])
def test_anything_else_is_refused_naming_the_key(capsys, tmp_path, text):
    ckpt_dir = make_checkpoint(tmp_path)
    code, out = export(capsys, f"checkpoint={ckpt_dir}", f"out={tmp_path / 'out'}", f"from_zero={text}")
    assert code == 2 and "from_zero" in out and repr(text) in out
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag", ["from_zero=True", "from_zero=yes", "from_zero=1"])
def test_from_zero_spellings_rebuild_from_the_partitions(capsys, tmp_path, flag):
    """Was: anything but 'true'/'1' copied adapters/ silently. The rebuild needs the run's config.yaml (or the
    checkpoint's own), which this one lacks: the refusal shows the rebuild was taken."""
    ckpt_dir = make_checkpoint(tmp_path)
    code, out = export(capsys, f"checkpoint={ckpt_dir}", f"out={tmp_path / 'out'}", flag)
    assert code == 2 and f"no config.yaml in the checkpoint {ckpt_dir} nor in its run directory" in out, out
    assert not (tmp_path / "out").exists()


def test_complete_checkpoint_is_copied(capsys, tmp_path):
    ckpt_dir = make_checkpoint(tmp_path)
    code, out = export(capsys, f"checkpoint={ckpt_dir}", f"out={tmp_path / 'out'}", "from_zero=false")
    assert code == 0, out
    names = sorted(os.listdir(os.path.join(ckpt_dir, "adapters")))
    assert sorted(os.listdir(tmp_path / "out")) == names
    assert all(filecmp.cmp(tmp_path / "out" / n, os.path.join(ckpt_dir, "adapters", n), shallow=False) for n in names)


def test_incomplete_checkpoints_are_refused(capsys, tmp_path):
    """A checkpoint being written (or abandoned), or one whose files changed after its COMPLETE marker."""
    writing = make_checkpoint(tmp_path, ".tmp-" + ckpt.step_name(8), complete=False)
    code, out = export(capsys, f"checkpoint={writing}", f"out={tmp_path / 'out'}")
    assert code == 2 and f"{writing}: not a complete checkpoint" in out
    code, out = export(capsys, f"checkpoint={writing}", f"out={tmp_path / 'out'}", "from_zero=true")
    assert code == 2 and "not a complete checkpoint" in out
    damaged = make_checkpoint(tmp_path, ckpt.step_name(12))
    with open(os.path.join(damaged, "ds", "mp_rank_00_model_states.pt"), "ab") as f:
        f.write(b"more")
    code, out = export(capsys, f"checkpoint={damaged}", f"out={tmp_path / 'out'}")
    grown = os.path.join(damaged, "ds", "mp_rank_00_model_states.pt")
    assert code == 2 and "not a complete checkpoint" in out and f"{grown} is " in out, out  # the file named
    assert not (tmp_path / "out").exists()


def test_bad_arguments_exit_2(capsys, tmp_path):
    assert export(capsys, f"checkpoint={tmp_path}")[0] == 2
    code, out = export(capsys, f"checkpoint={tmp_path / 'none'}", f"out={tmp_path / 'out'}")
    assert code == 2 and str(tmp_path / "none") in out
    code, out = export(capsys, "checkpoint=x", "out=y", "form_zero=true")
    assert code == 2 and "form_zero" in out


def test_an_out_that_is_a_file_or_empty_exits_2_naming_it(capsys, tmp_path):
    path = make_checkpoint(tmp_path / "run")
    (tmp_path / "taken").write_text("not a folder")
    code, out = export(capsys, f"checkpoint={path}", f"out={tmp_path / 'taken'}")
    assert code == 2 and f"out='{tmp_path / 'taken'}': exists and is not a folder" in out
    code, out = export(capsys, f"checkpoint={path}", "out=")
    assert code == 2 and "out='': empty" in out
    assert (tmp_path / "taken").read_text() == "not a folder"
    for inside in (os.path.join(path, "adapters"), path, os.path.join(path, "exported")):
        # adapters/ itself: a copy onto itself (a traceback); the checkpoint or a folder in it: files in a checkpoint
        # whose COMPLETE marker does not list them
        code, out = export(capsys, f"checkpoint={path}", f"out={inside}")
        assert code == 2 and f"out={inside}: inside the checkpoint {path}" in out, out
    assert ckpt.is_complete(path) and not os.path.exists(os.path.join(path, "exported"))


def test_an_export_never_lands_in_another_checkpoint_nor_among_other_files(capsys, tmp_path):
    """out= was written into whatever folder it named: another checkpoint's adapters/ took this one's weights under
    its own COMPLETE marker (same sizes: still 'complete'), and an earlier export of another design kept its
    io.safetensors beside the new files. An earlier export's files are now replaced, and only those; anything else
    is refused. A symlink to a folder is written through."""
    first, second = make_checkpoint(tmp_path / "run", "step-00000002"), make_checkpoint(tmp_path / "run")
    before = Path(first, "adapters", "lora_rgb.safetensors").read_bytes()
    code, out = export(capsys, f"checkpoint={second}", f"out={os.path.join(first, 'adapters')}")
    assert code == 2 and f"inside the checkpoint {first}" in out, out
    assert Path(first, "adapters", "lora_rgb.safetensors").read_bytes() == before
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    code, out = export(capsys, f"checkpoint={second}", f"out={tmp_path / 'mine'}")
    assert code == 2 and "holds notes.txt, not an earlier export's files alone" in out, out
    assert export(capsys, f"checkpoint={second}", f"out={tmp_path / 'out'}")[0] == 0
    (tmp_path / "out" / "io.safetensors").write_bytes(b"an earlier export's")
    (tmp_path / "out" / "lora_shared.safetensors").write_bytes(b"an ablation design's export")  # was refused
    assert export(capsys, f"checkpoint={second}", f"out={tmp_path / 'out'}")[0] == 0
    assert sorted(os.listdir(tmp_path / "out")) == sorted(os.listdir(os.path.join(second, "adapters")))
    (tmp_path / "out" / ".export-tmp-99").mkdir()  # left by a killed export
    (tmp_path / "link").symlink_to(tmp_path / "out")
    assert export(capsys, f"checkpoint={second}", f"out={tmp_path / 'link'}")[0] == 0
    assert sorted(os.listdir(tmp_path / "out")) == sorted(os.listdir(os.path.join(second, "adapters")))
    # an earlier export evaluated in place: its eval/ scores those adapters; the refusal says so and keeps both
    (tmp_path / "out" / "eval" / "shards-1234").mkdir(parents=True)
    (tmp_path / "out" / "eval" / "shards-1234" / "metrics.json").write_text("{}")
    kept = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir() if p.is_file()}
    code, out = export(capsys, f"checkpoint={first}", f"out={tmp_path / 'out'}")
    assert code == 2 and "is an earlier export that was evaluated" in out and "move that eval/ folder away" in out
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir() if p.is_file()} == kept


@pytest.mark.parametrize("flag", ["from_zero=false", "from_zero=true"])
def test_flipped_bytes_in_the_files_read_exit_2_naming_the_file(capsys, tmp_path, flag):
    """Bytes flipped in adapter weights (same size: the checkpoint still complete) were exported without a word;
    the files an export reads (adapters/, ds/ for a rebuild) must match their CRC-32 in the COMPLETE marker."""
    path = make_checkpoint(tmp_path)
    damaged = os.path.join(path, "adapters" if flag.endswith("false") else "ds",
                           "lora_rgb.safetensors" if flag.endswith("false") else "mp_rank_00_model_states.pt")
    data = bytearray(Path(damaged).read_bytes())
    data[-20] ^= 0x01
    Path(damaged).write_bytes(bytes(data))
    code, out = export(capsys, f"checkpoint={path}", f"out={tmp_path / 'out'}", flag)
    assert code == 2 and f"checkpoint {path} is damaged: {damaged}: its bytes changed after the save" in out, out
    assert not (tmp_path / "out").exists()


def test_a_changed_config_yaml_in_the_checkpoint_is_damage_and_the_run_s_later_config_is_not_read(capsys, tmp_path):
    """The rebuild from the ZeRO partitions reads the adapters' layout (rank, alpha) from a config: the run's
    config.yaml was read first, which a later start in the run directory (resume=never model.lora.rank=4) rewrites,
    and the checkpoint's own config.yaml, whose CRC-32 the marker records, was never verified: an edited alpha (same
    size) exported lora_B scaled wrong, exit 0. The checkpoint's own is read, and verified like ds/."""
    from one4d_train.config import load_config, to_yaml

    path = make_checkpoint(tmp_path, complete=False)
    own = Path(path) / "config.yaml"
    own.write_text(to_yaml(load_config(["model.lora.alpha=8.0"])))
    mark_complete(path)
    (tmp_path / "config.yaml").write_text("model: {lora: {rank: [not a rank]}}\n")  # a later start's; unread
    with mock.patch("deepspeed.utils.zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint",
                    side_effect=RuntimeError("reached the rebuild")):
        with pytest.raises(RuntimeError, match="reached the rebuild"):  # the run's config.yaml would not load
            export(capsys, f"checkpoint={path}", f"out={tmp_path / 'out'}", "from_zero=true")
    own.write_text(own.read_text().replace("alpha: 8.0", "alpha: 4.0"))
    for flag in ("from_zero=true", "from_zero=false"):
        code, out = export(capsys, f"checkpoint={path}", f"out={tmp_path / 'out'}", flag)
        assert code == 2 and f"checkpoint {path} is damaged: {own}: its bytes changed after the save" in out, out
    assert not (tmp_path / "out").exists()


def test_a_second_export_into_a_folder_being_written_is_refused(capsys, tmp_path):
    """Two exports into one out= removed each other's work folders; the one that then failed deleted the other's
    finished export. One export at a time writes into a folder (a lock in it, gone with the export)."""
    import subprocess
    import sys

    from launch_utils import ROOT, _env

    path = make_checkpoint(tmp_path / "run")
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from one4d_train.train.run_lock import hold; "
                               "lock = hold(sys.argv[1]); print('held', flush=True); time.sleep(600)",
                               str(out / ".export.lock")], cwd=ROOT, env=_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        code, text = export(capsys, f"checkpoint={path}", f"out={out}")
        assert code == 2 and f"out={out}: another one4d export is writing into it (pid {holder.pid}" in text, text
    finally:
        holder.kill()
        holder.wait()
    assert export(capsys, f"checkpoint={path}", f"out={out}")[0] == 0
    assert sorted(os.listdir(out)) == sorted(os.listdir(os.path.join(path, "adapters")))


def test_a_run_directory_exports_its_newest_complete_checkpoint(capsys, tmp_path):
    """As `one4d eval` and model.init_adapters take one: a run directory was refused as 'not a complete checkpoint',
    which read as damage."""
    done = make_checkpoint(tmp_path, ckpt.step_name(4))
    broken = make_checkpoint(tmp_path, ckpt.step_name(8), complete=False)  # saves rename complete folders: damaged
    code, out = export(capsys, f"checkpoint={tmp_path}", f"out={tmp_path / 'out'}")
    assert code == 0 and f"exporting its newest complete checkpoint, {done}" in out, out
    assert f"warning: passing over {broken}, damaged after its save: no COMPLETE marker" in out, out
    assert filecmp.cmp(tmp_path / "out" / "lora_rgb.safetensors", os.path.join(done, "adapters", "lora_rgb.safetensors"),
                       shallow=False)
    empty = tmp_path / "empty_run"
    (empty / "checkpoints").mkdir(parents=True)
    code, out = export(capsys, f"checkpoint={empty}", f"out={tmp_path / 'out2'}")
    assert code == 2 and "a run directory without a complete checkpoint" in out, out


def test_an_export_records_the_data_window_its_run_trained_at(capsys, tmp_path):
    """adapters/ written before exports recorded the window get it from the run's config.yaml, so `one4d eval` of
    the export, wherever it lies, samples at the training's clip length and size (it used the defaults, 81 x
    352x624, unless a config.yaml happened to lie beside the export)."""
    from one4d_train.config import load_config, to_yaml
    from one4d_train.eval.main import export_settings

    done = make_checkpoint(tmp_path)
    cfg = load_config(["data.num_frames=9", "data.height=32", "data.width=48", "data.frame_stride=2"])
    (tmp_path / "config.yaml").write_text(to_yaml(cfg))
    code, out = export(capsys, f"checkpoint={done}", f"out={tmp_path / 'out'}")
    assert code == 0, out
    window = json.loads((tmp_path / "out" / "adapter_config.json").read_text())["data"]
    assert window == {"num_frames": 9, "frame_stride": 2, "height": 32, "width": 48,
                      "pointmap_percentiles": [2.0, 98.0]}, window
    items = export_settings(str(tmp_path / "out"))
    assert {"data.num_frames=9", "data.frame_stride=2", "data.height=32", "data.width=48",
            "data.pointmap_percentiles=[2.0,98.0]"} <= set(items), items
    # and every item loads as the config it came from
    again = load_config(items)
    assert (again.data.num_frames, again.data.height, again.data.width, again.data.frame_stride) == (9, 32, 48, 2)
    # the window the checkpoint was written under (its own config.yaml) over the run's latest (a resume may change it)
    (Path(done) / "config.yaml").write_text(to_yaml(load_config(["data.num_frames=5", "data.height=64"])))
    mark_complete(done)
    code, out = export(capsys, f"checkpoint={done}", f"out={tmp_path / 'out2'}")
    window = json.loads((tmp_path / "out2" / "adapter_config.json").read_text())["data"]
    assert code == 0 and (window["num_frames"], window["height"]) == (5, 64), (out, window)
