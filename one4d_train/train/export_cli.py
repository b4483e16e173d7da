"""`one4d export checkpoint=DIR out=DIR [from_zero=true]`: the branch adapters and control links of a checkpoint
(or of a run directory's newest complete checkpoint).

Only a complete checkpoint (its COMPLETE marker lists every file at its size) is exported: not a `.tmp-step-*`
folder being written or left by a killed job, nor one whose files changed since; the files it reads (adapters/, or
ds/ for a rebuild) must match the CRC-32s the marker records (a marker written before markers recorded them is not
verified), else exit 2 naming the damaged file. Every checkpoint already holds `adapters/` (written from the gathered
trainable parameters); this checks it (every file and key present, shapes consistent) and copies it to `out`. With
`from_zero=true` (true/false, yes/no, on/off, 1/0), or when a checkpoint has no adapters/, the adapters are rebuilt
on the CPU from the DeepSpeed ZeRO partitions instead, using the run's config.yaml: no GPU and no process group
needed. A DeepSpeed file that does not load is named (nothing is unpickled: torch.load(weights_only=True)).

Output: lora_rgb.safetensors / lora_xyz.safetensors (diffusers WanTransformer3DModel LoRA keys),
control_links.safetensors (links + the XYZ patch embedding), adapter_config.json (the model settings, the
frozen base trained on, by content fingerprint, and the data window trained at: data.num_frames, frame_stride,
height, width, pointmap_percentiles, which `one4d eval` of the export samples at), in `out`: a new or empty folder,
or an earlier export, whose files are replaced (written inside it and read back whole first); never a folder inside
a checkpoint.

exit codes: 0 exported, 2 bad arguments or a checkpoint that cannot be exported, 1 any other failure.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import sys

TRUE, FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


class ExportError(Exception):
    """Arguments or a checkpoint that cannot be exported; the message names the key or the folder."""


def parse_bool(key: str, text: str) -> bool:
    if text.strip().lower() in TRUE:
        return True
    if text.strip().lower() in FALSE:
        return False
    raise ExportError(f"{key}={text!r}: must be true or false (also yes/no, on/off, 1/0)")


def _args(argv: list[str]) -> dict[str, str]:
    out = {}
    for a in argv:
        key, sep, value = a.partition("=")
        if not sep or key not in ("checkpoint", "out", "from_zero"):
            raise ExportError(f"unexpected argument {a!r}\n\n{__doc__.strip()}")
        out[key] = value
    if "checkpoint" not in out or "out" not in out:
        raise ExportError(f"checkpoint= and out= are required\n\n{__doc__.strip()}")
    return out


def rebuild_from_zero(ckpt: str, out: str) -> None:
    from deepspeed.utils import zero_to_fp32

    from one4d_train.config import load_config
    from one4d_train.train.checkpoint import weights_only_load
    from one4d_train.model.adapters import data_window, export_adapters
    from one4d_train.train.warm_start import trained_identity

    # the checkpoint's own config: the adapters' layout (rank, alpha, design) as trained, which a later start in the
    # same run directory (resume=never model.lora.rank=...) changes in the run's config.yaml
    cfg_path = _own_config(ckpt)
    if not cfg_path:
        raise ExportError(f"no config.yaml in the checkpoint {ckpt} nor in its run directory (the merged config it "
                          "was trained with is needed to rebuild from the ZeRO partitions)")
    cfg = load_config([f"config={cfg_path}"])
    with weights_only_load(zero_to_fp32.torch):
        state = zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(ckpt, tag="ds", exclude_frozen_parameters=True)
    export_adapters(state, cfg.model, out, base=trained_identity(ckpt), window=data_window(cfg.data))


def _own_config(ckpt: str) -> str:
    """The config the checkpoint was written under (its own config.yaml: a resume may change data.*), else its
    run's (config_of)."""
    from one4d_train.train.checkpoint import CONFIG_FILE, config_of

    own = os.path.join(ckpt, CONFIG_FILE)
    return own if os.path.isfile(own) else config_of(ckpt)


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__.strip())
        return 0
    from one4d_train.configtools import ConfigError
    from one4d_train.model.adapters import AdapterError
    from one4d_train.train.checkpoint import CheckpointDamaged

    try:
        args = _args(argv)
        from_zero = parse_bool("from_zero", args.get("from_zero", "false"))
        export(args["checkpoint"], args["out"], from_zero)
    except (ExportError, AdapterError, ConfigError, CheckpointDamaged) as exc:  # damaged files, a run config that
        # no longer loads
        print(f"one4d export: {exc}", file=sys.stderr)
        return 2
    return 0


