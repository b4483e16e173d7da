import os
import re
import textwrap
from pathlib import Path

import pytest

from one4d_train.config import ConfigError, load_config


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return str(p)


def test_order_defaults_yaml_cli(tmp_path):
    write(tmp_path, "base.yaml", "train:\n  steps: 7\n  log_every: 3\n  checkpoint_every: 11\n")
    exp = write(tmp_path, "exp.yaml", "_base_: [base.yaml]\ntrain:\n  steps: 9\n")
    cfg = load_config([f"config={exp}", "train.log_every=5"])
    assert cfg.train.steps == 9 and cfg.train.log_every == 5 and cfg.optim.lr == 1e-4
    assert cfg.train.checkpoint_every == 11  # the base's value where nothing later sets the key


def test_a_file_two_bases_include_applies_once_where_it_came_first(tmp_path):
    """common.yaml under both a model and a data config: its second application undid what the model set."""
    write(tmp_path, "common.yaml", "train:\n  steps: 100\n  log_every: 3\n")
    write(tmp_path, "model.yaml", "_base_: common.yaml\ntrain:\n  steps: 5500\n")
    write(tmp_path, "data.yaml", "_base_: common.yaml\ndata:\n  num_workers: 3\n")
    exp = write(tmp_path, "exp.yaml", "_base_: [model.yaml, data.yaml]\n")
    cfg = load_config([f"config={exp}"])
    assert cfg.train.steps == 5500 and cfg.train.log_every == 3 and cfg.data.num_workers == 3


def test_command_line_values_are_taken_as_their_keys_take_them():
    """YAML 1.1 read name=2024_01_05 as the integer 20240105 (the run directory runs/20240105), name=1.10 as 1.1,
    train.steps=017 as octal 15 and 1:30 as base-60 90, and `key=...=` had '' appended to its value."""
    for value in ("2024_01_05", "1.10", "yes", "010", "abc="):
        cfg = load_config([f"name={value}", f"tracking.experiment={value}"])
        assert cfg.name == cfg.tracking.experiment == value and cfg.run_dir == f"runs/{value}"
    assert load_config(["name="]).name == "" and load_config(["train.steps=1_000"]).train.steps == 1000
    # text read as YAML lost what follows ' #' (a comment), was an anchor (&runs: null) or no YAML at all (*, @, %,
    # a backtick); a text the user quoted is YAML's, an interpolation stays one
    for value in ("/x/a #comment", "&runs", "*x", "@odd", "%x", "`x`", "it's", "|x", "!x"):
        assert load_config([f"run_dir={value}"]).run_dir == value, value
    assert load_config(["name='quoted'"]).name == "quoted"
    for value in ("2", "-1", "0.5"):  # read as true
        with pytest.raises(ConfigError, match=rf"key 'train.export_adapters': '{value}' is no truth value"):
            load_config([f"train.export_adapters={value}"])
    assert load_config(["train.export_adapters=0"]).train.export_adapters is False
    assert load_config(["name=n1", "run_dir=runs/${name}-x"]).run_dir == "runs/n1-x"
    for value in ("017", "1:30", "0b101", "0x10"):
        with pytest.raises(ConfigError, match=rf"command line: key 'train.steps': '{value}' is read as \d+ .*write "
                                              r"the number in decimal"):
            load_config([f"train.steps={value}"])
        with pytest.raises(ConfigError, match=rf"command line: key 'flow.shift': '{value}' is read as \d+ .*write "
                                              r"the number in decimal"):  # a float key: 017 was 15.0, 24:00 1440.0
            load_config([f"flow.shift={value}"])
    for value, want in (("3", 3.0), (".5", 0.5), ("2.5e-5", 2.5e-5), ("1_000.5", 1000.5)):
        assert load_config([f"flow.shift={value}"]).flow.shift == want
    with pytest.raises(ConfigError, match=r"config=: names no file"):
        load_config(["config="])
    with pytest.raises(ConfigError, match=r"config=.*: is a folder; a config is a YAML file"):
        load_config([f"config={Path(__file__).parent}"])


