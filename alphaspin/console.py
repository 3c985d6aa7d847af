"""What a person reads in the terminal and in the Prefect logs: one line per iteration."""

from __future__ import annotations

from typing import Any

METRICS_SHOWN = (
    ("train/loss", "DPO loss"),
    ("train/reward_margin", "reward margin"),
    ("train/reward_accuracy", "reward acc"),
    ("heldout/reward_accuracy", "held-out reward acc"),
    ("heldout/loglik_per_token", "held-out loglik/token"),
)


def format_metrics(iteration: int, metrics: dict[str, Any]) -> str:
    parts = [f"iteration {iteration}:"]
    for key, label in METRICS_SHOWN:
        value = metrics.get(key)
        if isinstance(value, int | float):
            parts.append(f"{label} {value:.4f}")
    base = metrics.get("heldout/base_loglik_per_token")
    if isinstance(base, int | float):
        parts.append(f"(base {base:.4f})")
    return "  ".join(parts)
