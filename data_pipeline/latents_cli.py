"""`one4d encode-latents`: shards -> the same shards plus precomputed VAE latents and text embeddings per sample.

  one4d encode-latents SRC_SHARDS OUT_DIR config=EXPERIMENT.yaml [key=value ...] [--device cpu|cuda|cuda:N] [--batch N]
  one4d encode-latents SRC_SHARDS OUT_DIR config=... --num-tasks N --task-index I   (one Slurm array task)

The window is fixed per clip (start 0, data.frame_stride, data.num_frames) with a centre crop; the VAE is
model.vae (empty: the tiny random VAE seeded with `seed`). Captions without a stored embedding are encoded with
model.text_encoder (the trainer's text conditioning; --no-text leaves them). Re-running the same command after
a kill finishes the job; index.json is written once every shard is done (by whichever task finishes last).
"""
from __future__ import annotations

import argparse
import errno
import json
import os
import re
import socket
import sys
import tarfile
from pathlib import Path

from data_pipeline import checksums, shard_index as si
from data_pipeline.decode import SampleError, window_span
from data_pipeline.latents import (LATENT_MEMBERS, encode_batch, fixed_window_sample, latent_members, latents_spec,
                                   raw_of, same_source, same_vae, settings, tar_samples, text_identity, text_member)
from data_pipeline.shard import array_task_index, lock_out_dir, shard_done

PLAN_VERSION = 2  # 2: the text encoder joins the plan
EMPTY_PROMPT = "empty_prompt.npy"


class EncodeError(RuntimeError):
    """The run cannot proceed: a source shard that does not verify, a folder planned with other settings."""


class UsageError(EncodeError):
    """An option this run cannot honour (exit 2, as argparse's own usage errors)."""


class PlanReplaced(EncodeError):
    """plan.json changed under a running encode: its shards must not be published beside the new plan's."""


class ShardWriteError(EncodeError):
    """An output shard that cannot be written (a full disk): the run stops, the shards it finished are kept."""


DEVICE = re.compile(r"cpu|cuda(:(0|[1-9][0-9]*))?")


def encoding_device(name: str):
    """--device as a torch device, checked before anything is written: a CUDA device this machine lacks failed at
    the first use with a traceback, after plan.json had pinned it (so a retry on the CPU was refused), and a name
    torch does not know failed with torch's list of every backend it was built to name."""
    import torch

    if not DEVICE.fullmatch(name):
        raise UsageError(f"--device {name}: expected cpu, cuda or cuda:N (N: a CUDA device of this machine)")
    dev = torch.device(name)
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not count:
            raise UsageError(f"--device {name}: no CUDA device is available; use --device cpu")
        if dev.index is not None and dev.index >= count:
            which = "cuda:0" if count == 1 else f"cuda:0 to cuda:{count - 1}"
            raise UsageError(f"--device {name}: this machine has {count} CUDA device{'s' if count > 1 else ''} "
                             f"({which})")
    return dev


def _plan(src: Path, cfg, device_type: str, compute_dtype: str, batch: int, text: str) -> dict:
    spec = latents_spec(cfg)
    return {"version": PLAN_VERSION, "source_index_sha256": si.sha256_file(src / si.INDEX),
            "settings": settings(cfg.data, spec.vae, spec.valid_min_fraction, spec.vae_fingerprint),
            "text_encoder": text,
            "compute": {"device": device_type, "dtype": compute_dtype, "batch": batch, "vae": _vae_calls(cfg.model)}}


def _vae_calls(mcfg) -> dict:
    """The VAE settings that change the latents' rounding (as the batch does): kernels and call shapes."""
    return {"conv_kernel": mcfg.vae_conv_kernel, "frames_per_call": mcfg.vae_frames_per_call,
            "videos_per_call": mcfg.vae_videos_per_call}


def _same_but_for_path_spellings(old: dict, plan: dict) -> bool:
    """Whether `old` is `plan` but for how it names the VAE and text encoder (_named_as): it is finished under its
    own names, which its latents already carry."""
    return isinstance(old, dict) and isinstance(old.get("settings"), dict) and _named_as(old, plan) == plan


