"""Per-iteration reports: a markdown page and PNG charts of the evaluation metrics of a run.

Input: one dict per iteration, ``{"iteration": t, "<metric>": value, ...}``, with metric keys such as
``heldout/loglik_per_token``, ``judge/writing`` (from ``judge.judge_metrics``) or
``lm_eval/<task>/<metric>`` (from ``leaderboard.leaderboard_metrics``). A key ending in ``_stderr``
is the standard error of the metric it extends (``judge/writing_stderr``); keys ending in
``_ci_low``, ``_ci_high`` or ``_n`` are companions too. Companions are not drawn as lines of their
own; standard errors become error bars and the uncertainty of differences between runs.

Charts (matplotlib's Agg renderer through ``Figure``, no pyplot state): a radar of the judged
categories per iteration, as in the paper's figures 2-6 (arXiv 2404.04291), and one line panel per
metric over iterations. Each function returns the data it drew, so tests check data, not pixels.
Everything is written to a local folder; the caller uploads it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from alphaspin.benchmarks.judge import CATEGORIES

COMPANION_SUFFIXES = ("_stderr", "_ci_low", "_ci_high", "_n")
JUDGE_PREFIX = "judge/"
Z_95 = 1.959963984540054  # normal 97.5% quantile, for the 95% interval of a difference


def _is_value(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _sorted_iterations(metrics: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    seen: set[int] = set()
    for row in metrics:
        if "iteration" not in row:
            raise ValueError(f"metrics: row without 'iteration': {dict(row)!r:.200}")
        if row["iteration"] in seen:
            raise ValueError(f"metrics: iteration {row['iteration']} appears twice")
        seen.add(row["iteration"])
    return sorted(metrics, key=lambda row: row["iteration"])


def metric_names(metrics: Sequence[Mapping[str, Any]]) -> list[str]:
    """Metric keys (numeric, not ``iteration``, not companions), in first-seen order."""
    names: dict[str, None] = {}
    for row in metrics:
        for key, value in row.items():
            if key != "iteration" and not key.endswith(COMPANION_SUFFIXES) and _is_value(value):
                names.setdefault(key)
    return list(names)


def judge_categories(metrics: Sequence[Mapping[str, Any]], prefix: str = JUDGE_PREFIX) -> list[str]:
    """Judged categories present (``judge/<category>``, not ``judge/overall``), in MT-Bench order."""
    present = {name[len(prefix) :] for name in metric_names(metrics) if name.startswith(prefix)}
    present.discard("overall")
    return [c for c in CATEGORIES if c in present] + sorted(present - set(CATEGORIES))


# ---------------------------------------------------------------------------------------------
# Chart data


def radar_data(metrics: Sequence[Mapping[str, Any]], prefix: str = JUDGE_PREFIX) -> dict[str, Any]:
    """``{"categories": [...], "series": {iteration: [score per category, None if missing]}}``.

    Iterations without any judged category are left out.
    """
    categories = judge_categories(metrics, prefix)
    series: dict[int, list[float | None]] = {}
    for row in _sorted_iterations(metrics):
        values = [row.get(prefix + c) if _is_value(row.get(prefix + c)) else None for c in categories]
        if any(v is not None for v in values):
            series[row["iteration"]] = [float(v) if v is not None else None for v in values]
    return {"categories": categories, "series": series}


def line_data(metrics: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, list]]:
    """``{metric: {"iterations": [...], "values": [...], "stderr": [... or None]}}`` over iterations
    where the metric has a value."""
    rows = _sorted_iterations(metrics)
    data: dict[str, dict[str, list]] = {}
    for name in metric_names(rows):
        series: dict[str, list] = {"iterations": [], "values": [], "stderr": []}
        for row in rows:
            if _is_value(row.get(name)):
                stderr = row.get(f"{name}_stderr")
                series["iterations"].append(row["iteration"])
                series["values"].append(float(row[name]))
                series["stderr"].append(float(stderr) if _is_value(stderr) else None)
        data[name] = series
    return data


def difference_table(runs: Mapping[str, Sequence[Mapping[str, Any]]], baseline: str | None = None) -> list[dict]:
    """Differences ``run − baseline`` for every metric and iteration the two runs share.

    Rows: ``{metric, iteration, baseline, run, baseline_value, run_value, difference, stderr,
    ci_low, ci_high}``. ``stderr = sqrt(se_baseline² + se_run²)`` treats the two evaluations as
    independent (conservative when both runs answered the same questions); the interval is
    ``difference ± 1.96·stderr``. Without both standard errors the three are None.
    """
    if not runs:
        raise ValueError("runs: expected at least one run")
    baseline = baseline if baseline is not None else next(iter(runs))
    if baseline not in runs:
        raise ValueError(f"baseline: {baseline!r} is not one of the runs {list(runs)}")
    base_rows = {row["iteration"]: row for row in _sorted_iterations(runs[baseline])}
    table = []
    for run, metrics in runs.items():
        if run == baseline:
            continue
        rows = _sorted_iterations(metrics)
        names = [n for n in metric_names(runs[baseline]) if n in set(metric_names(rows))]
        for name in names:
            for row in rows:
                base = base_rows.get(row["iteration"])
                if base is None or not (_is_value(base.get(name)) and _is_value(row.get(name))):
                    continue
                difference = float(row[name]) - float(base[name])
                se_run, se_base = row.get(f"{name}_stderr"), base.get(f"{name}_stderr")
                stderr = math.hypot(se_base, se_run) if _is_value(se_run) and _is_value(se_base) else None
                table.append(
                    {
                        "metric": name,
                        "iteration": row["iteration"],
                        "baseline": baseline,
                        "run": run,
                        "baseline_value": float(base[name]),
                        "run_value": float(row[name]),
                        "difference": difference,
                        "stderr": stderr,
                        "ci_low": difference - Z_95 * stderr if stderr is not None else None,
                        "ci_high": difference + Z_95 * stderr if stderr is not None else None,
                    }
                )
    return table


# ---------------------------------------------------------------------------------------------
# Drawing


def _radar_axes(fig: Figure, position: tuple[int, int, int], categories: list[str], title: str) -> Any:
    ax = fig.add_subplot(*position, projection="polar")
    angles = [2 * math.pi * k / len(categories) for k in range(len(categories))]
    ax.set_xticks(angles)
    ax.set_xticklabels(categories)
    ax.set_title(title, pad=18)
    return ax


def _draw_radar(ax: Any, data: Mapping[str, Any], label_prefix: str = "iteration ") -> None:
    categories = data["categories"]
    angles = [2 * math.pi * k / len(categories) for k in range(len(categories))]
    values_seen: list[float] = []
    for iteration, values in data["series"].items():
        points = [v if v is not None else math.nan for v in values]
        values_seen += [v for v in values if v is not None]
        ax.plot(angles + angles[:1], points + points[:1], marker="o", label=f"{label_prefix}{iteration}")
        ax.fill(angles + angles[:1], [0 if math.isnan(p) else p for p in points + points[:1]], alpha=0.08)
    if values_seen and min(values_seen) >= 0 and max(values_seen) <= 10:
        ax.set_ylim(0, 10)  # judge scores: keep the paper's fixed 0-10 scale across iterations
    ax.legend(loc="upper right", bbox_to_anchor=(1.35, 1.12), fontsize="small")


def plot_radar(data: Mapping[str, Any], path: str | Path, title: str = "Judged chat by category") -> Path:
    """Radar chart of ``radar_data`` output (one polygon per iteration) as a PNG."""
    if len(data["categories"]) < 3:
        raise ValueError(f"radar chart: needs ≥ 3 categories, got {data['categories']}")
    fig = Figure(figsize=(7, 6))
    ax = _radar_axes(fig, (1, 1, 1), data["categories"], title)
    _draw_radar(ax, data)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return Path(path)


def _grid(count: int, columns: int = 3) -> tuple[int, int]:
    columns = max(1, min(columns, count))
    return math.ceil(count / columns), columns


def _fixed_margins(fig: Figure, rows: int, columns: int) -> None:
    """Room for the suptitle, each panel's title, x label and y tick labels, in inches. Fixed margins
    instead of matplotlib's constrained layout, which measures every text twice: it took half of the
    CPU of drawing a chart (0.75 s -> 0.38 s), drawn at the end of every run; tight_layout let the
    suptitle overlap the top panels."""
    width, height = fig.get_size_inches()
    left, right, top, bottom, across, down = 0.75, 0.15, 0.75, 0.5, 0.8, 0.75
    panel_w = (width - left - right - across * (columns - 1)) / columns
    panel_h = (height - top - bottom - down * (rows - 1)) / rows
    fig.subplots_adjust(
        left=left / width,
        right=1 - right / width,
        top=1 - top / height,
        bottom=bottom / height,
        wspace=across / panel_w,
        hspace=down / panel_h,
    )


def plot_lines(
    series_by_metric: Mapping[str, Mapping[str, Mapping[str, list]]],
    path: str | Path,
    title: str = "Metrics over iterations",
    *,
    legend: bool = True,
) -> Path:
    """One panel per metric, one line per series (a run, or the single run), stderr as error bars.

    ``series_by_metric``: ``{metric: {series label: {"iterations", "values", "stderr"}}}``.
    """
    if not series_by_metric:
        raise ValueError("line chart: no metrics to draw")
    rows, columns = _grid(len(series_by_metric))
    fig = Figure(figsize=(4.2 * columns, 3.0 * rows + 0.6))
    _fixed_margins(fig, rows, columns)
    for index, (metric, by_label) in enumerate(series_by_metric.items(), start=1):
        ax = fig.add_subplot(rows, columns, index)
        for label, series in by_label.items():
            errors = [e if e is not None else 0.0 for e in series["stderr"]]
            ax.errorbar(
                series["iterations"],
                series["values"],
                yerr=errors if any(e is not None for e in series["stderr"]) else None,
                marker="o",
                capsize=3,
                label=label,
            )
        ax.set_title(metric, fontsize="medium")
        ax.set_xlabel("iteration")
        ax.xaxis.get_major_locator().set_params(integer=True)
        if legend:
            ax.legend(fontsize="small")
    # the suptitle at a fixed distance from the top (matplotlib's default, a fraction of the height,
    # put it on the top panels' titles in a tall chart of many metrics)
    fig.suptitle(title, y=1 - 0.12 / fig.get_size_inches()[1], verticalalignment="top")
    fig.savefig(path, dpi=100)
    return Path(path)


# ---------------------------------------------------------------------------------------------
# Reports


def _format(value: float | None, stderr: float | None = None) -> str:
    if value is None:
        return "–"
    text = f"{value:.4g}"
    return f"{text} ± {stderr:.2g}" if stderr is not None else text


def _metrics_table(lines: Mapping[str, Mapping[str, list]], iterations: list[int]) -> list[str]:
    out = ["| metric | " + " | ".join(f"iter {t}" for t in iterations) + " |", "|---" * (len(iterations) + 1) + "|"]
    for metric, series in lines.items():
        cells = dict(zip(series["iterations"], zip(series["values"], series["stderr"], strict=True), strict=True))
        out.append(f"| {metric} | " + " | ".join(_format(*cells.get(t, (None, None))) for t in iterations) + " |")
    return out


def _radar_drawable(radar: Mapping[str, Any]) -> bool:
    """Whether `radar_data` output makes a radar chart: ≥ 3 judged categories and an iteration of values."""
    return len(radar["categories"]) >= 3 and bool(radar["series"])


def report_files(radar: Mapping[str, Any], lines: Mapping[str, Any]) -> list[str]:
    """The files `write_report` writes for this `radar_data` and `line_data`: ``report.md`` and the charts."""
    charts = ["judge_radar.png"] if _radar_drawable(radar) else []
    return ["report.md", *charts, *(["metrics_over_iterations.png"] if lines else [])]


def write_report(
    metrics: Sequence[Mapping[str, Any]],
    out_dir: str | Path,
    *,
    title: str = "α-SPIN evaluation report",
    run_info: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``report.md``, ``metrics_over_iterations.png`` and (with ≥ 3 judged categories)
    ``judge_radar.png`` into ``out_dir``.

    Returns ``{"radar": radar_data(...), "lines": line_data(...), "files": {name: path}}``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = _sorted_iterations(metrics)
    radar, lines = radar_data(rows), line_data(rows)
    files: dict[str, str] = {}
    if _radar_drawable(radar):
        files["radar"] = str(plot_radar(radar, out / "judge_radar.png"))
    if lines:
        files["lines"] = str(
            plot_lines({m: {"run": s} for m, s in lines.items()}, out / "metrics_over_iterations.png", legend=False)
        )

    text = [f"# {title}", ""]
    for key, value in (run_info or {}).items():
        text.append(f"- **{key}**: {value}")
    if run_info:
        text.append("")
    text += ["## Metrics per iteration", "", "Values ± standard error where known.", ""]
    text += _metrics_table(lines, [row["iteration"] for row in rows]) if lines else ["(no metrics)"]
    if "radar" in files:
        text += ["", "## Judged chat by category", "", "![judge radar](judge_radar.png)"]
    if "lines" in files:
        text += ["", "## Metrics over iterations", "", "![metrics](metrics_over_iterations.png)"]
    files["report"] = str(out / "report.md")
    Path(files["report"]).write_text("\n".join(text) + "\n", encoding="utf-8")
    return {"radar": radar, "lines": lines, "files": files}


def compare_runs(
    runs: Mapping[str, Sequence[Mapping[str, Any]]],
    out_dir: str | Path,
    *,
    baseline: str | None = None,
    title: str = "Run comparison",
) -> dict[str, Any]:
    """Charts of several runs side by side (e.g. SPIN vs α-SPIN) and their differences.

    Writes ``comparison.md``, ``comparison_radar.png`` (one radar per run, same scale) and
    ``comparison_lines.png`` (one panel per metric, one line per run). Returns
    ``{"radar": {run: radar_data}, "lines": {metric: {run: series}}, "differences":
    difference_table(...), "files": {...}}``.
    """
    if not runs:
        raise ValueError("runs: expected at least one run")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    radars = {name: radar_data(metrics) for name, metrics in runs.items()}
    per_run_lines = {name: line_data(metrics) for name, metrics in runs.items()}
    lines: dict[str, dict[str, dict[str, list]]] = {}
    for name, data in per_run_lines.items():
        for metric, series in data.items():
            lines.setdefault(metric, {})[name] = series
    differences = difference_table(runs, baseline)
    files: dict[str, str] = {}

    drawable = {name: data for name, data in radars.items() if _radar_drawable(data)}
    if drawable:
        fig = Figure(figsize=(6.5 * len(drawable), 6))
        for index, (name, data) in enumerate(drawable.items(), start=1):
            _draw_radar(_radar_axes(fig, (1, len(drawable), index), data["categories"], name), data)
        fig.tight_layout()
        files["radar"] = str(out / "comparison_radar.png")
        fig.savefig(files["radar"], dpi=100)
    if lines:
        files["lines"] = str(plot_lines(lines, out / "comparison_lines.png", title=f"{title}: metrics over iterations"))

    base = baseline if baseline is not None else next(iter(runs))
    text = [f"# {title}", "", f"Runs: {', '.join(runs)}; differences are against **{base}**.", ""]
    if "radar" in files:
        text += ["![radar](comparison_radar.png)", ""]
    if "lines" in files:
        text += ["![metrics](comparison_lines.png)", ""]
    text += [
        "## Differences (run − baseline)",
        "",
        "± is sqrt(se₁² + se₂²), the runs treated as independent; the 95% interval is ± 1.96 of it.",
        "",
        "| metric | iteration | run | baseline value | run value | difference | 95% interval |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in differences:
        interval = f"[{row['ci_low']:.4g}, {row['ci_high']:.4g}]" if row["stderr"] is not None else "–"
        text.append(
            f"| {row['metric']} | {row['iteration']} | {row['run']} | {_format(row['baseline_value'])} | "
            f"{_format(row['run_value'])} | {_format(row['difference'], row['stderr'])} | {interval} |"
        )
    files["report"] = str(out / "comparison.md")
    Path(files["report"]).write_text("\n".join(text) + "\n", encoding="utf-8")
    return {"radar": radars, "lines": lines, "differences": differences, "files": files}
