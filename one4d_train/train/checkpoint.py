"""Atomic checkpoints in `<run_dir>/checkpoints/`:

    step-00000500/
      ds/             DeepSpeed: trainable parameters, optimizer, LR scheduler (frozen base excluded)
      train_state/    per rank: rank-00000.json (step, samples, loader position, python/numpy RNG, run id, the
                                unlogged window of losses, a pending evaluation)
                                rank-00000.safetensors (torch / CUDA / loss-generator RNG states)
      adapters/       task.export of the gathered trainable parameters (train.export_adapters=true only)
      config.yaml     the merged config the run trained this checkpoint with (export and eval rebuild from it)
      COMPLETE        written last inside the directory: step, world size, Slurm job id, every file with its size
                      and CRC-32
    latest            name of the newest checkpoint, replaced atomically after the rename
    abandoned-<UTC time>/   checkpoints of an abandoned timeline (see set_aside), kept, never read
    damaged-step-X-<UTC time>/   a checkpoint whose files no longer match their CRC-32 (set_damaged_aside), kept

Everything is written into `.tmp-step-X`, fsynced and checksummed (each rank its own files, then rank 0 the rest),
renamed to `step-X`; `resume=auto` takes the newest directory whose COMPLETE matches its files, so a kill at any
point leaves the previous checkpoint in use. A resume first verifies the CRC-32 of every file it reads (each rank
its own): sizes alone miss flipped bytes, and neither torch.load nor safetensors checks the data it reads. The
folder holds one linear history: a run that resumes from anything but its newest checkpoint first moves the newer
ones aside, unless they continue the start its very command made from that checkpoint (branch_progress). Nothing
is unpickled on load: JSON, safetensors, and DeepSpeed's files through torch.load(weights_only=True); a file that
does not load is reported by name (CheckpointDamaged).
"""
from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import random
import re
import shutil
import stat
import time
import zipfile
import zlib

import numpy as np
import torch
import torch.distributed as dist
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file

from one4d_train.configtools import ConfigError, flatten
from one4d_train.tensor_files import save_tensors
from one4d_train.train.distributed import from_every_rank

log = logging.getLogger(__name__)

STEP_DIR = re.compile(r"^step-(\d{8})$")
MARKER = "COMPLETE"
CONFIG_FILE = "config.yaml"
# "STEP:SECONDS[:SIGNAL]": stall inside that checkpoint's write (kill tests), first sending SIGNAL to this process
TEST_SLEEP_ENV = "ONE4D_TEST_CHECKPOINT_SLEEP"
CRC_CHUNK = 8 << 20  # bytes per zlib.crc32 call: a file is checksummed without being held in memory
STATE_KEYS = ("step", "samples_seen", "bad_streak", "skipped_total", "loader", "rng", "mlflow_run_id")  # train_state
RNG_TENSORS = ("torch", "generator")
DAMAGED_ADVICE = ("Resume from another checkpoint (resume=PATH of an earlier one, or resume=auto, which sets a "
                  "damaged checkpoint aside and takes the newest intact one), or put back an intact copy of the file")


class CheckpointSaveError(RuntimeError):
    """A checkpoint that could not be written (a full disk, a file system error): the message says which step,
    the space left and where the run resumes from."""


class CheckpointDamaged(ValueError):
    """A checkpoint file that does not read back as it was written: its CRC-32 differs from the one its COMPLETE
    marker records, or it does not load. The message names the file."""


def is_set_aside(checkpoint: str) -> bool:
    """A checkpoint of an abandoned timeline: .../checkpoints/abandoned-TIME/step-X (see set_aside)."""
    return os.path.basename(os.path.dirname(os.path.abspath(checkpoint))).startswith("abandoned-")


def run_dir_of(checkpoint: str) -> str | None:
    """The run directory of a checkpoint: <run_dir>/checkpoints/step-X, or .../checkpoints/abandoned-TIME/step-X
    for one set aside; None for one outside that layout (a copy elsewhere: its grandparent is an unrelated folder,
    holding no store of its run)."""
    parent = os.path.dirname(os.path.abspath(checkpoint))
    if is_set_aside(checkpoint):
        parent = os.path.dirname(parent)
    return os.path.dirname(parent) if os.path.basename(parent) == "checkpoints" else None


def main_train_state(checkpoint: str) -> dict | None:
    """Rank 0's train state of `checkpoint` (its MLflow run, step, started_from ...), unverified; None when it does not
    read as a JSON object: the lineage questions it answers then have no evidence."""
    try:
        with open(os.path.join(checkpoint, "train_state", "rank-00000.json")) as f:
            state = json.load(f)
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None


def continued_elsewhere(ckpt_dir: str, resumed: str, run_id: str | None) -> bool:
    """Whether an abandoned timeline (abandoned-*/step-N, N past `resumed`'s step) continued the MLflow run `run_id`
    past the checkpoint `resumed`: resuming it starts a branch, on its first start (set_aside moved the newer
    folders) and on a requeue of that start before its first checkpoint (nothing left to move) alike."""
    match = STEP_DIR.match(os.path.basename(os.path.normpath(resumed)))
    if run_id is None or match is None:
        return False
    for folder in glob.glob(os.path.join(ckpt_dir, "abandoned-*", "step-*")):
        later = STEP_DIR.match(os.path.basename(folder))
        if later and int(later.group(1)) > int(match.group(1)):
            state = main_train_state(folder)  # None: an abandoned checkpoint that does not read, no evidence
            if state is not None and state.get("mlflow_run_id") == run_id:
                return True
    return False


