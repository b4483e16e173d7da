"""`one4d export` arguments and the checkpoint it accepts: from_zero parsed strictly, only complete checkpoints
exported. In-process on a checkpoint folder holding a tiny model's real adapters (the ZeRO rebuild itself runs in
test_one4d_training.py on a trained run)."""
from __future__ import annotations

import contextlib
import filecmp
import json
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch

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
    assert all(filecmp.cmp(tmp_path / "out" / n, os.path.join(ckpt_dir, "adapters", n), shallow=False)
               for n in names if n != "adapter_config.json")
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    source = config.pop("source")  # which checkpoint's weights it holds
    assert source == {"checkpoint": os.path.realpath(ckpt_dir), "step": 4}, source
    assert config == json.loads(Path(ckpt_dir, "adapters", "adapter_config.json").read_text())


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
    gone = subprocess.Popen([sys.executable, "-c", ""])
    gone.wait()  # a pid no process has now (pid 99 was a live process at times: its folder was rightly kept)
    (tmp_path / "out" / f".export-tmp-{gone.pid}").mkdir()  # left by a killed export
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
    cfg = load_config(["data.num_frames=9", "data.height=32", "data.width=48", "data.frame_stride=2",
                       "data.shuffle_buffer=3"])
    (tmp_path / "config.yaml").write_text(to_yaml(cfg))
    code, out = export(capsys, f"checkpoint={done}", f"out={tmp_path / 'out'}")
    assert code == 0, out
    window = json.loads((tmp_path / "out" / "adapter_config.json").read_text())["data"]
    assert window == {"num_frames": 9, "frame_stride": 2, "height": 32, "width": 48,
                      "pointmap_percentiles": [2.0, 98.0], "shuffle_buffer": 3}, window
    items = export_settings(str(tmp_path / "out"))
    assert {"data.num_frames=9", "data.frame_stride=2", "data.height=32", "data.width=48",
            "data.pointmap_percentiles=[2.0,98.0]", "data.shuffle_buffer=3"} <= set(items), items
    # and every item loads as the config it came from
    again = load_config(items)
    assert (again.data.num_frames, again.data.height, again.data.width, again.data.frame_stride,
            again.data.shuffle_buffer) == (9, 32, 48, 2, 3)
    # the window the checkpoint was written under (its own config.yaml) over the run's latest (a resume may change it)
    (Path(done) / "config.yaml").write_text(to_yaml(load_config(["data.num_frames=5", "data.height=64"])))
    mark_complete(done)
    code, out = export(capsys, f"checkpoint={done}", f"out={tmp_path / 'out2'}")
    window = json.loads((tmp_path / "out2" / "adapter_config.json").read_text())["data"]
    assert code == 0 and (window["num_frames"], window["height"]) == (5, 64), (out, window)


# -- real checkpoints: the tiny DLC model (the demo config) and the toy task, one process on the CPU --------------

def train(run_dir, *args) -> None:
    """`one4d train` in one process (world size 1, DeepSpeed ZeRO-3 on the CPU)."""
    import subprocess
    import sys

    from launch_utils import ROOT, _env

    r = subprocess.run([sys.executable, "-m", "one4d_train.cli", "train", f"run_dir={run_dir}",
                        "tracking.system_metrics=false", *args], cwd=ROOT, env=_env(), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run of the tiny model at LoRA rank 3, alpha 0.7 with checkpoints at steps 1 and 2, and a run of the toy task
    (another task: no LoRA parameter of a One4D model)."""
    from data_utils import make_shards
    from launch_utils import ROOT

    tmp = tmp_path_factory.mktemp("trained")
    shards = make_shards(tmp, num_clips=2, frames=9, height=32, width=64, samples_per_shard=1)
    one4d, toy = tmp / "one4d", tmp / "toy"
    train(one4d, f"config={os.path.join(ROOT, 'configs', 'experiment', 'demo.yaml')}", f"data.shards={shards}",
          "train.steps=2", "train.checkpoint_every=1", "data.num_workers=0", "model.lora.rank=3",
          "model.lora.alpha=0.7", "data.shuffle_buffer=3")
    train(toy, "train.task=tests.train_toy_task:ToyTask", "train.device=cpu", "train.precision=fp32", "train.steps=1")
    return {"one4d": one4d, "toy": toy}


def copied_run(trained, name, tmp_path) -> Path:
    """A copy of a trained run directory, to damage."""
    import shutil

    shutil.copytree(trained[name], tmp_path / name)
    return tmp_path / name


def flip_byte(path, at=-20) -> None:
    """Same size, one bit flipped: only the marker's CRC-32s see it."""
    data = bytearray(Path(path).read_bytes())
    data[at] ^= 0x01
    Path(path).write_bytes(bytes(data))


@contextlib.contextmanager
def as_another_user():
    """Within the block, file permissions apply as to another user: root (whom they do not stop) acts as nobody (its
    effective user id; the real one stays, to come back); any other user is another user already. Folders it reads
    must be under a folder every user can enter (`shared_tmp`)."""
    if os.geteuid() != 0:
        yield
        return
    os.setegid(65534)
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


@pytest.fixture
def shared_tmp():
    """A temporary folder every user can enter (pytest's own are the owner's alone)."""
    import shutil
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="one4d-test-"))
    path.chmod(0o755)
    yield path
    for folder, dirs, _ in os.walk(path):  # back to this user's: folders made unreadable by a test
        for d in dirs:
            os.chmod(os.path.join(folder, d), 0o755)
    shutil.rmtree(path)


