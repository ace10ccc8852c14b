"""A real, local SLURM cluster for the tests: munged, slurmctld and two slurmd daemons (two fake
nodes, `dcn1` and `dcn2`, both on 127.0.0.1) under one temporary directory.

Debian's `slurmctld slurmd slurm-client munge` packages are installed when missing (root and
apt-get needed). On a fresh machine tests/conftest.py starts that install in the background as
soon as a test that needs the cluster is selected (`install_in_background_for`), so the download
overlaps the tests that run before it; `ensure_installed()` waits for it.

Nothing outside the temporary directory is touched except /etc/hosts, which gets one line naming
the fake nodes (added once, removed at stop). `stop()` ends exactly the processes `start()`
started, by PID.

By hand (to try the sbatch scripts):
    python tests/slurm_cluster.py start /tmp/slurm   # prints `export SLURM_CONF=...`
    python tests/slurm_cluster.py stop /tmp/slurm
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
BINARIES = ("slurmctld", "slurmd", "sbatch", "munged")
NODES = ("dcn1", "dcn2")
HOSTS_LINE = "127.0.0.1 " + " ".join(NODES) + "  # distcls test cluster"
# More CPUs than the machine may have (SlurmdParameters=config_overrides): the tests' jobs (2 CPUs
# each at most) can then all run at once, whatever the machine's core count.
CPUS_PER_NODE = 4


class ClusterUnavailable(RuntimeError):
    """The cluster cannot run here (not root, no apt, daemons that do not start)."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def missing_binaries() -> list:
    return [b for b in BINARIES if not shutil.which(b)]


# An install left running by an interrupted test session holds dpkg's lock: the next one waits for it.
# A download that fails (a mirror's hiccup) is retried by apt itself, and each command up to 3 times.
_APT_OPTIONS = ["-o", "DPkg::Lock::Timeout=600", "-o", "Acquire::Retries=3"]
INSTALL_COMMANDS = (["apt-get", *_APT_OPTIONS, "update", "-qq"],
                    ["apt-get", *_APT_OPTIONS, "install", "-y", "-qq", "--no-install-recommends", *PACKAGES])
ATTEMPTS, RETRY_AFTER_S = 3, 5.0


def _install(commands) -> str:
    """Run the install commands in order, each up to ATTEMPTS times: '' when they all succeed, else
    what failed and its stderr."""
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in commands:
        for attempt in range(1, ATTEMPTS + 1):
            try:
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
            except (OSError, subprocess.TimeoutExpired) as exc:
                error = f"{' '.join(cmd)} failed: {exc}"
            else:
                error = proc.returncode and f"{' '.join(cmd)} failed (exit {proc.returncode}): {proc.stderr[-2000:]}"
            if not error:
                break
            if attempt < ATTEMPTS:
                time.sleep(RETRY_AFTER_S * attempt)
        else:
            return f"{error} ({ATTEMPTS} attempts)"
    return ""


class _BackgroundInstall:
    """`_install(commands)` in a child Python process of its own session: no thread in the tests'
    process, and a Ctrl-C to the tests does not interrupt dpkg halfway."""

    _CHILD = ("import json, sys; sys.path.insert(0, sys.argv[1]); import slurm_cluster; "
              "sys.exit(slurm_cluster._install(json.loads(sys.argv[2])) or None)")

    def __init__(self, commands):
        self.stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", self._CHILD, str(Path(__file__).parent), json.dumps(commands)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self.stderr,
            start_new_session=True,
        )

    def wait(self) -> str:
        """'' once the commands have all succeeded, else what failed and its stderr."""
        rc = self.proc.wait()
        self.stderr.seek(0)
        return "" if rc == 0 else (self.stderr.read().decode(errors="replace").strip()[-3000:] or f"exit {rc}")


_background: _BackgroundInstall | None = None


def _can_install() -> bool:
    return os.geteuid() == 0 and bool(shutil.which("apt-get"))


def start_background_install(missing=missing_binaries, commands=INSTALL_COMMANDS) -> bool:
    """Start installing SLURM in the background when it is missing and root may install it (at most
    once per process); `ensure_installed` waits for it. True when an install was started."""
    global _background
    if _background is not None or not missing() or not _can_install():
        return False
    _background = _BackgroundInstall(commands)
    return True


def install_in_background_for(session) -> None:
    """pytest_collection_finish: start the install when one of the tests that will run (after -k/-m)
    needs SLURM (marked `slurm`)."""
    if not session.config.option.collectonly and any(item.get_closest_marker("slurm") for item in session.items):
        start_background_install()