def start_point(checkpoint: str) -> dict | None:
    """Checkpoint `checkpoint` as the start of a timeline: the MLflow run and step of its rank 0's train state (an
    MLflow run's checkpoints form one line, so the two name it wherever it lies), and its resolved path (all that is
    left to know it by once train.keep_last pruned it); None when they do not read. The trainer records the start
    point of the resume=PATH that began a timeline in each of its checkpoints ("started_from")."""
    state = main_train_state(checkpoint)
    if state is None or not state.get("mlflow_run_id") or "step" not in state:
        return None
    return {"mlflow_run_id": state["mlflow_run_id"], "step": state["step"], "path": os.path.realpath(checkpoint)}


def began_with(started_from, resumed: str) -> bool:
    """Whether a timeline whose checkpoints record `started_from` began with a start from checkpoint `resumed`: by
    its MLflow run and step while it reads, wherever it lies (a moved run directory); by its path once it does not
    (pruned by train.keep_last, or deleted: the same resume=PATH command run again still names it)."""
    if not isinstance(started_from, dict):
        return False
    point = start_point(resumed)
    if point is not None:
        return all(started_from.get(k) == point[k] for k in ("mlflow_run_id", "step"))
    return started_from.get("path") == os.path.realpath(resumed)


SAME_COMMAND_ANYWHERE = ("run_dir", "resume")  # the same command in a moved run directory, or requeued (resume=auto)
_ABSENT = object()


def config_changes(checkpoint: str, config_text: str) -> list[str] | None:
    """The keys whose value in `config_text` (a config.yaml's text) differs from the config.yaml checkpoint
    `checkpoint` was trained with, but for SAME_COMMAND_ANYWHERE; None when either does not read. A key that the
    checkpoint's config.yaml lacks (written by a version before the key existed) counts as its default, which is
    what that version did."""
    from one4d_train.config import One4DConfig
    from one4d_train.configtools import to_yaml

    try:
        with open(os.path.join(checkpoint, CONFIG_FILE)) as f:
            theirs = flatten(yaml.safe_load(f))
        ours = flatten(yaml.safe_load(config_text))
    except (OSError, ValueError, AttributeError, yaml.YAMLError):  # none, not YAML, not a mapping
        return None
    defaults = flatten(yaml.safe_load(to_yaml(One4DConfig())))
    return sorted(k for k in theirs.keys() | ours.keys() if k not in SAME_COMMAND_ANYWHERE
                  and theirs.get(k, defaults.get(k, _ABSENT)) != ours.get(k, _ABSENT))


def branch_progress(ckpt_dir: str, resumed: str, config_text: str) -> tuple[str | None, list[str]]:
    """Where a start from checkpoint `resumed` (resume=PATH) goes on when its command is run again after that start
    was stopped: (the newest complete checkpoint of `ckpt_dir` when its timeline began with a start from `resumed`
    (began_with: also once `resumed` itself was pruned) and it was trained with the same config (`config_text`), else
    None; the config keys that differ where only the config does). Re-running the command resumed `resumed` again and
    set the progress since aside as abandoned; another config asks for another branch from `resumed`, as before
    (resume=auto continues whatever the config)."""
    found = complete_checkpoints(ckpt_dir)
    if not found or os.path.realpath(found[-1]) == os.path.realpath(resumed):
        return None, []
    state = main_train_state(found[-1])  # None: its own resume names it when it is read
    if state is None or not began_with(state.get("started_from"), resumed):
        return None, []
    changes = config_changes(found[-1], config_text)
    if changes is None:
        return None, []
    return (None, changes) if changes else (found[-1], [])


def config_of(checkpoint: str) -> str:
    """The config to rebuild a checkpoint's model with: its run's config.yaml (the latest start's: model files may
    have moved since, while a resume that changes what was trained is refused), else the checkpoint's own (one copied
    out of its run directory); "" when neither is there."""
    run_dir = run_dir_of(checkpoint)
    runs = [os.path.join(run_dir, CONFIG_FILE)] if run_dir else []  # not a copy's unrelated folder
    for path in (*runs, os.path.join(checkpoint, CONFIG_FILE)):
        if os.path.isfile(path):
            return path
    return ""


def step_name(step: int) -> str:
    return f"step-{step:08d}"


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: str) -> None:
    for dirpath, _, files in os.walk(root):
        for f in files:
            _fsync_path(os.path.join(dirpath, f))
        _fsync_path(dirpath)


def _listing(root: str) -> dict[str, int]:
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            full = os.path.join(dirpath, f)
            rel = os.path.relpath(full, root)
            if rel != MARKER:
                out[rel] = os.path.getsize(full)
    return out


def crc32_of(path: str) -> int:
    """The CRC-32 (zlib) of a file's bytes, read in chunks."""
    buf = bytearray(CRC_CHUNK)
    view, crc = memoryview(buf), 0
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            crc = zlib.crc32(view[:n], crc)
    return crc


def checksums(root: str, paths: list[str]) -> dict[str, int]:
    """{path relative to `root`: CRC-32} of the files `paths` under checkpoint folder `root`."""
    return {os.path.relpath(p, root): crc32_of(p) for p in paths}


def damaged_files(path: str, rels: list[str] | None = None) -> list[str]:
    """The files of checkpoint `path` (of `rels`, relative to it; None: all) whose bytes no longer match the CRC-32
    its COMPLETE marker records, one line each naming the file; [] when they match, or for a marker written before
    markers recorded CRC-32s (nothing to verify against)."""
    changed, unreadable = check_files(path, rels)
    return changed + unreadable


