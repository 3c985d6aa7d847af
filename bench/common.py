"""What every benchmark shares: the machine and versions it ran on, model names, stage timing
(wrapping the cached runner's `Runner.prepare`/`Runner.execute` in the benchmark process, product
code untouched), and the output: JSON on stdout, a short table on stderr, optionally saved under
bench/results/."""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"
SMOLLM2 = "builtin:smollm2-135m-instruct"
# The quickstart's evaluate stage also runs lm-eval and the judged chat (minutes on 2 cores); these
# overrides keep only the held-out metrics, for benchmarks that are not about evaluation.
LIGHT_EVALUATION = ["evaluation.benchmarks=[]", "evaluation.judge.enabled=false"]


def script_setup() -> None:
    """Process-wide settings for a benchmark run as a script (never applied on import, so tests
    that import the entry functions keep their process as it was).

    On a CPU shared with other processes, OpenMP's default busy-waiting makes torch's small ops up
    to 100x slower (measured here: 2 threads, load average 4 on 2 cores), so idle OpenMP threads
    sleep unless OMP_WAIT_POLICY is already set; it only takes effect before torch loads. Then
    stderr is kept for the table: progress bars and library chatter are silenced.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import warnings

    warnings.filterwarnings("ignore")
    with contextlib.suppress(ImportError):
        import datasets

        datasets.disable_progress_bars()
    with contextlib.suppress(ImportError):
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        # The Trainer's PrinterCallback prints every log dict (train steps are logged anyway).
        transformers.trainer_callback.PrinterCallback.on_log = lambda self, args, state, control, **kwargs: None
    logging.getLogger("alphaspin").setLevel(logging.WARNING)


def set_threads(threads: int | None) -> None:
    """torch intra-op threads (None: torch's default, one per core)."""
    if threads:
        import torch

        torch.set_num_threads(threads)


def model_name(spec: str) -> str:
    """``tiny`` -> the tiny test model's folder (its head size 32 variant, which vLLM's CPU attention
    runs); anything else (builtin:..., a folder) as is."""
    if spec == "tiny":
        from alphaspin.testing.tiny_model import tiny_model_path

        return tiny_model_path(head_dim=32)
    return spec


def model_label(spec: str) -> str:
    return "tiny-llama (alphaspin.testing.tiny_model)" if spec == "tiny" else spec


def machine() -> dict[str, Any]:
    """CPU model, cores, load, memory, GPU (if any) of this machine."""
    import torch

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory_gib = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                memory_gib = round(int(line.split()[1]) / 2**20, 1)
    info: dict[str, Any] = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "load_average_1m_at_start": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "memory_gib": memory_gib,
        "platform": platform.platform(),
        "gpu": None,
    }
    if torch.cuda.is_available():
        info["gpu"] = {
            "count": torch.cuda.device_count(),
            "name": torch.cuda.get_device_name(0),
            "memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1),
        }
    return info


def versions() -> dict[str, str]:
    from alphaspin.runs import package_versions

    return package_versions()


def result(
    name: str,
    config: dict[str, Any],
    measured: dict[str, Any],
    summary: dict[str, Any],
    notes: Sequence[str] = (),
    machine_info: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The JSON every benchmark prints."""
    return {
        "benchmark": name,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine_info or machine(),
        "versions": versions(),
        "config": config,
        "summary": summary,
        "results": measured,
        "notes": list(notes),
    }


def stdout_to_stderr():
    """Libraries print (the Trainer's log dicts): keep stdout for the JSON alone."""
    return contextlib.redirect_stdout(sys.stderr)


def default_out(name: str) -> Path:
    return RESULTS_DIR / f"{time.strftime('%Y-%m-%d', time.gmtime())}-{name}.json"


def emit(data: dict[str, Any], table: str, out: str | None) -> None:
    """JSON to stdout, the table to stderr, and the JSON to ``out`` when given."""
    text = json.dumps(data, indent=2, default=_json_default)
    print(text)
    print(table, file=sys.stderr)
    if out:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
        print(f"saved {path}", file=sys.stderr)


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy / torch scalars
        return value.item()
    return str(value)


def base_parser(name: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"python -m bench.{name}", description=description)
    parser.add_argument("--out", help=f"save the JSON here (e.g. bench/results/<date>-{name}.json)")
    parser.add_argument("--save", action="store_true", help=f"save to bench/results/<today>-{name}.json")
    return parser


def out_path(args: argparse.Namespace, name: str) -> str | None:
    return args.out or (str(default_out(name)) if args.save else None)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], title: str = "") -> str:
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in cells)) if cells else len(str(h)) for i, h in enumerate(headers)]
    lines = [title] if title else []
    lines.append("  ".join(str(h).ljust(w) for h, w in zip(headers, widths, strict=True)))
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"
    return "-" if value is None else str(value)


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


