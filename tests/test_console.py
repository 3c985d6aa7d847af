"""The console a person reads: a header, a line per stage and per iteration, the report and the
log file's location; third-party output in the per-run log file; errors in one paragraph."""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from conftest import tiny_overrides

from alphaspin.console import TerminalConsole, capture_output, duration, summary
from alphaspin.flows.cli import main
from alphaspin.stages import REGISTRY

ROOT = Path(__file__).parents[1]

# The tiny run (t = 0..1, 13 stages) through the CLI prints at most this many lines: the header (4),
# the Prefect link (1), one line per stage (13), one per iteration (2), report, log, time (3).
LINE_BUDGET = 25


def test_stage_and_iteration_lines():
    out = io.StringIO()
    console = TerminalConsole(out)
    console.stage_started("iter-0/train", "not run yet")
    console.stage_progress(0.5, "step 2/4")  # not a terminal: no live line
    console.stage_finished(
        "iter-0/train", {"train/loss": 0.69314, "steps": 4, "flag": True, "text": "x", "a": 1, "b": 2}
    )
    console.stage_reused("iter-0/sample_prompts", "cached")
    console.stage_reused("iter-0/generate-base", "adopted")
    console.iteration_finished(0, {"train/loss": 0.5, "heldout/base_loglik_per_token": -2.0})
    lines = out.getvalue().splitlines()
    assert re.fullmatch(r"  ✓ iter-0/train +\d\.\d s  train/loss=0\.6931, steps=4, a=1, …", lines[0]), lines[0]
    assert lines[1].startswith("iteration 0:  DPO loss 0.5000  (base -2.0000)   [1 ran, 1 adopted, 1 cached; ")
    assert len(lines) == 2


def test_a_failed_stage_is_named():
    out = io.StringIO()
    console = TerminalConsole(out)
    console.stage_started("iter-1/train", "not run yet")
    console.stage_failed("iter-1/train", MemoryError("out of memory"))
    assert console.failed == "iter-1/train" and console.running is None
    assert out.getvalue() == "  ✗ iter-1/train             failed: MemoryError\n"


def test_summary_and_duration():
    assert summary({"a": 1.234567, "b": "text", "c": 2}) == "a=1.2346, c=2"
    assert summary({}) == ""
    assert duration(3.21) == "3.2 s" and duration(125) == "2 min 05 s" and duration(7260) == "2 h 01 min"


def test_capture_output_keeps_the_terminal_for_the_console(tmp_path, capsys):
    log_file = tmp_path / "logs" / "run.log"
    with capture_output(log_file) as terminal:
        terminal.write("console line\n")
        print("a library's print")
        sys.stderr.write("a progress bar\r\n")
        logging.getLogger("some.library").info("a library's log")
        warnings.warn("a library's warning", UserWarning, stacklevel=1)
    captured = capsys.readouterr()
    assert captured.out == "console line\n" and captured.err == ""
    text = log_file.read_text()
    for line in ("a library's print", "a progress bar", "some.library: a library's log", "a library's warning"):
        assert line in text
    print("after")  # the streams are restored
    assert capsys.readouterr().out == "after\n"


def test_verbose_shows_the_libraries_too(tmp_path, capsys):
    log_file = tmp_path / "run.log"
    with capture_output(log_file, verbose=True):
        print("a library's print")
    assert "a library's print" in capsys.readouterr().out
    assert "a library's print" in log_file.read_text()


def test_a_failing_stage_is_one_paragraph_naming_it_and_the_log(tiny_model, tmp_path, capsys, monkeypatch):
    def broken(job, **inputs):
        raise RuntimeError("something deep broke\nsecond line of the message")

    monkeypatch.setitem(REGISTRY, "sample_prompts", dataclasses.replace(REGISTRY["sample_prompts"], function=broken))
    monkeypatch.setenv("ALPHASPIN_LOG_DIR", str(tmp_path / "logs"))
    argv = ["run", "--no-prefect", "-c", str(ROOT / "configs" / "quickstart.yaml")]
    argv += [f"--set={o}" for o in [*tiny_overrides(tiny_model, tmp_path / "runs"), "method.iterations=0"]]
    assert main(argv) == 1
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert err[0] == "alphaspin: error: iter-0/sample_prompts failed: RuntimeError: something deep broke"
    kept = re.search(r"is in (\S+)\. Finished stages are kept", err[1]).group(1)
    assert len(err) == 2 and "resume from iter-0/sample_prompts" in err[1]
    assert kept.startswith(str(tmp_path / "runs" / "alphaspin-quickstart" / "logs"))
    log = Path(kept).read_text()
    assert "Traceback" in log and "second line of the message" in log
    assert "✗ iter-0/sample_prompts" in captured.out and "Traceback" not in captured.out


