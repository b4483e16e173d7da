"""A real single-node Slurm on loopback for tests: install (Debian packages), configure under a temp dir, start, stop.

`LocalSlurm` is a context manager; `SlurmUnavailable` carries the reason when Slurm cannot be installed here.
Daemons run in the foreground as our children so that stopping them never touches anyone else's processes.
"""
from __future__ import annotations

import fcntl
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
BINARIES = ["slurmctld", "slurmd", "sbatch", "scontrol", "sinfo", "munged", "munge"]
MUNGE_SOCKET_DIR = Path("/run/munge")
LOCK = Path(tempfile.gettempdir()) / "one4d-slurm.lock"

# Notes on these machines: no cgroups, no accounting; cred_expire=10 lets a requeued job start again within seconds;
# KillWait=10: a cancelled or requeued job's leftover processes are killed after 10 s, not 30 (the trainer's
# checkpoint and the job script's last steps take a few seconds here; a requeue after its tasks were killed waited
# the whole 30 s); MinJobAge=4 keeps `sbatch --wait` polling every 2 s (it backs off up to 32 s when finished jobs
# are kept longer);
# jobcomp/filetxt writes each ended job's record, which stays where a poll that came too late finds the job forgotten
SLURM_CONF = """\
ClusterName=one4dtest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc={root}/log/jobcomp.txt
MpiDefault=none
MailProg=/bin/true
JobRequeue=1
ReturnToService=2
SlurmdParameters=config_overrides
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=2
KillWait=10
MinJobAge=4
{nodes}PartitionName=debug Nodes={node_names} Default=YES MaxTime=INFINITE State=UP
"""


class SlurmUnavailable(RuntimeError):
    """Slurm cannot be installed on this machine (tests skip); the message says why."""


class SlurmStartError(RuntimeError):
    """Slurm is installed but a daemon did not come up (tests fail): the message holds its log."""


def _run(cmd, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


def ensure_installed() -> None:
    """Install the Debian packages unless every binary is already there (then this costs nothing)."""
    if all(shutil.which(b) for b in BINARIES):
        return
    if shutil.which("apt-get") is None:
        raise SlurmUnavailable("Slurm is not installed and there is no apt-get to install it")
    if os.geteuid() != 0:
        raise SlurmUnavailable("Slurm is not installed and installing it needs root")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    # the packages' scripts would start the daemons with a config that does not exist yet (and fail without
    # systemd): forbid service starts during the install, as container images do; we start our own
    policy = Path("/usr/sbin/policy-rc.d")
    added_policy = not policy.exists()
    if added_policy:
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
    try:
        for cmd in (["apt-get", "update", "-qq"],
                    ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES]):
            r = _run(cmd, env=env)
            if r.returncode != 0:
                raise SlurmUnavailable(f"`{' '.join(cmd)}` failed ({r.returncode}): {(r.stdout + r.stderr)[-2000:]}")
    finally:
        if added_policy:
            policy.unlink()
    missing = [b for b in BINARIES if not shutil.which(b)]
    if missing:
        raise SlurmUnavailable(f"installed {PACKAGES} but still missing {missing}")


def munge_works() -> bool:
    enc = _run(["munge", "-n"])
    return enc.returncode == 0 and _run(["unmunge"], input=enc.stdout).returncode == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(predicate, timeout_s: float, what: str, log: Path | None = None):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    tail = log.read_text()[-3000:] if log and log.exists() else ""
    raise SlurmStartError(f"timed out after {timeout_s:.0f} s waiting for {what}\n{tail}")


# one line per node; every node is this machine (loopback), each with its own slurmd on its own port
NODE_LINE = "NodeName={name} NodeAddr=127.0.0.1 NodeHostname={name} Port={port} CPUs={cpus} State=UNKNOWN\n"


