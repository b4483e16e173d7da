"""safetensors files written with the permissions of every other file the project writes.

safetensors' `save_file` creates its file readable by its owner alone (0600) whatever the umask, so exported
adapters and checkpoints were the only files a run's group could not read on a shared cluster."""
from __future__ import annotations

import os

import torch
from safetensors.torch import save_file


def save_tensors(tensors: dict[str, torch.Tensor], path: str, metadata: dict[str, str] | None = None) -> None:
    """`save_file`, then the mode a plain open() would have given the file (0666 less the umask)."""
    save_file(tensors, path, metadata=metadata)
    os.chmod(path, 0o666 & ~_umask())


def _umask() -> int:
    """This process's umask, read without changing it where Linux reports it (os.umask can only set it: a set and
    reset would race with files created meanwhile by other threads)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