def check_files(path: str, rels: list[str] | None = None) -> tuple[list[str], list[str]]:
    """(files of checkpoint `path` (of `rels`; None: all) whose bytes differ from the CRC-32 its marker records,
    files that cannot be read now: missing or an I/O error, which may pass, so no reason to set the checkpoint
    aside), as lines naming each; nothing for a marker that records no CRC-32s."""
    crcs = marker_of(path).get("crc32")
    if not isinstance(crcs, dict):
        return [], []
    changed, unreadable = [], []
    for rel in sorted(crcs if rels is None else set(rels) & crcs.keys()):
        full, saved = os.path.join(path, rel), crcs[rel]
        try:
            crc = crc32_of(full)
        except FileNotFoundError:
            unreadable.append(f"{full}: missing")
            continue
        except OSError as exc:  # an I/O error reading it back
            unreadable.append(f"{full}: cannot be read ({exc})")
            continue
        if crc != saved:
            said = f"{saved:08x}" if isinstance(saved, int) else repr(saved)
            changed.append(f"{full}: its bytes changed after the save (CRC-32 {crc:08x}, {MARKER} records {said})")
    return changed, unreadable


def verify_folder(path: str, folder: str) -> None:
    """Verify the files of checkpoint `path` under `folder` ("adapters", "ds"; or the file itself: "config.yaml")
    against their marker's CRC-32s (nothing to verify in a folder that is no checkpoint, or under a marker that
    records none); CheckpointDamaged naming the damaged files otherwise."""
    if not os.path.isfile(os.path.join(path, MARKER)):
        return
    changed, unreadable = check_files(path, [rel for rel in marker_of(path).get("files") or {}
                                             if rel == folder or rel.startswith(folder + "/")])
    if changed:
        raise CheckpointDamaged(f"checkpoint {path} is damaged: {'; '.join(changed + unreadable)}. Use another "
                                "checkpoint, or put back an intact copy of the file")
    if unreadable:  # not damage: a file this user may not read, or one removed since (a prune)
        raise CheckpointDamaged(f"checkpoint {path} cannot be read now: {'; '.join(unreadable)}. Run again once "
                                "the files can be read (permissions, the file system), or use another checkpoint")


def resume_files(path: str, rank: int) -> list[str]:
    """The files of checkpoint `path` that `rank` reads to resume, relative to it: its own ZeRO partitions,
    DeepSpeed's files of no partition (ZeRO-1/2's model states, which every rank reads) and its train_state. Every
    file of ds/ is some rank's own, so ranks that each verify theirs and agree have verified all DeepSpeed reads."""
    own = re.compile(rf"(^|_)zero_pp_rank_{rank}_")
    listed = sorted(marker_of(path).get("files") or {})
    ds = [rel for rel in listed if rel.startswith("ds/") and (own.search(os.path.basename(rel))
                                                             or "zero_pp_rank_" not in rel)]
    return ds + [f"train_state/rank-{rank:05d}.json", f"train_state/rank-{rank:05d}.safetensors"]


def open_deepspeed_files(path: str, rank: int) -> None:
    """Open the DeepSpeed files `rank` reads to resume from checkpoint `path` as DeepSpeed will, memory-mapped (their
    zip directory and pickle, not the tensor data): CheckpointDamaged names one that does not load."""
    for rel in resume_files(path, rank):
        if rel.startswith("ds/") and rel.endswith(".pt"):
            load_weights_only(os.path.join(path, rel), map_location="cpu", mmap=True)


def damaged_on_any_rank(path: str, rank: int) -> tuple[list[str], list[str]]:
    """Collective: (changed, unreadable) check_files lines of the files any rank reads to resume from `path`, each
    rank verifying its own (resume_files: none reads another's partitions over a shared file system); the same
    lists on every rank."""
    everyone = from_every_rank(check_files(path, resume_files(path, rank)))
    return (sorted({line for lines, _ in everyone for line in lines}),
            sorted({line for _, lines in everyone for line in lines}))


def _stamped(prefix: str) -> str:
    """`prefix` + the UTC time, with -1, -2 ... where that path exists already: a folder name of its own."""
    base = prefix + time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    dest, n = base, 1
    while os.path.exists(dest):
        dest, n = f"{base}-{n}", n + 1
    return dest


def set_damaged_aside(path: str) -> str:
    """Move the damaged checkpoint `path`, whole, to `damaged-<its name>-<UTC time>` beside it: not a step folder,
    so resume=auto never picks it again and pruning never counts it; its files stay for inspection. Returns where."""
    dest = _stamped(os.path.join(os.path.dirname(os.path.abspath(path)),
                                 f"damaged-{os.path.basename(os.path.normpath(path))}-"))
    os.rename(path, dest)
    _fsync_path(os.path.dirname(dest))
    return dest


def only_damaged_left(ckpt_dir: str) -> str | None:
    """The refusal of resume=auto where `ckpt_dir` holds damaged checkpoints (set aside, or step folders whose files
    changed: broken_checkpoints) and no complete one: a fresh
    start there is resume=never's to ask for, not a silent one (a second launch after the first set every one aside
    found nothing to resume and started from step 0). None when that is not the case."""
    damaged = sorted(n for n in (os.listdir(ckpt_dir) if os.path.isdir(ckpt_dir) else []) if n.startswith("damaged-"))
    folders = step_folders(ckpt_dir)
    broken = [f"{os.path.basename(path)}: {problem}" for path, problem, _ in broken_checkpoints(ckpt_dir, folders)]
    if not (damaged or broken) or complete_checkpoints(ckpt_dir, folders):
        return None
    found = ([f"only damaged ones set aside ({', '.join(damaged)})"] if damaged else []) + (
        [f"{'and ' if damaged else 'only '}damaged step folders ({'; '.join(broken)})"] if broken else [])
    return (f"no intact checkpoint left in {ckpt_dir}, {' '.join(found)}: put back intact copies, resume=PATH of "
            "another run's checkpoint, or resume=never to start afresh")


