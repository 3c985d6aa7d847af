"""A real one-node Slurm cluster on 127.0.0.1 for tests/test_slurm.py (Debian's slurm-wlm and munge, as
/work/shared/PLATFORM.md describes): a private munged (its own socket), slurmctld and slurmd with a config
of their own (free ports, state and logs in one folder), stopped by pid at the end. `missing()` says why it
cannot run here (not installed, not root); the test then skips with that reason."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

PROGRAMS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "scancel", "sinfo")


def missing() -> str | None:
    absent = [p for p in PROGRAMS if shutil.which(p) is None and not Path("/usr/sbin", p).exists()]
    if absent:
        return f"Slurm is not installed ({', '.join(absent)} not found): apt-get install -y slurm-wlm munge"
    if os.geteuid() != 0:
        return "a private one-node Slurm cluster needs root (SlurmUser=root, munged as the munge user)"
    if not Path("/etc/munge/munge.key").exists():
        return "/etc/munge/munge.key is missing (munge's package makes it)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _program(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


class OneNodeSlurm:
    def __init__(self) -> None:
        # Under /tmp, not pytest's tmp_path: munged runs as the munge user and must reach its folder.
        self.root = Path(tempfile.mkdtemp(prefix="alphaspin-slurm-"))
        self.root.chmod(0o755)
        self.conf = self.root / "slurm.conf"
        self.processes: list[subprocess.Popen] = []
        self.host = socket.gethostname().split(".")[0]

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def start(self, timeout: float = 60.0) -> OneNodeSlurm:
        munge = self.root / "munge"
        munge.mkdir()
        munge.chmod(0o755)  # munged: "execute permissions for all required" on its socket folder
        shutil.chown(munge, "munge", "munge")
        socket_path = munge / "munge.socket"
        daemon = (
            f"{_program('munged')} -F --socket={socket_path} --pid-file={munge}/munged.pid "
            f"--log-file={munge}/munged.log --seed-file={munge}/munged.seed"
        )
        self._spawn(["su", "-s", "/bin/sh", "munge", "-c", daemon])
        self._wait(lambda: socket_path.exists(), timeout, "munged")
        for name in ("state", "spool"):
            (self.root / name).mkdir()
        self.conf.write_text(
            "\n".join(
                [
                    "ClusterName=alphaspintest",
                    f"SlurmctldHost={self.host}(127.0.0.1)",
                    f"SlurmctldPort={_free_port()}",
                    f"SlurmdPort={_free_port()}",
                    "SlurmUser=root",
                    "AuthType=auth/munge",
                    "CredType=cred/munge",
                    f"AuthInfo=socket={socket_path}",
                    "ProctrackType=proctrack/linuxproc",
                    "TaskPlugin=task/none",
                    "JobAcctGatherType=jobacct_gather/none",
                    "SelectType=select/cons_tres",
                    "SelectTypeParameters=CR_Core_Memory",
                    "ReturnToService=2",
                    "MpiDefault=none",
                    "KillWait=30",
                    f"StateSaveLocation={self.root}/state",
                    f"SlurmdSpoolDir={self.root}/spool",
                    f"SlurmctldPidFile={self.root}/slurmctld.pid",
                    f"SlurmdPidFile={self.root}/slurmd.pid",
                    f"SlurmctldLogFile={self.root}/slurmctld.log",
                    f"SlurmdLogFile={self.root}/slurmd.log",
                    f"NodeName={self.host} NodeAddr=127.0.0.1 CPUs={os.cpu_count() or 1} RealMemory=4000 State=UNKNOWN",
                    f"PartitionName=test Nodes={self.host} Default=YES MaxTime=INFINITE State=UP",
                    "",
                ]
            )
        )
        self._spawn([_program("slurmctld"), "-D", "-i", "-f", str(self.conf)])
        self._spawn([_program("slurmd"), "-D", "-f", str(self.conf)])
        self._wait(lambda: "idle" in self.run("sinfo", "-h", "-o", "%t", check=False), timeout, "slurmd (sinfo idle)")
        return self

    def run(self, *args: str, check: bool = True) -> str:
        done = subprocess.run(list(args), env=self.env, capture_output=True, text=True, timeout=60)
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(args)}: exit {done.returncode}: {done.stderr.strip()}")
        return done.stdout

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job``'s fields (JobState, Restarts, ExitCode, ...)."""
        text = self.run("scontrol", "show", "job", job_id, "-o")
        return dict(item.split("=", 1) for item in text.split() if "=" in item)

    def logs(self) -> str:
        return "\n".join(
            f"== {p.name}\n{p.read_text(errors='replace')[-3000:]}"
            for p in (self.root / "slurmctld.log", self.root / "slurmd.log")
            if p.exists()
        )

    def _spawn(self, args: list[str]) -> None:
        self.processes.append(subprocess.Popen(args, env=self.env, start_new_session=True,
                                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))  # fmt: skip

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not come up within {timeout:.0f} s\n{self.logs()}")
            time.sleep(0.5)

    def stop(self) -> None:
        # munged runs in a session of its own under su: stop it by the pid it wrote.
        pid_file = self.root / "munge" / "munged.pid"
        if pid_file.exists():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid_file.read_text().strip()), signal.SIGTERM)
        for process in reversed(self.processes):  # slurmd, slurmctld, su: each its own group, by pid
            try:
                os.killpg(process.pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=5)
        shutil.rmtree(self.root, ignore_errors=True)
