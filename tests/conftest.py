"""Shared pytest fixtures."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from alphaspin.testing.s3server import S3ServerError, SeaweedS3, find_weed

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