def choose_resume(resume: str, ckpt_dir: str, rank: int,
                  branch: tuple[str, str] | None = None) -> tuple[str | None, bool]:
    """Collective: (the checkpoint to resume from (resolve_resume_once's choice) once every rank has verified the
    files it reads against their CRC-32s, whether it is an older one than the newest: the one the start-up checks
    saw was set aside). resume=auto sets a damaged one aside (rank 0, with a warning naming its files) and tries the
    next older complete one. branch=(PATH, config text): `resume` is the newest checkpoint of the start the same
    resume=PATH command made (branch_progress), that command's own progress: a damaged one is set aside as
    resume=auto does and the branch's next newest tried, then PATH itself (branch_fallback). ConfigError for a
    damaged resume=PATH, for damage with no intact checkpoint left (a fresh start is resume=never's, never a silent
    fallback), and for a file that cannot be read now (missing, an I/O error: it may pass, so nothing is set aside).
    A step folder newer than every complete one whose file sizes or marker changed (broken_checkpoints) is damaged
    as well: resume=auto sets it aside the same way, rather than taking it for a save that never finished."""
    from one4d_train.train.distributed import broadcast_from_main

    set_aside_now = []
    if resume == "auto":  # the broken ones newer than the newest complete: moved before the choice, no fall-back
        refusal = None
        if rank == 0:
            try:
                refusal = _set_broken_aside(ckpt_dir)
            except OSError as exc:  # said on every rank, not raised on rank 0 alone while the others wait
                refusal = f"a damaged checkpoint in {ckpt_dir} could not be moved aside: {exc}"
        refusal = broadcast_from_main(refusal)
        if refusal:
            raise ConfigError(f"key 'resume': {refusal}")
    while True:
        path = resolve_resume_once(resume, ckpt_dir)
        if path is None:
            refusal = broadcast_from_main(only_damaged_left(ckpt_dir) if resume == "auto" else None)
            if refusal:
                raise ConfigError(f"key 'resume': {refusal}")
            return None, False
        damaged, unreadable = damaged_on_any_rank(path, rank)
        if unreadable:
            moved = f" ({', '.join(set_aside_now)} set aside as damaged before)" if set_aside_now else ""
            raise ConfigError(f"key 'resume': {path} cannot be read now: {'; '.join(unreadable)}. It was not set "
                              f"aside{moved}: run again once the file system serves it (or resume=PATH of another "
                              "checkpoint)")
        if not damaged:
            return path, bool(set_aside_now)
        if resume != "auto" and (branch is None or resume == branch[0]):  # PATH as given: the user's, kept
            raise ConfigError(f"key 'resume': {resume} is damaged: {'; '.join(damaged)}. {DAMAGED_ADVICE}")
        set_aside_now.append(path)  # on every rank: each decides the same from here
        if rank == 0:  # the others wait for its next choice (resolve_resume_once), made after the move
            dest = set_damaged_aside(path)
            what = (f"resume={branch[0]}: checkpoint {path}, where this command went on," if branch
                    else f"resume=auto: checkpoint {path}")
            then = " of the same start, then PATH itself" if branch else ""
            log.warning("%s is damaged: %s. Moved to %s (kept for inspection, never resumed); trying the next older "
                        "checkpoint%s", what, "; ".join(damaged), dest, then)
        if branch is not None:
            resume, branch = branch_fallback(ckpt_dir, *branch, set_aside_now, rank)


def _set_broken_aside(ckpt_dir: str) -> str | None:
    """Rank 0 of choose_resume: set the broken step folders aside as damaged (newest first, each named in a
    warning); the refusal when one newer than the newest complete checkpoint may pass (a file missing, an I/O
    error), with nothing moved from there on. An older one that may pass stays where it is (resume=auto does not
    read it)."""
    folders = step_folders(ckpt_dir)
    past_newest = {path for path, _, _ in broken_past_newest(folders)}
    set_aside_now = []  # for the refusal's message
    for path, problem, may_pass in reversed(broken_checkpoints(ckpt_dir, folders)):
        newer = path in past_newest
        if may_pass and newer:
            moved = f" ({', '.join(set_aside_now)} set aside as damaged before)" if set_aside_now else ""
            return (f"{path} cannot be read now: {problem}. It was not set aside{moved}: run again once the file "
                    "system serves it or the file is put back (or resume=PATH of another checkpoint)")
        if may_pass:
            continue
        dest = set_damaged_aside(path)
        if newer:
            set_aside_now.append(path)
        log.warning("resume=auto: checkpoint %s is damaged: %s. Moved to %s (kept for inspection, never resumed)%s",
                    path, problem, dest, "; trying the next older checkpoint" if newer else "")
    return None


def branch_fallback(ckpt_dir: str, start: str, config_text: str, set_aside_now: list[str],
                    rank: int) -> tuple[str, tuple[str, str] | None]:
    """Collective: where resume=`start` (trained with `config_text`) tries next once the newest checkpoint of its
    branch was set aside as damaged: (the branch's newest one left (branch_progress), its branch), else (`start`
    itself, None: PATH is the user's, refused when damaged, never set aside). ConfigError when `start` is gone
    too (pruned): nothing of that start is left to resume."""
    from one4d_train.train.distributed import broadcast_from_main

    choice = None
    if rank == 0:
        newest = branch_progress(ckpt_dir, start, config_text)[0]
        choice = newest or (start if is_complete(start) else None)
        if choice:
            log.warning("resume=%s: falling back to %s", start, choice)
    choice = broadcast_from_main(choice)
    if choice is None:
        raise ConfigError(f"key 'resume': {start}: no such checkpoint directory (pruned?), and the checkpoints that "
                          f"went on from it are damaged ({', '.join(set_aside_now)} set aside as damaged): put back "
                          "an intact copy of one, or resume=PATH of another checkpoint")
    return choice, ((start, config_text) if choice != start else None)


