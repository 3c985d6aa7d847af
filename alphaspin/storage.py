"""Run storage on any fsspec filesystem: a local folder, memory://, or s3://bucket/prefix.

Layout (DESIGN.md)::

    <runs_root>/<run_id>/run.json
    <runs_root>/<run_id>/iter-<t>/<stage>/...            the stage's files
    <runs_root>/<run_id>/iter-<t>/<stage>/_MANIFEST.json  written last

A stage is complete if and only if its manifest exists, parses, carries the expected cache key,
and every file it lists exists with the recorded size and sha256. Files are written first and
the manifest last, each in one atomic step (a rename on local disk, a single PUT on S3), so a
crash leaves an incomplete stage that simply runs again — never a half-written artifact that
looks done. A stage that must run again first removes its manifest, then its old files.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import posixpath
import re
import threading
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import pandas as pd

logger = logging.getLogger(__name__)

MANIFEST = "_MANIFEST.json"
MANIFEST_VERSION = 1
SCRATCH = "_scratch"  # checkpoints and other in-progress files, never listed in a manifest


class StorageError(RuntimeError):
    """Storage could not be read or written; names the URL."""


def _backend_errors() -> tuple[type[BaseException], ...]:
    # s3fs turns S3 error *responses* into OSError, but an unreachable endpoint surfaces as
    # botocore's EndpointConnectionError / ReadTimeoutError (BotoCoreError, not OSError): without
    # this, "S3 is down" escaped as a raw botocore exception instead of a StorageError.
    errors: list[type[BaseException]] = [OSError]
    try:
        from botocore.exceptions import BotoCoreError
    except ImportError:  # no S3 support installed
        pass
    else:
        errors.append(BotoCoreError)
    return tuple(errors)


_BACKEND_ERRORS = _backend_errors()


def _client_errors() -> tuple[type[BaseException], ...]:
    try:
        from botocore.exceptions import ClientError
    except ImportError:
        return ()
    return (ClientError,)


_CLIENT_ERRORS = _client_errors()


def _timeout_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [TimeoutError]  # fsspec's FSTimeoutError: the deadline passed
    try:
        from botocore.exceptions import ConnectTimeoutError, ReadTimeoutError
    except ImportError:
        pass
    else:
        errors += [ConnectTimeoutError, ReadTimeoutError]  # every attempt timed out
    return tuple(errors)


_TIMEOUT_ERRORS = _timeout_errors()


def _status(error: BaseException) -> int | None:
    """The HTTP status of a botocore ClientError (None if there is none)."""
    response = getattr(error, "response", None) or {}
    return response.get("ResponseMetadata", {}).get("HTTPStatusCode")


# Endpoint and bucket -> whether the server honours conditional writes (probed once per process).
_PROBED: dict[tuple[str, str], bool] = {}
_PROBE_LOCK = threading.Lock()
# What write_bytes leaves behind on local disk when it dies between write and rename.
_TMP_SUFFIX = re.compile(r"\.tmp-[0-9a-f]{32}$")


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def cache_key(stage: str, version: int, fields: dict[str, Any], inputs: Iterable[str]) -> str:
    """Key of one stage's output: hash of (stage name, stage code version, the config fields the
    stage reads, the digests of its input manifests). Equal keys mean equal outputs."""
    payload = {"stage": stage, "version": version, "fields": fields, "inputs": list(inputs)}
    return sha256_bytes(canonical_json(payload).encode())[:32]


# -- S3 client limits --------------------------------------------------------------------------
# botocore's defaults (legacy retry mode: 5 attempts) under s3fs's own retry loop (5 more rounds of
# those, with back-off) and a 60 s read timeout meant that a paused server (SIGSTOP: it accepts
# connections and never answers) hung a stage for about 25 minutes. Every S3 request of a run now
# fails within a bound set by these three variables (read when a storage is opened):
S3_LIMITS = {
    "ALPHASPIN_S3_CONNECT_TIMEOUT": 5.0,  # seconds to open a TCP connection to the endpoint
    "ALPHASPIN_S3_READ_TIMEOUT": 30.0,  # seconds without a byte of the answer, per attempt
    "AWS_MAX_ATTEMPTS": 3,  # attempts per request (botocore's standard retry mode), first included
}
# A single request's total is also bounded (a stalled upload blocks in a socket write, which no read
# timeout covers): attempts x (connect + read + size / this throughput), at least.
MIN_THROUGHPUT = 1 << 20  # bytes per second assumed at worst for an upload or a download


@dataclass(frozen=True)
class S3Limits:
    """Connect/read timeouts and attempts of the S3 client (see S3_LIMITS)."""

    connect_timeout: float
    read_timeout: float
    attempts: int

    @classmethod
    def from_env(cls) -> S3Limits:
        values: dict[str, float] = {}
        for name, default in S3_LIMITS.items():
            raw = os.environ.get(name, "").strip()
            if not raw:
                values[name] = default
                continue
            try:
                value = float(raw) if name != "AWS_MAX_ATTEMPTS" else int(raw)
            except ValueError:
                value = -1
            if value <= 0:
                raise StorageError(f"environment variable {name}={raw!r}: expected a positive number")
            values[name] = value
        return cls(
            connect_timeout=float(values["ALPHASPIN_S3_CONNECT_TIMEOUT"]),
            read_timeout=float(values["ALPHASPIN_S3_READ_TIMEOUT"]),
            attempts=int(values["AWS_MAX_ATTEMPTS"]),
        )

    def deadline(self, size: int = 0) -> float:
        """Seconds one request of ``size`` bytes may take, all attempts: then it is cancelled."""
        per_attempt = self.connect_timeout + self.read_timeout + size / MIN_THROUGHPUT
        # botocore's standard mode sleeps at most 2 ** attempt seconds (random) between attempts
        backoff = sum(min(2.0**attempt, 20.0) for attempt in range(self.attempts - 1))
        return self.attempts * per_attempt + backoff

    def bound(self, size: int = 0) -> float:
        """Seconds after which one request of ``size`` bytes has surely failed: its deadline, plus 1 s
        for fsspec's event loop to hand the cancellation back."""
        return self.deadline(size) + 1.0

    def describe(self) -> str:
        return (
            f"connect timeout {self.connect_timeout:g} s, read timeout {self.read_timeout:g} s, "
            f"{self.attempts} attempt(s) (ALPHASPIN_S3_CONNECT_TIMEOUT, ALPHASPIN_S3_READ_TIMEOUT, AWS_MAX_ATTEMPTS)"
        )

    def config_kwargs(self) -> dict[str, Any]:
        return {
            "connect_timeout": self.connect_timeout,
            "read_timeout": self.read_timeout,
            "retries": {"max_attempts": self.attempts, "mode": "standard"},
        }


