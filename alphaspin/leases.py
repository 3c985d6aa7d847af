"""Leases on a run's stages, kept in the run storage itself.

Two processes that run the same run id (a retried task while the first attempt still lives, a
second worker on another machine, a user re-starting a flow by hand) must never execute the same
stage at once: both would write the same stage folder, and the manifest of one could end up listing
the other's half-written files. Those processes may sit on different machines and share nothing but
the run storage, so the lease lives there too::

    <runs_root>/<run_id>/_leases/<name>.json
    {"holder", "host", "pid", "label", "acquired", "expires", "mode"}

A lease is taken in one of three modes (``mode`` of the record; docs/architecture.md says what each
guarantees):

- ``conditional`` (S3 servers that honour conditional writes: AWS S3, MinIO, SeaweedFS, ...; probed
  once per endpoint and bucket, `RunStorage.conditional_writes`): the record is created with
  ``If-None-Match: *`` (only if absent), and replaced (a take-over of a stale record, a renewal) or
  deleted (release) with ``If-Match: <the ETag read>``. The server decides atomically: of two
  processes that act on the same version, exactly one succeeds and the other gets 412.
- ``exclusive`` (local disk): reading the record, judging it and replacing it (a fully written
  temporary file renamed over it) happen under an exclusive ``flock`` of ``<run>/_leases.lock``, so
  they are one atomic step among all processes that share the filesystem's locks.
- ``settle`` (any other store, or forced): *write, settle, read back*: look once more that the
  record is still absent, write ours, wait ``settle`` seconds (or 4 times our own read-to-write time,
  if longer) so that a competitor who decided at the same moment has written too, then read the
  record back (never from a cache); only the process whose record survived (the last writer) holds
  the lease.

After a lost race a process waits a randomized ``poll`` (0.5-1.5 x) before it looks again, so
competitors do not stay in lock-step.

A holder renews ``expires = now + ttl`` every ``ttl / 3`` seconds from a daemon thread, so a live
holder keeps its lease however long the stage runs. A crashed holder (kill -9, a lost machine)
stops renewing and its lease expires after at most ``ttl`` seconds; a process on the *same host*
does not even wait for that: when the holder's pid no longer exists the record is taken over at
once, which is what makes a resume right after kill -9 immediate. Expiry compares wall-clock times
(``time.time()``) written by different machines, so their clocks must agree to well within ``ttl``.

Within one process, a record of our own pid whose holder is not a live StageLease of this process
(acquiring or holding) is a leftover of a release that could not delete it, taken over at once. A
holder that is still *acquiring* counts as live: before, two threads of one process each took the
other's freshly written record (still settling) for such a leftover and replaced it, for ever (the
livelock of issue 19).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import posixpath
import random
import re
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from datetime import datetime
from types import TracebackType
from typing import Any

from alphaspin.storage import RunStorage, StorageError

logger = logging.getLogger(__name__)

LEASES = "_leases"  # <runs_root>/<run_id>/_leases/<name>.json
_NAME = re.compile(r"[A-Za-z0-9._-]+")
_LOCAL = ("file", "local")
MODES = ("conditional", "exclusive", "settle")


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
    mode: str = ""  # how it was taken: conditional, exclusive or settle (see the module doc)

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
                mode=value.get("mode", ""),
            )
        except (KeyError, TypeError) as error:
            raise ValueError(f"malformed lease record: {error!r}") from error
        if not all(isinstance(text, str) for text in (info.holder, info.host, info.label, info.mode)):
            raise ValueError("malformed lease record: holder, host, label and mode must be strings")
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


# Holder ids of the leases this process is acquiring or holds right now: a record of this process's
# pid whose holder is not among them is a leftover (a release that could not delete it while
# storage was down), never a live holder to wait for. A holder enters the set *before* it writes its
# record (a record that is still settling is not a leftover).
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
    (every ``poll`` seconds, randomized 0.5-1.5 x, at most ``timeout`` seconds if given) instead of
    raising LeaseHeldError at once. ``mode``: ``conditional``, ``exclusive`` or ``settle`` (see the
    module doc); None picks ``exclusive`` on local disk, ``conditional`` on an S3 server that honours
    conditional writes (probed once), else ``settle``. Forcing ``conditional`` on a server that does
    not honour them is a ValueError at acquire. ``settle`` (settle mode only): seconds between
    writing our record and reading it back, which must exceed the time a competitor may take
    between reading the record and writing its own (storage round trips, not compute); default 0.5 s,
    lengthened to 4 times our own read-to-write time when that is longer (a loaded machine or server).
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
        mode: str | None = None,
    ) -> None:
        if settle is None:
            settle = 0.5
        if not _NAME.fullmatch(name) or name in (".", ".."):
            raise ValueError(f"lease name {name!r} must be a file name of letters, digits, '.', '_' and '-'")
        if ttl <= 0 or poll <= 0 or settle < 0 or (timeout is not None and timeout < 0):
            raise ValueError("lease ttl and poll must be positive, settle and timeout not negative")
        if mode is not None and mode not in MODES:
            raise ValueError(f"lease mode {mode!r} must be one of {', '.join(MODES)}")
        if mode == "exclusive" and storage.protocol not in _LOCAL:
            raise ValueError(f"lease mode 'exclusive' needs local disk, not {storage.protocol}://")
        if mode == "conditional" and not storage.is_s3:
            raise ValueError(f"lease mode 'conditional' needs S3, not {storage.protocol}://")
        self.storage = storage
        self.name = name
        self.label = label or name
        self.ttl = ttl
        self.wait = wait
        self.poll = poll
        self.settle = settle
        self.timeout = timeout
        self.requested_mode = mode
        self.path = storage.path(LEASES, f"{name}.json")
        self.url = storage.unstrip(self.path)
        self.holder = uuid.uuid4().hex
        self.host = socket.gethostname()
        self.waited = False
        self.lost = False
        self._held = False
        self._mode: str | None = None
        self._tag: str | None = None  # conditional mode: the ETag of our record as last written
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def held(self) -> bool:
        """Whether acquire() succeeded and release() has not run yet (even if ``lost``)."""
        return self._held

    @property
    def mode(self) -> str:
        """The mode this lease takes its record in (probes the storage on first use)."""
        if self._mode is None:
            if self.requested_mode is not None:
                self._mode = self.requested_mode
                if self._mode == "conditional" and not self.storage.conditional_writes():
                    raise ValueError(
                        f"lease mode 'conditional' was asked for, but {self.storage.endpoint} does not honour "
                        "conditional writes (If-None-Match / If-Match)"
                    )
            elif self.storage.protocol in _LOCAL:
                self._mode = "exclusive"
            elif self.storage.conditional_writes():
                self._mode = "conditional"
            else:
                self._mode = "settle"
        return self._mode

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
        self.mode  # probe before the clock starts  # noqa: B018
        with _ACTIVE_LOCK:
            _ACTIVE.add(self.holder)  # from now on a record of ours is never a "leftover"
        try:
            self._acquire()
        except BaseException:
            with _ACTIVE_LOCK:
                _ACTIVE.discard(self.holder)
            raise

    def _acquire(self) -> None:
        started = time.monotonic()
        announced = False
        while True:
            raw, info, tag = self._read()
            if self._free(raw, info):
                try:
                    taken = self._take(raw, info, tag)
                except BaseException:  # storage failed or Ctrl+C mid-take: don't leave our record behind
                    self._discard_own()
                    raise
                if taken:
                    self._held = True
                    self._start_renewal()
                    logger.debug("lease %s taken by %s (pid %d, %s)", self.url, self.holder, os.getpid(), self.mode)
                    return
                raw, info, tag = self._read()  # whoever beat us to it
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
            # randomized, so that competitors who lost a race together do not retry in lock-step
            pause = self.poll * random.uniform(0.5, 1.5)
            if self.timeout is not None:
                pause = min(pause, max(self.timeout - elapsed, 0.0))
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
        try:
            raw, info, tag = self._read()
            if raw is not None and info is not None and info.holder == self.holder:
                self._remove_if(raw, tag)
            else:
                logger.warning(
                    "lease %s is no longer ours at release (now %s); leaving it",
                    self.url,
                    "absent" if raw is None else (f"held by {info.holder}" if info else "malformed"),
                )
        except StorageError as error:
            logger.warning(
                "could not release lease %s (%s; it expires within %.0f s): %s", self.url, self.label, self.ttl, error
            )
        finally:
            with _ACTIVE_LOCK:
                _ACTIVE.discard(self.holder)

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
    def _read(self) -> tuple[bytes | None, LeaseInfo | None, str | None]:
        """(raw bytes or None if absent, parsed record or None if absent or malformed, ETag or None).

        Always from the store itself: no listing or file cache of the filesystem object is consulted
        (a stale cached answer would make a free lease look held, or a lost race look won)."""
        tag = None
        try:
            if self.storage.is_s3:
                raw, tag = self.storage.read_tagged(self.path)
            else:
                self.storage.fs.invalidate_cache(self.path)
                raw = self.storage.read_bytes(self.path)
        except FileNotFoundError:
            return None, None, None
        try:
            return raw, LeaseInfo.from_json(json.loads(raw)), tag
        except (ValueError, UnicodeDecodeError):
            return raw, None, tag

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
            mode=self.mode,
        )

    def _take(self, raw: bytes | None, info: LeaseInfo | None, tag: str | None) -> bool:
        """Replace the free record ``raw`` (None: absent) by ours: True if we hold the lease now."""
        data = _encode(self._record())
        if self.mode == "conditional":
            # If-None-Match: * when absent, If-Match: <the ETag we judged> for a take-over: of all the
            # processes that act on what they read, the server lets exactly one succeed.
            new_tag = self.storage.put_if(self.path, data, tag if raw is not None else None)
            if new_tag is None:
                logger.info("lost the race for lease %s (the record changed since it was read)", self.url)
                return False
            self._tag = new_tag
            return True
        if self.mode == "exclusive":
            with self._locked():
                if _read_local(self.path) != raw:
                    return False  # the record changed under us: someone renewed or took it
                _write_local(self.path, data)
                return True
        # settle: write, settle, read back; the last writer holds it
        started = time.monotonic()
        if raw is not None:
            if not self._remove_if(raw, tag):
                return False  # the record changed under us: someone renewed or took it
        elif self._read()[0] is not None:
            # Looked again just before writing: a competitor wrote since we judged the lease free. This
            # narrows our read-to-write gap (what a holder's settle must outlast) to one round trip.
            return False
        self.storage.write_bytes(self.path, data)
        # A competitor's read-to-write gap is about ours (the same storage, the same load): under load
        # (a busy machine, a slow server) a fixed settle was shorter than it, and two processes held the
        # lease at once (issue 19: 4 processes on 2 busy cores, settle 0.3 s). Wait 4 times our own gap
        # if that is longer than ``settle``.
        gap = time.monotonic() - started
        if self.settle:
            time.sleep(max(self.settle, 4 * gap))
        _, stored, _ = self._read()
        if stored is not None and stored.holder == self.holder:
            return True
        logger.info("lost the race for lease %s to %s", self.url, stored.holder if stored else "another process")
        return False

    def _remove_if(self, expected: bytes, tag: str | None) -> bool:
        """Remove the record if it still holds exactly ``expected`` (ETag ``tag``); True if it is gone now.

        Conditional mode: one DELETE with If-Match. Exclusive mode: under the record's file lock.
        Settle mode: the check and the delete are two requests; the window is one round trip.
        """
        if self.mode == "conditional" and tag is not None:
            return self.storage.delete_if(self.path, tag)
        if self.mode == "exclusive":
            with self._locked():
                current = _read_local(self.path)
                if current is None:
                    return True
                if current != expected:
                    return False
                os.unlink(self.path)
                return True
        try:
            self.storage.fs.invalidate_cache(self.path)
            current = self.storage.read_bytes(self.path)
        except FileNotFoundError:
            return True
        if current != expected:
            return False
        self.storage.remove(self.path)
        return True

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Exclusive mode: hold ``<run>/_leases.lock`` (flock) while reading and replacing the record, so
        that judging a record and replacing it is one atomic step among the processes of this host
        (and of any host whose filesystem supports flock, e.g. NFSv4)."""
        # one lock file per run (held for a read and a write: microseconds), beside _leases/ so that
        # the folder holds only records (an empty _leases/ means every lease was released)
        lock_path = self.storage.path(f"{LEASES}.lock")
        try:
            os.makedirs(posixpath.dirname(self.path), exist_ok=True)
            fd = os.open(lock_path, os.O_CREAT | os.O_RDWR, 0o644)
        except OSError as error:
            raise StorageError(f"cannot open the lock file {lock_path}: {error}") from error
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        except OSError as error:
            raise StorageError(f"cannot write lease {self.url}: {error}") from error
        finally:
            os.close(fd)  # closing releases the flock

    def _discard_own(self) -> None:
        """Best effort: remove our record if it is stored (an acquire that failed half-way)."""
        try:
            raw, info, tag = self._read()
            if raw is not None and info is not None and info.holder == self.holder:
                self._remove_if(raw, tag)
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
                if not self._renew():
                    return
            except StorageError as error:
                logger.warning("could not renew lease %s (retrying in %.1f s): %s", self.url, self.ttl / 3, error)
            except Exception:  # never let the thread die silently: the lease would then expire
                logger.exception("unexpected error renewing lease %s; retrying", self.url)

    def _renew(self) -> bool:
        """Renew once; False (and ``lost`` set) if the record is no longer ours."""
        raw, info, tag = self._read()
        if info is None or info.holder != self.holder:
            self._mark_lost(raw, info)
            return False
        now = time.time()
        if info.expires < now:
            logger.warning("lease %s renewed %.1f s after it expired (process stalled?)", self.url, now - info.expires)
        data = _encode(replace(info, expires=now + self.ttl))
        if self.mode == "conditional":
            # If-Match on the version just read (ours): a take-over between the read and this write
            # makes it fail instead of overwriting the new holder's record.
            new_tag = self.storage.put_if(self.path, data, tag)
            if new_tag is None:
                raw, info, _ = self._read()
                self._mark_lost(raw, info)
                return False
            self._tag = new_tag
        elif self.mode == "exclusive":
            with self._locked():
                if _read_local(self.path) != raw:
                    raw, info, _ = self._read()
                    self._mark_lost(raw, info)
                    return False
                _write_local(self.path, data)
        else:
            self.storage.write_bytes(self.path, data)
        return True

    def _mark_lost(self, raw: bytes | None, info: LeaseInfo | None) -> None:
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


def _read_local(path: str) -> bytes | None:
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except FileNotFoundError:
        return None


def _write_local(path: str, data: bytes) -> None:
    """Replace ``path`` by ``data`` atomically (a fully written temporary file renamed over it)."""
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
