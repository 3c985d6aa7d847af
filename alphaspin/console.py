"""What a person reads in the terminal: a header, one live line per running stage, one line per
iteration, and the report's location — while everything else goes to a per-run log file.

The stages do not print. The runner, the workspace's progress hook and the flows report *events*
(stage started / progress / finished / reused / failed, iteration finished, a link) to the
``current()`` console. Nobody installs one in a Prefect worker, a test or a library call, so
there the events go nowhere (the Prefect run logger and progress artifacts carry them instead);
``alphaspin run`` installs a `TerminalConsole` around the run with `capture_output`, which sends
third-party logs, warnings and progress bars (TRL, transformers, lm-eval, datasets, Prefect) to
the log file unless ``--verbose``.

Why by hand: `rich` draws the live lines (its Progress) and Python's logging writes the file, but
no library turns "stage events" into a console and routes other libraries' output away from it.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

METRICS_SHOWN = (
    ("train/loss", "DPO loss"),
    ("train/reward_margin", "reward margin"),
    ("train/reward_accuracy", "reward acc"),
    ("heldout/reward_accuracy", "held-out reward acc"),
    ("heldout/loglik_per_token", "held-out loglik/token"),
)


def format_metrics(iteration: int, metrics: dict[str, Any]) -> str:
    parts = [f"iteration {iteration}:"]
    for key, label in METRICS_SHOWN:
        value = metrics.get(key)
        if isinstance(value, int | float):
            parts.append(f"{label} {value:.4f}")
    base = metrics.get("heldout/base_loglik_per_token")
    if isinstance(base, int | float):
        parts.append(f"(base {base:.4f})")
    return "  ".join(parts)


def summary(metrics: dict[str, Any], limit: int = 4) -> str:
    """The first few numeric metrics of a stage, e.g. ``rows=10, truncated=2``."""
    shown = [
        f"{k}={round(v, 4) if isinstance(v, float) else v}"
        for k, v in metrics.items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    ]
    return ", ".join(shown[:limit]) + (", …" if len(shown) > limit else "")


def duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(int(round(seconds)), 60)
    return f"{minutes} min {rest:02d} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


class Console:
    """Receives the run's events and shows nothing (workers, tests, library use)."""

    def stage_started(self, label: str, reason: str) -> None: ...

    def stage_progress(self, fraction: float, message: str) -> None: ...

    def stage_finished(self, label: str, metrics: dict[str, Any]) -> None: ...

    def stage_reused(self, label: str, how: str) -> None: ...

    def stage_failed(self, label: str, error: BaseException) -> None: ...

    def iteration_finished(self, iteration: int, metrics: dict[str, Any]) -> None: ...

    def link(self, name: str, url: str) -> None: ...


_current: Console = Console()


def current() -> Console:
    return _current


@contextlib.contextmanager
def activate(console: Console) -> Iterator[Console]:
    global _current
    previous, _current = _current, console
    try:
        yield console
    finally:
        _current = previous


_COUNT = re.compile(r"(\d+)/(\d+)")