def storage_options_from_env(url: str) -> dict[str, Any]:
    """s3fs options from the standard AWS environment (endpoint, path-style addressing) and S3_LIMITS."""
    if not url.startswith(("s3://", "s3a://")):
        return {}
    limits = S3Limits.from_env()
    options: dict[str, Any] = {
        "config_kwargs": {"s3": {"addressing_style": "path"}, **limits.config_kwargs()},
        # A cached listing is stale the moment another process (a retried task, a worker on another
        # machine) writes or deletes a stage's files; resume logic must always see the store.
        "use_listings_cache": False,
    }
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        options["endpoint_url"] = endpoint
    return options


class RunStorage:
    """The storage of one run: ``<runs_root>/<run_id>``."""

    def __init__(self, runs_root: str, run_id: str, storage_options: dict[str, Any] | None = None):
        options = storage_options if storage_options is not None else storage_options_from_env(runs_root)
        if "://" not in runs_root:
            runs_root = str(Path(runs_root).expanduser().resolve())
        self.runs_root = runs_root
        self.run_id = run_id
        self.fs, root = fsspec.core.url_to_fs(runs_root, **options)
        self.root = posixpath.join(root.rstrip("/"), run_id)
        self.protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        self.limits: S3Limits | None = None
        if self.is_s3:
            config = options.get("config_kwargs", {})
            env = S3Limits.from_env()
            self.limits = S3Limits(
                connect_timeout=float(config.get("connect_timeout", env.connect_timeout)),
                read_timeout=float(config.get("read_timeout", env.read_timeout)),
                attempts=int(config.get("retries", {}).get("max_attempts", env.attempts)),
            )
            # botocore retries each request (standard mode, ``attempts``); s3fs's own loop of 5 rounds
            # around that is what made an outage hang for many minutes, so it runs once.
            self.fs.retries = 1

    @property
    def is_s3(self) -> bool:
        return self.protocol in ("s3", "s3a")

    @property
    def url(self) -> str:
        return self.unstrip(self.root)

    @property
    def endpoint(self) -> str:
        """Where the bytes live, for messages: the S3 endpoint (or AWS), else the protocol."""
        if self.is_s3:
            return getattr(self.fs, "endpoint_url", None) or "AWS S3"
        return self.protocol

    def unstrip(self, path: str) -> str:
        return path if self.protocol in ("file", "local") else self.fs.unstrip_protocol(path)

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def stage(self, iteration: int | None, name: str) -> StageDir:
        rel = name if iteration is None else posixpath.join(f"iter-{iteration}", name)
        return StageDir(self, self.path(rel))

    def _bounded(self, size: int = 0) -> dict[str, Any]:
        """``timeout=`` for one s3fs call (fsspec's sync cancels the request past it); {} elsewhere."""
        return {"timeout": self.limits.deadline(size)} if self.limits is not None else {}

    def _error(self, verb: str, path: str, error: BaseException) -> StorageError:
        if isinstance(error, _TIMEOUT_ERRORS) and self.limits is not None:
            detail = f"no answer from {self.endpoint} within the limits ({self.limits.describe()})"
        else:
            detail = f"{type(error).__name__}: {error}" if not str(error) else str(error)
        return StorageError(f"cannot {verb} {self.unstrip(path)}: {detail}")

    # -- small whole files ------------------------------------------------------------------
    def write_bytes(self, path: str, data: bytes) -> None:
        """Write ``data`` to ``path`` in one atomic step (on S3 one PUT, or one multipart upload
        that is completed only once every part is stored: the object appears whole or not at all)."""
        try:
            if self.protocol in ("file", "local"):
                self.fs.makedirs(posixpath.dirname(path), exist_ok=True)
                tmp = f"{path}.tmp-{uuid.uuid4().hex}"
                with open(tmp, "wb") as handle:
                    handle.write(data)
                    handle.flush()
                    os.fsync(handle.fileno())
                os.replace(tmp, path)
            elif self.is_s3:
                self.fs.pipe_file(path, data, chunksize=self.multipart_chunksize, **self._bounded(len(data)))
            else:
                self.fs.pipe_file(path, data)
        except _BACKEND_ERRORS as error:
            raise self._error("write", path, error) from error

    # Files of at least twice this size go up as a multipart upload of parts of this size (s3fs's
    # rule); S3 needs parts of 5 MiB at least.
    multipart_chunksize = 50 * 2**20

    def read_bytes(self, path: str) -> bytes:
        try:
            # no overall deadline: a download of any size may take its time; a server that stops
            # answering mid-body is ended by the read timeout (it covers every wait for bytes)
            return self.fs.cat_file(path)
        except FileNotFoundError:
            raise
        except _BACKEND_ERRORS as error:
            raise self._error("read", path, error) from error

    def exists(self, path: str) -> bool:
        try:
            return self.fs.exists(path, **self._bounded())
        except _BACKEND_ERRORS as error:
            raise self._error("reach", path, error) from error

    def read_json(self, path: str) -> Any:
        return json.loads(self.read_bytes(path))

    def write_json(self, path: str, value: Any) -> None:
        self.write_bytes(path, json.dumps(value, indent=2, sort_keys=True, default=str).encode())

    # -- conditional writes (S3) --------------------------------------------------------------
    def _s3(self, method: str, timeout_size: int = 0, **kwargs: Any) -> Any:
        """One request of the s3fs client (its timeouts and retries), without s3fs's error mapping."""
        from fsspec.asyn import sync

        async def call() -> Any:
            await self.fs.set_session()
            client = await self.fs.get_s3(kwargs.get("Bucket"))
            response = await getattr(client, method)(**kwargs)
            if "Body" in response:  # read it inside the bound, then close the stream
                try:
                    response["Data"] = await response["Body"].read()
                finally:
                    response["Body"].close()
            return response

        return sync(self.fs.loop, call, timeout=self.limits.deadline(timeout_size) if self.limits else None)

    def read_tagged(self, path: str) -> tuple[bytes, str]:
        """(content, ETag) of the object at ``path``, fresh from the server (no cache is involved);
        FileNotFoundError if absent. S3 only."""
        bucket, key, _ = self.fs.split_path(path)
        try:
            response = self._s3("get_object", Bucket=bucket, Key=key)
        except _CLIENT_ERRORS as error:
            if _status(error) == 404:
                raise FileNotFoundError(self.unstrip(path)) from error
            raise self._error("read", path, error) from error
        except _BACKEND_ERRORS as error:
            raise self._error("read", path, error) from error
        return response["Data"], response["ETag"]

    def put_if(self, path: str, data: bytes, match: str | None) -> str | None:
        """Write ``path`` only if absent (``match`` None: If-None-Match: *) or only if its ETag is still
        ``match`` (If-Match): the new ETag, or None if the condition failed (HTTP 412; also 409, a
        concurrent conditional write in progress). S3 only; honoured only where `conditional_writes`."""
        bucket, key, _ = self.fs.split_path(path)
        condition = {"IfNoneMatch": "*"} if match is None else {"IfMatch": match}
        try:
            response = self._s3("put_object", len(data), Bucket=bucket, Key=key, Body=data, **condition)
        except _CLIENT_ERRORS as error:
            if _status(error) in (409, 412) or (match is not None and _status(error) == 404):
                return None
            raise self._error("write", path, error) from error
        except _BACKEND_ERRORS as error:
            raise self._error("write", path, error) from error
        return response["ETag"]

    def delete_if(self, path: str, match: str) -> bool:
        """Delete ``path`` only if its ETag is still ``match``: True if deleted (or already absent),
        False if it changed (412). S3 only."""
        bucket, key, _ = self.fs.split_path(path)
        try:
            self._s3("delete_object", Bucket=bucket, Key=key, IfMatch=match)
        except _CLIENT_ERRORS as error:
            if _status(error) == 404:
                return True
            if _status(error) in (409, 412):
                return False
            raise self._error("delete", path, error) from error
        except _BACKEND_ERRORS as error:
            raise self._error("delete", path, error) from error
        return True

    def conditional_writes(self) -> bool:
        """Whether this storage's server honours If-None-Match: * and If-Match on PUT and If-Match on
        DELETE. Probed once per endpoint and bucket in a process (a scratch object under
        ``<run>/_leases/``): an object created twice must fail the second time, and a PUT or a DELETE
        with a wrong ETag must fail and leave the object as it was. A server that ignores the headers
        (it overwrites, or deletes) is never trusted with them. Local and other filesystems: False."""
        if not self.is_s3:
            return False
        bucket = self.fs.split_path(self.root)[0]
        key = (self.endpoint, bucket)
        with _PROBE_LOCK:
            if key not in _PROBED:
                _PROBED[key] = self._probe()
                logger.info(
                    "storage %s (%s): conditional writes %s",
                    self.unstrip(bucket),
                    self.endpoint,
                    "honoured: leases use If-None-Match/If-Match"
                    if _PROBED[key]
                    else "NOT honoured: leases fall back to write, settle, read back",
                )
            return _PROBED[key]

    def _probe(self) -> bool:
        path = self.path("_leases", f".probe-{uuid.uuid4().hex}")
        first, wrong = b"probe-1", '"00000000000000000000000000000000"'
        tag = None
        try:
            tag = self.put_if(path, first, None)
            honoured = (
                tag is not None
                and self.put_if(path, b"probe-2", None) is None  # create-only-if-absent refused
                and self.put_if(path, b"probe-3", wrong) is None  # replace-if-match refused
                and self.delete_if(path, wrong) is False  # delete-if-match refused
                and self.read_tagged(path) == (first, tag)  # and none of them changed the object
            )
            if honoured:
                tag2 = self.put_if(path, b"probe-4", tag)  # the right ETag: replaced
                honoured = tag2 is not None and self.delete_if(path, tag2) and not self.exists(path)
            return bool(honoured)
        except StorageError as error:
            if isinstance(error.__cause__, _CLIENT_ERRORS):  # it answered, refusing the headers (400, 501)
                logger.info("storage %s refused a conditional request: %s", self.endpoint, error)
                return False
            raise  # no answer: decide nothing now (an outage must not disable conditional writes)
        finally:
            try:
                self.remove(path)
            except StorageError as error:
                logger.warning("could not remove the probe object %s: %s", self.unstrip(path), error)

    def find_files(self, path: str) -> list[str]:
        """Paths (as the filesystem spells them) of the files under the folder ``path``, sorted.

        Only real files strictly below ``path/``: s3fs ``find`` returns the prefix itself as a
        "directory" entry when it holds no objects but the server still lists it (SeaweedFS keeps
        an emptied prefix listed for minutes), and a bare S3 prefix listing would also match
        siblings such as ``path2/``. Both used to leak into list_files, get_dir and remove.
        """
        base = path.rstrip("/").lstrip("/") + "/"
        try:
            found = self.fs.find(path, detail=True, **self._bounded())
        except FileNotFoundError:
            return []
        except _BACKEND_ERRORS as error:
            raise self._error("list", path, error) from error
        return sorted(
            name for name, info in found.items() if info.get("type") == "file" and name.lstrip("/").startswith(base)
        )

    def remove(self, path: str, recursive: bool = False) -> None:
        try:
            if recursive:
                # file by file (an S3 "folder" is only a prefix; an emptied one may stay listed
                # for a while, which is harmless as nothing decides by a prefix existing)
                for found in reversed(self.find_files(path)):
                    try:
                        self.fs.rm_file(found, **self._bounded())
                    except FileNotFoundError:  # already gone: keep removing the rest
                        pass
                if self.protocol in ("file", "local") and os.path.isdir(path):
                    self.fs.rm(path, recursive=True)
                elif self.fs.isfile(path, **self._bounded()):
                    self.fs.rm_file(path, **self._bounded())
            elif self.fs.exists(path, **self._bounded()):
                self.fs.rm_file(path, **self._bounded())
        except FileNotFoundError:
            pass
        except _BACKEND_ERRORS as error:
            raise self._error("delete", path, error) from error


