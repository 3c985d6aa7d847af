"""Split orchestration on two work pools, one GPU pool with two GPU-owning workers, and a GPU worker
killed mid-stage (docs/gpu-pool.md, sections 5 and 10).

A real ``prefect server start`` (SQLite), the walkthrough's `cpu` and `gpu` process pools, SeaweedFS as
run storage (``run.runs_root`` and the result-storage block on ``s3://``), the deployments of
deploy/prefect.yaml, and a tiny-model run started on the `cpu` pool (``alphaspin-recipe/quickstart``)
with ``iteration_deployment=alphaspin-run-iteration/gpu``: the parent flow run stays on `cpu`, the
iteration's stages run in a flow run of the `gpu` pool's deployment. The `gpu` pool is ONE pool served
by two workers, started as ``docker/gpu-workers.sh`` starts them for a two-GPU host (each with its own
``CUDA_VISIBLE_DEVICES`` and ``--limit 1``; the pool's and the `gpu` tag's limits at 2). The test reads
from the API which pool and which worker ran each flow run, and from each stage's manifest the GPUs its
process was given (``provenance.visible_gpus``).

While the iteration's ``train`` task is Running, the worker that runs it is SIGKILLed with everything
it started (its flow-run process lives in a session of its own): a lost GPU. Nobody touches the run:
the parent sees no heartbeat from its child for ``orchestration.child_heartbeat_timeout_seconds``,
marks it Crashed and starts the iteration again (``orchestration.child_retries``); the pool's other
worker, on the other GPU, runs it. What the test asserts from the API and from run storage: the stages
finished before the kill come back ``Cached`` and their manifests are byte for byte those written before
the kill (nothing upstream recomputed) and record the first worker's GPU, ``train`` resumes from its
last stored checkpoint on the second worker's GPU, and the killed task's slot of the `gpu` tag limit is
freed by Prefect's lease expiry without anyone resetting it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from prefect_stack import (
    DEPLOY_COMMAND,
    POOL_COMMANDS,
    ROOT,
    Stack,
    api_client,
    kill_tree,
    stage_of,
    tail,
    tiny_run_overrides,
)

RUN_ID = "pools-test"
BUCKET = "alphaspin"
UPSTREAM = ("sample_prompts", "generate", "build_pairs", "reference_logps")  # done before train, in iter-0
STAGES = (*UPSTREAM, "train", "evaluate")
GPU_STAGES = ("generate", "reference_logps", "train", "evaluate")  # the tasks tagged `gpu`
# docs/gpu-pool.md, section 5, for a host with two GPUs: one worker per GPU, and two slots in both limits
GPU_WORKERS = {"GPU_COUNT": "2", "WORKER_NAME_PREFIX": "node"}
TWO_GPU_LIMITS = ["prefect work-pool set-concurrency-limit gpu 2", "prefect concurrency-limit create gpu 2"]
HEARTBEAT_SECONDS = 30  # PREFECT_FLOWS_HEARTBEAT_FREQUENCY: Prefect's minimum (default 180)
# orchestration.child_heartbeat_timeout_seconds (default 900): three beats. Under load, heartbeat events
# were seen reaching this server 45 s late; a live child taken for dead is stopped (Cancelling) before
# it is replaced, so a false alarm costs time, never a second writer.
CHILD_HEARTBEAT_TIMEOUT = 90
# docs/gpu-pool.md, section 2: the result-storage block next to the runs (credentials from the AWS env).
RESULT_BLOCK = (
    "from prefect.filesystems import RemoteFileSystem; "
    f"RemoteFileSystem(basepath='s3://{BUCKET}/_prefect').save('alphaspin-results', overwrite=True)"
)


def _overrides(runs_root: str) -> list[str]:
    return [
        *tiny_run_overrides(runs_root, RUN_ID),
        "training.num_train_epochs=4",  # 12 steps: a train stage long enough to be killed in the middle
        "orchestration.result_storage=remote-file-system/alphaspin-results",
        f"orchestration.child_heartbeat_timeout_seconds={CHILD_HEARTBEAT_TIMEOUT}",
    ]


def _flow_runs_of(client, deployment: str) -> list[Any]:
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.client.schemas.sorting import FlowRunSort

    found = client.read_deployment_by_name(deployment)
    return client.read_flow_runs(
        deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[found.id])),
        sort=FlowRunSort.EXPECTED_START_TIME_ASC,
    )


def _tasks(client, flow_run_id) -> dict[str, Any]:
    """{stage or task name: task run} of one flow run."""
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterFlowRunId

    runs = client.read_task_runs(task_run_filter=TaskRunFilter(flow_run_id=TaskRunFilterFlowRunId(any_=[flow_run_id])))
    return {stage_of(run.name): run for run in runs}


def _wait(what: str, condition, timeout: float, logs, interval: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(interval)
    raise AssertionError(f"{what}: not after {timeout} s{logs()}")


def _manifests(fs, prefix: str) -> dict[str, bytes]:
    """{stage folder: its _MANIFEST.json bytes} of iter-0 in run storage."""
    return {path.split("/")[-2]: fs.cat_file(path) for path in fs.glob(f"{prefix}/iter-0/*/_MANIFEST.json")}


@pytest.mark.slow  # a real server, two pools, three workers, SeaweedFS (4.5-5 minutes on 2 cores shared with other test runs)
def test_split_run_on_cpu_and_gpu_pools_survives_a_killed_gpu_worker(tmp_path: Path) -> None:
    import s3fs

    from alphaspin.flows.orchestration import ZOMBIE_AUTOMATION
    from alphaspin.testing.s3server import SeaweedS3

    timings: dict[str, Any] = {}
    clock = [time.monotonic()]

    def lap(name: str) -> None:
        now = time.monotonic()
        timings[name] = round(now - clock[0], 1)
        clock[0] = now

    stack = Stack(tmp_path, None)
    store = SeaweedS3(data_dir=tmp_path / "seaweed").start()
    store.make_bucket(BUCKET)
    stack.env.update(store.env())
    stack.env["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] = str(HEARTBEAT_SECONDS)
    fs = s3fs.S3FileSystem(**store.storage_options())
    runs_root = f"s3://{BUCKET}/runs"
    run_prefix = f"{BUCKET}/runs/{RUN_ID}"

    def logs() -> str:
        names = ("worker-cpu-1", "worker-node-gpu-0", "worker-node-gpu-1")
        return "".join(f"\n--- {name} log:\n{tail(stack.log(name), 60)}" for name in names)

    try:
        stack.start_server()
        for line in [*POOL_COMMANDS, *TWO_GPU_LIMITS]:
            stack.cli(line)
        # the workers start up (seconds of imports) while the result block is saved and the deployments made
        stack.start_worker("cpu", name="cpu-1")
        gpu_workers = stack.start_workers_as_documented(GPU_WORKERS)  # node-gpu-0 and node-gpu-1, pool `gpu`
        devices = {"node-gpu-0": "0", "node-gpu-1": "1"}
        assert set(gpu_workers) == set(devices), gpu_workers
        done = subprocess.run(
            [sys.executable, "-c", RESULT_BLOCK], cwd=ROOT, env=stack.env, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr[-3000:]
        stack.cli(DEPLOY_COMMAND, timeout=300)
        lap("stack")

        parent_id = stack.run_deployment(
            "alphaspin-recipe/quickstart",
            {"overrides": _overrides(runs_root), "iteration_deployment": "alphaspin-run-iteration/gpu"},
        )
        with api_client(stack.api_url) as client:

            def train_running():
                for child in _flow_runs_of(client, "alphaspin-run-iteration/gpu"):
                    train = _tasks(client, child.id).get("train")
                    if train is not None and train.state is not None and train.state.is_running():
                        return child, train
                return None

            first, train = _wait("a Running train task on the gpu pool", train_running, 300, logs=logs)
            lap("until train runs")
            # a stored checkpoint first, so the resumed stage has something to resume from
            checkpoints = f"{run_prefix}/iter-0/train/**/_COMPLETE.json"
            _wait("a stored train checkpoint", lambda: fs.glob(checkpoints), 120, logs=logs)
            slots_before = client.read_concurrency_limit_by_tag("gpu").active_slots
            assert client.read_concurrency_limit_by_tag("gpu").concurrency_limit == 2
            assert client.read_work_pool("gpu").concurrency_limit == 2
            worker_a = client.read_flow_run(first.id).labels.get("prefect.worker.name")
            [worker_b] = set(devices) - {worker_a}

            killed = kill_tree(gpu_workers[worker_a])  # its GPU is gone: worker and flow-run process, no goodbye
            killed_at = time.monotonic()
            lap("until the kill")
            before = _manifests(fs, run_prefix)
            assert "train" not in before, "train finished before the kill: the test did not kill it mid-stage"
            assert {stage_of(f"iter-0/{name}") for name in before} == set(UPSTREAM), before.keys()
            assert train.id in slots_before, slots_before  # the killed task held the gpu tag's only slot
            assert len(killed) >= 2, killed  # the worker and its flow-run process
            # nobody starts a worker: the pool's other worker, on the other GPU, takes the iteration over

            # the slot is freed by Prefect's lease expiry (60 s, repossessor every 15 s), nobody resets it
            _wait(
                "the killed task's gpu tag slot freed",
                lambda: train.id not in client.read_concurrency_limit_by_tag("gpu").active_slots,
                150,
                interval=2,
                logs=logs,
            )
            timings["slot freed after the kill"] = round(time.monotonic() - killed_at, 1)

            parent = _wait(
                "the parent flow run final",
                lambda: (run := client.read_flow_run(parent_id)).state.is_final() and run,
                420,
                interval=2,
                logs=logs,
            )
            lap("after the kill, until the run completed")
            assert parent.state.is_completed(), f"{parent.state}\n{logs()}"

            # -- which pool and which worker ran what
            children = _flow_runs_of(client, "alphaspin-run-iteration/gpu")
            assert children[0].id == first.id, children
            assert (parent.work_pool_name, parent.labels.get("prefect.worker.name")) == ("cpu", "cpu-1")
            placement = [(c.work_pool_name, c.labels.get("prefect.worker.name"), c.state.name) for c in children]
            timings["children (pool, worker, state)"] = placement
            assert placement[0] == ("gpu", worker_a, "Crashed") and placement[-1] == ("gpu", worker_b, "Completed")
            # only a false alarm (heartbeats late on a loaded machine) may add one between: stopped, on worker_b
            assert all(p[:2] == ("gpu", worker_b) and p[2] in ("Cancelled", "Crashed") for p in placement[1:-1])
            assert "sent no heartbeat" in (children[0].state.message or ""), children[0].state.message
            for child in children:  # both are children of the parent flow run (run_deployment's task)
                assert client.read_task_run(child.parent_task_run_id).flow_run_id == parent.id
                assert child.name == f"{RUN_ID}-iter-0"
            assert not set(STAGES) & set(_tasks(client, parent.id)), "the parent ran a stage itself"

            # -- nothing upstream recomputed: Cached in the API, the same manifests in storage
            killed_tasks = _tasks(client, children[0].id)
            assert {s: killed_tasks[s].state.name for s in UPSTREAM} == dict.fromkeys(UPSTREAM, "Completed")
            resumed = _settled_tasks(client, children[-1].id)
            assert {s: resumed[s].state.name for s in STAGES} == {
                **dict.fromkeys(UPSTREAM, "Cached"),
                "train": "Completed",
                "evaluate": "Completed",
            }, {s: t.state.name for s, t in resumed.items()}
            after = _manifests(fs, run_prefix)
            assert {name: after[name] for name in before} == before  # not one upstream manifest rewritten
            train_metrics = json.loads(after["train"])["metrics"]
            # -- one pool, two GPUs: each worker's stages ran on its own GPU (CUDA_VISIBLE_DEVICES)
            ran_on = {name: json.loads(data)["provenance"]["visible_gpus"] for name, data in after.items()}
            timings["visible_gpus per stage"] = ran_on
            assert {name: ran_on[name] for name in before} == dict.fromkeys(before, devices[worker_a])
            assert (ran_on["train"], ran_on["evaluate"]) == (devices[worker_b], devices[worker_b])
            tagged = {s: "gpu" in t.tags for s, t in {**killed_tasks, **resumed}.items() if s in STAGES}
            assert tagged == {s: s in GPU_STAGES for s in STAGES}, tagged  # GPU stages on both workers
            assert (train_metrics["resumed_from"] or "").startswith("checkpoint-"), train_metrics
            assert client.read_concurrency_limit_by_tag("gpu").active_slots == []
            assert client.read_automations_by_name(ZOMBIE_AUTOMATION)  # the server's safety net was set up too
    except BaseException:
        print(f"timings so far: {timings}\n--- server log:\n{tail(stack.log('server'))}{logs()}")
        raise
    finally:
        stack.stop()
        store.close()
    print(f"timings: {timings}; resumed train from {train_metrics['resumed_from']}")


def _settled_tasks(client, flow_run_id, seconds: float = 30.0) -> dict[str, Any]:
    """`_tasks` once none is Pending or Running (task states arrive as events, after the flow run's state)."""
    deadline = time.monotonic() + seconds
    while True:
        tasks = _tasks(client, flow_run_id)
        if all(t.state.name not in ("Pending", "Running") for t in tasks.values()) or time.monotonic() > deadline:
            return tasks
        time.sleep(0.5)
