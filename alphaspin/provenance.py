"""Provenance that answers "why don't my numbers match": what each iteration actually ran with.

The generate stage writes ``provenance.json`` with the chat template and tokenizer hashes
(`collect`), the package versions, and the backend and sampling parameters it used
(`sampling_used`); the evaluate stage writes ``provenance.json`` with the package versions and the
lm-eval version, tasks, few-shot counts and task-config hashes (`lm_eval_provenance`); both record the machine they ran on (`machine_facts`: OS and
kernel, CPU, torch's CUDA build, GPUs, driver), which no artifact holds. Everything in these files is
deterministic on one machine (no times, host names or paths).

Every stage's manifest also records, under ``provenance``, the operational knobs it ran with
(``operational``: how it executed, `alphaspin.config.OPERATIONAL_KNOBS`, which may change between
attempts of a run) and the device it ran on (``device``).

`diff_runs` lists every difference between two runs: config (dotted keys), run.json's device and
package versions, each stage's ``provenance.json`` and the operational values each stage ran with.
`diff_attempts` lists, within one run, the stages that ran with operational values other than those
of run.json's config (the latest attempt's).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import platform
from pathlib import Path
from typing import TYPE_CHECKING, Any

from alphaspin.storage import MANIFEST, RunStorage, canonical_json

if TYPE_CHECKING:
    from alphaspin.config import AlphaSpinConfig
    from alphaspin.workspace import Workspace

FILE = "provenance.json"
# The packages whose versions can change a run's numbers.
PACKAGES = ("torch", "transformers", "peft", "trl", "datasets", "lm_eval", "vllm", "prefect", "alphaspin")
# Files of a model folder that define its tokenization (those present are hashed).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)
# The fixed conversation whose rendering is hashed.
CONVERSATION = (
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "2 + 2 = 4."},
)


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def package_versions() -> dict[str, str | None]:
    """``python`` and each of `PACKAGES` (None when not installed)."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def cpu_model() -> str | None:
    """The CPU's model name (Linux: /proc/cpuinfo; macOS: sysctl), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware")) and ":" in line:
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    if platform.system() == "Darwin":
        import subprocess

        with contextlib.suppress(OSError, subprocess.SubprocessError):
            done = subprocess.run(
                ["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True, timeout=10
            )
            if done.returncode == 0 and done.stdout.strip():
                return done.stdout.strip()
    return platform.processor() or None


def machine_facts() -> dict[str, Any]:
    """Where a stage ran, as far as it can move the numbers: the OS and kernel, the CPU and the CPU
    kernels torch picks, torch's CUDA build, the GPUs and the NVIDIA driver. Machine facts live here,
    in ``provenance.json``, and nowhere else: an artifact's bytes never depend on the machine (lm-eval's
    own ``pretty_env_info`` is left out of its record). Deterministic on one machine; no host name."""
    import torch

    from alphaspin.workspace import nvidia_gpus

    gpus = nvidia_gpus()
    return {
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_cuda": torch.version.cuda,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available()
        else [],
        "nvidia_driver": gpus.driver if gpus is not None else None,
    }


def template_hashes(tokenizer: Any) -> dict[str, str]:
    """sha256 of the chat template string and of the fixed two-turn conversation rendered with it
    (the rendering also covers the special tokens the template writes: BOS, EOS)."""
    rendered = tokenizer.apply_chat_template([dict(m) for m in CONVERSATION], tokenize=False)
    return {"template_sha256": sha256_text(str(tokenizer.chat_template)), "rendered_sha256": sha256_text(rendered)}


def tokenizer_file_hashes(model_path: str) -> dict[str, Any]:
    """sha256 of each tokenizer file of the resolved model folder, and of them all together."""
    folder = Path(model_path)
    files = {
        name: hashlib.sha256((folder / name).read_bytes()).hexdigest()
        for name in TOKENIZER_FILES
        if (folder / name).is_file()
    }
    return {"files": files, "sha256": sha256_text(canonical_json(files))}


def collect(config: AlphaSpinConfig, workspace: Workspace) -> dict[str, Any]:
    """The environment part of an iteration's provenance: chat template, tokenizer files, versions."""
    return {
        "chat_template": {"name": config.model.chat_template or "tokenizer", **template_hashes(workspace.tokenizer)},
        "tokenizer": tokenizer_file_hashes(workspace.model_path),
        "versions": package_versions(),
        "machine": machine_facts(),
    }


def lm_eval_provenance(record: dict[str, Any] | None) -> dict[str, Any] | None:
    """lm-eval's version, tasks with their few-shot counts, limit, task versions and a hash of each
    task's config, from `alphaspin.benchmarks.leaderboard.run_lm_eval`'s stored record (None: no lm-eval)."""
    if record is None:
        return None
    results = record.get("results", {})
    configs = results.get("configs", {}) or {}
    return {
        "version": _version("lm_eval"),
        "tasks": record.get("tasks"),
        "limit": record.get("limit"),
        "n_shot": results.get("n-shot"),
        "task_versions": results.get("versions"),
        "task_config_sha256": {task: sha256_text(canonical_json(cfg)) for task, cfg in sorted(configs.items())},
    }


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