def test_a_damaged_train_state_is_an_error_naming_it_not_a_dropped_base_check(capsys, tmp_path, trained):
    """A train state with a flipped byte made the frozen base unknown (None) without a word: the export, rebuilt or
    copied, recorded no base, and model.init_adapters from it (or from the checkpoint) trained on another base, while
    the intact checkpoint is refused. The damaged file is named now (exit 2), wherever the base is read."""
    from one4d_train.config import load_config
    from one4d_train.train.one4d_task import One4DTask

    run = copied_run(trained, "one4d", tmp_path)
    done = run / "checkpoints" / ckpt.step_name(2)
    state = done / "train_state" / "rank-00000.json"

    def init_problems(source):
        cfg = load_config([f"config={run / 'config.yaml'}", f"model.init_adapters={source}", "seed=7",
                           f"run_dir={tmp_path / 'second'}"])
        return {k: v for k, v in One4DTask.check_config(cfg) if k in ("model.init_adapters", "model.checkpoint")}

    assert "the random base of seed 7 here" in init_problems(done)["model.checkpoint"]  # intact: refused by its base
    flip_byte(state, at=5)
    for flag in ("from_zero=true", "from_zero=false"):
        code, out = export(capsys, f"checkpoint={done}", f"out={tmp_path / 'out'}", flag)
        assert code == 2 and f"checkpoint {done}: its train state, which records the frozen base" in out, out
        assert f"{state}: its bytes changed after the save" in out and "Traceback" not in out, out
        assert not (tmp_path / "out").exists()
    found = init_problems(done)
    assert f"{state}: its bytes changed after the save" in found.get("model.init_adapters", ""), found


def test_the_zero_rebuild_checks_the_config_against_the_tensors(capsys, tmp_path, trained):
    """The rebuild reads the adapters' layout from a config.yaml: the run's, for a checkpoint holding none of its own,
    which a later start of the run rewrites. Another LoRA rank exported lora_B scaled by alpha / that rank with `r`
    of that rank in its metadata (exit 0); another design, or a checkpoint of another task, a ValueError traceback.
    Each is exit 2 naming the config file and the key; the checkpoint's own config rebuilds what it holds."""
    import yaml
    from safetensors.torch import load_file

    run = copied_run(trained, "one4d", tmp_path)
    done = run / "checkpoints" / ckpt.step_name(2)
    code, out = export(capsys, f"checkpoint={done}", f"out={tmp_path / 'own'}", "from_zero=true")
    assert code == 0, out
    for name in ("lora_rgb.safetensors", "lora_xyz.safetensors", "control_links.safetensors"):
        rebuilt, saved = load_file(tmp_path / "own" / name), load_file(done / "adapters" / name)
        assert rebuilt.keys() == saved.keys() and all(torch.equal(rebuilt[k], saved[k]) for k in saved), name
    # a checkpoint written before checkpoints held their config.yaml, in a run started again at another setting
    marker = json.loads((done / ckpt.MARKER).read_text())
    (done / "config.yaml").unlink()
    for key in ("files", "crc32"):
        del marker[key]["config.yaml"]
    (done / ckpt.MARKER).write_text(json.dumps(marker))
    config = yaml.safe_load((run / "config.yaml").read_text())
    for setting, key, said in (({"lora": {"rank": 8, "alpha": 0.7}}, "model.lora.rank",
                                "is of LoRA rank 3; model.lora.rank is 8"),
                               ({"design": "channel_concat"}, "model.design",
                                "stacks 2 branch adapters; model.design channel_concat has 1 (shared)")):
        (run / "config.yaml").write_text(yaml.safe_dump({**config, "model": {**config["model"], **setting}}))
        code, out = export(capsys, f"checkpoint={done}", f"out={tmp_path / 'out'}", "from_zero=true")
        assert code == 2 and f"{done}: its ZeRO partitions do not fit {run / 'config.yaml'}" in out, out
        assert said in out and key in out and "Traceback" not in out, out
        assert not (tmp_path / "out").exists()
    toy = trained["toy"] / "checkpoints" / ckpt.step_name(1)
    code, out = export(capsys, f"checkpoint={toy}", f"out={tmp_path / 'out'}", "from_zero=true")
    assert code == 2 and "no LoRA parameter of a One4D model among the trainable parameters (adapter_" in out, out
    assert "not a One4D checkpoint (another train.task)" in out and "Traceback" not in out, out


