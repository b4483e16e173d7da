"""The training loop: builds the DeepSpeed engine around the task's model, resumes, steps, logs, evaluates,
checkpoints, handles preemption and non-finite steps. Everything model- or data-specific is the task's."""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil

from contextlib import nullcontext

import deepspeed
from deepspeed.utils import safe_get_full_fp32_param
from omegaconf import OmegaConf
import torch
import torch.distributed as dist

from one4d_train.configtools import ConfigError, flatten, to_dict, to_yaml
from one4d_train.train import checkpoint as ckpt
from one4d_train.train import deepspeed_config, grad_checks, metrics, preemption, schedule
from one4d_train.train.distributed import DistEnv, broadcast_from_main, from_every_rank
from one4d_train.train.preemption import EXIT_BAD_STEPS, EXIT_OK, REQUEUE_EXIT_CODE
from one4d_train.train.task import TrainTask
from one4d_train.train.tracking import build_tracker

log = logging.getLogger("one4d.train")

EVAL_DONE = "COMPLETE"  # in eval/step-N/, written last: that step's evaluation finished and was logged


def to_device(batch, device: torch.device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def other_model_message(path: str, mismatches: list[str], cfg) -> str:
    """Why checkpoint `path` cannot be resumed by this config's model, naming the model.* keys that differ from the
    config.yaml of the checkpoint's run."""
    lines = [f"key 'resume': {path} was trained with another model: {len(mismatches)} trainable parameters differ "
             f"({'; '.join(mismatches[:3])}{'; ...' if len(mismatches) > 3 else ''}). Resume with the model.* values "
             "it was trained with, or start a new run (another run_dir, or resume=never)"]
    run_config = ckpt.config_of(path)  # its run's, else a copy's own
    if run_config:
        try:
            theirs = flatten(OmegaConf.to_container(OmegaConf.load(run_config), resolve=True))
        except Exception as exc:  # not YAML (binary garbage: UnicodeDecodeError), or not a mapping
            why = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
            return "\n".join(lines + [f"(the model.* values it was trained with are not shown: {run_config} cannot be "
                                      f"read ({type(exc).__name__}{': ' + why if why else ''}); the run directory's "
                                      "config.yaml is damaged)"])
        ours = flatten(to_dict(cfg))
        lines += [f"key '{k}': {ours[k]!r} here, {theirs[k]!r} in {run_config}" for k in sorted(ours)
                  if k.startswith("model.") and k in theirs and theirs[k] != ours[k]]
    return "\n".join(lines)


class Trainer:
    def __init__(self, cfg, task: TrainTask, env: DistEnv):
        self.preemption = preemption.install()  # first: a stop asked for during the build is honoured, not fatal
        self.cfg, self.task, self.env, self.device = cfg, task, env, env.device
        t = cfg.train
        self.global_batch = t.micro_batch_size * t.grad_accum * env.world_size
        self.ds_config, overridden = deepspeed_config.build(cfg, env.world_size)
        if env.is_main:
            for line in overridden:
                log.info("deepspeed override: %s", line)
            log.info("global batch %d = micro %d x accum %d x world %d", self.global_batch, t.micro_batch_size,
                     t.grad_accum, env.world_size)
        self.engine = self._build_engine()
        self.trainable = [(n, p) for n, p in self.engine.module.named_parameters() if p.requires_grad]
        self.checkpointer = ckpt.Checkpointer(cfg.run_dir, env.rank, env.world_size, t.keep_last, to_yaml(cfg))
        self.branch_tags = None  # MLflow tags of a new run for a branch (set by _resume)
        self.started_from = None  # the checkpoint whose resume=PATH began this timeline (ckpt.start_point)
        self.tracker = build_tracker(cfg, env.is_main)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(cfg.seed * 1_000_003 + env.rank)
        self.step, self.bad_streak, self.skipped_total = 0, 0, 0
        self.alloc_retries = metrics.AllocRetries()  # the CUDA allocator's, per log window
        self.samples_seen = 0  # all ranks, every step so far (a resume may change the global batch)
        self.window = {"sums": {}, "counted": 0}  # losses of the steps since the last log line, this rank's
        self.eval_pending = False  # the evaluation due at self.step has not finished (a checkpoint owes it)
        # rank 0: the resumed checkpoint was trained with this config (run_dir and resume aside), so what its run
        # logged and evaluated past it is what this job would retrain: not logged or evaluated again
        self.same_config = True
        self.step_lr = 0.0  # the lr the current step's optimizer update uses
        self.peak = metrics.peak_flops(t.peak_flops_per_device, self.device)
        self.zero_layout = deepspeed_config.optimizer_layout(t)  # recorded in every checkpoint

    def _build_engine(self):
        t = self.cfg.train
        def partitioned():
            return deepspeed.zero.Init(config_dict_or_path=self.ds_config) if t.zero_stage == 3 else nullcontext()

        model = self.task.build_model(partitioned)
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise RuntimeError("the task's model has no trainable parameters")
        o = self.cfg.optim
        optimizer = torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay,
                                      fused=self.device.type == "cuda")
        scheduler = schedule.build_scheduler(optimizer, o, t.steps)
        grad_checks.install()
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=params, optimizer=optimizer,
                                               lr_scheduler=scheduler, config=self.ds_config, dist_init_required=False)
        ckpt.install_safe_loader(engine)
        self.task.load_base_weights(engine.module)
        return engine

    # -- state --------------------------------------------------------------------------------------------------

    def _train_state(self, loader) -> tuple[dict, dict]:
        rng, tensors = ckpt.capture_rng(self.generator, self.device)
        state = {"step": self.step, "samples_seen": self.samples_seen, "bad_streak": self.bad_streak,
                 "skipped_total": self.skipped_total, "loader": loader.state_dict(), "rng": rng,
                 "log_window": self.window, "eval_pending": self.eval_pending,
                 "mlflow_run_id": self.tracker.run_id, "rank": self.env.rank, "world_size": self.env.world_size,
                 "started_from": self.started_from,  # the same resume=PATH run again goes on from here
                 # DeepSpeed's checkpoint layout: a resume under another stage, precision or setting that lays
                 # out the optimizer state is refused by key
                 "zero_stage": self.cfg.train.zero_stage, "precision": self.cfg.train.precision,
                 "zero_layout": self.zero_layout}
        if hasattr(self.task, "identity"):  # e.g. the frozen base: a resume onto another is refused
            state["task_identity"] = self.task.identity()
        return state, tensors

    def _resume(self) -> tuple[dict | None, str | None]:
        """Load the checkpoint chosen by cfg.resume, after moving aside any newer one of this run (an abandoned
        timeline); returns (loader position, the MLflow run to continue: None for a new one)."""
        if self.env.is_main:  # an interrupted save's folder: on a full disk, the space this start writes into
            self.checkpointer.clear_leftovers()
        resume, start = self._resume_target()
        # every rank verifies the files it reads; resume=auto sets a damaged checkpoint aside and falls back, as
        # resume=PATH does among the checkpoints its command went on to
        branch = (self.cfg.resume, self.checkpointer.config_text) if resume != self.cfg.resume else None
        path, fell_back = ckpt.choose_resume(resume, self.checkpointer.dir, self.env.rank, branch)
        if fell_back or resume != self.cfg.resume:
            # the start-up checks saw another checkpoint: this one's world size, layout, base, data position
            from one4d_train.train.config import preflight
            # each rank's view: all raise together, or none does
            everyone = from_every_rank(preflight(dataclasses.replace(self.cfg, resume=path)))
            problems = list(dict.fromkeys(p for found in everyone for p in found))
            if problems:
                how = "fell back to" if fell_back else "goes on from"
                raise ConfigError(f"resume={self.cfg.resume} {how} {path}, which this run cannot continue: "
                                  + "; ".join(f"key '{k}': {v}" for k, v in problems))
        if path is not None:  # before any checkpoint is moved aside for it
            shapes = {n: tuple(getattr(p, "ds_shape", p.shape)) for n, p in self.trainable}
            with ckpt.loading(path):
                mismatches = ckpt.shape_mismatches(path, shapes)
            if mismatches:
                raise ConfigError(other_model_message(path, mismatches, self.cfg))
        dist.barrier()  # every rank has chosen before rank 0 moves folders
        if self.env.is_main:
            ckpt.set_aside(self.checkpointer.dir, path)
        if path is None:
            return None, None
        # verified already, unless its marker records no CRC-32s: then a file that does not load is named here
        with ckpt.loading(path):
            state, tensors = self._load_train_state(path)
            load_dir, _ = self.engine.load_checkpoint(path, tag="ds", load_module_strict=False)
        if load_dir is None:
            raise RuntimeError(f"DeepSpeed could not load {path}")
        # the checkpoint restored the optimizer hyperparameters and schedule it was written with: this config's win
        changes = schedule.apply_config(self.engine.lr_scheduler, self.cfg.optim, self.cfg.train.steps)
        self.task.load_base_weights(self.engine.module)  # ZeRO-3 checkpoints hold no frozen weights
        with ckpt.loading(path):
            try:
                ckpt.restore_rng(state["rng"], tensors, self.generator, self.device)
            except (ValueError, TypeError, KeyError, IndexError, RuntimeError) as exc:
                raise ckpt.CheckpointDamaged(f"{path}/train_state/rank-{self.env.rank:05d}.json, .safetensors: the "
                                             f"RNG state does not restore ({type(exc).__name__}: {exc}): damaged")
        self.step, self.bad_streak, self.skipped_total = state["step"], state["bad_streak"], state["skipped_total"]
        self.samples_seen = state["samples_seen"]
        # written before these were kept: the log window restarts, no evaluation is owed; an owed one that finished
        # after its checkpoint was written is not run again (_evaluated)
        self.window = state.get("log_window", {"sums": {}, "counted": 0})
        self.eval_pending = state.get("eval_pending", False)
        begins = path == self.cfg.resume  # a start from PATH (also where its branch's checkpoints were damaged)
        self.started_from = start if begins else state.get("started_from")  # else the timeline it continues
        if self.env.is_main:
            log.info("resumed from %s at step %d", path, self.step)
            self._compare_config(path)
            if changes:
                log.warning("resumed with a changed optimiser or schedule; from step %d on: %s", self.step + 1,
                            "; ".join(changes))
        # the id is meaningful on rank 0, which tracks; another run's checkpoint (a start from it) brings its weights
        # and position, but its MLflow run is that run's, kept in that run's store: this run records into a new one
        theirs = ckpt.run_dir_of(path)
        ours = theirs is not None and os.path.realpath(theirs) == os.path.realpath(self.cfg.run_dir)
        if ours and self.env.is_main and ckpt.continued_elsewhere(self.checkpointer.dir, path, state["mlflow_run_id"]):
            # a branch from an earlier checkpoint: its run holds the abandoned timeline's metrics past this step, so
            # the branch records into a new run that names it (a shared one showed two values at every later step)
            self.branch_tags = {"one4d.branched_from_run": str(state["mlflow_run_id"]),
                                "one4d.branched_at_step": str(self.step)}
            return state["loader"], None
        return state["loader"], state["mlflow_run_id"] if ours else None

    def _compare_config(self, path: str) -> None:
        """Rank 0: whether checkpoint `path` was trained with this job's config (self.same_config). A changed key
        (optim.lr, train.steps ...) retrains the steps past it to other values: those its MLflow run holds are logged
        again and their evaluations run again, which a config.yaml that does not read is taken for, too."""
        changes = ckpt.config_changes(path, self.checkpointer.config_text)
        self.same_config = changes == []
        if not self.same_config:
            log.info("resumed under another config than %s was trained with (%s): the steps after it are logged "
                     "and evaluated again", path, ", ".join(changes) if changes else "its config.yaml does not read")

    def _resume_target(self) -> tuple[str, dict | None]:
        """Collective: (the resume to make of cfg.resume, the start point (ckpt.start_point) of PATH, recorded where
        the resume begins a timeline from it; None for auto and never). resume=PATH run again after the start it made
        was stopped goes on from that start's newest checkpoint (ckpt.branch_progress), in its MLflow run: starting
        from PATH again set aside the progress since as an abandoned branch, in a new MLflow run. Else it starts from
        PATH, as its checkpoints record."""
        resume = self.cfg.resume
        if resume in ("auto", "never"):
            return resume, None
        decision = None
        if self.env.is_main:
            decision = (*ckpt.branch_progress(self.checkpointer.dir, resume, self.checkpointer.config_text),
                        ckpt.start_point(resume))
        newest, changes, start = broadcast_from_main(decision)
        if self.env.is_main and newest:
            log.info("resume=%s: %s continues the start this command made from it: resuming from there", resume,
                     newest)
        elif self.env.is_main and changes:
            log.warning("resume=%s: the newer checkpoints continue a start made from it under another config (%s "
                        "differ): a new branch starts from it, and they are set aside (the command they were trained "
                        "with, or resume=auto, continues them instead)", resume, ", ".join(changes))
        return newest or resume, start

    def _load_train_state(self, path: str) -> tuple[dict, dict]:
        """Collective: this rank's train state of checkpoint `path`, once every rank has read its own and opened the
        DeepSpeed files it reads: a file that does not load, on any rank, stops every rank with its message (one rank
        failing alone inside DeepSpeed's load left the others to fail in its next collective, with a traceback)."""
        try:
            loaded, problem = self.checkpointer.load_train_state(path), None
            ckpt.open_deepspeed_files(path, self.env.rank)
        except ckpt.CheckpointDamaged as exc:
            loaded, problem = None, str(exc)
        problems = from_every_rank(problem)
        if any(problems):
            raise ckpt.CheckpointDamaged("; ".join(p for p in problems if p))
        return loaded

    def _save(self, loader) -> None:
        state, tensors = self._train_state(loader)
        export = self._export if self.cfg.train.export_adapters else None
        path = self.checkpointer.save(self.engine, self.step, state, tensors, export)
        if self.env.is_main:
            log.info("checkpoint %s", path)

    def _export(self, out_dir: str) -> None:
        """Gather the trainable parameters only (never the frozen base), one at a time so no rank ever holds more
        than one whole adapter tensor on the device, and let rank 0's task write them."""
        state = {}
        for name, p in self.trainable:
            # the optimizer's fp32 master (under bf16 the module holds a rounded copy); a collective under ZeRO-3
            full = safe_get_full_fp32_param(p)
            if self.env.is_main:
                state[name] = (full if full is not None else p.detach()).to("cpu", torch.float32, copy=True)
        if self.env.is_main:
            os.makedirs(out_dir, exist_ok=True)
            self.task.export(state, out_dir)

    # -- loop ---------------------------------------------------------------------------------------------------

    def _all_reduce(self, values: list[float], op=dist.ReduceOp.SUM) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64 if self.device.type == "cpu" else torch.float32, device=self.device)
        dist.all_reduce(t, op=op)
        return t.tolist()

    def _micro_step(self, batches, step: int) -> tuple[dict[str, float], bool]:
        batch = to_device(batches(), self.device)
        losses = self.task.loss(self.engine, batch, step, self.generator)
        loss = losses["loss"]
        bad = self._all_reduce([0.0 if torch.isfinite(loss).item() else 1.0], dist.ReduceOp.MAX)[0] > 0
        if bad:
            # poison every rank's gradients so DeepSpeed's own overflow check discards the whole step everywhere:
            # no optimizer (Adam moment) update, no LR scheduler step
            loss = loss * float("nan")
        self.engine.backward(loss)
        self.engine.step()
        return {k: float(v.detach()) for k, v in losses.items()}, bad

    def _eval_dir(self) -> str:
        return os.path.join(self.cfg.run_dir, "eval", ckpt.step_name(self.step))

    def _evaluated(self) -> bool:
        """Collective: whether the evaluation of this step finished in this MLflow run (its marker, written after
        its metrics and files were logged), under this config (self.same_config). A run resumed from a checkpoint of
        an evaluation step owes that evaluation until then: the checkpoint is written first, and a job can die in
        between."""
        done = False
        if self.env.is_main:
            try:
                with open(os.path.join(self._eval_dir(), EVAL_DONE)) as f:
                    marker = json.load(f)
                # a folder of the same step may be another timeline's (a branch's first run evaluated it)
                done = marker.get("step") == self.step and marker.get("mlflow_run_id") == self.tracker.run_id
                if done and not self.same_config:  # it scored the weights another config trained
                    log.info("eval step %d: finished before this job under another config: run again", self.step)
                    done = False
            except (OSError, ValueError, AttributeError):  # none, or a damaged one: not finished
                done = False
            if done:
                log.info("eval step %d: finished before this job (%s): not run again", self.step, self._eval_dir())
        return broadcast_from_main(done)

    def _evaluate(self) -> None:
        """Every rank runs task.evaluate (its share, reduced inside); nobody waits alone in a collective. Rank 0
        first clears what an evaluation of this step left (one cut short, or another timeline's): its files would
        be uploaded with this one's."""
        out_dir = self._eval_dir()
        if self.env.is_main and os.path.isdir(out_dir):
            shutil.rmtree(out_dir)
        dist.barrier()
        self.engine.module.eval()
        # its data workers too outlive a group-wide signal; a second Ctrl-C still stops at once
        with torch.no_grad(), self.preemption.shielded(interruptible=True):
            results = self.task.evaluate(self.engine.module, self.step, out_dir)
        self.engine.module.train()
        self.eval_pending = False
        dist.barrier()
        if self.env.is_main:
            log.info("eval step %d: %s", self.step, ", ".join(f"{k} {v:.4g}" for k, v in sorted(results.items())))
            failed = self.tracker.failed_writes
            self.tracker.log_metrics({f"eval/{k}": v for k, v in results.items()}, self.step)
            if os.path.isdir(out_dir) and os.listdir(out_dir):
                self.tracker.log_artifacts(out_dir, f"eval/{ckpt.step_name(self.step)}")
            os.makedirs(out_dir, exist_ok=True)
            # the run it was recorded in; none where the store took none of it (a resume evaluates it again)
            recorded = not self.tracker.disabled and self.tracker.failed_writes == failed
            marker = {"step": self.step, "mlflow_run_id": self.tracker.run_id if recorded else None,
                      "results": {k: float(v) for k, v in results.items()}}
            ckpt.write_atomic(os.path.join(out_dir, EVAL_DONE), json.dumps(marker))

    def _stop_before_first_step(self) -> bool:
        """Collective: a stop asked for during the start-up ends the run before any step, with nothing to save."""
        if not self.preemption.agreed(self.device):
            return False
        if self.env.is_main:
            log.warning("stop requested (%s on some rank) before the first step: exiting %d for requeue, with "
                        "nothing new to checkpoint", self.preemption.received or "signal", REQUEUE_EXIT_CODE)
        return True

    def train(self) -> int:
        cfg, t = self.cfg, self.cfg.train
        evaluate = getattr(self.task, "evaluate", None)
        if self._stop_before_first_step():  # before reading a checkpoint, which takes minutes at 14B
            return REQUEUE_EXIT_CODE
        position, run_id = self._resume()
        if self._stop_before_first_step():
            return REQUEUE_EXIT_CODE
        if self.env.is_main:
            os.makedirs(cfg.run_dir, exist_ok=True)
            text = to_yaml(cfg)
            ckpt.write_atomic(os.path.join(cfg.run_dir, "config.yaml"), text)
            tags = {**(self.branch_tags or {}), **(self.task.run_tags() if hasattr(self.task, "run_tags") else {})}
            self.tracker.start(run_id, flatten(to_dict(cfg)), tags=tags, same_config=self.same_config)
            self.tracker.log_text(text, "config.yaml")
        with self.preemption.shielded():
            loader = self.task.build_loader(self.env.rank, self.env.world_size, position)
            iterator = iter(loader)

        def next_batch():
            nonlocal iterator
            with self.preemption.shielded():  # data workers start here: they outlive a signal to the process group
                try:
                    return next(iterator)
                except StopIteration:
                    iterator = iter(loader)  # next epoch
                    return next(iterator)

        def eval_due(step: int) -> bool:
            return evaluate is not None and bool(cfg.eval.every) and step % cfg.eval.every == 0

        if self.eval_pending and eval_due(self.step) and not self._evaluated():
            self._evaluate()  # due at the checkpoint's step: left for after a requeue, or cut short by a kill
        timer = metrics.StepTimer()
        while self.step < t.steps:
            step = self.step + 1
            self.step_lr = self.engine.get_lr()[0]  # the scheduler moves on inside the step: log the lr it used
            step_losses, step_bad = {}, False
            for _ in range(t.grad_accum):
                losses, bad = self._micro_step(lambda: timer.timed_next(next_batch), step)
                step_bad |= bad
                for k, v in losses.items():
                    step_losses[k] = step_losses.get(k, 0.0) + v / t.grad_accum
            skipped = step_bad or not self.engine.was_step_applied()
            self.step = step
            self.samples_seen += self.global_batch
            timer.step_done()
            if skipped:
                self.bad_streak += 1
                self.skipped_total += 1
                if self.env.is_main:
                    log.warning("step %d: non-finite loss or gradients, step skipped (%d in a row, %d in total)", step,
                                self.bad_streak, self.skipped_total)
                    self.tracker.log_metrics({"skipped_steps": self.skipped_total}, step)
                if self.bad_streak >= t.max_bad_steps:
                    if self.env.is_main:
                        log.error("stopping: %d consecutive non-finite steps (train.max_bad_steps=%d); last good "
                                  "checkpoint is in %s", self.bad_streak, t.max_bad_steps, self.checkpointer.dir)
                        self.tracker.end("FAILED")
                    return EXIT_BAD_STEPS
            else:
                self.bad_streak = 0
                sums = self.window["sums"]
                for k, v in step_losses.items():
                    sums[k] = sums.get(k, 0.0) + v
                self.window["counted"] += 1
            if step % t.log_every == 0 or step == t.steps:
                self._log(step, self.window["sums"], self.window["counted"], timer,
                          getattr(loader, "samples_skipped", 0), getattr(loader, "samples_too_short", 0))
                self.window = {"sums": {}, "counted": 0}
            stop = self.preemption.agreed(self.device)
            due = eval_due(step)
            self.eval_pending = due  # checkpointed before the evaluation: a resume runs it unless it finished
            if due and stop and self.env.is_main:
                log.warning("evaluation of step %d left for after the requeue (the signal's grace time is short)",
                            step)
            with timer.paused():
                if step % t.checkpoint_every == 0 or step == t.steps or stop:
                    self._save(loader)
                    if not stop and step < t.steps:  # a signal during the save: stop on this checkpoint, not
                        stop = self.preemption.agreed(self.device)  # after another step and another save
                        if due and stop and self.env.is_main:
                            log.warning("evaluation of step %d left for after the requeue (stop requested during "
                                        "its checkpoint)", step)
                if due and not stop and not self._evaluated():  # one that finished before a kill is not repeated
                    self._evaluate()
            if stop:
                if self.env.is_main:
                    log.warning("preempted (%s on some rank): checkpointed step %d, exiting %d for requeue",
                                self.preemption.received or "signal", step, REQUEUE_EXIT_CODE)
                    self.tracker.end("KILLED")
                return REQUEUE_EXIT_CODE
        if self.env.is_main:
            final = os.path.join(self.checkpointer.dir, ckpt.step_name(self.step))
            if t.export_adapters and os.path.isdir(os.path.join(final, "adapters")):
                self.tracker.log_artifacts(os.path.join(final, "adapters"), "adapters")
                log.info("adapters: %s", os.path.join(final, "adapters"))
            elif not t.export_adapters:
                log.info("adapters not exported (train.export_adapters=false): one4d export checkpoint=%s out=DIR "
                         "from_zero=true rebuilds them", final)
            self.tracker.end("FINISHED")
            uri = getattr(self.tracker, "uri", "-")
            log.info("done: %d steps, %d steps skipped (non-finite loss or gradients); MLflow store %s (view: mlflow "
                     "ui --backend-store-uri %s)", self.step, self.skipped_total, uri, uri)
        return EXIT_OK

    def _log(self, step: int, sums: dict[str, float], counted: int, timer: metrics.StepTimer,
             data_skipped: int = 0, data_short: int = 0) -> None:
        """Means of the window's losses and the samples the loaders skipped so far (`data_short` of them clips
        shorter than the frame window), over all ranks."""
        keys = sorted(sums)
        new_retries = self.alloc_retries.window(metrics.alloc_retries(self.device))  # summed over ranks below
        reduced = self._all_reduce([sums[k] / max(counted, 1) for k in keys]
                                   + [float(new_retries), float(data_skipped), float(data_short)])
        data_short, data_skipped, new_retries = int(reduced.pop()), int(reduced.pop()), int(reduced.pop())
        elapsed, data_s, steps = timer.window()
        if not self.env.is_main:
            return
        world = self.env.world_size
        losses = {k: v / world for k, v in zip(keys, reduced)}
        perf = metrics.throughput(elapsed, data_s, steps, self.global_batch, world, self.task.flops_per_sample(),
                                  self.task.tokens_per_sample(), self.peak, self.device)
        perf["alloc_retries"] = new_retries  # (0 off CUDA)
        offload = getattr(self.engine.module, "activation_offload", None)
        if offload is not None:  # host memory its saved activations hold, per process (model/offload.py)
            perf["host_offload_gib"] = offload.host_bytes / 2**30
        lr = self.step_lr
        grad_norm = self.engine.get_global_grad_norm()
        grad_norm = float(grad_norm) if grad_norm is not None and math.isfinite(float(grad_norm)) else None
        log.info(metrics.format_line(step, self.cfg.train.steps, losses, lr, grad_norm, perf, self.skipped_total))
        warning = self.alloc_retries.warning(new_retries, steps)
        if warning:
            log.warning(warning)
        if data_skipped:
            log.info(metrics.data_skips_line(data_skipped, data_short))
        values = {**losses, **perf, "lr": lr, "skipped_steps": self.skipped_total, "data_skipped_samples": data_skipped,
                  "data_short_samples": data_short}
        if grad_norm is not None:
            values["grad_norm"] = grad_norm
        self.tracker.log_metrics(values, step)
