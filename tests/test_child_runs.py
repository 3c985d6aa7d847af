"""Split orchestration's child runs: the decisions (`alphaspin.child_runs`, pure), the zombie automation
as Prefect 3.8 builds it, and the GPU pool templates rendered by Prefect's own job-configuration code."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from alphaspin.child_runs import (
    ChildStatus,
    check_split_pools,
    child_failure,
    child_idempotency_key,
    child_job_variables,
    child_verdict,
)
from alphaspin.config import AlphaSpinConfig, ConfigError

ROOT = Path(__file__).resolve().parents[1]
T0 = datetime(2026, 1, 1, tzinfo=UTC)


def _template(name: str) -> dict[str, Any]:
    return json.loads((ROOT / "deploy" / name).read_text())


def _at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


# -- when the parent gives up on a child -----------------------------------------------------------
@pytest.mark.parametrize(
    ("status", "now", "verdict"),
    [
        (ChildStatus("COMPLETED", True, T0), 10, "done"),
        (ChildStatus("CRASHED", True, T0), 10**9, "done"),  # final wins over every timeout
        (ChildStatus("SCHEDULED", False, T0), 999, "wait"),  # queued behind the GPU limit: waits
        (ChildStatus("SCHEDULED", False, T0), 1001, "never_started"),  # no worker for longer than the timeout
        (ChildStatus("PENDING", False, T0), 1001, "never_started"),
        (ChildStatus("RUNNING", False, T0, _at(10), _at(900)), 1001, "timed_out"),  # alive, too long
        (ChildStatus("RUNNING", False, T0, _at(10)), 10 + 300, "wait"),  # no heartbeat yet: the Running state counts
        (ChildStatus("RUNNING", False, T0, _at(10)), 10 + 301, "no_heartbeat"),
        (ChildStatus("RUNNING", False, T0, _at(10), _at(200)), 200 + 300, "wait"),  # the latest beat counts
        (ChildStatus("RUNNING", False, T0, _at(10), _at(200)), 200 + 301, "no_heartbeat"),
    ],
)
def test_child_verdict(status: ChildStatus, now: float, verdict: str) -> None:
    assert child_verdict(status, _at(now), timeout_seconds=1000, heartbeat_timeout_seconds=300) == verdict


def test_failure_messages_name_the_deployment_the_pool_and_what_to_check() -> None:
    config = AlphaSpinConfig()
    args = ("alphaspin-run-iteration/gpu", "gpu", "abc", "Running", config)
    dead = child_failure("no_heartbeat", *args)
    assert "alphaspin-run-iteration/gpu" in dead and "work pool gpu" in dead and "no heartbeat for 900 s" in dead
    queued = child_failure("never_started", *args)
    assert "prefect worker start --pool gpu" in queued and "orchestration.child_timeout_seconds=172800" in queued
    assert "Raise the timeout" in child_failure("timed_out", *args)


# -- no deadlock, no duplicate child, the GPUs it needs --------------------------------------------
def test_split_run_on_its_own_pool_is_refused_in_one_line() -> None:
    check_split_pools("alphaspin-run-iteration/gpu", "cpu", "gpu")
    check_split_pools("alphaspin-run-iteration/gpu", None, "gpu")  # not started by a worker (a local call)
    with pytest.raises(ConfigError, match="work pool 'gpu', the pool this flow run occupies") as error:
        check_split_pools("alphaspin-run-iteration/gpu", "gpu", "gpu")
    assert "\n" not in str(error.value)


def test_idempotency_key_joins_retries_of_one_parent_only() -> None:
    config = AlphaSpinConfig()
    key = child_idempotency_key("parent-1", config, 1, ["train"])
    assert key == child_idempotency_key("parent-1", config, 1, ["train"])  # the parent's retry joins its child
    assert key.startswith("alphaspin-parent-1-iter-1-")
    others = {
        child_idempotency_key("parent-2", config, 1, ["train"]),  # another parent flow run
        child_idempotency_key("parent-1", config, 2, ["train"]),  # another iteration
        child_idempotency_key("parent-1", config, 1, []),  # other forced stages
        child_idempotency_key(
            "parent-1", config.model_copy(update={"run": config.run.model_copy(update={"seed": 1})}), 1, ["train"]
        ),
    }
    assert key not in others and len(others) == 4


def test_tensor_parallel_size_reaches_the_pools_gpu_count() -> None:
    config = AlphaSpinConfig.model_validate({"generation": {"tensor_parallel_size": 2}})
    variables = _template("k8s-gpu-job-template.json")["variables"]["properties"]
    assert child_job_variables(config, variables) == {"gpu_count": 2}
    assert child_job_variables(AlphaSpinConfig(), variables) == {"gpu_count": 1}
    # Docker's default -1 gives the container every GPU and leaves the choice to its GPU-owning worker
    docker = _template("docker-gpu-job-template.json")["variables"]["properties"]
    assert child_job_variables(config, docker) == {}
    counted = {**docker, "gpu_count": {**docker["gpu_count"], "default": 1}}  # a pool made to count GPUs
    assert child_job_variables(config, counted) == {"gpu_count": 2}
    from prefect.workers.process import ProcessWorker

    process = ProcessWorker.get_default_base_job_template()["variables"]["properties"]
    assert child_job_variables(config, process) == {}  # a process worker's GPUs are its CUDA_VISIBLE_DEVICES
    pinned = {**_template("docker-gpu-job-template.json")["variables"]["properties"]}
    pinned["gpu_device_ids"] = {**pinned["gpu_device_ids"], "default": ["1"]}
    assert child_job_variables(AlphaSpinConfig(), pinned) == {}  # a pool per GPU keeps its pin
    with pytest.raises(ConfigError, match="pinned to GPU"):
        child_job_variables(config, pinned)


def test_job_variables_given_for_the_children_are_checked_in_one_line_and_win() -> None:
    """A split run's ``iteration_job_variables`` (node selection, a GPU count): checked against the
    children's pool template before anything starts, one line naming the variable; merged over the
    GPU count the iteration needs."""
    config = AlphaSpinConfig.model_validate({"generation": {"tensor_parallel_size": 2}})
    k8s = _template("k8s-gpu-job-template.json")["variables"]["properties"]
    docker = _template("docker-gpu-job-template.json")["variables"]["properties"]
    h100 = {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    dedicated = [{"key": "dedicated", "operator": "Equal", "value": "gpu", "effect": "NoSchedule"}]
    given = {"node_selector": h100, "tolerations": dedicated}
    assert child_job_variables(config, k8s, given) == {"gpu_count": 2, **given}
    assert child_job_variables(config, k8s, {"gpu_count": 4}) == {"gpu_count": 4}
    assert child_job_variables(config, docker, {"gpu_device_ids": ["0", "1"], "gpu_count": 0}) == {
        "gpu_device_ids": ["0", "1"],
        "gpu_count": 0,
    }
    bad = [
        (k8s, {"gpu_count": "two"}, "iteration_job_variables.gpu_count: 'two' is not of type 'integer'"),
        (k8s, {"gpu_count": 1}, "iteration_job_variables.gpu_count: 1 GPU(s), but generation.tensor_parallel_size"),
        (k8s, {"node_selector": ["gpu"]}, "iteration_job_variables.node_selector: ['gpu'] is not of type 'object'"),
        (k8s, {"node_selector": {"gpu type": "h100"}}, "iteration_job_variables.node_selector: a key 'gpu type'"),
        (k8s, {"node_selector": {"gpu": "H100 80GB"}}, "iteration_job_variables.node_selector['gpu']: 'H100 80GB'"),
        (k8s, {"tolerations": [{"key": "gpu", "operator": "Maybe"}]}, "tolerations[0]['operator']: 'Maybe' is not"),
        (k8s, {"nodeSelector": h100}, "iteration_job_variables.nodeSelector: not a job variable of the children's"),
        (docker, {"gpu_device_ids": ["first"]}, "iteration_job_variables.gpu_device_ids[0]: 'first' does not"),
        (docker, {"gpu_count": 0, "gpu_device_ids": ["3"]}, "pinned to GPU(s) ['3'] (iteration_job_variables."),
    ]
    for pool, variables, message in bad:
        with pytest.raises(ConfigError) as error:
            child_job_variables(config, pool, variables)
        assert message in str(error.value) and "\n" not in str(error.value), (variables, str(error.value))


def test_the_recipe_deployment_takes_iteration_job_variables_for_split_runs_only() -> None:
    from alphaspin.flows.deployments import alphaspin_recipe

    with pytest.raises(ConfigError, match="iteration_job_variables: only for a split run"):
        alphaspin_recipe.fn(iteration_job_variables={"gpu_count": 2})


def test_a_split_run_with_a_malformed_node_selector_stops_before_anything_is_written(
    prefect_server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The recipe flow on a Prefect server, split onto a (Kubernetes) pool: the children's job variables
    are checked before run.json exists or any child is started."""
    import alphaspin.flows.orchestration as orchestration
    from alphaspin.flows.deployments import alphaspin_recipe

    k8s = _template("k8s-gpu-job-template.json")["variables"]["properties"]
    monkeypatch.setattr(orchestration, "deployment_pool", lambda deployment: ("gpu-k8s", k8s))
    started = []
    monkeypatch.setattr(orchestration, "run_child", lambda *args, **kwargs: started.append(args))
    with pytest.raises(ConfigError) as error:
        alphaspin_recipe(
            overrides=[f"run.runs_root={tmp_path}", "run.run_id=split-bad-selector"],
            iteration_deployment="alphaspin-run-iteration/gpu",
            iteration_job_variables={"node_selector": {"gpu type": "h100"}},
        )
    assert str(error.value).startswith("iteration_job_variables.node_selector: a key 'gpu type' does not match")
    assert not (tmp_path / "split-bad-selector").exists() and started == []


