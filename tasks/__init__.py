"""Prefect tasks: one per α-SPIN stage, each a thin wrapper around `alphaspin.stages`."""

from tasks.stages import (
    build_pairs,
    ensure_run,
    evaluate,
    generate_losers,
    load_trained,
    publish_report,
    reference_logps,
    run_stage,
    sample_prompts,
    stage_task,
    stored_inputs,
    train,
)

__all__ = [
    "build_pairs",
    "ensure_run",
    "evaluate",
    "generate_losers",
    "load_trained",
    "publish_report",
    "reference_logps",
    "run_stage",
    "sample_prompts",
    "stage_task",
    "stored_inputs",
    "train",
]
