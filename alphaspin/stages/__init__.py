"""The stage registry: every stage of an α-SPIN iteration, declared once (`alphaspin.stage_spec`).

    sample_prompts ─► [train_sampler] ─► generate (one per opponent member) ─► build_pairs ─► reference_logps ─► train ─► evaluate
                                                                   [ema_adapter] ─┘

(``train_sampler`` exists only for the gflownet opponent at t ≥ 1, ``ema_adapter`` only for
``method.reference: ema`` at t ≥ 1: `StageSpec.enabled`.)

The order here is a topological order of one iteration's DAG (`alphaspin.dag` derives the rest).
Adding a stage: one module with its function, ``reads`` and ``SPEC``, plus one entry here.
"""

from __future__ import annotations

from typing import Literal

from alphaspin.stage_spec import StageSpec
from alphaspin.stages import (
    build_pairs,
    ema_adapter,
    evaluate,
    generate,
    reference_logps,
    sample_prompts,
    train,
    train_sampler,
)

REGISTRY: dict[str, StageSpec] = {
    spec.name: spec
    for spec in (
        sample_prompts.SPEC,
        train_sampler.SPEC,
        generate.SPEC,
        build_pairs.SPEC,
        ema_adapter.SPEC,
        reference_logps.SPEC,
        train.SPEC,
        evaluate.SPEC,
    )
}
STAGE_NAMES: tuple[str, ...] = tuple(REGISTRY)
# The stage names as a type, for Prefect's run form (a multi-select) and argparse choices.
StageName = Literal[STAGE_NAMES]  # type: ignore[valid-type]


def spec(name: str) -> StageSpec:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown stage {name!r}; expected one of {list(STAGE_NAMES)}") from None