# -- the server's safety net: Prefect's zombie-flow automation -------------------------------------
def test_zombie_automation_crashes_flow_runs_that_stop_heartbeating() -> None:
    from prefect.client.schemas.objects import StateType
    from prefect.events.schemas.automations import Posture
    from prefect.settings import get_current_settings

    from alphaspin.flows.orchestration import ZOMBIE_AFTER_SECONDS, zombie_automation

    automation = zombie_automation()
    trigger = automation.trigger
    assert trigger.posture == Posture.Proactive and trigger.threshold == 1
    assert trigger.after == {"prefect.flow-run.heartbeat"}
    assert trigger.expect == {
        "prefect.flow-run.heartbeat",
        *(f"prefect.flow-run.{s}" for s in ("Completed", "Failed", "Cancelled", "Crashed")),
    }
    assert trigger.for_each == {"prefect.resource.id"}  # one countdown per flow run
    # Prefect 3.8 heartbeats every flow run (180 s by default): the window covers three beats
    frequency = get_current_settings().flows.heartbeat_frequency
    assert frequency is not None and trigger.within == timedelta(seconds=ZOMBIE_AFTER_SECONDS) >= timedelta(
        seconds=3 * frequency
    )
    [action] = automation.actions
    assert action.type == "change-flow-run-state" and action.state == StateType.CRASHED
    # the child's own watch must not give up before the server's automation would
    assert AlphaSpinConfig().orchestration.child_heartbeat_timeout_seconds >= ZOMBIE_AFTER_SECONDS


