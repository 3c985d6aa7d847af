"""Per-run reports and run comparisons, read from and written to run storage."""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path
from typing import Any

from alphaspin.config import config_from_dict
from alphaspin.storage import RunStorage, StageDir

REPORT_INPUTS = "inputs.json"  # <run>/report/inputs.json: what the report was drawn from


def iteration_metrics(storage: RunStorage) -> list[dict[str, Any]]:
    """The evaluate-stage metrics of every finished iteration of a run, in order."""
    run = storage.read_json(storage.path("run.json"))
    config = config_from_dict(run["config"], f"{storage.url}/run.json")
    rows = []
    for t in range(config.method.iterations + 1):
        record = storage.stage(t, "evaluate").verify(check_hashes=False)
        if record is not None:
            rows.append({"iteration": t, **{k: v for k, v in record.metrics.items() if isinstance(v, int | float)}})
    return rows


def write_run_report(storage: RunStorage) -> dict[str, Any]:
    """report.md and PNG charts (metrics over iterations, judged-category radar) into <run>/report/.

    A report already drawn from the same inputs (metrics, title, run facts, matplotlib's version and
    the code that draws it: ``report/inputs.json``, written after the report's files) with all its
    files in place is kept as it is: a rerun of a finished run (every stage cached) redraws nothing.
    Drawing the charts is most of such a rerun's time (about 1 s of CPU, against 0.02 s for the rest).
    """
    import matplotlib

    from alphaspin.benchmarks import report as drawing
    from alphaspin.benchmarks.report import line_data, radar_data, report_files, write_report

    metrics = iteration_metrics(storage)
    run = storage.read_json(storage.path("run.json"))
    title = f"α-SPIN run {storage.run_id}"
    run_info = {
        # A remote run by its URL; a local one by its id: the report names no path of this machine.
        "run": storage.run_id if storage.protocol in ("file", "local") else storage.url,
        "alpha": run["config"]["method"]["alpha"],
        "history": run["config"]["method"]["history"],
    }
    inputs = json.loads(
        json.dumps(
            {
                "title": title,
                "run_info": run_info,
                "metrics": metrics,
                "drawing": hashlib.sha256(Path(drawing.__file__).read_bytes()).hexdigest(),
                "matplotlib": matplotlib.__version__,
            }
        )
    )
    report = storage.stage(None, "report")
    radar, lines = radar_data(metrics), line_data(metrics)
    if _unchanged(report, inputs, report_files(radar, lines)):
        markdown = report.read_bytes("report.md").decode("utf-8")
        return {"url": report.url, "markdown": markdown, "radar": radar, "lines": lines}
    with tempfile.TemporaryDirectory() as tmp:
        result = write_report(metrics, tmp, title=title, run_info=run_info)
        report.put_dir(tmp, "")
        markdown = (Path(tmp) / "report.md").read_text()
    report.write_json(REPORT_INPUTS, inputs)  # last: it vouches for the files written before it
    return {"url": report.url, "markdown": markdown, "radar": result["radar"], "lines": result["lines"]}


def _unchanged(report: StageDir, inputs: dict[str, Any], files: list[str]) -> bool:
    """Whether ``report`` was drawn from exactly ``inputs`` and still holds every one of ``files``."""
    try:
        if report.read_json(REPORT_INPUTS) != inputs:
            return False
    except (FileNotFoundError, ValueError):  # no report yet, or an unreadable record: draw it again
        return False
    present = set(report.list_files())
    return all(name in present for name in files)


def compare(run_ids: list[str], runs_root: str, out_dir: str | Path, baseline: str | None = None) -> dict[str, Any]:
    """The same charts for several runs side by side, and their differences with uncertainty."""
    from alphaspin.benchmarks.report import compare_runs

    runs = {run_id: iteration_metrics(RunStorage(runs_root, run_id)) for run_id in run_ids}
    return compare_runs(runs, out_dir, baseline=baseline or run_ids[0], title=" vs ".join(run_ids))
