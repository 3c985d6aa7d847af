"""Preemption: a SIGTERM (Slurm's requeue or preemption, Kubernetes deleting a pod, a spot instance's
notice) ends a run in a known state within a bound, and running the same command again resumes it.

- **train** (`graceful_sigterm` around the stage, `alphaspin.training.PreemptionCallback`): the signal
  only records the request; at the end of the current optimizer step the Trainer stores a checkpoint
  (into run storage, as every ``save_steps`` checkpoint) and stops, and the stage raises `Preempted`.
  On several processes the stage forwards the signal to the launcher's process group
  (`alphaspin.distributed.supervise`) and the ranks agree on the step to stop at.
- **every other stage**: the CLI's handler (`raise_on_sigterm`) raises `Preempted` at once; what the
  stage already stored stays (generate's finished shards, an engine's log), the rest is redone.
- **the bound**: ``orchestration.preemption_grace_seconds`` after the signal, a process that has not
  stopped (a step longer than the grace) exits with code 143 without further clean-up; the rerun then
  resumes from the last stored checkpoint. Slurm's default KillWait is 30 s, so the default (25 s)
  exits before Slurm's SIGKILL.

`Preempted` is a BaseException, like KeyboardInterrupt: it is no stage failure to retry, and it
passes through ``except Exception`` handlers up to the CLI, which exits with code 143 (128 + SIGTERM).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

logger = logging.getLogger(__name__)

EXIT_CODE = 128 + signal.SIGTERM  # what a shell reports for a process ended by SIGTERM: 143
RESUME_HINT = "run the same command again to resume"


class Preempted(BaseException):
    """The run stopped on a SIGTERM; what it finished is stored and a rerun resumes from it."""

    exit_code = EXIT_CODE


class _Request:
    """The process's preemption request: set by the first SIGTERM, read by the training callback."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.at: float | None = None
        self.watchdog: threading.Timer | None = None

    def set(self, grace: float) -> None:
        if self.event.is_set():
            return
        self.at = time.monotonic()
        self.event.set()
        self.watchdog = threading.Timer(grace, _deadline, args=(grace,))
        self.watchdog.daemon = True
        self.watchdog.start()

    def clear(self) -> None:
        if self.watchdog is not None:
            self.watchdog.cancel()
        self.event.clear()
        self.at, self.watchdog = None, None


_REQUEST = _Request()


def requested() -> bool:
    """Whether a SIGTERM asked this process to stop (under `graceful_sigterm`)."""
    return _REQUEST.event.is_set()


def request(grace: float) -> None:
    """Record a preemption request (what the SIGTERM handler does; also for a rank told by its peers)."""
    _REQUEST.set(grace)


def reset() -> None:
    """Forget a request (tests run several stages in one process)."""
    _REQUEST.clear()


def _deadline(grace: float) -> None:
    logger.error(
        "preempted by SIGTERM: not stopped within orchestration.preemption_grace_seconds=%g; exiting now "
        "(a rerun resumes from the last stored checkpoint)",
        grace,
    )
    for handler in logging.getLogger().handlers:
        with contextlib.suppress(Exception):
            handler.flush()
    os._exit(EXIT_CODE)


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def graceful_sigterm(label: str, grace: float) -> Iterator[bool]:
    """While inside: a SIGTERM only records a request (`requested`) and starts the ``grace``-second
    watchdog; the code inside stops at its next safe point. The previous handler (the CLI's, or Prefect's
    flow engine's) is restored on the way out. Yields False, and changes nothing, outside the main thread
    (Python delivers signals to the main thread only)."""
    if not _in_main_thread():
        yield False
        return

    def handler(signum: int, frame: Any) -> None:
        if not requested():
            logger.warning("%s: SIGTERM received: storing a checkpoint, then stopping (at most %g s)", label, grace)
        request(grace)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield True
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def raise_on_sigterm(grace: float) -> Iterator[None]:
    """The CLI's handler: a SIGTERM raises `Preempted` where the main thread is (finally blocks run:
    engines stop, leases are released), and starts the ``grace``-second watchdog. A stage under
    `graceful_sigterm` replaces it for its duration. No-op outside the main thread."""
    if not _in_main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        first = not requested()
        request(grace)
        if first:
            raise Preempted(
                f"preempted by SIGTERM; finished stages and the interrupted stage's stored work are kept: {RESUME_HINT}"
            )

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
