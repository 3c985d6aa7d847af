"""Run storage (alphaspin/storage.py) on a local folder, memory:// and a real SeaweedFS S3 server."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsspec
import pandas as pd
import pytest

from alphaspin.storage import (
    MANIFEST,
    SCRATCH,
    RunStorage,
    S3Limits,
    StageDir,
    StorageError,
    cache_key,
    storage_options_from_env,
)
from alphaspin.testing.s3server import SeaweedS3

BACKENDS = ["local", "memory", "s3"]


@pytest.fixture(params=BACKENDS)
def runs_root(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty runs root on each backend."""
    if request.param == "local":
        yield str(tmp_path / "runs")
    elif request.param == "memory":
        root = f"memory://test-{uuid.uuid4().hex[:12]}/runs"
        yield root
        fs, path = fsspec.core.url_to_fs(root)
        if fs.exists(path):
            fs.rm(path, recursive=True)
    else:
        yield request.getfixturevalue("s3_runs_root")


def open_run(runs_root: str, run_id: str = "run-1") -> RunStorage:
    """RunStorage as the pipeline builds it; on S3 without the s3fs instance cache (fresh client)."""
    if not runs_root.startswith("s3://"):
        return RunStorage(runs_root, run_id)
    options = storage_options_from_env(runs_root)
    assert options["use_listings_cache"] is False  # stale listings would break resume decisions
    return RunStorage(runs_root, run_id, storage_options={**options, "skip_instance_cache": True})


def filled_stage(storage: RunStorage, key: str = "k1") -> tuple[StageDir, Any]:
    stage = storage.stage(0, "generate")
    stage.write_bytes("raw.bin", bytes(range(256)) * 4)
    stage.write_json("meta.json", {"n": 3, "name": "ü"})
    stage.write_table("rows.parquet", pd.DataFrame({"prompt": ["a", "b"], "score": [0.5, 1.5]}))
    stage.write_bytes("shards/0/part.bin", b"zero")
    stage.write_bytes(f"{SCRATCH}/ckpt/state.bin", b"in progress")
    record = stage.commit("generate", 0, key, metrics={"rows": 2})
    return stage, record


# -- write, commit, verify ---------------------------------------------------------------------


def test_commit_then_verify_returns_the_record(runs_root: str) -> None:
    storage = open_run(runs_root)
    stage, record = filled_stage(storage)

    assert stage.verify("k1") == record
    assert stage.verify() == record
    assert stage.verify("k1", check_hashes=False) == record
    assert (record.stage, record.iteration, record.cache_key, record.metrics) == ("generate", 0, "k1", {"rows": 2})
    assert record.url == stage.url and stage.url.startswith(storage.url)
    if runs_root.startswith("s3://"):
        assert storage.url == f"{runs_root}/run-1"
    assert fsspec.core.url_to_fs(stage.url)[1] == stage.path  # the recorded URL opens the stage again

    manifest = stage.read_json(MANIFEST)
    assert sorted(manifest["files"]) == ["meta.json", "raw.bin", "rows.parquet", "shards/0/part.bin"]
    assert manifest["files"]["raw.bin"]["size"] == 1024
    assert not any(name.startswith(SCRATCH) for name in stage.list_files())  # commit clears scratch
    assert stage.read_json("meta.json") == {"n": 3, "name": "ü"}
    assert stage.read_table("rows.parquet")["score"].tolist() == [0.5, 1.5]
    # same files and key -> same digest; another key -> another digest
    again = open_run(runs_root).stage(0, "generate").verify("k1")
    assert again is not None and again.digest == record.digest
    assert stage.commit("generate", 0, "k2").digest != record.digest
    assert stage.commit("generate", 0, "k1").digest != record.digest  # every execution is new downstream


def test_stage_without_manifest_is_not_done(runs_root: str) -> None:
    stage = open_run(runs_root).stage(1, "train")
    assert stage.verify() is None
    stage.write_bytes("adapter.bin", b"weights")
    assert stage.verify() is None  # files alone never count as done


def _truncate(stage: StageDir) -> None:
    stage.storage.write_bytes(stage.file("raw.bin"), (bytes(range(256)) * 4)[:-1])


def _flip_byte(stage: StageDir) -> None:  # same size, other content: only the sha256 tells
    stage.storage.write_bytes(stage.file("raw.bin"), b"\xff" + (bytes(range(256)) * 4)[1:])


def _remove_file(stage: StageDir) -> None:
    stage.storage.remove(stage.file("shards/0/part.bin"))


def _garbage_manifest(stage: StageDir) -> None:
    stage.write_bytes(MANIFEST, b"\x00\xffnot json")