def test_files_of_an_exports_names_without_its_config_are_not_an_export_and_are_kept(capsys, tmp_path):
    """A folder holding the user's own lora_shared.safetensors and io.safetensors, but no adapter_config.json, was
    taken for an earlier export: the export removed them as files this one does not write. Only a folder holding an
    export (its adapter_config.json) has its files replaced."""
    path = make_checkpoint(tmp_path / "run")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "lora_shared.safetensors").write_bytes(b"the user's own adapter")
    (mine / "io.safetensors").write_bytes(b"the user's own weights")
    code, out = export(capsys, f"checkpoint={path}", f"out={mine}")
    assert code == 2 and (f"out={mine}: holds io.safetensors, lora_shared.safetensors without an adapter_config.json: "
                          "not an earlier export") in out, out
    assert sorted(os.listdir(mine)) == ["io.safetensors", "lora_shared.safetensors"]
    assert (mine / "lora_shared.safetensors").read_bytes() == b"the user's own adapter"


def test_an_out_this_user_cannot_list_exits_2_saying_so(capsys, shared_tmp):
    """os.listdir's PermissionError was a traceback, before the errors that name out= were caught."""
    path = make_checkpoint(shared_tmp / "run")
    locked = shared_tmp / "locked"
    locked.mkdir(mode=0o700)  # this user's; the other user may not list it
    with as_another_user():
        code, out = export(capsys, f"checkpoint={path}", f"out={locked}")
    assert code == 2 and f"out={locked}: cannot read it (Permission denied)" in out and "Traceback" not in out, out


def test_a_run_directory_passes_over_a_damaged_newest_checkpoint_and_the_export_names_its_source(capsys, tmp_path,
                                                                                                 trained):
    """The newest checkpoint cut short by one byte was passed over (a warning; the older one exported, exit 0), one
    with a flipped byte refused the whole export (exit 2): both are damage found after the save, which a resume and
    the evaluation of a run directory pass over alike. adapter_config.json records which checkpoint it holds."""
    run = copied_run(trained, "one4d", tmp_path)
    older, newest = (run / "checkpoints" / ckpt.step_name(s) for s in (1, 2))
    run_id = json.loads((older / "train_state" / "rank-00000.json").read_text())["mlflow_run_id"]
    lora = newest / "adapters" / "lora_rgb.safetensors"
    intact = lora.read_bytes()
    for damage, said in ((lambda: flip_byte(lora), f"{lora}: its bytes changed after the save"),
                         (lambda: os.truncate(lora, len(intact) - 1), f"{lora} is {len(intact) - 1} bytes")):
        lora.write_bytes(intact)
        damage()
        out_dir = tmp_path / f"out-{len(said)}"
        code, out = export(capsys, f"checkpoint={run}", f"out={out_dir}")
        assert code == 0 and f"warning: passing over {newest}, damaged after its save: {said}" in out, out
        assert f"exporting its newest complete checkpoint, {older}" in out, out
        source = json.loads((out_dir / "adapter_config.json").read_text())["source"]
        assert source == {"checkpoint": str(older), "step": 1, "mlflow_run_id": run_id}, source
    lora.write_bytes(intact)
    flip_byte(lora)
    code, out = export(capsys, f"checkpoint={newest}", f"out={tmp_path / 'named'}")  # named: refused, as before
    assert code == 2 and f"checkpoint {newest} is damaged: {lora}" in out, out