def still_installing() -> str:
    """pytest_unconfigure: a line about a background install the session did not wait for, else ''."""
    if _background is None or _background.proc.poll() is not None:
        return ""
    return (f"SLURM's packages are still being installed in the background (apt-get, pid {_background.proc.pid}); "
            "it finishes on its own, and the next test session waits for dpkg's lock")


def ensure_installed(missing=missing_binaries, commands=INSTALL_COMMANDS) -> None:
    """SLURM's binaries are there: installed now, or by the background install (waited for), or
    ClusterUnavailable saying why not (apt-get's stderr when it failed)."""
    if _background is not None:
        error = _background.wait()
        error = error and f"installing SLURM in the background failed: {error}"
    else:
        absent = missing()
        if not absent:
            return
        if not _can_install():
            raise ClusterUnavailable(
                f"SLURM is not installed ({', '.join(absent)} not on PATH) and installing it needs "
                f"root and apt-get (apt-get install {' '.join(PACKAGES)})"
            )
        error = _install(commands)
    if error:
        raise ClusterUnavailable(error)
    if missing():
        raise ClusterUnavailable(f"{', '.join(missing())} not on PATH after apt-get install {' '.join(PACKAGES)}")


# Timing for tests (slurm.conf(5)): batch_sched_delay=0 schedules a submitted batch job at the next
# pass (default: up to 3 s later); sched_interval=1 looks at every pending job each second (a
# requeued job becomes eligible at its BeginTime, which no event announces); cred_expire=5 is
# SLURM's minimum, and a requeued job waits cred_expire + 1 s before it may start again (slurmctld
# sets its BeginTime so; 11 s with cred_expire=10). MinJobAge=600: a finished job's record stays
# while the tests wait for the other jobs that ran beside it.
SLURM_CONF = """\
ClusterName=distcls
SlurmctldHost={host}
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={root}/munge/munge.socket,cred_expire=5
CredType=cred/munge
MailProg=/bin/true
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerParameters=sched_interval=1,batch_sched_delay=0
SlurmdParameters=config_overrides
ReturnToService=2
MinJobAge=600
KillWait=10
InactiveLimit=0
SlurmdTimeout=60
MessageTimeout=20
{nodes}
PartitionName=debug Nodes={node_list} Default=YES MaxTime=60 State=UP OverSubscribe=NO
"""


