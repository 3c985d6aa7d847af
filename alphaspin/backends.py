"""The generation backend named by ``generation.backend``: transformers (CPU/GPU) or vLLM.

Its own module so that `alphaspin.generation` (requests, the transformers backend) and
`alphaspin.vllm_backend` (which builds on those requests) import one way only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedTokenizerBase

from alphaspin.config import GenerationConfig
from alphaspin.generation import GenerationBackend, TransformersBackend


def make_backend(
    config: GenerationConfig,
    model_path: str,
    tokenizer: PreTrainedTokenizerBase,
    dtype: torch.dtype,
    device: str,
    adapter_paths: Sequence[str] = (),
) -> GenerationBackend:
    if config.backend == "vllm":
        from alphaspin.vllm_backend import VllmBackend

        return VllmBackend(model_path, tokenizer, config, dtype=dtype, adapter_paths=adapter_paths, device=device)
    return TransformersBackend(model_path, tokenizer, config, dtype=dtype, device=device)
