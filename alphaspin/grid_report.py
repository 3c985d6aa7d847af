"""The report of a grid of runs: every cell's metrics across seeds, against a baseline cell.

Per metric, cell and iteration: the mean over seeds and its 95% confidence interval (Student t,
mean ± t_(0.975, n−1) · s/√n, s the sample standard deviation; with n = 1 there is no interval), and
the paired difference against the baseline cell: d_s = x(cell, seed s) − x(baseline, seed s) over the
seeds both have, with the same interval on the d_s. Charts in the style of the paper's figures: each
metric over iterations with one band per cell, and the sweep of each axis (α, h) at the last iteration.

On the synthetic task (``synthetic/kl`` in the runs' metrics) the report also answers "does α < 1 prevent
SPIN's KL rise after the first iterations" (`kl_rise_rows`): per cell, t* = the iteration with the lowest
mean KL(p_data‖π_t) over seeds (on a tie, the earliest), the KL there, and the rise KL(T) − KL(t*) to the
last iteration T, taken per seed; each with its interval and the paired difference (by seed) against SPIN
at the same h: the cell with the baseline's α and this cell's values of every other axis
(`alpha_baselines`). Its chart: KL and support mass over t, one band per cell, one column per h.
Written to ``<runs_root>/<grid>/``: report.md, summary.csv, differences.csv, kl_rise.csv and the PNGs.
"""

from __future__ import annotations

import csv
import io
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from alphaspin.benchmarks.report import metric_names
from alphaspin.grid import SHORT_NAMES, Grid, grid_status, sharing_summary
from alphaspin.reporting import iteration_metrics
from alphaspin.runs import Run

LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    """Mean of n values and its two-sided 95% Student-t interval (None when n < 2)."""

    n: int
    mean: float
    low: float | None
    high: float | None

    @property
    def half(self) -> float | None:
        return None if self.high is None else self.high - self.mean


def mean_ci(values: list[float], level: float = LEVEL) -> Interval:
    """mean ± t_((1+level)/2, n−1) · s/√n; n = 1 gives the mean and no interval."""
    from scipy import stats

    n = len(values)
    if n == 0:
        raise ValueError("mean_ci: no values")
    mean = math.fsum(values) / n
    if n == 1:
        return Interval(1, mean, None, None)
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    half = float(stats.t.ppf((1 + level) / 2, n - 1)) * sd / math.sqrt(n)
    return Interval(n, mean, mean - half, mean + half)


def paired_difference(cell: dict[int, float], baseline: dict[int, float]) -> Interval | None:
    """The interval of x(cell, s) − x(baseline, s) over the seeds s both have (None if none)."""
    seeds = sorted(set(cell) & set(baseline))
    return mean_ci([cell[s] - baseline[s] for s in seeds]) if seeds else None


# -- the numbers -----------------------------------------------------------------------------------
def collect(grid: Grid) -> dict[str, dict[int, dict[str, float]]]:
    """run id → iteration → metric → value, from each run's stored evaluate manifests."""
    out: dict[str, dict[int, dict[str, float]]] = {}
    for cell in grid.cells:
        storage = Run(cell.config).storage
        if not storage.exists(storage.path("run.json")):
            continue
        out[cell.run_id] = {row.pop("iteration"): row for row in iteration_metrics(storage)}
    return out


def chosen_metrics(grid: Grid, per_run: dict[str, dict[int, dict[str, float]]]) -> list[str]:
    rows = [row for by_t in per_run.values() for row in by_t.values()]
    found = metric_names(rows)
    return [m for m in grid.spec.metrics if m in found] if grid.spec.metrics else found


def _by_seed(grid: Grid, per_run: dict, cell: str, t: int, metric: str) -> dict[int, float]:
    values = {}
    for run in grid.runs_of(cell):
        value = per_run.get(run.run_id, {}).get(t, {}).get(metric)
        if isinstance(value, int | float) and math.isfinite(value):
            values[run.seed] = float(value)
    return values


