"""Child flow runs on another pool, watched until they end; the automation that crashes dead flow runs.

`run_child` starts (or, on a retry of the parent, joins) one child flow run of a deployment and
polls it: its state, and its heartbeats while Running. A child that stops heartbeating (its worker,
container or node died) is stopped (Cancelling, then Crashed when nothing answers) and started again (``orchestration.child_retries``; its
finished stages come back Cached); one that never starts or runs past
``orchestration.child_timeout_seconds`` is cancelled. A child that cannot be recovered fails the
parent with a message that names the deployment, the pool and what to check (`alphaspin.child_runs`).
Split runs (`flows.deployments`) and grid cells on a deployment (`flows.grid`) both go through it.

`ensure_zombie_automation` creates, once per server, Prefect's "detect zombie flows" automation: a
flow run that heartbeated and then sends neither a heartbeat nor a final state within
`ZOMBIE_AFTER_SECONDS` is marked Crashed (a self-hosted server does nothing of the kind by itself).
Run at setup (``python -m alphaspin.flows.orchestration``, docker/setup.sh) and at the first split run.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

from prefect import get_run_logger
from prefect.automations import Automation
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.deployments import run_deployment
from prefect.events.actions import ChangeFlowRunState
from prefect.events.filters import EventFilter, EventNameFilter, EventOccurredFilter, EventResourceFilter
from prefect.events.schemas.automations import EventTrigger, Posture
from prefect.events.schemas.events import ResourceSpecification
from prefect.states import Cancelled, Cancelling, Crashed

from alphaspin.child_runs import ChildStatus, child_failure, child_verdict
from alphaspin.config import AlphaSpinConfig

logger = logging.getLogger(__name__)

ZOMBIE_AUTOMATION = "alphaspin: crash flow runs that stopped heartbeating"
# Prefect 3.8 heartbeats every flow run each PREFECT_FLOWS_HEARTBEAT_FREQUENCY s (default 180):
# three missed beats and a margin before a run counts as dead.
ZOMBIE_AFTER_SECONDS = 600
HEARTBEAT = "prefect.flow-run.heartbeat"
FINAL_EVENTS = ("Completed", "Failed", "Cancelled", "Crashed")
POLL_SECONDS = 10.0
# A silent child is asked to stop (Cancelling) and given this fraction of the heartbeat timeout (the
# Cancelling event may reach its worker as late as its heartbeats reached us) before it is marked Crashed.
STOP_GRACE_FRACTION = 1 / 3
RETRIES_OF_A_FAILED_CHILD = 5  # earlier failed children of the same key skipped before giving up


def zombie_automation(within_seconds: float = ZOMBIE_AFTER_SECONDS) -> Automation:
    """Prefect's documented zombie-flow automation (docs.prefect.io, "Detect zombie flows"): after a
    flow run's heartbeat, expect another heartbeat or a final state within ``within_seconds``, per
    flow run; if none comes, change that flow run to Crashed."""
    return Automation(
        name=ZOMBIE_AUTOMATION,
        description="Marks a flow run Crashed when it stops heartbeating (its worker, container or node died); "
        "created by alphaspin (flows/orchestration.py).",
        trigger=EventTrigger(
            after={HEARTBEAT},
            expect={HEARTBEAT, *(f"prefect.flow-run.{state}" for state in FINAL_EVENTS)},
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=within_seconds),
        ),
        actions=[
            ChangeFlowRunState(
                state=StateType.CRASHED,
                message=f"no heartbeat for {within_seconds:.0f} s: the process running this flow run is gone",
            )
        ],
    )


def ensure_zombie_automation() -> UUID:
    """The zombie automation's id, created when the server has none of that name (idempotent)."""
    with get_client(sync_client=True) as client:
        found = client.read_automations_by_name(ZOMBIE_AUTOMATION)
        if found:
            return found[0].id
    created = zombie_automation().create()
    logger.info("created the automation %r (%s)", ZOMBIE_AUTOMATION, created.id)
    return created.id


def deployment_pool(deployment: str) -> tuple[str | None, dict[str, Any]]:
    """The work pool of ``deployment`` and its base job template's variables (properties)."""
    with get_client(sync_client=True) as client:
        pool = client.read_deployment_by_name(deployment).work_pool_name
        if not pool:
            return None, {}
        template = client.read_work_pool(pool).base_job_template or {}
    return pool, dict(template.get("variables", {}).get("properties", {}))


def flow_run_pool(flow_run_id: str | None) -> str | None:
    """The work pool a flow run was submitted to (None when it was not started by a worker)."""
    if not flow_run_id:
        return None
    with get_client(sync_client=True) as client:
        return client.read_flow_run(UUID(str(flow_run_id))).work_pool_name


def _status(client: Any, flow_run: FlowRun) -> ChildStatus:
    state = flow_run.state
    running_since = state.timestamp if state is not None and state.type == StateType.RUNNING else None
    last_heartbeat = None
    if running_since is not None:
        page = client.read_events(
            EventFilter(
                event=EventNameFilter(name=[HEARTBEAT]),
                resource=EventResourceFilter(id=[f"prefect.flow-run.{flow_run.id}"]),
                occurred=EventOccurredFilter(since=running_since),
            ),
            limit=1,
        )
        last_heartbeat = page.events[0].occurred if page.events else None
    return ChildStatus(
        state_type=state.type.value if state is not None else "SCHEDULED",
        final=state is not None and state.is_final(),
        created=flow_run.created or datetime.now(UTC),
        running_since=running_since,
        last_heartbeat=last_heartbeat,
    )