def test_config_file_values_are_taken_as_their_keys_take_them(tmp_path):
    """A file's plain values went through YAML 1.1 unchecked (the command line's did not): `steps: 017` trained 15
    steps, `name: yes` named the run 'True'. A text key asks for quotes, a number key for decimal; a config written
    by a run (print-config, config.yaml) reads back as it was."""
    from one4d_train.config import to_yaml

    for body, message in (("train:\n  steps: 017\n", r"key 'train.steps': 017 is read by YAML in its octal"),
                          ("train:\n  steps: 1:30\n", r"key 'train.steps': 1:30 is read by YAML"),
                          ("flow:\n  shift: 0x10\n", r"key 'flow.shift': 0x10 is read by YAML"),
                          ("name: yes\n", r"key 'name': yes is read by YAML as a bool, not the text written: quote it"),
                          ("name: 1.10\n", r"key 'name': 1.10 is read by YAML as a float"),
                          ("name: 2024_01_05\n", r"key 'name': 2024_01_05 is read by YAML as an int"),
                          ("name: 1e3\n", r"key 'name': 1e3 is read by YAML as a float")):
        exp = write(tmp_path, "exp.yaml", body)
        with pytest.raises(ConfigError, match=rf"{re.escape(str(exp))}: {message}"):
            load_config([f"config={exp}"])
    exp = write(tmp_path, "exp.yaml", "name: 'yes'\ntrain:\n  steps: 20\nflow:\n  shift: 01.5\n")
    cfg = load_config([f"config={exp}"])
    assert (cfg.name, cfg.train.steps, cfg.flow.shift) == ("yes", 20, 1.5)
    assert load_config(["flow.shift=01.5"]).flow.shift == 1.5
    back = write(tmp_path, "back.yaml", to_yaml(load_config(["name=2024_01_05", "run_dir=/x/a #1"])))
    assert (load_config([f"config={back}"]).name, load_config([f"config={back}"]).run_dir) == ("2024_01_05", "/x/a #1")