def summarize(grid: Grid, per_run: dict, metrics: list[str]) -> tuple[list[dict], list[dict]]:
    """(summary rows, difference rows) per metric, cell and iteration."""
    iterations = sorted({t for by_t in per_run.values() for t in by_t})
    summary, differences = [], []
    for metric in metrics:
        for cell in grid.cell_names:
            for t in iterations:
                values = _by_seed(grid, per_run, cell, t, metric)
                if not values:
                    continue
                ci = mean_ci([values[s] for s in sorted(values)])
                summary.append(
                    {"metric": metric, "cell": cell, "iteration": t, "n": ci.n, "mean": ci.mean, "ci_low": ci.low,
                     "ci_high": ci.high, "seeds": sorted(values)}
                )  # fmt: skip
                if grid.baseline is None or cell == grid.baseline:
                    continue
                diff = paired_difference(values, _by_seed(grid, per_run, grid.baseline, t, metric))
                if diff is not None:
                    differences.append(
                        {"metric": metric, "cell": cell, "baseline": grid.baseline, "iteration": t, "n": diff.n,
                         "difference": diff.mean, "ci_low": diff.low, "ci_high": diff.high}
                    )  # fmt: skip
    return summary, differences


# -- the KL rise after the lowest iteration (the synthetic task) ---------------------------------------
KL = "synthetic/kl"
SUPPORT_MASS = "synthetic/support_mass"
BASE_OF = {KL: "synthetic/base_kl", SUPPORT_MASS: "synthetic/base_support_mass"}  # π_base's value, per run
ALPHA = "method.alpha"


class TrajectoryError(ValueError):
    """A cell whose KL trajectory is incomplete: names the cell, the run (seed) and the iteration."""


def alpha_baselines(grid: Grid) -> dict[str, str]:
    """cell → the cell its KL rise is paired against: SPIN at the same h, i.e. the cell with the grid
    baseline's α and this cell's values of every other axis (``alpha0.8-h1`` → ``alpha1-h1`` for the
    baseline ``alpha1-h2``). Without an α axis every cell is paired against the baseline itself; without
    a baseline, against nothing ({})."""
    if grid.baseline is None:
        return {}
    if ALPHA not in grid.axes:
        return {cell: grid.baseline for cell in grid.cell_names}
    values = {cell: grid.runs_of(cell)[0].values for cell in grid.cell_names}
    alpha = values[grid.baseline][ALPHA]
    return {
        cell: next(other for other in grid.cell_names if values[other] == {**values[cell], ALPHA: alpha})
        for cell in grid.cell_names
    }


def kl_table(grid: Grid, per_run: dict, cell: str, metric: str = KL) -> dict[int, dict[int, float]]:
    """iteration → seed → KL of one cell, for every iteration 0..T (the cell's method.iterations) and
    every seed of the grid; `TrajectoryError` naming the cell, run and iteration when one is missing (a
    cell still running, a failed run), so every mean of the trajectory is over the same seeds."""
    table: dict[int, dict[int, float]] = {}
    for run in grid.runs_of(cell):
        for t in range(run.config.method.iterations + 1):
            value = per_run.get(run.run_id, {}).get(t, {}).get(metric)
            if not (isinstance(value, int | float) and math.isfinite(value)):
                raise TrajectoryError(
                    f"cell {cell}: run {run.run_id} (seed {run.seed}) has no finite {metric} at iteration {t}"
                )
            table.setdefault(t, {})[run.seed] = float(value)
    return table


def rise_after_lowest(table: dict[int, dict[int, float]]) -> tuple[int, dict[int, float], dict[int, float]]:
    """(t*, seed → KL(t*), seed → KL(T) − KL(t*)) of one cell's ``table`` (iteration → seed → KL, the
    same seeds at every iteration), T its last iteration. t* is the iteration with the lowest mean over
    seeds; on a tie (equal means) the earliest, so the rise is measured over the longest stretch. A cell
    whose KL is lowest at T has t* = T and a rise of 0 for every seed."""
    means = {t: mean_ci([by_seed[s] for s in sorted(by_seed)]).mean for t, by_seed in table.items()}
    lowest = min(means.values())
    best = min(t for t, mean in means.items() if mean == lowest)
    last = max(table)
    at_best = dict(table[best])
    return best, at_best, {seed: table[last][seed] - at_best[seed] for seed in at_best}


