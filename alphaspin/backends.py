"""The generation backend named by ``generation.backend``: transformers (CPU/GPU) or vLLM.

Its own module so that `alphaspin.generation` (requests, the transformers backend) and
`alphaspin.vllm_backend` (which builds on those requests) import one way only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedTokenizerBase

from alphaspin.config import AlphaSpinConfig, ConfigError, GenerationConfig
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


def check_engines(config: AlphaSpinConfig, device: str) -> None:
    """What a run executed here needs besides its model and data, checked before its first stage:
    vLLM's environment (``generation.backend`` or ``evaluation.benchmark_backend``: vllm) and the
    training launcher (``training.num_processes`` and the rest, `alphaspin.distributed.check_launch`).
    Each problem is a `ConfigError` naming the knob: one line, nothing written yet."""
    from alphaspin import distributed
    from alphaspin.vllm_server import VllmError, find_vllm_python

    try:
        if config.generation.backend == "vllm" or config.evaluation.benchmark_backend == "vllm":
            find_vllm_python(config.generation.vllm_python)
        if distributed.is_launched(config.training):
            distributed.check_launch(config.training, device)
    except (VllmError, ValueError) as error:
        raise ConfigError(str(error)) from error