class LocalSlurm:
    """Start a private Slurm cluster in partition `debug`; `env` points clients at it. One node, `localhost`, by
    default; `nodes=N` runs N slurmds on this machine, named HOST, HOST-2 ... HOST-N, so that a job spans N nodes."""

    def __init__(self, cpus: int = 8, keep_dir: bool = False, nodes: int = 1):
        self.cpus = cpus  # config_overrides lets the node claim more CPUs than the machine has
        # Slurm reads a node named `localhost` as this machine's host name, which then clashes with the others: with
        # several nodes the first is this machine's name (so the first host of a job resolves) and the others sort
        # after it, as Slurm orders a job's node list by name
        host = socket.gethostname().split(".")[0]
        self.names = ["localhost"] if nodes == 1 else [host] + [f"{host}-{i}" for i in range(2, nodes + 1)]
        if nodes > 1:
            try:
                socket.gethostbyname(host)
            except OSError as exc:
                raise SlurmUnavailable(f"this machine's name {host!r} does not resolve ({exc}): no node to name") from exc
        self.keep_dir = keep_dir
        self.root: Path | None = None
        self.env: dict[str, str] = {}
        self._procs: list[subprocess.Popen] = []
        self._munged: subprocess.Popen | None = None
        self._lock = None

    # -- lifecycle --
    def __enter__(self) -> "LocalSlurm":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        ensure_installed()
        # one cluster at a time on this machine (the suite's two workers may each start one): they would share one
        # munged, which the one that started it stops, and their job ids, which name the rendezvous port and the
        # job's config record in the submission folder
        self._lock = open(LOCK, "a")
        fcntl.flock(self._lock, fcntl.LOCK_EX)
        self.root = Path(tempfile.mkdtemp(prefix="one4d-slurm-"))
        for sub in ("state", "spool", "log"):
            (self.root / sub).mkdir()
        for name in self.names:
            (self.root / "spool" / name).mkdir()
        self._start_munge(self.root / "log" / "munged.log")
        conf = self.root / "slurm.conf"
        ports = [_free_port()]
        for _ in self.names:  # slurmctld's, then one per slurmd
            ports.append(_wait(lambda: (p := _free_port()) not in ports and p, 5, "another free port"))
        nodes = "".join(NODE_LINE.format(name=n, port=p, cpus=self.cpus) for n, p in zip(self.names, ports[1:]))
        conf.write_text(SLURM_CONF.format(host=socket.gethostname().split(".")[0], ctld_port=ports[0],
                                          slurmd_port=ports[1], root=self.root, nodes=nodes,
                                          node_names=",".join(self.names)))
        self.env = dict(os.environ, SLURM_CONF=str(conf))
        log = self.root / "log"
        # -D: stay in the foreground as our child; -i: ignore state from an earlier run in the same dir
        self._spawn(["slurmctld", "-D", "-i", "-f", str(conf)], log / "slurmctld.stdout")
        _wait(lambda: _run(["scontrol", "ping"], env=self.env).stdout.count("UP") > 0, 30,
              "slurmctld to answer", log / "slurmctld.log")
        for name in self.names:
            self._spawn(["slurmd", "-D", "-N", name, "-f", str(conf)], log / f"slurmd-{name}.stdout")
        _wait(lambda: self.node_state() == "\n".join(["idle"] * len(self.names)), 30,
              "the node(s) to become idle", log / f"slurmd-{self.names[-1]}.log")

    def stop(self) -> None:
        if self.env and self._procs:
            _run(["scancel", f"--user={os.getuid()}", "--full"], env=self.env, timeout=30)
        for p in reversed(self._procs):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        self._procs.clear()
        if self._munged is not None:
            self._stop_munge()
        if self.root is not None and not self.keep_dir:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None
        if self._lock is not None:
            self._lock.close()  # releases the lock
            self._lock = None

    def _spawn(self, cmd, out: Path) -> None:
        with open(out, "w") as f:
            self._procs.append(subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=self.env,
                                                start_new_session=True))

    def _start_munge(self, log: Path) -> None:
        """Reuse a working munged (someone else's); else start our own as the munge user."""
        if munge_works():
            return
        if os.geteuid() != 0:
            raise SlurmUnavailable("munged is not running and starting it needs root")
        MUNGE_SOCKET_DIR.mkdir(mode=0o755, exist_ok=True)
        shutil.chown(MUNGE_SOCKET_DIR, "munge", "munge")
        key = Path("/etc/munge/munge.key")
        if not key.exists():
            r = _run(["mungekey", "--create"], user="munge", group="munge", extra_groups=[])
            if r.returncode != 0:
                raise SlurmUnavailable(f"cannot create {key}: {r.stderr}")
        # --force: a socket left by a killed munged would otherwise stop it from starting
        with open(log, "w") as f:
            self._munged = subprocess.Popen(["munged", "--foreground", "--force"], user="munge", group="munge",
                                            extra_groups=[], stdout=f, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        _wait(munge_works, 15, "munged to answer", log)

    def _stop_munge(self) -> None:
        self._munged.terminate()
        try:
            self._munged.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self._munged.kill()
            self._munged.wait()
        self._munged = None

    # -- queries --
    def node_state(self) -> str:
        return _run(["sinfo", "-h", "-N", "-o", "%T"], env=self.env).stdout.strip()

    def ended(self, job_id: str) -> dict[str, str]:
        """The last record that jobcomp/filetxt wrote of the job's end (JobState, ExitCode, ...), or {}."""
        path = self.root / "log" / "jobcomp.txt" if self.root else None
        lines = path.read_text().splitlines() if path and path.exists() else []
        last = next((line for line in reversed(lines) if line.startswith(f"JobId={job_id} ")), "")
        return dict(re.findall(r"(\S+?)=(\S*)", last))

    def trace(self, job_id: str, ids: int = 1) -> str:
        """What the daemons logged of jobs job_id .. job_id + ids - 1 (an array's tasks take the ids after its own):
        their end records and the slurmctld / slurmd log lines that name them, for a failing test's message."""
        if self.root is None:
            return ""
        wanted = {str(int(job_id) + i) for i in range(ids)}
        # slurmctld names an array task JobId=ARRAY_TASK(ID), slurmd `job ID`, slurmstepd its lines [ID.batch]
        pattern = re.compile(r"(?:JobId=|_\d+\(|[Jj]ob |StepId=)(\d+)|\[(\d+)\.(?:batch|extern|\d+)\]")
        out = []
        for path in sorted((self.root / "log").glob("*")):
            lines = [line for line in path.read_text(errors="replace").splitlines()
                     if wanted & {i for ids in pattern.findall(line) for i in ids}]
            out += [f"== {path.name}"] + lines[-40:] if lines else []
        return "\n".join(out)

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (accounting is off, so this is the record of a job); {} once it is gone.
        The first occurrence of a key wins: later ones come from the job's command line and working directory."""
        r = _run(["scontrol", "-o", "show", "job", job_id], env=self.env)
        if r.returncode != 0 or not r.stdout.strip():
            return {}
        fields: dict[str, str] = {}
        for key, value in re.findall(r"(\S+?)=(\S*)", r.stdout.splitlines()[0]):
            fields.setdefault(key, value)
        return fields