def _truncated_manifest(stage: StageDir) -> None:
    stage.write_bytes(MANIFEST, stage.read_bytes(MANIFEST)[:40])


def _malformed_manifest(stage: StageDir) -> None:
    manifest = stage.read_json(MANIFEST)
    manifest["files"]["raw.bin"] = {"bytes": 1}
    stage.write_json(MANIFEST, manifest)


def _future_manifest_version(stage: StageDir) -> None:
    stage.write_json(MANIFEST, {**stage.read_json(MANIFEST), "version": 99})


@pytest.mark.parametrize(
    "damage",
    [
        _truncate,
        _flip_byte,
        _remove_file,
        _garbage_manifest,
        _truncated_manifest,
        _malformed_manifest,
        _future_manifest_version,
    ],
    ids=lambda f: f.__name__.lstrip("_"),
)
def test_damaged_stage_does_not_verify(runs_root: str, damage: Any) -> None:
    stage, _ = filled_stage(open_run(runs_root))
    damage(stage)
    assert stage.verify("k1") is None
    if damage is not _flip_byte:  # a same-size change is only caught by the hashes
        assert stage.verify("k1", check_hashes=False) is None


def test_wrong_expected_key_does_not_verify(runs_root: str) -> None:
    stage, _ = filled_stage(open_run(runs_root), key="k1")
    assert stage.verify("k2") is None
    assert stage.verify("k1") is not None


# -- reset, remove, listing --------------------------------------------------------------------


def test_reset_removes_the_manifest_first(runs_root: str, monkeypatch: pytest.MonkeyPatch) -> None:
    storage = open_run(runs_root)
    stage, _ = filled_stage(storage)
    removed: list[str] = []
    real_remove = storage.remove

    def crash_after_first(path: str, recursive: bool = False) -> None:
        removed.append(path)
        real_remove(path, recursive)
        raise KeyboardInterrupt("killed mid-reset")

    stage.write_bytes(f"{SCRATCH}/ckpt/state.bin", b"resume from here")  # a re-run's checkpoint
    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(storage, "remove", crash_after_first)
        stage.reset()
    assert removed == [stage.file(MANIFEST)]
    assert stage.verify() is None  # a crash mid-reset leaves a not-done stage, never a stale done one
    assert "raw.bin" in stage.list_files()

    stage.reset()
    assert stage.list_files() == [f"{SCRATCH}/ckpt/state.bin"]  # scratch kept for resuming
    stage.reset(keep_scratch=False)
    assert stage.list_files() == []
    # the emptied folder (which SeaweedFS keeps listing for minutes) behaves as empty
    stage.write_bytes("new.bin", b"new")
    stage.commit("generate", 0, "k3")
    assert list(stage.read_json(MANIFEST)["files"]) == ["new.bin"]
    assert stage.verify("k3") is not None


def test_clear_scratch_and_recursive_remove(runs_root: str) -> None:
    storage = open_run(runs_root)
    stage, _ = filled_stage(storage)
    stage.write_bytes(f"{SCRATCH}/ckpt/state.bin", b"x")
    stage.write_bytes(f"{SCRATCH}/ckpt/deeper/more.bin", b"x")
    stage.write_bytes(f"{SCRATCH}2/keep.bin", b"sibling prefix")  # must survive removing _scratch
    stage.clear_scratch()
    assert [n for n in stage.list_files() if n.startswith(SCRATCH)] == [f"{SCRATCH}2/keep.bin"]
    assert stage.verify("k1") is not None
    stage.clear_scratch()  # removing what is already gone is fine

    storage.remove(stage.file("raw.bin"), recursive=True)  # a plain file, recursive or not
    assert "raw.bin" not in stage.list_files()
    storage.remove(stage.path, recursive=True)
    assert stage.list_files() == [] and stage.verify() is None
    with pytest.raises(FileNotFoundError):
        stage.get_dir("shards", Path("unused"))


def test_list_files(runs_root: str) -> None:
    stage = open_run(runs_root).stage(2, "build_pairs")
    assert stage.list_files() == []
    assert stage.list_files("shards") == []
    for name in ["b.bin", "a/x.bin", "shards/0.parquet", "shards/1.parquet", "shards2/other.parquet"]:
        stage.write_bytes(name, b"1")
    # what a crash between write and rename leaves on local disk; never listed, never committed
    stage.storage.write_bytes(stage.file("c.bin.tmp-" + uuid.uuid4().hex), b"half")
    stage.storage.write_bytes(stage.file("shards/2.parquet.tmp-" + uuid.uuid4().hex), b"half")
    assert stage.list_files() == ["a/x.bin", "b.bin", "shards/0.parquet", "shards/1.parquet", "shards2/other.parquet"]
    assert stage.list_files("shards") == ["shards/0.parquet", "shards/1.parquet"]  # names stay stage-relative
    assert stage.list_files("shards/") == ["shards/0.parquet", "shards/1.parquet"]
    stage.commit("build_pairs", 2, "k")
    assert not any(".tmp-" in name for name in stage.read_json(MANIFEST)["files"])
    assert MANIFEST in stage.list_files()


