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

With ``orchestration.gpu_stages`` above 1 an iteration's stages start as soon as the stages they read are
done (`walk_at_once`): the members' generate stages run together, each submitted to the flow's task
runner with its own GPUs (`alphaspin.devices`); a stage that would run alone runs in the flow's thread, as
every stage does with the default 1 (that is where a SIGTERM reaches the train stage: `alphaspin.preemption`).
evaluate@t then runs beside iteration t+1 (`submit_evaluate`): generate@t+1 reads train@t, not evaluate@t.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.futures import as_completed
from prefect.runtime import flow_run
from prefect.settings import PREFECT_API_URL

from alphaspin import console
from alphaspin.config import AlphaSpinConfig
from alphaspin.console import format_metrics
from alphaspin.dag import bind_inputs, force_plan, iteration_nodes, node_inputs, upstream_nodes, walk_iteration
from alphaspin.devices import RUNS_IN_PROCESS, GpuPool, Gpus, shared_pool, stage_gpus
from alphaspin.stage_spec import Node
from alphaspin.stages import REGISTRY, StageName
from alphaspin.storage import StageRecord
from alphaspin.tasks import (
    StartedStage,
    ensure_run,
    publish_metrics,
    publish_report,
    run_stage,
    stored_inputs,
    stored_records,
    submit_stage,
)


def check_gpu_stages(config: AlphaSpinConfig) -> None:
    """Refuse more GPU stages at once (``orchestration.gpu_stages``, × the runs sharing this process) than
    this process's GPUs allow, in one line naming the knob, before any stage runs."""
    stage_gpus(config, config.orchestration.gpu_stages * RUNS_IN_PROCESS.get())


def walk_at_once(
    config: AlphaSpinConfig, iteration: int, records: dict[Node, Any], forced: set[str], skip: frozenset = frozenset()
) -> None:
    """`dag.walk_iteration`, but each node starts once the nodes it reads are done, up to
    ``orchestration.gpu_stages`` GPU stages at once, each with its own GPUs from this process's pool
    (`alphaspin.devices`; none on the CPU). Several nodes that can start are submitted to the flow's task
    runner (their futures wait for their upstream's); a node that would run alone runs in this thread.
    ``skip``: nodes that nothing else of the iteration reads, left to the caller (the deferred evaluate)."""
    nodes = [node for node in iteration_nodes(config, iteration) if node not in skip]
    refs = {node: node_inputs(config, node) for node in nodes}
    upstream = {node: upstream_nodes(refs[node]) for node in nodes}
    limit = config.orchestration.gpu_stages
    pool = gpu_pool(config)
    pending, running, futures = list(nodes), [], {}

    def take(node: Node) -> Gpus | None:
        return pool.take() if pool is not None and REGISTRY[node.stage].gpu else None

    def give(gpus: Gpus | None) -> None:
        if pool is not None and gpus is not None:
            pool.give(gpus)

    try:
        while pending or running:
            gpu_busy = sum(REGISTRY[started.node.stage].gpu for started in running)
            startable = []
            for node in pending:
                if not all(up in records for up in upstream[node]):
                    continue
                if REGISTRY[node.stage].gpu:
                    if gpu_busy >= limit:
                        continue
                    gpu_busy += 1
                startable.append(node)
            if not running and len(startable) == 1:  # alone: in this thread, as with one stage at a time
                node = startable[0]
                pending.remove(node)
                gpus = take(node)
                try:
                    inputs = bind_inputs(refs[node], records.__getitem__)
                    records[node] = run_stage(config, node, inputs, force=node.stage in forced, gpus=gpus)
                finally:
                    give(gpus)
                continue
            for node in startable:
                pending.remove(node)
                gpus = take(node)
                try:
                    started = submit_stage(
                        config,
                        node,
                        bind_inputs(refs[node], records.__getitem__),
                        force=node.stage in forced,
                        gpus=gpus,
                        wait_for=[futures[up] for up in upstream[node] if up in futures],
                    )
                except BaseException:
                    give(gpus)
                    raise
                running.append(started)
                futures[node] = started.future
            if not running:
                raise RuntimeError(f"iteration {iteration}: no stage can start: {[n.label for n in pending]}")
            done = next(as_completed([started.future for started in running]))
            started = next(s for s in running if s.future is done)
            running.remove(started)
            give(started.gpus)
            records[started.node] = started.finish()  # raises the stage's error when it failed
    except Exception:
        _settle(running, give)  # the stages already running end (their work is kept), then the error
        raise
    except BaseException:  # a SIGTERM (Preempted), Ctrl+C: the process ends; nothing is waited for
        for started in running:
            give(started.gpus)
        raise


def gpu_pool(config: AlphaSpinConfig) -> GpuPool | None:
    """This process's pool of GPU groups for the run's stages at once (None on the CPU)."""
    groups = stage_gpus(config, config.orchestration.gpu_stages * RUNS_IN_PROCESS.get())
    return shared_pool(groups) if groups else None