# -- the pool templates, rendered as a worker renders them -----------------------------------------
def _render(template: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """The job configuration a worker builds for a flow run: Prefect's `from_template_and_values`
    (variable defaults, the flow run's job variables, env merged), kept as a plain dict."""
    from prefect.workers.base import BaseJobConfiguration

    class Rendered(BaseJobConfiguration, extra="allow"):
        pass

    config = asyncio.run(Rendered.from_template_and_values(template, values, client=object()))
    return config.model_dump()


def test_docker_template_requests_gpus_and_shared_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    import docker.models.containers as containers

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)  # the worker's (here: this process's) GPUs

    template = _template("docker-gpu-job-template.json")
    assert "container_wait_timeout" not in template["job_configuration"]  # not a field of the Docker worker
    assert "container_wait_timeout" not in template["variables"]["properties"]

    def host_config(values: dict[str, Any]) -> dict[str, Any]:
        kwargs = _render(template, values)["container_create_kwargs"]
        # what docker-py makes of the worker's create kwargs (the worker passes them to containers.create)
        return containers._create_container_args({"image": "x", "version": "1.44", **kwargs})["host_config"]

    default = host_config({})
    assert default["DeviceRequests"] == [
        {"Driver": "nvidia", "Count": -1, "DeviceIDs": [], "Capabilities": [["gpu"]], "Options": {}}
    ]
    assert default["ShmSize"] == 8 * 1024**3
    assert host_config({"gpu_count": 2})["DeviceRequests"][0]["Count"] == 2
    pinned = host_config({"gpu_count": 0, "gpu_device_ids": ["1"]})["DeviceRequests"][0]
    assert (pinned["Count"], pinned["DeviceIDs"]) == (0, ["1"])

    rendered = _render(template, {"runs_root": "s3://b/runs", "env": {"HF_TOKEN": "t"}})
    worker_gpus = {"ALPHASPIN_WORKER_GPUS": ""}  # a worker without CUDA_VISIBLE_DEVICES (tests/test_docker_files.py)
    assert rendered["env"] == {"ALPHASPIN_RUNS_ROOT": "s3://b/runs", "HF_TOKEN": "t", **worker_gpus}
    assert "ALPHASPIN_RUNS_ROOT" not in (_render(template, {})["env"] or {})  # unset: the image's default
    assert {v.split(":")[1] for v in rendered["volumes"]} == {"/cache/huggingface", "/cache/compile"}


