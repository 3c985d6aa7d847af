"""Grids of runs: expansion and naming, every bad input refused naming its axis, the interval maths
by hand, and (slow) a tiny grid end to end: iteration 0 computed once per seed, intervals equal to
hand-computed ones from the stored metrics, and a killed grid that resumes."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from alphaspin.config import ConfigError
from alphaspin.grid import idempotency_key, load_grid
from alphaspin.grid_report import (
    TrajectoryError,
    alpha_baselines,
    alpha_groups,
    format_kl_rise,
    kl_rise_rows,
    kl_table,
    mean_ci,
    paired_difference,
    rise_after_lowest,
)
from alphaspin.storage import MANIFEST

ROOT = Path(__file__).resolve().parents[1]
RECIPE = str(ROOT / "configs" / "quickstart.yaml")


def write_grid(tmp_path: Path, **fields) -> Path:
    spec = {"name": "g", "recipe": RECIPE, "runs_root": str(tmp_path / "runs"), **fields}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


# -- expansion ------------------------------------------------------------------------------------
def test_cells_are_the_product_of_the_axes_times_the_seeds_named_from_their_values(tmp_path):
    path = write_grid(
        tmp_path,
        base={"method": {"iterations": 1}, "training.beta": 0.2},
        axes={"method.alpha": [1.0, 0.95], "method.history": [1, "inf"]},
        seeds=[0, 3],
        baseline={"method.alpha": 1, "method.history": 1},
    )
    grid = load_grid(path, ["generation.max_new_tokens=9"])
    assert grid.cell_names == ["alpha1-h1", "alpha1-hinf", "alpha0.95-h1", "alpha0.95-hinf"]
    assert [c.run_id for c in grid.runs_of("alpha0.95-hinf")] == ["g-alpha0.95-hinf-s0", "g-alpha0.95-hinf-s3"]
    cell = grid.runs_of("alpha0.95-hinf")[1]
    config = cell.config
    assert (config.method.alpha, config.method.history, config.run.seed) == (0.95, "inf", 3)
    assert config.method.iterations == 1 and config.training.beta == 0.2 and config.generation.max_new_tokens == 9
    assert config.orchestration.grid == "g" and config.run.runs_root == str(tmp_path / "runs")
    assert config.model.name_or_path == "builtin:smollm2-135m-instruct"  # the rest is the recipe's
    assert grid.baseline == "alpha1-h1"
    key = idempotency_key(grid, cell)
    assert key.startswith("g-g-alpha0.95-hinf-s3-") and key == idempotency_key(grid, cell)


def test_strings_and_booleans_name_cells_readably(tmp_path):
    grid = load_grid(
        write_grid(tmp_path, axes={"method.opponent": ["arithmetic", "sir"], "training.disable_dropout": [True]})
    )
    assert grid.cell_names == ["opponent-arithmetic-disable_dropout-true", "opponent-sir-disable_dropout-true"]


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("grid-*.yaml")), ids=lambda p: p.name)
def test_every_shipped_grid_loads(path):
    assert load_grid(path).cells


def test_the_paper_grid_is_the_papers_ablation():
    grid = load_grid(ROOT / "configs" / "grid-paper.yaml")
    assert grid.axes == {"method.alpha": [1.0, 0.95, 0.8], "method.history": [1, 2, "inf"]}
    assert grid.baseline == "alpha1-h2" and len(grid.cells) == 27 and grid.spec.deployment == "alphaspin-recipe/gpu"
    assert {c.config.model.name_or_path for c in grid.cells} == {"google/gemma-2b"}


# -- bad input: refused before anything runs, naming the axis -------------------------------------
@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"axes": {"method.alfa": [1.0]}}, "axis method.alfa: unknown knob"),
        ({"axes": {"method.alpha": [1.0, 1.5]}}, "axis method.alpha: value 1.5 refused: method.alpha"),
        ({"axes": {"method.history": [2, 0]}}, "axis method.history: value 0 refused"),
        ({"axes": {"method.alpha": []}}, "axis method.alpha: no values"),
        ({"axes": {"method.history": [2, "2"]}}, "axis method.history: values 2 and '2' resolve to the same config"),
        ({"axes": {"method.alpha": [1, 1.0]}}, "axis method.alpha: values 1 and 1.0 resolve to the same config"),
        ({"axes": {"method.history": ["inf", float("inf")]}}, "axis method.history: values 'inf' and inf resolve"),
        (
            {"axes": {"method.alpha": [1.0, 0.8]}, "baseline": {"method.alpha": 0.5}},
            "baseline: axis method.alpha: 0.5 is not one of its values",
        ),
        (
            {"axes": {"method.alpha": [1.0]}, "baseline": {"method.history": 2}},
            "baseline: method.history is not an axis",
        ),
        ({"axes": {"run.seed": [1, 2]}}, "axis run.seed: not a grid axis (use seeds:)"),
        ({"axes": {"orchestration.retries": [1, 2]}}, "axis orchestration.retries: not a grid axis"),
        (
            {
                "base": {"method.alpha": 1.0},
                "axes": {"training.loss_type": ["sigmoid", "ipo"], "method.alpha": [1.0, 0.9]},
            },
            "cell method.alpha=0.9, training.loss_type=ipo: training.loss_type: 'ipo' does not cancel",
        ),
        ({"seeds": []}, "seeds"),
        ({"axes": {"method.alpha": [1.0]}, "colour": "red"}, "colour: unknown field"),
    ],
)
def test_bad_grids_are_refused_with_one_line_naming_the_axis(tmp_path, fields, message):
    with pytest.raises(ConfigError) as error:
        load_grid(write_grid(tmp_path, **fields))
    assert message in str(error.value) and "\n" not in str(error.value)
    assert not (tmp_path / "runs").exists()  # nothing ran, nothing was written


# -- the interval maths, by hand ------------------------------------------------------------------
def test_mean_and_95_percent_t_interval_by_hand():
    # Student t quantiles in closed form: 1 degree of freedom tan(π(p − ½)), 2 degrees (2p − 1)·√(2 / (4p(1 − p)))
    p = 0.975
    t1, t2 = math.tan(math.pi * (p - 0.5)), (2 * p - 1) * math.sqrt(2 / (4 * p * (1 - p)))
    assert (t1, t2) == pytest.approx((12.7062047, 4.3026527), abs=1e-7)
    # x = 1, 2, 3: mean 2, s = 1, half-width t2·1/√3 = 2.4841377
    ci = mean_ci([1.0, 2.0, 3.0])
    assert (ci.n, ci.mean) == (3, 2.0)
    assert ci.half == pytest.approx(t2 / math.sqrt(3), rel=1e-12)
    assert (ci.low, ci.high) == pytest.approx((2 - 2.4841377, 2 + 2.4841377), abs=1e-7)
    # x = 0.5, 0.7: s = 0.2/√2, half-width t1·s/√2 = t1·0.1
    assert mean_ci([0.5, 0.7]).half == pytest.approx(t1 * 0.1, rel=1e-12)
    one = mean_ci([4.0])  # n = 1: the mean, no interval
    assert (one.mean, one.low, one.high, one.half) == (4.0, None, None, None)


def test_paired_difference_pairs_by_seed():
    cell, baseline = {0: 3.0, 1: 5.0, 7: 1.0}, {0: 1.0, 1: 2.0, 2: 9.0}  # seeds 0 and 1 in both: d = 2, 3
    diff = paired_difference(cell, baseline)
    assert (diff.n, diff.mean) == (2, 2.5)
    assert diff.half == pytest.approx(math.tan(math.pi * 0.475) * math.sqrt(0.5) / math.sqrt(2), rel=1e-12)
    assert paired_difference({3: 1.0}, {0: 1.0}) is None


# -- the KL rise after the lowest iteration, by hand ------------------------------------------------
T2 = (2 * 0.975 - 1) * math.sqrt(2 / (4 * 0.975 * 0.025))  # t(0.975, 2 degrees of freedom), closed form
# Per-seed KL(p_data‖π_t) of a 2 × 2 grid (α ∈ {1, 0.8} × h ∈ {1, 2}), seeds 0, 1, 2, iterations 0, 1, 2:
# cell → iteration → [seed 0, seed 1, seed 2].
KL_BY_HAND = {
    # SPIN, h = 2: means 4.5, 3.5, 4.5 → t* = 1; rises 4 − 3, 4 − 3.5, 5.5 − 4 = 1, 0.5, 1.5
    "alpha1-h2": {0: [4.0, 4.5, 5.0], 1: [3.0, 3.5, 4.0], 2: [4.0, 4.0, 5.5]},
    # α = 0.8, h = 2: means 4.5, 3.5, 3.3 → t* = 2 = T: no rise
    "alpha0.8-h2": {0: [4.0, 4.5, 5.0], 1: [3.5, 3.5, 3.5], 2: [3.2, 3.4, 3.3]},
    # SPIN, h = 1: means 5, 4, 4: a tie, t* = 1 (the earliest); rises 4 − 3, 4 − 4, 4 − 5 = 1, 0, −1
    "alpha1-h1": {0: [5.0, 5.0, 5.0], 1: [3.0, 4.0, 5.0], 2: [4.0, 4.0, 4.0]},
    # α = 0.8, h = 1: means 5, 3, 3.5 → t* = 1; rises 0.5, 0.5, 0.5
    "alpha0.8-h1": {0: [5.0, 5.0, 5.0], 1: [2.0, 3.0, 4.0], 2: [2.5, 3.5, 4.5]},
}


def rise_grid(tmp_path: Path, seeds: list[int] | None = None):
    return load_grid(
        write_grid(
            tmp_path,
            base={"data.source": "builtin:synthetic", "method.iterations": 2},
            axes={"method.alpha": [1.0, 0.8], "method.history": [1, 2]},
            seeds=seeds or [0, 1, 2],
            baseline={"method.alpha": 1.0, "method.history": 2},
        )
    )


def per_run_by_hand(grid, kl: dict = KL_BY_HAND) -> dict:
    """The records grid_report.collect reads (run id → iteration → metric → value), made by hand."""
    return {
        run.run_id: {t: {"synthetic/kl": values[i], "train/loss": 0.5} for t, values in kl[run.name].items()}
        for run in grid.cells
        for i in [grid.spec.seeds.index(run.seed)]
    }


def test_kl_rise_is_paired_against_spin_at_the_same_h(tmp_path):
    # without an α axis, against the baseline itself; without a baseline, against nothing
    no_alpha = load_grid(write_grid(tmp_path, axes={"method.history": [1, 2]}, baseline={"method.history": 2}))
    assert alpha_baselines(no_alpha) == {"h1": "h2", "h2": "h2"}
    unpaired = load_grid(write_grid(tmp_path, base={"method.iterations": 1}, axes={"method.alpha": [1.0, 0.8]}))
    assert alpha_baselines(unpaired) == {}
    per_run = {"g-alpha1-s0": {0: {"synthetic/kl": 2.0}, 1: {"synthetic/kl": 3.0}}, "g-alpha0.8-s0": {}}
    text = "\n".join(format_kl_rise(kl_rise_rows(unpaired, per_run)))
    assert "| alpha1 | 1 | 0 → 1 | 2 (n = 1: no interval) | – | +1 (n = 1: no interval) | – | – |" in text
    assert "| alpha0.8 | – | not reported | – | – | – | – | – |" in text
    assert alpha_baselines(load_grid(ROOT / "configs" / "grid-cpu.yaml")) == {
        f"alpha{a}-h{h}": f"alpha1-h{h}" for a in ("1", "0.95", "0.8") for h in ("1", "2", "inf")
    }
    assert alpha_groups(load_grid(ROOT / "configs" / "grid-cpu.yaml"))[2] == (
        "h=inf",
        ["alpha1-hinf", "alpha0.95-hinf", "alpha0.8-hinf"],
    )


def test_lowest_iteration_and_rise_by_hand(tmp_path):
    grid = rise_grid(tmp_path)
    per_run = per_run_by_hand(grid)
    assert kl_table(grid, per_run, "alpha1-h2") == {t: dict(enumerate(v)) for t, v in KL_BY_HAND["alpha1-h2"].items()}
    assert rise_after_lowest(kl_table(grid, per_run, "alpha1-h2")) == (
        1,
        {0: 3.0, 1: 3.5, 2: 4.0},
        {0: 1, 1: 0.5, 2: 1.5},
    )
    best, _, rises = rise_after_lowest(kl_table(grid, per_run, "alpha0.8-h2"))
    assert (best, rises) == (2, {0: 0.0, 1: 0.0, 2: 0.0})  # lowest at T: no rise
    best, at_best, rises = rise_after_lowest(kl_table(grid, per_run, "alpha1-h1"))
    assert (best, at_best, rises) == (1, {0: 3.0, 1: 4.0, 2: 5.0}, {0: 1.0, 1: 0.0, 2: -1.0})  # tie 1 and 2: earliest

    rows = {r["cell"]: r for r in kl_rise_rows(grid, per_run)}
    spin = rows["alpha1-h2"]
    assert (spin["baseline"], spin["n"], spin["lowest_iteration"], spin["last_iteration"]) == ("alpha1-h2", 3, 1, 2)
    # KL at t* = 3, 3.5, 4: mean 3.5, s = 0.5, half-width t·0.5/√3; rises 1, 0.5, 1.5: mean 1, s = 0.5
    assert spin["kl_at_lowest"] == pytest.approx(3.5, rel=1e-12)
    assert spin["kl_at_lowest_ci_high"] - 3.5 == pytest.approx(T2 * 0.5 / math.sqrt(3), rel=1e-9)
    assert spin["rise"] == pytest.approx(1.0, rel=1e-12)
    assert (spin["rise_ci_low"], spin["rise_ci_high"]) == pytest.approx(
        (1 - T2 * 0.5 / math.sqrt(3), 1 + T2 * 0.5 / math.sqrt(3)), rel=1e-9
    )
    assert spin["delta_rise"] is None and spin["delta_kl_at_lowest"] is None  # its own baseline

    strong = rows["alpha0.8-h2"]  # against SPIN at h = 2
    assert (strong["baseline"], strong["lowest_iteration"]) == ("alpha1-h2", 2)
    assert (strong["rise"], strong["rise_ci_low"], strong["rise_ci_high"]) == (0.0, 0.0, 0.0)
    # Δ KL at t*: its KL at t = 2 minus SPIN's at t = 1: 3.2 − 3, 3.4 − 3.5, 3.3 − 4 = 0.2, −0.1, −0.7:
    # mean −0.2, deviations 0.4, 0.1, −0.5, s² = 0.42/2 = 0.21, half-width t·√(0.21/3)
    assert strong["delta_kl_at_lowest"] == pytest.approx(-0.2, rel=1e-9)
    assert strong["delta_kl_at_lowest_ci_high"] + 0.2 == pytest.approx(T2 * math.sqrt(0.07), rel=1e-9)
    # Δ rise: 0 − (1, 0.5, 1.5) = −1, −0.5, −1.5: mean −1, s = 0.5
    assert strong["delta_rise"] == pytest.approx(-1.0, rel=1e-12)
    assert (strong["delta_rise_ci_low"], strong["delta_rise_ci_high"]) == pytest.approx(
        (-1 - T2 * 0.5 / math.sqrt(3), -1 + T2 * 0.5 / math.sqrt(3)), rel=1e-9
    )
    assert strong["delta_rise_n"] == 3

    tie = rows["alpha1-h1"]  # rises 1, 0, −1: mean 0, s = 1
    assert (tie["lowest_iteration"], tie["rise"]) == (1, 0.0)
    assert tie["rise_ci_high"] == pytest.approx(T2 / math.sqrt(3), rel=1e-9)
    # α = 0.8, h = 1 is paired against SPIN at h = 1 (not the grid's baseline h = 2): KL at t* 2, 3, 4
    # minus 3, 4, 5 = −1 for every seed (s = 0: a zero-width interval); rises 0.5 − (1, 0, −1) = −0.5, 0.5, 1.5
    weak = rows["alpha0.8-h1"]
    assert weak["baseline"] == "alpha1-h1"
    assert (weak["delta_kl_at_lowest"], weak["delta_kl_at_lowest_ci_low"]) == (-1.0, -1.0)
    assert weak["delta_rise"] == pytest.approx(0.5, rel=1e-12)
    assert weak["delta_rise_ci_high"] - 0.5 == pytest.approx(T2 / math.sqrt(3), rel=1e-9)

    text = "\n".join(format_kl_rise(list(rows.values())))
    assert (
        "| alpha1-h2 | 3 | 1 → 2 | 3.5 [2.258, 4.742] | baseline | +1 [-0.2421, 2.242] | baseline | alpha1-h2 |" in text
    )
    assert (
        "| alpha0.8-h2 | 3 | 2 → 2 | 3.3 [3.052, 3.548] | -0.2 [-1.338, 0.9384] | +0 [0, 0] | -1 [-2.242, 0.2421] |"
        in text
    )


def test_kl_rise_with_one_seed_has_no_interval_and_does_not_fail(tmp_path):
    grid = rise_grid(tmp_path, seeds=[0])
    rows = {r["cell"]: r for r in kl_rise_rows(grid, per_run_by_hand(grid))}
    strong = rows["alpha0.8-h2"]  # seed 0 only: rise 0, Δ rise 0 − 1, Δ KL at t* 3.2 − 3
    assert (strong["n"], strong["rise"], strong["delta_rise"], strong["delta_rise_n"]) == (1, 0.0, -1.0, 1)
    assert strong["delta_kl_at_lowest"] == pytest.approx(0.2, rel=1e-12)
    assert all(strong[k] is None for k in strong if k.endswith(("_ci_low", "_ci_high")))
    text = "\n".join(format_kl_rise(list(rows.values())))
    assert "| alpha0.8-h2 | 1 | 2 → 2 | 3.2 (n = 1: no interval) | +0.2 (n = 1: no interval) |" in text
    assert "nan" not in text.lower()


def test_a_cell_missing_an_iteration_is_not_reported_and_named(tmp_path):
    grid = rise_grid(tmp_path)
    per_run = per_run_by_hand(grid)
    del per_run["g-alpha1-h1-s2"][2]  # seed 2 of SPIN at h = 1 has not reached its last iteration
    per_run["g-alpha0.8-h2-s1"][1]["synthetic/kl"] = float("nan")
    with pytest.raises(
        TrajectoryError,
        match=r"^cell alpha1-h1: run g-alpha1-h1-s2 \(seed 2\) has no finite synthetic/kl at iteration 2$",
    ):
        kl_table(grid, per_run, "alpha1-h1")
    rows = {r["cell"]: r for r in kl_rise_rows(grid, per_run)}
    assert (
        rows["alpha1-h1"]["skipped"]
        == "cell alpha1-h1: run g-alpha1-h1-s2 (seed 2) has no finite synthetic/kl at iteration 2"
    )
    assert rows["alpha0.8-h2"]["skipped"].endswith(
        "run g-alpha0.8-h2-s1 (seed 1) has no finite synthetic/kl at iteration 1"
    )
    weak = rows["alpha0.8-h1"]  # its own trajectory is reported; its baseline's is not, so no Δ
    assert (weak["lowest_iteration"], weak["rise"], weak["delta_rise"]) == (1, pytest.approx(0.5), None)
    assert rows["alpha1-h2"]["rise"] == pytest.approx(1.0)
    text = "\n".join(format_kl_rise(list(rows.values())))
    assert "| alpha1-h1 | – | not reported | – | – | – | – | alpha1-h1 |" in text
    assert "| alpha0.8-h1 | 3 | 1 → 2 | 3 [0.5159, 5.484] | – |" in text
    assert "- cell alpha1-h1: run g-alpha1-h1-s2 (seed 2) has no finite synthetic/kl at iteration 2" in text


def test_grid_report_prints_the_kl_rise_table_from_stored_records(tmp_path, capsys):
    """`alphaspin grid-report` on hand-made stored evaluate records (run.json and manifests written
    through the storage API, no stage run): the table, kl_rise.csv and the chart."""
    from alphaspin.flows.cli import main
    from alphaspin.runs import Run

    grid = rise_grid(tmp_path)
    for run in grid.cells:
        stored = Run(run.config)
        stored.ensure()
        for t, values in KL_BY_HAND[run.name].items():
            kl = values[grid.spec.seeds.index(run.seed)]
            metrics = {"synthetic/kl": kl, "synthetic/support_mass": 1 / kl, "synthetic/base_kl": 7.5}
            stored.storage.stage(t, "evaluate").commit("evaluate", t, f"key-{t}", metrics=metrics)
    assert main(["grid-report", "-c", str(tmp_path / "grid.yaml")]) == 0
    printed = capsys.readouterr().out
    assert "## Does the KL rise after its lowest iteration? (synthetic/kl)" in printed
    assert (
        "| alpha0.8-h1 | 3 | 1 → 2 | 3 [0.5159, 5.484] | -1 [-1, -1] | +0.5 [0.5, 0.5] | +0.5 [-1.984, 2.984] | alpha1-h1 |"
    ) in printed
    out = tmp_path / "runs" / "g"
    assert (out / "kl_over_iterations.png").stat().st_size > 0 and "kl_over_iterations.png" in printed
    rows = {r["cell"]: r for r in _rows(out / "kl_rise.csv")}
    assert float(rows["alpha0.8-h2"]["delta_rise"]) == pytest.approx(-1.0)
    assert rows["alpha0.8-h2"]["lowest_iteration"] == "2" and rows["alpha1-h1"]["baseline"] == "alpha1-h1"


# -- end to end on the tiny model -----------------------------------------------------------------
def tiny_grid(tmp_path: Path, model: str) -> Path:
    """2 cells (α = 1, the baseline, and α = 0.8) x 2 seeds, T = 1, on the synthetic task (its exact KL),
    without the benchmarks."""
    from conftest import TINY_OVERRIDES

    base = dict(item.split("=", 1) for item in TINY_OVERRIDES)
    base = {key: yaml.safe_load(value) for key, value in base.items()}
    base.update(
        {
            "model.name_or_path": model,
            "data.source": "builtin:synthetic",
            "evaluation.benchmarks": [],
            "evaluation.judge.enabled": False,
        }
    )
    return write_grid(
        tmp_path,
        name="tiny",
        base=base,
        axes={"method.alpha": [1.0, 0.8]},
        seeds=[0, 1],
        baseline={"method.alpha": 1.0},
    )


def _manifest(runs: Path, run_id: str, t: int, stage: str) -> dict | None:
    path = runs / run_id / f"iter-{t}" / stage / MANIFEST
    return json.loads(path.read_text()) if path.exists() else None


@pytest.mark.slow
def test_a_tiny_grid_shares_iteration_0_reports_intervals_and_resumes_after_a_kill(tmp_path, tiny_model):
    from alphaspin.flows.cli import main

    path = tiny_grid(tmp_path, tiny_model)
    runs = tmp_path / "runs"
    command = [sys.executable, "-m", "alphaspin.flows.cli", "grid", "-c", str(path), "--no-prefect"]
    # killed (-9) once the first cell's iteration 0 is evaluated
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while _manifest(runs, "tiny-alpha1-s0", 0, "evaluate") is None:
            assert process.poll() is None, "the grid ended before it was killed"
            assert time.monotonic() < deadline
            time.sleep(0.5)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    first = {stage: _manifest(runs, "tiny-alpha1-s0", 0, stage)["attempt"] for stage in ("train", "evaluate")}
    assert main(["grid", "-c", str(path), "--status"]) == 0

    assert main(["grid", "-c", str(path), "--no-prefect"]) == 0  # resumes
    assert {s: _manifest(runs, "tiny-alpha1-s0", 0, s)["attempt"] for s in first} == first  # not redone
    run_ids = [f"tiny-alpha{a}-s{s}" for a in ("1", "0.8") for s in (0, 1)]
    # iteration 0 ran once per seed: the α = 0.8 cells adopted every stage of it, with the provenance
    for seed in (0, 1):
        for stage in ("sample_prompts", "generate-base", "build_pairs", "reference_logps", "train", "evaluate"):
            donor = _manifest(runs, f"tiny-alpha1-s{seed}", 0, stage)
            adopted = _manifest(runs, f"tiny-alpha0.8-s{seed}", 0, stage)
            assert "adopted_from" not in donor["metrics"]
            assert adopted["metrics"]["adopted_from"].endswith(f"tiny-alpha1-s{seed}/iter-0/{stage}")
            assert adopted["cache_key"] == donor["cache_key"] and adopted["attempt"] == donor["attempt"]
        # at t = 1 the generations do not read α; the reference and what follows do
        assert "adopted_from" in _manifest(runs, f"tiny-alpha0.8-s{seed}", 1, "generate-iter-0")["metrics"]
        assert "adopted_from" not in _manifest(runs, f"tiny-alpha0.8-s{seed}", 1, "reference_logps")["metrics"]

    # the intervals equal hand-computed ones from the stored per-run metrics
    report = runs / "tiny" / "report.md"
    assert report.exists() and (runs / "tiny" / "metrics_over_iterations.png").exists()
    assert (runs / "tiny" / "sweep_alpha.png").exists()
    stored = {r: {t: _manifest(runs, r, t, "evaluate")["metrics"] for t in (0, 1)} for r in run_ids}
    summary = _csv(runs / "tiny" / "summary.csv")
    differences = _csv(runs / "tiny" / "differences.csv")
    t_975_1 = math.tan(math.pi * 0.475)  # t(0.975, 1 degree of freedom)
    for metric in ("heldout/reward_margin", "train/loss"):
        for t in (0, 1):
            base = [stored[f"tiny-alpha1-s{s}"][t][metric] for s in (0, 1)]
            cell = [stored[f"tiny-alpha0.8-s{s}"][t][metric] for s in (0, 1)]
            for name, x in (("alpha1", base), ("alpha0.8", cell)):
                # n = 2: s = |x0 − x1|/√2, half-width t·s/√2 = t·|x0 − x1|/2
                mean, half = (x[0] + x[1]) / 2, t_975_1 * abs(x[0] - x[1]) / 2
                row = summary[(metric, name, str(t))]
                assert float(row["mean"]) == pytest.approx(mean, rel=1e-9, abs=1e-12)
                assert float(row["ci_high"]) - float(row["mean"]) == pytest.approx(half, rel=1e-6, abs=1e-12)
            d = [cell[0] - base[0], cell[1] - base[1]]
            row = differences[(metric, "alpha0.8", str(t))]
            assert float(row["difference"]) == pytest.approx((d[0] + d[1]) / 2, rel=1e-9, abs=1e-12)
            assert float(row["ci_high"]) - float(row["difference"]) == pytest.approx(
                t_975_1 * abs(d[0] - d[1]) / 2, rel=1e-6, abs=1e-12
            )
            if t == 0:  # iteration 0 is the same stage in both cells: no difference at all
                assert d == [0.0, 0.0]
    # the KL rise, by hand from the stored KLs: t* the iteration of the lower mean (the earlier on a tie),
    # rise KL(1) − KL(t*) per seed; Δ rise against α = 1 (SPIN: no h axis, the baseline itself) by seed
    rise = {r["cell"]: r for r in _rows(runs / "tiny" / "kl_rise.csv")}
    rises = {}
    for name in ("alpha1", "alpha0.8"):
        kl = {t: [stored[f"tiny-{name}-s{s}"][t]["synthetic/kl"] for s in (0, 1)] for t in (0, 1)}
        best = 0 if kl[0][0] + kl[0][1] <= kl[1][0] + kl[1][1] else 1
        rises[name] = [kl[1][s] - kl[best][s] for s in (0, 1)]
        row = rise[name]
        assert (row["baseline"], row["n"], row["lowest_iteration"], row["last_iteration"]) == (
            "alpha1",
            "2",
            str(best),
            "1",
        )
        assert float(row["kl_at_lowest"]) == pytest.approx((kl[best][0] + kl[best][1]) / 2, rel=1e-9)
        assert float(row["rise"]) == pytest.approx(sum(rises[name]) / 2, rel=1e-9, abs=1e-12)
        if rises[name][0] != rises[name][1]:
            half = t_975_1 * abs(rises[name][0] - rises[name][1]) / 2
            assert float(row["rise_ci_high"]) - float(row["rise"]) == pytest.approx(half, rel=1e-6)
    d = [rises["alpha0.8"][s] - rises["alpha1"][s] for s in (0, 1)]
    assert float(rise["alpha0.8"]["delta_rise"]) == pytest.approx((d[0] + d[1]) / 2, rel=1e-9, abs=1e-12)
    assert (runs / "tiny" / "kl_over_iterations.png").exists()
    text = report.read_text()
    assert "% saved" in text and "| alpha0.8 | 1 | 2 |" in text
    assert "## Does the KL rise after its lowest iteration? (synthetic/kl)" in text


def _rows(path: Path) -> list[dict[str, str]]:
    import csv

    with path.open() as handle:
        return list(csv.DictReader(handle))


def _csv(path: Path) -> dict[tuple[str, str, str], dict[str, str]]:
    return {(r["metric"], r["cell"], r["iteration"]): r for r in _rows(path)}


@pytest.mark.slow
def test_the_grid_flow_runs_its_cells_through_prefect_and_shares_iteration_0(tmp_path, tiny_model, prefect_server):
    """The default path (`alphaspin grid` without --no-prefect): the `alphaspin-grid` flow runs every
    cell as a task with its run's subflows; the second cell adopts iteration 0 from the first."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    from alphaspin.flows.cli import main

    path = tiny_grid(tmp_path, tiny_model)
    spec = yaml.safe_load(path.read_text())
    spec.update(seeds=[0], base={**spec["base"], "method.iterations": 0})
    path.write_text(yaml.safe_dump(spec))
    assert main(["grid", "-c", str(path)]) == 0
    runs = tmp_path / "runs"
    for stage in ("sample_prompts", "generate-base", "build_pairs", "reference_logps", "train", "evaluate"):
        adopted = _manifest(runs, "tiny-alpha0.8-s0", 0, stage)["metrics"]
        assert adopted["adopted_from"].endswith(f"tiny-alpha1-s0/iter-0/{stage}")
    assert (runs / "tiny" / "report.md").exists()
    with get_client(sync_client=True) as client:
        grids = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["alphaspin-grid"])))
        runs_of = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["alphaspin-run"])))
    assert [g.state.name for g in grids] == ["Completed"]
    assert sorted(r.name for r in runs_of if r.name.startswith("tiny-")) == ["tiny-alpha0.8-s0", "tiny-alpha1-s0"]
