"""Deployments end to end, as docs/gpu-pool.md tells a user to do it.

A real ``prefect server start`` (SQLite, and PostgreSQL where its binaries are installed), the
work pools and the `gpu` tag limit of the walkthrough, ``prefect --no-prompt deploy --all
--prefect-file deploy/prefect.yaml`` run from the repository root, a process worker, and a
tiny-model run triggered with ``prefect deployment run ... -p ...``.

The run fails for real at its last stage: the evaluate stage's scratch folder is blocked by a
plain file, so the stage's first storage read raises (``StorageError: ... Not a directory``) as a
broken or full disk would; nothing in the product knows about the test. After the obstruction is
removed, ``prefect flow-run retry`` (the UI's Retry button) completes the run and every stage
that had finished comes back ``Cached``. Then the evaluation-only deployment evaluates the latest
run under runs_root. Server, worker and PostgreSQL are always stopped by pid (process groups).
"""

from __future__ import annotations

import ast
import asyncio
import json
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from prefect_stack import (
    DEPLOY_COMMAND,
    POOL_COMMANDS,
    PREFECT_FILE,
    ROOT,
    Stack,
    api_client,
    free_port,
    stage_of,
    tail,
    tiny_run_overrides,
    wait_final,
)

EXPECTED_DEPLOYMENTS = {
    "alphaspin-recipe/quickstart",
    "alphaspin-recipe/gpu",
    "alphaspin-run-iteration/gpu",
    "alphaspin-rerun-stage/gpu",
    "alphaspin-rerun-stage/cpu",
    "alphaspin-evaluate-run/nightly",
    "alphaspin-evaluate-run/cpu",
}
STAGE_TASKS = ("sample_prompts", "generate", "build_pairs", "reference_logps", "train", "evaluate")
RUN_ID = "deploy-test"


# -- PostgreSQL (initdb + pg_ctl on 127.0.0.1, a free port, a temp dir) ---------------------------
def _postgres_bin() -> Path | None:
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), key=lambda p: int(p.parts[-3]))
    if candidates:
        return candidates[-1].parent
    found = shutil.which("pg_ctl")
    return Path(found).resolve().parent if found else None


def _postgres_skip_reason() -> str | None:
    bindir = _postgres_bin()
    if bindir is None or not (bindir / "initdb").exists():
        return "PostgreSQL is not installed (no pg_ctl/initdb in /usr/lib/postgresql/*/bin or on PATH)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no `postgres` user to run the PostgreSQL server as"
        if shutil.which("runuser") is None:
            return "running as root and `runuser` is missing (PostgreSQL refuses to run as root)"
    return None


class Postgres:
    """A throwaway PostgreSQL cluster (trust auth, fsync off) for the Prefect server's database."""

    def __init__(self) -> None:
        self.bindir = _postgres_bin()
        self.dir = Path(tempfile.mkdtemp(prefix="alphaspin-pg-"))  # /tmp: the postgres user can reach it
        self.data = self.dir / "data"
        self.port = free_port()
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            user = pwd.getpwnam("postgres")
            os.chown(self.dir, user.pw_uid, user.pw_gid)
            self.as_user = ["runuser", "-u", "postgres", "--"]

    @property
    def url(self) -> str:
        return f"postgresql+asyncpg://prefect@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str, timeout: float = 120) -> None:
        subprocess.run([*self.as_user, *args], check=True, capture_output=True, timeout=timeout, cwd=self.dir)

    def start(self) -> Postgres:
        self._run(
            str(self.bindir / "initdb"),
            "-D",
            str(self.data),
            "-U",
            "prefect",
            "--auth=trust",
            "--no-sync",
            "-E",
            "UTF8",
            "--no-instructions",
        )
        options = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off"
        self._run(
            str(self.bindir / "pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            str(self.dir / "postgres.log"),
            "-w",
            "-t",
            "90",
            "-o",
            options,
            "start",
        )
        return self

    def stop(self) -> None:
        try:
            self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "-t", "30", "stop")
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
            pid_file = self.data / "postmaster.pid"
            if pid_file.exists():
                try:
                    os.kill(int(pid_file.read_text().split()[0]), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest) -> Iterator[str | None]:
    """The server's database: None for SQLite (in PREFECT_HOME), else a PostgreSQL URL."""
    if request.param == "sqlite":
        yield None
        return
    reason = _postgres_skip_reason()
    if reason:
        pytest.skip(reason)
    postgres = Postgres()
    try:
        postgres.start()
        yield postgres.url
    finally:
        postgres.stop()


