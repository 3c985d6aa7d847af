"""Prefect tasks: one per α-SPIN stage, each a thin wrapper around `alphaspin.stages`."""

from tasks.stages import (
    build_pairs,
    ensure_run,
    evaluate,
    generate_losers,
    reference_logps,
    run_stage,
    sample_prompts,
    train,
)

__all__ = [
    "build_pairs",
    "ensure_run",
    "evaluate",
    "generate_losers",
    "reference_logps",
    "run_stage",
    "sample_prompts",
    "train",
]
