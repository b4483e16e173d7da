"""How much host memory this process may still take before the out-of-memory killer ends it.

The smallest of the machine's `MemAvailable` (/proc/meminfo) and, for the process's control group and each group
above it that limits memory (a Slurm job's --mem sits on the job's group, its tasks' groups below say "max"; a
container's, a systemd slice's), the limit less what the group holds that cannot be reclaimed: its usage less its page
cache (shared memory excepted: it cannot be dropped). cgroup v2 and v1 layouts both; a group whose directory is not
mounted where /proc/self/cgroup names it (a cgroup namespace) is read from the mount's root up to nothing above it.
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


def _groups(mount: str, path: str) -> list[str]:
    """The group's directory and those above it, up to the mount's root."""
    own = os.path.join(mount, path.strip("/"))
    if not os.path.isdir(own):
        return [mount]
    dirs = [own]
    while os.path.normpath(dirs[-1]) != os.path.normpath(mount):
        dirs.append(os.path.dirname(os.path.normpath(dirs[-1])))
    return dirs


# per layout: the hierarchy's mount below /sys/fs/cgroup, limit, usage, page cache and shared memory in memory.stat
_LAYOUTS = {"v2": ("", "memory.max", "memory.current", "file", "shmem"),
            "v1": ("memory", "memory.limit_in_bytes", "memory.usage_in_bytes", "total_cache", "total_shmem")}


def _cgroup_available(root: str) -> int | None:
    for line in (_read(os.path.join(root, "proc/self/cgroup")) or "").splitlines():
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            layout = _LAYOUTS["v2"]
        elif "memory" in controllers.split(","):
            layout = _LAYOUTS["v1"]
        else:
            continue
        sub, limit_file, usage_file, cache_key, shmem_key = layout
        left = []
        for d in _groups(os.path.join(root, "sys/fs/cgroup", sub), path):
            limit, usage = _read(os.path.join(d, limit_file)), _read(os.path.join(d, usage_file))
            if limit is None or usage is None or limit.strip() == "max" or int(limit) >= _UNLIMITED:
                continue
            stat = _read(os.path.join(d, "memory.stat"))
            held = int(usage) - _stat(stat, cache_key) + _stat(stat, shmem_key)
            left.append(int(limit) - held)
        if controllers == "" or left:  # v2's one hierarchy, or v1's memory controller: no other line to read
            return min(left) if left else None
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
