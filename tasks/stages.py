"""Prefect tasks, one per stage. Each builds a `Context`, calls the stage function, and returns
the stage's small `StageRecord` (paths and metrics, never models or tables).

Caching: a task's cache key is the stage's own cache key (stage, config fields it reads, input
manifests, code version) plus the run's location, so Prefect shows a finished stage as `Cached`.
Our manifest stays the source of truth: `run_stage` refreshes Prefect's cache whenever the stage
is forced or its manifest does not verify (a corrupted artifact is never served from a stale
cache record). Retries and the `gpu` tag sit on the GPU stages.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.context import TaskRunContext

from alphaspin import stages
from alphaspin.config import AlphaSpinConfig
from alphaspin.context import Context, stage_dir_name, stage_key
from alphaspin.storage import StageRecord, sha256_bytes

GPU_STAGES = ("generate", "reference_logps", "train", "evaluate")
INPUTS = {  # the parameters of each task that are upstream records, in stage_key order
    "sample_prompts": (),
    "generate": ("prompts", "adapter"),
    "build_pairs": ("prompts", "generations"),
    "reference_logps": ("pairs", "previous"),
    "train": ("reference", "previous"),
    "evaluate": ("trained", "reference"),
}


def _inputs(stage: str, parameters: dict[str, Any]) -> list[StageRecord | None]:
    records: list[StageRecord | None] = []
    for name in INPUTS[stage]:
        value = parameters.get(name)
        if isinstance(value, list | tuple):
            records.extend(sorted(value, key=lambda r: r.url))
        else:
            records.append(value)
    return records


def prefect_cache_key(stage: str, parameters: dict[str, Any]) -> str:
    config: AlphaSpinConfig = parameters["config"]
    key = stage_key(config, stage, parameters["iteration"], _inputs(stage, parameters), parameters.get("member"))
    where = f"{config.run.runs_root}|{config.run.run_id}"
    return f"alphaspin-{stage}-{sha256_bytes(f'{where}|{key}'.encode())[:32]}"


def _cache_key_fn(stage: str) -> Callable[[TaskRunContext, dict[str, Any]], str]:
    def key_fn(context: TaskRunContext, parameters: dict[str, Any]) -> str:
        return prefect_cache_key(stage, parameters)

    return key_fn


def _context(config: AlphaSpinConfig, label: str) -> Context:
    """A stage context whose progress hook updates a Prefect progress artifact."""
    ctx = Context.create(config)
    ctx._set_parent(_forked_from(ctx))
    artifact_id = create_progress_artifact(progress=0.0, description=label)
    last = [0.0]

    def progress(fraction: float, message: str) -> None:
        percent = round(100.0 * min(max(fraction, 0.0), 1.0), 1)
        if percent - last[0] >= 1.0 or percent == 100.0:
            update_progress_artifact(artifact_id, progress=percent, description=f"{label}: {message}")
            last[0] = percent

    ctx.progress = progress
    return ctx


def _forked_from(ctx: Context) -> str | None:
    path = ctx.storage.path("run.json")
    return ctx.storage.read_json(path).get("forked_from") if ctx.storage.exists(path) else None


def _task(stage: str, name: str, **options: Any):
    gpu = stage in GPU_STAGES
    options.setdefault("task_run_name", f"{name}-iter-{{iteration}}")
    return task(name=name, cache_key_fn=_cache_key_fn(stage), persist_result=True,
                tags=["alphaspin", "gpu"] if gpu else ["alphaspin"],
                retries=2 if gpu else 0, retry_delay_seconds=10 if gpu else 0, **options)  # fmt: skip


@task(name="ensure_run", persist_result=False)
def ensure_run(config: AlphaSpinConfig, fork_from: str | None = None) -> dict[str, Any]:
    """Create run.json, or refuse a run id that holds another config."""
    ctx = Context.create(config)
    try:
        return ctx.ensure_run(fork_from)
    finally:
        ctx.close()


@_task("sample_prompts", "sample_prompts")
def sample_prompts(config: AlphaSpinConfig, iteration: int, force: bool = False) -> StageRecord:
    """Sample the iteration's SFT rows and assign each to an opponent member."""
    ctx = _context(config, f"iter-{iteration} sample_prompts")
    try:
        return stages.sample_prompts(ctx, iteration, force)
    finally:
        ctx.close()


@_task("generate", "generate_losers", task_run_name="generate_losers-iter-{iteration}-{member}")
def generate_losers(config: AlphaSpinConfig, iteration: int, member: str, prompts: StageRecord,
                    adapter: StageRecord | None, force: bool = False) -> StageRecord:  # fmt: skip
    """Sample the losers y_l of one opponent member's share of prompts."""
    ctx = _context(config, f"iter-{iteration} generate {member}")
    try:
        record = stages.generate_losers(ctx, iteration, member, prompts, adapter, force)
        get_run_logger().info("generate-%s: %s", member, record.metrics)
        return record
    finally:
        ctx.close()


@_task("build_pairs", "build_pairs")
def build_pairs(config: AlphaSpinConfig, iteration: int, prompts: StageRecord, generations: list[StageRecord],
                force: bool = False) -> StageRecord:  # fmt: skip
    """Join prompts, human answers and generated losers into (x, y_w, y_l) pairs."""
    ctx = _context(config, f"iter-{iteration} build_pairs")
    try:
        return stages.build_pairs(ctx, iteration, prompts, generations, force)
    finally:
        ctx.close()


