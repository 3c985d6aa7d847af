"""S3 outages and bad S3 settings, on a real SeaweedFS server of this module's own (it is stopped,
killed and paused here, so never the session's shared one).

- A bad ``run.runs_root`` (a bucket that does not exist, refused credentials, an endpoint that refuses
  connections) is one line naming the field and the cause, in seconds, before anything is written.
- The server killed or paused (SIGSTOP: it accepts connections and never answers) in the middle of
  a multipart upload: the write fails within the documented bound, no partial object appears, and
  the same write succeeds once the server is back.
- The server paused during a stage of `alphaspin run`: the command fails within the bound, with one
  line naming the storage, no manifest is written, the lease does not block, and the same command,
  the server back, resumes and writes the artifacts of an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from alphaspin.flows.cli import main
from alphaspin.leases import LEASES, LeaseInfo
from alphaspin.stages import REGISTRY
from alphaspin.storage import MANIFEST, RunStorage, S3Limits, StorageError
from alphaspin.testing.s3server import S3ServerError, SeaweedS3, find_weed

sys.path.insert(0, str(Path(__file__).parent))
from artifact_digests import GOLDEN, cpu_kernels, run_digests  # noqa: E402
from conftest import tiny_overrides  # noqa: E402

AWS_VARIABLES = (
    "AWS_ENDPOINT_URL",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE",
)


@pytest.fixture(scope="module")
def server() -> Iterator[SeaweedS3]:
    try:
        find_weed()
    except S3ServerError as error:
        pytest.skip(str(error))
    own = SeaweedS3().start()
    try:
        yield own
    finally:
        own.close()  # resumes it first if a failed test left it paused


@pytest.fixture
def s3_env(server: SeaweedS3, monkeypatch: pytest.MonkeyPatch) -> SeaweedS3:
    for name in AWS_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name, value in server.env().items():
        monkeypatch.setenv(name, value)
    return server


def new_bucket(server: SeaweedS3) -> str:
    return server.make_bucket(f"outage-{uuid.uuid4().hex[:12]}")


def wait_readable(server: SeaweedS3, bucket: str, seconds: float = 60.0) -> None:
    """After a restart SeaweedFS answers 500 'volume not found' for a few seconds (PLATFORM.md)."""
    deadline = time.monotonic() + seconds
    client = server.client(timeout=5)
    probe = f"probe-{uuid.uuid4().hex}"
    while True:
        try:
            client.put_object(Bucket=bucket, Key=probe, Body=b"x")
            client.get_object(Bucket=bucket, Key=probe)["Body"].read()
            client.delete_object(Bucket=bucket, Key=probe)
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def keys(server: SeaweedS3, bucket: str) -> list[str]:
    found = server.client().list_objects_v2(Bucket=bucket).get("Contents", [])
    return sorted(item["Key"] for item in found)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# -- bad input ----------------------------------------------------------------------------------------
def cli_run(runs_root: str, tiny_model: str, *extra: str) -> list[str]:
    return [
        "run",
        "-c",
        "configs/quickstart.yaml",
        "--set",
        f"run.runs_root={runs_root}",
        "--set",
        f"model.name_or_path={tiny_model}",
        *extra,
    ]


@pytest.mark.parametrize("case", ["missing-bucket", "wrong-key", "wrong-secret", "refused-endpoint"])
def test_bad_s3_settings_are_one_line_naming_runs_root_in_seconds(
    case: str, s3_env: SeaweedS3, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, tiny_model: str
) -> None:
    bucket = new_bucket(s3_env)
    runs_root = f"s3://{bucket}/runs"
    expected = {
        "missing-bucket": rf"bucket 'no-such-{bucket}' does not exist at {s3_env.endpoint_url}",
        "wrong-key": rf"the access key 'nobody' \(AWS_ACCESS_KEY_ID\) is not known to {s3_env.endpoint_url}",
        "wrong-secret": rf"the secret key \(AWS_SECRET_ACCESS_KEY\) does not match the access key at {s3_env.endpoint_url}",
        "refused-endpoint": r"cannot connect to the S3 endpoint http://127\.0\.0\.1:\d+ .*check AWS_ENDPOINT_URL_S3.*",
    }[case]
    if case == "missing-bucket":
        runs_root = f"s3://no-such-{bucket}/runs"
    elif case == "wrong-key":
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "nobody")
    elif case == "wrong-secret":
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    else:
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{free_port()}")
    # the command with Prefect (the default) for one case: the check comes before any server starts
    argv = cli_run(runs_root, tiny_model, *([] if case == "refused-endpoint" else ["--no-prefect"]))
    started = time.monotonic()
    code = main(argv)
    took = time.monotonic() - started
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    import re

    assert re.fullmatch(rf"alphaspin: error: run\.runs_root: s3://[^:]+/runs: {expected}", err), err
    assert took < 15, took  # seconds, not the client's retries (minutes)
    assert keys(s3_env, bucket) == []  # nothing written
    assert [b["Name"] for b in s3_env.client().list_buckets()["Buckets"] if b["Name"].startswith("no-such-")] == []


# -- a large upload interrupted ------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("outage", ["killed", "paused"])
def test_server_lost_mid_multipart_upload_fails_in_bound_and_the_write_succeeds_later(
    outage: str, s3_env: SeaweedS3, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ALPHASPIN_S3_CONNECT_TIMEOUT", "2")
    monkeypatch.setenv("ALPHASPIN_S3_READ_TIMEOUT", "4")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    bucket = new_bucket(s3_env)
    storage = RunStorage(f"s3://{bucket}/runs", "r1")
    storage.multipart_chunksize = 5 * 2**20  # S3's smallest part: 16 MiB go up as 4 parts
    data = os.urandom(16 * 2**20)
    path = storage.path("iter-0", "train", "adapter", "adapter_model.safetensors")
    bound = S3Limits.from_env().bound(len(data))
    outcome: dict[str, object] = {}

    def upload() -> None:
        started = time.monotonic()
        try:
            storage.write_bytes(path, data)
            outcome["result"] = "written"
        except StorageError as error:
            outcome["result"] = error
        outcome["seconds"] = time.monotonic() - started

    writer = threading.Thread(target=upload)
    client = s3_env.client(timeout=5)
    writer.start()
    try:
        deadline = time.monotonic() + 30
        while not client.list_multipart_uploads(Bucket=bucket).get("Uploads"):  # the upload has begun
            assert time.monotonic() < deadline and writer.is_alive(), "no multipart upload seen"
            time.sleep(0.005)
        if outage == "killed":
            s3_env.stop(graceful=False)
        else:
            s3_env.pause()
        writer.join(timeout=bound + 30)
        assert not writer.is_alive(), f"the write still hangs {bound + 30:.0f} s later"
    finally:
        if outage == "killed":
            s3_env.start()
        else:
            s3_env.resume()
    error = outcome["result"]
    assert isinstance(error, StorageError), error
    message = str(error)
    assert "\n" not in message and message.startswith(f"cannot write s3://{path}: "), message
    if outage == "paused":
        assert "no answer from" in message and "ALPHASPIN_S3_READ_TIMEOUT" in message, message
    assert outcome["seconds"] <= bound, (outcome["seconds"], bound)
    wait_readable(s3_env, bucket)
    assert not storage.exists(path)  # an upload never completed is no object: nothing half-written
    storage.write_bytes(path, data)  # the same write, the server back
    assert storage.read_bytes(path) == data


# -- a stage of `alphaspin run` with the server paused -------------------------------------------------
@pytest.mark.slow
def test_server_paused_during_a_stage_fails_in_bound_and_the_same_command_resumes(
    s3_env: SeaweedS3, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, tiny_model: str
) -> None:
    monkeypatch.setenv("ALPHASPIN_S3_CONNECT_TIMEOUT", "2")
    monkeypatch.setenv("ALPHASPIN_S3_READ_TIMEOUT", "4")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    bound = S3Limits.from_env().bound()
    bucket = new_bucket(s3_env)
    runs_root = f"s3://{bucket}/runs"
    argv = ["run", "-c", "configs/quickstart.yaml", "--no-prefect"]
    for override in tiny_overrides(tiny_model, runs_root):
        argv += ["--set", override]
    # iteration 0 only, without lm-eval (its record holds the machine's pretty_env_info): the shortest
    # run whose stages write what the recorded uninterrupted tiny run wrote (but for the model card,
    # which names the run's iterations: "0 of 0..1" there)
    argv += ["--set", "method.iterations=0", "--set", "evaluation.benchmarks=[]"]
    original = REGISTRY["build_pairs"].function
    paused: dict[str, float] = {}

    def build_pairs_while_paused(*args, **kwargs):
        s3_env.pause()
        paused["at"] = time.monotonic()
        return original(*args, **kwargs)

    monkeypatch.setitem(
        REGISTRY, "build_pairs", dataclasses.replace(REGISTRY["build_pairs"], function=build_pairs_while_paused)
    )
    try:
        code = main(argv)
        failed_after = time.monotonic() - paused["at"]
    finally:
        s3_env.resume()
    err = capsys.readouterr().err
    assert code != 0
    line = next(line for line in err.splitlines() if line.startswith("alphaspin: error:"))
    assert f"s3://{bucket}/runs/" in line and "no answer from" in line, err
    # the stage's read, the lease's release and the log's copy each give up within one bound
    assert failed_after <= 4 * bound, (failed_after, bound)

    storage = RunStorage(runs_root, "alphaspin-quickstart")
    folder = storage.stage(0, "build_pairs")
    assert not storage.exists(folder.file(MANIFEST))  # no manifest
    lease_path = storage.path(LEASES, "iter-0-build_pairs.json")
    if storage.exists(lease_path):  # left behind (storage was down at release): it must not block
        info = LeaseInfo.from_json(storage.read_json(lease_path))
        assert info.expires <= time.time() + 120 + 1 and info.pid == os.getpid()  # ttl; a leftover of ours

    monkeypatch.setitem(REGISTRY, "build_pairs", dataclasses.replace(REGISTRY["build_pairs"], function=original))
    assert main(argv) == 0, capsys.readouterr().err  # the same command, the server back
    assert folder.verify() is not None
    recorded = json.loads(GOLDEN.read_text())
    found = run_digests(storage)
    iteration_0 = {
        name: value
        for name, value in recorded["files"].items()
        if name.startswith("iter-0/")
        and "/benchmarks/lm_eval/" not in name
        and name != "iter-0/train/adapter/README.md"
    }
    found.pop("iter-0/train/adapter/README.md")
    assert sorted(found) == sorted(iteration_0)
    for name, expected in iteration_0.items():
        assert found[name]["values"] == expected["values"], name
    if recorded["cpu_kernels"] == cpu_kernels():  # same kernels: the very same bytes
        for name, expected in iteration_0.items():
            assert found[name]["sha256"] == expected["sha256"], name
