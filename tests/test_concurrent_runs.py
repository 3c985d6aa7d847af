"""Two processes on one run id: every stage runs once, the second process waits for the first's
lease (or, with --no-wait, stops naming the holder), and the run holds the artifacts of one run."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import tiny_overrides

from alphaspin.config import load_config
from alphaspin.dag import iteration_nodes
from alphaspin.flows.cli import main
from alphaspin.leases import StageLease
from alphaspin.runs import Run
from alphaspin.stages.reference_logps import BASE_CACHE

ROOT = Path(__file__).parents[1]


def cli_args(overrides: list[str]) -> list[str]:
    return ["run", "--no-prefect", "-c", "configs/quickstart.yaml", *[a for o in overrides for a in ("--set", o)]]


def test_no_wait_refuses_a_stage_another_process_holds(tiny_model, tmp_path, capsys):
    overrides = [*tiny_overrides(tiny_model, tmp_path / "runs"), "method.iterations=0"]
    config = load_config(ROOT / "configs" / "quickstart.yaml", overrides)
    lease = StageLease(Run(config).storage, "iter-0-sample_prompts", label="iter-0/sample_prompts")
    lease.acquire()
    try:
        code = main([*cli_args(overrides), "--no-wait"])
    finally:
        lease.release()
    err = capsys.readouterr().err
    assert code == 2
    assert "iter-0/sample_prompts is being run by another process" in err and f"pid {os.getpid()}" in err
    assert Run(config).dir(iteration_nodes(config, 0)[0]).read_manifest() is None  # nothing was run


@pytest.mark.slow
def test_two_runs_of_one_run_id_at_once_execute_every_stage_once(tiny_model, tmp_path):
    overrides = [*tiny_overrides(tiny_model, tmp_path / "runs"), "method.iterations=0"]
    command = [sys.executable, "-m", "alphaspin.flows.cli", *cli_args(overrides), "--verbose"]  # logs on stderr
    first = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(3)
    second = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    logs = [process.communicate(timeout=600)[1] for process in (first, second)]
    assert [first.returncode, second.returncode] == [0, 0], "\n".join(log[-3000:] for log in logs)

    config = load_config(ROOT / "configs" / "quickstart.yaml", overrides)
    labels = [node.label for node in iteration_nodes(config, 0)]
    ran = Counter(m for log in logs for m in re.findall(r"alphaspin\.runner: (iter-\d+/[\w-]+): running", log))
    assert ran == Counter(labels), ran  # each stage executed exactly once, by one of the two
    waited = "\n".join(logs)
    assert "done by another process meanwhile" in waited or "waiting for" in waited
    run = Run(config)
    for node in iteration_nodes(config, 0):
        assert run.dir(node).verify() is not None, node.label
    cache = run.storage.stage(None, BASE_CACHE)
    assert len([n for n in cache.list_files() if n.endswith(".parquet")]) == 1  # the base log-probs once
    assert not run.storage.find_files(run.storage.path("_leases"))  # every lease released
