"""A private SLURM cluster on this one host: munged, slurmctld and one slurmd per node name.

Debian's `slurmd -N NAME` runs the daemon of one node of `slurm.conf`; two node names with their own
`Port` and `NodeHostname=localhost` give a real two-node cluster on one machine (`srun -N2` runs a
task on each, `SLURM_NODEID` 0 and 1), which is what the tests submit multi-node jobs to.
Everything lives in one directory: its own munge key and socket, `slurm.conf` (free ports, state,
spool, logs), so it never touches a system cluster's files or daemons. The daemons run in the
foreground as children of this process; `stop()` cancels the cluster's jobs and ends exactly those
daemons. Clients find the cluster through `SLURM_CONF` (`env`).

Choices for a test cluster: root runs the daemons and the jobs (`SlurmUser=root`); no cgroups
(`proctrack/linuxproc`, `task/none`) and no accounting database (job states come from `scontrol`);
`KillWait` gives a SIGTERMed job time to checkpoint; `AuthInfo=cred_expire` (the minimum wait before
a requeued job may start again) is 20 s instead of 120 s.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "scontrol", "squeue", "scancel", "sinfo")
INSTALL = "sh tests/slurm/install.sh"  # apt-get install slurm-wlm munge (the README's test command runs it)


def missing_programs() -> list[str]:
    return [p for p in (*DAEMONS, *CLIENTS) if shutil.which(p) is None and not Path("/usr/sbin", p).exists()]


def _program(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in sockets]
    finally:
        for s in sockets:
            s.close()


class LocalSlurm:
    """`LocalSlurm(nodes=("n1", "n2")).start()` ... `.stop()`; `.env` for the client commands."""

    def __init__(self, nodes: tuple[str, ...] = ("n1", "n2"), *, cpus: int = 2, kill_wait: int = 120) -> None:
        self.nodes, self.cpus, self.kill_wait = nodes, cpus, kill_wait
        # Not under pytest's 0700 tmp tree: the munge user must reach its socket and key.
        self.root = Path(tempfile.mkdtemp(prefix="megatron-speed-slurm-"))
        self.root.chmod(0o755)
        self.conf = self.root / "slurm.conf"
        self._procs: list[subprocess.Popen[bytes]] = []

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def start(self, timeout: float = 60) -> LocalSlurm:
        try:
            self._start_munge()
            self._write_conf()
            self._spawn([_program("slurmctld"), "-D", "-f", str(self.conf)], "slurmctld")
            for node in self.nodes:
                (self.root / "spool" / node).mkdir(parents=True)
                self._spawn([_program("slurmd"), "-D", "-f", str(self.conf), "-N", node], f"slurmd-{node}")
            self._wait_idle(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _start_munge(self) -> None:
        munge = pwd.getpwnam("munge")
        folder = self.root / "munge"
        folder.mkdir()
        key = folder / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        for path in (folder, key):
            os.chown(path, munge.pw_uid, munge.pw_gid)
        self._spawn([_program("munged"), "-F", f"--key-file={key}", f"--socket={folder / 'munge.sock'}",
                     f"--pid-file={folder / 'munged.pid'}", f"--seed-file={folder / 'seed'}",
                     f"--log-file={folder / 'munged.log'}"], "munged", user=munge.pw_uid, group=munge.pw_gid)
        deadline = time.monotonic() + 20
        while not (folder / "munge.sock").exists():
            if time.monotonic() > deadline:
                raise RuntimeError(f"munged did not create its socket: {self._tail('munged')}")
            time.sleep(0.1)

    def _write_conf(self) -> None:
        ctld, slurmd_default, *node_ports = _free_ports(2 + len(self.nodes))
        r = self.root
        nodes = "\n".join(f"NodeName={n} NodeHostname=localhost NodeAddr=127.0.0.1 Port={p} CPUs={self.cpus} "
                          f"RealMemory=4000 State=UNKNOWN" for n, p in zip(self.nodes, node_ports))
        self.conf.write_text(f"""\
ClusterName=msp
SlurmctldHost=localhost
SlurmctldPort={ctld}
SlurmdPort={slurmd_default}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={r / 'munge' / 'munge.sock'},cred_expire=20
StateSaveLocation={r / 'state'}
SlurmdSpoolDir={r / 'spool'}/%n
SlurmctldPidFile={r / 'slurmctld.pid'}
SlurmdPidFile={r / 'slurmd'}-%n.pid
SlurmctldLogFile={r / 'log' / 'slurmctld.log'}
SlurmdLogFile={r / 'log'}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
JobRequeue=1
KillWait={self.kill_wait}
MinJobAge=3600
InactiveLimit=0
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
{nodes}
PartitionName=debug Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE State=UP
""")
        (r / "state").mkdir()
        (r / "log").mkdir()

    def _spawn(self, argv: list[str], name: str, **kwargs: object) -> None:
        with open(self.root / f"{name}.out", "wb") as log:  # the daemon keeps its own copy of the descriptor
            self._procs.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                                start_new_session=True, **kwargs))  # type: ignore[arg-type]

    def _wait_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        states = ""
        while time.monotonic() < deadline:
            for proc in self._procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}: {self.logs()}")
            done = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], env=self.env, capture_output=True, text=True)
            states = done.stdout.strip()
            if done.returncode == 0 and len(states.splitlines()) == len(self.nodes) and all(
                    line.split()[1] == "idle" for line in states.splitlines()):
                return
            time.sleep(0.5)
        raise RuntimeError(f"SLURM nodes not idle after {timeout:.0f} s ({states!r}): {self.logs()}")

    def _tail(self, name: str, lines: int = 15) -> str:
        path = self.root / f"{name}.out"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def logs(self) -> str:
        """The last lines of every daemon's log, for a failure message."""
        folder = self.root / "log"
        files = sorted(folder.glob("*.log")) if folder.exists() else []
        return "\n".join(f"--- {f.name}\n" + "\n".join(f.read_text(errors="replace").splitlines()[-15:])
                         for f in files)

    def stop(self) -> None:
        """Cancel this cluster's jobs, then end the daemons this object started (and nothing else)."""
        if any(p.poll() is None for p in self._procs if p.args[0].endswith("slurmctld")):
            subprocess.run(["scancel", "--full", "--partition", "debug"], env=self.env, capture_output=True)
            deadline = time.monotonic() + self.kill_wait + 30
            while time.monotonic() < deadline:
                queue = subprocess.run(["squeue", "-h"], env=self.env, capture_output=True, text=True)
                if queue.returncode != 0 or not queue.stdout.strip():
                    break
                time.sleep(1)
        for proc in reversed(self._procs):  # slurmds, slurmctld, then munged
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self._procs.clear()
        shutil.rmtree(self.root, ignore_errors=True)