def test_unknown_key_names_key_and_file(tmp_path):
    exp = write(tmp_path, "exp.yaml", "data:\n  num_wrokers: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config([f"config={exp}"])
    assert "data.num_wrokers" in str(err.value) and "exp.yaml" in str(err.value)


def test_wrong_type_names_key(tmp_path):
    exp = write(tmp_path, "exp.yaml", "train:\n  steps: many\n")
    with pytest.raises(ConfigError, match=r"exp.yaml: key 'train.steps'"):
        load_config([f"config={exp}"])
    with pytest.raises(ConfigError, match=r"command line: key 'optim.lr'"):
        load_config(["optim.lr=fast"])


def test_value_validation_names_key_and_where_its_value_came_from(tmp_path):
    with pytest.raises(ConfigError, match=r"command line: key 'model.umc.p_image'"):
        load_config(["model.umc.p_image=0.9"])
    with pytest.raises(ConfigError, match=r"command line: key 'train.zero_stage'"):
        load_config(["train.zero_stage=1"])
    base = write(tmp_path, "base.yaml", "data:\n  num_frames: 10\n")
    exp = write(tmp_path, "exp.yaml", "_base_: [base.yaml]\ntrain:\n  steps: 9\n")
    with pytest.raises(ConfigError, match=r"base.yaml: key 'data.num_frames': must be 4k\+1"):
        load_config([f"config={exp}"])
    with pytest.raises(ConfigError, match=r"command line: key 'data.num_frames'"):
        load_config([f"config={exp}", "data.num_frames=12"])


def test_a_check_on_several_keys_names_where_the_set_ones_came_from(tmp_path):
    exp = write(tmp_path, "exp.yaml", "data:\n  width: 100\n")
    with pytest.raises(ConfigError, match=r"exp.yaml \(set keys of 'data'\): key 'data.height'"):
        load_config([f"config={exp}"])
    with pytest.raises(ConfigError, match=r"^command line \(set keys of 'model.umc'\): key 'model.umc.p_image'"):
        load_config(["model.umc.p_video=0.9"])


def test_a_value_where_a_section_belongs_names_the_section(tmp_path):
    exp = write(tmp_path, "exp.yaml", "data: 5\n")
    with pytest.raises(ConfigError, match=r"exp.yaml: key 'data'"):
        load_config([f"config={exp}"])
    exp = write(tmp_path, "exp2.yaml", "model:\n  umc: 0.3\n")
    with pytest.raises(ConfigError, match=r"exp2.yaml: key 'model.umc'"):
        load_config([f"config={exp}"])


@pytest.mark.parametrize("key, value, want", [
    ("train.deepspeed_overrides", "[1]", "must be a mapping"), ("train.deepspeed_overrides", "1", "must be a mapping"),
    ("optim.betas", "{a: 1}", "must be a list"), ("optim.betas", "1", "must be a list"),
    ("eval.modes", "{a: 1}", "must be a list"), ("train", "[1]", "is a section")])
def test_a_list_mapping_or_plain_value_where_another_belongs_names_the_key_and_its_source(tmp_path, key, value, want):
    """A list onto a mapping (or the other way round) was a bare TypeError from OmegaConf's merge."""
    with pytest.raises(ConfigError, match=rf"^command line: key '{re.escape(key)}': {want}"):
        load_config([f"{key}={value}"])
    head, _, last = key.rpartition(".")
    exp = write(tmp_path, "exp.yaml", f"{head}: {{{last}: {value}}}\n" if head else f"{last}: {value}\n")
    with pytest.raises(ConfigError, match=rf"exp.yaml: key '{re.escape(key)}': {want}"):
        load_config([f"config={exp}"])


def test_a_later_layer_replaces_a_free_form_value_of_another_kind(tmp_path):
    """Inside train.deepspeed_overrides a value is free-form: a list, a mapping or a plain value replaces the
    earlier one, whatever its kind."""
    exp = write(tmp_path, "exp.yaml", "train:\n  deepspeed_overrides: {a: [1], b: {c: 1}, d: 2}\n")
    cfg = load_config([f"config={exp}", "train.deepspeed_overrides.a={x: 1}", "train.deepspeed_overrides.b=[2]",
                       "train.deepspeed_overrides.d={y: 3}"])
    assert cfg.train.deepspeed_overrides == {"a": {"x": 1}, "b": [2], "d": {"y": 3}}


def test_empty_value_is_the_empty_string():
    assert load_config(["model.vae=/x", "model.vae="]).model.vae == ""


def test_print_config_prints_the_merged_config(capsys):
    from one4d_train.cli import main as one4d_main

    demo = Path(__file__).resolve().parents[1] / "configs" / "experiment" / "demo.yaml"
    assert one4d_main(["print-config", f"config={demo}", "data.num_workers=3"]) == 0
    out = capsys.readouterr().out
    assert "num_workers: 3" in out and "micro_batch_size: 2" in out  # command line over the demo file over defaults
    assert one4d_main(["print-config", "data.num_wrokers=3"]) != 0
    assert "data.num_wrokers" in capsys.readouterr().err
    # a script's one value, whole: YAML output wraps a long path with spaces onto a second line
    long = "/scratch/jane doe/one4d experiments/wan2.1-14b-inp lora rank 64/ablation 3 seed 1"
    assert one4d_main(["print-config", "--get", "run_dir", f"config={demo}", f"run_dir={long}"]) == 0
    assert capsys.readouterr().out == long + "\n"
    assert one4d_main(["print-config", "--get", "run_dri", f"config={demo}"]) == 2
    capsys.readouterr()
    # after the settings, or as --get=KEY (both were refused as settings written with dashes)
    for argv in ([f"config={demo}", f"run_dir={long}", "--get", "run_dir"], ["--get=run_dir", f"config={demo}",
                                                                             f"run_dir={long}"]):
        assert one4d_main(["print-config", *argv]) == 0 and capsys.readouterr().out == long + "\n"
    for argv in (["--get"], ["--get", "a", "--get", "b"], [f"config={demo}", "--get"]):
        assert one4d_main(["print-config", *argv]) == 2
        assert "--get takes one key" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["print-config", "train", "eval", "export", "demo"])
def test_help_shows_real_usage(command, capsys):
    from one4d_train.cli import main as one4d_main

    try:
        code = one4d_main([command, "--help"])
    except SystemExit as exc:  # argparse-based commands exit after printing
        code = exc.code
    assert code == 0
    assert f"one4d {command}" in capsys.readouterr().out