def _interval_columns(prefix: str, ci: Interval | None) -> dict[str, Any]:
    if ci is None:
        return {prefix: None, f"{prefix}_ci_low": None, f"{prefix}_ci_high": None, f"{prefix}_n": None}
    return {prefix: ci.mean, f"{prefix}_ci_low": ci.low, f"{prefix}_ci_high": ci.high, f"{prefix}_n": ci.n}


def kl_rise_rows(grid: Grid, per_run: dict, metric: str = KL) -> list[dict[str, Any]]:
    """One row per cell: t* (``lowest_iteration``), T (``last_iteration``), the KL at t* and the rise
    KL(T) − KL(t*), each the mean over seeds with its 95% interval (`mean_ci`), and ``delta_kl_at_lowest``
    / ``delta_rise``: `paired_difference` by seed against the cell of `alpha_baselines` (its KL at its
    own t*, its own rise). A cell with an incomplete trajectory (`kl_table`) is kept with ``skipped``
    saying which run and iteration is missing, and the cells paired against it get no Δ."""
    baselines = alpha_baselines(grid)
    found: dict[str, tuple[int, int, dict[int, float], dict[int, float]]] = {}
    skipped: dict[str, str] = {}
    for cell in grid.cell_names:
        try:
            table = kl_table(grid, per_run, cell, metric)
        except TrajectoryError as error:
            skipped[cell] = str(error)
            continue
        best, at_best, rises = rise_after_lowest(table)
        found[cell] = (best, max(table), at_best, rises)
    rows = []
    for cell in grid.cell_names:
        baseline = baselines.get(cell)
        best, last, at_best, rises = found.get(cell, (None, None, {}, {}))
        versus = found.get(baseline) if cell in found and baseline not in (None, cell) else None
        rows.append(
            {"metric": metric, "cell": cell, "baseline": baseline, "skipped": skipped.get(cell), "n": len(rises),
             "seeds": sorted(rises), "lowest_iteration": best, "last_iteration": last,
             **_interval_columns("kl_at_lowest", mean_ci([at_best[s] for s in sorted(at_best)]) if at_best else None),
             **_interval_columns("rise", mean_ci([rises[s] for s in sorted(rises)]) if rises else None),
             **_interval_columns("delta_kl_at_lowest", paired_difference(at_best, versus[2]) if versus else None),
             **_interval_columns("delta_rise", paired_difference(rises, versus[3]) if versus else None)}
        )  # fmt: skip
    return rows


# -- charts -----------------------------------------------------------------------------------------
def _panels(count: int) -> tuple[int, int]:
    columns = max(1, min(3, count))
    return math.ceil(count / columns), columns


def _band(ax: Any, summary: list[dict], metric: str, cell: str, lowest: int | None = None) -> None:
    """One cell's mean over iterations, its 95% interval as a band, and a ring at ``lowest``."""
    points = sorted((r["iteration"], r) for r in summary if r["metric"] == metric and r["cell"] == cell)
    if not points:
        return
    xs, ys = [t for t, _ in points], [r["mean"] for _, r in points]
    (line,) = ax.plot(xs, ys, marker="o", label=cell)
    banded = [(t, r["ci_low"], r["ci_high"]) for t, r in points if r["ci_low"] is not None]
    if banded:
        ax.fill_between(
            [b[0] for b in banded], [b[1] for b in banded], [b[2] for b in banded], color=line.get_color(), alpha=0.2
        )
    if lowest in xs:
        ax.plot([lowest], [ys[xs.index(lowest)]], marker="o", markersize=13, fillstyle="none", color=line.get_color())