def submit_evaluate(config: AlphaSpinConfig, iteration: int, inputs: dict[str, Any], force: bool) -> StartedStage:
    """evaluate@t submitted to the run flow's task runner, to run beside iteration t+1 (generate@t+1 reads
    train@t, not evaluate@t), on GPUs of its own; they go back to the pool as soon as it ends."""
    pool, node = gpu_pool(config), Node("evaluate", iteration)
    gpus = pool.take() if pool is not None else None
    try:
        started = submit_stage(config, node, inputs, force=force, gpus=gpus)
    except BaseException:
        if gpus is not None:
            pool.give(gpus)
        raise
    if gpus is not None:
        started.future.add_done_callback(lambda _: pool.give(gpus))
        started.gpus = None  # given back by the callback
    return started


def _settle(running: list[StartedStage], give) -> None:  # noqa: ANN001
    for started in running:
        started.future.wait()
        give(started.gpus)


@flow(name="alphaspin-iteration", flow_run_name="{config.run.run_id}-iter-{iteration}", log_prints=False)
def alphaspin_iteration(
    config: AlphaSpinConfig,
    iteration: int,
    trained: dict[int, StageRecord] | None = None,
    force: list[StageName] | None = None,
    defer_evaluate: bool = False,
) -> dict[str, Any]:
    """One α-SPIN iteration t. ``trained`` holds the train records of iterations < t (read from
    storage when None); ``force`` re-runs the chosen stages (and so everything downstream).
    ``defer_evaluate`` (GPU stages at once): stop after train and return evaluate's inputs instead of
    its metrics; the run flow evaluates beside the next iteration."""
    if trained is None:
        records = stored_records(config, iteration)
    else:
        records = {Node("train", k): record for k, record in trained.items()}
    forced = set(force or [])
    evaluate = Node("evaluate", iteration)
    if defer_evaluate:
        walk_at_once(config, iteration, records, forced, skip=frozenset({evaluate}))
        inputs = bind_inputs(node_inputs(config, evaluate), records.__getitem__)
        return {"trained": records[Node("train", iteration)], "metrics": None, "evaluate_inputs": inputs}
    if config.orchestration.gpu_stages * RUNS_IN_PROCESS.get() > 1:  # GPU stages at once: each its own GPUs
        walk_at_once(config, iteration, records, forced)
    else:
        walk_iteration(
            config, iteration, records, lambda node, inputs: run_stage(config, node, inputs, force=node.stage in forced)
        )
    metrics = records[evaluate].metrics
    _iteration_finished(config, iteration, metrics)
    return {"trained": records[Node("train", iteration)], "metrics": metrics}


def _iteration_finished(config: AlphaSpinConfig, iteration: int, metrics: dict[str, Any]) -> None:
    publish_metrics(config, iteration, metrics)
    get_run_logger().info(format_metrics(iteration, metrics))
    console.current().iteration_finished(iteration, metrics)


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
    check_gpu_stages(config)
    if flow_run.ui_url and PREFECT_API_URL.value():  # a temporary server's UI is gone at exit
        console.current().link("Prefect UI", flow_run.ui_url)
    ensure_run(config, fork_from)
    trained: dict[int, StageRecord] = {}
    results = []
    at_once = config.orchestration.gpu_stages * RUNS_IN_PROCESS.get() > 1
    evaluations: dict[int, StartedStage] = {}  # evaluate@t beside iteration t+1, with GPU stages at once
    try:
        for t in range(config.method.iterations + 1):
            out = alphaspin_iteration(
                config=config, iteration=t, trained=trained, force=sorted(forced.get(t, ())), defer_evaluate=at_once
            )
            trained[t] = out["trained"]
            if at_once:
                force_t = "evaluate" in forced.get(t, ())
                evaluations[t] = submit_evaluate(config, t, out["evaluate_inputs"], force_t)
                results += _evaluated(config, evaluations, wait=False)
            else:
                results.append({"iteration": t, **out["metrics"]})
        results += _evaluated(config, evaluations, wait=True)
    except Exception:
        for started in evaluations.values():  # what is still evaluating ends (its work is kept), then the error
            started.future.wait()
        raise
    publish_report(config)
    return results


def _evaluated(config: AlphaSpinConfig, evaluations: dict[int, StartedStage], wait: bool) -> list[dict[str, Any]]:
    """The metrics of the deferred evaluations that are done, in iteration order (all of them: ``wait``),
    each published as its iteration's; they leave ``evaluations``."""
    results = []
    for t in sorted(evaluations):
        started = evaluations[t]
        if not wait and not started.done():
            break  # in order: iteration t's line before iteration t+1's
        metrics = evaluations.pop(t).finish().metrics  # raises the stage's error when it failed
        _iteration_finished(config, t, metrics)
        results.append({"iteration": t, **metrics})
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
