"""A real Prefect stack for the deployment tests (test_deploy.py, test_pools.py), as docs/gpu-pool.md
has a user build it: ``prefect server start`` on 127.0.0.1 with a private PREFECT_HOME, the
documented CLI commands run from the repository root, and process workers, each in its own session
so that it can be stopped (or SIGKILLed, with everything it started) by its process group or tree.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PREFECT_FILE = ROOT / "deploy" / "prefect.yaml"
# Exactly the command of docs/gpu-pool.md, run from the repository root.
DEPLOY_COMMAND = "prefect --no-prompt deploy --all --prefect-file deploy/prefect.yaml"
POOL_COMMANDS = [  # the walkthrough's pools and tag limit (docs/gpu-pool.md)
    "prefect work-pool create cpu --type process",
    "prefect work-pool create gpu --type process",
    "prefect work-pool set-concurrency-limit gpu 1",
    "prefect concurrency-limit create gpu 1",
]


def tiny_run_overrides(runs_root: Path | str, run_id: str) -> list[str]:
    """The ``overrides`` parameter of a tiny one-iteration run through a deployment: the tiny model,
    no lm-eval and no judged chat (they take minutes on CPU); each test adds its own."""
    from alphaspin.testing.tiny_model import tiny_model_path

    return [
        f"model.name_or_path={tiny_model_path()}",
        f"run.runs_root={runs_root}",
        f"run.run_id={run_id}",
        "method.iterations=0",
        "method.pairs_first_iteration=6",
        "method.pairs_per_iteration=6",
        "data.heldout_size=4",
        "generation.max_new_tokens=8",
        "training.save_steps=1",
        "training.per_device_train_batch_size=2",
        "training.max_length=96",
        "training.lora.r=4",
        "evaluation.benchmarks=[]",
        "evaluation.judge.enabled=false",
    ]


def prefect_exe() -> str:
    beside = Path(sys.executable).parent / "prefect"
    return str(beside) if beside.exists() else (shutil.which("prefect") or "prefect")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def tail(path: Path, lines: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (children first found, then theirs), read from /proc. A process
    worker starts each flow run in a session of its own, so the worker's process group misses them."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_tree(process: subprocess.Popen) -> list[int]:
    """SIGKILL a process, its process group and every process below it (a lost machine); the pids killed."""
    pids = [process.pid, *descendants(process.pid)]
    for pid in pids:  # freeze first, so nothing forks or reaps while the tree is being killed
        try:
            os.kill(pid, signal.SIGSTOP)
        except ProcessLookupError:
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait(timeout=30)
    return pids


def stop_group(process: subprocess.Popen, interrupts: int, grace: float) -> None:
    """SIGINT ``interrupts`` times (a process worker needs two), then SIGKILL to its process group
    (it was started in its own session, so the group holds only what it started) and to the flow-run
    processes it started in sessions of their own."""
    below = descendants(process.pid) if process.poll() is None else []
    if process.poll() is None:
        for _ in range(interrupts):
            try:
                os.kill(process.pid, signal.SIGINT)
            except ProcessLookupError:
                break
            try:
                process.wait(timeout=grace)
                break
            except subprocess.TimeoutExpired:
                continue
    try:
        os.killpg(process.pid, signal.SIGKILL)  # leftovers: flow-run subprocesses, uvicorn children
    except (ProcessLookupError, PermissionError):
        pass
    for pid in below:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if process.poll() is None:
        process.wait(timeout=30)


# -- Prefect server, CLI and worker ---------------------------------------------------------------
class Stack:
    """A Prefect server on 127.0.0.1 with a private PREFECT_HOME, its CLI, and workers."""

    def __init__(self, workdir: Path, database_url: str | None) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.api_url = f"http://127.0.0.1:{self.port}/api"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_") and k != "ALPHASPIN_HOME"}
        self.env.update(
            {
                "PREFECT_HOME": str(workdir / "prefect-home"),
                "PREFECT_API_URL": self.api_url,
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                "PREFECT_SERVER_UI_ENABLED": "false",  # the API is what is tested; the UI costs startup time
                "PREFECT_WORKER_QUERY_SECONDS": "1",
                "PREFECT_CLI_WRAP_LINES": "false",
                "DO_NOT_TRACK": "1",
                "HF_HUB_OFFLINE": "1",
                "HF_DATASETS_OFFLINE": "1",
                "TOKENIZERS_PARALLELISM": "false",
                "COLUMNS": "200",
            }
        )
        if database_url:
            self.env["PREFECT_API_DATABASE_CONNECTION_URL"] = database_url
        self.processes: list[tuple[subprocess.Popen, int, float]] = []

    def spawn(
        self, name: str, args: list[str], interrupts: int, grace: float, env: dict[str, str] | None = None
    ) -> subprocess.Popen:
        log = open(self.workdir / f"{name}.log", "wb")
        process = subprocess.Popen(
            args,
            cwd=ROOT,
            env={**self.env, **(env or {})},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        self.processes.append((process, interrupts, grace))
        return process

    def start_server(self, timeout: float = 180) -> None:
        server = self.spawn(
            "server",
            [prefect_exe(), "server", "start", "--host", "127.0.0.1", "--port", str(self.port)],
            interrupts=1,
            grace=20,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if server.poll() is not None:
                raise AssertionError(f"prefect server exited ({server.returncode}):\n{tail(self.log('server'))}")
            try:
                with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        raise AssertionError(f"prefect server not up after {timeout} s:\n{tail(self.log('server'))}")

    def start_worker(self, pool: str, name: str | None = None) -> subprocess.Popen:
        """``prefect worker start --pool POOL [--name NAME]``; its log is worker-<name or pool>.log."""
        args = [prefect_exe(), "worker", "start", "--pool", pool] + (["--name", name] if name else [])
        return self.spawn(f"worker-{name or pool}", args, interrupts=2, grace=10)

    def start_workers_as_documented(self, script_env: dict[str, str]) -> dict[str, subprocess.Popen]:
        """The GPU-owning workers of one pool that ``docker/gpu-workers.sh`` starts (docs/gpu-pool.md):
        its dry run's command lines (``CUDA_VISIBLE_DEVICES=<ids> prefect worker start --pool POOL
        --limit 1 --name NAME``), each started as written, as a process of its own (so that one can be
        killed alone); {worker name: process}; logs worker-<name>.log."""
        done = subprocess.run(
            ["bash", str(ROOT / "docker" / "gpu-workers.sh")],
            env={**self.env, **script_env, "DRY_RUN": "1"},
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert done.returncode == 0 and done.stdout.strip(), done.stderr
        workers = {}
        for line in done.stdout.splitlines():
            assignment, *args = line.split()
            variable, _, devices = assignment.partition("=")
            assert variable == "CUDA_VISIBLE_DEVICES" and args[:3] == ["prefect", "worker", "start"], line
            name = args[args.index("--name") + 1]
            args[0] = prefect_exe()
            workers[name] = self.spawn(
                f"worker-{name}", args, interrupts=2, grace=10, env={"CUDA_VISIBLE_DEVICES": devices}
            )
        return workers

    def log(self, name: str) -> Path:
        return self.workdir / f"{name}.log"

    def cli(self, command: str, timeout: float = 180) -> str:
        """Run a documented ``prefect ...`` command line from the repository root; its output."""
        args = command.split()
        args[0] = prefect_exe()
        done = subprocess.run(args, cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=timeout)
        output = done.stdout + done.stderr
        assert done.returncode == 0, f"`{command}` failed ({done.returncode}):\n{output[-4000:]}"
        return output

    def cli_args(self, args: list[str], timeout: float = 180) -> str:
        done = subprocess.run(
            [prefect_exe(), *args], cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=timeout
        )
        output = done.stdout + done.stderr
        assert done.returncode == 0, f"`prefect {' '.join(args)}` failed ({done.returncode}):\n{output[-4000:]}"
        return output

    def run_deployment(self, name: str, parameters: dict[str, Any]) -> str:
        """``prefect deployment run NAME -p key=<json> ...``; the new flow run's id."""
        args = ["deployment", "run", name]
        for key, value in parameters.items():
            args += ["-p", f"{key}={json.dumps(value)}"]
        output = self.cli_args(args)
        found = re.search(r"UUID:\s*([0-9a-f-]{36})", output)
        assert found, f"no flow run id in:\n{output}"
        return found.group(1)

    def stop(self) -> None:
        for process, interrupts, grace in reversed(self.processes):  # workers first, server last
            stop_group(process, interrupts, grace)


def api_client(api_url: str):
    from prefect.client.orchestration import SyncPrefectClient

    return SyncPrefectClient(api_url)


def wait_final(client, flow_run_id: str, stack: Stack, timeout: float, worker_log: str = "worker-cpu"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        flow_run = client.read_flow_run(flow_run_id)
        if flow_run.state is not None and flow_run.state.is_final():
            return flow_run
        time.sleep(2)
    raise AssertionError(
        f"flow run {flow_run_id} not finished after {timeout} s (state {flow_run.state.name if flow_run.state else None})"
        f"\n--- worker log:\n{tail(stack.log(worker_log), 80)}"
    )


def stage_of(task_run_name: str) -> str:
    folder = task_run_name.split("/", 1)[-1]  # "iter-0/generate-base" -> "generate-base"
    return folder.split("-", 1)[0] if folder.startswith("generate-") else folder