def _named_as(old: dict, plan: dict) -> dict:
    """The recorded plan `old` with the VAE and text encoder named as in `plan` where they are the same ones: paths
    as typed (a folder started before encode-latents made them absolute), the VAE copied to another path (the same
    content fingerprint), a VAE recorded without a fingerprint (a folder started before they were recorded: its path
    is compared)."""
    if not isinstance(old, dict) or not isinstance(old.get("settings"), dict):
        return old
    named, now = dict(old), plan["settings"]
    if same_vae(old["settings"], now["vae"], now.get("vae_fingerprint")):
        named["settings"] = {**{k: v for k, v in old["settings"].items() if k != "vae_fingerprint"},
                             **{k: now[k] for k in ("vae", "vae_fingerprint") if k in now}}
    text = old.get("text_encoder", _ABSENT)
    if text is not _ABSENT and (text == plan["text_encoder"] or same_source(text, plan["text_encoder"] or "")):
        named["text_encoder"] = plan["text_encoder"]
    return named


def _vae_free_plan_of(old: dict, plan: dict) -> bool:
    """Whether `old` is a plan written before plans recorded the VAE's call settings, of the same source, settings
    and compute as `plan` otherwise: it is finished under this run's (what it was encoded with is not known)."""
    compute = old.get("compute")
    return (isinstance(compute, dict) and "vae" not in compute
            and {**old, "compute": {**compute, "vae": plan["compute"]["vae"]}} == plan)


def _text_free_plan_of(old: dict, plan: dict) -> bool:
    """Whether `old` is a version-1 plan (written before encode-latents stored text embeddings) of the same
    source, settings and compute as `plan`."""
    same = {k: v for k, v in plan.items() if k not in ("version", "text_encoder")}
    return old.get("version") == 1 and {k: v for k, v in old.items() if k != "version"} == same


def _resharded(old: dict, plan: dict) -> bool:
    """Whether `old` is `plan` but for the source index: the source was sharded again (clips added, removed or
    changed) with the same settings, so a latent shard encoded from a source shard that did not change stays valid
    (each record holds its source shard's sha256)."""
    return isinstance(old, dict) and {**old, "source_index_sha256": plan["source_index_sha256"]} == plan


def _drop_unlisted(out: Path, names: set[str]) -> list[str]:
    """Remove the latent shards (and records) of source shards no longer in the source index, and the index of the
    old set (written again once every shard of the new one is done). Returns the removed shards' names."""
    gone = []
    for p in sorted(out.glob("*.tar")):
        if p.name not in names:
            p.unlink(missing_ok=True)
            gone.append(p.name)
    for record in out.glob("*.record.json"):  # the dropped shards' and any other orphan's
        if record.name.removesuffix(".record.json") not in names:
            record.unlink(missing_ok=True)
    (out / si.INDEX).unlink(missing_ok=True)
    si.fsync_dir(out)
    return gone


_ABSENT = object()


def _plan_differences(old, new, at: str = "") -> list[str]:
    """'key: recorded -> this run's' for each key (a nested one by its dotted path) whose value differs: the
    refusal names what to change instead of printing the whole plan."""
    if not (isinstance(old, dict) and isinstance(new, dict)):
        return [f"{at.rstrip('.') or si.PLAN}: {_shown(old)} -> {_shown(new)}"]
    out = []
    for key in sorted(old.keys() | new.keys()):
        a, b = old.get(key, _ABSENT), new.get(key, _ABSENT)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _plan_differences(a, b, f"{at}{key}.")
        elif json.dumps(a, sort_keys=True, default=str) != json.dumps(b, sort_keys=True, default=str):  # 1 vs 1.0
            out.append(f"{at}{key}: {_shown(a)} -> {_shown(b)}")
    return out


def _shown(v) -> str:
    if v is _ABSENT:
        return "absent"
    if v is None:
        return "none"
    if isinstance(v, str):
        return f"{v[:12]}..." if len(v) == 64 else v  # a sha256
    return json.dumps(v, sort_keys=True)


def _encoded_under_plan(out: Path) -> list[str]:
    """The files of `out` made (or maybe being made now) under its recorded plan: shards, their records, the index,
    and the temp files of writers that may still be running. None: a new plan mixes nothing with an old one."""
    def rank(name):
        return (0 if name.endswith(".record.json") else 1 if name.endswith(".tar") else 2, name)

    return sorted((p.name for p in out.iterdir()
                   if p.name == si.INDEX or p.name.endswith((".tar", ".record.json"))
                   or si.live_temp_file(p.name)), key=rank)


def _check_plan(out: Path, pinned: dict, name: str) -> None:
    """Raise PlanReplaced unless plan.json is still `pinned`: a run with other settings may replace the plan of a
    folder that held nothing encoded under it while this run was still loading its models or encoding."""
    path = out / si.PLAN
    now = si.read_json(path) if path.is_file() else None
    if now is None or si.dumps(now) != si.dumps(pinned):
        raise PlanReplaced(f"{path} was replaced by a run with other settings while this one encoded {name} "
                           f"({'; '.join(_plan_differences(pinned, now))}); this run publishes no shard beside that "
                           "run's: re-run with that run's options, or use a new output folder")


