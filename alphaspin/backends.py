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


def served_lora_ranks(config: AlphaSpinConfig, device: str) -> dict[str, int]:
    """``{engine knob: rank}`` of the LoRA adapters a vLLM engine of this run must serve (its
    ``max_lora_rank`` must reach each): θ_t (``training.lora.r``) is sampled by the generate stages of
    t ≥ 1, the log Z(x) samples and the judged chat's answers with ``generation.backend: vllm``, and
    loaded as a LoRA by lm-eval's vllm backend on a GPU (on a CPU it gets the adapter merged into the
    weights). The gflownet sampler's rank is checked with the config (`AlphaSpinConfig`); the ema
    reference's adapter is only read by transformers (reference_logps), never served."""
    ranks: dict[str, int] = {}
    if config.generation.backend == "vllm" and (config.method.iterations >= 1 or config.evaluation.judge.enabled):
        ranks["generation.backend: vllm"] = config.training.lora.r
    evaluation = config.evaluation
    if evaluation.benchmark_backend == "vllm" and evaluation.benchmarks and not device.startswith("cpu"):
        ranks["evaluation.benchmark_backend: vllm"] = config.training.lora.r
    return ranks


def uses_vllm(config: AlphaSpinConfig) -> bool:
    """Whether a stage of this run starts a vLLM engine (generation, log Z samples, judged chat, lm-eval)."""
    return config.generation.backend == "vllm" or config.evaluation.benchmark_backend == "vllm"


def check_engine_gpus(generation: GenerationConfig, device: str, visible: int | None = None) -> None:
    """On CUDA, the engine's tensor × data parallel GPUs must be visible to this process (``visible``:
    default ``torch.cuda.device_count()``, which honours ``CUDA_VISIBLE_DEVICES``); vLLM would refuse
    them only after the stage started."""
    if str(device).startswith("cpu"):
        return
    if generation.vllm_data_parallel_size > 1 and str(device).startswith("mps"):
        raise ConfigError("generation.vllm_data_parallel_size: data parallel engines need CUDA GPUs; set it to 1")
    if not str(device).startswith("cuda"):
        return
    visible = torch.cuda.device_count() if visible is None else visible
    if generation.engine_gpus > visible:
        knob = "vllm_data_parallel_size" if generation.vllm_data_parallel_size > 1 else "tensor_parallel_size"
        raise ConfigError(
            f"generation.{knob}: {generation.tensor_parallel_size} (generation.tensor_parallel_size) "
            f"× {generation.vllm_data_parallel_size} = {generation.engine_gpus} GPUs for the vLLM engine, but this "
            f"process sees {visible} (CUDA_VISIBLE_DEVICES); lower generation.vllm_data_parallel_size or "
            f"generation.tensor_parallel_size"
        )


def check_engines(config: AlphaSpinConfig, device: str | None = None) -> str:
    """What a run executed here needs besides its data, checked before its first stage; returns the
    device. Each problem is a `ConfigError` naming the knob: one line, nothing written yet.

    - the device (`alphaspin.workspace.resolve_device` of ``device``, default ``model.device``): CUDA
      asked for and unusable (torch build vs driver), or GPUs that torch cannot use behind an unset device;
    - vLLM's LoRA capacity: ``generation.max_lora_rank`` below the rank of an adapter it serves
      (`served_lora_ranks`), and vLLM's environment (``generation.backend`` or
      ``evaluation.benchmark_backend``: vllm);
    - the engine's GPUs: ``generation.tensor_parallel_size`` × ``generation.vllm_data_parallel_size``
      more than the GPUs this process sees on CUDA (`check_engine_gpus`), and extra engine arguments
      alphaspin sets itself (``generation.vllm_args``);
    - the weights of every model an engine loads (``model.name_or_path``; ``evaluation.judge.model``
      for the local judge): a missing folder, a folder without weights, a hub id the hub cache lacks
      while the hub is off (`alphaspin.models.check_weights`);
    - the training launcher (``training.num_processes`` and the rest, `alphaspin.distributed.check_launch`).
    """
    from alphaspin import distributed
    from alphaspin.models import check_weights
    from alphaspin.vllm_server import VllmError, check_extra_args, find_vllm_python
    from alphaspin.workspace import resolve_device

    device = resolve_device(device or config.model.device)
    try:
        for engine, rank in served_lora_ranks(config, device).items():
            if config.generation.max_lora_rank < rank:
                raise ConfigError(
                    f"generation.max_lora_rank: {config.generation.max_lora_rank} is below training.lora.r = {rank}, "
                    f"the rank of the adapters vLLM serves ({engine}); set generation.max_lora_rank to at least {rank}"
                )
        if uses_vllm(config):
            find_vllm_python(config.generation.vllm_python)
            check_extra_args(config.generation.vllm_args)
            check_engine_gpus(config.generation, device)
        check_weights(config.model.name_or_path, "model.name_or_path")
        judge = config.evaluation.judge
        if judge.enabled and judge.base_url == "local":
            check_weights(judge.model, "evaluation.judge.model")
        if distributed.is_launched(config.training):
            distributed.check_launch(config.training, device)
    except ConfigError:
        raise
    except (VllmError, ValueError, FileNotFoundError) as error:
        raise ConfigError(str(error)) from error
    return device