def unloadable_advice(path: str) -> str:
    """What to do about checkpoint `path` whose file did not load (its marker, if written before markers recorded
    CRC-32s, let resume=auto choose it)."""
    return (f"Nothing was loaded: put back an intact copy of the file, or resume from another checkpoint: move {path} "
            f"out of {os.path.dirname(os.path.abspath(path))} (resume=auto then takes the newest one left), or name an "
            "earlier one with resume=PATH")


@contextlib.contextmanager
def loading(path: str):
    """Within the block, a CheckpointDamaged from reading checkpoint `path` goes on with what to do about it."""
    try:
        yield
    except CheckpointDamaged as exc:
        raise CheckpointDamaged(f"{exc}. {unloadable_advice(path)}") from None


def read_state_json(path: str, rank: int) -> dict:
    """train_state/rank-R.json of checkpoint `path`, verified against its marker's CRC-32 (when it records one)
    and holding the keys a resume reads; CheckpointDamaged naming the file otherwise."""
    rel = f"train_state/rank-{rank:05d}.json"
    damaged = damaged_files(path, [rel])
    if damaged:
        raise CheckpointDamaged(damaged[0])
    full = os.path.join(path, rel)
    try:
        with open(full) as f:
            state = json.load(f)
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise CheckpointDamaged(f"{full}: not valid JSON ({exc}): the file is damaged") from None
    missing = [k for k in STATE_KEYS if k not in state] if isinstance(state, dict) else list(STATE_KEYS)
    if missing:
        raise CheckpointDamaged(f"{full}: no key {', '.join(map(repr, missing))}: the file is damaged")
    return state


def write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_path(os.path.dirname(path) or ".")


def is_complete(path: str) -> bool:
    return checkpoint_problem(path) is None


def checkpoint_problem(path: str) -> str | None:
    """Why `path` is not a complete checkpoint (its COMPLETE marker lists every file at its size), None when it
    is one."""
    return incompleteness(path)[0]


def incompleteness(path: str) -> tuple[str | None, bool]:
    """(checkpoint_problem, whether it may pass: a file missing or an I/O error, which a file system that serves
    the folder late or a file put back ends, as against a file whose size or marker changed)."""
    try:
        files = marker_of(path)["files"]
    except FileNotFoundError:
        return f"no {MARKER} marker (a save that did not finish, or a copy made without it)", False
    except OSError as exc:
        return f"its {MARKER} marker cannot be read now ({exc})", True
    except (ValueError, KeyError, TypeError) as exc:
        return f"its {MARKER} marker is damaged ({exc!r})", False
    if not isinstance(files, dict) or not files:
        return f"its {MARKER} marker lists no files", False
    for rel, size in sorted(files.items()):
        full = os.path.join(path, rel)
        try:
            found = os.stat(full)
        except (FileNotFoundError, NotADirectoryError):
            return f"{full}, listed in {MARKER}, is missing", True
        except OSError as exc:  # a folder this user may not search (permission denied), an I/O error
            return f"{full}, listed in {MARKER}, cannot be read now ({exc.strerror or exc})", True
        if not stat.S_ISREG(found.st_mode):
            return f"{full}, listed in {MARKER}, is missing", True
        if found.st_size != size:
            return f"{full} is {found.st_size} bytes, {MARKER} says {size} (cut short or changed)", False
    return None, False


def step_folders(ckpt_dir: str) -> list[tuple[str, str | None, bool]]:
    """(path, checkpoint_problem (None: complete), whether it may pass) of the step folders of `ckpt_dir`, oldest
    first; a folder that a prune renamed away while it was looked at is left out."""
    if not os.path.isdir(ckpt_dir):
        return []
    out = []
    for name in sorted(n for n in os.listdir(ckpt_dir) if STEP_DIR.match(n)):
        problem, may_pass = incompleteness(os.path.join(ckpt_dir, name))
        if problem is None or os.path.isdir(os.path.join(ckpt_dir, name)):
            out.append((os.path.join(ckpt_dir, name), problem, may_pass))
    return out


def broken_checkpoints(ckpt_dir: str, folders: list | None = None) -> list[tuple[str, str, bool]]:
    """The step folders (step_folders; `folders`: as listed already) that are not complete, oldest first. A save
    renames its folder to step-X only once complete, and a prune renames one away before deleting it, so such a
    folder was complete and changed since: a file cut short, removed or resized, or its marker changed."""
    return [f for f in (step_folders(ckpt_dir) if folders is None else folders) if f[1]]


def broken_past_newest(folders: list[tuple[str, str | None, bool]]) -> list[tuple[str, str, bool]]:
    """The broken ones of `folders` (step_folders) newer than their newest complete checkpoint, oldest first:
    those resume=auto would have taken, had they not changed."""
    newest = max((i for i, (_, problem, _) in enumerate(folders) if problem is None), default=-1)
    return folders[newest + 1:]


def marker_of(path: str) -> dict:
    with open(os.path.join(path, MARKER)) as f:
        return json.load(f)


def complete_checkpoints(ckpt_dir: str, folders: list | None = None) -> list[str]:
    """Complete checkpoint directories (`folders`: step_folders as listed already), oldest first."""
    return [path for path, problem, _ in (step_folders(ckpt_dir) if folders is None else folders) if problem is None]