# -- diff -------------------------------------------------------------------------------------------
# Identity, not configuration: two runs always differ here.
IDENTITY = ("run.run_id", "run.runs_root")


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as ``{"a.b.c": leaf}``; lists and scalars are leaves."""
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(flatten(item, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): value}


def _show(value: Any) -> str:
    if isinstance(value, str):
        return value[:12] if len(value) == 64 and all(c in "0123456789abcdef" for c in value) else value
    return json.dumps(value, sort_keys=True)


def _diff_flat(a: dict[str, Any], b: dict[str, Any], where: str, ignore: tuple[str, ...] = ()) -> list[str]:
    rows = []
    for key in sorted(set(a) | set(b)):
        if key in ignore:
            continue
        if key not in b:
            rows.append(f"{where}{key}: {_show(a[key])} → (absent)")
        elif key not in a:
            rows.append(f"{where}{key}: (absent) → {_show(b[key])}")
        elif a[key] != b[key]:
            rows.append(f"{where}{key}: {_show(a[key])} → {_show(b[key])}")
    return rows


def _run_json(storage: RunStorage) -> dict[str, Any]:
    path = storage.path("run.json")
    if not storage.exists(path):
        raise FileNotFoundError(f"no run at {storage.url} (no run.json)")
    return storage.read_json(path)


def stage_provenance(storage: RunStorage) -> dict[str, dict[str, Any]]:
    """``{"iter-t/<stage folder>": provenance}`` of every finished stage that records one."""
    out = {}
    for path in sorted(storage.fs.glob(storage.path("iter-*", "*", MANIFEST))):
        iteration, folder = path.rsplit("/", 3)[-3:-1]
        stage = storage.stage(int(iteration.removeprefix("iter-")), folder)
        manifest = stage.read_manifest()
        if manifest is not None and FILE in manifest.get("files", {}):
            out[f"{iteration}/{folder}"] = stage.read_json(FILE)
    return out


def stage_operational(storage: RunStorage) -> dict[str, dict[str, Any]]:
    """``{"iter-t/<stage folder>": {"device": ..., "<operational knob>": value, ...}}`` of every finished
    stage whose manifest records them (stages run before alphaspin recorded them are left out)."""
    out = {}
    for where, manifest in _manifests(storage).items():
        ran = manifest.get("provenance") or {}
        if "operational" in ran:
            device = {"device": ran["device"]} if "device" in ran else {}
            out[where] = {**device, **ran["operational"]}
    return out


def _manifests(storage: RunStorage) -> dict[str, dict[str, Any]]:
    """``{"iter-t/<stage folder>": manifest}`` of every finished stage."""
    out = {}
    for path in sorted(storage.fs.glob(storage.path("iter-*", "*", MANIFEST))):
        iteration, folder = path.rsplit("/", 3)[-3:-1]
        manifest = storage.stage(int(iteration.removeprefix("iter-")), folder).read_manifest()
        if manifest is not None:
            out[f"{iteration}/{folder}"] = manifest
    return out


def diff_runs(storage_a: RunStorage, storage_b: RunStorage) -> list[str]:
    """Every difference between two runs, one line each (``where key: a → b``); empty when none.

    Compared: the config (dotted keys; the run's id and location excepted), run.json's device and
    package versions, per iteration and stage the recorded provenance (chat template and
    tokenizer hashes, backend, sampling parameters, versions, lm-eval tasks and few-shot counts), and
    the operational values and device each stage ran with (``where ran with key: a → b``; for the
    stages both runs record them).
    """
    run_a, run_b = _run_json(storage_a), _run_json(storage_b)
    rows = _diff_flat(flatten(run_a.get("config", {})), flatten(run_b.get("config", {})), "config ", IDENTITY)
    for field in ("device", "versions", "forked_from"):
        rows += _diff_flat(flatten({field: run_a.get(field)}), flatten({field: run_b.get(field)}), "run.json ")
    stages_a, stages_b = stage_provenance(storage_a), stage_provenance(storage_b)
    for where in sorted(set(stages_a) | set(stages_b)):
        if where not in stages_b:
            rows.append(f"{where}: provenance only in A")
        elif where not in stages_a:
            rows.append(f"{where}: provenance only in B")
        else:
            rows += _diff_flat(flatten(stages_a[where]), flatten(stages_b[where]), f"{where} ")
    ran_a, ran_b = stage_operational(storage_a), stage_operational(storage_b)
    for where in sorted(set(ran_a) & set(ran_b)):
        rows += _diff_flat(ran_a[where], ran_b[where], f"{where} ran with ")
    return rows


def diff_attempts(storage: RunStorage) -> list[str]:
    """Within one run: each stage that ran with an operational value other than run.json's config
    (which holds the latest attempt's), or on another device than the run was created on, one line each
    (``where ran with key = the stage's value (run.json: value)``), and each finished stage that
    records none (run by an alphaspin that did not record them); empty when every stage ran so."""
    record = _run_json(storage)
    current = {**flatten(record.get("config", {})), "device": record.get("device")}
    recorded = stage_operational(storage)
    rows = [
        f"{where}: records no operational knobs (run before alphaspin recorded them)"
        for where in _manifests(storage)
        if where not in recorded
    ]
    for where, ran in recorded.items():
        for key in sorted(ran):
            if key in current and ran[key] != current[key]:
                rows.append(f"{where} ran with {key} = {_show(ran[key])} (run.json: {_show(current[key])})")
    return rows