def _text_rows(text, chunk) -> dict[str, torch.Tensor]:
    """key -> embedding rows [L, D] for the chunk's decodable samples with a caption and no stored embedding."""
    from one4d_train.model.text_encoder import clean_prompt

    todo = [(key, ready[0]["caption"]) for key, _, ready in chunk
            if ready is not None and "text_emb" not in ready[0] and clean_prompt(ready[0].get("caption", ""))]
    if text is None or not todo:
        return {}
    return dict(zip([k for k, _ in todo], text.encoder.encode_rows([c for _, c in todo])))


def encode_shard(src: Path, out: Path, entry: dict, vae, cfg, run: dict, batch: int, text=None,
                 pinned: dict | None = None) -> dict:
    """Write one output shard atomically (all source members, plus latents, and with `text` (a TextConditioning)
    the caption's embedding, for every encodable sample), then its record. Samples that do not decode keep their
    members and get nothing added; they are listed in `failed`. A caption whose embedding cannot be stored (float16
    overflow) leaves its sample's latents without one, listed in `text_failed`. A source shard that differs from its
    index but reads as a tar (a flipped bit, a cut) is encoded sample by sample: each sample is checked against its
    sums.json, as always, and the samples it lacks are listed in `failed` too (the record's `source_damage` says how
    it differs). `pinned`: the plan.json this run encodes under, checked again just before the shard is published
    (PlanReplaced). ShardWriteError where the shard cannot be written (a full disk); no temp file is left."""
    from data_pipeline.shard import _add

    name = entry["name"]
    problem, digest = si.check_shard_file(src, entry)  # (read once: the damage record needs its sha256 too)
    damage = _source_damage(src / name, problem, digest) if problem else None
    mean, std = [float(v) for v in vae.model.config.latents_mean], [float(v) for v in vae.model.config.latents_std]
    keys, failed, text_failed, encoded, text_encoded = [], [], [], 0, 0
    tmp = out / f".{name}.tmp{socket.gethostname()}-{os.getpid()}"

    def flush(tar, chunk):
        nonlocal encoded, text_encoded
        good = [c for c in chunk if c[2] is not None]
        encs = iter(encode_batch(vae, [c[2][0] for c in good], run["valid_min_fraction"]) if good else [])
        rows = _text_rows(text, chunk)
        for key, members, ready in chunk:
            extra = []
            if ready is not None:
                try:
                    extra = latent_members(key, next(encs), ready[1], run, mean, std)
                    encoded += 1
                except SampleError as exc:
                    failed.append({"key": key, "reason": str(exc)})
                if extra and key in rows:
                    try:  # the latents stay without it: the trainer then encodes the caption itself
                        extra.append(text_member(key, rows[key]))
                        text_encoded += 1
                    except SampleError as exc:
                        text_failed.append({"key": key, "reason": str(exc)})
            # a source encoded before (latent shards keep every member): its latents are replaced, never repeated,
            # and a sample that does not encode now keeps none of the old settings' latents. Members that failed
            # their sums keep the original sums.json, so the reader still finds them corrupt
            kept = [(n, d) for n, d in members if Path(n).name.split(".", 1)[1] not in LATENT_MEMBERS]
            resum = ready is not None and (extra or len(kept) < len(members))
            for member, data in checksums.with_sums(key, kept + extra) if resum else kept:
                _add(tar, member, data)

    try:
        with open(tmp, "wb") as f:
            with tarfile.open(fileobj=f, mode="w", format=tarfile.GNU_FORMAT) as tar:
                chunk = []
                for key, members in _source_samples(src / name, entry, damage):
                    keys.append(key)
                    try:
                        raw = raw_of(key, members)
                        checksums.verify(raw)  # never encode (and re-sum) corrupt source bytes
                        ready = fixed_window_sample(raw, cfg.data)
                    except Exception as exc:  # the pixel reader skips such a sample too
                        failed.append({"key": key, "reason": f"{type(exc).__name__}: {exc}"})
                        ready = None
                    chunk.append((key, members, ready))
                    if len(chunk) == batch:
                        flush(tar, chunk)
                        chunk = []
                if chunk:
                    flush(tar, chunk)
            f.flush()
            os.fsync(f.fileno())
        if damage is None and keys != list(entry["keys"]):
            raise EncodeError(f"{src / name}: keys {keys[:3]}... differ from the index's {entry['keys'][:3]}...")
        if damage is not None:
            lacking = f"not in the source shard, which differs from its index ({damage['problem']})" + \
                (f" and stops reading: {damage['cut']}" if damage.get("cut") else "")
            there = set(keys)
            failed += [{"key": k, "reason": lacking} for k in entry["keys"] if k not in there]
        # hashed before the plan check, so that the check comes as close to publishing as it can
        record = {"name": name, "samples": len(keys), "bytes": tmp.stat().st_size, "sha256": si.sha256_file(tmp),
                  "keys": keys, "source_sha256": entry["sha256"], "encoded": encoded, "text_encoded": text_encoded,
                  "failed": failed, "text_failed": text_failed}
        if damage is not None:
            record["source_damage"] = damage
        if pinned is not None:
            _check_plan(out, pinned, name)
        os.replace(tmp, out / name)
        si.fsync_dir(out)
        si.write_json(si.record_path(out, name), record)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):  # as `one4d shard` says it (data_pipeline/shard.py write_shard)
            raise ShardWriteError(si.write_failure(exc, out, "cannot write the shard", out / name)) from None
        raise
    return record