TMP_PREFIX = ".export-tmp-"  # the folder inside `out` an export is written to before its files move in
LOCK_NAME = ".export.lock"  # held in `out` while an export writes there


def _export_files() -> set[str]:
    """The files an export of any design writes (the ablations' one shared adapter too)."""
    from one4d_train.model.adapters import CONFIG_NAME, GROUP_FILES, lora_file
    from one4d_train.model.dlc import BRANCHES, SHARED

    return {CONFIG_NAME, *GROUP_FILES.values(), *(lora_file(b) for b in BRANCHES + SHARED)}


def _target_problem(out: str) -> str | None:
    """Why `out` cannot take an export: inside a checkpoint (its adapters/ or another folder of it: a checkpoint's
    files would change under its COMPLETE marker, or another step's adapters be replaced by these), or a folder
    holding anything but an earlier export's files (which it replaces)."""
    from one4d_train.model.adapters import CONFIG_NAME
    from one4d_train.train.checkpoint import MARKER

    here = os.path.realpath(out)
    while True:
        if os.path.isfile(os.path.join(here, MARKER)) or all(os.path.isdir(os.path.join(here, d))
                                                              for d in ("ds", "train_state")):
            return (f"inside the checkpoint {here}, whose files its {MARKER} marker lists (its adapters/ already "
                    "holds its export); give a folder outside every checkpoint")
        parent = os.path.dirname(here)
        if parent == here:
            break
        here = parent
    others = sorted(n for n in (os.listdir(out) if os.path.isdir(out) else [])
                    if n not in _export_files() and n != LOCK_NAME and not n.startswith(TMP_PREFIX))
    if others == ["eval"] and os.path.isfile(os.path.join(out, CONFIG_NAME)):  # `one4d eval checkpoint=out` wrote it
        return (f"is an earlier export that was evaluated: {os.path.join(out, 'eval')} holds the scores of its "
                "adapters, which a new export would replace under them; move that eval/ folder away first (or "
                "give a new folder)")
    if others:
        return (f"holds {', '.join(others[:5])}{' ...' if len(others) > 5 else ''}, not an earlier export's files "
                "alone (an export replaces an earlier one's files): give a new or empty folder, or an earlier export")
    return None


def _add_records(export: str, ckpt: str) -> None:
    """Record the frozen base (from the train state) and the data window (from the run's config.yaml) in the
    export's adapter_config.json where the checkpoint's adapters/, written before they recorded them, lack them."""
    import json

    from one4d_train.config import load_config
    from one4d_train.configtools import ConfigError
    from one4d_train.model.adapters import CONFIG_NAME, base_record, data_window
    from one4d_train.train.warm_start import trained_identity

    path = os.path.join(export, CONFIG_NAME)
    with open(path) as f:
        config = json.load(f)
    recorded = dict(config)
    base = trained_identity(ckpt)
    if "base" not in config and base:
        config["base"] = base_record(base)
    own = _own_config(ckpt)
    if "data" not in config and own:
        try:
            config["data"] = data_window(load_config([f"config={own}"]).data)
        except ConfigError as exc:
            print(f"one4d export: {own} does not load ({exc}): the export records no data window (an evaluation "
                  "of it needs config= or data.*)", file=sys.stderr)
    if config != recorded:
        with open(path, "w") as f:
            json.dump(config, f, indent=2)


