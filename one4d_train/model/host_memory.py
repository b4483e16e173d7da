"""How much host memory this process may still take before the out-of-memory killer ends it.

The smaller of the machine's `MemAvailable` (/proc/meminfo) and, where the process runs in a memory-limited control
group (a Slurm job with --mem, a container), the group's limit less what it holds that cannot be reclaimed (its usage
less its inactive page cache). cgroup v2 and v1 layouts both; a group whose directory is not mounted where
/proc/self/cgroup names it (a cgroup namespace) is read at the mount's root.
"""
from __future__ import annotations

import os

_UNLIMITED = 1 << 60  # cgroup v1 writes "no limit" as a page-rounded 2^63 - 1


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def _stat(text: str | None, key: str) -> int:
    for line in (text or "").splitlines():
        name, _, value = line.partition(" ")
        if name == key and value.strip().isdigit():
            return int(value)
    return 0


def _meminfo_available(root: str) -> int | None:
    for line in (_read(os.path.join(root, "proc/meminfo")) or "").splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return None


def _group_dir(mount: str, path: str) -> str:
    own = os.path.join(mount, path.lstrip("/"))
    return own if os.path.isdir(own) else mount


def _cgroup_available(root: str) -> int | None:
    for line in (_read(os.path.join(root, "proc/self/cgroup")) or "").splitlines():
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2: one unified hierarchy
            d = _group_dir(os.path.join(root, "sys/fs/cgroup"), path)
            limit, usage, stat = (_read(os.path.join(d, n)) for n in ("memory.max", "memory.current", "memory.stat"))
            if limit is None or usage is None or limit.strip() == "max":
                continue
            return int(limit) - (int(usage) - _stat(stat, "inactive_file"))
        if "memory" in controllers.split(","):  # v1: the memory controller's own hierarchy
            d = _group_dir(os.path.join(root, "sys/fs/cgroup/memory"), path)
            limit, usage, stat = (_read(os.path.join(d, n)) for n in (
                "memory.limit_in_bytes", "memory.usage_in_bytes", "memory.stat"))
            if limit is None or usage is None or int(limit) >= _UNLIMITED:
                return None
            return int(limit) - (int(usage) - _stat(stat, "total_inactive_file"))
    return None


def available_bytes(root: str = "/") -> int | None:
    """Bytes of host memory this process can still take; None where none of the sources can be read."""
    found = []
    for source in (_meminfo_available, _cgroup_available):
        try:
            value = source(root)
        except ValueError:  # a file not in the format above: that source says nothing
            value = None
        if value is not None:
            found.append(value)
    return min(found) if found else None
