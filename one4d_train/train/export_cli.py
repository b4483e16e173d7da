"""`one4d export checkpoint=DIR out=DIR [from_zero=true]`: the branch adapters and control links of a checkpoint
(or of a run directory's newest complete checkpoint whose files read back intact: a newer one damaged after its save,
or that cannot be read now, is passed over with a warning naming why).

Only a complete checkpoint (its COMPLETE marker lists every file at its size) is exported: not a `.tmp-step-*`
folder being written or left by a killed job, nor a `.tmp-deleted-step-*` one being deleted (refused by name), nor
one whose files changed since; the files it reads (adapters/, or ds/ for a rebuild, its config.yaml and train state)
must match the CRC-32s the marker records (a marker written before markers recorded them is not verified), else exit
2 naming the damaged file; a file this user may not read, or a checkpoint removed while it is exported, is named
with that cause. Every checkpoint already holds `adapters/` (written from the gathered trainable parameters); this
checks it (every file and key present, shapes consistent) and copies it to `out`. With `from_zero=true` (true/false,
yes/no, on/off, 1/0), or when a checkpoint has no adapters/, the adapters are rebuilt on the CPU from the DeepSpeed
ZeRO partitions instead, using the checkpoint's config.yaml (else its run's), checked against the tensors (LoRA
rank, branches of model.design, One4D LoRA parameters at all): no GPU and no process group needed. A DeepSpeed file
that does not load is named (nothing is unpickled: torch.load(weights_only=True)).

Output: lora_rgb.safetensors / lora_xyz.safetensors (diffusers WanTransformer3DModel LoRA keys),
control_links.safetensors (links + the XYZ patch embedding), adapter_config.json (the model settings, the
frozen base trained on, by content fingerprint, the data window trained at and the settings that pick the held-out
samples: data.num_frames, frame_stride, height, width, pointmap_percentiles, shuffle_buffer, which `one4d eval` of the
export samples at, and `source`: the checkpoint exported, its step and MLflow run), in `out`: a new or empty folder,
or an earlier export (its adapter_config.json there), whose files are replaced (written inside it and read back whole
first); never a folder inside a checkpoint or a run's checkpoints/, nor one named step-*.

exit codes: 0 exported, 2 bad arguments or a checkpoint that cannot be exported, 1 any other failure.
"""
from __future__ import annotations

import contextlib
import errno
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
    from one4d_train.model.adapters import AdapterError, data_window, export_adapters
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
    try:  # the config against the tensors: another LoRA rank scaled lora_B wrong and recorded another r, silently
        export_adapters(state, cfg.model, out, base=trained_identity(ckpt), window=data_window(cfg.data))
    except AdapterError as exc:
        runs = cfg_path != os.path.join(ckpt, "config.yaml")  # a later start of the run may have changed it
        raise ExportError(f"{ckpt}: its ZeRO partitions do not fit {cfg_path}, the config the rebuild reads: {exc}"
                          + (" (its run's config.yaml: the checkpoint holds no config.yaml of its own)" if runs
                             else "")) from None


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


def _run_checkpoints(folder: str) -> bool:
    """`folder` is a run directory's checkpoints/ (its run's files beside it, or its own `latest`), where a resume
    takes a folder for a checkpoint and moves one without a complete marker away as damaged."""
    run = os.path.dirname(folder)
    return os.path.basename(folder) == "checkpoints" and any(
        os.path.exists(os.path.join(where, name)) for where, name in (
            (folder, "latest"), (run, "run_dir_id"), (run, "mlflow.db"), (run, "train.lock")))


