"""`one4d`: one entry point, one subcommand per stage of the data flow.

Each subcommand lives in its own module and exposes `main(argv) -> int`; modules are imported only when
their subcommand runs, so `one4d --help` stays fast.
"""
from __future__ import annotations

import importlib
import os
import re
import sys

COMMANDS = {
    # name: (module, one-line summary)
    "synth": ("data_pipeline.synthetic_cli", "render a synthetic 4D dataset with exact geometry + its manifest"),
    "shard": ("data_pipeline.shard_cli", "manifest (JSONL) -> validated WebDataset shards + index"),
    "encode-latents": ("data_pipeline.latents_cli", "shards -> the same shards plus precomputed VAE latents (fixed window)"),
    "inspect-shards": ("data_pipeline.inspect_cli", "check shards against their index and print statistics"),
    "print-config": ("one4d_train.config_cli", "print the merged config (defaults -> YAML -> key=value)"),
    "train": ("one4d_train.train.main", "train the One4D DLC model (DeepSpeed ZeRO-2/3, MLflow, exact resume)"),
    "eval": ("one4d_train.eval.main", "sample a checkpoint in the three UMC modes and score it"),
    "export": ("one4d_train.train.export_cli", "export a checkpoint's branch adapters and control links (safetensors)"),
    "demo": ("one4d_train.demo", "end-to-end demo on synthetic data, CPU, ~4 minutes"),
    "requeue": ("one4d_train.train.requeue", "for slurm/train.sbatch: where a requeued job resumes, what a run saved"),
}


EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, as a program the signal ended

LAUNCHER_ARG = re.compile(r"^--local[_-]rank(=\d+)?$")  # the deepspeed launcher adds --local_rank=N


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: one4d <command> [args...]   (one4d <command> --help for each)", "", "commands:"]
    lines += [f"  {name:<{width}}  {summary}" for name, (_, summary) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    try:
        try:
            return _main(argv)
        finally:
            sys.stdout.flush()  # what is still buffered goes now, inside the handler below, not at the exit
    except BrokenPipeError:  # `one4d inspect-shards DIR | head`: the reader left; no traceback, the shell's code
        if not _stdout_reader_gone():  # another pipe of the command's own broke: a failure, shown as one
            raise
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nor another one at the exit's flush
        return EXIT_BROKEN_PIPE


def _stdout_reader_gone() -> bool:
    """Whether standard output is a pipe whose reading end was closed (poll reports an error on it)."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (OSError, ValueError, AttributeError):  # no descriptor (a replaced sys.stdout), or no poll here
        return False


def _main(argv: list[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # the deepspeed launcher puts --local_rank=N first (`deepspeed --module one4d_train.cli train ...`); the rank
    # comes from the environment it sets as well
    argv = [a for a in argv if not LAUNCHER_ARG.match(a)]
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"one4d: unknown command '{name}'\n\n{usage()}", file=sys.stderr)
        return 2
    if name == "train":  # catch the stop signals before the imports of the trainer (torch...: seconds)
        from one4d_train.train import preemption
        preemption.install()
    try:
        module = importlib.import_module(COMMANDS[name][0])
        return int(module.main(rest) or 0)
    except KeyboardInterrupt:  # Ctrl-C (in training, a second one): one line, the shell's code for SIGINT
        from one4d_train.train.preemption import EXIT_INTERRUPTED

        print(f"one4d {name}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
