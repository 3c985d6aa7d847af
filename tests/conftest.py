"""Shared pytest fixtures."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator

# Offline and quiet, whoever starts pytest (scripts/test.sh sets these too).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
# Idle OpenMP threads sleep instead of spinning: the suite's processes (two pytest workers, Prefect
# servers and workers, training subprocesses) share the cores, and a spinning thread of one steals them
# from the others; only read before torch loads, so set here and inherited by every child (bench/README.md).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# glibc's malloc hands every block above its (adaptive, 128 KiB-32 MiB) mmap threshold back to the kernel
# on free, so each tiny-model step maps, faults in (zeroes) and unmaps its tensors again: a quarter of a
# tiny run's CPU was system time (5.3 of 23 s). From the heap instead, freed blocks are reused: system
# time 1.6 s, the run 15-20% less CPU, the same bytes. Read by the dynamic loader at process start, so it
# reaches the xdist workers (started after this file loads) and every child; ignored where glibc is not.
os.environ.setdefault("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=1073741824:glibc.malloc.trim_threshold=4294967296")

import pytest  # noqa: E402

from alphaspin.config import AlphaSpinConfig, load_config  # noqa: E402
from alphaspin.testing.s3server import S3ServerError, SeaweedS3, find_weed  # noqa: E402

# -- tiny model and configs ---------------------------------------------------------------------
# Small enough that two iterations of the whole method take seconds on 2 CPU cores.
TINY_OVERRIDES = [
    "method.iterations=1",
    "method.pairs_first_iteration=6",
    "method.pairs_per_iteration=6",
    "data.heldout_size=4",
    "generation.max_new_tokens=8",
    "generation.batch_size=2",
    "generation.shard_size=2",
    "training.per_device_train_batch_size=2",
    "training.save_steps=1",
    "training.max_length=96",
    "training.lora.r=4",
]


# For tests whose subject is not evaluation (a loss, an opponent sampler, a reference): no lm-eval and no
# judged chat in their runs, about 6 s of CPU less per two-iteration run (a third of it); the held-out
# metrics stay. lm-eval and the judge are covered where they are the subject (test_evaluate_benchmarks,
# test_artifact_digests, test_flow, test_resume, test_vllm_*) and by every run that keeps the recipe's.
NO_BENCHMARKS = ("evaluation.benchmarks=[]", "evaluation.judge.enabled=false")


def tiny_overrides(model: str, runs_root) -> list[str]:
    """The quickstart recipe on the tiny model, in ``runs_root``. The judged chat keeps running (its
    whole path: answers, the in-process judge server, the ratings) but with the tiny model as judge:
    the quickstart's 135M judge alone takes ~40 s per iteration on 2 cores."""
    return [
        f"model.name_or_path={model}",
        f"run.runs_root={runs_root}",
        *TINY_OVERRIDES,
        f"evaluation.judge.model={model}",
        "evaluation.judge.answer_max_new_tokens=8",
    ]


def require_vllm() -> str:
    """The Python of vLLM's environment, or skip the test without one; but where
    ``$ALPHASPIN_VLLM_PYTHON`` is set (scripts/test.sh sets it) a missing environment fails instead,
    so a broken set-up can never pass by skipping."""
    from alphaspin.vllm_server import VllmError, find_vllm_python

    try:
        return find_vllm_python(None)
    except VllmError as error:
        if os.environ.get("ALPHASPIN_VLLM_PYTHON"):
            raise
        pytest.skip(str(error))


@pytest.fixture(scope="session")
def tiny_model() -> str:
    from alphaspin.testing.tiny_model import tiny_model_path

    return tiny_model_path()


@pytest.fixture
def make_config(tiny_model: str, tmp_path) -> Callable[..., AlphaSpinConfig]:
    """``make_config(*overrides)``: the quickstart recipe shrunk to the tiny model, in tmp_path."""
    recipe = os.path.join(os.path.dirname(__file__), "..", "configs", "quickstart.yaml")

    def make(*overrides: str) -> AlphaSpinConfig:
        return load_config(recipe, [*tiny_overrides(tiny_model, tmp_path / "runs"), *overrides])

    return make


# -- Prefect (one temporary server per session) ---------------------------------------------------
@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory) -> Iterator[None]:
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


# -- S3 (a real SeaweedFS server on 127.0.0.1) ------------------------------------------------