@dataclass(frozen=True)
class StageRecord:
    """What a finished stage hands downstream: where it is and what it holds (small, picklable)."""

    stage: str
    iteration: int | None
    url: str
    cache_key: str
    digest: str
    metrics: dict[str, Any]


class StageDir:
    """One stage's folder: files, then a manifest."""

    def __init__(self, storage: RunStorage, path: str):
        self.storage = storage
        self.path = path

    @property
    def url(self) -> str:
        return self.storage.unstrip(self.path)

    def file(self, name: str) -> str:
        return posixpath.join(self.path, name)

    # -- writing ----------------------------------------------------------------------------
    def write_bytes(self, name: str, data: bytes) -> None:
        self.storage.write_bytes(self.file(name), data)

    def write_json(self, name: str, value: Any) -> None:
        self.storage.write_json(self.file(name), value)

    def write_table(self, name: str, frame: pd.DataFrame) -> None:
        buffer = io.BytesIO()
        frame.to_parquet(buffer, index=False)
        self.write_bytes(name, buffer.getvalue())

    def put_dir(self, local_dir: str | Path, name: str) -> None:
        """Upload a local folder (an adapter, a checkpoint) file by file, each atomically."""
        local_dir = Path(local_dir)
        for local in sorted(p for p in local_dir.rglob("*") if p.is_file()):
            rel = local.relative_to(local_dir).as_posix()
            self.write_bytes(posixpath.join(name, rel), local.read_bytes())

    # -- reading ----------------------------------------------------------------------------
    def read_bytes(self, name: str) -> bytes:
        return self.storage.read_bytes(self.file(name))

    def read_json(self, name: str) -> Any:
        return json.loads(self.read_bytes(name))

    def read_table(self, name: str) -> pd.DataFrame:
        return pd.read_parquet(io.BytesIO(self.read_bytes(name)))

    def get_dir(self, name: str, local_dir: str | Path) -> Path:
        """Download the folder ``name`` of this stage into ``local_dir``."""
        local_dir = Path(local_dir)
        prefix = self.file(name).rstrip("/") + "/"
        found = self.storage.find_files(prefix)
        if not found:
            raise FileNotFoundError(f"{self.storage.unstrip(prefix)} holds no files")
        for remote in found:
            rel = remote.lstrip("/")[len(prefix.lstrip("/")) :]
            target = local_dir / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(self.storage.read_bytes(remote))
        return local_dir

    def list_files(self, under: str = "") -> list[str]:
        """Names (relative to the stage) of the files under ``under``, sorted."""
        base = self.path.rstrip("/").lstrip("/") + "/"
        start = posixpath.join(self.path, under) if under else self.path
        names = [path.lstrip("/")[len(base) :] for path in self.storage.find_files(start)]
        return sorted(n for n in names if not _TMP_SUFFIX.search(n))

    # -- manifest ---------------------------------------------------------------------------
    def read_manifest(self) -> dict[str, Any] | None:
        try:
            manifest = json.loads(self.read_bytes(MANIFEST))
        except FileNotFoundError:
            return None
        except (ValueError, UnicodeDecodeError):
            logger.warning("manifest of %s does not parse; the stage counts as not done", self.url)
            return None
        return manifest if isinstance(manifest, dict) and manifest.get("version") == MANIFEST_VERSION else None

    def verify(
        self, expected_key: str | None = None, check_hashes: bool = True, manifest: dict[str, Any] | None = None
    ) -> StageRecord | None:
        """The stage's record if its manifest verifies (and carries ``expected_key``), else None.
        ``manifest``: the manifest already read by the caller (it is read otherwise)."""
        manifest = manifest if manifest is not None else self.read_manifest()
        if manifest is None:
            return None
        if expected_key is not None and manifest.get("cache_key") != expected_key:
            return None
        try:
            for name, entry in manifest["files"].items():
                path = self.file(name)
                if not self.storage.exists(path):
                    logger.warning("%s: listed file %s is missing", self.url, name)
                    return None
                if check_hashes:
                    data = self.storage.read_bytes(path)
                    if len(data) != entry["size"] or sha256_bytes(data) != entry["sha256"]:
                        logger.warning("%s: file %s does not match its manifest (size or sha256)", self.url, name)
                        return None
                elif self.storage.fs.size(path, **self.storage._bounded()) != entry["size"]:
                    return None
        except (KeyError, TypeError):
            logger.warning("%s: manifest is malformed", self.url)
            return None
        except FileNotFoundError:  # removed between the exists check and the read
            return None
        except _BACKEND_ERRORS as error:
            raise StorageError(f"cannot verify {self.url}: {error}") from error
        return self.record(manifest)

    def record(self, manifest: dict[str, Any]) -> StageRecord:
        """The record a manifest describes (no file is checked: see `verify`)."""
        return StageRecord(
            stage=manifest["stage"],
            iteration=manifest.get("iteration"),
            url=self.url,
            cache_key=manifest["cache_key"],
            # The attempt id makes every execution's digest new, so a forced stage always re-runs
            # everything downstream, even when it happens to reproduce the same bytes.
            digest=sha256_bytes(
                canonical_json([manifest["files"], manifest["cache_key"], manifest.get("attempt")]).encode()
            )[:32],
            metrics=manifest.get("metrics", {}),
        )

    def commit(
        self,
        stage: str,
        iteration: int | None,
        key: str,
        metrics: dict[str, Any] | None = None,
        attempt: str | None = None,
        provenance: dict[str, Any] | None = None,
    ) -> StageRecord:
        """Hash every file of the stage (scratch excluded) and write the manifest, last.

        ``attempt`` is given only when adopting another run's identical stage (same files, same
        key): keeping its attempt id keeps its digest, so downstream stages can be adopted too.
        ``provenance`` records what the key was computed from (code version, the config fields
        read, the input digests), so ``plan`` can say why a stage must run again.
        """
        files = {}
        for name in self.list_files():
            if name == MANIFEST or name.startswith(SCRATCH + "/"):
                continue
            data = self.read_bytes(name)
            files[name] = {"size": len(data), "sha256": sha256_bytes(data)}
        manifest = {
            "version": MANIFEST_VERSION,
            "stage": stage,
            "iteration": iteration,
            "cache_key": key,
            "attempt": attempt or uuid.uuid4().hex,
            "files": files,
            "metrics": metrics or {},
        }
        if provenance is not None:
            manifest["provenance"] = provenance
        self.write_json(MANIFEST, manifest)
        self.clear_scratch()  # in-progress state (resume markers, checkpoints) is done with
        return self.record(manifest)

    def adopt(self, source: StageDir, key: str) -> StageRecord | None:
        """Copy ``source``'s files if its manifest verifies under ``key`` (a forked run reusing its
        parent's stage); None if it does not. The source is only read."""
        manifest = source.read_manifest()
        if manifest is None or source.verify(key) is None:
            return None
        self.reset(keep_scratch=False)
        for name in manifest["files"]:
            self.write_bytes(name, source.read_bytes(name))
        metrics = {**manifest.get("metrics", {}), "adopted_from": source.url}
        return self.commit(
            manifest["stage"],
            manifest.get("iteration"),
            key,
            metrics,
            attempt=manifest.get("attempt"),
            provenance=manifest.get("provenance"),
        )

    def reset(self, keep_scratch: bool = True) -> None:
        """Make the stage not-done: remove the manifest first, then its old files."""
        self.storage.remove(self.file(MANIFEST))
        for name in self.list_files():
            if keep_scratch and name.startswith(SCRATCH + "/"):
                continue
            self.storage.remove(self.file(name))

    def clear_scratch(self) -> None:
        self.storage.remove(self.file(SCRATCH), recursive=True)


