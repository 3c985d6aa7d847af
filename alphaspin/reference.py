"""The geometric-mixture reference of α-SPIN (paper §3.1) and the DPO margin against it.

Adding α·KL(π‖π_(t-1)) + (1−α)·KL(π‖π_base) to the objective is the same as using the reference

    π_ref(y|x) = π_(t-1)(y|x)^α · π_base(y|x)^(1−α) / Z(x),   Z(x) = Σ_y π_(t-1)^α π_base^(1−α).

Z(x) depends on x only. In a loss of (chosen log-ratio − rejected log-ratio) for the same prompt
(DPO's sigmoid, hinge, ...) log Z(x) appears in both log-ratios and cancels, so the stored
reference log-prob of a sequence is the unnormalised

    ref_logps = α·lp_prev + (1−α)·lp_base      (sums over completion tokens).

For losses where it does not cancel, `log_partition_monte_carlo` estimates log Z(x) from samples
of π_(t-1): Z(x) = E_{y~π_(t-1)}[(π_base(y|x)/π_(t-1)(y|x))^(1−α)].
"""

from __future__ import annotations

import math

import torch


def geometric_reference_logps(lp_prev: torch.Tensor, lp_base: torch.Tensor, alpha: float) -> torch.Tensor:
    """α·lp_prev + (1−α)·lp_base, the unnormalised log π_ref of each sequence. Shapes: (batch,)."""
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha must be in (0, 1], got {alpha}")
    if alpha == 1.0:
        return lp_prev.clone()  # exactly SPIN: no 0·lp_base rounding
    return alpha * lp_prev + (1.0 - alpha) * lp_base


def log_partition_monte_carlo(
    lp_prev_samples: torch.Tensor, lp_base_samples: torch.Tensor, alpha: float
) -> torch.Tensor:
    """Estimate log Z(x) from k samples y_i ~ π_(t-1)(·|x): log (1/k) Σ_i exp((1−α)(lp_base_i − lp_prev_i)).

    Shapes: (batch, k) → (batch,). Consistent as k → ∞ (biased low for finite k, by Jensen).
    """
    k = lp_prev_samples.shape[-1]
    return torch.logsumexp((1.0 - alpha) * (lp_base_samples - lp_prev_samples), dim=-1) - math.log(k)


def dpo_margin(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """β·[(log π(y_w|x) − log π_ref(y_w|x)) − (log π(y_l|x) − log π_ref(y_l|x))] (DPO, eq. 6)."""
    return beta * ((policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps))


def dpo_sigmoid_loss(margin: torch.Tensor) -> torch.Tensor:
    """−log σ(margin), the DPO / SPIN loss per pair."""
    return -torch.nn.functional.logsigmoid(margin)
