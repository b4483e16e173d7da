"""`model.init_adapters`: a new run whose branch adapters and control links start from an earlier run's instead of
the zero-initialised ones (a second stage on other data, a longer schedule from a finished run), with a fresh
optimizer, schedule, data stream and MLflow run.

The source is an export of `one4d export`, a complete checkpoint (its adapters/, verified against its marker's
CRC-32s), or a run directory (its newest complete checkpoint). It must fit the model (preset, design, LoRA rank and
scale, link blocks) and have been trained on the same frozen base (model.checkpoint's content fingerprint, as the
checkpoint's train state or the export's adapter_config.json records it). A run that resumes takes its
checkpoint's weights and reads no source: the source may be gone by then.
"""
from __future__ import annotations

import os

from one4d_train.model.adapters import CONFIG_NAME, AdapterError, fit_problem, read_adapter_config


class WarmStartError(ValueError):
    """A model.init_adapters source that cannot start this run; the message names the folder and why."""


def trained_identity(source: str) -> dict | None:
    """What the adapters of a checkpoint or export were trained against (the train state's task identity: the
    frozen base's path and content fingerprint and the LoRA scale; an export's adapter_config.json "base"); None for
    one written before they recorded it (or a checkpoint without a train state). A train state that does not read
    (a CRC-32 that differs from its marker's, a file this user may not read) is CheckpointDamaged naming it: the
    base check is never dropped for it."""
    from one4d_train.train.checkpoint import CheckpointDamaged, read_state_json

    if os.path.isfile(os.path.join(source, CONFIG_NAME)):
        return read_adapter_config(source).get("base")
    try:
        return read_state_json(source, 0).get("task_identity")
    except FileNotFoundError:  # (one its marker lists is a check_files line: CheckpointDamaged)
        return None
    except (CheckpointDamaged, OSError) as exc:
        why = f"{exc.filename}: cannot be read ({exc.strerror or exc})" if isinstance(exc, OSError) else str(exc)
        raise CheckpointDamaged(f"checkpoint {source}: its train state, which records the frozen base its adapters "
                                f"were trained on, does not read: {why}. Use another checkpoint, or put back an "
                                "intact copy of the file") from None


def init_source(spec: str) -> tuple[str, str]:
    """(the folder whose adapters start the run, the export or checkpoint it is) for model.init_adapters=spec: an
    export, a checkpoint (or its adapters/), or a run directory's newest complete checkpoint."""
    from one4d_train.train.checkpoint import (MARKER, CheckpointDamaged, checkpoint_problem, complete_checkpoints,
                                              verify_folder)

    if not os.path.isdir(spec):
        raise WarmStartError(f"{spec}: {'not a folder' if os.path.exists(spec) else 'no such folder'} (give an "
                             f"export of `one4d export`, a complete checkpoint or a run directory)")
    source = os.path.normpath(spec)
    if os.path.basename(source) == "adapters" and os.path.isfile(os.path.join(os.path.dirname(source), MARKER)):
        source = os.path.dirname(source)  # a checkpoint's adapters/: the checkpoint (its marker verifies them)
    if os.path.isfile(os.path.join(source, CONFIG_NAME)):
        return source, source
    if os.path.isdir(os.path.join(source, "checkpoints")):
        found = complete_checkpoints(os.path.join(source, "checkpoints"))
        if not found:
            raise WarmStartError(f"{spec}: a run directory without a complete checkpoint")
        source = found[-1]
    elif not os.path.isdir(os.path.join(source, "train_state")):
        raise WarmStartError(f"{spec}: neither an export ({CONFIG_NAME}), a checkpoint (train_state/) nor a run "
                             "directory (checkpoints/)")
    problem = checkpoint_problem(source)
    if problem:
        raise WarmStartError(f"checkpoint {source} is not complete: {problem}")
    adapters = os.path.join(source, "adapters")
    if not os.path.isdir(adapters):
        raise WarmStartError(f"checkpoint {source} holds no adapters/ (trained with train.export_adapters=false): "
                             f"export it first (`one4d export checkpoint={source} out=DIR from_zero=true`) and start "
                             "from DIR")
    try:
        verify_folder(source, "adapters")
    except CheckpointDamaged as exc:
        raise WarmStartError(str(exc)) from None
    return adapters, source


def source_problems(cfg, adapters: str, source: str, link_blocks: list[int]) -> list[tuple[str, str]]:
    """The source's adapters against this config, by key: they must fit the model and have been trained on its base
    and LoRA scale."""
    from one4d_train.train.checkpoint import CheckpointDamaged
    from one4d_train.train.one4d_task import identity_problems

    try:
        problem = fit_problem(read_adapter_config(adapters), cfg.model, link_blocks, adapters)
        trained = trained_identity(source)
    except (AdapterError, CheckpointDamaged) as exc:
        return [("model.init_adapters", str(exc))]
    if problem:
        return [("model.init_adapters", problem)]
    return identity_problems(cfg, source, trained, action="start from it")


def init_problems(cfg, link_blocks: list[int]) -> list[tuple[str, str]]:
    """model.init_adapters against this config, by key: a source that cannot be read, does not fit the model, or
    was trained on another base or LoRA scale."""
    try:
        adapters, source = init_source(cfg.model.init_adapters)
    except WarmStartError as exc:
        return [("model.init_adapters", str(exc))]
    return source_problems(cfg, adapters, source, link_blocks)
