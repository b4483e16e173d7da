"""One evaluation at a time per eval folder: an exclusive lock on `<eval folder>.lock` (flock, which Linux's NFS
client carries to the server as a POSIX lock; released when the holder dies, so a killed job leaves nothing to
clean up). Two jobs scanning one run directory
then never score, write and log the same checkpoint at once: the second skips what the first holds."""
from __future__ import annotations

import contextlib
import fcntl
import os
import sys


class Busy(Exception):
    """Another process holds the lock; the message names it."""


@contextlib.contextmanager
def claim(out_dir: str):
    """Hold `<out_dir>.lock` for the block. The lock file is created in out_dir's parent, which must exist: a
    checkpoint removed since it was listed (train.keep_last) raises FileNotFoundError instead of being recreated."""
    path = os.path.normpath(out_dir) + ".lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise Busy(f"{out_dir} is being evaluated by another process (it holds {path})") from None
        except OSError as exc:  # a filesystem without flock support (Lustre mounted without -o flock)
            print(f"one4d eval: cannot lock {path} ({exc}); evaluating without protection from a concurrent "
                  f"evaluation of the same checkpoint", file=sys.stderr)
        yield
    finally:
        os.close(fd)