def _target_problem(out: str) -> str | None:
    """Why `out` cannot take an export: inside a checkpoint (its adapters/ or another folder of it: a checkpoint's
    files would change under its COMPLETE marker, or another step's adapters be replaced by these) or a run's
    checkpoints/, named like a checkpoint (step-*), a folder this user cannot list, or a folder holding anything but
    an earlier export's files (which it replaces; files of an export's names without its adapter_config.json are
    not one's)."""
    from one4d_train.model.adapters import CONFIG_NAME
    from one4d_train.train.checkpoint import MARKER, STEP_DIR

    here = os.path.realpath(out)
    while True:
        if os.path.isfile(os.path.join(here, MARKER)) or all(os.path.isdir(os.path.join(here, d))
                                                              for d in ("ds", "train_state")):
            return (f"inside the checkpoint {here}, whose files its {MARKER} marker lists (its adapters/ already "
                    "holds its export); give a folder outside every checkpoint")
        if _run_checkpoints(here):
            return (f"inside {here}, a run's checkpoints folder, whose folders a resume takes for checkpoints (and "
                    "moves one without a complete marker away as damaged); give a folder outside it")
        parent = os.path.dirname(here)
        if parent == here:
            break
        here = parent
    for name in sorted({os.path.basename(os.path.normpath(out)), os.path.basename(os.path.realpath(out))}):
        if STEP_DIR.match(name):
            return (f"is named like a checkpoint ({name}): a resume, `one4d eval` and `one4d export` take a step-* "
                    f"folder for one (and one without a {MARKER} marker for a damaged one); give another name")
    try:
        names = os.listdir(out) if os.path.isdir(out) else []
    except OSError as exc:  # a folder this user may not list
        return f"cannot read it ({exc.strerror or exc}): give a folder this user can read and write"
    others = sorted(n for n in names if n not in _export_files() and n != LOCK_NAME and not n.startswith(TMP_PREFIX))
    if others == ["eval"] and os.path.isfile(os.path.join(out, CONFIG_NAME)):  # `one4d eval checkpoint=out` wrote it
        return (f"is an earlier export that was evaluated: {os.path.join(out, 'eval')} holds the scores of its "
                "adapters, which a new export would replace under them; move that eval/ folder away first (or "
                "give a new folder)")
    if others:
        return (f"holds {', '.join(others[:5])}{' ...' if len(others) > 5 else ''}, not an earlier export's files "
                "alone (an export replaces an earlier one's files): give a new or empty folder, or an earlier export")
    alone = sorted(n for n in names if n in _export_files())
    if alone and CONFIG_NAME not in names:
        return (f"holds {', '.join(alone)} without an {CONFIG_NAME}: not an earlier export (one cut short while its "
                "files moved in has none either), so nothing there is replaced: give a new or empty folder, or move "
                "those files away")
    return None


def _add_records(export: str, ckpt: str) -> None:
    """Record in the export's adapter_config.json the checkpoint it holds (`source`: its path and step, and its
    MLflow run where its train state names one), and the frozen base (from the train state) and the data window and
    sample settings (from the config.yaml it was written under) where the checkpoint's adapters/, written before
    they recorded them, lack them."""
    import json

    from one4d_train.config import load_config
    from one4d_train.configtools import ConfigError
    from one4d_train.model.adapters import CONFIG_NAME, SAMPLE_KEYS, WINDOW_KEYS, base_record, data_window
    from one4d_train.train.checkpoint import main_train_state, marker_of
    from one4d_train.train.warm_start import trained_identity

    path = os.path.join(export, CONFIG_NAME)
    with open(path) as f:
        config = json.load(f)
    recorded = dict(config)
    base = trained_identity(ckpt)  # a train state that does not read: CheckpointDamaged naming it
    if "base" not in config and base:
        config["base"] = base_record(base)
    own, window = _own_config(ckpt), config.get("data")
    if own and (window is None or not {*WINDOW_KEYS, *SAMPLE_KEYS} <= set(window)):
        try:
            config["data"] = {**data_window(load_config([f"config={own}"]).data), **(window or {})}
        except ConfigError as exc:
            if window is None:
                print(f"one4d export: {own} does not load ({exc}): the export records no data window (an "
                      "evaluation of it needs config= or data.*)", file=sys.stderr)
    state = main_train_state(ckpt) or {}
    config["source"] = {"checkpoint": os.path.realpath(ckpt), "step": marker_of(ckpt).get("step", state.get("step")),
                        **({"mlflow_run_id": state["mlflow_run_id"]} if state.get("mlflow_run_id") else {})}
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
            # the files as this user's: a read-only checkpoint's modes (copied with them) left the temporary export
            # unwritable, and not removable after a failure
            shutil.copytree(src, tmp, copy_function=shutil.copyfile)
            os.chmod(tmp, 0o755)
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


def _read_files(ckpt: str, from_zero: bool) -> list[str]:
    """The files of checkpoint `ckpt` an export reads, relative to it: adapters/ (ds/ for a rebuild), the config.yaml
    it was written under and rank 0's train state (the base it was trained on)."""
    from one4d_train.train.checkpoint import CONFIG_FILE, marker_of

    rebuild = from_zero or not os.path.isdir(os.path.join(ckpt, "adapters"))
    read = ("ds" if rebuild else "adapters", CONFIG_FILE, "train_state/rank-00000.json")
    return [rel for rel in marker_of(ckpt).get("files") or {} if any(rel == r or rel.startswith(r + "/") for r in read)]