# -- bad input ------------------------------------------------------------------------------------
CHECK_TIMEOUT = 5.0  # seconds for each of connect and read in check_storage: one attempt, no retries


def check_storage(runs_root: str, field: str = "run.runs_root") -> None:
    """Before a run writes anything: is ``runs_root`` reachable with these credentials? One request
    (HeadBucket, then a one-key listing to name an auth error), one attempt, CHECK_TIMEOUT-second
    timeouts, so a bucket that does not exist, refused credentials or an endpoint that refuses
    connections is one line naming ``field`` and the cause within seconds, not after the client's
    retries. ConfigError. Only S3 is checked (a local folder is created when first written)."""
    from alphaspin.config import ConfigError

    if not runs_root.startswith(("s3://", "s3a://")):
        return
    try:
        storage = RunStorage(runs_root, "_")
    except (StorageError, ValueError) as error:
        raise ConfigError(f"{field}: {runs_root}: {error}") from error
    bucket = storage.fs.split_path(storage.root)[0]
    endpoint = storage.endpoint
    try:
        import botocore.config
        import botocore.exceptions
        import botocore.session
    except ImportError as error:  # s3fs without botocore cannot happen; say so rather than crash
        raise ConfigError(f"{field}: {runs_root}: S3 support is not installed ({error})") from error

    def fail(cause: str) -> ConfigError:
        return ConfigError(f"{field}: {runs_root}: {cause}")

    session = botocore.session.get_session()
    credentials: dict[str, Any] = {}
    if getattr(storage.fs, "key", None):  # s3fs options win over the environment, as in s3fs
        credentials = {"aws_access_key_id": storage.fs.key, "aws_secret_access_key": storage.fs.secret}
    client = session.create_client(
        "s3",
        endpoint_url=getattr(storage.fs, "endpoint_url", None),
        region_name=os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1",
        config=botocore.config.Config(
            connect_timeout=CHECK_TIMEOUT,
            read_timeout=CHECK_TIMEOUT,
            retries={"max_attempts": 1, "mode": "standard"},
            s3={"addressing_style": "path"},
        ),
        **credentials,
    )
    try:
        client.head_bucket(Bucket=bucket)
        return
    except botocore.exceptions.NoCredentialsError as error:
        raise fail("no S3 credentials found (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)") from error
    except (botocore.exceptions.EndpointConnectionError, botocore.exceptions.ConnectTimeoutError) as error:
        raise fail(
            f"cannot connect to the S3 endpoint {endpoint} ({error}); check AWS_ENDPOINT_URL_S3 and that the "
            "server is up"
        ) from error
    except botocore.exceptions.ReadTimeoutError as error:
        raise fail(
            f"the S3 endpoint {endpoint} accepted the connection but did not answer in {CHECK_TIMEOUT:g} s"
        ) from error
    except botocore.exceptions.ClientError as error:
        status = _status(error)
        if status == 404:
            raise fail(f"bucket {bucket!r} does not exist at {endpoint}") from error
        head_error = error
    except botocore.exceptions.BotoCoreError as error:
        raise fail(f"cannot reach the S3 endpoint {endpoint}: {error}") from error
    # HEAD answers carry no error code: a one-key listing names what the server refused
    try:
        client.list_objects_v2(Bucket=bucket, MaxKeys=1)
    except botocore.exceptions.ClientError as error:
        code = error.response.get("Error", {}).get("Code", "")
        causes = {
            "InvalidAccessKeyId": f"the access key {storage.fs.key or os.environ.get('AWS_ACCESS_KEY_ID', '')!r} "
            f"(AWS_ACCESS_KEY_ID) is not known to {endpoint}",
            "SignatureDoesNotMatch": f"the secret key (AWS_SECRET_ACCESS_KEY) does not match the access key at {endpoint}",
            "AccessDenied": f"these credentials may not read bucket {bucket!r} at {endpoint} (AccessDenied)",
            "NoSuchBucket": f"bucket {bucket!r} does not exist at {endpoint}",
        }
        raise fail(causes.get(code, f"{endpoint} refused access to bucket {bucket!r}: {code or error}")) from error
    except botocore.exceptions.BotoCoreError as error:
        raise fail(f"cannot reach the S3 endpoint {endpoint}: {error}") from error
    logger.debug("HeadBucket on %s was refused (%s), but listing it works", bucket, head_error)
