"""Run α-SPIN stage by stage without Prefect (Algorithm 2 of the paper).

The Prefect flow in ``flows/`` wires the same stage functions as tasks; this runner is for the
CLI's ``--no-prefect`` mode, tests, and debugging a stage in a plain Python process.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from alphaspin import stages
from alphaspin.config import AlphaSpinConfig
from alphaspin.context import Context
from alphaspin.mixture import member_iteration, opponent_members
from alphaspin.storage import StageRecord

logger = logging.getLogger(__name__)


def run_iteration(ctx: Context, t: int, trained: dict[int, StageRecord], force: Iterable[str] = ()) -> StageRecord:
    """One iteration t; ``trained`` maps earlier iterations to their train records."""
    force = set(force)
    prompts = stages.sample_prompts(ctx, t, force="sample_prompts" in force)
    generations = []
    for member in opponent_members(t, ctx.config.method.history):
        k = member_iteration(member.name)
        adapter = trained[k] if k is not None else None
        generations.append(stages.generate_losers(ctx, t, member.name, prompts, adapter, force="generate" in force))
    pairs = stages.build_pairs(ctx, t, prompts, generations, force="build_pairs" in force)
    previous = trained.get(t - 1)
    reference = stages.reference_logps(ctx, t, pairs, previous, force="reference_logps" in force)
    trained[t] = stages.train(ctx, t, reference, previous, force="train" in force)
    return stages.evaluate(ctx, t, trained[t], reference, force="evaluate" in force)


def run(config: AlphaSpinConfig, force: dict[int, set[str]] | None = None, fork_from: str | None = None,
        on_iteration: Callable[[int, dict], None] | None = None) -> list[dict]:  # fmt: skip
    """All iterations t = 0..T; returns each iteration's evaluation metrics."""
    ctx = Context.create(config)
    try:
        ctx.ensure_run(fork_from)
        trained: dict[int, StageRecord] = {}
        results = []
        for t in range(config.method.iterations + 1):
            record = run_iteration(ctx, t, trained, (force or {}).get(t, set()))
            results.append({"iteration": t, **record.metrics})
            if on_iteration:
                on_iteration(t, record.metrics)
        from alphaspin.reporting import write_run_report

        write_run_report(ctx.storage)
        return results
    finally:
        ctx.close()
