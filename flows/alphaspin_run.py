"""α-SPIN as Prefect flows (Algorithm 2 of arXiv 2404.04291).

The flows log through Prefect's run logger and do not capture ``print`` (``log_prints=False``):
libraries print their own progress (TRL's per-step dicts, a bytecode dump while `datasets`
fingerprints a function), which belongs in the terminal's full output, not in the UI's run log.

for t = 0..T:                                         (alphaspin.dag.walk_iteration)
    prompts      = sample_prompts(t)
    losers_k     = generate(t, k, θ_k)               for each member k of the opponent mixture
    pairs        = build_pairs(prompts, losers)
    reference    = reference_logps(pairs, θ_(t-1))   # α·lp_prev + (1−α)·lp_base
    θ_t          = train(reference, θ_(t-1))
    metrics_t    = evaluate(θ_t)
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.runtime import flow_run
from prefect.settings import PREFECT_API_URL

from alphaspin import console
from alphaspin.config import AlphaSpinConfig
from alphaspin.console import format_metrics
from alphaspin.dag import force_plan, walk_iteration
from alphaspin.stage_spec import Node
from alphaspin.stages import StageName
from alphaspin.storage import StageRecord
from alphaspin.tasks import ensure_run, publish_metrics, publish_report, run_stage, stored_inputs, stored_records


@flow(name="alphaspin-iteration", flow_run_name="{config.run.run_id}-iter-{iteration}", log_prints=False)
def alphaspin_iteration(
    config: AlphaSpinConfig,
    iteration: int,
    trained: dict[int, StageRecord] | None = None,
    force: list[StageName] | None = None,
) -> dict[str, Any]:
    """One α-SPIN iteration t. ``trained`` holds the train records of iterations < t (read from
    storage when None); ``force`` re-runs the chosen stages (and so everything downstream)."""
    if trained is None:
        records = stored_records(config, iteration)
    else:
        records = {Node("train", k): record for k, record in trained.items()}
    forced = set(force or [])
    walk_iteration(
        config, iteration, records, lambda node, inputs: run_stage(config, node, inputs, force=node.stage in forced)
    )
    metrics = records[Node("evaluate", iteration)].metrics
    publish_metrics(config, iteration, metrics)
    get_run_logger().info(format_metrics(iteration, metrics))
    console.current().iteration_finished(iteration, metrics)
    return {"trained": records[Node("train", iteration)], "metrics": metrics}


@flow(name="alphaspin-run", flow_run_name="{config.run.run_id}", log_prints=False)
def alphaspin_run(
    config: AlphaSpinConfig,
    force_stages: list[StageName] | None = None,
    force_iterations: list[int] | None = None,
    fork_from: str | None = None,
    force: list[str] | None = None,
) -> list[dict[str, Any]]:
    """A whole α-SPIN run, t = 0..T. Completed stages are skipped (Cached); ``force_stages`` re-runs
    those stages in ``force_iterations`` (all iterations when empty) and everything downstream.
    ``force`` takes "T:STAGE" items (the CLI's form)."""
    forced = force_plan(
        config.method.iterations, force or [], force_stages or [], force_iterations or [], config=config
    )
    if flow_run.ui_url and PREFECT_API_URL.value():  # a temporary server's UI is gone at exit
        console.current().link("Prefect UI", flow_run.ui_url)
    ensure_run(config, fork_from)
    trained: dict[int, StageRecord] = {}
    results = []
    for t in range(config.method.iterations + 1):
        out = alphaspin_iteration(config=config, iteration=t, trained=trained, force=sorted(forced.get(t, ())))
        trained[t] = out["trained"]
        results.append({"iteration": t, **out["metrics"]})
    publish_report(config)
    return results


@flow(name="alphaspin-stage", flow_run_name="{config.run.run_id}-iter-{iteration}-{stage}", log_prints=False)
def alphaspin_stage(
    config: AlphaSpinConfig, iteration: int, stage: StageName, member: str | None = None, force: bool = True
) -> dict[str, Any]:
    """Run (by default: force) one stage of one iteration of an existing run, its inputs read from
    storage. Stages downstream of it re-run on the next run/iteration, as their keys change."""
    from alphaspin.stages import spec

    if spec(stage).per_member and member is None:
        raise ValueError(f"stage {stage} runs once per opponent member: name the member (base, iter-0, ...)")
    node = Node(stage, iteration, member if spec(stage).per_member else None)
    record = run_stage(config, node, stored_inputs(config, node), force=force)
    get_run_logger().info("%s: %s", node.label, record.metrics)
    return {"record": record}


@flow(name="alphaspin-evaluate", flow_run_name="{config.run.run_id}-evaluate", log_prints=False)
def alphaspin_evaluate(
    config: AlphaSpinConfig, iterations: list[int] | None = None, force: bool = True
) -> list[dict[str, Any]]:
    """Evaluate the stored adapters of an existing run (all iterations by default), e.g. after
    changing the evaluation settings or nightly on a schedule."""
    results = []
    for t in iterations or range(config.method.iterations + 1):
        node = Node("evaluate", t)
        record = run_stage(config, node, stored_inputs(config, node), force=force)
        publish_metrics(config, t, record.metrics)
        get_run_logger().info(format_metrics(t, record.metrics))
        results.append({"iteration": t, **record.metrics})
    return results
