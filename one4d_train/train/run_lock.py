"""One training job per run directory.

Two jobs training into one run_dir (a double submission, a resubmission while the first job still runs) would
delete each other's half-written checkpoints (rank 0 clears `.tmp-*` before each save), prune each other's
complete ones and interleave their steps in one MLflow run. So global rank 0 holds an exclusive POSIX lock
(`fcntl.lockf`, which NFS carries to the server) on RUN_DIR/train.lock from before the run directory is touched
until the process ends. The operating system releases it when the process dies, however it dies: a killed or
requeued job leaves no stale lock on a local or NFSv4 file system (NFSv4 after the dead client's lease).

The file records its holder (Slurm job id and restart count, host, pid, start time) for the refusal message. A
holder with this job's own Slurm job id and a lower restart count is a dead instance of this job (a requeue keeps
the id and counts up SLURM_RESTART_COUNT) whose lock a crashed node left on the server: the job goes on, with a
warning. One with the same count is alive in this very allocation (a second `srun one4d train` in an salloc
shell) and is refused like any other job. A file system without POSIX locks (Lustre mounted without `flock`) gets
a warning too, not a refusal. `hold` is the same lock on any file (`one4d shard` locks its output folder with it).
"""
from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import time

from one4d_train.configtools import ConfigError

log = logging.getLogger(__name__)

LOCK_NAME = "train.lock"


class RunDirBusy(ConfigError):
    """Another live training job holds the run directory."""


class RunLock:
    """The held lock: an open descriptor of the lock file. Closing any descriptor of the file in this process
    releases a POSIX lock, so nothing else here may open it; the lock lasts until `release` or the process ends."""

    def __init__(self, fd: int, path: str):
        self.fd, self.path = fd, path

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def holder_of(path: str) -> dict:
    """The holder recorded in a lock file ({} when unreadable or empty). Never call it on a lock this process
    holds: closing the descriptor it opens would release that lock."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _restart_count(value) -> int:
    """A SLURM_RESTART_COUNT, or the one a holder recorded: 0 before the first requeue (Slurm leaves it unset)."""
    try:
        return int(value or 0)
    except (TypeError, ValueError):
        return 0


def _describe(holder: dict) -> str:
    if not holder:
        return "a process that recorded no details"
    job = holder.get("slurm_job_id")
    who = f"Slurm job {job}, " if job else ""
    return f"{who}pid {holder.get('pid')} on {holder.get('host')}, since {holder.get('started')}"


class Held(Exception):
    """Another live process holds a lock file; `holder` is what it recorded there, `who` that in words."""

    def __init__(self, path: str, holder: dict):
        self.path, self.holder, self.who = path, holder, _describe(holder)
        super().__init__(f"{path} is held by {self.who}")


def process_alive(pid: int) -> bool:
    """Whether process `pid` of this host exists (another user's counts): the writer of a temporary file named by
    its pid may still be writing it."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


def _same_file(fd: int, path: str) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (mine.st_dev, mine.st_ino) == (st.st_dev, st.st_ino)


def hold(path: str, environ: dict[str, str] | None = None, what: str = "a second job",
         shared: bool = False) -> RunLock | None:
    """An exclusive lock on the file `path` (created; its folder must exist) recording this process as its holder
    (`shared`: a lock that other shared holders may hold too, but no exclusive one; it records no holder, and
    clears an earlier one's record). None where it cannot be held (no POSIX locks on this file system; a dead
    instance of this very job still holding it), with a warning naming `what` it no longer keeps out. Raises Held
    when another process holds it (exclusively, for a shared lock), OSError when the file cannot be made."""
    env = os.environ if environ is None else environ
    job, restarts = env.get("SLURM_JOB_ID"), _restart_count(env.get("SLURM_RESTART_COUNT"))
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.lockf(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EACCES, errno.EAGAIN):
                log.warning("cannot lock %s (%s): this file system has no POSIX locks, so nothing stops %s from "
                            "using %s at the same time", path, exc.strerror, what, os.path.dirname(path) or ".")
                return None
            holder = holder_of(path)
            earlier = _restart_count(holder.get("slurm_restart_count")) < restarts
            if job and holder.get("slurm_job_id") == job and earlier:
                log.warning("%s is held by an earlier instance of this job (%s), dead since Slurm requeued it; its "
                            "node may have failed with the lock on the file server: going on without the lock", path,
                            _describe(holder))
                return None
            raise Held(path, holder) from None
        if _same_file(fd, path):
            break
        os.close(fd)  # locked a file its holder removed on leaving: the lock is the file now at `path`
    holder = {"slurm_job_id": job, "slurm_restart_count": restarts, "host": socket.gethostname(), "pid": os.getpid(),
              "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    try:
        os.ftruncate(fd, 0)
        if not shared:
            os.pwrite(fd, json.dumps(holder).encode(), 0)
            os.fsync(fd)  # on NFS another node may otherwise read an empty record, which names no holder to recover from
    except OSError:
        os.close(fd)  # the lock goes with it: a caller that reports the error and goes on holds nothing
        raise
    return RunLock(fd, path)


def acquire(run_dir: str, environ: dict[str, str] | None = None) -> RunLock | None:
    """Lock `run_dir` for this process (creating the folder). Returns the lock, or None where it cannot be held
    (no POSIX locks on this file system; a dead instance of this very job still holding it), with a warning.
    Raises RunDirBusy, naming the holder and the lock file, when another job holds it, and ConfigError when the
    folder or the file cannot be made."""
    path = os.path.join(run_dir, LOCK_NAME)
    try:
        os.makedirs(run_dir, exist_ok=True)
        return hold(path, environ, what="a second training job")
    except OSError as exc:
        raise ConfigError(f"key 'run_dir': cannot create {exc.filename or path}: {exc.strerror}") from None
    except Held as exc:
        raise RunDirBusy(f"run_dir {run_dir}: another training job is using it ({exc.who}); two jobs "
                         f"in one run directory would delete each other's checkpoints. Wait for it to end, or use "
                         f"another run_dir. If that job is no longer running (its node failed while it held the "
                         f"lock on a network file system), delete {path}") from None
