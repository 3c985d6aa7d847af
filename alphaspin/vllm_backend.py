"""vLLM generation: one engine serving the base policy and every opponent member's LoRA adapter.

With LoRA every opponent member is the base plus an adapter (DESIGN.md), so one vLLM engine
(``enable_lora=True``) answers the whole arithmetic mixture: each request carries its member's
``LoRARequest`` (None for the base), and requests of different members may share one
``generate`` call — vLLM batches them together and applies each row's adapter (multi-LoRA).

What is sent is exactly what the transformers backend uses:

- the prompt as token ids (``TokensPrompt``) rendered by *our* tokenizer and chat template
  (`alphaspin.generation.render_prompt_ids`), never a text prompt that vLLM would re-template;
- a per-request seed (`alphaspin.generation.request_seed`): a row's text depends on its seed
  only, not on which other rows share its batch, so a regenerated shard gives the same text
  (``generation.per_request_seeds``, default true; false trades this for vLLM's faster batched
  sampler, docs/gpu.md);
- the tokenizer's EOS as a stop token; the text is decoded with our tokenizer, and a row whose
  ``finish_reason`` is ``"length"`` (stopped by ``max_new_tokens``) is reported as truncated.

The pure half, `build_vllm_inputs` and `engine_kwargs`, builds plain dicts and is tested
without vLLM or a GPU; `VllmBackend` turns them into vLLM objects.

GPU memory: `VllmBackend.close` shuts the engine down and releases its memory (engine-core
process, distributed state, CUDA cache), so the next GPU stage of the same process (reference
log-probs, training) starts with the GPU free. See docs/gpu.md.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from alphaspin.config import GenerationConfig
from alphaspin.generation import Completion, GenerationRequest

logger = logging.getLogger(__name__)

# The LoRA ranks vLLM can serve (``max_lora_rank`` must be one of them).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
_LORA_ID_SPACE = 2**31 - 1  # vLLM wants a positive int id; keep it in int32


def _normalise_adapter_path(path: str) -> str:
    return path if "://" in path else os.path.abspath(os.path.expanduser(path))


def lora_int_id(adapter_path: str) -> int:
    """A stable positive id for an adapter folder: the same path gives the same id in every call
    and process (vLLM caches loaded adapters by this id), different paths get different ids."""
    digest = hashlib.sha256(_normalise_adapter_path(adapter_path).encode()).digest()
    return int.from_bytes(digest[:8], "little") % _LORA_ID_SPACE + 1


def lora_spec(adapter_path: str | None) -> dict[str, Any] | None:
    """{name, id, path} of the ``LoRARequest`` answering with ``adapter_path``; None for the base."""
    if adapter_path is None:
        return None
    lora_id = lora_int_id(adapter_path)
    return {"name": f"alphaspin-lora-{lora_id}", "id": lora_id, "path": _normalise_adapter_path(adapter_path)}


def sampling_kwargs(config: GenerationConfig, seed: int, stop_token_ids: Sequence[int] = ()) -> dict[str, Any]:
    """``SamplingParams`` keyword arguments of one request (temperature 0 is greedy in vLLM). The
    request's own ``seed`` only with ``generation.per_request_seeds`` (the default): vLLM samples
    seeded rows with a generator per row, which keeps a row's text independent of its batch (resume
    determinism) but is slower than its batched sampler; without it the engine's seed drives every row."""
    kwargs: dict[str, Any] = {
        "n": 1,
        "temperature": config.temperature,
        "top_p": config.top_p,
        "max_tokens": config.max_new_tokens,
    }
    if config.per_request_seeds:
        kwargs["seed"] = seed
    if stop_token_ids:
        kwargs["stop_token_ids"] = [int(t) for t in stop_token_ids]
    return kwargs


