"""Reports and charts for a two-iteration fixture: the data behind each chart, not its pixels."""

from __future__ import annotations

import math

import pytest

from alphaspin.benchmarks.report import (
    compare_runs,
    difference_table,
    line_data,
    metric_names,
    radar_data,
    write_report,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# Rows deliberately out of iteration order; companions (_stderr, _ci_*) are not metrics of their own.
SPIN = [
    {
        "iteration": 1,
        "heldout/loglik_per_token": -1.8,
        "heldout/reward_accuracy": 0.75,
        "judge/writing": 6.0,
        "judge/writing_stderr": 0.4,
        "judge/roleplay": 5.5,
        "judge/math": 3.0,
        "judge/coding": 2.5,
        "judge/overall": 4.25,
        "judge/overall_ci_low": 3.0,
        "judge/overall_ci_high": 5.5,
        "lm_eval/alphaspin_arc_easy/acc": 0.45,
        "lm_eval/alphaspin_arc_easy/acc_stderr": 0.04,
        "note": "text is ignored",
    },
    {
        "iteration": 0,
        "heldout/loglik_per_token": -2.0,
        "heldout/reward_accuracy": 0.5,
        "judge/writing": 5.0,
        "judge/writing_stderr": 0.5,
        "judge/roleplay": 4.0,
        "judge/math": 2.0,
        "judge/coding": 2.0,
        "judge/overall": 3.25,
        "lm_eval/alphaspin_arc_easy/acc": 0.40,
        "lm_eval/alphaspin_arc_easy/acc_stderr": 0.05,
    },
]
ALPHA_SPIN = [
    {
        "iteration": 0,
        "heldout/loglik_per_token": -2.0,
        "judge/writing": 5.0,
        "judge/writing_stderr": 0.5,
        "judge/roleplay": 4.0,
        "judge/math": 2.0,
        "judge/coding": 2.0,
        "lm_eval/alphaspin_arc_easy/acc": 0.40,
        "lm_eval/alphaspin_arc_easy/acc_stderr": 0.05,
    },
    {
        "iteration": 1,
        "heldout/loglik_per_token": -1.7,
        "judge/writing": 6.5,
        "judge/writing_stderr": 0.3,
        "judge/roleplay": 6.0,
        "judge/math": 3.5,
        "judge/coding": 2.0,
        "lm_eval/alphaspin_arc_easy/acc": 0.50,
        "lm_eval/alphaspin_arc_easy/acc_stderr": 0.03,
    },
]


def test_metric_names_skip_companions_and_text():
    assert metric_names(SPIN) == [
        "heldout/loglik_per_token",
        "heldout/reward_accuracy",
        "judge/writing",
        "judge/roleplay",
        "judge/math",
        "judge/coding",
        "judge/overall",
        "lm_eval/alphaspin_arc_easy/acc",
    ]


def test_radar_data_has_categories_in_mt_bench_order_per_iteration():
    assert radar_data(SPIN) == {
        "categories": ["writing", "roleplay", "math", "coding"],  # overall is not a category
        "series": {0: [5.0, 4.0, 2.0, 2.0], 1: [6.0, 5.5, 3.0, 2.5]},
    }


def test_line_data_follows_every_metric_over_iterations():
    lines = line_data(SPIN)
    assert set(lines) == set(metric_names(SPIN))
    assert lines["heldout/reward_accuracy"] == {"iterations": [0, 1], "values": [0.5, 0.75], "stderr": [None, None]}
    assert lines["judge/writing"] == {"iterations": [0, 1], "values": [5.0, 6.0], "stderr": [0.5, 0.4]}
    assert lines["lm_eval/alphaspin_arc_easy/acc"]["stderr"] == [0.05, 0.04]
    # A metric missing at an iteration just has no point there.
    partial = line_data([{"iteration": 0, "a": 1.0}, {"iteration": 1, "a": math.nan, "b": 2}])
    assert partial == {
        "a": {"iterations": [0], "values": [1.0], "stderr": [None]},
        "b": {"iterations": [1], "values": [2.0], "stderr": [None]},
    }


def test_write_report_writes_markdown_and_charts(tmp_path):
    out = write_report(SPIN, tmp_path / "report", title="SPIN", run_info={"alpha": 1.0})
    assert out["radar"] == radar_data(SPIN) and out["lines"] == line_data(SPIN)
    for name in ("radar", "lines"):
        assert open(out["files"][name], "rb").read(8) == PNG_MAGIC
    text = open(out["files"]["report"], encoding="utf-8").read()
    assert "# SPIN" in text and "**alpha**: 1.0" in text
    assert "| judge/writing | 5 ± 0.5 | 6 ± 0.4 |" in text
    assert "| heldout/reward_accuracy | 0.5 | 0.75 |" in text
    assert "![judge radar](judge_radar.png)" in text


def test_report_without_judged_categories_has_no_radar(tmp_path):
    out = write_report([{"iteration": 0, "x": 1.0}, {"iteration": 1, "x": 2.0}], tmp_path)
    assert out["radar"] == {"categories": [], "series": {}} and "radar" not in out["files"]
    assert out["lines"] == {"x": {"iterations": [0, 1], "values": [1.0, 2.0], "stderr": [None, None]}}


def test_duplicate_or_missing_iterations_are_errors(tmp_path):
    with pytest.raises(ValueError, match="iteration 0 appears twice"):
        line_data([{"iteration": 0, "x": 1.0}, {"iteration": 0, "x": 2.0}])
    with pytest.raises(ValueError, match="without 'iteration'"):
        radar_data([{"x": 1.0}])


def test_difference_table_by_hand():
    rows = {(r["metric"], r["iteration"]): r for r in difference_table({"spin": SPIN, "alpha-spin": ALPHA_SPIN})}
    # Shared metrics only: reward accuracy and judge/overall exist in SPIN alone.
    assert {metric for metric, _ in rows} == {
        "heldout/loglik_per_token",
        "judge/writing",
        "judge/roleplay",
        "judge/math",
        "judge/coding",
        "lm_eval/alphaspin_arc_easy/acc",
    }
    acc = rows[("lm_eval/alphaspin_arc_easy/acc", 1)]
    se = math.sqrt(0.04**2 + 0.03**2)  # 0.05
    assert acc["baseline"] == "spin" and acc["run"] == "alpha-spin"
    assert acc["difference"] == pytest.approx(0.05) and acc["stderr"] == pytest.approx(se)
    assert (acc["ci_low"], acc["ci_high"]) == pytest.approx((0.05 - 1.959964 * se, 0.05 + 1.959964 * se))
    writing0 = rows[("judge/writing", 0)]
    assert writing0["difference"] == 0.0 and writing0["stderr"] == pytest.approx(math.sqrt(0.5))
    loglik = rows[("heldout/loglik_per_token", 1)]
    assert loglik["difference"] == pytest.approx(0.1) and loglik["stderr"] is None and loglik["ci_low"] is None
    # The other way round with an explicit baseline flips the sign.
    flipped = difference_table({"spin": SPIN, "alpha-spin": ALPHA_SPIN}, baseline="alpha-spin")
    assert next(r for r in flipped if r["metric"] == "judge/math" and r["iteration"] == 1)["difference"] == -0.5
    with pytest.raises(ValueError, match="baseline"):
        difference_table({"spin": SPIN}, baseline="dpo")


def test_compare_runs_draws_both_runs_side_by_side(tmp_path):
    out = compare_runs({"spin": SPIN, "alpha-spin": ALPHA_SPIN}, tmp_path)
    assert out["radar"]["spin"] == radar_data(SPIN)
    assert out["radar"]["alpha-spin"]["series"] == {0: [5.0, 4.0, 2.0, 2.0], 1: [6.5, 6.0, 3.5, 2.0]}
    assert out["lines"]["judge/writing"] == {
        "spin": {"iterations": [0, 1], "values": [5.0, 6.0], "stderr": [0.5, 0.4]},
        "alpha-spin": {"iterations": [0, 1], "values": [5.0, 6.5], "stderr": [0.5, 0.3]},
    }
    assert set(out["lines"]["heldout/reward_accuracy"]) == {"spin"}
    assert out["differences"] == difference_table({"spin": SPIN, "alpha-spin": ALPHA_SPIN})
    for name in ("radar", "lines"):
        assert open(out["files"][name], "rb").read(8) == PNG_MAGIC
    text = open(out["files"]["report"], encoding="utf-8").read()
    assert "against **spin**" in text
    assert "| lm_eval/alphaspin_arc_easy/acc | 1 | alpha-spin | 0.45 | 0.5 | 0.05 ± 0.05 |" in text


def test_a_run_report_is_drawn_again_only_when_its_inputs_change(tmp_path, make_config, monkeypatch):
    """`write_run_report` on stored evaluate records: the second call with the same records keeps the
    stored files (draws nothing); a changed metric, or a chart removed by hand, draws the report again."""
    from alphaspin.benchmarks import report as drawing
    from alphaspin.reporting import REPORT_INPUTS, write_run_report
    from alphaspin.runs import Run

    stored = Run(make_config())
    stored.ensure()
    storage = stored.storage
    for row in SPIN:
        metrics = {k: v for k, v in row.items() if k != "iteration"}
        storage.stage(row["iteration"], "evaluate").commit("evaluate", row["iteration"], "key", metrics=metrics)
    drawn = []
    real = drawing.write_report
    monkeypatch.setattr(drawing, "write_report", lambda *a, **k: drawn.append(1) or real(*a, **k))
    report = storage.stage(None, "report")

    first = write_run_report(storage)
    assert len(drawn) == 1 and REPORT_INPUTS in report.list_files()
    charts = {name: report.read_bytes(name) for name in ("judge_radar.png", "metrics_over_iterations.png")}
    again = write_run_report(storage)
    assert len(drawn) == 1  # kept: nothing drawn
    assert again["markdown"] == first["markdown"] and again["lines"] == first["lines"] == line_data(SPIN)
    assert again["radar"] == first["radar"] and {n: report.read_bytes(n) for n in charts} == charts

    storage.remove(report.file("judge_radar.png"))  # a chart gone: drawn again
    write_run_report(storage)
    assert len(drawn) == 2 and report.read_bytes("judge_radar.png")[:8] == PNG_MAGIC

    metrics = {k: v for k, v in SPIN[0].items() if k != "iteration"}
    storage.stage(1, "evaluate").commit("evaluate", 1, "key", metrics={**metrics, "judge/writing": 7.0})
    changed = write_run_report(storage)
    assert len(drawn) == 3 and "| judge/writing | 5 ± 0.5 | 7 ± 0.4 |" in changed["markdown"]