def resolve_resume(resume: str, ckpt_dir: str) -> str | None:
    """The checkpoint to resume from: None for a fresh start."""
    if resume == "never":
        return None
    if resume == "auto":
        found = complete_checkpoints(ckpt_dir)
        return found[-1] if found else None
    if not is_complete(resume):
        raise FileNotFoundError(f"resume={resume}: not a complete checkpoint (no valid {MARKER} marker)")
    return resume


def resolve_resume_once(resume: str, ckpt_dir: str) -> str | None:
    """resolve_resume as rank 0 sees it, on every rank of the process group. Each rank choosing for itself could
    resume ranks from different checkpoints: on a shared file system another node's listing may lag behind the
    node that wrote the newest one. Every rank still checks an explicit PATH (its error names it everywhere); only
    rank 0 lists the folder for resume=auto: another rank listing it while rank 0 moves a damaged checkpoint aside
    (choose_resume) found that checkpoint's files gone half-way through its completeness check."""
    import torch.distributed as dist

    from one4d_train.train.distributed import broadcast_from_main

    mine = resume != "auto" or dist.get_rank() == 0
    return broadcast_from_main(resolve_resume(resume, ckpt_dir) if mine else None)


def set_aside(ckpt_dir: str, resumed: str | None) -> str | None:
    """Keep the checkpoint folder one linear history ending at `resumed` (a checkpoint path, None for a fresh
    start): every step folder after it, or every one when `resumed` is not a step folder of this one, belongs to an
    abandoned timeline and moves, whole, to `abandoned-<UTC time>/`; `latest` then names the newest complete one
    left. Without this `resume=auto` would later pick the abandoned timeline's newest checkpoint, and pruning would
    delete the new timeline's. Returns the folder they went to, or None when none was after `resumed`."""
    if not os.path.isdir(ckpt_dir):
        return None
    path = os.path.normpath(os.path.abspath(resumed)) if resumed else ""
    ours = STEP_DIR.match(os.path.basename(path)) if path else None
    if ours and os.path.realpath(os.path.dirname(path)) != os.path.realpath(ckpt_dir):
        ours = None
    after = int(ours.group(1)) if ours else -1
    newer = sorted(n for n in os.listdir(ckpt_dir) if STEP_DIR.match(n) and int(STEP_DIR.match(n).group(1)) > after)
    if newer:
        dest = _stamped(os.path.join(ckpt_dir, "abandoned-"))
        os.makedirs(dest)
        for name in newer:
            os.rename(os.path.join(ckpt_dir, name), os.path.join(dest, name))
        _fsync_path(dest)
        _fsync_path(ckpt_dir)
        log.warning("resuming from %s: the newer checkpoints %s belong to an abandoned timeline; moved to %s",
                    resumed or "nothing (fresh start)", ", ".join(newer), dest)
    found = complete_checkpoints(ckpt_dir)
    if found:
        write_atomic(os.path.join(ckpt_dir, "latest"), os.path.basename(found[-1]) + "\n")
    elif os.path.exists(os.path.join(ckpt_dir, "latest")):
        os.remove(os.path.join(ckpt_dir, "latest"))
    return dest if newer else None


def written_by(ds_dir: str, rank: int) -> list[str]:
    """The files of a DeepSpeed checkpoint folder that `rank` wrote: its ZeRO partitions (zero_pp_rank_R_*), and
    on rank 0 every file not named after a partition (model states of ZeRO-1/2, the recovery script)."""
    own = re.compile(rf"(^|_)zero_pp_rank_{rank}_")
    out = []
    for name in sorted(os.listdir(ds_dir)):
        partition = "zero_pp_rank_" in name
        if own.search(name) or (rank == 0 and not partition):
            out.append(os.path.join(ds_dir, name))
    return out


# RNG state of every source the step draws from, as JSON + tensors (never pickled).