def _source_damage(path: Path, problem: str, digest: str | None = None) -> dict:
    """How the source shard `path`, which differs from its index (`problem`), differs: what encode_shard records of
    it to encode it sample by sample (its size and sha256 (`digest` where already read), so that a re-made shard is
    encoded again). EncodeError where there is nothing to read samples from: the file is missing or is no tar."""
    if not path.is_file():
        raise EncodeError(f"source shard does not match its index: {problem}")
    try:
        with tarfile.open(path) as tar:
            if tar.next() is None:  # zeros where its first header was
                raise tarfile.ReadError("no member")
    except (tarfile.TarError, EOFError) as exc:
        raise EncodeError(f"source shard does not match its index: {problem}; and it does not read as a tar "
                          f"({exc})") from None
    return {"problem": problem, "bytes": path.stat().st_size, "sha256": digest or si.sha256_file(path)}


def _source_samples(path: Path, entry: dict, damage: dict | None):
    """tar_samples of a source shard. Of a damaged one (`damage`, _source_damage), only the samples its index lists,
    each once (a damaged header may make up a name), up to where the tar stops reading (said in damage['cut'])."""
    samples, listed, seen = tar_samples(path), set(entry["keys"]), set()
    while True:
        try:
            key, members = next(samples)
        except StopIteration:
            return
        except (tarfile.TarError, EOFError) as exc:
            if damage is None:
                raise
            damage["cut"] = f"{type(exc).__name__}: {exc}"
            return
        if damage is not None and (key not in listed or key in seen):
            continue
        seen.add(key)
        yield key, members


def _done(src: Path, out: Path, entry: dict) -> dict | None:
    """The record of a finished output shard that still matches its file and was encoded from this source (one
    encoded sample by sample from a damaged source: from the same damaged file, not one re-made since)."""
    record = shard_done(out, entry["name"])
    if record is None or record.get("source_sha256") != entry["sha256"]:
        return None
    damage = record.get("source_damage")
    if isinstance(damage, dict):
        path = src / entry["name"]
        if not (path.is_file() and path.stat().st_size == damage.get("bytes")
                and si.sha256_file(path) == damage.get("sha256")):
            return None
    return record


def _no_shard_folder(out: Path) -> None:
    """EncodeError where `out` is a shard folder of `one4d shard` (its plan.json plans shards from a manifest)."""
    plan = si.read_json(out / si.PLAN) if (out / si.PLAN).is_file() else {}
    if "manifest_sha256" in plan:
        raise EncodeError(f"{out}: a shard folder made by `one4d shard` (its {si.PLAN} plans shards from a "
                          "manifest), not an output of `one4d encode-latents`: the latent shards would overwrite "
                          "its shards and index; OUT_DIR must be a new or empty folder, or one `one4d "
                          "encode-latents` wrote into (that shard folder can be its SRC_SHARDS)")