def test_docker_template_with_the_real_docker_worker() -> None:
    worker = pytest.importorskip("prefect_docker.worker")
    config = asyncio.run(
        worker.DockerWorkerJobConfiguration.from_template_and_values(
            _template("docker-gpu-job-template.json"), {"gpu_count": 2}, client=object()
        )
    )
    assert config.container_create_kwargs["device_requests"][0]["count"] == 2
    fields = set(worker.DockerWorkerJobConfiguration.model_fields)
    assert set(_template("docker-gpu-job-template.json")["job_configuration"]) <= fields


def test_k8s_template_runs_root_cache_and_non_root() -> None:
    template = _template("k8s-gpu-job-template.json")
    rendered = _render(template, {"gpu_count": 2, "runs_root": "s3://b/runs"})
    assert rendered["env"] == {"ALPHASPIN_RUNS_ROOT": "s3://b/runs"}
    pod = rendered["job_manifest"]["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert pod["securityContext"]["runAsNonRoot"] is True  # the uid is the image's (test_docker_files)
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    claims = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in pod["volumes"]}
    assert mounts["cache"] == "/cache" and claims["cache"] == "alphaspin-cache"


def test_templates_suggest_secret_blocks_not_plain_credentials() -> None:
    for name in ("docker-gpu-job-template.json", "k8s-gpu-job-template.json"):
        text = (ROOT / "deploy" / name).read_text()
        assert "{{ prefect.blocks.secret." in text, name
    docs = (ROOT / "docs" / "gpu-pool.md").read_text()
    assert '"AWS_SECRET_ACCESS_KEY": "..."' not in docs
    assert "prefect.blocks.secret." in docs


# -- the watch itself, against a scripted Prefect API: split runs and grid cells alike --------------
class _ScriptedPrefect:
    """`run_deployment` and the sync client as `alphaspin.flows.orchestration` uses them, over scripted
    children: each new idempotency key gets the next script, ``"dead"`` (Running since long ago, no
    heartbeat: its worker was SIGKILLed), ``"late"`` (the same, but its worker is alive and answers
    Cancelling with Cancelled: only its heartbeats were late), ``"completed"`` or ``"failed"``."""

    def __init__(self, scripts: list[str]) -> None:
        self.scripts = list(scripts)
        self.runs: dict[Any, Any] = {}  # id -> FlowRun
        self.by_key: dict[str, Any] = {}
        self.calls: list[dict[str, Any]] = []
        self.forced: list[tuple[Any, str]] = []
        self.live: set[Any] = set()  # children whose worker answers

    def run_deployment(self, name: str, **kwargs: Any) -> Any:
        from uuid import uuid4

        from prefect.client.schemas.objects import FlowRun
        from prefect.states import Completed, Failed, Running

        self.calls.append({"name": name, **kwargs})
        if kwargs.get("timeout", "unset") is None:
            raise AssertionError("run_deployment(timeout=None) waits for ever on a child whose worker died")
        key = kwargs["idempotency_key"]
        if key not in self.by_key:
            script = self.scripts.pop(0)
            now = datetime.now(UTC)
            states = {"dead": Running(), "late": Running(), "completed": Completed(), "failed": Failed(message="x")}
            state = states[script]
            if script in ("dead", "late"):
                state.timestamp = now - timedelta(hours=1)
            run = FlowRun(id=uuid4(), name=kwargs["flow_run_name"], flow_id=uuid4(), state=state, created=now)
            self.runs[run.id] = run
            self.by_key[key] = run.id
            if script == "late":
                self.live.add(run.id)
        return self.runs[self.by_key[key]]

    # the sync client
    def __enter__(self) -> _ScriptedPrefect:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def read_flow_run(self, flow_run_id: Any) -> Any:
        return self.runs[flow_run_id]

    def read_events(self, *args: Any, **kwargs: Any) -> Any:
        from types import SimpleNamespace

        return SimpleNamespace(events=[])  # no heartbeat since it started Running

    def set_flow_run_state(self, flow_run_id: Any, state: Any, force: bool = False) -> None:
        from prefect.states import Cancelled

        self.forced.append((flow_run_id, state.name))
        if state.name == "Cancelling" and flow_run_id in self.live:
            state = Cancelled(message="stopped by its worker")
        self.runs[flow_run_id] = self.runs[flow_run_id].model_copy(update={"state": state})