def test_a_checkpoint_pruned_while_it_is_exported_is_named_not_out(capsys, tmp_path, monkeypatch, trained):
    """A checkpoint pruned while it was exported was blamed on out= ("cannot write the export there: No such file or
    directory (<checkpoint>/adapters)"): the checkpoint is named, and what happened to it."""
    from one4d_train.model import adapters

    run = copied_run(trained, "one4d", tmp_path)
    older = run / "checkpoints" / ckpt.step_name(1)
    real = adapters.read_adapters

    def pruned_once_read(folder):
        got = real(folder)
        if Path(folder).parent == older and older.exists():  # train.keep_last=1 after the next save
            ckpt.Checkpointer(str(run), 0, 1, keep_last=1)._remove(str(older))
        return got

    monkeypatch.setattr(adapters, "read_adapters", pruned_once_read)
    code, out = export(capsys, f"checkpoint={older}", f"out={tmp_path / 'out'}")
    assert code == 2 and f"checkpoint {older} was removed or changed while it was exported (it is gone)" in out, out
    assert "cannot write the export there" not in out and not (tmp_path / "out").exists()


def test_a_checkpoint_this_user_may_not_read_is_said_so_not_missing_or_damaged(capsys, shared_tmp):
    """A folder of the checkpoint this user may not enter was reported "missing", a file it may not read "damaged"."""
    path = make_checkpoint(shared_tmp / "run")
    lora = Path(path, "adapters", "lora_rgb.safetensors")
    lora.chmod(0o600)  # this user's alone
    with as_another_user():
        code, out = export(capsys, f"checkpoint={path}", f"out={shared_tmp / 'out'}")
    assert code == 2 and f"checkpoint {path} cannot be read now: {lora}: cannot be read" in out, out
    assert "Permission denied" in out and "damaged" not in out, out
    lora.chmod(0o644)
    Path(path, "adapters").chmod(0o700)
    with as_another_user():
        code, out = export(capsys, f"checkpoint={path}", f"out={shared_tmp / 'out'}")
    assert code == 2 and f"checkpoint {path} cannot be read now: {Path(path, 'adapters')}/" in out, out
    assert "listed in COMPLETE, cannot be read now (Permission denied)" in out and "missing" not in out, out
    assert not (shared_tmp / "out").exists()


def test_a_read_only_checkpoint_exports(capsys, shared_tmp):
    """A checkpoint that nobody may write (another user's, a read-only copy) exports: the copy of its adapters took
    their modes, and the export's records could not be written into it, nor the temporary copy removed."""
    path = make_checkpoint(shared_tmp / "run")
    for folder, _, files in os.walk(path):
        for name in files:
            Path(folder, name).chmod(0o444)
    Path(path, "adapters").chmod(0o555)
    out = shared_tmp / "out"
    out.mkdir(mode=0o777)
    out.chmod(0o777)
    with as_another_user():
        code, said = export(capsys, f"checkpoint={path}", f"out={out}")
    assert code == 0, said
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []
    assert json.loads((out / "adapter_config.json").read_text())["source"]["step"] >= 1


@pytest.mark.parametrize("name", [".tmp-step-00000008", ".tmp-deleted-step-00000008"])
def test_a_checkpoints_temporary_folder_is_refused_by_name(capsys, tmp_path, name):
    """A save writes into .tmp-step-X (its COMPLETE marker too, before the rename); a prune renames a checkpoint to
    .tmp-deleted-step-X before deleting it. Named directly, either exported, complete by its marker."""
    path = make_checkpoint(tmp_path / "run", name)
    code, out = export(capsys, f"checkpoint={path}", f"out={tmp_path / 'out'}")
    assert code == 2 and f"{path}: a checkpoint's temporary folder" in out and "export a step-* checkpoint" in out, out
    assert not (tmp_path / "out").exists()


def test_an_out_in_a_runs_checkpoints_or_named_like_a_checkpoint_is_refused(capsys, tmp_path):
    """out=<run>/checkpoints/step-00000099 was written: a resume then took it for a damaged checkpoint (no COMPLETE
    marker) and moved it away, and `one4d eval` of it refused it as an incomplete checkpoint."""
    path = make_checkpoint(tmp_path / "run")
    (tmp_path / "run" / "run_dir_id").write_text("0123")
    checkpoints = tmp_path / "run" / "checkpoints"
    for out, said in ((checkpoints / "step-00000099", f"inside {checkpoints}, a run's checkpoints folder"),
                      (checkpoints / "exported", f"inside {checkpoints}, a run's checkpoints folder"),
                      (tmp_path / "step-00000099", "is named like a checkpoint (step-00000099)")):
        code, text = export(capsys, f"checkpoint={path}", f"out={out}")
        assert code == 2 and f"out={out}: {said}" in text, text
        assert not out.exists()
    assert export(capsys, f"checkpoint={path}", f"out={tmp_path / 'checkpoints' / 'mine'}")[0] == 0  # not a run's