def run_encode(src, out, cfg, device: str = "cpu", batch: int = 1, num_tasks: int | None = None,
               task_index: int | None = None, progress: bool = True, text: bool = True) -> dict:
    """Encode this task's shards (all without num_tasks), skipping finished ones; write index.json once every
    shard has its record. `text`: store the embeddings of captions that have none (needs model.text_encoder, or
    the tiny preset). Returns a summary dict."""
    from one4d_train.config import ConfigError
    from one4d_train.model.encoders import encoder_dtype, vae_kernel_problems

    if batch < 1:
        raise UsageError(f"--batch must be >= 1, got {batch}")
    if (num_tasks is None) != (task_index is None) or (num_tasks is not None and not 0 <= task_index < num_tasks):
        raise UsageError(f"--num-tasks and --task-index go together with 0 <= I < N (got {num_tasks}, {task_index})")
    src, out = Path(src), Path(out)
    if src.resolve() == out.resolve():
        raise UsageError("OUT_DIR must differ from SRC_SHARDS")
    if src.resolve() in out.resolve().parents:  # the latent shards would lie among the shards they are made from
        raise UsageError(f"OUT_DIR {out} is inside SRC_SHARDS {src}: give a folder outside it")
    if not (src / si.INDEX).is_file():
        raise UsageError(f"SRC_SHARDS {src}: no {si.INDEX} (a shard folder of `one4d shard`)")
    dev = encoding_device(device)
    index = si.read_index(src)
    if not index["totals"]["samples"]:
        rejected = index["totals"]["rejected"]
        raise EncodeError(f"SRC_SHARDS {src} holds no sample ({src / si.INDEX}: {len(index['shards'])} shard(s) of 0 "
                          "samples" + (f"; `one4d shard` rejected all {rejected} rows of its manifest, each listed "
                                       f"with its reason in {src / si.REJECTS}" if rejected else "") +
                          "): there is nothing to encode; shard the clips again, fixed, and encode those shards")
    # a source encoded before keeps the caption embeddings its run stored, taken here as given with the clips: they
    # would be recorded as this run's text encoder's (and mixed with its empty prompt) though another made them
    earlier = (index.get("latents") or {}).get("text_encoder")
    text_id = text_identity(cfg.model, cfg.seed) if text else ""
    if earlier and not same_source(earlier, text_id):
        raise EncodeError(f"{src} is one4d encode-latents' output, whose stored caption embeddings are text encoder "
                          f"{earlier}'s, not this run's ({text_id or 'none: --no-text'}): encode from the shards "
                          f"`one4d shard` wrote, or with the text encoder it records")
    dtype = encoder_dtype(cfg.model, dev)  # the trainer's VAE precision
    problems = vae_kernel_problems(cfg.model, dev)
    if problems:  # before anything is pinned or written
        raise ConfigError("; ".join(f"key '{k}': {v}" for k, v in problems))
    if out.exists() and not out.is_dir():
        raise EncodeError(f"{out}: not a folder: OUT_DIR is the folder the latent shards go to (new or this run's)")
    _no_shard_folder(out)
    problem = si.foreign_files_problem(out, "one4d encode-latents", "encode-latents", "the latent shards")
    if problem:
        raise EncodeError(problem)
    out.mkdir(parents=True, exist_ok=True)
    # one run at a time (a whole run alone; array tasks side by side, each its own slice): a second run into the
    # folder deleted the first one's temporary files of the same shards, and could pin another plan under it
    locks = lock_out_dir(out, task_index, command="encode-latents", error=EncodeError)
    try:
        return _encode(src, out, cfg, dev, dtype, index, batch, num_tasks, task_index, progress, text)
    finally:
        for lock in locks:
            lock.release()


