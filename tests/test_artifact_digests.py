"""The tiny run writes exactly the artifacts recorded in tests/data/tiny-run-digests.json.

Recorded before the stage-registry refactor; a change of any stage's output shows here. Update the
record (``python tests/artifact_digests.py --write``) only together with a stage's code version.
"""

from __future__ import annotations

import json

import pytest
from artifact_digests import GOLDEN, cpu_kernels, run_digests, tiny_run_config

from alphaspin.pipeline import run
from alphaspin.storage import RunStorage


@pytest.mark.slow
def test_tiny_run_artifacts_equal_the_recorded_digests(tmp_path):
    recorded = json.loads(GOLDEN.read_text())
    config = tiny_run_config(tmp_path / "runs")
    run(config)
    found = run_digests(RunStorage(config.run.runs_root, config.run.run_id))
    assert sorted(found) == sorted(recorded["files"])
    for name, expected in recorded["files"].items():
        assert found[name]["values"] == expected["values"], name
    if recorded["cpu_kernels"] == cpu_kernels():  # same kernels: the very same bytes
        for name, expected in recorded["files"].items():
            assert found[name]["sha256"] == expected["sha256"], name
