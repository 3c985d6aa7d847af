"""SIGTERM (Slurm, Kubernetes, a spot instance): the train stage stores a checkpoint at the end of its
step and stops, the process exits with 143 within orchestration.preemption_grace_seconds, a flow run on
the Prefect server ends Crashed saying so, and the rerun resumes from that step to the artifacts of an
uninterrupted run (alphaspin.preemption)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path

import pytest
from prefect_stack import tiny_run_overrides

from alphaspin import preemption
from alphaspin.config import load_config
from alphaspin.runs import Run
from alphaspin.stage_spec import Node

ROOT = Path(__file__).resolve().parents[1]
ALPHASPIN = str(Path(sys.executable).parent / "alphaspin")
INJECT = ROOT / "tests" / "preempt_inject"
# 6 pairs, 2 per step: 3 steps; no checkpoint of save_steps before the end.
SAVE_STEPS = ["training.save_steps=100"]


def overrides_for(runs_root: Path, run_id: str, *extra: str) -> list[str]:
    return [*tiny_run_overrides(runs_root, run_id), *SAVE_STEPS, *extra]


def command(overrides: list[str], *flags: str) -> list[str]:
    out = [ALPHASPIN, "run", "--config", "configs/quickstart.yaml", *flags]
    for item in overrides:
        out += ["--set", item]
    return out


def env_with(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(extra)
    return env


# -- the mechanism, in this process ---------------------------------------------------------------
def test_graceful_sigterm_only_records_the_request_and_restores_the_handler():
    before = signal.getsignal(signal.SIGTERM)
    try:
        with preemption.graceful_sigterm("test", grace=60.0) as installed:
            assert installed
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)  # the handler runs between bytecodes of the main thread
            assert preemption.requested()
        assert signal.getsignal(signal.SIGTERM) is before
    finally:
        preemption.reset()


def test_raise_on_sigterm_raises_preempted_where_the_main_thread_is():
    try:
        with pytest.raises(preemption.Preempted, match="preempted by SIGTERM.*run the same command again"):
            with preemption.raise_on_sigterm(grace=60.0):
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)
    finally:
        preemption.reset()
    assert issubclass(preemption.Preempted, BaseException) and not issubclass(preemption.Preempted, Exception)


def test_outside_the_main_thread_the_handler_is_left_alone():
    before, seen = signal.getsignal(signal.SIGTERM), []

    def body():
        with preemption.graceful_sigterm("thread", grace=60.0) as installed:
            seen.append((installed, signal.getsignal(signal.SIGTERM)))

    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    assert seen == [(False, before)]


def test_a_process_that_does_not_stop_exits_143_at_the_grace():
    script = textwrap.dedent(
        """
        import os, signal, time
        from alphaspin import preemption
        with preemption.graceful_sigterm("busy", grace=1.0):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(60)   # never reaches a safe point
        """
    )
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    took = time.monotonic() - started
    assert done.returncode == 143, done.stderr
    assert took < 20, took  # 1 s of grace plus the interpreter's start-up on a loaded machine
    assert "orchestration.preemption_grace_seconds=1" in done.stderr


# -- a real run: SIGTERM mid-train, rerun --------------------------------------------------------
def adapter_digests(run: Run) -> dict[str, str]:
    manifest = run.dir(Node("train", 0)).read_manifest()
    assert manifest is not None
    return {name: meta["sha256"] for name, meta in manifest["files"].items() if name.startswith("adapter/")}


@pytest.mark.slow
def test_sigterm_mid_train_checkpoints_at_once_and_the_rerun_resumes_to_the_same_adapter(
    prefect_server, tmp_path, tiny_model
):
    from prefect.settings import PREFECT_API_URL

    run_id = f"preempt-{uuid.uuid4().hex[:8]}"
    clean = overrides_for(tmp_path / "clean", run_id)
    done = subprocess.run(command(clean, "--no-prefect"), cwd=ROOT, env=env_with(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]

    interrupted = overrides_for(tmp_path / "runs", run_id)
    marker = tmp_path / "paused"
    env = env_with(
        PREFECT_API_URL=str(PREFECT_API_URL.value()),
        PYTHONPATH=os.pathsep.join([str(INJECT), os.environ.get("PYTHONPATH", "")]),
        ALPHASPIN_TEST_PAUSE=f"main:2:{marker}",
    )
    process = subprocess.Popen(
        command(interrupted), cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 600
    while not marker.exists():
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "training never reached step 2"
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)  # from outside, at the end of step 2 of 3
    sent = time.monotonic()
    out, err = process.communicate(timeout=120)
    took = time.monotonic() - sent
    assert process.returncode == 143, err[-3000:]
    assert took < 25, f"exited {took:.1f} s after SIGTERM (orchestration.preemption_grace_seconds is 25)"
    assert "preempted by SIGTERM at step 2/3; checkpoint-2 is stored" in err
    assert "run the same command again to resume" in err

    run = Run(load_config(ROOT / "configs/quickstart.yaml", interrupted))
    train = run.dir(Node("train", 0))
    assert train.read_manifest() is None
    assert "_scratch/checkpoints/checkpoint-2/_COMPLETE.json" in train.list_files()

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    async def states():
        async with get_client() as client:
            runs = await client.read_flow_runs(
                flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[run_id, f"{run_id}-iter-0"]))
            )
            return {r.name: (r.state.type.value, r.state.message or "") for r in runs}

    import asyncio

    by_name = asyncio.run(states())
    for name in (run_id, f"{run_id}-iter-0"):
        kind, message = by_name[name]
        assert kind == "CRASHED", (name, kind, message)
        assert "preempted by SIGTERM at step 2/3" in message, message

    again = subprocess.run(
        command(interrupted, "--no-prefect"), cwd=ROOT, env=env_with(), capture_output=True, text=True
    )
    assert again.returncode == 0, again.stderr[-3000:]
    record = train.verify()
    assert record is not None and record.metrics["resumed_from"] == "checkpoint-2"
    assert max(h.get("step", 0) for h in json.loads(train.read_bytes("train_log.json"))) == 3
    clean_run = Run(load_config(ROOT / "configs/quickstart.yaml", clean))
    assert adapter_digests(run) == adapter_digests(clean_run)
    assert set(adapter_digests(run)) >= {"adapter/adapter_model.safetensors", "adapter/adapter_config.json"}


@pytest.mark.slow
def test_sigterm_reaches_the_ranks_of_a_two_process_train_stage_and_they_checkpoint_together(tmp_path, tiny_model):
    """The stage's process alone gets the SIGTERM (as from Kubernetes); it forwards it to the launcher's
    process group, the ranks agree on the step, rank 0 stores the checkpoint with both ranks' RNG states."""
    overrides = overrides_for(
        tmp_path / "runs", "preempt-2-ranks", "training.num_processes=2", "training.per_device_train_batch_size=1"
    )
    marker = tmp_path / "paused"
    env = env_with(
        PYTHONPATH=os.pathsep.join([str(INJECT), os.environ.get("PYTHONPATH", "")]),
        ALPHASPIN_TEST_PAUSE=f"rank0:2:{marker}",  # rank 0 waits at the end of step 2 of 3
    )
    process = subprocess.Popen(
        command(overrides, "--no-prefect"), cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 600
    while not marker.exists():
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "training never reached step 2"
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)  # to the stage's process only: the ranks are in their own session
    sent = time.monotonic()
    _, err = process.communicate(timeout=120)
    took = time.monotonic() - sent
    assert process.returncode == 143, err[-3000:]
    assert took < 25, took
    assert "preempted by SIGTERM on 2 processes; checkpoint-2 is stored" in err, err[-3000:]
    train = Run(load_config(ROOT / "configs/quickstart.yaml", overrides)).dir(Node("train", 0))
    stored = train.list_files("_scratch/checkpoints/checkpoint-2")
    assert {"_scratch/checkpoints/checkpoint-2/rng_state_0.pth", "_scratch/checkpoints/checkpoint-2/rng_state_1.pth",
            "_scratch/checkpoints/checkpoint-2/_COMPLETE.json"} <= set(stored)  # fmt: skip
    assert train.read_manifest() is None

    again = subprocess.run(command(overrides, "--no-prefect"), cwd=ROOT, env=env_with(), capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    record = train.verify()
    assert record is not None and record.metrics["resumed_from"] == "checkpoint-2"


@pytest.mark.slow
def test_sigterm_in_generate_stops_at_once_and_keeps_the_finished_shards(tmp_path, tiny_model):
    overrides = overrides_for(tmp_path / "runs", "preempt-generate")
    marker = tmp_path / "paused"
    env = env_with(
        PYTHONPATH=os.pathsep.join([str(INJECT), os.environ.get("PYTHONPATH", "")]),
        ALPHASPIN_TEST_PAUSE=f"generate:1:{marker}",  # right after the first of the stage's shards is stored
    )
    process = subprocess.Popen(
        command(overrides, "--no-prefect"), cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 600
    while not marker.exists():
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "generation never stored a shard"
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    _, err = process.communicate(timeout=120)
    assert process.returncode == 143, err[-3000:]
    assert time.monotonic() - sent < 25
    assert "alphaspin: iter-0/generate-base: preempted by SIGTERM" in err, err[-3000:]
    generate = Run(load_config(ROOT / "configs/quickstart.yaml", overrides)).dir(Node("generate", 0, "base"))
    assert generate.read_manifest() is None
    assert [n for n in generate.list_files() if n.startswith("shards/")] == ["shards/shard-00000.parquet"]
    kept = generate.read_bytes("shards/shard-00000.parquet")

    again = subprocess.run(command(overrides, "--no-prefect"), cwd=ROOT, env=env_with(), capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    manifest = generate.read_manifest()
    assert manifest is not None and generate.read_bytes("shards/shard-00000.parquet") == kept  # kept, not redone
    assert sorted(n for n in manifest["files"] if n.startswith("shards/")) == [
        "shards/shard-00000.parquet",
        "shards/shard-00001.parquet",
    ]
