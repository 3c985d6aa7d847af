"""A grid of runs as a Prefect flow: one task per cell, then the grid's report as an artifact.

With a ``deployment`` in the grid file each cell is a flow run of that deployment (e.g.
``alphaspin-recipe/gpu``: the GPU pool's concurrency limit runs one cell per GPU), started with
`run_deployment` under an idempotency key made from the grid, the cell and its config: a retried
grid joins a cell's flow run that is still going, takes a finished one as it is, and starts a new
run only for a cell whose earlier run failed. Each cell's flow run is watched as split
orchestration watches its children (`alphaspin.flows.orchestration.run_child`): one whose worker
died is marked Crashed and started again, one that never starts is cancelled; none is waited for
for ever. Without one, each cell is an ``alphaspin-run`` subflow
in this process, ``concurrency`` at a time. Either way the cells' stages are cached and shared
(`alphaspin.sharing`), so re-running the grid resumes it.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner

from alphaspin.config import AlphaSpinConfig
from alphaspin.devices import RUNS_IN_PROCESS
from alphaspin.grid import Grid, cell_gpus, grid_status, idempotency_key, load_grid, write_grid_record

RETRIES_OF_A_FAILED_CELL = 20  # earlier failed flow runs of a cell skipped before giving up


@task(name="run_cell", persist_result=False, cache_policy=NO_CACHE)
def run_cell(config: AlphaSpinConfig, deployment: str, key: str) -> str:
    """One cell: a flow run of ``deployment``, watched until it ends as split orchestration watches its
    children (`alphaspin.flows.orchestration.run_child`): a cell whose worker died (no heartbeat for
    ``orchestration.child_heartbeat_timeout_seconds``) is marked Crashed and started again
    (``orchestration.child_retries``), one that never starts or runs past
    ``orchestration.child_timeout_seconds`` is cancelled and reported; it never waits for ever. ``key``:
    the cell's idempotency key (`alphaspin.grid.idempotency_key`). Local cells are subflows of the grid
    flow, not tasks: a stage task inside a task's transaction has its result record written only when
    the outer task ends."""
    from alphaspin.child_runs import child_job_variables
    from alphaspin.flows.orchestration import deployment_pool, run_child

    run_id = config.run.run_id
    pool, pool_variables = deployment_pool(deployment)
    try:
        child = run_child(
            deployment,
            parameters={"config": config.model_dump(mode="json")},
            flow_run_name=run_id,
            key=key,
            job_variables=child_job_variables(config, pool_variables),
            pool=pool,
            config=config,
            earlier_attempts=RETRIES_OF_A_FAILED_CELL,
        )
    except RuntimeError as error:  # the grid reports the cell with the others
        raise RuntimeError(f"cell {run_id}: {error}") from None
    return child.state.name if child.state else "Completed"


@flow(name="alphaspin-grid", flow_run_name="grid-{grid_file}", log_prints=False)
def alphaspin_grid(
    grid_file: str,
    overrides: list[str] = [],  # noqa: B006 (never mutated)
    concurrency: int | None = None,
) -> dict[str, Any]:
    """Every cell × seed of a grid file (cached stages skipped, identical stages computed once),
    then the grid report (mean and 95% CI across seeds, differences against the baseline cell)."""
    from alphaspin.grid_report import write_grid_report

    logger = get_run_logger()
    grid = load_grid(grid_file, list(overrides))
    if not grid.spec.deployment:  # more GPU stages at once than GPUs: refused before anything is written
        cell_gpus(
            grid, concurrency or grid.spec.concurrency, max(c.config.orchestration.gpu_stages for c in grid.cells)
        )
    write_grid_record(grid)
    logger.info("grid %s: %d cells x %d seeds", grid.name, len(grid.cell_names), len(grid.spec.seeds))
    if grid.spec.deployment:
        futures = {
            cell.run_id: run_cell.with_options(task_run_name=cell.run_id).submit(
                cell.config, grid.spec.deployment, idempotency_key(grid, cell)
            )
            for cell in grid.cells
        }
        failed = {}
        for run_id, future in futures.items():
            future.wait()
            if not future.state.is_completed():
                failed[run_id] = future.state.name
    else:
        failed = _run_cells_here(grid, concurrency)
    rows = grid_status(grid)
    create_table_artifact(table=rows, key=f"{_slug(grid.name)}-grid-status", description=f"grid {grid.name}: cells")
    report = write_grid_report(grid)
    create_markdown_artifact(
        markdown=report["markdown"] + f"\n\nCharts and CSVs: `{report['url']}`",
        key=f"{_slug(grid.name)}-grid-report",
        description=f"α-SPIN grid {grid.name}: mean ± 95% CI across seeds",
    )
    if failed:
        raise RuntimeError(f"grid {grid.name}: {len(failed)} cell(s) failed: {failed}")
    return {"grid": grid.name, "report": report["url"], "sharing": report["sharing"]}


def _run_cells_here(grid: Grid, concurrency: int | None) -> dict[str, str]:
    """Every cell as an alphaspin-run subflow of the grid flow, ``concurrency`` at a time (threads,
    each with a copy of the flow's context so its subflow is the grid's child). The cells' GPU stages take
    their GPUs from one pool of this process (`alphaspin.devices.RUNS_IN_PROCESS`), so no two share one.
    A failed cell is reported with the others; the rest still run."""
    import contextvars
    from concurrent.futures import ThreadPoolExecutor

    from alphaspin.flows.alphaspin_run import alphaspin_run

    def one(cell: Any) -> str | None:
        state = alphaspin_run(config=cell.config, return_state=True)
        return None if state.is_completed() else state.name

    workers = concurrency or grid.spec.concurrency
    if workers <= 1:
        outcome = {cell.run_id: one(cell) for cell in grid.cells}
    else:
        token = RUNS_IN_PROCESS.set(workers)  # copied into each cell's context below
        try:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                futures = {cell.run_id: pool.submit(contextvars.copy_context().run, one, cell) for cell in grid.cells}
                outcome = {run_id: future.result() for run_id, future in futures.items()}
        finally:
            RUNS_IN_PROCESS.reset(token)
    return {run_id: state for run_id, state in outcome.items() if state is not None}


def run_grid_flow(grid: Grid, grid_file: str, overrides: list[str], concurrency: int | None = None) -> dict[str, Any]:
    """The grid flow with room for its cells: every cell at once on a deployment (the pool limits
    them), else ``concurrency`` (the grid file's by default)."""
    workers = len(grid.cells) if grid.spec.deployment else 1
    runner = alphaspin_grid.with_options(task_runner=ThreadPoolTaskRunner(max_workers=workers))
    return runner(grid_file=grid_file, overrides=overrides, concurrency=concurrency)


def _slug(name: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in name.lower()).strip("-")
