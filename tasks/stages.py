"""Prefect tasks: one per stage, made from the stage's declaration (`alphaspin.stages`).

The flow ``prepare``s a node with the cached runner (key computed once, manifest verified once)
and hands the small `Prepared` record to the stage's task, which ``execute``s it. From the spec
come the task's name, description, tags (``gpu`` on GPU stages, for a tag concurrency limit) and
retries. Caching: the task's cache key is the stage's key plus the run's location, so a finished
stage shows as `Cached`; the manifest stays the source of truth — the task runs (its cache
refreshed) whenever the node is not ``cached`` (forced, never run, corrupted, changed).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

from prefect import Task, get_run_logger, task
from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.context import TaskRunContext
from prefect.futures import PrefectFuture

from alphaspin import console
from alphaspin.config import AlphaSpinConfig
from alphaspin.devices import Gpus
from alphaspin.generation import GLOBAL_RNG, GLOBAL_RNG_STAGES
from alphaspin.runner import Inputs, Prepared, Runner
from alphaspin.runs import Run
from alphaspin.stage_spec import Node, StageSpec
from alphaspin.stages import REGISTRY
from alphaspin.storage import StageRecord, sha256_bytes
from alphaspin.workspace import Workspace


def prefect_cache_key(config: AlphaSpinConfig, prepared: Prepared) -> str:
    where = f"{config.run.runs_root}|{config.run.run_id}"
    return f"alphaspin-{prepared.node.stage}-{sha256_bytes(f'{where}|{prepared.key}'.encode())[:32]}"


def _cache_key_fn(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    return prefect_cache_key(parameters["config"], parameters["prepared"])


def _progress(label: str):
    """A progress hook that updates one Prefect progress artifact (at most every 1%) and writes a
    line to the task's log at each quarter, so the UI's log reads like the console."""
    artifact_id = create_progress_artifact(progress=0.0, description=label)
    last = [0.0, -1]

    def progress(fraction: float, message: str) -> None:
        percent = round(100.0 * min(max(fraction, 0.0), 1.0), 1)
        if percent - last[0] >= 1.0 or percent == 100.0:
            update_progress_artifact(artifact_id, progress=percent, description=f"{label}: {message}")
            last[0] = percent
        quarter = int(percent // 25)
        if quarter > last[1]:
            get_run_logger().info("%s: %s (%d%%)", label, message, percent)
            last[1] = quarter

    return progress


def execute_stage(config: AlphaSpinConfig, prepared: Prepared, gpus: Gpus | None = None) -> StageRecord:
    """Execute one prepared node of the run (the body of every stage task); ``gpus``: the stage's own GPUs
    when GPU stages run at once (`alphaspin.devices`), else None (``model.device``)."""
    what = {"run": "running", "adopt": "adopting"}.get(prepared.status, prepared.status)
    on = f" on GPU {gpus.visible} ({gpus.torch_device})" if gpus is not None else ""
    get_run_logger().info("%s: %s (%s)%s", prepared.node.label, what, prepared.reason, on)
    workspace = Workspace(config, progress=_progress(prepared.node.label), gpus=gpus)
    whole_run = GLOBAL_RNG if prepared.node.stage in GLOBAL_RNG_STAGES else contextlib.nullcontext()
    try:
        with whole_run:  # torch's global generator, for stages that draw from it all along (stages at once)
            record = Runner(Run(config), workspace).execute(prepared)
    finally:
        workspace.close()
    get_run_logger().info("%s: %s", prepared.node.label, console.summary(record.metrics, limit=12) or "done")
    return record


def _make_task(spec: StageSpec, tagged: bool = True) -> Task:
    tags = (["alphaspin", "gpu"] if spec.gpu else ["alphaspin"]) if tagged else None
    return task(
        execute_stage,
        name=spec.name,
        description=spec.description,
        cache_key_fn=_cache_key_fn,
        persist_result=True,
        tags=tags,
        retries=2 if spec.gpu else 0,
        retry_delay_seconds=10 if spec.gpu else 0,
    )


STAGE_TASKS: dict[str, Task] = {name: _make_task(spec) for name, spec in REGISTRY.items()}
# For a temporary server (no PREFECT_API_URL): it starts empty, so no tag concurrency limit can exist,
# and its UI is gone at exit. Prefect still asks it for tag slots before every tagged task — a write that
# collides with its own log and event writes on SQLite (503 "busy", retried after ~2 s: ~10 s per
# iteration of the quickstart). The `gpu` tag matters where a server keeps limits; there the tasks carry it.
_UNTAGGED_TASKS: dict[str, Task] = {name: _make_task(spec, tagged=False) for name, spec in REGISTRY.items()}


def _stage_task(stage: str) -> Task:
    from prefect.settings import PREFECT_API_URL

    return (STAGE_TASKS if PREFECT_API_URL.value() else _UNTAGGED_TASKS)[stage]


def _prepare(config: AlphaSpinConfig, node: Node, inputs: Inputs, force: bool) -> tuple[Prepared, dict[str, Any]]:
    """The node prepared here (in the flow) and its task's options: the run's retry settings."""
    prepared = Runner(Run(config)).prepare(node, inputs, force)
    options: dict[str, Any] = {"refresh_cache": prepared.status != "cached", "task_run_name": node.label}
    if config.orchestration.result_storage:
        options["result_storage"] = config.orchestration.result_storage
    if REGISTRY[node.stage].gpu:
        options.update(
            retries=config.orchestration.retries, retry_delay_seconds=config.orchestration.retry_delay_seconds
        )
    return prepared, options


def _finish(config: AlphaSpinConfig, node: Node, prepared: Prepared, state: Any, options: dict[str, Any]):
    record = state.result()  # raises the stage's error when it failed
    if state.name == "Cached":  # Prefect answered from its cache: the runner never saw the node
        console.current().stage_reused(node.label, "cached")
    _check_result_written(node.label, prefect_cache_key(config, prepared), options.get("result_storage"))
    return record


def run_stage(
    config: AlphaSpinConfig, node: Node, inputs: Inputs, force: bool = False, gpus: Gpus | None = None
) -> StageRecord:
    """Prepare ``node`` here (in the flow) and run its stage task in this thread, with the run's retry settings."""
    prepared, options = _prepare(config, node, inputs, force)
    task_ = _stage_task(node.stage).with_options(**options)
    state = task_(config=config, prepared=prepared, gpus=gpus, return_state=True)
    return _finish(config, node, prepared, state, options)