class TerminalConsole(Console):
    """Lines for a person: ``✓ iter-0/generate-base  12.3 s  rows=16, …`` per stage that ran, a live
    progress line (bar, items done/total, rate, ETA) while a stage runs on a terminal, the
    iteration's metric line, and the failing stage's name when one fails."""

    def __init__(
        self, stream: TextIO, live: bool | None = None, stage_lines: bool = True, iteration_lines: bool = True
    ):
        from rich.console import Console as RichConsole

        self.out = RichConsole(file=stream, highlight=False, emoji=False)
        self.out.soft_wrap = not self.out.is_terminal  # piped or to a file: whole lines, never wrapped
        self.live = self.out.is_terminal if live is None else live
        self._progress: Any = None
        self._task: Any = None
        self._started: dict[str, float] = {}
        self.running: str | None = None
        self.failed: str | None = None
        self.reused: dict[str, int] = {}
        self.ran = 0
        self._iteration_started = time.monotonic()
        self._links: set[str] = set()
        self.stage_lines, self.iteration_lines = stage_lines, iteration_lines
        self.totals: dict[str, int] = {}  # ran / cached / adopted ... since `take_totals`

    def print(self, text: str = "", style: str | None = None) -> None:
        # On a terminal a line never wraps (the log file has the whole of it); piped, nothing is cut.
        cut = self.out.is_terminal
        self.out.print(text, style=style, markup=False, no_wrap=cut, overflow="ellipsis" if cut else None, crop=cut)

    # -- stages -----------------------------------------------------------------------------------
    def stage_started(self, label: str, reason: str) -> None:
        self.running = label
        self._started[label] = time.monotonic()
        if not self.live:
            return
        from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeRemainingColumn

        self._stop_live()
        self._progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(bar_width=24),
            TextColumn("{task.fields[items]}"),
            TextColumn("{task.fields[rate]}"),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=self.out,
            transient=True,
            # rich's default redirects sys.stdout/sys.stderr into the live display while it runs, which
            # would print every library's progress bars and dicts on the terminal instead of the log file
            # that `capture_output` made them (seen on a terminal only: piped, there is no live line).
            redirect_stdout=False,
            redirect_stderr=False,
        )
        self._progress.start()
        self._task = self._progress.add_task(f"{label} ({reason})", total=1.0, items="", rate="")

    def stage_progress(self, fraction: float, message: str) -> None:
        if self._progress is None or self.running is None:
            return
        items, rate = message, ""
        count = _COUNT.search(message)
        elapsed = time.monotonic() - self._started.get(self.running, time.monotonic())
        if count and elapsed > 0:
            rate = f"{int(count.group(1)) / elapsed:.2f}/s"
        self._progress.update(self._task, completed=min(max(fraction, 0.0), 1.0), items=items, rate=rate)

    def stage_finished(self, label: str, metrics: dict[str, Any]) -> None:
        self._stop_live()
        self.ran += 1
        self.totals["ran"] = self.totals.get("ran", 0) + 1
        took = time.monotonic() - self._started.pop(label, time.monotonic())
        self.running = None
        if self.stage_lines:
            self.print(f"  ✓ {label:<24} {duration(took):>9}  {summary(metrics, limit=3)}")

    def stage_reused(self, label: str, how: str) -> None:
        self.reused[how] = self.reused.get(how, 0) + 1
        self.totals[how] = self.totals.get(how, 0) + 1

    def take_totals(self) -> str:
        """ "7 ran, 13 adopted, 2 cached" since the last call (a grid's line per cell)."""
        ran = self.totals.pop("ran", 0)
        text = ", ".join([f"{ran} ran", *(f"{n} {how}" for how, n in sorted(self.totals.items()))])
        self.totals = {}
        return text

    def stage_failed(self, label: str, error: BaseException) -> None:
        self._stop_live()
        self.failed = label
        self.running = None
        self.print(f"  ✗ {label:<24} failed: {type(error).__name__}", style="red")

    def iteration_finished(self, iteration: int, metrics: dict[str, Any]) -> None:
        took = duration(time.monotonic() - self._iteration_started)
        reused = ", ".join(f"{n} {how}" for how, n in sorted(self.reused.items()))
        counts = f"{self.ran} ran" + (f", {reused}" if reused else "")
        if self.iteration_lines:
            self.print(f"{format_metrics(iteration, metrics)}   [{counts}; {took}]", style="bold")
        self.ran, self.reused, self._iteration_started = 0, {}, time.monotonic()

    def link(self, name: str, url: str) -> None:
        if url not in self._links:
            self._links.add(url)
            self.print(f"  {name:<11} {url}")

    def _stop_live(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


# -- where everything else goes ------------------------------------------------------------------
class _Tee(io.TextIOBase):
    def __init__(self, *streams: TextIO):
        self.streams = streams

    def write(self, text: str) -> int:
        for stream in self.streams:
            stream.write(text)
        return len(text)

    def flush(self) -> None:
        for stream in self.streams:
            stream.flush()

    def isatty(self) -> bool:
        return False


_TERMINALS = ("<stderr>", "<stdout>")


def _terminal_handlers() -> list[tuple[logging.Logger, logging.Handler]]:
    """Every logging handler that writes to the terminal (Prefect's console handler included)."""
    loggers = [logging.getLogger()] + [
        logger for logger in logging.Logger.manager.loggerDict.values() if isinstance(logger, logging.Logger)
    ]
    found = []
    for logger in loggers:
        for handler in logger.handlers:
            stream = getattr(handler, "stream", None)
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                if stream in (sys.stderr, sys.stdout, sys.__stderr__, sys.__stdout__) or (
                    getattr(stream, "name", None) in _TERMINALS
                ):
                    found.append((logger, handler))
    return found


@contextlib.contextmanager
def capture_output(log_file: Path, verbose: bool = False, level: int = logging.INFO) -> Iterator[TextIO]:
    """Send logs, warnings, ``print``s and progress bars of every library to ``log_file``; yields the
    terminal stream the console writes to. ``verbose``: the terminal keeps them too."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_file, "a", encoding="utf-8", buffering=1)  # noqa: SIM115 (closed below)
    terminal = sys.stdout
    handler = logging.FileHandler(log_file, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    previous_level = root.level
    root.setLevel(level)
    root.addHandler(handler)
    # Loggers that do not propagate to the root (Prefect's server, uvicorn) write to the file too.
    isolated = [
        logger
        for name, logger in logging.Logger.manager.loggerDict.items()
        if isinstance(logger, logging.Logger) and not logger.propagate and logger.handlers
    ]
    for logger in isolated:
        logger.addHandler(handler)
    removed = [] if verbose else _terminal_handlers()
    for logger, terminal_handler in removed:
        logger.removeHandler(terminal_handler)
    logging.captureWarnings(True)
    saved = sys.stdout, sys.stderr
    if verbose:
        sys.stdout, sys.stderr = _Tee(saved[0], log), _Tee(saved[1], log)  # type: ignore[assignment]
    else:
        sys.stdout = sys.stderr = log
    try:
        yield terminal
    finally:
        sys.stdout, sys.stderr = saved
        logging.captureWarnings(False)
        for logger, terminal_handler in removed:
            logger.addHandler(terminal_handler)
        for logger in isolated:
            logger.removeHandler(handler)
        root.removeHandler(handler)
        root.setLevel(previous_level)
        handler.close()
        log.close()
