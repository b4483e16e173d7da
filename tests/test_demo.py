"""The README's first command runs `one4d demo`: here end to end with fewer steps (its stages are tested one by
one elsewhere; this checks that they still fit together)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from launch_utils import ROOT, _env, metric, mlflow_run


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "one4d_train.cli", "demo", "--out", str(out), "--steps", "4",
                           "--resume-steps", "2"], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "resumed from" in proc.stdout + proc.stderr and "=== demo finished" in proc.stdout
    ckpt = out / "run" / "checkpoints" / "step-00000006"
    assert {p.name for p in (out / "export").iterdir()} >= {"control_links.safetensors", "lora_rgb.safetensors",
                                                            "lora_xyz.safetensors"}
    (scores,) = (ckpt / "eval").glob("*/metrics.json")  # the demo's held-out shards: one dataset
    report = json.loads(scores.read_text())
    assert {r["mode"] for r in report["samples"]} == {"image", "sparse", "video"}
    client, run = mlflow_run(out / "run")
    steps = sorted(metric(client, run, "loss"))  # logged every 5 steps and at the end of each run
    assert 4 in steps and steps[-1] == 6, steps


def test_demo_refuses_a_folder_that_holds_an_earlier_run(tmp_path, capsys):
    """A second demo into the same folder would resume the first one's final checkpoint and train nothing, while
    its output said it trained: it stops first, naming the folder, and leaves it untouched."""
    from one4d_train.demo import main

    out = tmp_path / "demo"
    (out / "run" / "checkpoints" / "step-00000070").mkdir(parents=True)
    with pytest.raises(SystemExit) as exc:
        main(["--out", str(out)])
    assert exc.value.code == 2
    assert f"--out {out} exists and is not an empty folder" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["run"]


def test_demo_picks_a_new_folder_next_to_earlier_demos(tmp_path):
    """Without --out the README's command runs again as written: runs/demo, then runs/demo-2, -3 ..."""
    from one4d_train.demo import fresh_folder

    base = str(tmp_path / "demo")
    assert fresh_folder(base) == base
    os.makedirs(os.path.join(base, "run"))
    os.makedirs(base + "-2")  # empty: usable
    assert fresh_folder(base) == base + "-2"
    os.makedirs(os.path.join(base + "-2", "data"))
    assert fresh_folder(base) == base + "-3"


@pytest.mark.parametrize("flag", ["--steps", "--resume-steps", "--nproc"])
def test_demo_refuses_counts_below_one_before_doing_anything(flag, tmp_path, capsys):
    from one4d_train.demo import main

    with pytest.raises(SystemExit) as exc:
        main(["--out", str(tmp_path / "demo"), flag, "0"])
    assert exc.value.code == 2
    assert f"{flag}: must be a whole number of at least 1, got '0'" in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()