@dataclass
class StartedStage:
    """A stage task submitted to the flow's task runner (`submit_stage`); `finish` once its future is done."""

    config: AlphaSpinConfig
    node: Node
    prepared: Prepared
    options: dict[str, Any]
    future: PrefectFuture
    gpus: Gpus | None

    def done(self) -> bool:
        """Whether its task has ended (without asking the server)."""
        wrapped = getattr(self.future, "wrapped_future", None)
        return wrapped.done() if wrapped is not None else self.future.state.is_final()

    def finish(self) -> StageRecord:
        """Its record (after `wait`); raises the stage's error when it failed."""
        self.future.wait()
        return _finish(self.config, self.node, self.prepared, self.future.state, self.options)


def submit_stage(
    config: AlphaSpinConfig,
    node: Node,
    inputs: Inputs,
    force: bool = False,
    gpus: Gpus | None = None,
    wait_for: list[PrefectFuture] | None = None,
) -> StartedStage:
    """Prepare ``node`` here and submit its stage task, to run beside others (`wait_for`: the futures of
    the stages it reads, which the UI draws as its upstream)."""
    prepared, options = _prepare(config, node, inputs, force)
    task_ = _stage_task(node.stage).with_options(**options)
    future = task_.submit(config=config, prepared=prepared, gpus=gpus, wait_for=wait_for or None)
    return StartedStage(config, node, prepared, options, future, gpus)