@pytest.fixture
def scripted(monkeypatch: pytest.MonkeyPatch):
    import prefect.deployments

    import alphaspin.flows.orchestration as orchestration

    def install(*scripts: str) -> _ScriptedPrefect:
        fake = _ScriptedPrefect(list(scripts))
        monkeypatch.setattr(orchestration, "run_deployment", fake.run_deployment)
        monkeypatch.setattr(prefect.deployments, "run_deployment", fake.run_deployment)  # a direct import sees it too
        monkeypatch.setattr(orchestration, "get_client", lambda sync_client=True: fake)
        monkeypatch.setattr(orchestration, "deployment_pool", lambda deployment: ("gpu", {}))
        monkeypatch.setattr(orchestration, "POLL_SECONDS", 0.0)
        monkeypatch.setattr(orchestration, "STOP_GRACE_FRACTION", 1e-4)
        return fake

    return install


def _cell_config(retries: int) -> AlphaSpinConfig:
    return AlphaSpinConfig.model_validate({"run": {"run_id": "grid-a-s0"}, "orchestration": {"child_retries": retries}})


def test_grid_cell_whose_worker_died_is_crashed_and_reported_not_waited_for(scripted) -> None:
    """`alphaspin-grid` on a deployment: a cell's flow run whose worker was killed stays Running on a
    self-hosted server; the grid must mark it Crashed and report the cell, never wait for ever."""
    from alphaspin.flows.grid import run_cell

    fake = scripted("dead")
    with pytest.raises(RuntimeError, match=r"cell grid-a-s0: flow run .* on work pool gpu is Running but sent no "):
        run_cell.fn(_cell_config(retries=0), "alphaspin-recipe/gpu", "grid-key")
    assert [call["timeout"] for call in fake.calls] == [0]  # started, then watched
    [(dead, asked), (_, state)] = fake.forced  # asked to stop first (nobody answers: its worker is gone)
    assert (asked, state) == ("Cancelling", "Crashed") and fake.runs[dead].state.is_crashed()


def test_a_child_whose_worker_died_is_started_again_and_a_failed_one_is_not(scripted) -> None:
    from alphaspin.flows.grid import run_cell
    from alphaspin.flows.orchestration import run_child

    fake = scripted("dead", "completed")  # the cell's worker dies; its second flow run completes
    assert run_cell.fn(_cell_config(retries=1), "alphaspin-recipe/gpu", "grid-key") == "Completed"
    assert [call["idempotency_key"] for call in fake.calls] == ["grid-key", "grid-key-retry1"]
    assert [state for _, state in fake.forced] == ["Cancelling", "Crashed"]

    fake = scripted("dead", "dead")  # restarts are bounded by orchestration.child_retries
    with pytest.raises(RuntimeError, match="sent no heartbeat"):
        run_child("alphaspin-run-iteration/gpu", {}, "r-iter-0", "key", {}, "gpu", _cell_config(retries=1))
    assert len(fake.calls) == 2 and [state for _, state in fake.forced] == ["Cancelling", "Crashed"] * 2

    fake = scripted("failed", "completed")  # a stage error is not an infrastructure loss: no restart
    with pytest.raises(RuntimeError, match="ended Failed"):
        run_child("alphaspin-run-iteration/gpu", {}, "r-iter-0", "key", {}, "gpu", _cell_config(retries=2))
    assert len(fake.calls) == 1 and fake.forced == []


def test_a_child_whose_heartbeats_are_only_late_is_stopped_by_its_worker_before_it_is_replaced(scripted) -> None:
    """Heartbeats reach a busy server late: a live child taken for dead must not keep running next to
    its replacement (two processes on one stage and one GPU). It is asked to stop; its worker does."""
    from alphaspin.flows.orchestration import run_child

    fake = scripted("late", "completed")
    run_child("alphaspin-run-iteration/gpu", {}, "r-iter-0", "key", {}, "gpu", _cell_config(retries=1))
    [(first, asked)] = fake.forced  # never forced to Crashed: its worker stopped it
    assert asked == "Cancelling" and fake.runs[first].state.name == "Cancelled"
    assert len(fake.calls) == 2