# -- stage timing -------------------------------------------------------------------------------
@contextlib.contextmanager
def timed_stages(log: list[dict[str, Any]]) -> Iterator[list[dict[str, Any]]]:
    """Time every node the cached runner handles in this process: `alphaspin.runner.Runner`'s
    ``prepare`` (cache key, manifest and sha256 verification) plus ``execute`` (adopt, or run the
    stage function of `alphaspin.stages.REGISTRY` and commit), so a cached node is timed as the
    cost of skipping it. Each node appends {stage, iteration, member, seconds, digest, error} to
    ``log`` (``Runner.run_node`` is prepare then execute; the methods are wrapped on the class and
    restored after)."""
    from alphaspin.runner import Runner

    prepare, execute = Runner.prepare, Runner.execute
    prepared_seconds: dict[tuple[int, Any], float] = {}

    def entry(node: Any) -> dict[str, Any]:
        return {"stage": node.stage, "iteration": node.iteration, "member": node.member}

    @functools.wraps(prepare)
    def timed_prepare(self, node, *args, **kwargs):
        started = time.perf_counter()
        try:
            prepared = prepare(self, node, *args, **kwargs)
        except BaseException as error:
            log.append({**entry(node), "seconds": time.perf_counter() - started, "digest": None, "error": repr(error)})
            raise
        prepared_seconds[(id(self), node)] = time.perf_counter() - started
        return prepared

    @functools.wraps(execute)
    def timed_execute(self, prepared, *args, **kwargs):
        node = prepared.node
        done = entry(node)
        before = prepared_seconds.pop((id(self), node), 0.0)
        started = time.perf_counter()
        try:
            record = execute(self, prepared, *args, **kwargs)
        except BaseException as error:
            done.update(seconds=before + time.perf_counter() - started, digest=None, error=repr(error))
            log.append(done)
            raise
        done.update(seconds=before + time.perf_counter() - started, digest=record.digest, error=None)
        log.append(done)
        return record

    Runner.prepare, Runner.execute = timed_prepare, timed_execute  # type: ignore[method-assign]
    try:
        yield log
    finally:
        Runner.prepare, Runner.execute = prepare, execute  # type: ignore[method-assign]


def stage_label(entry: dict[str, Any]) -> str:
    return f"generate-{entry['member']}" if entry["stage"] == "generate" else entry["stage"]


def lora_adapter(model_path: str, folder: Path, seed: int, r: int = 16, scale: float = 0.02) -> str:
    """Save a LoRA adapter on ``model_path`` whose B matrices are small random values (a policy
    near the base, like a trained iterate), reproducibly from ``seed``."""
    import torch
    from peft import LoraConfig, get_peft_model

    from alphaspin.models import load_base_model

    torch.manual_seed(seed)
    config = LoraConfig(
        r=r,
        lora_alpha=2 * r,
        lora_dropout=0.0,
        task_type="CAUSAL_LM",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    model = get_peft_model(load_base_model(model_path), config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, scale)
    model.save_pretrained(folder)
    return str(folder)