def _encode(src: Path, out: Path, cfg, dev, dtype, index: dict, batch: int, num_tasks: int | None,
            task_index: int | None, progress: bool, text: bool) -> dict:
    """run_encode's work, with the output folder locked."""
    import torch
    from tqdm import tqdm

    from one4d_train.config import ConfigError
    from one4d_train.model.vae import load_vae

    text_id = text_identity(cfg.model, cfg.seed) if text else ""
    if text and not text_id:
        raise EncodeError("storing text embeddings needs model.text_encoder (a UMT5 folder); or pass --no-text")
    plan = _plan(src, cfg, dev.type, str(dtype).removeprefix("torch."), batch, text_id or None)
    old = si.pin_plan(out, plan)
    pinned, replaced = plan, []
    if old is not None and _same_but_for_path_spellings(old, plan):
        pinned, old = old, None
    if old is not None and _vae_free_plan_of(_named_as(old, plan), plan):
        pinned, old = old, None
    if old is not None and _text_free_plan_of(_named_as(old, plan), plan):  # finishable as started: without text
        if text_id:
            raise EncodeError(f"{out / si.PLAN}: this folder was started without text embeddings (plan version 1); "
                              f"finish it with --no-text, or use a new output folder")
        pinned, old = old, None
    resharded = None
    if old is not None and _resharded(_named_as(old, plan), plan):
        # the source sharded again: latent shards of unchanged source shards are kept, the others encoded again
        resharded = _drop_unlisted(out, {e["name"] for e in index["shards"]})
        si.write_json(out / si.PLAN, plan)
        pinned, old = plan, None
    if old is not None:
        # the plan keeps latents of other settings apart; where nothing was encoded under it (a run that failed or
        # was stopped before its first shard), a new plan mixes nothing, and a retry with other options goes ahead
        differences, held = _plan_differences(old, plan), _encoded_under_plan(out)
        if si.dumps(si.read_json(out / si.PLAN)) == si.dumps(plan):
            # replaced a moment ago by a task of this array (the tasks start side by side): what the folder holds
            # is that task's, made under this very plan, and the empty prompt it may have written is this plan's
            old = None
        elif held:
            more = f" and {len(held) - 3} more" if len(held) > 3 else ""
            raise EncodeError(f"{out / si.PLAN}: this folder holds latents from another source index or other "
                              f"settings ({'; '.join(differences)}): it holds {', '.join(held[:3])}{more}; use the "
                              f"same options or a new output folder")
        else:
            (out / EMPTY_PROMPT).unlink(missing_ok=True)  # the old plan's text encoder's
            si.write_json(out / si.PLAN, plan)
            replaced = differences
    run = pinned["settings"]  # a folder finished as it was started: its VAE named as its latents already name it
    entries = index["shards"]
    mine = [e for i, e in enumerate(entries) if num_tasks is None or i % num_tasks == task_index]
    for e in mine:
        for stale in si.temp_files(out, e["name"]):
            stale.unlink()
    todo = [e for e in mine if _done(src, out, e) is None]
    # the empty prompt's embedding comes before any shard (and after a folder finished without it)
    try:
        conditioning = _text_conditioning(cfg, dev, dtype) if text_id and (
            todo or not (out / EMPTY_PROMPT).is_file()) else None
    except ValueError as exc:  # weights that do not load (the checks before read configs and headers only)
        raise ConfigError(f"key 'model.text_encoder': {exc}") from None
    if conditioning is not None:
        _write_empty_prompt(out, conditioning, alone=num_tasks is None)
    bar = tqdm(total=len(mine), initial=len(mine) - len(todo), unit="shard", desc="encode", disable=not progress)
    resampled = []  # the source shards that differ from their index, encoded sample by sample
    if todo:
        if dev.type == "cuda":
            torch.backends.cudnn.benchmark = False
            torch.backends.cudnn.deterministic = True
        try:
            vae = load_vae(cfg.model.vae, seed=cfg.seed, dtype=dtype, device=dev,
                           frames_per_call=cfg.model.vae_frames_per_call, chunk_size=cfg.model.vae_videos_per_call,
                           conv_kernel=cfg.model.vae_conv_kernel)
        except ValueError as exc:  # weights that do not load (the checks before read configs and headers only)
            bar.close()
            raise ConfigError(f"key 'model.vae': {exc}") from None
        damaged = []
        for e in todo:
            try:
                record = encode_shard(src, out, e, vae, cfg, run, batch, conditioning, pinned)
                if "source_damage" in record:
                    resampled.append(f"{src / e['name']}: {record['source_damage']['problem']}")
            except (PlanReplaced, ShardWriteError):
                bar.close()
                raise
            except EncodeError as exc:  # a damaged source shard: the others are encoded all the same
                damaged.append(str(exc))
            except torch.OutOfMemoryError as exc:  # the same settings run out again: say which ones to lower
                bar.close()
                done = sum(_done(src, out, x) is not None for x in entries)
                raise EncodeError(
                    f"{e['name']}: out of {dev.type.upper() if dev.type == 'cuda' else 'host'} memory in a VAE call of "
                    f"{batch} clip(s) x 3 videos, model.vae_videos_per_call={cfg.model.vae_videos_per_call} at a time, "
                    f"model.vae_frames_per_call={cfg.model.vae_frames_per_call} ({str(exc).splitlines()[0][:200]}). "
                    f"Fewer videos per call (--batch 1, model.vae_videos_per_call=1) or fewer frames per call take "
                    f"less; plan.json fixes them for {out}, which holds {done} finished shard(s): "
                    f"{'use a new output folder' if done else 'a re-run with them replaces the plan'}") from exc
            bar.update()
        if damaged:
            bar.close()
            raise EncodeError(f"{len(damaged)} of this run's {len(todo)} source shards could not be encoded (the "
                              "others were): " + "; ".join(damaged) + f". `one4d inspect-shards {src}` names the "
                              "samples at fault; re-running the `one4d shard` that made it rewrites a damaged shard; "
                              "then re-run this command to finish")
    bar.close()
    records = {e["name"]: _done(src, out, e) for e in entries}
    summary = {"shards": len(mine), "written": len(todo), "skipped": len(mine) - len(todo), "index": None,
               "replaced_plan": replaced, "resampled": resampled, "resharded": resharded,
               "longer": _longer_clips(index["statistics"], cfg.data)}
    if all(records.values()):
        from one4d_train.model.presets import wan_config

        recs = [records[e["name"]] for e in entries]
        failed = [x for r in recs for x in r["failed"]]
        result = {"version": si.INDEX_VERSION, "sample_format": index["sample_format"],
                  "shards": [si.shard_entry(r) for r in recs],
                  "totals": {**index["totals"], "samples": sum(r["samples"] for r in recs),
                             "bytes": sum(r["bytes"] for r in recs)},
                  "statistics": si.with_text_embeddings(index["statistics"], sum(r.get("text_encoded", 0) for r in recs),
                                                        wan_config(cfg.model.preset).text_dim),
                  "rejects": index["rejects"],
                  "latents": {**run, "source_index_sha256": plan["source_index_sha256"],
                              "encoded": sum(r["encoded"] for r in recs), "text_encoder": plan["text_encoder"],
                              "text_encoded": sum(r.get("text_encoded", 0) for r in recs),
                              "empty_prompt": EMPTY_PROMPT if text_id and (out / EMPTY_PROMPT).is_file() else None,
                              "failed": failed,
                              "text_failed": [x for r in recs for x in r.get("text_failed", [])]}}
        si.write_index(out, result)
        summary.update(index=str(out / si.INDEX), encoded=result["latents"]["encoded"],
                       text_encoded=result["latents"]["text_encoded"], failed=failed,
                       text_failed=result["latents"]["text_failed"])
    return summary


