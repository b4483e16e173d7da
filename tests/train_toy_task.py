"""A small real TrainTask for the engine tests, selected with `train.task=tests.train_toy_task:ToyTask`.

Model: a frozen 'base' MLP plus trainable 'adapter' layers (zero-initialised up-projection, like LoRA); the
target is a fixed perturbed teacher, so the adapters can fit it. Data: a seeded dataset with a positioned
loader ({epoch, batch}). The step draws from torch's generator, numpy and python RNGs so resume exactness
covers them. Test hooks (environment): TOY_NAN_STEPS="3,6" (+ TOY_NAN_RANK=r, default every rank) make the
loss NaN at those steps; TOY_SIGNAL_AT="STEP:RANK:SIGNAL" (several: comma-separated, sent in order) sends the
signal to that rank's own process at that step (step 0: while the model is built), "STEP:RANK:SIGNAL:group" to that
rank's whole process group, its data workers included, as scancel and Slurm preemption do, "STEP:RANK:SIGNAL:eval"
to that rank's own process as the evaluation of that step starts,
"STEP:RANK:SIGNAL:batch" to the Slurm job's batch shell; TOY_WORKERS=N serves the batches from N DataLoader worker
processes (the same batches in the same order); TOY_EVAL_SLEEP=S makes every evaluation take S seconds more; each
rank appends {step, ids} per micro-batch to <run_dir>/toy_trace/rank-R.jsonl and writes its rank, world size, local
rank and Slurm node to where-R.json.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import random
import signal
import subprocess
import time

import deepspeed
import numpy as np
import torch
from torch import nn

from one4d_train.tensor_files import save_tensors

DIM, HIDDEN, RANK_ = 16, 64, 8
N_TRAIN, N_EVAL = 64, 16


def _teacher_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, DIM, generator=g)
    w1, w2 = _base_weights()["base.0.weight"], _base_weights()["base.2.weight"]
    delta = torch.randn(DIM, DIM, generator=torch.Generator().manual_seed(99)) * 0.3
    y = torch.tanh(x @ w1.T) @ w2.T + x @ delta.T
    return x, y


def _base_weights() -> dict[str, torch.Tensor]:
    """Stands in for the base's source files: fixed by its own seed, never by the run's."""
    g = torch.Generator().manual_seed(1234)
    return {"base.0.weight": torch.randn(HIDDEN, DIM, generator=g) / DIM**0.5,
            "base.2.weight": torch.randn(DIM, HIDDEN, generator=g) / HIDDEN**0.5}


class ToyModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.base = nn.Sequential(nn.Linear(DIM, HIDDEN, bias=False), nn.Tanh(), nn.Linear(HIDDEN, DIM, bias=False))
        self.adapter_down = nn.Linear(DIM, RANK_ * 4, bias=False)
        self.adapter_up = nn.Linear(RANK_ * 4, DIM, bias=False)
        with torch.no_grad():
            for p in self.base.parameters():
                p.zero_()  # real values come only from load_base_weights: a missed reload shows in the loss
                p.requires_grad_(False)
            self.adapter_up.weight.zero_()

    def forward(self, x):
        return self.base(x) + self.adapter_up(self.adapter_down(x))


class ToyBatches(torch.utils.data.Dataset):
    """Batch i of a list of id batches, built in a DataLoader worker."""

    def __init__(self, x, y, batches):
        self.x, self.y, self.batches = x, y, batches

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, i):
        ids = self.batches[i]
        return {"x": self.x[ids], "y": self.y[ids], "ids": ids.tolist()}


class ToyLoader:
    def __init__(self, x, y, rank, world_size, seed, micro_batch_size, position=None, workers=0):
        self.x, self.y, self.rank, self.world, self.seed, self.mbs = x, y, rank, world_size, seed, micro_batch_size
        position = position or {"epoch": 0, "batch": 0}
        self.epoch, self.batch = position["epoch"], position["batch"]
        self.workers = workers

    def _order(self, epoch):
        perm = torch.randperm(len(self.x), generator=torch.Generator().manual_seed(self.seed * 1000 + epoch))
        mine = perm[self.rank::self.world]
        return [mine[i:i + self.mbs] for i in range(0, len(mine) - self.mbs + 1, self.mbs)]

    def __iter__(self):
        batches = self._order(self.epoch)
        todo = ToyBatches(self.x, self.y, batches[self.batch:])
        # a generator of its own: starting the workers leaves the global torch RNG (checkpointed) untouched
        source = (torch.utils.data.DataLoader(todo, batch_size=None, num_workers=self.workers,
                                              generator=torch.Generator().manual_seed(0))
                  if self.workers else (todo[i] for i in range(len(todo))))
        for batch in source:
            self.batch += 1
            if self.batch == len(batches):
                self.epoch, self.batch = self.epoch + 1, 0
            yield batch
            if self.batch == 0:
                return

    def state_dict(self):
        return {"epoch": self.epoch, "batch": self.batch}


class ToyTask:
    def __init__(self, cfg):
        self.cfg = cfg
        self.nan_steps = {int(s) for s in os.environ.get("TOY_NAN_STEPS", "").split(",") if s}
        self.nan_rank = int(os.environ.get("TOY_NAN_RANK", "-1"))
        self.signal_at = [e for e in os.environ.get("TOY_SIGNAL_AT", "").split(",") if e]
        self.workers = int(os.environ.get("TOY_WORKERS", "0"))
        self.eval_sleep = float(os.environ.get("TOY_EVAL_SLEEP", "0"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.trace = os.path.join(cfg.run_dir, "toy_trace", f"rank-{self.rank}.jsonl")
        # where this rank runs, as the trainer set it up: the multi-node test reads it back
        os.makedirs(os.path.dirname(self.trace), exist_ok=True)
        with open(os.path.join(cfg.run_dir, "toy_trace", f"where-{self.rank}.json"), "w") as f:
            json.dump({"rank": self.rank, "world_size": int(os.environ.get("WORLD_SIZE", "1")),
                       "local_rank": int(os.environ.get("LOCAL_RANK", "0")),
                       "node": os.environ.get("SLURMD_NODENAME", "")}, f)

    def _signal(self, step, in_eval=False):
        due = [e for e in self.signal_at if int(e.split(":")[0]) == step and int(e.split(":")[1]) == self.rank
               and e.endswith(":eval") == in_eval]
        self.signal_at = [e for e in self.signal_at if e not in due]  # once, not at every micro-batch
        for entry in due:
            _, _, name, *group = entry.split(":")
            sig = getattr(signal, "SIG" + name)
            if group == ["batch"]:  # to the Slurm job's batch shell, as the time limit's --signal=B:USR1@LEAD comes
                subprocess.run(["scancel", f"--signal={name}", "--batch", os.environ["SLURM_JOB_ID"]], check=True)
                time.sleep(1 if entry != due[-1] else 5)  # in order; the shell passes it on to the ranks: here
            elif group == ["group"]:
                workers = sorted(p.pid for p in multiprocessing.active_children())
                print(f"toy: SIG{name} to process group {os.getpgid(0)}: rank {self.rank} and data workers "
                      f"{workers}", flush=True)
                os.killpg(os.getpgid(0), sig)
            else:
                os.kill(os.getpid(), sig)

    def build_model(self, partitioned):
        self._signal(0)
        with partitioned():
            return ToyModel()

    def load_base_weights(self, model):
        weights = _base_weights()
        params = dict(model.named_parameters())
        for name, value in weights.items():
            with deepspeed.zero.GatheredParameters([params[name]], modifier_rank=0):
                if self.rank == 0 or not hasattr(params[name], "ds_id"):
                    params[name].data.copy_(value.to(params[name].dtype))

    def build_loader(self, rank, world_size, position):
        x, y = _teacher_data(N_TRAIN, 7)
        return ToyLoader(x, y, rank, world_size, self.cfg.seed, self.cfg.train.micro_batch_size, position,
                         self.workers)

    def loss(self, model, batch, step, generator):
        os.makedirs(os.path.dirname(self.trace), exist_ok=True)
        with open(self.trace, "a") as f:
            f.write(json.dumps({"step": step, "ids": batch["ids"]}) + "\n")
        x = batch["x"] + 0.01 * torch.randn(batch["x"].shape, generator=generator) * float(np.random.rand())
        x = x * (1.0 + 0.001 * random.random())
        pred = model(x.to(next(model.parameters()).dtype)).float()
        err = (pred - batch["y"]) ** 2
        losses = {"loss_rgb": err[:, : DIM // 2].mean(), "loss_xyz": err[:, DIM // 2:].mean()}
        losses["loss"] = 0.5 * (losses["loss_rgb"] + losses["loss_xyz"])
        if step in self.nan_steps and self.nan_rank in (-1, self.rank):
            losses["loss"] = losses["loss"] * float("nan")
        self._signal(step)
        return losses

    def evaluate(self, model, step, out_dir):
        self._signal(step, in_eval=True)
        time.sleep(self.eval_sleep)
        x, y = _teacher_data(N_EVAL, 8)
        world = torch.distributed.get_world_size()
        share = slice(self.rank, None, world)
        pred = model(x[share].to(next(model.parameters()).dtype)).float()
        total = torch.tensor([((pred - y[share]) ** 2).sum().item(), float(pred.numel())], dtype=torch.float64)
        torch.distributed.all_reduce(total)
        if self.rank == 0:
            os.makedirs(out_dir, exist_ok=True)
            with open(os.path.join(out_dir, "eval.json"), "w") as f:
                json.dump({"step": step, "eval_loss": total[0].item() / total[1].item()}, f)
        return {"eval_loss": total[0].item() / total[1].item()}

    def flops_per_sample(self):
        return 6.0 * (2 * DIM * HIDDEN + 2 * DIM * RANK_ * 4)

    def tokens_per_sample(self):
        return 1

    def export(self, trainable_state, out_dir):
        save_tensors({k: v.contiguous() for k, v in trainable_state.items()}, os.path.join(out_dir, "adapter.safetensors"))


class ToyTaskWithoutExport(ToyTask):
    """A task with nothing to export (train.export_adapters=false runs it)."""
    export = None