def _settled_iteration_runs(client, parent_id: str, seconds: float = 30.0) -> list[tuple[str, dict[str, Any]]]:
    """`_iteration_runs` once no task run is still Pending or Running: task states reach the server as
    events, recorded a moment after the flow run's own (API-set) final state."""
    deadline = time.monotonic() + seconds
    while True:
        runs = _iteration_runs(client, parent_id)
        settled = all(st.name not in ("Pending", "Running") for _, stages in runs for st in stages.values())
        if settled or time.monotonic() > deadline:
            return runs
        time.sleep(0.5)


def _iteration_runs(client, parent_id: str) -> list[tuple[str, dict[str, Any]]]:
    """(state, {stage: task run state}) of each iteration subflow run of ``parent_id``, oldest first."""
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterParentFlowRunId,
        TaskRunFilter,
        TaskRunFilterFlowRunId,
    )
    from prefect.client.schemas.sorting import FlowRunSort

    children = client.read_flow_runs(
        flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent_id])),
        sort=FlowRunSort.EXPECTED_START_TIME_ASC,
    )
    out = []
    for child in children:
        tasks = client.read_task_runs(
            task_run_filter=TaskRunFilter(flow_run_id=TaskRunFilterFlowRunId(any_=[child.id]))
        )
        out.append((child.state.name, {stage_of(t.name): t.state for t in tasks if stage_of(t.name) in STAGE_TASKS}))
    return out


# -- the tests -------------------------------------------------------------------------------------
@pytest.mark.slow  # real Prefect servers, workers and deployments (minutes)
def test_deploy_run_fail_retry_cached(database: str | None, tmp_path: Path) -> None:
    from alphaspin.storage import MANIFEST

    timings: dict[str, float] = {}
    clock = time.monotonic()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.monotonic()
        timings[name] = round(now - clock, 1)
        clock = now

    stack = Stack(tmp_path, database)
    runs_root = tmp_path / "runs"
    try:
        stack.start_server()
        lap("server")
        for line in POOL_COMMANDS:  # one at a time: SQLite may answer concurrent writers "database is locked"
            stack.cli(line)
        lap("pools")
        stack.start_worker("cpu")
        deployed = stack.cli(DEPLOY_COMMAND, timeout=300)
        lap("deploy")
        with api_client(stack.api_url) as client:
            names = _deployment_names(client)
            assert names == EXPECTED_DEPLOYMENTS, deployed[-3000:]
            assert client.read_work_pool("gpu").concurrency_limit == 1
            assert client.read_concurrency_limit_by_tag("gpu").concurrency_limit == 1
            _check_recipe_form(client)
            _check_schedule_inactive(client)
            _check_k8s_template(client)

            # 1. A fresh run whose last stage fails for real (its scratch folder is blocked).
            blocker = runs_root / RUN_ID / "iter-0" / "evaluate" / "_scratch"
            blocker.parent.mkdir(parents=True)
            blocker.write_text("in the way")
            run_id = stack.run_deployment(
                "alphaspin-recipe/quickstart",
                {"overrides": [*tiny_run_overrides(runs_root, RUN_ID), "orchestration.retries=0"]},
            )
            failed = wait_final(client, run_id, stack, timeout=420)
            lap("failing run")
            assert failed.state.is_failed(), failed.state
            assert failed.name == RUN_ID  # the UI shows the run id as the flow run's name
            [(child_state, stages)] = _settled_iteration_runs(client, run_id)
            assert child_state == "Failed"
            assert {s: st.name for s, st in stages.items()} == {
                **dict.fromkeys(STAGE_TASKS[:-1], "Completed"),
                "evaluate": "Failed",
            }
            assert "Not a directory" in (stages["evaluate"].message or ""), stages["evaluate"].message

            # 2. Fix the cause, retry the flow run as the UI's Retry button does.
            blocker.unlink()
            stack.cli(f"prefect flow-run retry {run_id}")
            retried = wait_final(client, run_id, stack, timeout=300)
            lap("retry")
            assert retried.state.is_completed(), retried.state
            assert retried.run_count == 2
            runs = _settled_iteration_runs(client, run_id)
            assert [state for state, _ in runs] == ["Failed", "Completed"]
            assert {s: st.name for s, st in runs[-1][1].items()} == {
                **dict.fromkeys(STAGE_TASKS[:-1], "Cached"),
                "evaluate": "Completed",
            }
            metrics = json.loads((runs_root / RUN_ID / "iter-0" / "evaluate" / MANIFEST).read_text())["metrics"]
            assert "heldout/loglik_per_token" in metrics

            # 3. Evaluation only, of the latest run under runs_root (the nightly deployment's job);
            #    once (SQLite) to keep the file short: the database has nothing new to show here.
            if database is None:
                evaluation_id = stack.run_deployment("alphaspin-evaluate-run/cpu", {"runs_root": str(runs_root)})
                evaluation = wait_final(client, evaluation_id, stack, timeout=300)
                lap("evaluate-only")
                assert evaluation.state.is_completed(), evaluation.state
                assert evaluation.name == "latest-evaluate"
                tasks = _task_states(client, evaluation_id)
                assert tasks.get("evaluate") == "Completed", tasks
    except BaseException:
        print(
            f"timings so far: {timings}\n--- server log:\n{tail(stack.log('server'))}"
            f"\n--- worker log:\n{tail(stack.log('worker-cpu'), 120)}"
        )
        raise
    finally:
        stack.stop()
    print(f"timings ({'postgresql' if database else 'sqlite'}): {timings}")
    for process, _, _ in stack.processes:
        assert process.poll() is not None


