"""Split orchestration's child flow runs, the decisions without Prefect (`flows/orchestration.py` acts on them).

``alphaspin-recipe`` with ``iteration_deployment`` starts each iteration as a flow run of another
deployment (on the GPU pool) and waits for it. What can go wrong on a real cluster, and what decides it here:

- the parent runs on the child's own pool: with one slot per GPU the child can never start
  (`check_split_pools` refuses it before anything is started);
- the child's worker, container or node dies: a self-hosted Prefect server leaves such a flow run
  ``Running`` for ever unless an automation marks it ``Crashed`` (`flows.orchestration` creates
  one), so the parent also watches the child's heartbeats itself (`child_verdict`);
- the child never starts (no worker polls the pool) or runs too long (`child_verdict`'s timeout);
- the parent is retried while its child still runs: the child is joined, not started twice
  (`child_idempotency_key`), so two processes never write the same stage;
- the run needs several GPUs (the engine's tensor × data parallel GPUs, or ``training.num_processes``):
  the child's pool is asked for them (`child_gpu_count`, `child_job_variables`), with the job variables a
  person gave the split run for its children (node selection, a GPU count), checked first in one line
  naming the variable (`check_job_variables`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from alphaspin.config import AlphaSpinConfig, ConfigError, dump_config
from alphaspin.storage import canonical_json, sha256_bytes

# The job variables of deploy/*-gpu-job-template.json: GPUs per flow run, or fixed GPU ids (a pool per GPU).
GPU_COUNT_VARIABLE = "gpu_count"
GPU_IDS_VARIABLE = "gpu_device_ids"
# gpu_count's value for "every GPU of the host; the worker's own GPUs (its CUDA_VISIBLE_DEVICES) decide"
# (the Docker template's default: GPU-owning workers of one pool, docs/gpu-pool.md).
ALL_GPUS = -1

Verdict = Literal["done", "wait", "never_started", "timed_out", "no_heartbeat"]


def check_split_pools(iteration_deployment: str, parent_pool: str | None, child_pool: str | None) -> None:
    """Refuse a child deployment on the pool the parent itself occupies: the parent holds one of the
    pool's slots while it waits, so on a one-slot (one-GPU) pool the child could never start."""
    if parent_pool and child_pool and parent_pool == child_pool:
        raise ConfigError(
            f"iteration_deployment {iteration_deployment!r} runs on work pool {child_pool!r}, the pool this flow run "
            f"occupies while it waits, so the child may never get a slot: start the split run from a deployment on "
            f"another pool (alphaspin-recipe/quickstart on `cpu`), or leave iteration_deployment empty"
        )


def child_gpu_count(config: AlphaSpinConfig) -> tuple[int, str]:
    """(GPUs an iteration's child run needs, the knobs that ask for them): the vLLM engine's
    ``generation.tensor_parallel_size`` × ``generation.vllm_data_parallel_size``, or the training
    processes of one machine (``training.num_processes`` / ``training.num_machines``: the other
    machines' processes run on their own nodes), whichever is more; the stages of an iteration run
    one after another in the child, so they share its GPUs, or ``orchestration.gpu_stages`` at once,
    each on GPUs of its own (`alphaspin.devices`)."""
    generation = config.generation
    engine = generation.engine_gpus
    engine_knobs = (
        f"generation.tensor_parallel_size × generation.vllm_data_parallel_size = "
        f"{generation.tensor_parallel_size} × {generation.vllm_data_parallel_size}"
    )
    training = config.training
    processes = training.num_processes // training.num_machines
    if processes > engine:
        per_machine = f" / training.num_machines = {training.num_machines}" if training.num_machines > 1 else ""
        wanted, knobs = processes, f"training.num_processes = {training.num_processes}{per_machine}"
    else:
        wanted, knobs = engine, engine_knobs
    at_once = config.orchestration.gpu_stages  # GPU stages at once in the child, each on GPUs of its own
    if at_once > 1:
        return wanted * at_once, f"({knobs}) × orchestration.gpu_stages = {at_once}"
    return wanted, knobs


