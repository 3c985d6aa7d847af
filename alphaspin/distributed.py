"""The train stage on several processes or machines: `accelerate launch` as a child process.

Only training is distributed; the rest of the pipeline stays one process. When
``training.num_processes > 1`` (or ``training.num_machines > 1``, or a ``training.deepspeed_config``),
`run_distributed` (in the stage's process, machine 0):

1. writes the job spec (``<stage>/_scratch/distributed/job.json``: the config, where the run's
   storage is, the iteration, the previous adapter's folder) and the training pairs next to it, in
   run storage, so that every machine reads the same job;
2. runs ``python -m accelerate.commands.launch ... -m alphaspin.distributed worker <spec> <workdir>``
   in its own process group, polls it (progress lines from rank 0 reach the stage's progress hook),
   and kills the whole group if this process fails; a launch that exits non-zero fails the stage
   with the last lines of its stderr;
3. stores the adapter rank 0 left in ``<workdir>/adapter`` as the one-process path does.

Each rank runs the same `alphaspin.training.fit` as one process does: TRL's DPOTrainer, which
takes its ranks from the launcher (gloo on CPU, NCCL on GPUs), averages gradients over them and
shards each batch; checkpoints go to run storage (`StorageCheckpointCallback`), so a retried stage
resumes from the newest one with any number of processes of the same job.

Other machines join with ``python -m alphaspin.distributed join <spec URL> --machine-rank R``:
it waits for the spec, then starts its own ``accelerate launch`` with the same rendezvous.

Why ``accelerate launch --multi_gpu`` on CPU: it is accelerate's torchrun launcher (the name is
historical); each rank's Trainer asks for ``Accelerator(cpu=True)``, which with torchrun's
``LOCAL_RANK`` set is accelerate's MULTI_CPU type on gloo. ``accelerate launch --cpu
--num_processes 2`` would start one process.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from importlib.util import find_spec
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from alphaspin import preemption
from alphaspin.config import AlphaSpinConfig, TrainingConfig
from alphaspin.storage import SCRATCH, RunStorage, StageDir

if TYPE_CHECKING:
    from alphaspin.stage_spec import Artifact, Job
    from alphaspin.training import Fitted

logger = logging.getLogger(__name__)

SPEC = f"{SCRATCH}/distributed/job.json"
PAIRS = f"{SCRATCH}/distributed/pairs.parquet"
PROGRESS = "progress.jsonl"  # in the launch's local workdir: one JSON line per step, from rank 0
RESULT = "result.json"
# The stage's process id, for the ranks' watchdog: a killed pipeline must not leave training behind.
PARENT_PID_ENV = "ALPHASPIN_TRAINING_PARENT_PID"
STDERR_TAIL_LINES = 25


class DistributedTrainingError(RuntimeError):
    """The training processes failed; the message ends with the last lines of their stderr."""


def is_launched(training: TrainingConfig) -> bool:
    """Whether the train stage runs as a child ``accelerate launch`` (else in the pipeline's process)."""
    return training.num_processes > 1 or training.num_machines > 1 or training.deepspeed_config is not None


def check_launch(training: TrainingConfig, device: str) -> None:
    """Fail with a one-line error naming the knob, before anything runs, if this machine cannot launch
    the configured training (no accelerate, more processes than devices, DeepSpeed without a GPU)."""
    if not is_launched(training):
        return
    if find_spec("accelerate") is None:
        raise ValueError(
            f"training.num_processes={training.num_processes}: training on several processes runs `accelerate "
            "launch`, and accelerate is not installed (pip install accelerate)"
        )
    per_machine = training.num_processes // training.num_machines
    if device.startswith("cuda"):
        import torch

        gpus = torch.cuda.device_count()
        if per_machine > gpus:
            raise ValueError(
                f"training.num_processes={training.num_processes}: {per_machine} processes per machine but this "
                f"machine has {gpus} GPU(s) (one process per GPU)"
            )
    else:
        cores = usable_cores()
        if per_machine > cores:
            raise ValueError(
                f"training.num_processes={training.num_processes}: {per_machine} processes per machine but this "
                f"machine has {cores} CPU core(s) (without a GPU, at most one process per core)"
            )
        if training.mixed_precision == "fp16":
            raise ValueError("training.mixed_precision=fp16 needs a GPU (use no or bf16 on CPU)")
    if training.deepspeed_config is not None:
        if not device.startswith("cuda"):
            raise ValueError(
                f"training.deepspeed_config={training.deepspeed_config}: DeepSpeed ZeRO needs GPUs; this machine "
                f"trains on {device} (unset it)"
            )
        if not Path(training.deepspeed_config).is_file():
            raise ValueError(f"training.deepspeed_config={training.deepspeed_config}: no such file")
        if find_spec("deepspeed") is None:
            raise ValueError(
                f"training.deepspeed_config={training.deepspeed_config}: deepspeed is not installed "
                "(pip install deepspeed)"
            )


def usable_cores() -> int:
    """CPU cores this process may run on (a container's CPU set, not the host's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def launch_command(
    training: TrainingConfig, device: str, spec_url: str, workdir: Path, machine_rank: int, port: int
) -> list[str]:
    """The ``accelerate launch`` command line of one machine (same interpreter as this process)."""
    from alphaspin.dpo import mixed_precision

    per_machine = training.num_processes // training.num_machines
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_processes",
        str(training.num_processes),
        "--num_machines",
        str(training.num_machines),
        "--machine_rank",
        str(machine_rank),
        "--main_process_ip",
        training.main_process_ip or "127.0.0.1",
        "--main_process_port",
        str(port),
        "--mixed_precision",
        mixed_precision(training, use_cpu=not device.startswith("cuda")),
        "--dynamo_backend",
        "no",
        "--rdzv_conf",
        f"timeout={int(training.rendezvous_timeout_seconds)}",
        "--max_restarts",
        "0",  # a failed rank fails the stage; Prefect's retries (and the stored checkpoints) do the rest
    ]
    if training.deepspeed_config is not None:
        # "standard" = torchrun on every machine, like the other launches (accelerate's default is pdsh).
        command += ["--use_deepspeed", "--deepspeed_config_file", training.deepspeed_config]
        command += ["--deepspeed_multinode_launcher", "standard"]
    else:
        command += ["--multi_gpu"]  # accelerate's torchrun launcher; see the module docstring for CPU
    if not device.startswith("cuda"):
        # torchrun would give every rank 1 thread; share this machine's cores between its ranks instead.
        threads = max(1, usable_cores() // per_machine)
        command += ["--num_cpu_threads_per_process", str(threads)]
    return [*command, "-m", "alphaspin.distributed", "worker", spec_url, str(workdir)]


def run_distributed(job: Job, pairs: pd.DataFrame, previous: Artifact | None) -> Fitted:
    """Train in a child ``accelerate launch`` (machine 0) and return what rank 0 left on this disk."""
    from alphaspin.training import Fitted

    training, stage, ws = job.config.training, job.out, job.workspace
    check_launch(training, ws.device)
    stage.write_table(PAIRS, pairs)
    spec = {
        "config": job.config.model_dump(mode="json"),
        "runs_root": stage.storage.runs_root,
        "run_id": stage.storage.run_id,
        "stage": stage.path,
        "iteration": job.iteration,
        "previous": previous.dir.path if previous is not None else None,
        "attempt": uuid.uuid4().hex,  # `follow` joins each attempt of the stage once
    }
    stage.write_json(SPEC, spec)
    spec_url = stage.storage.unstrip(stage.file(SPEC))
    if training.num_machines > 1:
        logger.info(
            "iter-%d/train: waiting for machines 1..%d; on each run: python -m alphaspin.distributed join %s "
            "--machine-rank R",
            job.iteration,
            training.num_machines - 1,
            spec_url,
        )
    workdir = ws.scratch / f"distributed-{job.iteration}"
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    # 0: accelerate picks a free port (one machine); other machines must know the port in advance.
    port = training.main_process_port or (0 if training.num_machines == 1 else 29500)
    command = launch_command(training, ws.device, spec_url, workdir, 0, port)
    progress = _ProgressReader(workdir / PROGRESS, ws.progress)
    # On cuda:N (the stage's own GPUs, `alphaspin.devices`) the ranks see GPUs N.. of this process only.
    from alphaspin.devices import engine_gpus

    visible, _ = engine_gpus(str(ws.device), -(-training.num_processes // training.num_machines))
    extra = None if visible is None else {"CUDA_VISIBLE_DEVICES": visible}
    try:
        supervise(command, workdir, f"iter-{job.iteration}/train", on_poll=progress.poll, extra_env=extra)
    except preemption.Preempted:
        from alphaspin.training import _remote_checkpoints

        stored = _remote_checkpoints(stage)
        where = f"{stored[-1]} is stored in {stage.url}" if stored else "no checkpoint is stored"
        raise preemption.Preempted(
            f"iter-{job.iteration}/train: preempted by SIGTERM on {training.num_processes} processes; {where}: "
            f"{preemption.RESUME_HINT}"
        ) from None
    progress.poll()
    result = json.loads((workdir / RESULT).read_text())
    return Fitted(workdir / "adapter", result["history"], result["resumed_from"])


def supervise(
    command: list[str],
    workdir: Path,
    label: str,
    on_poll: Callable[[], None] | None = None,
    extra_env: dict[str, str] | None = None,
) -> None:
    """Run ``command`` in its own process group and wait for it, polling every second; kill the
    group if this process fails or is interrupted; raise with its stderr's tail if it exits non-zero.
    ``extra_env``: set in the child's environment (its own GPUs)."""
    env = {**os.environ, **(extra_env or {}), PARENT_PID_ENV: str(os.getpid())}
    # The ranks import alphaspin from a fresh interpreter: give them the package this process runs.
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    stdout_path, stderr_path = workdir / "launch.out", workdir / "launch.err"
    logger.info("%s: %s", label, " ".join(command))
    forwarded = False
    with stdout_path.open("wb") as stdout, stderr_path.open("wb") as stderr:
        child = subprocess.Popen(command, stdout=stdout, stderr=stderr, env=env, start_new_session=True)
        try:
            while True:
                if preemption.requested() and not forwarded:
                    # The launcher runs in its own session: a SIGTERM sent to this process alone (Kubernetes,
                    # Slurm with --signal=B:TERM) must reach it. torchrun passes it to the ranks, which agree
                    # on a step, store its checkpoint and stop (`alphaspin.training.PreemptionCallback`).
                    logger.warning("%s: forwarding SIGTERM to the training processes", label)
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(child.pid, signal.SIGTERM)
                    forwarded = True
                try:
                    code = child.wait(timeout=0.2 if forwarded else 1.0)
                    break
                except subprocess.TimeoutExpired:
                    if on_poll is not None:
                        on_poll()
        except BaseException:
            _kill_group(child)
            raise
    if preemption.requested():
        raise preemption.Preempted(
            f"{label}: preempted by SIGTERM; the training processes stopped (exit code {code}) after storing a "
            f"checkpoint: {preemption.RESUME_HINT}"
        )
    if code != 0:
        tail = _tail(stderr_path, STDERR_TAIL_LINES)
        raise DistributedTrainingError(
            f"{label}: the training processes failed (exit code {code}): {_root_cause(tail)}\n{tail}"
        )


def _kill_group(child: subprocess.Popen) -> None:
    """SIGTERM the launcher's process group (launcher and ranks), SIGKILL what is left after 10 s."""
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(child.pid, sig)
        except ProcessLookupError:
            return
        try:
            child.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _root_cause(tail: str) -> str:
    """The last ``SomeError: message`` line of the launch's stderr (torchrun's summary names the first
    failed rank's exception last), else its last line."""
    lines = [line.strip() for line in tail.splitlines() if line.strip()]
    errors = [line for line in lines if re.match(r"^[\w.]+(Error|Exception|Interrupt|Exit)\b.*:", line)]
    return (errors or lines or ["(no output on stderr)"])[-1]


def _tail(path: Path, lines: int) -> str:
    text = path.read_text(errors="replace").splitlines() if path.exists() else []
    return "\n".join(text[-lines:]) or "(no output on stderr)"


class _ProgressReader:
    """Forward rank 0's progress lines (``{"fraction", "message"}``) to the stage's progress hook."""

    def __init__(self, path: Path, progress: Callable[[float, str], None]):
        self.path, self.progress, self.offset = path, progress, 0

    def poll(self) -> None:
        if not self.path.exists():
            return
        with self.path.open("rb") as handle:
            handle.seek(self.offset)
            data = handle.read()
        complete = data[: data.rfind(b"\n") + 1]  # a line being written is read next time
        self.offset += len(complete)
        lines = complete.decode().splitlines()
        if lines:
            last = json.loads(lines[-1])
            self.progress(last["fraction"], last["message"])


# -- the ranks (run by accelerate launch) and the other machines -----------------------------------
def _read_spec(spec_url: str) -> dict[str, Any]:
    import fsspec

    from alphaspin.storage import storage_options_from_env

    with fsspec.open(spec_url, "r", **storage_options_from_env(spec_url)) as handle:
        return json.load(handle)


def _watch_parent() -> None:
    """Exit when the stage's process is gone (SIGKILLed pipelines cannot clean up their children, and the
    launcher, in its own session, would go on training); torch's elastic agent then stops the other ranks."""
    pid = int(os.environ.get(PARENT_PID_ENV, "0"))
    if not pid:
        return

    def watch() -> None:
        while True:
            time.sleep(2.0)
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                os._exit(1)

    threading.Thread(target=watch, daemon=True, name="parent-watchdog").start()


def worker(spec_url: str, workdir: Path) -> None:
    """One rank: `alphaspin.training.fit` on the job of ``spec_url``; rank 0 writes the result into ``workdir``."""
    from alphaspin.training import fit
    from alphaspin.workspace import Workspace

    _watch_parent()
    spec = _read_spec(spec_url)
    config = AlphaSpinConfig.model_validate(spec["config"])
    storage = RunStorage(spec["runs_root"], spec["run_id"])
    stage = StageDir(storage, spec["stage"])
    is_rank_zero = int(os.environ.get("RANK", "0")) == 0
    progress_path = workdir / PROGRESS

    def progress(fraction: float, message: str) -> None:
        with progress_path.open("a") as handle:
            handle.write(json.dumps({"fraction": fraction, "message": message}) + "\n")

    with Workspace(config, progress=progress if is_rank_zero else None) as ws:
        if ws.device.startswith("cuda"):  # "cuda" is GPU 0 in every rank: load each rank's model onto its own GPU
            ws.device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        pairs = stage.read_table(PAIRS)
        previous = None
        if spec["previous"] is not None:  # every rank its own copy (ranks of one machine may not share a disk)
            previous = str(StageDir(storage, spec["previous"]).get_dir("adapter", ws.scratch / "previous-adapter"))
        overrides: dict[str, Any] = {}
        if config.training.deepspeed_config is not None:
            overrides["deepspeed"] = config.training.deepspeed_config
        # A SIGTERM (from torchrun's agent, forwarded by the stage, or sent by a scheduler to every process):
        # this rank stops with the others after a stored checkpoint (`alphaspin.training.PreemptionCallback`).
        with preemption.graceful_sigterm(f"rank {os.environ.get('RANK', '0')}", grace(config)):
            fitted = fit(
                ws,
                stage,
                pairs,
                previous,
                spec["iteration"],
                workdir / "trainer",
                workdir / "adapter",
                **overrides,
            )
        if is_rank_zero:
            result = {"history": fitted.history, "resumed_from": fitted.resumed_from}
            (workdir / RESULT).write_text(json.dumps(result))


def join(spec_url: str, machine_rank: int, timeout: float = 600.0) -> str | None:
    """Machine ``machine_rank`` (≥ 1) of a multi-machine train stage: wait up to ``timeout`` seconds for
    the job spec, then launch this machine's ranks with the same rendezvous as machine 0."""
    from alphaspin.workspace import default_device

    deadline, spec = time.monotonic() + timeout, None
    while spec is None:
        try:
            spec = _read_spec(spec_url)
        except FileNotFoundError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{spec_url}: no job spec after {timeout:.0f} s") from None
            time.sleep(1.0)
    config = AlphaSpinConfig.model_validate(spec["config"])
    training = config.training
    if not 1 <= machine_rank < training.num_machines:
        raise ValueError(f"--machine-rank {machine_rank}: training.num_machines is {training.num_machines}")
    device = config.model.device or default_device()
    check_launch(training, device)
    with tempfile.TemporaryDirectory(prefix="alphaspin-join-") as folder:
        workdir = Path(folder)
        command = launch_command(training, device, spec_url, workdir, machine_rank, training.main_process_port or 29500)
        with preemption.graceful_sigterm(f"machine {machine_rank}", grace(config)):  # forwarded by supervise
            supervise(command, workdir, f"machine {machine_rank}")
    try:  # the attempt the ranks trained in (they read the spec after the rendezvous: maybe a newer one)
        return _read_spec(spec_url).get("attempt")
    except FileNotFoundError:
        return spec.get("attempt")


def follow(config: AlphaSpinConfig, machine_rank: int, poll: float = 10.0) -> None:
    """Machine ``machine_rank`` (≥ 1) of every train stage of a run (on Slurm: deploy/slurm/alphaspin-node.sh,
    one per node but the first): for t = 0..T, until iteration t's train stage has a manifest, join its launch
    as soon as machine 0 has written the job spec (looking every ``poll`` seconds). A join that fails
    (machine 0 not there within ``training.rendezvous_timeout_seconds``, the spec of an attempt that was
    interrupted) waits for machine 0's next attempt (each attempt's spec carries an id): so a requeued job's
    machines find each other again, and a finished attempt's spec, left until machine 0 commits the stage,
    is not joined twice."""
    training = config.training
    if not 1 <= machine_rank < training.num_machines:
        raise ValueError(
            f"--machine-rank {machine_rank}: training.num_machines is {training.num_machines} "
            "(machine ranks 1..num_machines-1 join; machine 0 runs the pipeline)"
        )
    storage = RunStorage(config.run.runs_root, config.run.run_id)
    joined: set[str] = set()  # attempts of a stage joined already (finished or failed): never joined twice
    for t in range(config.method.iterations + 1):
        stage = storage.stage(t, "train")
        spec_url = storage.unstrip(stage.file(SPEC))
        while stage.read_manifest() is None:
            try:
                attempt = str(stage.read_json(SPEC).get("attempt"))
            except (FileNotFoundError, ValueError):  # not written yet (or being written)
                attempt = None
            if attempt is None or attempt in joined:
                time.sleep(poll)
                continue
            joined.add(attempt)
            try:
                joined.add(str(join(spec_url, machine_rank, timeout=poll)))
            except (DistributedTrainingError, TimeoutError, FileNotFoundError) as error:
                logger.warning(
                    "iter-%d/train, machine %d: %s; waiting for machine 0's next attempt",
                    t,
                    machine_rank,
                    str(error).splitlines()[0],
                )
        logger.info("iter-%d/train is done", t)


def grace(config: AlphaSpinConfig) -> float:
    """Seconds a SIGTERMed training process has to store its checkpoint and stop."""
    return config.orchestration.preemption_grace_seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m alphaspin.distributed", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("worker", help="one training rank (started by accelerate launch)")
    run.add_argument("spec_url")
    run.add_argument("workdir", type=Path)
    other = commands.add_parser("join", help="this machine's ranks of a multi-machine train stage")
    other.add_argument("spec_url", help="the job spec URL that machine 0 logs")
    other.add_argument("--machine-rank", type=int, required=True)
    other.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for machine 0's job spec")
    follower = commands.add_parser(
        "follow", help="this machine's ranks of every train stage of a run (Slurm: deploy/slurm/alphaspin-node.sh)"
    )
    follower.add_argument("--config", "-c", help="the recipe machine 0 runs (YAML)")
    follower.add_argument("--set", "-s", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    follower.add_argument("--machine-rank", type=int, required=True)
    follower.add_argument("--poll", type=float, default=10.0, help="seconds between looks at run storage")
    # follow takes the node's `alphaspin run` arguments: those other than the recipe's are machine 0's.
    args, unknown = parser.parse_known_args(argv)
    if unknown and args.command != "follow":
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.command == "worker":
        from torch.distributed.elastic.multiprocessing.errors import record

        # record: a failing rank's exception goes into torchrun's error summary (the stage's error message).
        try:
            record(worker)(args.spec_url, args.workdir)
        except preemption.Preempted as stopped:  # checkpoint stored: no traceback, the SIGTERM exit code
            logger.warning("%s", stopped)
            raise SystemExit(preemption.EXIT_CODE) from None
    else:
        from alphaspin.config import ConfigError, load_config

        try:
            if args.command == "join":
                join(args.spec_url, args.machine_rank, args.timeout)
            else:
                follow(load_config(args.config, args.overrides), args.machine_rank, args.poll)
        except (ConfigError, ValueError) as error:
            print(f"python -m alphaspin.distributed {args.command}: error: {error}", file=sys.stderr)
            raise SystemExit(2) from None
        except preemption.Preempted as stopped:
            logger.warning("%s", stopped)
            raise SystemExit(preemption.EXIT_CODE) from None


if __name__ == "__main__":
    main()
