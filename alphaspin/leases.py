"""Leases on a run's stages, kept in the run storage itself.

Two processes that run the same run id (a retried task while the first attempt still lives, a
second worker on another machine, a user re-starting a flow by hand) must never execute the same
stage at once: both would write the same stage folder, and the manifest of one could end up listing
the other's half-written files. Those processes may sit on different machines and share nothing but
the run storage, so the lease lives there too::

    <runs_root>/<run_id>/_leases/<name>.json   {"holder", "host", "pid", "label", "acquired", "expires"}

S3 has no locks and (through this project's storage API) no compare-and-swap, so a lease is taken
by *write, settle, read back*: write our record, wait ``settle`` seconds so that a competitor who
decided at the same moment has written too, then read the record back; only the process whose
record survived (the last writer) holds the lease, the others go on waiting. On local disk the
record is created atomically-if-absent (a hard link of a fully written temporary file, or
``O_CREAT | O_EXCL``), so two processes can never both create it; the read-back still guards the
take-over of a stale record.

A holder renews ``expires = now + ttl`` every ``ttl / 3`` seconds from a daemon thread, so a live
holder keeps its lease however long the stage runs. A crashed holder (kill -9, a lost machine)
stops renewing and its lease expires after at most ``ttl`` seconds; a process on the *same host*
does not even wait for that: when the holder's pid no longer exists the record is taken over at
once, which is what makes a resume right after kill -9 immediate. Expiry compares wall-clock times
(``time.time()``) written by different machines, so their clocks must agree to well within ``ttl``.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import re
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass, replace
from datetime import datetime
from types import TracebackType
from typing import Any

from alphaspin.storage import RunStorage, StorageError

logger = logging.getLogger(__name__)

LEASES = "_leases"  # <runs_root>/<run_id>/_leases/<name>.json
_NAME = re.compile(r"[A-Za-z0-9._-]+")
_LOCAL = ("file", "local")


class LeaseHeldError(RuntimeError):
    """Another live process holds the lease.

    The message names the holder (host, pid, holder id, since when, expiry) and the lease URL, and
    says how to proceed: wait for that process, or remove the lease file if it is surely gone (a
    crashed holder on another host otherwise blocks the stage until its lease expires).
    """


@dataclass
class LeaseInfo:
    """The record stored in a lease file: who holds it, and until when unless renewed."""

    holder: str  # uuid4 hex of the StageLease object (one process may hold several leases)
    host: str  # socket.gethostname() of the holder: its pid means something only there
    pid: int
    label: str  # what the holder runs, for messages ("iteration 1: train")
    acquired: float  # time.time() when taken
    expires: float  # time.time() after which the lease counts as abandoned

    def to_json(self) -> dict[str, Any]:
        """The record as a JSON-ready dict."""
        return asdict(self)

    @classmethod
    def from_json(cls, value: Any) -> LeaseInfo:
        """Parse a record (the dict ``to_json`` gives); ValueError if it is not one."""
        if not isinstance(value, dict):
            raise ValueError(f"a lease record is a JSON object, not {type(value).__name__}")
        try:
            info = cls(
                holder=value["holder"],
                host=value["host"],
                pid=value["pid"],
                label=value.get("label", ""),
                acquired=float(value["acquired"]),
                expires=float(value["expires"]),
            )
        except (KeyError, TypeError) as error:
            raise ValueError(f"malformed lease record: {error!r}") from error
        if not isinstance(info.holder, str) or not isinstance(info.host, str) or not isinstance(info.label, str):
            raise ValueError("malformed lease record: holder, host and label must be strings")
        if not isinstance(info.pid, int) or isinstance(info.pid, bool):
            raise ValueError("malformed lease record: pid must be an integer")
        return info


def _encode(info: LeaseInfo) -> bytes:
    return json.dumps(info.to_json(), sort_keys=True).encode()


def _when(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp).astimezone().isoformat(timespec="seconds")


def _pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host (another user's process counts)."""
    if pid <= 0:  # os.kill(0, ...) would signal our own process group
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