def _longer_clips(stats: dict, data) -> tuple[int, int, int] | None:
    """(clips longer than the window, clips, the window's span in frames) of a shard set's statistics; None where
    its index does not count clips by length, or none is longer."""
    span, lengths = window_span(data.num_frames, data.frame_stride), stats.get("clip_frames")
    longer = sum(c for n, c in (lengths or {}).items() if int(n) > span)
    return (longer, sum(lengths.values()), span) if longer else None


def _text_conditioning(cfg, device, dtype):
    """The trainer's text conditioning (model/encoders.py build_text, the tiny tower on a forked RNG), on the
    encoding device; run_encode has checked that an encoder is configured (text_identity)."""
    from one4d_train.model.encoders import build_text
    from one4d_train.model.presets import wan_config

    return build_text(cfg.model, wan_config(cfg.model.preset), device, dtype, cfg.seed)


def _write_empty_prompt(out: Path, text, alone: bool) -> None:
    """OUT/empty_prompt.npy: the text encoder's embedding of "" (its rows, float32), written atomically before
    any shard, so a trainer whose samples all carry embeddings never needs the encoder itself. The temp files an
    interrupted write left go first: all of them for a run over every shard (`alone`: it holds the folder's lock
    alone); for an array task only those whose writer cannot be running, since the other tasks write the same file
    as they start (a task that removed one being written had that task fail on its rename)."""
    from data_pipeline.shard import npy_bytes

    for stale in si.temp_files(out, EMPTY_PROMPT):
        if alone or not si.writer_may_run(stale.name):
            stale.unlink(missing_ok=True)
    si.write_atomic(out / EMPTY_PROMPT, npy_bytes(text.encoder.encode_rows([""])[0].float().cpu().numpy()))


def _os_error(exc: OSError, out: Path) -> str:
    """An OSError in words: for a full disk (or a file-size limit) where the error names no file, the output folder
    and its free space."""
    if exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) or not out.is_dir():
        return str(exc)
    return si.write_failure(exc, out)


