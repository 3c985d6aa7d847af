"""The tiny run writes exactly the artifacts recorded in tests/data/tiny-run-digests.json, and none
of them holds a local path or a fact of the machine it ran on.

Recorded before the stage-registry refactor; a change of any stage's output shows here. Update the
record (``python tests/artifact_digests.py --write``) only together with a stage's code version.

One tiny run serves both tests (it takes ~2 minutes on 2 cores), run as on another user's machine:
the alphaspin cache, and the tiny model in it, lie in a fresh folder, so the model's absolute path
differs from the one the digests were recorded with. Machine facts belong to each stage's
``provenance.json`` (`alphaspin.provenance.machine_facts`), the one file the scan leaves out.
"""

from __future__ import annotations

import json
import os
import platform
import re
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from artifact_digests import GOLDEN, ROOT, cpu_kernels, run_digests, tiny_run_config

from alphaspin.pipeline import run
from alphaspin.provenance import FILE as PROVENANCE
from alphaspin.provenance import cpu_model
from alphaspin.storage import MANIFEST, RunStorage

BUILTIN = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Iterator[tuple[Path, Path]]:
    """(the run's folder, the alphaspin cache it ran with): the tiny run with ``ALPHASPIN_CACHE`` in a
    fresh folder. The builtin model the tiny model takes its tokenizer from is linked there (its GGUF
    conversion takes ~20 s); the tiny model itself is built anew under the new path."""
    from alphaspin.models import resolve_model_path

    builtin = resolve_model_path(f"builtin:{BUILTIN}")
    elsewhere = tmp_path_factory.mktemp("another-machine")
    cache = elsewhere / "alphaspin-cache"
    (cache / "models").mkdir(parents=True)
    (cache / "models" / BUILTIN).symlink_to(builtin, target_is_directory=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ALPHASPIN_CACHE", str(cache))
        config = tiny_run_config(elsewhere / "runs")
        assert config.model.name_or_path.startswith(str(cache))  # the model's path is not the recorded one
        run(config)
    yield Path(config.run.runs_root) / config.run.run_id, cache


@pytest.mark.slow
def test_tiny_run_artifacts_equal_the_recorded_digests(tiny_run):
    folder, _ = tiny_run
    recorded = json.loads(GOLDEN.read_text())
    found = run_digests(RunStorage(str(folder.parent), folder.name))
    assert sorted(found) == sorted(recorded["files"])
    for name, expected in recorded["files"].items():
        assert found[name]["values"] == expected["values"], name
    if recorded["cpu_kernels"] == cpu_kernels():  # same kernels: the very same bytes
        for name, expected in recorded["files"].items():
            assert found[name]["sha256"] == expected["sha256"], name


def _cpu_flags() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")) and ":" in line:
                return line.split(":", 1)[1].split()
    except OSError:
        pass
    return []


def _texts(path: Path) -> tuple[str, bool]:
    """(the file's content as text, whether that text is the file's own words): a table's rows, a
    safetensors header; a binary file (PNG, tensors) is searched as bytes for long needles only."""
    if path.suffix == ".parquet":
        import pandas as pd

        return pd.read_parquet(path).to_json(), True
    data = path.read_bytes()
    if path.suffix == ".safetensors":
        size = int.from_bytes(data[:8], "little")
        return data[8 : 8 + size].decode(), True
    try:
        text = data.decode()
    except UnicodeDecodeError:
        return data.decode("latin-1"), False
    if path.name in ("run.json", MANIFEST):
        # The run's record echoes the user's own config (here: the model and the runs root named by
        # absolute paths): that is the user's input, not something a stage found out. The rest is scanned.
        record = json.loads(text)
        record.pop("config", None)
        record.get("provenance", {}).pop("fields", None)
        text = json.dumps(record)
    return text, True


@pytest.mark.slow
def test_no_artifact_holds_a_local_path_or_a_machine_fact(tiny_run):
    """Every file of the run but provenance.json: no absolute path of this machine (the run's folder,
    the home folder, the alphaspin cache, the checkout), no kernel release, host name, CPU model or flags."""
    folder, cache = tiny_run
    paths = {
        "the run's folder": str(folder.parent.parent),
        "the home folder": str(Path.home()),
        "the alphaspin cache": str(cache),
        "the default alphaspin cache": str(Path.home() / ".cache" / "alphaspin"),
        "the checkout": str(ROOT),
    }
    facts = {"the kernel release": platform.release(), "the CPU model": cpu_model() or ""}
    flags = _cpu_flags()
    if len(flags) >= 4:
        facts["the CPU flags"] = " ".join(flags[:4])
    # The host name as the value of a host or node field (a host may be named like a word the run writes:
    # "main", "base"); lm-eval's machine description by its BogoMIPS.
    host = re.compile(rf"(?i)(host|node)[\w-]*[\"']?\s*[:=]\s*[\"']?{re.escape(socket.gethostname())}\b")
    needles = {what: value for what, value in {**paths, **facts}.items() if len(value) > 3 and value != os.sep}

    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != PROVENANCE)
    assert len(files) > 40 and any(p.name == "lm_eval_results.json" for p in files)
    found = []
    for path in files:
        text, is_text = _texts(path)
        found += [f"{path.relative_to(folder)}: {what} ({value})" for what, value in needles.items() if value in text]
        if is_text:
            if host.search(text):
                found.append(f"{path.relative_to(folder)}: the host name ({socket.gethostname()})")
            if "bogomips" in text.lower():
                found.append(f"{path.relative_to(folder)}: BogoMIPS")
    assert not found, "\n".join(found)
    # ... and the machine is recorded where it belongs
    provenance = json.loads((folder / "iter-0" / "evaluate" / PROVENANCE).read_text())
    assert provenance["machine"]["platform"] == platform.platform()