def plot_bands(
    summary: list[dict],
    metrics: list[str],
    cells: list[str],
    path: Path,
    title: str,
    groups: list[tuple[str, list[str]]] | None = None,
    lowest: dict[str, int] | None = None,
    references: dict[str, float] | None = None,
) -> Path:
    """Each metric over iterations: the mean over seeds per cell, its 95% interval as a band.

    By default one panel per metric with every cell. With ``groups`` ((label, cells), e.g. one per h)
    one row per metric and one column per group, the cells of a group in one panel, colours by their
    order in the group (the same α the same colour in every column); ``lowest``: cell → an iteration
    ringed on its line (t*); ``references``: metric → a dashed line (π_base's value)."""
    panels = [(metric, "", cells) for metric in metrics]
    rows, columns = _panels(len(metrics))
    if groups is not None:
        panels = [(metric, label, members) for metric in metrics for label, members in groups]
        rows, columns = len(metrics), len(groups)
    fig = Figure(figsize=(max(4.5 * columns, 6.5), 3.2 * rows + 0.8), layout="constrained")  # room for the title
    for index, (metric, label, members) in enumerate(panels, start=1):
        ax = fig.add_subplot(rows, columns, index)
        for cell in members:
            _band(ax, summary, metric, cell, (lowest or {}).get(cell))
        if references and metric in references:
            ax.axhline(references[metric], color="grey", linestyle="--", linewidth=1, label="π_base")
        ax.set_title(f"{metric} · {label}" if label else metric, fontsize="medium")
        ax.set_xlabel("iteration")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.legend(fontsize="x-small")
    fig.suptitle(title)
    fig.savefig(path, dpi=100)
    return path


def alpha_groups(grid: Grid) -> list[tuple[str, list[str]]]:
    """The cells grouped by their values of every axis but α (one group per h), each group's cells in
    the grid's order: the panels of the KL chart, one column per h with a line per α."""
    groups: dict[str, list[str]] = {}
    for cell in grid.cell_names:
        values = grid.runs_of(cell)[0].values
        label = ", ".join(f"{SHORT_NAMES.get(a, a)}={v}" for a, v in values.items() if a != ALPHA) or "all cells"
        groups.setdefault(label, []).append(cell)
    return list(groups.items())


def plot_sweep(grid: Grid, summary: list[dict], metrics: list[str], axis: str, iteration: int, path: Path) -> Path:
    """Each metric at ``iteration`` against the values of ``axis``, one line per value of the other
    axes (e.g. the α sweep, one line per h), mean ± 95% interval across seeds."""
    values = grid.axes[axis]
    others = [a for a in grid.axes if a != axis]
    rows, columns = _panels(len(metrics))
    fig = Figure(figsize=(4.5 * columns, 3.2 * rows + 0.6), layout="constrained")
    by_cell = {(r["metric"], r["cell"]): r for r in summary if r["iteration"] == iteration}
    for index, metric in enumerate(metrics, start=1):
        ax = fig.add_subplot(rows, columns, index)
        series: dict[str, list[tuple[int, dict]]] = {}
        for cell in grid.cell_names:
            first = grid.runs_of(cell)[0]
            row = by_cell.get((metric, cell))
            if row is None:
                continue
            label = ", ".join(f"{SHORT_NAMES.get(a, a)}={first.values[a]}" for a in others) or metric
            series.setdefault(label, []).append((values.index(first.values[axis]), row))
        for label, points in series.items():
            points.sort(key=lambda p: p[0])
            errors = [[r["mean"] - (r["ci_low"] if r["ci_low"] is not None else r["mean"]) for _, r in points]] * 2
            ax.errorbar([x for x, _ in points], [r["mean"] for _, r in points], yerr=errors, marker="o", capsize=3,
                        label=label)  # fmt: skip
        ax.set_xticks(range(len(values)), [str(v) for v in values])
        ax.set_xlabel(SHORT_NAMES.get(axis, axis))
        ax.set_title(metric, fontsize="medium")
        if len(series) > 1:
            ax.legend(fontsize="x-small")
    fig.suptitle(f"{grid.name}: {axis} sweep at iteration {iteration} (mean ± 95% CI over seeds)")
    fig.savefig(path, dpi=100)
    return path