def test_put_dir_get_dir_round_trip(runs_root: str, tmp_path: Path) -> None:
    source = tmp_path / "adapter"
    files = {
        "adapter_config.json": b'{"r": 16}',
        "adapter_model.safetensors": bytes(range(256)) * 64,
        "tokenizer/vocab.json": b"{}",
        "tokenizer/sub/deep/merges.txt": b"a b\n",
        "empty.txt": b"",
    }
    for rel, data in files.items():
        (source / rel).parent.mkdir(parents=True, exist_ok=True)
        (source / rel).write_bytes(data)
    stage = open_run(runs_root).stage(0, "train")
    stage.put_dir(source, "adapter")
    stage.write_bytes("adapter2/not-mine.bin", b"sibling")  # shares the name prefix "adapter"

    assert stage.list_files("adapter") == sorted(f"adapter/{rel}" for rel in files)
    target = stage.get_dir("adapter", tmp_path / "download")
    got = {p.relative_to(target).as_posix(): p.read_bytes() for p in target.rglob("*") if p.is_file()}
    assert got == files
    with pytest.raises(FileNotFoundError):
        stage.get_dir("nothing-here", tmp_path / "none")


def test_runs_never_see_each_other(runs_root: str) -> None:
    run_a, run_b = open_run(runs_root, "exp"), open_run(runs_root, "exp-2")  # one id prefixes the other
    stage_a, record_a = filled_stage(run_a, key="ka")
    stage_b = run_b.stage(0, "generate")
    assert stage_b.list_files() == [] and stage_b.verify() is None
    stage_b.write_bytes("only-b.bin", b"b")
    record_b = stage_b.commit("generate", 0, "kb")
    assert "only-b.bin" not in stage_a.list_files()
    assert stage_b.list_files() == [MANIFEST, "only-b.bin"]
    assert record_a.url != record_b.url
    run_a.remove(run_a.root, recursive=True)
    assert stage_a.verify() is None
    assert stage_b.verify("kb") == record_b


def test_adopt_copies_a_verified_stage_from_another_run(runs_root: str) -> None:
    parent, child = open_run(runs_root, "parent"), open_run(runs_root, "child")
    source, record = filled_stage(parent, key="k1")
    target = child.stage(0, "generate")
    assert target.adopt(source, "other-key") is None and target.list_files() == []
    adopted = target.adopt(source, "k1")
    assert adopted is not None and adopted.digest == record.digest  # downstream can be adopted too
    assert adopted.url == target.url and adopted.metrics["adopted_from"] == source.url
    assert target.verify("k1") == adopted
    assert target.read_bytes("raw.bin") == source.read_bytes("raw.bin")
    assert source.verify("k1") == record  # the source is only read


def test_run_json_helpers(runs_root: str) -> None:
    storage = open_run(runs_root)
    path = storage.path("run.json")
    assert not storage.exists(path)
    storage.write_json(path, {"run_id": "run-1"})
    assert storage.exists(path) and storage.read_json(path) == {"run_id": "run-1"}
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(storage.path("missing.json"))


# -- cache keys ---------------------------------------------------------------------------------


def test_cache_key_changes_with_every_part() -> None:
    base = cache_key("train", 1, {"beta": 0.1, "lr": 1e-5}, ["digest-a", "digest-b"])
    assert len(base) == 32 and int(base, 16) >= 0
    assert cache_key("train", 1, {"lr": 1e-5, "beta": 0.1}, ["digest-a", "digest-b"]) == base  # field order
    variants = [
        cache_key("evaluate", 1, {"beta": 0.1, "lr": 1e-5}, ["digest-a", "digest-b"]),  # stage
        cache_key("train", 2, {"beta": 0.1, "lr": 1e-5}, ["digest-a", "digest-b"]),  # code version
        cache_key("train", 1, {"beta": 0.2, "lr": 1e-5}, ["digest-a", "digest-b"]),  # a field's value
        cache_key("train", 1, {"beta": 0.1, "lr": 1e-5, "seed": 0}, ["digest-a", "digest-b"]),  # a new field
        cache_key("train", 1, {"beta": 0.1}, ["digest-a", "digest-b"]),  # a field dropped
        cache_key("train", 1, {"beta": 0.1, "lr": 1e-5}, ["digest-a", "digest-c"]),  # an upstream output
        cache_key("train", 1, {"beta": 0.1, "lr": 1e-5}, ["digest-a"]),  # an input dropped
        cache_key("train", 1, {"beta": 0.1, "lr": 1e-5}, ["digest-b", "digest-a"]),  # input order
        cache_key("train", 1, {"beta": 0.1, "lr": {"nested": 1e-5}}, ["digest-a", "digest-b"]),
    ]
    assert base not in variants and len(set(variants)) == len(variants)