def parser() -> argparse.ArgumentParser:
    head, usage = __doc__.split("\n\n", 1)
    p = argparse.ArgumentParser(prog="one4d encode-latents", description=head.split(":", 1)[1].strip(), epilog=usage,
                                usage="one4d encode-latents SRC_SHARDS OUT_DIR config=X.yaml [key=value ...] [options]",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("args", nargs="+", metavar="ARG", help="SRC_SHARDS OUT_DIR, then config=FILE and key=value overrides")
    p.add_argument("--device", default="cuda" if _cuda() else "cpu", help="cpu, cuda or cuda:N (default: cuda when present)")
    p.add_argument("--batch", type=int, default=1, help="clips per VAE call (3 videos each; default 1)")
    p.add_argument("--num-tasks", type=int, help="Slurm array size: this task encodes shards with id %% N == I")
    p.add_argument("--task-index", type=int, help="this task's index (default $SLURM_ARRAY_TASK_ID with --num-tasks)")
    p.add_argument("--no-text", action="store_true", help="store no text embeddings (captions are then encoded by "
                   "the trainer's text encoder at every step)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv: list[str] | None = None) -> int:
    from one4d_train.config import ConfigError, absolute_paths, load_config
    from one4d_train.train.one4d_task import model_file_problems, unset_file_problems

    p = parser()
    args = p.parse_intermixed_args(argv)  # key=value overrides after the options too (encode_latents.sbatch)
    paths = [a for a in args.args if "=" not in a]
    overrides = [a for a in args.args if "=" in a]
    if len(paths) != 2:
        p.error(f"expected SRC_SHARDS OUT_DIR (and key=value overrides), got {paths}")
    if not any(a.startswith("config=") for a in overrides):
        p.error("config=EXPERIMENT.yaml is required (it fixes the window, resolution and VAE)")
    task_index = array_task_index(args.num_tasks, args.task_index)
    try:
        # paths absolute, as `one4d train` makes them: the VAE and text encoder are recorded by path. The VAE a
        # preset other than tiny needs is checked as train and eval check it (the text encoder by run_encode)
        cfg = absolute_paths(load_config(overrides, checks=lambda c: [
            (k, v) for k, v in unset_file_problems(c.model) if k == "model.vae"]
            + model_file_problems(c, backbone=False)))
        s = run_encode(paths[0], paths[1], cfg, device=args.device, batch=args.batch, num_tasks=args.num_tasks,
                       task_index=task_index, progress=not args.no_progress, text=not args.no_text)
    except ConfigError as exc:
        print(f"one4d encode-latents: config error: {exc}", file=sys.stderr)
        return 2
    except UsageError as exc:
        print(f"one4d encode-latents: error: {exc}", file=sys.stderr)
        return 2
    except (EncodeError, si.ShardIndexError) as exc:
        print(f"one4d encode-latents: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # a file it cannot read or write; a full disk (its shards say so themselves)
        print(f"one4d encode-latents: error: {_os_error(exc, Path(paths[1]))}", file=sys.stderr)
        return 1
    if s["replaced_plan"]:
        print(f"{Path(paths[1]) / si.PLAN}: replaced, nothing having been encoded under it: "
              f"{'; '.join(s['replaced_plan'])}")
    if s["resharded"] is not None:
        gone = s["resharded"]
        print(f"{paths[0]} was sharded again since {paths[1]} was encoded: the latents of its unchanged shards are "
              f"kept, its new and changed shards encoded" + (f", {len(gone)} shard(s) of the old set removed "
                                                             f"({', '.join(gone[:3])}{' ...' if len(gone) > 3 else ''})"
                                                             if gone else ""))
    done = (f"index: {s['index']} ({s['encoded']} samples encoded, {s['text_encoded']} captions embedded, "
            f"{len(s['failed'])} without latents)"
            if s["index"] else "other shards still to do: index.json comes when all are done")
    print(f"{s['shards']} shards ({s['written']} written, {s['skipped']} already done); {done}")
    for problem in s["resampled"]:
        print(f"  source shard {problem}: encoded sample by sample (a sample that fails its checksums or is not there "
              f"gets no latents, listed below); `one4d inspect-shards {paths[0]}` names them, and re-running the "
              "`one4d shard` that made it rewrites it (then re-run this command)")
    if s["longer"]:
        longer, clips, span = s["longer"]
        print(f"note: {longer} of {clips} clips are longer than the window of {span} frames (data.num_frames x "
              f"data.frame_stride): their latents hold frames 0 to {span - 1} only, centre-cropped; training on these "
              "shards sees that one window and crop per clip (data.crop=random and random window starts apply to "
              "pixel samples only)")
    for f in s.get("failed", []):
        print(f"  no latents for {f['key']}: {f['reason']}")
    for f in s.get("text_failed", []):
        print(f"  no text embedding stored for {f['key']} (the trainer encodes its caption): {f['reason']}")
    if s["index"] and not s["encoded"] and s.get("failed"):  # as `one4d shard` when it rejects every row
        print(f"one4d encode-latents: error: no sample got latents ({len(s['failed'])} failed, reasons above): "
              "training on these shards would find nothing to read", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
