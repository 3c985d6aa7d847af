"""Run α-SPIN without Prefect (Algorithm 2 of the paper): the DAG walked by the cached runner.

The Prefect flow in ``flows/`` walks the same DAG (`alphaspin.dag.walk_iteration`) with each node
as a Prefect task; this runner is the CLI's ``--no-prefect`` mode, for tests and for debugging a
stage in a plain Python process.
"""

from __future__ import annotations

import logging

from alphaspin import console
from alphaspin.config import AlphaSpinConfig
from alphaspin.dag import check_forced, walk_iteration
from alphaspin.runner import Runner
from alphaspin.runs import Run
from alphaspin.stage_spec import Node
from alphaspin.storage import StageRecord
from alphaspin.workspace import Workspace

logger = logging.getLogger(__name__)


def run(
    config: AlphaSpinConfig,
    force: dict[int, set[str]] | None = None,
    fork_from: str | None = None,
) -> list[dict]:
    """All iterations t = 0..T; returns each iteration's evaluation metrics."""
    from alphaspin.reporting import write_run_report
    from alphaspin.tracking import check_tracking

    check_tracking(config)  # an unreachable tracker fails here, before any work
    check_forced(config, force or {})  # a forced stage this configuration lacks: one line, before any work
    stored = Run(config, fork_from)
    with Workspace(config) as workspace:
        runner = Runner(stored, workspace)
        runner.ensure_run(fork_from)
        tracker = workspace.tracker
        for backend, (link, text) in tracker.start().items():
            logger.info("tracking: %s (%s)", text, link)
            console.current().link(backend, text if backend == "tensorboard" else f"{link}  ({text})")
        records: dict[Node, StageRecord] = {}
        results = []
        for t in range(config.method.iterations + 1):
            forced = (force or {}).get(t, set())
            walk_iteration(
                config,
                t,
                records,
                lambda node, inputs, forced=forced: runner.run_node(node, inputs, node.stage in forced),
            )
            metrics = records[Node("evaluate", t)].metrics
            results.append({"iteration": t, **metrics})
            tracker.log_metrics(metrics, step=t)
            tracker.flush()
            console.current().iteration_finished(t, metrics)
        write_run_report(stored.storage)
        tracker.log_report()
        tracker.finish()
        return results
