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