class ChildLost(RuntimeError):
    """A child flow run that will not finish (no heartbeat, never started, ran too long); the parent's
    watch has already stopped it (Cancelled, Cancelling or Crashed). ``crashed``: it stopped
    heartbeating (its worker, container or node is gone, or it was stopped as if it were)."""

    def __init__(self, message: str, flow_run: FlowRun, crashed: bool) -> None:
        super().__init__(message)
        self.flow_run = flow_run
        self.crashed = crashed


def _poll_seconds(config: AlphaSpinConfig) -> float:
    """How often the parent looks at its child: every POLL_SECONDS, at least six times per heartbeat timeout."""
    return min(POLL_SECONDS, config.orchestration.child_heartbeat_timeout_seconds / 6.0)


def wait_for_child(flow_run_id: UUID, deployment: str, pool: str | None, config: AlphaSpinConfig) -> FlowRun:
    """Poll a child until it ends; a dead child is marked Crashed, one that never starts or runs too
    long is cancelled, and both raise `ChildLost` naming the deployment, its pool and what to check."""
    orchestration = config.orchestration
    with get_client(sync_client=True) as client:
        while True:
            flow_run = client.read_flow_run(flow_run_id)
            verdict = child_verdict(
                _status(client, flow_run),
                datetime.now(UTC),
                orchestration.child_timeout_seconds,
                orchestration.child_heartbeat_timeout_seconds,
            )
            if verdict == "done":
                return flow_run
            if verdict != "wait":
                state = flow_run.state.name if flow_run.state else "unknown"
                message = child_failure(verdict, deployment, pool, str(flow_run_id), state, config)
                if verdict == "no_heartbeat":
                    flow_run = _stop_silent_child(client, flow_run_id, message, config)
                else:  # a queued run has nothing to stop; a running one is asked to stop
                    end = Cancelled if verdict == "never_started" else Cancelling
                    client.set_flow_run_state(flow_run_id, end(message=message[:500]), force=True)
                    flow_run = client.read_flow_run(flow_run_id)
                raise ChildLost(message, flow_run, crashed=verdict == "no_heartbeat")
            time.sleep(_poll_seconds(config))


def _stop_silent_child(client: Any, flow_run_id: UUID, message: str, config: AlphaSpinConfig) -> FlowRun:
    """A Running child without heartbeats is most likely gone, but its heartbeats may only be late
    (events reach a busy server late). Before it is replaced it must be stopped, or two processes
    would write the same stages on the same GPU: ask for Cancelling (a live worker kills the flow
    run's process and reports Cancelled); if nothing answers within a third of the heartbeat timeout
    (STOP_GRACE_FRACTION), the worker is gone too: mark it Crashed."""
    client.set_flow_run_state(flow_run_id, Cancelling(message=message[:500]), force=True)
    grace = config.orchestration.child_heartbeat_timeout_seconds * STOP_GRACE_FRACTION
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        time.sleep(min(_poll_seconds(config), grace))
        flow_run = client.read_flow_run(flow_run_id)
        if flow_run.state is not None and flow_run.state.is_final():
            return flow_run  # stopped by its (live) worker
    client.set_flow_run_state(flow_run_id, Crashed(message=message[:500]), force=True)
    return client.read_flow_run(flow_run_id)


def _logger() -> Any:
    try:
        return get_run_logger()
    except Exception:  # noqa: BLE001 - outside a flow or task run (a plain call, a unit test)
        return logger


def run_child(
    deployment: str,
    parameters: dict[str, Any],
    flow_run_name: str,
    key: str,
    job_variables: dict[str, Any],
    pool: str | None,
    config: AlphaSpinConfig,
    earlier_attempts: int = RETRIES_OF_A_FAILED_CHILD,
) -> FlowRun:
    """Start the child flow run under idempotency ``key`` and wait for it (`wait_for_child`).

    A retried parent joins the child it started, running or finished; an earlier child of that key
    that failed (at most ``earlier_attempts`` of them) is started again under ``key-retry<n>``. A child
    started by this call whose process died (no heartbeat, or Crashed: its worker, container or node
    is gone) is started again, up to ``orchestration.child_retries`` times; its finished stages come
    back Cached. Any other failure of a child started here raises, naming the deployment and its pool."""
    started = time.time()
    restarts = 0
    allowed = config.orchestration.child_retries
    for attempt in range(earlier_attempts + allowed + 1):
        child = run_deployment(
            name=deployment,
            parameters=parameters,
            flow_run_name=flow_run_name,
            idempotency_key=key + (f"-retry{attempt}" if attempt else ""),
            job_variables=job_variables or None,
            timeout=0,  # started; watched below
        )
        try:
            child = wait_for_child(child.id, deployment, pool, config)
            lost: ChildLost | None = None
        except ChildLost as error:
            child, lost = error.flow_run, error
        state = child.state
        if lost is None and state is not None and state.is_completed():
            return child
        name = state.name if state else "unknown"
        created = child.created.timestamp() if child.created is not None else started
        if created < started - 1.0:  # an earlier parent attempt's child that did not complete
            _logger().info("%s: earlier child flow run %s ended %s; starting it again", flow_run_name, child.id, name)
            continue
        crashed = lost.crashed if lost is not None else state is not None and state.is_crashed()
        message = (
            str(lost) if lost is not None else child_failure("done", deployment, pool, str(child.id), name, config)
        )
        if crashed and restarts < allowed:
            restarts += 1
            _logger().warning(
                "%s: %s; starting the child again (%d of orchestration.child_retries=%d), its finished stages cached",
                flow_run_name,
                message,
                restarts,
                allowed,
            )
            continue
        raise RuntimeError(message)
    raise RuntimeError(f"{flow_run_name}: {earlier_attempts} earlier child flow runs failed; not retrying")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    print(f"{ZOMBIE_AUTOMATION}: {ensure_zombie_automation()}")