def test_base_that_is_not_a_list_of_file_names_names_the_file(tmp_path):
    for i, value in enumerate(["5", "{a: 1}", "[base.yaml, 3]", "[[base.yaml]]"]):
        exp = write(tmp_path, f"exp{i}.yaml", f"_base_: {value}\n")
        with pytest.raises(ConfigError, match=rf"exp{i}.yaml: key '_base_': must be a file name or a list of file names"):
            load_config([f"config={exp}"])


def test_missing_base_file_names_the_file_that_lists_it(tmp_path):
    exp = write(tmp_path, "exp.yaml", "_base_: [../model/nonexistent.yaml]\n")
    with pytest.raises(ConfigError) as err:
        load_config([f"config={exp}"])
    assert f"{exp}: key '_base_': config file not found: {tmp_path.parent / 'model' / 'nonexistent.yaml'}" in str(err.value)


def test_train_help_states_the_defaults_of_the_keys_it_shows(capsys):
    """`key=value` in `one4d train --help`'s key list is the default (alternatives are written a|b, placeholders
    in capitals or {...})."""
    import re

    from one4d_train.cli import main as one4d_main
    from one4d_train.configtools import flatten, to_dict

    assert one4d_main(["train", "--help"]) == 0
    text = capsys.readouterr().out
    keys = text[text.index("main keys:"):text.index("Before any process group")]
    defaults = flatten(to_dict(load_config()))
    shown = re.findall(r"\b((?:optim|train|tracking|eval|data|model|flow)\.[a-z_.]+)=(\S*)", keys)
    checked = [(k, v) for k, v in shown if not re.search(r"[|{A-Z]", v)]
    assert len(checked) >= 10, shown
    for key, value in checked:
        assert str(defaults[key]) == value or (value and float(defaults[key]) == float(value)), (key, value)


def test_an_interpolation_error_names_the_file_that_set_the_key(tmp_path):
    exp = write(tmp_path, "exp.yaml", "name: ${nmae}\n")
    with pytest.raises(ConfigError, match=r"exp.yaml: key 'name': Interpolation key 'nmae' not found"):
        load_config([f"config={exp}"])
    with pytest.raises(ConfigError, match=r"^command line: key 'run_dir': "):
        load_config(["run_dir=${nope}/x"])


@pytest.mark.parametrize("arg", ["configs/experiment/demo.yaml", "--config=configs/experiment/demo.yaml",
                                 "--train.steps=3"])
def test_a_config_file_or_option_written_the_usual_cli_way_says_how_to_write_it(arg):
    with pytest.raises(ConfigError, match=r"^command line: '[^']*'.*(config=FILE|key=value without dashes)"):
        load_config([arg])


@pytest.mark.parametrize("item, key", [("seed=-1", "seed"), ("seed=20000000000000", "seed")])
def test_a_seed_the_generators_cannot_take_is_refused(item, key):
    """numpy refuses a negative seed in the first data worker, torch a seed past 64 bits in the trainer."""
    with pytest.raises(ConfigError, match=f"command line: key '{key}': must be in"):
        load_config([item])


@pytest.mark.parametrize("item", ["train.deepspeed_overrides={zero_optimization:{reduce_bucket_size:1000}}",
                                  "model.link_blocks=[0,2"])
def test_a_value_that_is_not_yaml_is_named(item):
    """PyYAML's scanner error came out as a traceback (exit 1); the README's flow-mapping form without the space
    after each colon is an easy slip."""
    with pytest.raises(ConfigError, match=rf"command line: '{re.escape(item)}': the value is not YAML .*a space after"):
        load_config(["seed=1", item])


