"""GPU memory handed over from torch to a vLLM engine in the same process.

vLLM's GPU engine takes ``generation.gpu_memory_utilization`` of the *whole* card and refuses to start
when less than that is free. A stage that has used torch on the GPU (evaluate scores held-out pairs with
the policy, then starts an engine for the judged chat or lm-eval's vllm model) must hand the memory over
first: move its model off the GPU (`offload`), collect it, and return torch's cached blocks to the driver
(`release_torch_memory`); what is still held (another process, a model the caller keeps) is then measured
(``torch.cuda.mem_get_info``) and the engine sized to what is actually free (`engine_memory_share`).
The memory each stage needs for the paper recipe is computed in docs/gpu.md.
"""

from __future__ import annotations

import gc
import logging
from typing import Any

import torch

logger = logging.getLogger(__name__)

# Left free beside the engine when it is sized from the free memory: the CUDA context of this process
# and allocator slack (vLLM's own profiling run needs a little room above its share).
HEADROOM = 0.02


def offload(model: Any) -> Any:
    """Move ``model``'s weights off the GPU (to the CPU) and release torch's cache; returns the model,
    which the caller may move back (``model.to(device)``) once the engine is stopped."""
    if model is not None and _on_cuda(model):
        model.to("cpu")
    release_torch_memory()
    return model


def _on_cuda(model: Any) -> bool:
    try:
        return any(p.is_cuda for p in model.parameters())
    except (AttributeError, TypeError):
        return False


def release_torch_memory() -> None:
    """Collect unreachable tensors (a dropped model) and give torch's cached GPU blocks back to the
    driver, so that another process (the engine) can have them."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def engine_memory_share(configured: float, device: int | None = None) -> float:
    """The GPU memory share to start the engine with: ``configured`` (generation.gpu_memory_utilization)
    when that much of the card is free, else the free share less `HEADROOM`, with a warning that names
    the knob (vLLM would refuse ``configured``). Without CUDA, ``configured``. ``device``: the torch index
    of the engine's first GPU (`alphaspin.devices`; default: the current one)."""
    if not torch.cuda.is_available():
        return configured
    free, total = torch.cuda.mem_get_info(device)
    free_share = free / total
    if free_share >= configured:
        return configured
    share = round(max(free_share - HEADROOM, 0.01), 3)
    logger.warning(
        "generation.gpu_memory_utilization: %.2f of the GPU asked, %.2f free (%.1f of %.1f GiB; another process "
        "or a model of this one holds the rest): starting the engine with %.3f",
        configured,
        free_share,
        free / 2**30,
        total / 2**30,
        share,
    )
    return share
