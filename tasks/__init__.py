"""Prefect tasks (installed as ``alphaspin.tasks``): one per stage, made from its declaration."""

from alphaspin.tasks.stages import (
    STAGE_TASKS,
    StartedStage,
    ensure_run,
    execute_stage,
    publish_metrics,
    publish_report,
    run_stage,
    stored_inputs,
    stored_records,
    submit_stage,
)

__all__ = [
    "STAGE_TASKS",
    "StartedStage",
    "ensure_run",
    "execute_stage",
    "publish_metrics",
    "publish_report",
    "run_stage",
    "stored_inputs",
    "stored_records",
    "submit_stage",
]
