"""Stage ``ema_adapter``: the reference of ``method.reference: ema`` as one LoRA adapter.

The paper's future-work paragraph (§5 of arXiv 2404.04291v1) suggests an exponential moving average
of the parameters as the reference (as in Nash-MD, Munos et al. 2023). With LoRA, θ_k = θ_base +
ΔW_k with ΔW_k = s_k·B_k·A_k per adapted layer (s_k = lora_alpha/r), and the EMA is defined on the
weight deltas:

    ΔW_ema(0) = 0 (π_base, the paper's π_θ(−1)),   ΔW_ema(t) = decay·ΔW_ema(t−1) + (1−decay)·ΔW_(t−1)
              = Σ_{k<t} (1−decay)·decay^(t−1−k)·ΔW_k.

It is stored exactly, as one LoRA of rank t·r: Σ c_k s_k B_k A_k = [c_0 s_0 B_0 ... ] · [A_0; ...]
(`alphaspin.reference.concatenate_lora`), with lora_alpha = rank (scale 1), loadable by PEFT as one
adapter. Averaging A and B separately would keep rank r but is not the EMA of the deltas (B·A is
bilinear); merging the deltas into full matrices is exact but stores full-rank weights per layer.

The rank grows by r per iteration. ``method.ema_max_rank`` caps it: where t·r exceeds the cap, each
layer's concatenated delta is replaced by its best approximation of that rank (truncated SVD,
`alphaspin.reference.compress_lora`), which is exact whenever the delta's own rank fits (the iterates'
updates sharing directions). The error is reported in the stage's metrics: ``ema/relative_error`` =
‖ΔW_ema − ΔW_stored‖_F / ‖ΔW_ema‖_F over all layers (0 when exact), ``ema/max_layer_relative_error``,
and ``ema/exact``.

The node at t reads the train stages of every earlier iteration (``history``) and recomputes the
closed form, instead of reading its own node at t−1: what an iteration reads from earlier ones stays
the train nodes (the Prefect flow and a stage run alone pass those and nothing else), and the result is
the same. The stage exists only with ``method.reference: ema`` and t ≥ 1 (``when``): other runs have no
such node, and reference_logps gets None for it.
"""

from __future__ import annotations

import json
import math
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from alphaspin.config import AlphaSpinConfig
from alphaspin.reference import compress_lora, concatenate_lora, ema_coefficients
from alphaspin.stage_spec import Artifact, Input, Job, StageSpec, pick

WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"


# Relative Frobenius error under which a compressed EMA adapter counts as exact (float64 rounding).
EXACT_TOLERANCE = 1e-9


def reads(config: AlphaSpinConfig, iteration: int, member: str | None) -> dict[str, Any]:
    fields = pick(config, "method.ema_decay")
    if config.method.ema_max_rank is not None:  # unset: the exact concatenation, keys as before the knob
        fields.update(pick(config, "method.ema_max_rank"))
    return fields


def present(config: AlphaSpinConfig, iteration: int) -> bool:
    return config.method.reference == "ema" and iteration >= 1


def lora_scale(adapter_config: dict[str, Any]) -> float:
    """PEFT's scaling of B·A: lora_alpha/r (lora_alpha/√r with rsLoRA)."""
    if adapter_config.get("rank_pattern") or adapter_config.get("alpha_pattern"):
        raise ValueError("ema_adapter: adapters with per-module rank_pattern/alpha_pattern are not supported")
    r, alpha = adapter_config["r"], adapter_config["lora_alpha"]
    return alpha / math.sqrt(r) if adapter_config.get("use_rslora") else alpha / r


