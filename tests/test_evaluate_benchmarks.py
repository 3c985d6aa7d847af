"""The evaluate stage runs lm-eval and the judged chat (local judge) and stores their numbers;
the run report and a comparison of two runs are written with the right series."""

from __future__ import annotations

import json
import math

import pytest

from alphaspin.flows.cli import main
from alphaspin.pipeline import run
from alphaspin.reporting import iteration_metrics
from alphaspin.runs import Run
from alphaspin.stage_spec import Node

pytestmark = pytest.mark.slow  # two runs with lm-eval and the judged chat (minutes)


@pytest.fixture(scope="module")
def benchmarked(tmp_path_factory, tiny_model):
    from conftest import tiny_overrides

    from alphaspin.config import load_config

    root = tmp_path_factory.mktemp("runs")
    overrides = [
        *tiny_overrides(tiny_model, root),
        "evaluation.benchmark_limit=4",
        "evaluation.judge.per_category=1",
        "evaluation.judge.answer_max_new_tokens=6",
        "evaluation.judge.categories=[writing, math, stem]",
    ]
    config = load_config("configs/quickstart.yaml", overrides)
    spin = load_config("configs/quickstart.yaml", [*overrides, "method.alpha=1.0", "run.run_id=spin"])
    return config, run(config), run(spin), root


def test_evaluate_stores_lm_eval_and_judge_numbers(benchmarked):
    config, results, _, _ = benchmarked
    ctx = Run(config)
    for row in results:
        assert 0.0 <= row["lm_eval/alphaspin_arc_easy/acc"] <= 1.0
        for category in ("writing", "math", "stem"):
            assert 1.0 <= row[f"judge/{category}"] <= 10.0
        assert math.isfinite(row["judge/overall"])
    files = ctx.dir(Node("evaluate", 1)).read_manifest()["files"]
    assert "benchmarks/lm_eval/lm_eval_results.json" in files
    lm_eval = json.loads(ctx.dir(Node("evaluate", 1)).read_bytes("provenance.json"))["lm_eval"]
    assert lm_eval["version"] and lm_eval["tasks"] == {"alphaspin_arc_easy": 0} and lm_eval["limit"] == 4
    assert set(lm_eval["task_config_sha256"]) == {"alphaspin_arc_easy"}
    summary = json.loads(ctx.dir(Node("evaluate", 1)).read_bytes("benchmarks/judge/judge_summary.json"))
    assert summary["judge"]["temperature"] == 0.0 and summary["judge"]["model"]


def test_run_report_and_comparison(benchmarked, tmp_path, capsys):
    config, results, _, root = benchmarked
    ctx = Run(config)
    report = ctx.storage.stage(None, "report")
    assert {"report.md", "metrics_over_iterations.png", "judge_radar.png"} <= set(report.list_files())
    assert [r["iteration"] for r in iteration_metrics(ctx.storage)] == [0, 1]
    assert main(["compare", config.run.run_id, "spin", "--runs-root", str(root), "--out", str(tmp_path / "cmp")]) == 0
    assert (tmp_path / "cmp" / "comparison.md").exists() and "spin" in capsys.readouterr().out
