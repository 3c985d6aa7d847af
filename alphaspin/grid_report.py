"""The report of a grid of runs: every cell's metrics across seeds, against a baseline cell.

Per metric, cell and iteration: the mean over seeds and its 95% confidence interval (Student t,
mean ± t_(0.975, n−1) · s/√n, s the sample standard deviation; with n = 1 there is no interval), and
the paired difference against the baseline cell: d_s = x(cell, seed s) − x(baseline, seed s) over the
seeds both have, with the same interval on the d_s. Charts in the style of the paper's figures: each
metric over iterations with one band per cell, and the sweep of each axis (α, h) at the last iteration.
Written to ``<runs_root>/<grid>/``: report.md, summary.csv, differences.csv and the PNGs.
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


# -- charts -----------------------------------------------------------------------------------------
def _panels(count: int) -> tuple[int, int]:
    columns = max(1, min(3, count))
    return math.ceil(count / columns), columns


def plot_bands(summary: list[dict], metrics: list[str], cells: list[str], path: Path, title: str) -> Path:
    """Each metric over iterations: the mean over seeds per cell, its 95% interval as a band."""
    rows, columns = _panels(len(metrics))
    fig = Figure(figsize=(4.5 * columns, 3.2 * rows + 0.6), layout="constrained")
    for index, metric in enumerate(metrics, start=1):
        ax = fig.add_subplot(rows, columns, index)
        for cell in cells:
            points = sorted((r["iteration"], r) for r in summary if r["metric"] == metric and r["cell"] == cell)
            if not points:
                continue
            xs, ys = [t for t, _ in points], [r["mean"] for _, r in points]
            (line,) = ax.plot(xs, ys, marker="o", label=cell)
            banded = [(t, r["ci_low"], r["ci_high"]) for t, r in points if r["ci_low"] is not None]
            if banded:
                ax.fill_between(
                    [b[0] for b in banded], [b[1] for b in banded], [b[2] for b in banded],
                    color=line.get_color(), alpha=0.2,
                )  # fmt: skip
        ax.set_title(metric, fontsize="medium")
        ax.set_xlabel("iteration")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.legend(fontsize="x-small")
    fig.suptitle(title)
    fig.savefig(path, dpi=100)
    return path


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
        storage = grid.storage
        for local in sorted(out.iterdir()):
            storage.write_bytes(storage.path(local.name), local.read_bytes())
    return {
        "url": storage.url,
        "markdown": markdown,
        "summary": summary,
        "differences": differences,
        "sharing": sharing,
        "files": ["report.md", "summary.csv", "differences.csv", *files.values()],
    }