def capture_rng(generator: torch.Generator, device: torch.device | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """The RNG states of Python, NumPy, torch's CPU generator, `generator` and, on a CUDA `device`, the rank's own
    GPU (`cuda`; not every visible GPU's by index: a resume on another node layout, 2 x 4 GPUs for 1 x 8, has other
    GPUs at those indices)."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(mt), gauss], "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]}
    tensors = {"torch": torch.get_rng_state(), "generator": generator.get_state()}
    if device is not None and device.type == "cuda":
        tensors["cuda"] = torch.cuda.get_rng_state(device)
    return state, tensors


def restore_rng(state: dict, tensors: dict[str, torch.Tensor], generator: torch.Generator,
                device: torch.device | None = None) -> None:
    """capture_rng's states back; the GPU's onto the rank's own `device`. A checkpoint written before kept every
    visible GPU's by index (`cuda.I`): the state of the device's index is restored, where there is one."""
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])
    generator.set_state(tensors["generator"])
    if device is not None and device.type == "cuda":
        cuda = tensors.get("cuda", tensors.get(f"cuda.{device.index if device.index is not None else 0}"))
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)


def _test_stall(step: int) -> None:
    at, seconds, *name = os.environ.get(TEST_SLEEP_ENV, "").split(":") + [""]
    if at and int(at) == step:
        if name[0]:
            import signal

            os.kill(os.getpid(), getattr(signal, "SIG" + name[0]))
        time.sleep(float(seconds))


class Checkpointer:
    def __init__(self, run_dir: str, rank: int, world_size: int, keep_last: int, config_text: str = ""):
        self.dir = os.path.join(run_dir, "checkpoints")
        self.rank, self.world_size, self.keep_last = rank, world_size, keep_last
        self.config_text = config_text  # written into each checkpoint as config.yaml (rank 0)

    def clear_leftovers(self) -> None:
        """Rank 0: remove what an interrupted save, delete or pointer update left (.tmp- folders, latest.tmp- files):
        never read, and on a full disk the space the next start needs (its first write, `latest`, failed there).
        Only this run writes into the folder (the run lock)."""
        for name in os.listdir(self.dir) if os.path.isdir(self.dir) else []:
            path = os.path.join(self.dir, name)
            if name.startswith(".tmp-"):
                shutil.rmtree(path, ignore_errors=True)
            elif name.startswith("latest.tmp-"):
                with contextlib.suppress(OSError):
                    os.remove(path)

    def save(self, engine, step: int, train_state: dict, tensors: dict[str, torch.Tensor], export=None) -> str:
        """Collective: every rank calls it. `export(out_dir)` writes the adapters (collective too); None: none.
        An I/O error (and torch's writer's short write) is a CheckpointSaveError saying what failed, the space
        left and where the run would resume from; anything else is raised as it is."""
        try:
            return self._save(engine, step, train_state, tensors, export)
        except OSError as exc:
            raise CheckpointSaveError(self._failure(step, exc)) from exc
        except RuntimeError as exc:
            if "unexpected pos" not in str(exc):  # not torch's writer on a full disk: a fault to see in full
                raise
            raise CheckpointSaveError(self._failure(step, exc, "torch's writer reports a short write: a full disk "
                                                                "reads so")) from exc

    def _failure(self, step: int, exc: Exception, note: str = "") -> str:
        try:
            free = f"{shutil.disk_usage(self.dir).free / 1e9:.1f} GB free on its file system"
        except OSError:
            free = "its file system's free space unknown"
        done = complete_checkpoints(self.dir)
        said = (str(exc).strip().splitlines() or [""])[0]
        return (f"the checkpoint of step {step} into {self.dir} failed ({type(exc).__name__}: {said}); {free}"
                f"{f' ({note})' if note else ''}. The same command resumes from "
                f"{done[-1] if done else 'step 0 (no complete checkpoint)'}; the unfinished folder is removed when "
                "it starts")

    def _save(self, engine, step: int, train_state: dict, tensors: dict[str, torch.Tensor], export) -> str:
        final = os.path.join(self.dir, step_name(step))
        tmp = os.path.join(self.dir, ".tmp-" + step_name(step))
        if self.rank == 0:
            os.makedirs(self.dir, exist_ok=True)
            self.clear_leftovers()
            os.makedirs(os.path.join(tmp, "train_state"))
            if self.config_text:
                with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
                    f.write(self.config_text)
        dist.barrier()
        engine.save_checkpoint(tmp, tag="ds", save_latest=False, exclude_frozen_parameters=True)
        mine = written_by(os.path.join(tmp, "ds"), self.rank)
        if not mine:
            raise RuntimeError(f"checkpoint {tmp}: no DeepSpeed file of rank {self.rank} in ds/ to fsync "
                               f"(found {sorted(os.listdir(os.path.join(tmp, 'ds')))})")
        base = os.path.join(tmp, "train_state", f"rank-{self.rank:05d}")
        save_tensors({k: v.contiguous().cpu() for k, v in tensors.items()}, base + ".safetensors")
        with open(base + ".json", "w") as f:
            json.dump(train_state, f)
        # each writer flushes and checksums its own files: on NFS/Lustre an fsync by rank 0 on another node flushes
        # nothing of ours, and rank 0 reading every rank's partitions would pull them all over the network
        own = mine + [base + ".json", base + ".safetensors"]
        for path in own:
            _fsync_path(path)
        crcs = checksums(tmp, own)
        if export is not None:
            export(os.path.join(tmp, "adapters"))
        _test_stall(step)
        gathered = from_every_rank(crcs)  # also the barrier: every rank's files are written and flushed
        if self.rank == 0:
            _fsync_tree(tmp)
            files = _listing(tmp)
            crcs = {rel: crc for part in gathered for rel, crc in part.items() if rel in files}
            crcs.update(checksums(tmp, [os.path.join(tmp, rel) for rel in files if rel not in crcs]))  # rank 0's rest
            # the writing Slurm job and its run (requeues count up SLURM_RESTART_COUNT): its requeue continues
            # from here, and a run that wrote none is not requeued again after a time-limit signal (train/requeue)
            marker = {"step": step, "world_size": self.world_size, "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
                      "slurm_restart_count": int(os.environ.get("SLURM_RESTART_COUNT") or 0), "files": files,
                      "crc32": dict(sorted(crcs.items()))}
            write_atomic(os.path.join(tmp, MARKER), json.dumps(marker, indent=1))
            if os.path.exists(final):  # a complete twin from an earlier attempt at this very step
                self._remove(final)
            os.rename(tmp, final)
            _fsync_path(self.dir)
            write_atomic(os.path.join(self.dir, "latest"), step_name(step) + "\n")
            self._prune()
        dist.barrier()
        return final

    def _prune(self) -> None:
        found = complete_checkpoints(self.dir)
        for old in found[: max(0, len(found) - self.keep_last)]:
            self._remove(old)

    def _remove(self, path: str) -> None:
        """Delete a checkpoint folder by first renaming it to a .tmp- name: a delete cut short (a killed job, a file
        the filesystem keeps busy) leaves a folder the next save removes, not a step folder without its files, which
        no later prune would see (it counts complete checkpoints only) and which would stay on disk for good."""
        base = os.path.join(self.dir, ".tmp-deleted-" + os.path.basename(path))
        gone, n = base, 1
        while os.path.exists(gone):  # one an earlier delete could not empty
            gone, n = f"{base}-{n}", n + 1
        os.rename(path, gone)
        shutil.rmtree(gone, ignore_errors=True)

    def load_train_state(self, path: str) -> tuple[dict, dict[str, torch.Tensor]]:
        written_by = marker_of(path)["world_size"]
        if written_by != self.world_size:
            raise RuntimeError(f"checkpoint {path} was written by {written_by} ranks; this job has {self.world_size}")
        state = read_state_json(path, self.rank)
        tensors_file = os.path.join(path, "train_state", f"rank-{self.rank:05d}.safetensors")
        try:
            tensors = load_file(tensors_file)
        except (SafetensorError, OSError) as exc:
            raise CheckpointDamaged(f"{tensors_file}: not a readable safetensors file ({exc}): the file is damaged "
                                    "or cut short") from None
        missing = [k for k in RNG_TENSORS if k not in tensors]
        if missing:
            raise CheckpointDamaged(f"{tensors_file}: no tensor {', '.join(map(repr, missing))}: the file is damaged")
        return state, tensors


def saved_trainable_shapes(path: str) -> dict[str, tuple[int, ...]]:
    """Name -> shape of the trainable parameters in checkpoint `path`, from DeepSpeed's model states (tensors
    memory-mapped, not read)."""
    ds_dir = os.path.join(path, "ds")
    name = sorted(n for n in os.listdir(ds_dir) if n.endswith("model_states.pt"))[0]
    states = load_weights_only(os.path.join(ds_dir, name), map_location="cpu", mmap=True)
    try:
        return {k: tuple(v) for group in states["param_shapes"] for k, v in group.items()}
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CheckpointDamaged(f"{os.path.join(ds_dir, name)}: no readable parameter shapes ({type(exc).__name__}: "
                                f"{exc}): the file is damaged") from None


def shape_mismatches(path: str, shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """How this model's trainable parameters (name -> shape) differ from those saved in checkpoint `path`: one
    line per parameter, [] when they are the same. DeepSpeed's own load fails later with a bare tensor size error."""
    saved = saved_trainable_shapes(path)
    out = [f"{k}: checkpoint {list(saved[k])}, this model {list(shapes[k])}"
           for k in sorted(saved.keys() & shapes.keys()) if saved[k] != shapes[k]]
    out += [f"{k}: in the checkpoint only" for k in sorted(saved.keys() - shapes.keys())]
    return out + [f"{k}: in this model only" for k in sorted(shapes.keys() - saved.keys())]