def _check_result_written(label: str, key: str, result_storage: str | None) -> None:
    """Fail loudly when Prefect could not write a task's result record.

    Prefect logs a failed result write and goes on (the transaction is rolled back, the task still
    ends Completed), so a misconfigured result storage would silently turn every later run of the
    stage into a re-execution instead of a `Cached` state. The stage's artifacts are safe (its
    manifest is written), but the user asked for caching, so say what is wrong and where."""
    from prefect.results import ResultStore, get_default_result_storage, resolve_result_storage

    storage = resolve_result_storage(result_storage) if result_storage else get_default_result_storage(_sync=True)
    if not ResultStore(result_storage=storage).exists(key):
        where = getattr(storage, "basepath", None) or result_storage or type(storage).__name__
        raise RuntimeError(
            f"task {label!r} finished (its artifacts and manifest are written) but Prefect could not write its "
            f"result record {key!r} to the result storage {where!r}, so the stage would never show as Cached; "
            "check `orchestration.result_storage` (or PREFECT_LOCAL_STORAGE_PATH) is writable from where tasks run"
        )


# -- run-level tasks ------------------------------------------------------------------------------
@task(name="ensure_run", persist_result=False)
def ensure_run(config: AlphaSpinConfig, fork_from: str | None = None) -> dict[str, Any]:
    """Create run.json (after checking the trackers, the model and data), or refuse a run id that holds another
    config; then create or resume the run's tracker run and post its link."""
    from alphaspin.tracking import check_tracking

    check_tracking(config)
    with Workspace(config) as workspace:
        record = Runner(Run(config, fork_from), workspace).ensure_run(fork_from)
        for backend, (link, text) in workspace.tracker.start().items():
            create_link_artifact(
                link=link,
                link_text=text,
                key=f"{_slug(config.run.run_id)}-{backend}",
                description=f"{backend} run of {config.run.run_id}",
            )
            console.current().link(backend, text if backend == "tensorboard" else f"{link}  ({text})")
    return record


@task(name="stored_records", persist_result=False)
def stored_records(config: AlphaSpinConfig, iteration: int) -> dict[Node, StageRecord]:
    """The train records of iterations before ``iteration``, from storage (an iteration run alone)."""
    return Runner(Run(config)).stored_records(iteration)


@task(name="stored_inputs", persist_result=False)
def stored_inputs(config: AlphaSpinConfig, node: Node) -> Inputs:
    """A stage's upstream records, from storage (a stage run alone)."""
    return Runner(Run(config)).stored_inputs(node)


def _slug(run_id: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in run_id.lower()).strip("-")


@task(name="publish_metrics", persist_result=False)
def publish_metrics(config: AlphaSpinConfig, iteration: int, metrics: dict[str, Any]) -> None:
    """The iteration's metrics as a table artifact, and into the run's trackers at step = iteration."""
    from alphaspin.tracking import Tracker

    with Tracker(config) as tracker:
        tracker.log_metrics(metrics, step=iteration)
    rows = [{"metric": k, "value": v} for k, v in sorted(metrics.items()) if isinstance(v, int | float)]
    create_table_artifact(
        table=rows,
        key=f"{_slug(config.run.run_id)}-iter-{iteration}-metrics",
        description=f"{config.run.run_id} iteration {iteration} metrics",
    )


@task(name="publish_report", persist_result=False)
def publish_report(config: AlphaSpinConfig) -> str:
    """Write the run's report (markdown + charts) into storage and publish it as an artifact (and to the
    run's trackers, whose run it then marks finished)."""
    from alphaspin.reporting import write_run_report
    from alphaspin.tracking import Tracker

    report = write_run_report(Run(config).storage)
    with Tracker(config) as tracker:
        tracker.log_report()
        tracker.finish()
    create_markdown_artifact(
        markdown=report["markdown"] + f"\n\nCharts: `{report['url']}`",
        key=f"{_slug(config.run.run_id)}-report",
        description=f"α-SPIN report of {config.run.run_id}",
    )
    return report["url"]