# -- the report ---------------------------------------------------------------------------------------
def _num(value: float | None) -> str:
    return "–" if value is None else f"{value:.4g}"


def _interval(low: float | None, high: float | None) -> str:
    return "n = 1: no interval" if low is None else f"[{low:.4g}, {high:.4g}]"


def _estimate(row: dict[str, Any], prefix: str, signed: bool = False) -> str:
    """``mean [low, high]`` of an interval column of `kl_rise_rows`; n = 1 says there is no interval."""
    mean = row.get(prefix)
    if mean is None:
        return "–"
    text = f"{mean:+.4g}" if signed else f"{mean:.4g}"
    low, high = row[f"{prefix}_ci_low"], row[f"{prefix}_ci_high"]
    return f"{text} (n = 1: no interval)" if low is None else f"{text} [{low:.4g}, {high:.4g}]"


def format_kl_rise(rows: list[dict[str, Any]]) -> list[str]:
    """The KL-rise section of report.md: the table of `kl_rise_rows`, then the cells not reported."""
    text = [
        f"## Does the KL rise after its lowest iteration? ({rows[0]['metric']})",
        "",
        # one paragraph in markdown, lines that fit a terminal where the command prints it
        "t* is the iteration with the lowest mean KL(p_data‖π_t) over seeds (on a tie, the earliest); the KL at",
        "t* and the rise KL(T) − KL(t*) to the last iteration T are taken per seed: mean [95% interval]. Δ is",
        "paired by seed against the cell in column vs (SPIN at the same h: the baseline's α, this cell's other",
        "values): the cell's KL at its t* minus vs's at its own t*, and the cell's rise minus vs's rise (Δ rise",
        "< 0: less rise than SPIN). t* is picked from the same seeds, so the KL at t* leans low; the intervals",
        "do not include that choice.",
        "",
        "| cell | n | t* → T | KL at t* | Δ KL at t* | rise t* → T | Δ rise | vs |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        baseline = row["baseline"] or "–"
        if row["skipped"] is not None:
            text.append(f"| {row['cell']} | – | not reported | – | – | – | – | {baseline} |")
            continue
        if row["cell"] == row["baseline"]:
            deltas = ("baseline", "baseline")
        elif row["delta_rise"] is None:
            deltas = ("–", "–")
        else:
            deltas = (_estimate(row, "delta_kl_at_lowest", True), _estimate(row, "delta_rise", True))
        text.append(
            f"| {row['cell']} | {row['n']} | {row['lowest_iteration']} → {row['last_iteration']} | "
            f"{_estimate(row, 'kl_at_lowest')} | {deltas[0]} | {_estimate(row, 'rise', True)} | {deltas[1]} | "
            f"{baseline} |"
        )
    skipped = [row["skipped"] for row in rows if row["skipped"] is not None]
    if skipped:
        text += ["", "Not reported (each needs every seed at every iteration 0..T):"]
        text += [f"- {reason}" for reason in skipped]
    return [*text, ""]


def _base_value(per_run: dict, metric: str) -> float | None:
    """π_base's ``metric`` (``synthetic/base_kl``) averaged over the runs (each run's first iteration)."""
    values = []
    for by_t in per_run.values():
        found = [by_t[t][metric] for t in sorted(by_t) if isinstance(by_t[t].get(metric), int | float)]
        if found and math.isfinite(found[0]):
            values.append(float(found[0]))
    return math.fsum(values) / len(values) if values else None


def _csv(rows: list[dict]) -> bytes:
    buffer = io.StringIO()
    if rows:
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return buffer.getvalue().encode()


def write_grid_report(grid: Grid) -> dict[str, Any]:
    """report.md, summary.csv, differences.csv and the charts into ``<runs_root>/<grid>/``."""
    per_run = collect(grid)
    metrics = chosen_metrics(grid, per_run)
    summary, differences = summarize(grid, per_run, metrics)
    found = metric_names([row for by_t in per_run.values() for row in by_t.values()])
    rise = kl_rise_rows(grid, per_run) if KL in found else []
    sharing = sharing_summary(grid_status(grid))
    iterations = sorted({r["iteration"] for r in summary})
    files: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        if summary:
            files["bands"] = plot_bands(summary, metrics, grid.cell_names, out / "metrics_over_iterations.png",
                                        f"{grid.name}: mean and 95% CI over seeds").name  # fmt: skip
            for axis, values in grid.axes.items():
                if len(values) > 1:
                    name = f"sweep_{SHORT_NAMES.get(axis, axis.rsplit('.', 1)[-1])}.png"
                    files[f"sweep {axis}"] = plot_sweep(grid, summary, metrics, axis, iterations[-1], out / name).name
        if rise:
            shown = [m for m in (KL, SUPPORT_MASS) if m in found]
            files["KL and support mass"] = plot_bands(
                summarize(grid, per_run, shown)[0], shown, grid.cell_names, out / "kl_over_iterations.png",
                f"{grid.name}: mean and 95% CI over seeds\nring: t*, the iteration of the lowest mean KL",
                groups=alpha_groups(grid),
                lowest={r["cell"]: r["lowest_iteration"] for r in rise if r["skipped"] is None},
                references={m: v for m in shown if (v := _base_value(per_run, BASE_OF[m])) is not None},
            ).name  # fmt: skip
        text = [
            f"# Grid {grid.name}",
            "",
            f"- **grid file**: {grid.source}",
            "- **axes**: " + "; ".join(f"{a} ∈ {v}" for a, v in grid.axes.items()),
            f"- **seeds**: {grid.spec.seeds}",
            f"- **baseline**: {grid.baseline or '(none)'}",
            f"- **runs**: {len(per_run)} of {len(grid.cells)} started",
            f"- **shared work**: {sharing['executed']} stage executions computed, {sharing['adopted']} adopted from "
            f"another cell ({100 * sharing['saved']:.0f}% saved)",
            "",
            "Mean over seeds with its 95% Student-t interval (mean ± t(0.975, n−1)·s/√n); Δ is the paired difference "
            "against the baseline cell over the seeds both have, with the same interval.",
            "",
        ]
        for key, name in files.items():
            text += [f"![{key}]({name})", ""]
        if rise:
            text += format_kl_rise(rise)
        diff_at = {(d["metric"], d["cell"], d["iteration"]): d for d in differences}
        for metric in metrics:
            text += [f"## {metric}", "", "| cell | iteration | n | mean | 95% CI | Δ vs baseline | Δ 95% CI |"]
            text.append("|---|---|---|---|---|---|---|")
            for row in (r for r in summary if r["metric"] == metric):
                d = diff_at.get((metric, row["cell"], row["iteration"]))
                delta = (_num(d["difference"]), _interval(d["ci_low"], d["ci_high"])) if d else ("–", "–")
                text.append(
                    f"| {row['cell']} | {row['iteration']} | {row['n']} | {_num(row['mean'])} | "
                    f"{_interval(row['ci_low'], row['ci_high'])} | {delta[0]} | {delta[1]} |"
                )
            text.append("")
        markdown = "\n".join(text)
        (out / "report.md").write_text(markdown, encoding="utf-8")
        (out / "summary.csv").write_bytes(_csv([{k: v for k, v in r.items() if k != "seeds"} for r in summary]))
        (out / "differences.csv").write_bytes(_csv(differences))
        if rise:
            (out / "kl_rise.csv").write_bytes(_csv([{k: v for k, v in r.items() if k != "seeds"} for r in rise]))
        storage = grid.storage
        for local in sorted(out.iterdir()):
            storage.write_bytes(storage.path(local.name), local.read_bytes())
    return {
        "url": storage.url,
        "markdown": markdown,
        "summary": summary,
        "differences": differences,
        "kl_rise": rise,
        "sharing": sharing,
        "files": ["report.md", "summary.csv", "differences.csv", *(["kl_rise.csv"] if rise else []), *files.values()],
    }