def _newest_intact(run: str, from_zero: bool) -> str:
    """The newest complete checkpoint of run directory `run` whose files an export reads match their CRC-32s; newer
    ones, damaged after their save (a file cut short or with flipped bytes) or that cannot be read now, are passed
    over with a warning naming why, as a resume passes over damaged ones."""
    from one4d_train.train.checkpoint import check_files, step_folders

    folders = step_folders(os.path.join(run, "checkpoints"))
    for path, problem, may_pass in reversed(folders):
        if problem is None:
            changed, unreadable = check_files(path, _read_files(path, from_zero))
            if not changed and not unreadable:
                print(f"run directory {run}: exporting its newest complete checkpoint, {path}")
                return path
            problem, may_pass = "; ".join(changed or unreadable), not changed
        what = "which cannot be read now" if may_pass else "damaged after its save"
        print(f"one4d export: warning: passing over {path}, {what}: {problem}", file=sys.stderr)
    if any(problem is None for _, problem, _ in folders):
        raise ExportError(f"{run}: none of its complete checkpoints can be exported (each is damaged or cannot be "
                          "read now, above)")
    raise ExportError(f"{run}: a run directory without a complete checkpoint (none of its checkpoints/ finished "
                      "saving)")


def _failure(exc: OSError, ckpt: str, out: str) -> str:
    """An OSError of the export as one line blaming what failed: a file of the checkpoint that cannot be read (this
    user may not: permission denied), else writing into `out`."""
    if isinstance(exc, shutil.Error) and exc.args and isinstance(exc.args[0], list) and exc.args[0]:
        src, dst, why = exc.args[0][0]  # copytree's first failed file
        return f"cannot copy {src} to {dst}: {why}"
    where = os.path.realpath(str(exc.filename or ""))
    if exc.filename and (where + os.sep).startswith(os.path.realpath(ckpt) + os.sep):
        denied = ": this user may not read it" if exc.errno in (errno.EACCES, errno.EPERM) else ""
        return f"checkpoint {ckpt}: {exc.filename}: cannot be read ({exc.strerror or exc}){denied}"
    return f"out={out}: cannot write the export there: {exc.strerror or exc} ({exc.filename or out})"


def export(ckpt: str, out: str, from_zero: bool) -> None:
    from one4d_train.model.adapters import AdapterError
    from one4d_train.train.checkpoint import CONFIG_FILE, MARKER, CheckpointDamaged, incompleteness, verify_folder

    if not os.path.isdir(ckpt):
        raise ExportError(f"checkpoint {ckpt} is not a directory")
    verified = False
    if not os.path.isfile(os.path.join(ckpt, MARKER)) and os.path.isdir(os.path.join(ckpt, "checkpoints")):
        ckpt, verified = _newest_intact(ckpt, from_zero), True  # a run directory, as eval takes one
    if not out or (os.path.exists(out) and not os.path.isdir(out)):
        raise ExportError(f"out={out!r}: {'empty' if not out else 'exists and is not a folder'}: give the folder to "
                          "write the adapters into (made when missing)")
    problem = _target_problem(out)
    if problem:
        raise ExportError(f"out={out}: {problem}")
    problem, may_pass = incompleteness(ckpt)
    if problem and may_pass:  # a file missing or that this user may not read: no damage
        raise ExportError(f"checkpoint {ckpt} cannot be read now: {problem}; export it once it can be read (its "
                          "permissions, the file system), or another checkpoint")
    if problem:
        raise ExportError(f"{ckpt}: not a complete checkpoint: {problem}; export a step-* checkpoint whose save "
                          "finished and whose files are as it wrote them")
    if os.path.basename(os.path.normpath(ckpt)).startswith(".tmp-"):
        raise ExportError(f"{ckpt}: a checkpoint's temporary folder (.tmp-step-*: a save not yet renamed to its step-* "
                          "folder, its files not yet all flushed; .tmp-deleted-step-*: a checkpoint being deleted), "
                          "never read: export a step-* checkpoint")
    src = os.path.join(ckpt, "adapters")
    rebuild = from_zero or not os.path.isdir(src)
    if not verified:
        verify_folder(ckpt, "ds" if rebuild else "adapters")  # sizes alone miss flipped bytes, which load silently
        verify_folder(ckpt, CONFIG_FILE)  # the layout a rebuild reads, the data window an export records
    try:
        config, state = _write_export(None if rebuild else src, ckpt, out)
    except (OSError, AdapterError, CheckpointDamaged, ExportError) as exc:
        gone = "it is gone" if not os.path.isdir(ckpt) else incompleteness(ckpt)[0]
        if gone:  # what failed was reading a checkpoint that is no longer there as it was
            raise ExportError(f"checkpoint {ckpt} was removed or changed while it was exported ({gone}): a run's "
                              "train.keep_last prunes its older checkpoints, a resume sets newer ones aside; export "
                              "another one (a run directory exports its newest)") from None
        if not isinstance(exc, OSError):
            raise
        raise ExportError(_failure(exc, ckpt, out)) from None
    total = sum(t.numel() for t in state.values())
    print(f"exported {len(state)} tensors ({total / 2**20:.2f}M parameters; design {config['design']}, "
          f"branches {', '.join(config['branches'])}, link blocks {config['link_blocks']}) to {out}")