def _deployment_names(client) -> set[str]:
    flows = {flow.id: flow.name for flow in client.read_flows()}
    return {f"{flows[d.flow_id]}/{d.name}" for d in client.read_deployments()}


def _task_states(client, flow_run_id: str) -> dict[str, str]:
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterFlowRunId

    tasks = client.read_task_runs(task_run_filter=TaskRunFilter(flow_run_id=TaskRunFilterFlowRunId(any_=[flow_run_id])))
    return {stage_of(t.name): t.state.name for t in tasks}


def _check_recipe_form(client) -> None:
    """The UI's run form: the recipe is a select of names, force_stages a multi-select of stages."""
    from alphaspin.stages import STAGE_NAMES

    deployment = client.read_deployment_by_name("alphaspin-recipe/quickstart")
    properties = deployment.parameter_openapi_schema["properties"]
    assert properties["recipe"]["enum"] == ["quickstart", "paper-gemma-2b", "spin-official"]
    assert properties["force_stages"]["type"] == "array"
    assert properties["force_stages"]["items"]["enum"] == list(STAGE_NAMES)  # every stage of the registry
    assert {"sample_prompts", "generate", "build_pairs", "reference_logps", "train", "evaluate"} <= set(STAGE_NAMES)
    assert deployment.parameters == {"recipe": "quickstart"}
    assert deployment.work_pool_name == "cpu"
    pull = deployment.pull_steps
    assert pull[-1]["prefect.deployments.steps.set_working_directory"]["directory"] == "{{ code.stdout }}"
    assert str(ROOT) in pull[0]["prefect.deployments.steps.run_shell_script"]["script"]


def _check_schedule_inactive(client) -> None:
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId, FlowRunFilter

    deployment = client.read_deployment_by_name("alphaspin-evaluate-run/nightly")
    [schedule] = deployment.schedules
    assert schedule.active is False
    assert schedule.schedule.cron == "0 3 * * *"
    assert schedule.parameters == {"force": False}
    runs = client.read_flow_runs(
        flow_run_filter=FlowRunFilter(),
        deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id])),
    )
    assert runs == []  # an inactive schedule creates no runs


def _check_k8s_template(client) -> None:
    """The Kubernetes GPU pool's base job template (docs/gpu-pool.md) is accepted by the server."""
    from prefect.client.schemas.actions import WorkPoolCreate

    template = json.loads((ROOT / "deploy" / "k8s-gpu-job-template.json").read_text())
    pool = client.create_work_pool(WorkPoolCreate(name="gpu-k8s", type="kubernetes", base_job_template=template))
    container = pool.base_job_template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpu_count }}"
    template = json.loads((ROOT / "deploy" / "docker-gpu-job-template.json").read_text())
    pool = client.create_work_pool(WorkPoolCreate(name="gpu-docker", type="docker", base_job_template=template))
    assert pool.base_job_template["variables"]["properties"]["image"]["default"].startswith("alphaspin-gpu:")


# -- prefect.yaml without a server -----------------------------------------------------------------
def _prefect_yaml() -> dict[str, Any]:
    return yaml.safe_load(PREFECT_FILE.read_text())