@_task("reference_logps", "reference_logps")
def reference_logps(config: AlphaSpinConfig, iteration: int, pairs: StageRecord, previous: StageRecord | None,
                    force: bool = False) -> StageRecord:  # fmt: skip
    """Tokenize the pairs as TRL does and store lp_base, lp_prev and the geometric reference."""
    ctx = _context(config, f"iter-{iteration} reference_logps")
    try:
        return stages.reference_logps(ctx, iteration, pairs, previous, force)
    finally:
        ctx.close()


@_task("train", "train")
def train(config: AlphaSpinConfig, iteration: int, reference: StageRecord, previous: StageRecord | None,
          force: bool = False) -> StageRecord:  # fmt: skip
    """DPO-train θ_t from θ_(t-1) against the stored reference; checkpoints into storage."""
    ctx = _context(config, f"iter-{iteration} train")
    try:
        record = stages.train(ctx, iteration, reference, previous, force)
        get_run_logger().info("train: %s", record.metrics)
        return record
    finally:
        ctx.close()


@_task("evaluate", "evaluate")
def evaluate(config: AlphaSpinConfig, iteration: int, trained: StageRecord, reference: StageRecord,
             force: bool = False) -> StageRecord:  # fmt: skip
    """Evaluate θ_t and publish the iteration's metrics as a table artifact."""
    ctx = _context(config, f"iter-{iteration} evaluate")
    try:
        record = stages.evaluate(ctx, iteration, trained, reference, force)
        rows = [{"metric": k, "value": v} for k, v in sorted(record.metrics.items()) if isinstance(v, int | float)]
        create_table_artifact(table=rows, key=_artifact_key(config.run.run_id, iteration),
                              description=f"{config.run.run_id} iteration {iteration} metrics")  # fmt: skip
        return record
    finally:
        ctx.close()


def _artifact_key(run_id: str, iteration: int) -> str:
    slug = "".join(ch if ch.isalnum() else "-" for ch in run_id.lower()).strip("-")
    return f"{slug}-iter-{iteration}-metrics"


def run_stage(
    stage_task, *, config: AlphaSpinConfig, iteration: int, force: bool = False, **inputs: Any
) -> StageRecord:
    """Call a stage task with the run's retry settings, refreshing Prefect's cache record when the
    stage is forced or its manifest does not verify under its key (missing, corrupted, stale)."""
    stage = next(s for s, t in _TASKS.items() if t is stage_task)
    parameters = {"config": config, "iteration": iteration, **inputs}
    key = stage_key(config, stage, iteration, _inputs(stage, parameters), inputs.get("member"))
    ctx = Context.create(config)
    try:
        valid = ctx.storage.stage(iteration, stage_dir_name(stage, inputs.get("member"))).verify(key) is not None
    finally:
        ctx.close()
    options: dict[str, Any] = {"refresh_cache": force or not valid}
    if config.orchestration.result_storage:
        options["result_storage"] = config.orchestration.result_storage
    if stage in GPU_STAGES:
        options.update(
            retries=config.orchestration.retries, retry_delay_seconds=config.orchestration.retry_delay_seconds
        )
    state = stage_task.with_options(**options)(
        config=config, iteration=iteration, force=force, return_state=True, **inputs
    )
    record = state.result()  # raises the stage's error when it failed
    _check_result_written(stage_task.name, prefect_cache_key(stage, parameters), options.get("result_storage"))
    return record


def _check_result_written(task_name: str, key: str, result_storage: str | None) -> None:
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
            f"task {task_name!r} finished (its artifacts and manifest are written) but Prefect could not write its "
            f"result record {key!r} to the result storage {where!r}, so the stage would never show as Cached; "
            "check `orchestration.result_storage` (or PREFECT_LOCAL_STORAGE_PATH) is writable from where tasks run"
        )


@task(name="publish_report", persist_result=False)
def publish_report(config: AlphaSpinConfig) -> str:
    """Write the run's report (markdown + charts) into storage and publish it as an artifact."""
    from alphaspin.reporting import write_run_report

    ctx = Context.create(config)
    try:
        report = write_run_report(ctx.storage)
    finally:
        ctx.close()
    slug = "".join(ch if ch.isalnum() else "-" for ch in config.run.run_id.lower()).strip("-")
    create_markdown_artifact(markdown=report["markdown"] + f"\n\nCharts: `{report['url']}`", key=f"{slug}-report",
                             description=f"α-SPIN report of {config.run.run_id}")  # fmt: skip
    return report["url"]


def stage_task(stage: str):
    """The task of a stage name (``generate`` → generate_losers)."""
    return _TASKS[stage]


@task(name="stored_inputs", persist_result=False)
def stored_inputs(config: AlphaSpinConfig, stage: str, iteration: int, member: str | None = None) -> dict[str, Any]:
    """Read a stage's upstream records from storage (for running one stage or iteration alone)."""
    ctx = Context.create(config)
    try:
        return stages.stored_inputs(ctx, stage, iteration, member)
    finally:
        ctx.close()


@task(name="load_trained", persist_result=False)
def load_trained(config: AlphaSpinConfig, before: int) -> dict[int, StageRecord]:
    """Train records of iterations < ``before``, from storage."""
    ctx = Context.create(config)
    try:
        return stages.stored_trained(ctx, before)
    finally:
        ctx.close()


_TASKS = {
    "sample_prompts": sample_prompts,
    "generate": generate_losers,
    "build_pairs": build_pairs,
    "reference_logps": reference_logps,
    "train": train,
    "evaluate": evaluate,
}