def child_job_variables(
    config: AlphaSpinConfig,
    pool_variables: Mapping[str, Mapping[str, Any]],
    given: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Job variables of an iteration's child run, given the variables of its pool's base job template
    and those a person gave for the children (``given``: the split run's ``iteration_job_variables``,
    checked by `check_job_variables`; they win).

    ``gpu_count`` = `child_gpu_count` where the template has that variable with a count as its default
    (the Kubernetes template of deploy/: the device plugin gives each pod GPUs of its own). Left to the
    pool: a process pool has no such variable (the GPUs are those its worker sees,
    ``CUDA_VISIBLE_DEVICES``); a pool whose default is -1 (the Docker template) gives every GPU and the
    worker's own decide; a pool pinned to GPU ids (``gpu_device_ids`` default) keeps them. A run needing
    more GPUs than a pinned pool or the given ``gpu_count`` holds is an error."""
    given = dict(given or {})
    check_job_variables(given, pool_variables)
    wanted, knobs = child_gpu_count(config)
    pinned = given.get(GPU_IDS_VARIABLE) or (pool_variables.get(GPU_IDS_VARIABLE) or {}).get("default")
    if pinned:
        if wanted > len(pinned):
            where = f"iteration_job_variables.{GPU_IDS_VARIABLE}" if GPU_IDS_VARIABLE in given else GPU_IDS_VARIABLE
            raise ConfigError(
                f"{knobs}: {wanted} GPUs, but the child's pool is pinned to GPU(s) {list(pinned)} ({where}); "
                f"use a pool with {wanted} GPUs"
            )
        return given
    count = given.get(GPU_COUNT_VARIABLE)
    if count is not None and count != ALL_GPUS and count < wanted:
        raise ConfigError(
            f"iteration_job_variables.{GPU_COUNT_VARIABLE}: {count} GPU(s), but {knobs} needs {wanted}: "
            f"give at least {wanted}, or leave it out (the children then ask for {wanted})"
        )
    default = (pool_variables.get(GPU_COUNT_VARIABLE) or {}).get("default")
    if count is None and GPU_COUNT_VARIABLE in pool_variables and default != ALL_GPUS:
        return {GPU_COUNT_VARIABLE: wanted, **given}
    return given


def check_job_variables(given: Mapping[str, Any], pool_variables: Mapping[str, Mapping[str, Any]]) -> None:
    """Job variables a person gives a split run's children, checked against the children's pool
    (its base job template's variables, the JSON schema the Prefect server checks them with later):
    one line naming the first bad one (``iteration_job_variables.<name>``) and what it expected,
    before the run starts anything. A name the pool's template does not have is refused too (Prefect
    would ignore it)."""
    import jsonschema

    for name, value in given.items():
        if name not in pool_variables:
            raise ConfigError(
                f"iteration_job_variables.{name}: not a job variable of the children's work pool "
                f"(it has: {', '.join(sorted(pool_variables)) or 'none'})"
            )
        error = jsonschema.exceptions.best_match(
            jsonschema.Draft202012Validator(dict(pool_variables[name])).iter_errors(value)
        )
        if error is not None:
            where = "".join(f"[{part!r}]" for part in error.absolute_path)
            what = "a key" if error.validator == "propertyNames" or "propertyNames" in error.schema_path else ""
            message = " ".join(error.message.split())
            raise ConfigError(f"iteration_job_variables.{name}{where}: {what + ' ' if what else ''}{message}")


def child_idempotency_key(parent_flow_run_id: str, config: AlphaSpinConfig, iteration: int, forced: list[str]) -> str:
    """The key of iteration t's child run of one parent flow run: the parent's retries (same flow run
    id) find the child they started instead of starting a second one; another parent flow run, or
    other forced stages, start their own (stage leases in run storage keep those apart)."""
    what = canonical_json({"config": dump_config(config), "iteration": iteration, "forced": sorted(forced)})
    return f"alphaspin-{parent_flow_run_id}-iter-{iteration}-{sha256_bytes(what.encode())[:12]}"


@dataclass(frozen=True)
class ChildStatus:
    """What the parent knows of a child flow run at one poll."""

    state_type: str  # Prefect's StateType value: SCHEDULED, PENDING, RUNNING, COMPLETED, FAILED, ...
    final: bool
    created: datetime
    running_since: datetime | None = None  # when it entered Running (None: not running)
    last_heartbeat: datetime | None = None  # the latest prefect.flow-run.heartbeat event of the child


def child_verdict(
    status: ChildStatus, now: datetime, timeout_seconds: float, heartbeat_timeout_seconds: float
) -> Verdict:
    """done: the child reached a final state. no_heartbeat: Running, but nothing (its Running state,
    its heartbeats) for ``heartbeat_timeout_seconds``: its process is gone. never_started /
    timed_out: ``timeout_seconds`` since it was created, still queued / still running. wait: else."""
    if status.final:
        return "done"
    if status.state_type == "RUNNING" and status.running_since is not None:
        alive = max(t for t in (status.running_since, status.last_heartbeat) if t is not None)
        if (now - alive).total_seconds() > heartbeat_timeout_seconds:
            return "no_heartbeat"
    if (now - status.created).total_seconds() > timeout_seconds:
        return "timed_out" if status.state_type == "RUNNING" else "never_started"
    return "wait"


def child_failure(
    verdict: Verdict, deployment: str, pool: str | None, flow_run_id: str, state: str, config: AlphaSpinConfig
) -> str:
    """The parent's error for a child that will not finish: which run, where, and what to check."""
    where = f"flow run {flow_run_id} of {deployment} on work pool {pool or '?'}"
    orchestration = config.orchestration
    if verdict == "no_heartbeat":
        return (
            f"{where} is {state} but sent no heartbeat for {orchestration.child_heartbeat_timeout_seconds:.0f} s: the "
            f"worker, container or node running it is gone (OOM kill, lost node, evicted pod). Marked Crashed. Check the "
            f"worker's log and `prefect flow-run logs {flow_run_id}`; retrying this run resumes from the finished stages"
        )
    if verdict == "never_started":
        return (
            f"{where} did not start within orchestration.child_timeout_seconds="
            f"{orchestration.child_timeout_seconds:.0f} s (still {state}); cancelled. Check that a worker polls the pool "
            f"(`prefect work-pool ls`, `prefect worker start --pool {pool or '<pool>'}`) and that the pool's "
            f"concurrency limit is not held by other runs"
        )
    if verdict == "timed_out":
        return (
            f"{where} ran past orchestration.child_timeout_seconds={orchestration.child_timeout_seconds:.0f} s; "
            f"cancelled. Raise the timeout for long iterations; a retry resumes from the finished stages"
        )
    return f"{where} ended {state}; see `prefect flow-run logs {flow_run_id}`"