class LocalSlurm:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.conf = self.root / "slurm.conf"
        self.procs: list[subprocess.Popen] = []
        self.added_hosts_line = False

    # -- environment for sbatch/squeue/scontrol --------------------------------------------
    def env(self, base: dict | None = None) -> dict:
        env = dict(os.environ if base is None else base)
        env["SLURM_CONF"] = str(self.conf)
        return env

    def run(self, *cmd: str, check: bool = True, timeout: int = 60) -> subprocess.CompletedProcess:
        proc = subprocess.run(list(cmd), env=self.env(), capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr}")
        return proc

    # -- start / stop ------------------------------------------------------------------------
    def start(self, timeout: float = 60.0) -> "LocalSlurm":
        if os.geteuid() != 0:
            raise ClusterUnavailable("the local SLURM cluster runs its daemons as root; run the tests as root")
        ensure_installed()
        for sub in ("munge", "state", "log", *(f"spool/{n}" for n in NODES)):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.root / "munge", 0o700)
        self._add_hosts_line()
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o600)
        host = socket.gethostname().split(".")[0]
        ports = [_free_port() for _ in range(1 + len(NODES))]
        nodes = "\n".join(
            f"NodeName={n} NodeAddr=127.0.0.1 NodeHostname={host} Port={port} CPUs={CPUS_PER_NODE} RealMemory=2000 "
            "State=UNKNOWN"
            for n, port in zip(NODES, ports[1:])
        )
        self.conf.write_text(SLURM_CONF.format(host=host, root=self.root, ctld_port=ports[0], slurmd_port=ports[1],
                                               nodes=nodes, node_list=",".join(NODES)))
        self._spawn(["munged", "--foreground", "--force", f"--socket={self.root}/munge/munge.socket",
                     f"--key-file={key}", f"--pid-file={self.root}/munge/munged.pid",
                     f"--log-file={self.root}/log/munged.log", f"--seed-file={self.root}/munge/munged.seed"])
        self._wait(lambda: (self.root / "munge" / "munge.socket").exists(), 15, "munged did not create its socket")
        self._spawn(["slurmctld", "-D", "-i", "-f", str(self.conf)])
        for n in NODES:
            self._spawn(["slurmd", "-D", "-N", n, "-f", str(self.conf)])
        self._wait(self._nodes_idle, timeout, "the nodes did not become idle")
        return self

    @property
    def pids(self) -> list:
        return [p.pid for p in self.procs]

    def stop(self) -> None:
        """End the daemons this object started (by PID: SIGTERM, SIGKILL after 15 s): slurmctld,
        then the slurmds, then munged, which the others use until they are gone (stopped together,
        slurmctld was seen to wait 3 s at shutdown for a hung RPC)."""
        stage = {"slurmctld": 0, "slurmd": 1, "munged": 2}
        for first in range(3):
            batch = [p for p in self.procs if stage[Path(p.args[0]).name] == first]
            for proc in batch:
                if proc.poll() is None:
                    proc.terminate()
            for proc in batch:
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.procs.clear()
        self._remove_hosts_line()

    def _spawn(self, cmd: list) -> None:
        with open(self.root / "log" / f"{Path(cmd[0]).name}.{len(self.procs)}.stdout", "wb") as log:
            self.procs.append(
                subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env(), start_new_session=True)
            )

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready():
                return
            for proc in self.procs:
                if proc.poll() is not None:
                    self.stop()
                    raise ClusterUnavailable(
                        f"{proc.args[0]} exited with {proc.returncode}; see {self.root}/log\n{self.logs()}"
                    )
            time.sleep(0.5)
        logs = self.logs()
        self.stop()
        raise ClusterUnavailable(f"{what} within {timeout:.0f} s; see {self.root}/log\n{logs}")

    def _nodes_idle(self) -> bool:
        proc = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], env=self.env(), capture_output=True, text=True)
        states = dict(line.split() for line in proc.stdout.splitlines() if line.strip())
        return proc.returncode == 0 and all(states.get(n, "").startswith("idle") for n in NODES)

    def logs(self, tail: int = 3000) -> str:
        out = []
        for f in sorted((self.root / "log").glob("*")):
            out.append(f"--- {f.name}\n{f.read_text(errors='replace')[-tail:]}")
        return "\n".join(out)

    def _add_hosts_line(self) -> None:
        hosts = Path("/etc/hosts")
        text = hosts.read_text()
        if all(self._resolves(n) for n in NODES):
            return
        hosts.write_text(text.rstrip("\n") + "\n" + HOSTS_LINE + "\n")
        self.added_hosts_line = True

    def _remove_hosts_line(self) -> None:
        if self.added_hosts_line:
            hosts = Path("/etc/hosts")
            hosts.write_text("".join(l for l in hosts.read_text().splitlines(keepends=True) if l.strip() != HOSTS_LINE))
            self.added_hosts_line = False

    @staticmethod
    def _resolves(name: str) -> bool:
        try:
            socket.gethostbyname(name)
            return True
        except OSError:
            return False

    # -- jobs ----------------------------------------------------------------------------------
    def job_state(self, job_id: str) -> dict:
        """`scontrol show job` as a dict (empty once the job has left the controller)."""
        proc = self.run("scontrol", "show", "job", "-o", job_id, check=False)
        if proc.returncode != 0:
            return {}
        fields = {}
        for tok in proc.stdout.split():
            if "=" in tok:
                k, v = tok.split("=", 1)
                fields[k] = v
        return fields

    def wait_state(self, job_id: str, states, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        info = {}
        while time.monotonic() < deadline:
            info = self.job_state(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} not in {states} after {timeout:.0f} s: {info}\n{self.logs()}")


def _main(action: str, root: Path) -> None:
    """By hand: `start` leaves the daemons running (their PIDs in ROOT/pids); `stop` ends them."""
    if action == "start":
        cluster = LocalSlurm(root).start()
        (root / "pids").write_text(" ".join(map(str, cluster.pids)) + ("\nhosts" if cluster.added_hosts_line else ""))
        print(f"export SLURM_CONF={cluster.conf}")
    elif action == "stop":
        pids, _, hosts = (root / "pids").read_text().partition("\n")
        for pid in map(int, pids.split()):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        cluster = LocalSlurm(root)
        cluster.added_hosts_line = hosts == "hosts"
        cluster._remove_hosts_line()
    else:
        sys.exit("usage: python tests/slurm_cluster.py start|stop DIR")


if __name__ == "__main__":
    _main(sys.argv[1], Path(sys.argv[2]))