def build_vllm_inputs(
    requests: Sequence[GenerationRequest], config: GenerationConfig, stop_token_ids: Sequence[int] = ()
) -> list[dict[str, Any]]:
    """One plain dict per request, in order: ``id``, ``prompt_token_ids`` (the chat-template ids
    of the request), ``lora`` ({name, id, path} or None for the base) and ``sampling`` (the
    ``SamplingParams`` kwargs, with the request's own seed). Requests of different members may be
    mixed: each keeps its own adapter."""
    seen: dict[int, str] = {}
    inputs = []
    for request in requests:
        lora = lora_spec(request.adapter_path)
        if lora is not None and seen.setdefault(lora["id"], lora["path"]) != lora["path"]:
            raise ValueError(f"adapters {seen[lora['id']]} and {lora['path']} hash to the same LoRA id")
        inputs.append(
            {
                "id": request.id,
                "prompt_token_ids": [int(t) for t in request.prompt_ids],
                "lora": lora,
                "sampling": sampling_kwargs(config, request.seed, stop_token_ids),
            }
        )
    return inputs


def dtype_name(dtype: torch.dtype | str) -> str:
    """vLLM's name of a torch dtype: torch.bfloat16 -> 'bfloat16'."""
    return dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")


def adapter_rank(adapter_path: str) -> int | None:
    """LoRA rank ``r`` from the adapter's ``adapter_config.json`` (None when unreadable)."""
    try:
        return int(json.loads((Path(adapter_path) / "adapter_config.json").read_text())["r"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def serving_lora_rank(config: GenerationConfig, adapter_paths: Sequence[str]) -> int:
    """``max_lora_rank`` for vLLM: the configured rank rounded up to one vLLM serves; an adapter
    of a larger rank is an error that names the config field."""
    ranks = [r for r in (adapter_rank(p) for p in adapter_paths) if r is not None]
    if ranks and max(ranks) > config.max_lora_rank:
        raise ValueError(
            f"generation.max_lora_rank: {config.max_lora_rank} is below the rank {max(ranks)} of an opponent "
            f"adapter; set it to at least training.lora.r"
        )
    served = next((r for r in VLLM_LORA_RANKS if r >= config.max_lora_rank), None)
    if served is None:
        raise ValueError(f"generation.max_lora_rank: vLLM serves LoRA ranks up to {VLLM_LORA_RANKS[-1]}")
    return served


def engine_kwargs(
    model_path: str, config: GenerationConfig, dtype: torch.dtype | str, adapter_paths: Sequence[str]
) -> dict[str, Any]:
    """Keyword arguments of the one ``vllm.LLM`` engine that serves the base and every adapter."""
    kwargs: dict[str, Any] = {
        "model": model_path,
        "tokenizer": model_path,
        "dtype": dtype_name(dtype),
        "tensor_parallel_size": config.tensor_parallel_size,
        "gpu_memory_utilization": config.gpu_memory_utilization,
        # Sampling is fully defined by our SamplingParams, not by the model's generation_config.json.
        "generation_config": "vllm",
        "enable_lora": bool(adapter_paths),
    }
    if not config.per_request_seeds:  # one engine-level generator for every row (generation.seed, else 0)
        kwargs["seed"] = config.seed if config.seed is not None else 0
    if adapter_paths:
        kwargs["max_lora_rank"] = serving_lora_rank(config, adapter_paths)
        kwargs["max_loras"] = len(set(adapter_paths))  # every member's adapter resident in one batch
        kwargs["max_cpu_loras"] = kwargs["max_loras"]
    return kwargs


def release_gpu_memory() -> None:
    """Free what a finished vLLM engine left: distributed state, Python garbage, the CUDA cache."""
    try:
        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory
    except ImportError:
        cleanup_dist_env_and_memory = None
    if cleanup_dist_env_and_memory is not None:
        try:
            cleanup_dist_env_and_memory()
        except Exception as error:  # cleanup must never fail a finished stage
            logger.warning("vLLM distributed cleanup failed: %s", error)
    else:
        with contextlib.suppress(Exception):
            from vllm.distributed import destroy_distributed_environment, destroy_model_parallel

            destroy_model_parallel()
            destroy_distributed_environment()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class VllmBackend:
    """`alphaspin.generation.GenerationBackend` on one vLLM engine serving the base policy and the
    LoRA adapters of ``adapter_paths`` (every opponent member the engine will be asked for)."""

    def __init__(
        self,
        model_path: str,
        tokenizer: PreTrainedTokenizerBase,
        config: GenerationConfig,
        dtype: torch.dtype | str = torch.bfloat16,
        adapter_paths: Sequence[str] = (),
    ):
        try:
            from vllm import LLM
        except ImportError as error:
            raise ImportError(
                "generation.backend: vllm needs the vllm package and a CUDA GPU (pip install 'alphaspin[gpu]'); "
                "use generation.backend: transformers on CPU"
            ) from error
        self.config = config
        self.tokenizer = tokenizer
        self.adapter_paths = [_normalise_adapter_path(p) for p in dict.fromkeys(adapter_paths)]
        self._stop_token_ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        kwargs = engine_kwargs(model_path, config, dtype, self.adapter_paths)
        # vLLM sizes its KV cache from gpu_memory_utilization × total memory and refuses to start
        # when that is not free: return what earlier stages of this process left in torch's cache.
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            free, total = torch.cuda.mem_get_info()
            logger.info("GPU memory free before vLLM starts: %.1f of %.1f GiB", free / 2**30, total / 2**30)
        logger.info("starting vLLM: %s", {k: v for k, v in kwargs.items() if k != "tokenizer"})
        self.llm = LLM(**kwargs)

    def generate(
        self, requests: Sequence[GenerationRequest], on_batch: Callable[[int], None] | None = None
    ) -> list[str]:
        """The decoded completion of each request, in order (`complete` without the truncation flags)."""
        return [c.text for c in self.complete(requests, on_batch)]

    def complete(
        self, requests: Sequence[GenerationRequest], on_batch: Callable[[int], None] | None = None
    ) -> list[Completion]:
        """The completion of each request, in order; requests of different members (base and
        adapters) may be mixed in one call."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.lora.request import LoRARequest

        if not requests:
            return []
        inputs = build_vllm_inputs(requests, self.config, self._stop_token_ids)
        unknown = {i["lora"]["path"] for i in inputs if i["lora"]} - set(self.adapter_paths)
        if unknown:
            raise ValueError(f"adapters not served by this engine (pass them as adapter_paths): {sorted(unknown)}")
        prompts = [TokensPrompt(prompt_token_ids=i["prompt_token_ids"]) for i in inputs]
        params = [SamplingParams(**i["sampling"]) for i in inputs]
        loras = [
            LoRARequest(i["lora"]["name"], i["lora"]["id"], i["lora"]["path"]) if i["lora"] else None for i in inputs
        ]
        lora_request = loras if any(lora is not None for lora in loras) else None
        outputs = self.llm.generate(prompts, params, use_tqdm=False, lora_request=lora_request)
        if len(outputs) != len(requests):
            raise RuntimeError(f"vLLM returned {len(outputs)} outputs for {len(requests)} requests")
        # finish_reason "length": stopped by max_tokens (generation.max_new_tokens), not by the EOS stop token.
        completions = [
            Completion(
                self.tokenizer.decode(out.outputs[0].token_ids, skip_special_tokens=True).strip(),
                out.outputs[0].finish_reason == "length",
            )
            for out in outputs
        ]
        if on_batch:
            on_batch(len(requests))
        return completions

    def close(self) -> None:
        """Shut the engine down and free its GPU memory before the next GPU stage starts."""
        llm = self.__dict__.pop("llm", None)
        if llm is None:
            return
        engine = getattr(llm, "llm_engine", None)
        core = getattr(engine, "engine_core", None)  # vLLM V1: the engine-core process holds the GPU
        if core is not None and hasattr(core, "shutdown"):
            try:
                core.shutdown()
            except Exception as error:
                logger.warning("vLLM engine shutdown failed: %s", error)
        del llm, engine, core
        release_gpu_memory()
