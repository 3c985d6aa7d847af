"""Per-run reports and run comparisons, read from and written to run storage."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from alphaspin.config import config_from_dict
from alphaspin.storage import RunStorage


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
    """report.md and PNG charts (metrics over iterations, judged-category radar) into <run>/report/."""
    from alphaspin.benchmarks.report import write_report

    metrics = iteration_metrics(storage)
    run = storage.read_json(storage.path("run.json"))
    with tempfile.TemporaryDirectory() as tmp:
        result = write_report(
            metrics,
            tmp,
            title=f"α-SPIN run {storage.run_id}",
            run_info={
                # A remote run by its URL; a local one by its id: the report names no path of this machine.
                "run": storage.run_id if storage.protocol in ("file", "local") else storage.url,
                "alpha": run["config"]["method"]["alpha"],
                "history": run["config"]["method"]["history"],
            },
        )
        report = storage.stage(None, "report")
        report.put_dir(tmp, "")
        markdown = (Path(tmp) / "report.md").read_text()
    return {"url": report.url, "markdown": markdown, "radar": result["radar"], "lines": result["lines"]}


def compare(run_ids: list[str], runs_root: str, out_dir: str | Path, baseline: str | None = None) -> dict[str, Any]:
    """The same charts for several runs side by side, and their differences with uncertainty."""
    from alphaspin.benchmarks.report import compare_runs

    runs = {run_id: iteration_metrics(RunStorage(runs_root, run_id)) for run_id in run_ids}
    return compare_runs(runs, out_dir, baseline=baseline or run_ids[0], title=" vs ".join(run_ids))
