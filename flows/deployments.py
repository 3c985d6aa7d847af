"""Deployment entrypoints: the flows that `deploy/prefect.yaml` registers with a Prefect server.

Each one takes parameters a person can fill in the Prefect UI's run form (a recipe picked by
name, ``key=value`` overrides, stages as a multi-select, a run id) and resolves them into an
`AlphaSpinConfig` before calling the flows of `flows.alphaspin_run`. By default everything runs in
one flow run on the deployment's work pool.

    alphaspin-recipe        a whole run from a recipe (configs/<recipe>.yaml) + overrides
    alphaspin-run-iteration one iteration t of an existing run (config read from its run.json)
    alphaspin-rerun-stage   one stage of one iteration of an existing run (e.g. `train` on the GPU pool)
    alphaspin-evaluate-run  evaluation only, of a given run or of the latest run under runs_root

Split orchestration: ``alphaspin-recipe`` with ``iteration_deployment="alphaspin-run-iteration/gpu"``
stays on its own (CPU) pool and starts every iteration as a run of that deployment on the GPU
pool (`run_deployment`). The parent waits for each child and reads the iteration's metrics from
run storage (the source of truth), so it needs no access to the child's result storage; the
child still persists its return value (``persist_result=True``), which other machines can read
only when result storage is remote (an S3 block: docs/gpu-pool.md). Run storage itself
(``run.runs_root``) must then be shared too: ``s3://...``. The parent refuses a child deployment on
its own pool (it would wait for a slot it holds), asks the child's pool for the GPUs of
`alphaspin.child_runs.child_gpu_count` (the engine's tensor × data parallel, or the training
processes), joins its own children when it is retried, and fails
(cancelling or crashing the child) when a child never starts, runs too long or stops heartbeating
(`alphaspin.child_runs`, `alphaspin.flows.orchestration`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from prefect import flow, get_run_logger
from prefect.runtime import flow_run as current_flow_run

from alphaspin.config import AlphaSpinConfig, ConfigError, apply_overrides, config_from_dict, load_config
from alphaspin.dag import force_plan
from alphaspin.flows.alphaspin_run import alphaspin_evaluate, alphaspin_iteration, alphaspin_run, alphaspin_stage
from alphaspin.runs import Run
from alphaspin.stage_spec import Node
from alphaspin.stages import StageName

Recipe = Literal["quickstart", "paper-gemma-2b", "spin-official"]
RECIPES: tuple[str, ...] = ("quickstart", "paper-gemma-2b", "spin-official")
CONFIG_DIR_ENV = "ALPHASPIN_CONFIG_DIR"
# The runs root of deployments whose parameters name none: the worker's (e.g. s3://alphaspin/runs
# in docker/compose.yaml), else the recipes' ./runs (relative to the deployment's working directory).
RUNS_ROOT_ENV = "ALPHASPIN_RUNS_ROOT"


# -- resolving configs -------------------------------------------------------------------------
def recipe_path(recipe: str) -> Path:
    """``configs/<recipe>.yaml``: from $ALPHASPIN_CONFIG_DIR, the source tree next to this file, or
    ./configs (the deployment's working directory, set by the pull step of deploy/prefect.yaml)."""
    if recipe not in RECIPES:
        raise ConfigError(f"recipe {recipe!r}: expected one of {list(RECIPES)}")
    folders = [Path(os.environ[CONFIG_DIR_ENV])] if os.environ.get(CONFIG_DIR_ENV) else []
    folders += [Path(__file__).resolve().parent.parent / "configs", Path.cwd() / "configs"]
    for folder in folders:
        if (folder / f"{recipe}.yaml").is_file():
            return folder / f"{recipe}.yaml"
    raise ConfigError(f"recipe {recipe!r}: {recipe}.yaml not found in {', '.join(map(str, folders))}")


def resolve_config(
    recipe: str = "quickstart", overrides: list[str] | None = None, config: AlphaSpinConfig | dict | None = None
) -> AlphaSpinConfig:
    """The run's config: ``config`` when given (a full config from the UI form or an API call),
    else the recipe's YAML with run.runs_root from $ALPHASPIN_RUNS_ROOT when set; ``overrides``
    ("key=value", as the CLI's --set) apply on top."""
    if config is None:
        overrides = list(overrides or [])
        if os.environ.get(RUNS_ROOT_ENV) and not any(o.strip().startswith("run.runs_root=") for o in overrides):
            overrides.insert(0, f"run.runs_root={os.environ[RUNS_ROOT_ENV]}")
        return load_config(recipe_path(recipe), overrides)
    data = config.model_dump(mode="json") if isinstance(config, AlphaSpinConfig) else dict(config)
    return config_from_dict(apply_overrides(data, list(overrides or [])), "the config parameter")


def runs_root_or_default(runs_root: str | None) -> str:
    """``runs_root``, else $ALPHASPIN_RUNS_ROOT, else ./runs (the recipes' default)."""
    return runs_root or os.environ.get(RUNS_ROOT_ENV) or "./runs"


def stored_config(run_id: str, runs_root: str | None) -> AlphaSpinConfig:
    """The config recorded in ``<runs_root>/<run_id>/run.json``, located at ``runs_root`` (where it
    was found, which may differ from where it was created, e.g. a relative path or a mount)."""
    from alphaspin.runs import stored_config as read_stored_config

    return read_stored_config(run_id, runs_root_or_default(runs_root))


def latest_run_id(runs_root: str | None) -> str:
    """The run under ``runs_root`` whose run.json was created last."""
    import json

    import fsspec

    from alphaspin.storage import storage_options_from_env

    runs_root = runs_root_or_default(runs_root)
    root = runs_root if "://" in runs_root else str(Path(runs_root).expanduser().resolve())
    fs, path = fsspec.core.url_to_fs(root, **storage_options_from_env(root))
    runs: list[tuple[str, str]] = []
    for found in fs.glob(f"{path.rstrip('/')}/*/run.json"):
        record = json.loads(fs.cat_file(found))
        runs.append((str(record.get("created", "")), str(record.get("run_id") or found.rstrip("/").split("/")[-2])))
    if not runs:
        raise ConfigError(f"runs_root {runs_root}: no runs (no */run.json)")
    return max(runs)[1]


def finished_iterations(config: AlphaSpinConfig) -> list[int]:
    """Iterations whose adapter (train stage) and reference are done: those that can be evaluated."""
    run = Run(config)
    return [
        t
        for t in range(config.method.iterations + 1)
        if run.dir(Node("train", t)).verify(check_hashes=False) is not None
        and run.dir(Node("reference_logps", t)).verify(check_hashes=False) is not None
    ]


# -- flow run names (shown in the UI) ----------------------------------------------------------
def _recipe_run_name() -> str:
    parameters = current_flow_run.parameters
    try:
        config = resolve_config(
            parameters.get("recipe", "quickstart"), parameters.get("overrides"), parameters.get("config")
        )
        return config.run.run_id
    except Exception:  # the flow itself reports a bad config; the name just falls back
        return str(parameters.get("recipe", "alphaspin"))


def _evaluate_run_name() -> str:
    return f"{current_flow_run.parameters.get('run_id') or 'latest'}-evaluate"


# -- entrypoints -------------------------------------------------------------------------------
@flow(name="alphaspin-recipe", flow_run_name=_recipe_run_name, log_prints=False)
def alphaspin_recipe(
    recipe: Recipe = "quickstart",
    overrides: list[str] = [],  # noqa: B006 (never mutated; a list default renders as a list in the UI)
    config: AlphaSpinConfig | None = None,
    force_stages: list[StageName] = [],  # noqa: B006
    force_iterations: list[int] = [],  # noqa: B006
    fork_from: str | None = None,
    iteration_deployment: str | None = None,
    iteration_job_variables: dict[str, Any] = {},  # noqa: B006
) -> list[dict[str, Any]]:
    """A whole α-SPIN run (t = 0..T) from a recipe. Completed stages come back Cached.

    recipe: configs/<recipe>.yaml. overrides: "key=value" items like the CLI's --set, e.g.
    "method.alpha=1.0", "run.runs_root=s3://bucket/runs". config: a full config instead of the
    recipe (overrides still apply). force_stages: re-run these stages (and everything downstream)
    in force_iterations (all when empty). fork_from: a run id this run forks. iteration_deployment:
    run each iteration as a run of this deployment (e.g. "alphaspin-run-iteration/gpu") instead of
    in this flow run; refused when that deployment's pool is this flow run's own pool.
    iteration_job_variables: job variables of every iteration's run on that deployment's pool (e.g.
    {"node_selector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}} on Kubernetes; gpu_count
    defaults to what the iteration needs), checked against the pool's template first.
    """
    if iteration_job_variables and not iteration_deployment:
        raise ConfigError(
            "iteration_job_variables: only for a split run (iteration_deployment); this run's own job variables "
            "go in the run form's Job variables (prefect deployment run ... --job-variable NAME=VALUE)"
        )
    resolved = resolve_config(recipe, overrides, config)
    get_run_logger().info(
        f"run {resolved.run.run_id} at {resolved.run.runs_root}: iterations 0..{resolved.method.iterations}, "
        f"alpha={resolved.method.alpha}, history={resolved.method.history}"
    )
    if not iteration_deployment:
        return alphaspin_run.fn(
            config=resolved,
            force_stages=list(force_stages) or None,
            force_iterations=list(force_iterations) or None,
            fork_from=fork_from,
        )
    return _run_iterations_on(
        iteration_deployment,
        resolved,
        list(force_stages),
        list(force_iterations),
        fork_from,
        dict(iteration_job_variables),
    )


def _run_iterations_on(
    deployment: str,
    config: AlphaSpinConfig,
    force_stages: list[str],
    force_iterations: list[int],
    fork_from: str | None,
    given_job_variables: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Each iteration as a child run of ``deployment`` (on its pool), one after the other, watched
    until it ends (`alphaspin.flows.orchestration.run_child`)."""
    from alphaspin.child_runs import check_split_pools, child_idempotency_key, child_job_variables
    from alphaspin.flows.orchestration import deployment_pool, ensure_zombie_automation, flow_run_pool, run_child
    from alphaspin.tasks import ensure_run, publish_report

    logger = get_run_logger()
    pool, pool_variables = deployment_pool(deployment)
    check_split_pools(deployment, flow_run_pool(current_flow_run.id), pool)
    job_variables = child_job_variables(config, pool_variables, given_job_variables)
    try:  # the server's safety net for children whose worker dies; the parent watches them itself too
        ensure_zombie_automation()
    except Exception as error:  # noqa: BLE001 - a missing automation is logged, not fatal
        logger.warning("could not create the zombie flow-run automation (%s); relying on the parent's watch", error)
    ensure_run(config, fork_from)  # run.json first: the child reads the config from it
    iterations = list(range(config.method.iterations + 1))
    plan = force_plan(config.method.iterations, stages=force_stages, only_iterations=force_iterations, config=config)
    forced = {t: sorted(plan.get(t, ())) for t in iterations}
    parent = str(current_flow_run.id or config.run.run_id)
    results = []
    for t in iterations:
        run_child(
            deployment,
            parameters={
                "run_id": config.run.run_id,
                "runs_root": config.run.runs_root,
                "iteration": t,
                "force_stages": forced[t],
            },
            flow_run_name=f"{config.run.run_id}-iter-{t}",
            key=child_idempotency_key(parent, config, t, forced[t]),
            job_variables=job_variables,
            pool=pool,
            config=config,
        )
        metrics = Run(config).stored_record(Node("evaluate", t)).metrics
        results.append({"iteration": t, **metrics})
    publish_report(config)
    return results


@flow(name="alphaspin-run-iteration", flow_run_name="{run_id}-iter-{iteration}", log_prints=False, persist_result=True)
def alphaspin_run_iteration(
    run_id: str,
    runs_root: str | None = None,
    iteration: int = 0,
    force_stages: list[StageName] = [],  # noqa: B006
) -> dict[str, Any]:
    """One iteration t of an existing run (its config from run.json; the adapters of earlier
    iterations from storage). Stages already done come back Cached unless forced."""
    config = stored_config(run_id, runs_root)
    if not 0 <= iteration <= config.method.iterations:
        raise ConfigError(f"iteration {iteration}: run {run_id} has iterations 0..{config.method.iterations}")
    out = alphaspin_iteration.fn(config=config, iteration=iteration, trained=None, force=list(force_stages) or None)
    return {"iteration": iteration, **out["metrics"]}


@flow(name="alphaspin-rerun-stage", flow_run_name="{run_id}-iter-{iteration}-{stage}", log_prints=False)
def alphaspin_rerun_stage(
    run_id: str,
    runs_root: str | None = None,
    iteration: int = 0,
    stage: StageName = "train",
    member: str | None = None,
    force: bool = True,
) -> dict[str, Any]:
    """Re-run (force, by default) one stage of one iteration of an existing run, its inputs read
    from storage; ``member`` names the opponent member for ``generate`` (base, iter-0, ...).
    Downstream stages re-run on the next run of the recipe, as their cache keys change."""
    config = stored_config(run_id, runs_root)
    if not 0 <= iteration <= config.method.iterations:
        raise ConfigError(f"iteration {iteration}: run {run_id} has iterations 0..{config.method.iterations}")
    record = alphaspin_stage.fn(config=config, iteration=iteration, stage=stage, member=member, force=force)["record"]
    return {"stage": record.stage, "iteration": record.iteration, "url": record.url, "metrics": record.metrics}


@flow(name="alphaspin-evaluate-run", flow_run_name=_evaluate_run_name, log_prints=False)
def alphaspin_evaluate_run(
    run_id: str | None = None,
    runs_root: str | None = None,
    iterations: list[int] = [],  # noqa: B006
    force: bool = True,
) -> list[dict[str, Any]]:
    """Evaluate the stored adapters of a run: ``run_id``, or the latest run under ``runs_root``
    when empty (the nightly schedule). ``iterations``: all finished ones when empty. ``force``
    re-evaluates iterations already evaluated; without it only new ones are computed."""
    logger = get_run_logger()
    run_id = run_id or latest_run_id(runs_root)
    config = stored_config(run_id, runs_root)
    chosen = list(iterations) or finished_iterations(config)
    if not chosen:
        logger.warning("run %s has no finished iteration yet; nothing to evaluate", run_id)
        return []
    logger.info("evaluating run %s, iterations %s", run_id, chosen)
    return alphaspin_evaluate.fn(config=config, iterations=chosen, force=force)