@pytest.fixture(scope="session")
def s3_server() -> Iterator[SeaweedS3]:
    """One SeaweedFS S3 server per pytest session (auth on, free ports), stopped by pid at the end."""
    try:
        find_weed()
    except S3ServerError as error:
        pytest.skip(str(error))
    server = SeaweedS3().start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def s3_runs_root(s3_server: SeaweedS3, monkeypatch: pytest.MonkeyPatch) -> str:
    """``s3://<fresh bucket>/runs`` on the session's server, with the AWS_* variables set for it."""
    for name in (
        "AWS_ENDPOINT_URL",
        "AWS_SESSION_TOKEN",
        "AWS_PROFILE",
        "AWS_CONFIG_FILE",
        "AWS_SHARED_CREDENTIALS_FILE",
    ):
        monkeypatch.delenv(name, raising=False)
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    bucket = s3_server.make_bucket(f"test-{uuid.uuid4().hex[:16]}")
    return f"s3://{bucket}/runs"


# -- parallel runs (pytest-xdist: scripts/test.sh runs `-n 2`) ------------------------------------------
# Each worker is a pytest process of its own: session fixtures (the Prefect harness, the S3 server) start
# once per worker. The tests of one module stay on one worker (their module-scoped fixtures, e.g. a
# finished run that several tests read, are built once), except in SPLIT_MODULES, whose slow tests share
# no module fixture and are handed out one by one; the vLLM modules share one worker (GROUPS: one engine
# at a time). Work is handed out in SLOWEST_FIRST order, so that the long, mostly waiting tests (a Prefect
# stack waiting out a heartbeat timeout) start early beside the CPU-bound ones and no long test is left for
# the end; the other modules follow in collection order.
SLOWEST_FIRST = (
    "test_pools.py",  # minutes, mostly waiting for the killed worker's heartbeat timeout
    "test_deploy.py",
    "test_slurm.py",  # a real Slurm: two sbatch runs, each requeued mid-train (waits on Slurm's clean-up)
    "test_vllm_backend.py",
    "test_vllm_pipeline.py",
    "test_flow.py",
    "test_grid.py",
    "test_bench.py",
    "test_preemption.py",
    "test_distributed_training.py",
    "test_s3_outage.py",
    "test_operational_knobs.py",
    "test_devices.py",
    "test_resume.py",
    "test_evaluate_benchmarks.py",
    "test_benchmarks_leaderboard.py",
    "test_tracking.py",
    "test_pipeline.py",
    "test_synthetic.py",
    "test_provenance.py",
    "test_reference_variants.py",
    "test_opponent_samplers.py",
    "test_losses.py",
    "test_console.py",
    "test_concurrent_runs.py",
    "test_gflownet.py",
    "test_truncated_losers.py",
    "test_artifact_digests.py",
)
SPLIT_MODULES = {"test_deploy.py", "test_flow.py", "test_grid.py", "test_preemption.py"}
GROUPS = {"test_vllm_backend.py": "vllm", "test_vllm_pipeline.py": "vllm"}


def work_unit(nodeid: str) -> str:
    """The unit of work a test belongs to: its module, the test itself in SPLIT_MODULES, or a group."""
    module = nodeid.split("::", 1)[0]
    name = module.rsplit("/", 1)[-1]
    return nodeid if name in SPLIT_MODULES else GROUPS.get(name, module)


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist, absent without it
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """For ``-n N`` (xdist's default ``--dist load``): xdist's load-scope scheduling over `work_unit`s, in
    collection order. (xdist's own ``--dist loadgroup`` does nothing here: its ``xdist_group`` marks work by
    renaming node ids, which pytest 9 no longer lets a plugin do.)"""
    if config.getvalue("dist") != "load":
        return None  # another --dist asked for on the command line: xdist's own
    from xdist.scheduler import LoadScopeScheduling

    class WorkUnits(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return work_unit(nodeid)

    config.option.loadscopereorder = False  # keep SLOWEST_FIRST, not xdist's most-tests-first
    return WorkUnits(config, log)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("PYTEST_XDIST_WORKER"):  # the order work is handed out in; a plain run keeps its order
        rank = {name: position for position, name in enumerate(SLOWEST_FIRST)}
        items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


def pytest_configure(config: pytest.Config) -> None:
    """Under xdist, the controller builds the models that tests convert or build on first use (the tiny
    models, the builtin SmolLM2) before any worker starts: two workers would race to create them."""
    if getattr(config.option, "numprocesses", None) and not os.environ.get("PYTEST_XDIST_WORKER"):
        from pathlib import Path

        models = Path(os.environ.get("ALPHASPIN_CACHE", Path.home() / ".cache" / "alphaspin")) / "models"
        names = ("smollm2-135m-instruct", "tiny-llama-seed0", "tiny-llama-hd32-seed0")  # alphaspin.models' names
        if all((models / name / "config.json").exists() for name in names):
            return  # built by an earlier run: no need to load torch here
        from alphaspin.models import resolve_model_path
        from alphaspin.testing.tiny_model import tiny_model_path

        resolve_model_path("builtin:smollm2-135m-instruct")
        tiny_model_path()
        tiny_model_path(head_dim=32)
