"""Who we are in the job (torchrun, the deepspeed launcher, Slurm or a plain process), the device, the
process group, and a clean exit."""
from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass
from datetime import timedelta

import torch

from one4d_train.train import preemption

# Slurm's rendezvous port when MASTER_PORT is unset: PORT_BASE + job id % PORT_SPAN, as slurm/train.sbatch sets it.
# 20000-31999 stays below Linux's ephemeral range (32768-60999), where an outgoing connection may already hold it.
PORT_BASE, PORT_SPAN = 20000, 12000


class DeviceUnavailable(RuntimeError):
    pass


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    launcher: str  # torchrun | slurm | single
    master_addr: str
    master_port: int
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _first_slurm_host(nodelist: str) -> str:
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
    return out.stdout.split()[0]


def launch_problem(environ: dict[str, str] | None = None) -> str | None:
    """What in the launcher's variables `detect` cannot read (a number that is none, a rank outside the world, no
    rendezvous host), naming the variable; None when they read. They come from torchrun, srun or a job script, so
    the problem is said as theirs, not as a config key's (RANK=abc was a ValueError traceback; WORLD_SIZE=0 was
    blamed on data.num_workers in the data config)."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world, names = "RANK", "WORLD_SIZE", ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        rank, world = "SLURM_PROCID", "SLURM_NTASKS"
        names = ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_JOB_ID", "MASTER_PORT")
        if not env.get("MASTER_ADDR") and not env.get("SLURM_JOB_NODELIST"):
            return ("SLURM_PROCID and SLURM_NTASKS are set, but neither MASTER_ADDR nor SLURM_JOB_NODELIST names the "
                    "host of rank 0 (run the tasks with srun inside an allocation, or set MASTER_ADDR)")
    else:
        rank = world = None
        names = ("MASTER_PORT",)
    for name in names:
        value = env.get(name, "")
        if (value or name in (rank, world)) and not value.isdigit():  # (a rank or world size set empty too)
            return f"environment variable {name}={value!r} is not a whole number >= 0 (set by the launcher or job)"
    port = env.get("MASTER_PORT", "")
    if port and not 1 <= int(port) <= 65535:
        return f"environment variable MASTER_PORT={port} is not a TCP port (1-65535)"
    if rank and not int(env[rank]) < int(env[world]):
        return (f"environment variables {rank}={env[rank]} and {world}={env[world]}: the rank must be below the "
                "number of processes (set by the launcher or job)")
    return None


def detect(environ: dict[str, str] | None = None) -> DistEnv:
    """Rank, world size and rendezvous from whichever launcher started us. torchrun and the deepspeed launcher
    set RANK/WORLD_SIZE (checked first, so `srun torchrun ...` is read as torchrun); srun sets SLURM_PROCID."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)), "torchrun",
                       env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", 29500)))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        addr = env.get("MASTER_ADDR") or _first_slurm_host(env["SLURM_JOB_NODELIST"])
        # every task of the job derives the same port from the job id without talking to the others
        port = int(env.get("MASTER_PORT") or PORT_BASE + int(env.get("SLURM_JOB_ID", 0)) % PORT_SPAN)
        return DistEnv(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)), "slurm",
                       addr, port)
    return DistEnv(0, 1, 0, "single", env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT") or _free_port()))


def choose_device(requested: str, local_rank: int) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailable("key 'train.device': cuda requested but no CUDA device is available")
    if requested != "cpu" and torch.cuda.is_available():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def setup(device: str, timeout_s: int) -> DistEnv:
    """Export the variables torch.distributed/DeepSpeed read, pick the device and start the process group. The stop
    signals are caught from here on (preemption.install): one during the start-up is a requested stop, not a kill."""
    preemption.install()
    info = detect()
    info.device = choose_device(device, info.local_rank)
    os.environ.update(RANK=str(info.rank), WORLD_SIZE=str(info.world_size), LOCAL_RANK=str(info.local_rank),
                      MASTER_ADDR=info.master_addr, MASTER_PORT=str(info.master_port))
    if info.device.type == "cpu":
        os.environ["DS_ACCELERATOR"] = "cpu"  # read when deepspeed first picks its accelerator, so set before importing it
    import deepspeed

    if info.device.type == "cpu":
        skip_cpu_inference_ops()
    with stop_ends_the_wait("the other ranks to start"):
        deepspeed.init_distributed(dist_backend="nccl" if info.device.type == "cuda" else "gloo",
                                   auto_mpi_discovery=False, timeout=timedelta(seconds=timeout_s), rank=info.rank,
                                   world_size=info.world_size)
    return info


@contextlib.contextmanager
def stop_ends_the_wait(what: str):
    """A stop signal inside the block ends the process at once with REQUEUE_EXIT_CODE. The rendezvous waits for the
    other ranks inside C++, where Python's signal handlers do not run: a rank whose peers never came ignored
    SIGTERM, scancel and Ctrl-C until the rendezvous timed out (30 minutes by default). Nothing is there to save yet.
    A stop that came before the block (during the imports: the handler only set its flag) ends it the same way.
    The signal is seen through Python's wakeup file descriptor, which the C-level handler writes to at once, by a
    thread that watches it for the block's length."""
    read, write = os.pipe()
    os.set_blocking(write, False)
    try:
        previous = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
    except ValueError:  # not the main thread: no wakeup descriptor to set; the handlers act after the block
        os.close(read), os.close(write)
        yield
        return
    done = threading.Event()
    stops = {int(s) for s in preemption.Preemption.SIGNALS}

    def stop(name: str, when: str = "while"):
        print(f"one4d train: {name} {when} waiting for {what}: stopping (exit {preemption.REQUEUE_EXIT_CODE}), "
              "nothing to save yet", file=sys.stderr, flush=True)
        os._exit(preemption.REQUEUE_EXIT_CODE)

    received = preemption.install().received
    if received:  # asked for before the wait (during the imports): it would wait as long as one asked inside
        stop(received, "before")

    def watch():
        while not done.is_set():
            if select.select([read], [], [], 0.2)[0]:
                got = [b for b in os.read(read, 64) if b in stops]
                if got and not done.is_set():
                    stop(signal.Signals(got[0]).name)

    watcher = threading.Thread(target=watch, name="one4d-stop-watch", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        done.set()
        signal.set_wakeup_fd(previous)
        watcher.join()
        os.close(read), os.close(write)


def skip_cpu_inference_ops():
    """Keep DeepSpeed's CPU process group from compiling its shared-memory all-reduce op: it serves only DeepSpeed's
    inference all-reduce, never a training collective, and building it costs a C++ compiler and ~30 s of the first
    start on a machine (the demo's, CI's). DeepSpeed reads the op's availability from this dict, made for edits."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def broadcast_from_main(value):
    """Rank 0's `value` (picklable, small), on every rank."""
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def from_every_rank(value) -> list:
    """Collective: every rank's `value` (picklable, small), in rank order, on every rank; also a barrier."""
    import torch.distributed as dist

    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, value)
    return everyone


def shutdown(code: int) -> None:
    """Leave the process group and exit without running interpreter teardown: DeepSpeed ranks otherwise abort at
    exit now and then (SIGABRT after finishing), which would turn a clean finish into a failure."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