def ema_lora(
    adapters: list[tuple[dict[str, torch.Tensor], dict[str, Any]]],
    weights: list[float],
    max_rank: int | None = None,
    errors: dict[str, float] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, adapter_config) of one LoRA whose delta is Σ_k weights_k · ΔW_k of ``adapters``
    [(safetensors state dict, adapter_config), ...]; computed in float64, stored in the adapters' dtype.
    With ``max_rank`` below the concatenated rank, each layer's delta is compressed to that rank
    (`compress_lora`); ``errors`` then receives the relative Frobenius errors (``relative_error`` over
    all layers, ``max_layer_relative_error``)."""
    first_tensors, first_config = adapters[0]
    modules = sorted(key[: -len(".lora_A.weight")] for key in first_tensors if key.endswith(".lora_A.weight"))
    expected = {f"{m}.lora_{side}.weight" for m in modules for side in "AB"}
    out: dict[str, torch.Tensor] = {}
    for tensors, _ in adapters:
        if set(tensors) != expected:
            raise ValueError(f"ema_adapter: adapters differ or hold more than LoRA A/B weights: {sorted(tensors)[:4]}")
    scales = [lora_scale(config) for _, config in adapters]
    rank = sum(config["r"] for _, config in adapters)
    compress = max_rank is not None and max_rank < rank
    dropped = total = worst = 0.0
    for module in modules:
        factors = [
            (tensors[f"{module}.lora_A.weight"].double(), tensors[f"{module}.lora_B.weight"].double())
            for tensors, _ in adapters
        ]
        a, b = concatenate_lora(factors, [w * s for w, s in zip(weights, scales, strict=True)])
        if compress:
            a, b, lost, whole = compress_lora(a, b, max_rank)
            dropped, total = dropped + lost, total + whole
            worst = max(worst, math.sqrt(lost / whole) if whole > 0 else 0.0)
        dtype = first_tensors[f"{module}.lora_A.weight"].dtype
        out[f"{module}.lora_A.weight"] = a.to(dtype).contiguous()
        out[f"{module}.lora_B.weight"] = b.to(dtype).contiguous()
    if compress:
        rank = max_rank
    if errors is not None:
        errors["relative_error"] = math.sqrt(dropped / total) if total > 0 else 0.0
        errors["max_layer_relative_error"] = worst
    config = {
        **first_config,
        "r": rank,
        "lora_alpha": rank,
        "use_rslora": False,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    return out, config


def ema_adapter(job: Job, trained: list[Artifact]) -> dict[str, Any]:
    ws, t, decay = job.workspace, job.iteration, job.config.method.ema_decay
    trained = sorted(trained, key=lambda a: a.iteration if a.iteration is not None else -1)
    if [a.iteration for a in trained] != list(range(t)):
        raise ValueError(f"iter-{t}/ema_adapter: expected the adapters of iterations 0..{t - 1}")
    weights = ema_coefficients(decay, t)
    adapters = []
    for artifact in trained:
        folder = ws.local_adapter(artifact)
        with open(f"{folder}/{CONFIG}") as handle:
            adapters.append((load_file(f"{folder}/{WEIGHTS}"), json.load(handle)))
    errors: dict[str, float] = {}
    tensors, config = ema_lora(adapters, weights, job.config.method.ema_max_rank, errors)
    local = ws.scratch / f"ema-adapter-{t}-{job.key[:8]}"
    local.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(local / WEIGHTS), metadata={"format": "pt"})
    (local / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    job.out.put_dir(local, "adapter")
    return {
        "rank": config["r"],
        "weights": {f"iter-{k}": w for k, w in enumerate(weights)},
        "base_weight": decay**t,
        "ema/rank": config["r"],
        "ema/concatenated_rank": sum(c["r"] for _, c in adapters),
        "ema/relative_error": errors["relative_error"],
        "ema/max_layer_relative_error": errors["max_layer_relative_error"],
        "ema/exact": errors["max_layer_relative_error"] <= EXACT_TOLERANCE,
    }


SPEC = StageSpec(
    name="ema_adapter",
    function=ema_adapter,
    inputs=(Input("trained", "train", at="history"),),
    reads=reads,
    version=2,  # 2: method.ema_max_rank (SVD compression) and its error metrics
    gpu=False,
    enabled=present,
    description="The EMA of the iterates' LoRA deltas (method.reference: ema), as one LoRA (exact, or rank-capped).",
)