def _write_export(src: str | None, ckpt: str, out: str) -> tuple[dict, dict]:
    """The export of `ckpt` (a copy of its adapters/ `src`, or rebuilt from its ZeRO partitions) into `out`, with
    the folder locked (one export at a time), written in a folder inside it and read back whole before its files
    move in, each replaced in one step: the earlier adapter_config.json goes first and the new one comes last, so a
    kill part-way leaves no config (read_adapters refuses the folder) rather than two exports' weights under one.
    An earlier export's files this one does not have are removed. `out` may be a symlink or a mount point. Returns
    the export as read back (read_adapters)."""
    from one4d_train.model.adapters import CONFIG_NAME, read_adapters
    from one4d_train.train.run_lock import Held, hold, process_alive

    created = not os.path.isdir(out)
    os.makedirs(out, exist_ok=True)
    try:
        lock = hold(os.path.join(out, LOCK_NAME), what="a second `one4d export`")
    except (Held, OSError) as exc:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        if isinstance(exc, Held):
            raise ExportError(f"out={out}: another one4d export is writing into it ({exc.who}); wait for it to "
                              "end") from None
        raise
    tmp = os.path.join(out, f"{TMP_PREFIX}{os.getpid()}")
    done = False
    try:
        # left by a killed export (its process gone: without POSIX locks, a live one may be writing beside this)
        for name in os.listdir(out):
            pid = name[len(TMP_PREFIX):]
            if name.startswith(TMP_PREFIX) and not (pid.isdigit() and process_alive(int(pid))):
                shutil.rmtree(os.path.join(out, name), ignore_errors=True)
        if src is None:
            rebuild_from_zero(ckpt, tmp)
        else:
            read_adapters(src)  # raises on a missing file or key
            shutil.copytree(src, tmp)
            _add_records(tmp, ckpt)
        result = read_adapters(tmp)
        if os.path.exists(os.path.join(out, CONFIG_NAME)):
            os.remove(os.path.join(out, CONFIG_NAME))
        new = set(os.listdir(tmp))
        for name in sorted(new - {CONFIG_NAME}) + [CONFIG_NAME]:
            os.replace(os.path.join(tmp, name), os.path.join(out, name))
        for name in _export_files() - new:
            if os.path.exists(os.path.join(out, name)):
                os.remove(os.path.join(out, name))
        done = True
        return result
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if lock is not None:  # removed while still held (hold() takes a removed lock file for none)
            with contextlib.suppress(OSError):
                os.remove(lock.path)
            lock.release()
        if created and not done:  # a refused export leaves no folder behind (unless another wrote there since)
            with contextlib.suppress(OSError):
                os.rmdir(out)


def export(ckpt: str, out: str, from_zero: bool) -> None:
    from one4d_train.train.checkpoint import (CONFIG_FILE, MARKER, broken_past_newest, checkpoint_problem,
                                              complete_checkpoints, step_folders, verify_folder)

    if not os.path.isdir(ckpt):
        raise ExportError(f"checkpoint {ckpt} is not a directory")
    if not os.path.isfile(os.path.join(ckpt, MARKER)) and os.path.isdir(os.path.join(ckpt, "checkpoints")):
        ckpt_dir = os.path.join(ckpt, "checkpoints")  # a run directory, as eval takes one
        folders = step_folders(ckpt_dir)
        found = complete_checkpoints(ckpt_dir, folders)
        for broken, problem, _ in broken_past_newest(folders):
            print(f"one4d export: warning: passing over {broken}, damaged after its save: {problem}", file=sys.stderr)
        if not found:
            raise ExportError(f"{ckpt}: a run directory without a complete checkpoint (none of its checkpoints/ "
                              "finished saving)")
        print(f"run directory {ckpt}: exporting its newest complete checkpoint, {found[-1]}")
        ckpt = found[-1]
    if not out or (os.path.exists(out) and not os.path.isdir(out)):
        raise ExportError(f"out={out!r}: {'empty' if not out else 'exists and is not a folder'}: give the folder to "
                          "write the adapters into (made when missing)")
    problem = _target_problem(out)
    if problem:
        raise ExportError(f"out={out}: {problem}")
    problem = checkpoint_problem(ckpt)
    if problem:
        raise ExportError(f"{ckpt}: not a complete checkpoint: {problem}; export a step-* checkpoint whose save "
                          "finished and whose files are as it wrote them")
    src = os.path.join(ckpt, "adapters")
    rebuild = from_zero or not os.path.isdir(src)
    verify_folder(ckpt, "ds" if rebuild else "adapters")  # sizes alone miss flipped bytes, which load silently
    verify_folder(ckpt, CONFIG_FILE)  # the layout a rebuild reads, the data window an export records
    try:
        config, state = _write_export(None if rebuild else src, ckpt, out)
    except OSError as exc:
        raise ExportError(f"out={out}: cannot write the export there: {exc.strerror or exc} "
                          f"({exc.filename or out})") from None
    total = sum(t.numel() for t in state.values())
    print(f"exported {len(state)} tensors ({total / 2**20:.2f}M parameters; design {config['design']}, "
          f"branches {', '.join(config['branches'])}, link blocks {config['link_blocks']}) to {out}")