def test_train_stores_its_paths_absolute(tmp_path, monkeypatch):
    """`one4d train` resolves the relative paths it is given against its working directory (the Slurm submission
    folder), so that the run's config.yaml names the same files for the evaluation job, an export or a resume started
    in another folder; empty values, absolute paths and a benchmark's name stay as they are."""
    from one4d_train.config import absolute_paths

    monkeypatch.chdir(tmp_path)
    cfg = absolute_paths(load_config(["data.shards=s/shard-{000000..000009}.tar", "data.val_shards=../val",
                                      "eval.dataset=tum:bench/tum", "model.checkpoint=/abs/wan.safetensors"]))
    assert cfg.data.shards == f"{tmp_path}/s/shard-{{000000..000009}}.tar"
    assert cfg.data.val_shards == os.path.join(os.path.dirname(tmp_path), "val")
    assert cfg.eval.dataset == f"tum:{tmp_path}/bench/tum" and cfg.model.checkpoint == "/abs/wan.safetensors"
    assert cfg.model.vae == "" and cfg.eval.out_dir == "" and cfg.tracking.uri == ""
    # a SQLite store named relatively: one4d eval from another folder made an empty store there
    for uri, stored in (("sqlite:///team/mlflow.db", f"sqlite:///{tmp_path}/team/mlflow.db"),
                        ("sqlite:////abs/mlflow.db", "sqlite:////abs/mlflow.db"), ("http://host:5000", None)):
        assert absolute_paths(load_config([f"tracking.uri={uri}"])).tracking.uri == (stored or uri)


@pytest.mark.parametrize("frames, message", [
    ("0", "key 'data.num_frames': must be >= 1, got 0"),
    ("1", "key 'data.num_frames': a clip of 1 frame has no sparse mode to evaluate")])
def test_a_window_too_short_for_the_sparse_mode_is_named_by_its_own_key(frames, message):
    """Was reported against eval.sparse_frames, a key the command line never set, with an empty range [2, 1]."""
    with pytest.raises(ConfigError) as err:
        load_config([f"data.num_frames={frames}"])
    assert message in str(err.value) and "eval.sparse_frames" not in str(err.value), str(err.value)


@pytest.mark.parametrize("unbuffered", ["1", ""])
@pytest.mark.parametrize("args", [["print-config", "config=configs/experiment/demo.yaml"], ["--help"],
                                  ["inspect-shards", "--help"]])
def test_output_to_a_reader_that_left_ends_quietly_with_the_shells_code(args, unbuffered):
    """`one4d inspect-shards DIR | head -1` printed a BrokenPipeError traceback now and then: buffered or not, from a
    command's output, the usage or an argparse --help (written at the exit's flush when buffered)."""
    import subprocess
    import sys

    read, write = os.pipe()
    os.close(read)  # the reader has left before the first line
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"} | (
        {"PYTHONUNBUFFERED": unbuffered} if unbuffered else {})
    proc = subprocess.run([sys.executable, "-m", "one4d_train.cli", *args], stdout=write, stderr=subprocess.PIPE,
                          text=True, cwd=root, env=env, timeout=120)
    os.close(write)
    # argparse's --help itself ignores a failed write (exit 0) where nothing is left buffered for the exit
    expected = (141, 0) if args[-1] == "--help" and args[0] != "--help" and unbuffered else (141,)
    assert proc.returncode in expected and proc.stderr == "", (proc.returncode, proc.stderr)


