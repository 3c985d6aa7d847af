"""Held-out evaluation of θ_t, plus the configured benchmarks."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import torch

from alphaspin.context import Context
from alphaspin.reference import dpo_margin
from alphaspin.storage import StageDir

logger = logging.getLogger(__name__)


def heldout_metrics(policy: pd.DataFrame, heldout: pd.DataFrame, beta: float) -> dict[str, float]:
    """Mean log-likelihood per token of the held-out answers y_w (token-weighted), and the DPO
    reward accuracy/margin of θ_t on held-out pairs: margin = β[(lp_w − ref_w) − (lp_l − ref_l)]."""
    merged = heldout.merge(policy, on="id", suffixes=("", "_policy"))
    margin = dpo_margin(torch.tensor(merged.chosen_logps.values), torch.tensor(merged.rejected_logps.values),
                        torch.tensor(merged.ref_chosen_logps.values), torch.tensor(merged.ref_rejected_logps.values),
                        beta).numpy()  # fmt: skip
    return {
        "heldout/loglik_per_token": float(merged.chosen_logps.sum() / max(1, merged.chosen_tokens_policy.sum())),
        "heldout/reward_accuracy": float(np.mean(margin > 0)) if len(margin) else float("nan"),
        "heldout/reward_margin": float(np.mean(margin)) if len(margin) else float("nan"),
        "heldout/pairs": int(len(merged)),
    }


def evaluate_policy(ctx: Context, t: int, model, heldout: pd.DataFrame, stage: StageDir) -> dict:
    from alphaspin.dpo import completion_logps, dpo_config, pairs_to_dataset, tokenize_like_trl

    config = ctx.config
    metrics: dict = {}
    if len(heldout) and (config.evaluation.heldout_likelihood or config.evaluation.heldout_pairs):
        args = dpo_config(config.training, str(ctx.workdir / "trl"), config.run.seed, use_cpu=ctx.device == "cpu")
        tokenized = tokenize_like_trl(pairs_to_dataset(heldout), ctx.tokenizer, args)
        policy = completion_logps(model, tokenized, ctx.tokenizer.pad_token_id, config.training.max_length,
                                  config.evaluation.batch_size, ctx.device)  # fmt: skip
        found = heldout_metrics(policy, heldout, config.training.beta)
        if not config.evaluation.heldout_pairs:
            found = {k: v for k, v in found.items() if "reward" not in k}
        if not config.evaluation.heldout_likelihood:
            found.pop("heldout/loglik_per_token")
        metrics.update(found)
        stage.write_table("heldout_logps.parquet", policy)
    return metrics