# Holder ids of the leases this process holds right now: a record of this process's pid whose
# holder is not among them is a leftover (a release that could not delete it while storage was
# down), never a live holder to wait for.
_ACTIVE: set[str] = set()
_ACTIVE_LOCK = threading.Lock()


class StageLease:
    """A lease on one stage of a run: at most one live process executes the stage at a time.

    Use as a context manager around the stage's execution::

        with StageLease(storage, "iter-1-train", label="iteration 1: train") as lease:
            if lease.waited and stage_is_done():  # the holder we waited for may have done it
                return
            run_stage()
            if lease.lost:  # we stalled past ttl and someone else took over: don't commit
                ...

    ``ttl``: seconds a record stays valid without renewal (renewed every ``ttl / 3``), i.e. how
    long a crashed holder on another host blocks the stage. ``wait``: poll until the lease is free
    (every ``poll`` seconds, at most ``timeout`` seconds if given) instead of raising
    LeaseHeldError at once. ``settle``: seconds between writing our record and reading it back,
    which must exceed the time a competitor may take between reading the record and writing its
    own (storage round trips, not compute); default 0.5 s on object stores, 0 on local disk, where
    the record is created and removed atomically.
    """

    def __init__(
        self,
        storage: RunStorage,
        name: str,
        *,
        label: str = "",
        ttl: float = 120.0,
        wait: bool = True,
        poll: float = 2.0,
        settle: float | None = None,
        timeout: float | None = None,
    ) -> None:
        if settle is None:  # local disk creates and removes records atomically: no race to settle
            settle = 0.0 if storage.protocol in ("file", "local") else 0.5
        if not _NAME.fullmatch(name) or name in (".", ".."):
            raise ValueError(f"lease name {name!r} must be a file name of letters, digits, '.', '_' and '-'")
        if ttl <= 0 or poll <= 0 or settle < 0 or (timeout is not None and timeout < 0):
            raise ValueError("lease ttl and poll must be positive, settle and timeout not negative")
        self.storage = storage
        self.name = name
        self.label = label or name
        self.ttl = ttl
        self.wait = wait
        self.poll = poll
        self.settle = settle
        self.timeout = timeout
        self.path = storage.path(LEASES, f"{name}.json")
        self.url = storage.unstrip(self.path)
        self.holder = uuid.uuid4().hex
        self.host = socket.gethostname()
        self.waited = False
        self.lost = False
        self._held = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def held(self) -> bool:
        """Whether acquire() succeeded and release() has not run yet (even if ``lost``)."""
        return self._held

    # -- public -------------------------------------------------------------------------------
    def acquire(self) -> None:
        """Take the lease, waiting for a live holder if ``wait``; LeaseHeldError if not possible.

        Sets ``waited`` when another holder was seen first: the caller must then re-check whether
        that holder already finished the work before doing it again.
        """
        if self._held:
            raise RuntimeError(f"lease {self.url} is already held by this StageLease ({self.holder})")
        self.waited = False
        self.lost = False
        started = time.monotonic()
        announced = False
        while True:
            raw, info = self._read()
            if self._free(raw, info):
                try:
                    taken = self._take(raw, info)
                except BaseException:  # storage failed or Ctrl+C mid-take: don't leave our record behind
                    self._discard_own()
                    raise
                if taken:
                    with _ACTIVE_LOCK:
                        _ACTIVE.add(self.holder)
                    self._held = True
                    self._start_renewal()
                    logger.debug("lease %s taken by %s (pid %d)", self.url, self.holder, os.getpid())
                    return
                raw, info = self._read()  # whoever beat us to it
            if not self.wait:
                raise LeaseHeldError(self._held_message(info))
            elapsed = time.monotonic() - started
            if self.timeout is not None and elapsed >= self.timeout:
                raise LeaseHeldError(f"timed out after {elapsed:.1f} s: " + self._held_message(info))
            if not announced:
                announced = True
                if info is not None:
                    logger.info(
                        "waiting for %s held by %s pid %d since %s (lease %s)",
                        self.label,
                        info.host,
                        info.pid,
                        _when(info.acquired),
                        self.url,
                    )
                else:
                    logger.info("waiting for %s: another process is taking lease %s", self.label, self.url)
            self.waited = True
            pause = self.poll if self.timeout is None else min(self.poll, max(self.timeout - elapsed, 0.0))
            time.sleep(pause)

    def release(self) -> None:
        """Stop renewing and remove the record if it is still ours. Idempotent; never raises for storage.

        A record that is no longer ours (we stalled past ttl and it was taken) is left alone. If
        storage fails here the record stays and expires after ``ttl``.
        """
        if not self._held:
            return
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        self._thread = None
        self._held = False
        with _ACTIVE_LOCK:
            _ACTIVE.discard(self.holder)
        try:
            raw, info = self._read()
            if raw is not None and info is not None and info.holder == self.holder:
                self._remove_if(raw)
            else:
                logger.warning(
                    "lease %s is no longer ours at release (now %s); leaving it",
                    self.url,
                    "absent" if raw is None else (f"held by {info.holder}" if info else "malformed"),
                )
        except StorageError as error:
            logger.warning("could not release lease %s (it expires within %.0f s): %s", self.url, self.ttl, error)

    def current(self) -> LeaseInfo | None:
        """The record now stored, or None if there is none (or it does not parse)."""
        return self._read()[1]

    def __enter__(self) -> StageLease:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"StageLease({self.url!r}, holder={self.holder}, held={self._held}, lost={self.lost})"

    # -- reading and judging ------------------------------------------------------------------
    def _read(self) -> tuple[bytes | None, LeaseInfo | None]:
        """(raw bytes or None if absent, parsed record or None if absent or malformed)."""
        try:
            raw = self.storage.read_bytes(self.path)
        except FileNotFoundError:
            return None, None
        try:
            return raw, LeaseInfo.from_json(json.loads(raw))
        except (ValueError, UnicodeDecodeError):
            return raw, None

    def _free(self, raw: bytes | None, info: LeaseInfo | None) -> bool:
        """Whether the stored record (if any) may be taken: absent, malformed, expired, dead, or ours."""
        if raw is None:
            return True
        if info is None:
            logger.warning("lease %s does not parse; it counts as expired", self.url)
            return True
        if info.holder == self.holder:  # a leftover of ours (a release that could not delete it)
            return True
        if info.host == self.host and info.pid == os.getpid():
            with _ACTIVE_LOCK:
                leftover = info.holder not in _ACTIVE
            if leftover:
                logger.info("lease %s: a leftover of this process (%s); taking it over", self.url, info.label)
                return True
        now = time.time()
        if info.expires < now:
            logger.warning(
                "lease %s of %s (host %s pid %d) expired at %s; taking it over",
                self.url,
                info.label,
                info.host,
                info.pid,
                _when(info.expires),
            )
            return True
        if info.host == self.host and not _pid_alive(info.pid):
            logger.warning(
                "lease %s of %s: holder pid %d on this host (%s) is gone; taking it over",
                self.url,
                info.label,
                info.pid,
                info.host,
            )
            return True
        return False

    def _held_message(self, info: LeaseInfo | None) -> str:
        if info is None:
            return (
                f"lease {self.url} for {self.label} was taken by another process at the same moment; "
                "retry later, or remove that file if no other process can be running this stage"
            )
        return (
            f"{self.label} is being run by another process: lease {self.url} is held by host {info.host}, "
            f"pid {info.pid} (holder {info.holder}, label {info.label!r}, since {_when(info.acquired)}, "
            f"expires {_when(info.expires)} unless renewed). Wait for it to finish, or, if that process "
            f"is surely gone, remove {self.url} and retry."
        )

    # -- taking -------------------------------------------------------------------------------
    def _record(self) -> LeaseInfo:
        now = time.time()
        return LeaseInfo(
            holder=self.holder,
            host=self.host,
            pid=os.getpid(),
            label=self.label,
            acquired=now,
            expires=now + self.ttl,
        )

    def _take(self, raw: bytes | None, info: LeaseInfo | None) -> bool:
        """Remove the stale record ``raw`` (if any), write ours, settle, read back: True if ours stuck."""
        if raw is not None and not self._remove_if(raw):
            return False  # the record changed under us: someone renewed or took it
        if not self._create(_encode(self._record())):
            return False
        if self.settle:
            time.sleep(self.settle)
        _, stored = self._read()
        if stored is not None and stored.holder == self.holder:
            return True
        logger.info("lost the race for lease %s to %s", self.url, stored.holder if stored else "another process")
        return False

    def _remove_if(self, expected: bytes) -> bool:
        """Remove the record if it still holds exactly ``expected``; True if it is gone now.

        On local disk the record is first renamed aside (atomic), so a record that another process
        wrote meanwhile is never deleted: it is put back (a hard link that fails if the path was
        re-created). On S3 the check and the delete are two requests; the window is one round trip.
        """
        if self.storage.protocol in _LOCAL:
            aside = f"{self.path}.stale-{uuid.uuid4().hex}"
            try:
                try:
                    os.rename(self.path, aside)
                except FileNotFoundError:
                    return True  # someone else removed it first; creating will settle who wins
                with open(aside, "rb") as handle:
                    moved = handle.read()
                if moved != expected:
                    try:
                        os.link(aside, self.path)
                    except FileExistsError:
                        pass
                    os.unlink(aside)
                    return False
                os.unlink(aside)
                return True
            except OSError as error:
                raise StorageError(f"cannot remove stale lease {self.url}: {error}") from error
        try:
            current = self.storage.read_bytes(self.path)
        except FileNotFoundError:
            return True
        if current != expected:
            return False
        self.storage.remove(self.path)
        return True

    def _create(self, data: bytes) -> bool:
        """Write our record; on local disk only if no record exists (atomic). False if one did."""
        if self.storage.protocol not in _LOCAL:
            self.storage.write_bytes(self.path, data)
            return True
        tmp = f"{self.path}.tmp-{uuid.uuid4().hex}"
        try:
            os.makedirs(posixpath.dirname(self.path), exist_ok=True)
            with open(tmp, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            try:
                os.link(tmp, self.path)  # appears complete, and only if absent
                return True
            except FileExistsError:
                return False
            except OSError:  # a filesystem without hard links: exclusive create, then write
                pass
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            return True
        except OSError as error:
            raise StorageError(f"cannot create lease {self.url}: {error}") from error
        finally:
            try:
                os.unlink(tmp)
            except OSError:
                pass

    def _discard_own(self) -> None:
        """Best effort: remove our record if it is stored (an acquire that failed half-way)."""
        try:
            raw, info = self._read()
            if raw is not None and info is not None and info.holder == self.holder:
                self._remove_if(raw)
        except Exception as error:  # the original error matters more; the record expires anyway
            logger.warning("could not remove our half-taken lease %s: %s", self.url, error)

    # -- renewing -----------------------------------------------------------------------------
    def _start_renewal(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._renew_loop, args=(self._stop,), name=f"lease-{self.name}", daemon=True
        )
        self._thread.start()

    def _renew_loop(self, stop: threading.Event) -> None:
        """Every ttl/3 s: if the record is still ours, push its expiry to now + ttl; else mark ``lost``."""
        while not stop.wait(self.ttl / 3):
            try:
                raw, info = self._read()
                if info is None or info.holder != self.holder:
                    self.lost = True
                    logger.error(
                        "lease %s for %s was lost: the record now %s. Another process may be running "
                        "this stage; this one should not commit its results.",
                        self.url,
                        self.label,
                        "is absent"
                        if raw is None
                        else (f"names {info.host} pid {info.pid} ({info.holder})" if info else "does not parse"),
                    )
                    return
                now = time.time()
                if info.expires < now:
                    logger.warning(
                        "lease %s renewed %.1f s after it expired (process stalled?)", self.url, now - info.expires
                    )
                self.storage.write_bytes(self.path, _encode(replace(info, expires=now + self.ttl)))
            except StorageError as error:
                logger.warning("could not renew lease %s (retrying in %.1f s): %s", self.url, self.ttl / 3, error)
            except Exception:  # never let the thread die silently: the lease would then expire
                logger.exception("unexpected error renewing lease %s; retrying", self.url)