# -- S3 specifics -------------------------------------------------------------------------------


def test_s3_wrong_credentials_raise_storage_error(s3_runs_root: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    storage = open_run(s3_runs_root)
    with pytest.raises(StorageError, match=f"{s3_runs_root}/run-1/x.bin"):
        storage.write_bytes(storage.path("x.bin"), b"x")


def test_s3_outage_then_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """S3 goes away mid-run: every call names the URL in a StorageError; once it is back, the same
    RunStorage object reads the data written before (the server keeps it across the restart)."""
    with SeaweedS3() as server:  # its own server: stopping the session's one would hit other tests
        for name, value in server.env().items():
            monkeypatch.setenv(name, value)
        runs_root = f"s3://{server.make_bucket('outage')}/runs"
        options = storage_options_from_env(runs_root)
        options["config_kwargs"] = {**options["config_kwargs"], "retries": {"max_attempts": 1}}
        storage = RunStorage(runs_root, "run-1", {**options, "skip_instance_cache": True})
        assert storage.fs.retries == 1  # s3fs's own retry loop is off: botocore's attempts only
        stage, record = filled_stage(storage)

        server.stop()
        url = f"{runs_root}/run-1/iter-0/generate"
        with pytest.raises(StorageError, match=f"{url}/{MANIFEST}"):
            stage.verify("k1")
        with pytest.raises(StorageError, match=f"{url}/new.bin"):
            stage.write_bytes("new.bin", b"x")
        with pytest.raises(StorageError, match=url):
            stage.list_files()

        server.restart()
        assert server.endpoint_url == options["endpoint_url"]  # same ports: clients need no change
        deadline = time.monotonic() + 60  # the first read after a restart can take several seconds
        while True:
            try:
                assert stage.verify("k1") == record
                break
            except StorageError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        assert stage.read_json("meta.json") == {"n": 3, "name": "ü"}
        stage.write_bytes("new.bin", b"x")
        assert "new.bin" in stage.list_files()


def test_s3_limits_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("ALPHASPIN_S3_CONNECT_TIMEOUT", "ALPHASPIN_S3_READ_TIMEOUT", "AWS_MAX_ATTEMPTS"):
        monkeypatch.delenv(name, raising=False)
    limits = S3Limits.from_env()
    assert (limits.connect_timeout, limits.read_timeout, limits.attempts) == (5.0, 30.0, 3)
    # 3 attempts of (5 + 30 + 2 MiB at 1 MiB/s) s, back-off of at most 1 + 2 s between them
    assert limits.deadline(2 * 2**20) == 3 * 37 + 3 and limits.bound() == 3 * 35 + 3 + 1
    options = storage_options_from_env("s3://bucket/runs")["config_kwargs"]
    assert options["retries"] == {"max_attempts": 3, "mode": "standard"} and options["read_timeout"] == 30.0
    monkeypatch.setenv("ALPHASPIN_S3_READ_TIMEOUT", "2.5")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    assert S3Limits.from_env() == S3Limits(connect_timeout=5.0, read_timeout=2.5, attempts=1)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "0")
    with pytest.raises(StorageError, match=r"AWS_MAX_ATTEMPTS='0': expected a positive number"):
        storage_options_from_env("s3://bucket/runs")
    assert storage_options_from_env("/local/runs") == {}  # not S3: no limits read


def test_s3_conditional_put_and_delete(s3_runs_root: str) -> None:
    storage = open_run(s3_runs_root)
    path = storage.path("_leases", "x.json")
    first = storage.put_if(path, b"one", None)
    assert first is not None and storage.read_tagged(path) == (b"one", first)
    assert storage.put_if(path, b"two", None) is None  # exists: If-None-Match refused
    assert storage.put_if(path, b"two", '"0123"') is None  # another version: If-Match refused
    second = storage.put_if(path, b"two", first)
    assert second is not None and second != first and storage.read_bytes(path) == b"two"
    assert storage.delete_if(path, first) is False and storage.exists(path)  # stale ETag: kept
    assert storage.delete_if(path, second) is True and not storage.exists(path)
    assert storage.put_if(storage.path("_leases", "absent.json"), b"x", second) is None  # If-Match on nothing
    with pytest.raises(FileNotFoundError):
        storage.read_tagged(path)
    assert storage.conditional_writes() is True