def test_valid_settings_that_have_no_effect_are_named():
    """`one4d train` notes at its start the settings its config cannot follow (they are valid values: no refusal)."""
    from one4d_train.train.config import ignored_settings

    demo = Path(__file__).resolve().parents[1] / "configs" / "experiment" / "demo.yaml"
    assert ignored_settings(load_config([f"config={demo}"])) == []
    cfg = load_config([f"config={demo}", "train.steps=10", "optim.warmup_steps=40", "optim.min_lr_ratio=0.1",
                       "data.mode=exact", "data.epoch_length=7", "train.zero_stage=2",
                       "train.zero3_param_persistence_threshold=0", "model.activation_checkpointing=full",
                       "model.activation_checkpointing_blocks=40", "model.design=width_concat", "model.link_blocks=[1]",
                       "model.text_encoder_device=cpu", "model.preset=1.3b"])
    notes = dict(ignored_settings(cfg))
    assert notes == {
        "optim.warmup_steps": "40 > train.steps=10: the run ends in its warmup, at 0.25 x optim.lr",
        "optim.min_lr_ratio": "0.1 is the cosine schedule's floor: optim.schedule=constant ignores it",
        "data.epoch_length": "7 sets data.mode=resampled's epochs: an exact-mode epoch is every sample once",
        "train.zero3_param_persistence_threshold": "ZeRO-3 only: train.zero_stage=2 keeps every parameter whole on "
                                                   "each rank",
        "model.activation_checkpointing_blocks": "40, but preset '1.3b' has 30 blocks: all of them are checkpointed",
        "model.link_blocks": "control links are DLC's: model.design=width_concat has none",
        "model.text_encoder_device": "cpu, but there is no model.text_encoder (text embeddings come from the shards)"}
    cfg = load_config([f"config={demo}", "model.activation_checkpointing=none", "model.activation_checkpointing_blocks=2",
                       "optim.schedule=cosine", "optim.min_lr_ratio=0.1", "data.mode=resampled", "data.epoch_length=7",
                       "model.activation_checkpointing_unit=sublayer"])
    assert dict(ignored_settings(cfg)) == {
        "model.activation_checkpointing_blocks": "2: no block is checkpointed (model.activation_checkpointing=none)",
        "model.activation_checkpointing_unit": "sublayer, but no block is checkpointed "
                                               "(model.activation_checkpointing=none)"}
    # checkpointing by sub-layer saves recompute only in compiled blocks
    sublayer = [f"config={demo}", "model.activation_checkpointing=selective_self",
                "model.activation_checkpointing_unit=sublayer", "train.zero_stage=2"]
    assert dict(ignored_settings(load_config(sublayer))) == {
        "model.activation_checkpointing_unit": "sublayer, but without model.compile, backward recomputes each "
                                               "sub-layer whole: what the unit keeps only costs memory"}
    assert ignored_settings(load_config(sublayer + ["model.compile=true"])) == []
    ffn = sublayer[:2] + ["model.activation_checkpointing_unit=sublayer_ffn", "train.zero_stage=2"]
    assert [v.split(",")[0] for _, v in ignored_settings(load_config(ffn))] == ["sublayer_ffn"]
    assert ignored_settings(load_config(ffn + ["model.compile=true"])) == []
    with pytest.raises(Exception, match="activation_checkpointing_unit"):
        load_config([f"config={demo}", "model.activation_checkpointing_unit=ffn"])
    # which blocks' activations stay on the GPU matters only with the offload on, and up to the preset's blocks
    assert dict(ignored_settings(load_config([f"config={demo}", "model.activation_offload_blocks=1"]))) == {
        "model.activation_offload_blocks": "1, but model.activation_offload is off: every block's activations stay "
                                           "on the GPU"}
    assert dict(ignored_settings(load_config([f"config={demo}", "model.activation_offload_min_mib=1"]))) == {
        "model.activation_offload_min_mib": "1, but model.activation_offload is off: nothing is moved to host memory"}
    offload = [f"config={demo}", "model.activation_offload=true"]
    assert ignored_settings(load_config(offload + ["model.activation_offload_blocks=1"])) == []
    assert [k for k, _ in ignored_settings(load_config(offload + ["model.activation_offload_blocks=0"]))] == [
        "model.activation_offload_blocks"]
    assert dict(ignored_settings(load_config(offload + ["model.activation_offload_blocks=4"]))) == {
        "model.activation_offload_blocks": "4, but preset 'tiny' has 3 blocks: all of them are offloaded"}
    with pytest.raises(Exception, match="activation_offload_blocks"):
        load_config(offload + ["model.activation_offload_blocks=-2"])
    with pytest.raises(Exception, match="activation_offload_min_mib"):
        load_config(offload + ["model.activation_offload_min_mib=-1"])
    # the tiny preset's random text tower is an encoder too: its device is no ignored setting
    assert ignored_settings(load_config([f"config={demo}", "model.text_encoder_device=cpu"])) == []
    # the fused LoRA operator steps aside for dropout and FP8 bases
    assert ignored_settings(load_config([f"config={demo}", "model.lora_kernel=fused"])) == []
    for setting, why in (("model.lora.dropout=0.1", "model.lora.dropout=0.1"),
                         ("model.base_matmul=fp8", "model.base_matmul=fp8")):
        assert dict(ignored_settings(load_config([f"config={demo}", "model.lora_kernel=fused", setting]))) == {
            "model.lora_kernel": f"fused, but {why}: the branch layers run the separate products"}
