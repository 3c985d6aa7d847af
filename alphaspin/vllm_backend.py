"""vLLM generation: one engine serving the base policy and every opponent member's LoRA adapter.

With LoRA every opponent member is the base plus an adapter (DESIGN.md), so one vLLM engine
(``--enable-lora``) answers the whole arithmetic mixture: each request names its member's adapter
(``base`` for the base), and requests of different members may be in flight together — vLLM
batches them and applies each row's adapter (multi-LoRA). The engine is vLLM's own
OpenAI-compatible server in vLLM's own environment (`alphaspin.vllm_server` says why).

What is sent is exactly what the transformers backend uses:

- the prompt as token ids rendered by *our* tokenizer and chat template
  (`alphaspin.generation.render_prompt_ids`), never a text prompt that vLLM would re-template;
- a per-request seed (`alphaspin.generation.request_seed`): a row's text depends on its seed
  only, not on which other rows share its batch, so a regenerated shard gives the same text
  (``generation.per_request_seeds``, default true; false trades this for vLLM's faster batched
  sampler, docs/gpu.md);
- the tokenizer's EOS as a stop token; the generated token ids come back and are decoded with our
  tokenizer, and a row whose ``finish_reason`` is ``"length"`` (stopped by ``max_new_tokens``) is
  reported as truncated.

The pure half, `build_vllm_inputs` and `engine_settings`, builds plain values and is tested
without vLLM; `VllmBackend` sends them to the engine.
"""

from __future__ import annotations

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
from alphaspin.vllm_server import (
    BASE_NAME,
    EngineSettings,
    completion_body,
    find_vllm_python,
    parse_completion,
    release,
    shared_server,
)

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


def engine_settings(
    model_path: str,
    config: GenerationConfig,
    dtype: torch.dtype | str,
    device: str,
    adapter_paths: Sequence[str] = (),
) -> EngineSettings:
    """The settings of the one engine that serves the base and every adapter (`alphaspin.vllm_server`).
    Adapters are loaded at run time, so the engine does not depend on which ones a stage uses (and
    is shared by the stages of a process); only their rank does, checked against ``max_lora_rank``. On
    ``cuda:N`` (a stage's own GPUs, `alphaspin.devices`) the engine sees GPUs N.. of this process only."""
    from alphaspin.devices import engine_gpus

    visible, index = engine_gpus(str(device), config.tensor_parallel_size * config.vllm_data_parallel_size)
    return EngineSettings(
        python=find_vllm_python(config.vllm_python),
        model_path=model_path,
        dtype=dtype_name(dtype),
        device="cpu" if str(device).startswith("cpu") else "cuda",
        max_lora_rank=serving_lora_rank(config, adapter_paths),
        tensor_parallel_size=config.tensor_parallel_size,
        data_parallel_size=config.vllm_data_parallel_size,
        gpu_memory_utilization=config.gpu_memory_utilization,
        cpu_kvcache_gib=config.vllm_cpu_kvcache_gib,
        # One engine-level generator for every row (generation.seed, else 0) when rows carry no seed.
        seed=None if config.per_request_seeds else (config.seed if config.seed is not None else 0),
        extra_args=tuple(config.vllm_args),
        visible_devices=visible,
        gpu_index=index,
    )


class VllmBackend:
    """`alphaspin.generation.GenerationBackend` on one vLLM engine (vLLM's OpenAI-compatible server in
    its own environment, `alphaspin.vllm_server`) serving the base policy and the LoRA adapters of
    ``adapter_paths``; requests of different members may be mixed in one call."""

    def __init__(
        self,
        model_path: str,
        tokenizer: PreTrainedTokenizerBase,
        config: GenerationConfig,
        dtype: torch.dtype | str = torch.bfloat16,
        adapter_paths: Sequence[str] = (),
        device: str = "cpu",
    ):
        self.config = config
        self.tokenizer = tokenizer
        self.adapter_paths = [_normalise_adapter_path(p) for p in dict.fromkeys(adapter_paths)]
        self._stop_token_ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        settings = engine_settings(model_path, config, dtype, device, self.adapter_paths)
        self.device = settings.device
        # An engine with its own seed is never shared (`shared_server`): it is this backend's alone.
        self._private_engine = settings.seed is not None
        self.server = shared_server(settings, config.vllm_start_timeout_seconds)
        for path in self.adapter_paths:
            spec = lora_spec(path)
            self.server.load_adapter(spec["name"], spec["path"])

    def generate(
        self, requests: Sequence[GenerationRequest], on_batch: Callable[[int], None] | None = None
    ) -> list[str]:
        """The decoded completion of each request, in order (`complete` without the truncation flags)."""
        return [c.text for c in self.complete(requests, on_batch)]

    def complete(
        self, requests: Sequence[GenerationRequest], on_batch: Callable[[int], None] | None = None
    ) -> list[Completion]:
        """The completion of each request, in order; requests of different members (base and
        adapters) may be mixed in one call: they are in flight together and vLLM batches them."""
        if not requests:
            return []
        inputs = build_vllm_inputs(requests, self.config, self._stop_token_ids)
        unknown = {i["lora"]["path"] for i in inputs if i["lora"]} - set(self.adapter_paths)
        if unknown:
            raise ValueError(f"adapters not served by this engine (pass them as adapter_paths): {sorted(unknown)}")
        bodies = [
            completion_body(i["lora"]["name"] if i["lora"] else BASE_NAME, i["prompt_token_ids"], i["sampling"])
            for i in inputs
        ]
        responses = self.server.complete(bodies, concurrency=self.config.engine_concurrency)
        completions = []
        for response in responses:
            # finish_reason "length": stopped by max_tokens (generation.max_new_tokens), not by the EOS stop token.
            token_ids, truncated = parse_completion(response)
            text = self.tokenizer.decode(token_ids, skip_special_tokens=True).strip()
            completions.append(Completion(text, truncated, tuple(token_ids)))
        if on_batch:
            on_batch(len(requests))
        return completions

    def close(self) -> None:
        """On a GPU, stop the engine so the next stage of this process gets the GPU; on a CPU keep a
        shared engine for the next stage (stopped when the process exits), and stop a private one."""
        server = self.__dict__.pop("server", None)
        if server is not None and (self.device != "cpu" or self._private_engine):
            release(server)