def test_prefect_yaml_entrypoints_pools_and_command() -> None:
    spec = _prefect_yaml()
    assert spec["prefect-version"] == _pinned("prefect")
    names = set()
    for deployment in spec["deployments"]:
        path, _, function = deployment["entrypoint"].partition(":")
        source = ROOT / path  # entrypoints are relative to the repository root (where you deploy from)
        assert source.is_file(), deployment["entrypoint"]
        flows = {
            node.name: node for node in ast.walk(ast.parse(source.read_text())) if isinstance(node, ast.FunctionDef)
        }
        assert function in flows, deployment["entrypoint"]
        flow_name = next(
            kw.value.value
            for dec in flows[function].decorator_list
            if isinstance(dec, ast.Call)
            for kw in dec.keywords
            if kw.arg == "name"
        )
        names.add(f"{flow_name}/{deployment['name']}")
        assert deployment["work_pool"]["name"] in {"cpu", "gpu"}
        if "recipe" in deployment.get("parameters", {}):
            assert (ROOT / "configs" / f"{deployment['parameters']['recipe']}.yaml").is_file()
    assert names == EXPECTED_DEPLOYMENTS
    docs = (ROOT / "docs" / "gpu-pool.md").read_text()
    assert DEPLOY_COMMAND in docs and DEPLOY_COMMAND in PREFECT_FILE.read_text()
    for line in POOL_COMMANDS:
        assert line in docs, line


def test_schedules_parse_inactive_and_next_run() -> None:
    from prefect.cli.deploy._schedules import _schedule_config_to_deployment_schedule
    from prefect.server.schemas.schedules import CronSchedule

    scheduled = [d for d in _prefect_yaml()["deployments"] if d.get("schedules")]
    assert scheduled, "prefect.yaml ships a schedule example"
    now = datetime.now(UTC)
    for deployment in scheduled:
        for config in deployment["schedules"]:
            assert config["active"] is False, f"{deployment['name']}: schedules ship inactive"
            built = _schedule_config_to_deployment_schedule(config)
            assert built["active"] is False
            cron = CronSchedule(cron=built["schedule"].cron, timezone=built["schedule"].timezone)
            [next_run] = asyncio.run(cron.get_dates(n=1, start=now))
            assert now < next_run <= now.replace(microsecond=0) + _one_day()
            assert next_run.hour == 3 and next_run.minute == 0


def _one_day():
    from datetime import timedelta

    return timedelta(days=1, seconds=1)


def _pinned(name: str) -> str:
    import tomllib

    for requirement in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]:
        if requirement.startswith(f"{name}=="):
            return requirement.split("==", 1)[1]
    raise AssertionError(f"{name} is not pinned in pyproject.toml")


# -- resolving parameters (no server) --------------------------------------------------------------
def test_resolve_config_recipe_overrides_and_full_config(monkeypatch: pytest.MonkeyPatch) -> None:
    from alphaspin.config import AlphaSpinConfig, ConfigError
    from alphaspin.flows.deployments import RUNS_ROOT_ENV, resolve_config

    monkeypatch.delenv(RUNS_ROOT_ENV, raising=False)
    config = resolve_config("quickstart", ["method.iterations=0", "method.alpha=1.0"])
    assert (config.run.run_id, config.method.iterations, config.method.alpha) == ("alphaspin-quickstart", 0, 1.0)
    assert resolve_config("paper-gemma-2b").model.name_or_path == "google/gemma-2b"
    given = AlphaSpinConfig()
    assert resolve_config("spin-official", ["run.run_id=mine"], given).run.run_id == "mine"  # config wins over recipe
    assert resolve_config(config=given.model_dump(mode="json")).method.alpha == given.method.alpha
    with pytest.raises(ConfigError, match="expected one of"):
        resolve_config("nope")
    with pytest.raises(ConfigError, match="method.alpha"):
        resolve_config("quickstart", ["method.alpha=2"])
    monkeypatch.setenv(RUNS_ROOT_ENV, "s3://bucket/runs")
    assert resolve_config("quickstart").run.runs_root == "s3://bucket/runs"
    assert resolve_config("quickstart", ["run.runs_root=/elsewhere"]).run.runs_root == "/elsewhere"


def test_latest_run_and_stored_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from alphaspin.config import AlphaSpinConfig, ConfigError, dump_config
    from alphaspin.flows.deployments import RUNS_ROOT_ENV, latest_run_id, stored_config

    monkeypatch.delenv(RUNS_ROOT_ENV, raising=False)
    with pytest.raises(ConfigError, match="no runs"):
        latest_run_id(str(tmp_path))
    for run_id, created in (("old", "2026-01-01T00:00:00Z"), ("new", "2026-06-01T00:00:00Z")):
        config = AlphaSpinConfig()
        config.run.run_id, config.run.runs_root = run_id, "./somewhere-else"
        (tmp_path / run_id).mkdir()
        record = {"run_id": run_id, "created": created, "config": dump_config(config)}
        (tmp_path / run_id / "run.json").write_text(json.dumps(record))
    assert latest_run_id(str(tmp_path)) == "new"
    monkeypatch.setenv(RUNS_ROOT_ENV, str(tmp_path))
    assert latest_run_id(None) == "new"
    found = stored_config("old", None)
    assert (found.run.run_id, found.run.runs_root) == ("old", str(tmp_path))  # where it was found
