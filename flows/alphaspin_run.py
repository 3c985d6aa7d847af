"""α-SPIN as Prefect flows (Algorithm 2 of arXiv 2404.04291).

for t = 0..T:
    prompts      = sample_prompts(t)
    losers_k     = generate_losers(t, k, θ_k)    for each member k of the opponent mixture
    pairs        = build_pairs(prompts, losers)
    reference    = reference_logps(pairs, θ_(t-1))      # α·lp_prev + (1−α)·lp_base
    θ_t          = train(reference, θ_(t-1))
    metrics_t    = evaluate(θ_t)
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from alphaspin.config import AlphaSpinConfig, Stage
from alphaspin.mixture import member_iteration, opponent_members
from alphaspin.storage import StageRecord
from tasks import (
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


@flow(name="alphaspin-iteration", flow_run_name="{config.run.run_id}-iter-{iteration}", log_prints=True)
def alphaspin_iteration(config: AlphaSpinConfig, iteration: int, trained: dict[int, StageRecord] | None = None,
                        force: list[Stage] | None = None) -> dict[str, Any]:  # fmt: skip
    """One α-SPIN iteration t. ``trained`` holds the train records of iterations < t; ``force``
    re-runs the chosen stages (and so everything downstream of them)."""
    if trained is None and iteration > 0:  # started on its own (a deployment): adapters from storage
        trained = load_trained(config, iteration)
    trained = dict(trained or {})
    forced = set(force or [])
    t = iteration
    prompts = run_stage(sample_prompts, config=config, iteration=t, force="sample_prompts" in forced)
    generations = []
    for member in opponent_members(t, config.method.history):
        k = member_iteration(member.name)
        generations.append(run_stage(generate_losers, config=config, iteration=t, force="generate" in forced,
                                     member=member.name, prompts=prompts, adapter=trained.get(k) if k is not None else None))  # fmt: skip
    pairs = run_stage(build_pairs, config=config, iteration=t, force="build_pairs" in forced,
                      prompts=prompts, generations=generations)  # fmt: skip
    reference = run_stage(reference_logps, config=config, iteration=t, force="reference_logps" in forced,
                          pairs=pairs, previous=trained.get(t - 1))  # fmt: skip
    model = run_stage(train, config=config, iteration=t, force="train" in forced,
                      reference=reference, previous=trained.get(t - 1))  # fmt: skip
    result = run_stage(evaluate, config=config, iteration=t, force="evaluate" in forced,
                       trained=model, reference=reference)  # fmt: skip
    print(_format(t, result.metrics))
    return {"trained": model, "evaluation": result}


@flow(name="alphaspin-run", flow_run_name="{config.run.run_id}", log_prints=True)
def alphaspin_run(config: AlphaSpinConfig, force_stages: list[Stage] | None = None,
                  force_iterations: list[int] | None = None, fork_from: str | None = None,
                  force: list[str] | None = None, print_progress: bool = False) -> list[dict[str, Any]]:  # fmt: skip
    """A whole α-SPIN run, t = 0..T. Completed stages are skipped (Cached); ``force_stages`` re-runs
    those stages in ``force_iterations`` (all iterations when empty) and everything downstream.
    ``force`` takes "T:STAGE" items (the CLI's form)."""
    ensure_run(config, fork_from)
    by_iteration: dict[int, set[str]] = {}
    for item in force or []:
        t, _, stage = item.partition(":")
        by_iteration.setdefault(int(t), set()).add(stage)
    iterations = range(config.method.iterations + 1)
    for t in force_iterations or iterations:
        by_iteration.setdefault(t, set()).update(force_stages or [])
    trained: dict[int, StageRecord] = {}
    results = []
    for t in iterations:
        out = alphaspin_iteration(config=config, iteration=t, trained=trained, force=sorted(by_iteration.get(t, ())))
        trained[t] = out["trained"]
        results.append({"iteration": t, **out["evaluation"].metrics})
    publish_report(config)
    return results


@flow(name="alphaspin-stage", flow_run_name="{config.run.run_id}-iter-{iteration}-{stage}", log_prints=True)
def alphaspin_stage(config: AlphaSpinConfig, iteration: int, stage: Stage, member: str | None = None,
                    force: bool = True) -> dict[str, Any]:  # fmt: skip
    """Run (by default: force) one stage of one iteration of an existing run, its inputs read from
    storage. Stages downstream of it re-run on the next run/iteration, as their keys change."""
    inputs = stored_inputs(config, stage, iteration, member)
    record = run_stage(stage_task(stage), config=config, iteration=iteration, force=force, **inputs)
    print(f"iter-{iteration}/{stage}: {record.metrics}")
    return {"record": record}


@flow(name="alphaspin-evaluate", flow_run_name="{config.run.run_id}-evaluate", log_prints=True)
def alphaspin_evaluate(
    config: AlphaSpinConfig, iterations: list[int] | None = None, force: bool = True
) -> list[dict[str, Any]]:
    """Evaluate the stored adapters of an existing run (all iterations by default), e.g. after
    changing the evaluation settings or nightly on a schedule."""
    results = []
    for t in iterations or range(config.method.iterations + 1):
        inputs = stored_inputs(config, "evaluate", t)
        record = run_stage(evaluate, config=config, iteration=t, force=force, **inputs)
        print(_format(t, record.metrics))
        results.append({"iteration": t, **record.metrics})
    return results


def _format(t: int, metrics: dict[str, Any]) -> str:
    from alphaspin.cli import format_metrics

    return format_metrics(t, metrics)