def _safe_globals() -> list:
    """The few DeepSpeed classes its checkpoint files hold besides tensors and plain containers."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def unreadable(path: str, exc: Exception) -> CheckpointDamaged:
    """The error for a checkpoint file torch.load(weights_only=True) failed on, naming it. torch's own message is
    cut to its cause: it goes on to suggest weights_only=False, which would unpickle (run) whatever the file holds.
    A file that could not be opened (removed meanwhile, permission denied) is no damage, and said so."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return CheckpointDamaged(f"{path}: cannot be read now ({exc.strerror or exc}): removed meanwhile, or a file "
                                 "this user may not read")
    text = str(exc)
    text = text.split("WeightsUnpickler error:", 1)[1] if "WeightsUnpickler error:" in text else text
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    why = type(exc).__name__ + (f": {lines[0][:300]}" if lines and "weights_only" not in lines[0] else "")
    why = (_zip_damage(path) if os.path.isfile(path) else None) or why
    return CheckpointDamaged(f"{path}: cannot be read by torch.load(weights_only=True) ({why}): the file is damaged or "
                             "cut short, or holds an object this loader does not allow (nothing is unpickled)")


def _zip_damage(path: str) -> str | None:
    """What is wrong with the zip archive torch.save wrote to `path` (its members' own CRC-32s included), None when
    nothing is: read only to explain a load that failed."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except Exception as exc:  # BadZipFile, a bad header's struct or zlib error
        return f"its zip structure is damaged: {type(exc).__name__}: {exc}"
    return f"its zip member {bad} is damaged (its CRC-32 or header)" if bad else None


def load_weights_only(path, *args, _load=None, **kwargs):
    """torch.load(path, weights_only=True) with only DeepSpeed's known classes allowed; a file that does not load
    raises CheckpointDamaged naming it."""
    kwargs["weights_only"] = True
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return (_load or torch.load)(path, *args, **kwargs)
    except Exception as exc:  # zip, pickle, tensor storage: whatever fails, the file did not load
        raise unreadable(str(path), exc) from None


@contextlib.contextmanager
def weights_only_load(torch_module):
    """Within the block, `torch_module.load` (a module's reference to torch, e.g. DeepSpeed's zero_to_fp32.torch)
    reads with weights_only=True and only DeepSpeed's known classes allowed: nothing is unpickled."""
    original = torch_module.load

    def load(f, *args, **kwargs):
        return load_weights_only(f, *args, _load=original, **kwargs)

    torch_module.load = load
    try:
        yield
    finally:
        torch_module.load = original


def install_safe_loader(engine) -> None:
    """Make DeepSpeed read its checkpoint files with torch.load(weights_only=True) instead of full unpickling."""
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            return load_weights_only(path, map_location=map_location)

    if type(engine.checkpoint_engine) is not TorchCheckpointEngine:
        raise RuntimeError(f"unsupported DeepSpeed checkpoint engine {type(engine.checkpoint_engine).__name__}")
    safe = WeightsOnlyCheckpointEngine.__new__(WeightsOnlyCheckpointEngine)
    safe.__dict__.update(engine.checkpoint_engine.__dict__)
    engine.checkpoint_engine = safe
