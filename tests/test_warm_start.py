"""model.init_adapters' source (train/warm_start.py), in-process on folders holding a tiny model's real adapters: an
export, a checkpoint or its adapters/, a run directory's newest complete checkpoint; what cannot start a run is
named. The training run that starts from one is tested in test_one4d_training.py."""
from __future__ import annotations

import json
import os
import shutil

import pytest

from one4d_train.train import checkpoint as ckpt
from one4d_train.train.export_cli import main as export
from one4d_train.train.warm_start import WarmStartError, init_source
from test_export_cli import make_checkpoint, mark_complete

IDENTITY = {"checkpoint": "/models/wan.safetensors", "fingerprint": "0123456789abcdef0123", "lora_alpha": 8.0}


def with_train_state(path: str, identity: dict | None = IDENTITY) -> str:
    """`path`'s train state as a save writes it (the keys a resume reads, the task identity), re-marked."""
    os.makedirs(os.path.join(path, "train_state"), exist_ok=True)
    state = {k: None for k in ckpt.STATE_KEYS} | {"step": 4, **({"task_identity": identity} if identity else {})}
    with open(os.path.join(path, "train_state", "rank-00000.json"), "w") as f:
        json.dump(state, f)
    mark_complete(path)
    return path


def test_each_kind_of_source_resolves_to_its_adapters(tmp_path):
    run = tmp_path / "run"
    old = with_train_state(make_checkpoint(run, ckpt.step_name(4)))
    new = with_train_state(make_checkpoint(run, ckpt.step_name(8)))
    make_checkpoint(run, ckpt.step_name(12), complete=False)  # being written: not the newest complete one
    adapters = os.path.join(new, "adapters")
    assert init_source(str(run)) == (adapters, new)
    assert init_source(new) == (adapters, new)
    assert init_source(adapters) == (adapters, new)  # a checkpoint's adapters/ named directly: the checkpoint
    assert init_source(old + "/") == (os.path.join(old, "adapters"), old)
    shutil.copytree(adapters, tmp_path / "export")
    assert init_source(str(tmp_path / "export")) == (str(tmp_path / "export"),) * 2


@pytest.mark.parametrize("case,message", [
    ("missing", "no such folder"),
    ("file", "not a folder"),
    ("other", "neither an export (adapter_config.json), a checkpoint (train_state/) nor a run directory"),
    ("empty_run", "a run directory without a complete checkpoint"),
    ("incomplete", "is not complete"),
    ("no_adapters", "holds no adapters/ (trained with train.export_adapters=false)"),
    ("damaged", "is damaged"),
])
def test_what_cannot_start_a_run_is_named(tmp_path, case, message):
    spec = tmp_path / case
    if case == "file":
        spec.write_text("x")
    elif case == "other":
        spec.mkdir()
    elif case == "empty_run":
        (spec / "checkpoints").mkdir(parents=True)
    elif case == "incomplete":
        spec = with_train_state(make_checkpoint(tmp_path, ckpt.step_name(4)))
        os.truncate(os.path.join(spec, "adapters", "lora_rgb.safetensors"), 10)
    elif case == "no_adapters":
        spec = make_checkpoint(tmp_path, ckpt.step_name(4))
        shutil.rmtree(os.path.join(spec, "adapters"))
        spec = with_train_state(spec)
    elif case == "damaged":  # same size, flipped bytes: only the CRC-32s see it
        spec = with_train_state(make_checkpoint(tmp_path, ckpt.step_name(4)))
        lora = os.path.join(spec, "adapters", "lora_rgb.safetensors")
        data = bytearray(open(lora, "rb").read())
        data[-8] ^= 0xFF
        open(lora, "wb").write(bytes(data))
    with pytest.raises(WarmStartError, match=message.replace("(", r"\(").replace(")", r"\)")):
        init_source(str(spec))


def test_an_export_of_a_checkpoint_names_the_base_its_train_state_records(tmp_path, capsys):
    """Checkpoints whose adapters/ predate the record of the base (their train state has it) export it too, so that
    `one4d eval` and model.init_adapters can compare it; one with no record exports without it."""
    recorded = with_train_state(make_checkpoint(tmp_path / "a"))
    assert export([f"checkpoint={recorded}", f"out={tmp_path / 'out_a'}"]) == 0
    config = json.loads((tmp_path / "out_a" / "adapter_config.json").read_text())
    assert config["base"] == {"checkpoint": IDENTITY["checkpoint"], "fingerprint": IDENTITY["fingerprint"]}
    unrecorded = with_train_state(make_checkpoint(tmp_path / "b"), identity=None)
    assert export([f"checkpoint={unrecorded}", f"out={tmp_path / 'out_b'}"]) == 0
    assert "base" not in json.loads((tmp_path / "out_b" / "adapter_config.json").read_text())