@pytest.mark.slow  # the tiny run through the CLI and a Prefect server
def test_the_console_of_a_run_stays_within_its_budget_and_the_log_has_everything(prefect_server, tiny_model, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterParentFlowRunId,
        LogFilter,
        LogFilterTaskRunId,
        TaskRunFilter,
        TaskRunFilterName,
    )
    from prefect.settings import PREFECT_API_URL

    runs = tmp_path / "runs"
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "ALPHASPIN_LOG_DIR": str(tmp_path / "tmp-logs")}
    argv = [sys.executable, "-m", "alphaspin.flows.cli", "run", "-c", "configs/quickstart.yaml"]
    argv += [f"--set={o}" for o in [*tiny_overrides(tiny_model, runs), "run.run_id=console"]]
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-3000:]
    lines = done.stdout.splitlines()
    assert len(lines) <= LINE_BUDGET, done.stdout
    assert done.stderr == "", done.stderr
    assert lines[0].startswith("alphaspin run · console · recipe configs/quickstart.yaml")
    (ui_line,) = [line for line in lines if line.strip().startswith("Prefect UI")]
    assert "/flow-runs/flow-run/" in ui_line, ui_line
    flow_run_id = ui_line.rstrip().rsplit("/", 1)[-1]
    assert sum(line.startswith("iteration ") for line in lines) == 2
    assert sum(line.startswith("  ✓ iter-") for line in lines) == 13
    assert f"report      {runs / 'console' / 'report' / 'report.md'}" in done.stdout
    for noise in ("Loading weights", "{'loss'", "FutureWarning", "lm_eval", "Tokenizing", "Starting temporary"):
        assert noise not in done.stdout + done.stderr, noise

    (log_file,) = (runs / "console" / "logs").iterdir()
    log = log_file.read_text()
    for wanted in (
        "resolved config",
        "Tokenizing train dataset",
        "'loss'",
        "lm_eval",
        "alphaspin.runner: iter-1/train",
    ):
        assert wanted in log, wanted

    # The Prefect UI's log of a stage reads like the console: progress and a result, no dumps. The server is
    # the session's, shared with other tests' runs, so the task run is looked up within this run: its
    # iterations' subflows are the children of the flow run the console linked to.
    with get_client(sync_client=True) as client:
        children = FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id]))
        (train,) = client.read_task_runs(
            flow_run_filter=children, task_run_filter=TaskRunFilter(name=TaskRunFilterName(any_=["iter-1/train"]))
        )
        messages = [
            log.message
            for log in client.read_logs(log_filter=LogFilter(task_run_id=LogFilterTaskRunId(any_=[train.id])))
        ]
    assert messages[0] == "iter-1/train: running (not run yet)", messages
    assert any("iter-1/train: step" in m for m in messages), messages
    assert any(m.startswith("iter-1/train: train/loss=") for m in messages), messages
    assert len(messages) <= 10 and not any("{'loss'" in m or "co_code" in m for m in messages), messages


def test_the_cli_turns_prefect_server_telemetry_off_unless_told(monkeypatch, capsys):
    """Offline, the temporary server's telemetry service prints an ERROR into the person's terminal."""
    monkeypatch.delenv("PREFECT_SERVER_ANALYTICS_ENABLED", raising=False)
    assert main(["config"]) == 0
    assert os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
    monkeypatch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "true")
    assert main(["config"]) == 0
    assert os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] == "true"


def test_a_live_progress_line_keeps_library_output_in_the_log(tmp_path):
    """On a terminal the stage's live line is a rich Progress; what libraries print to stderr/stdout while
    it runs (tqdm bars, TRL's loss dicts) must still go to the log file, not above the live line."""
    log_file = tmp_path / "run.log"
    terminal = io.StringIO()
    with capture_output(log_file):
        console = TerminalConsole(terminal, live=True)
        console.out._force_terminal = True  # a terminal, as `alphaspin run` sees one in a shell
        console.stage_started("iter-0/train", "not run yet")
        print("Loading weights: 100%", file=sys.stderr)
        print("{'loss': '0.6931'}")
        console.stage_finished("iter-0/train", {"loss": 0.6931})
    assert "Loading weights" not in terminal.getvalue() and "'loss'" not in terminal.getvalue()
    assert "Loading weights: 100%" in log_file.read_text() and "{'loss': '0.6931'}" in log_file.read_text()
