"""The geometric-mixture reference of α-SPIN (paper §3.1) and the DPO margin against it.

Adding α·KL(π‖π_(t-1)) + (1−α)·KL(π‖π_base) to the objective is the same as using the reference

    π_ref(y|x) = π_(t-1)(y|x)^α · π_base(y|x)^(1−α) / Z(x),   Z(x) = Σ_y π_(t-1)^α π_base^(1−α).

Z(x) depends on x only. In a loss of (chosen log-ratio − rejected log-ratio) for the same prompt
log Z(x) appears in both log-ratios and cancels, so the stored reference log-prob of a sequence is
the unnormalised

    ref_logps = α·lp_prev + (1−α)·lp_base      (sums over completion tokens).

With h = log π_θ(y|x) − log π_ref(y|x) (summed over the answer's tokens), the losses of
``training.loss_type`` and whether log Z(x) cancels:

- sigmoid (DPO/SPIN, paper eq. 6): −log σ(β(h_w − h_l)) — cancels.
- ipo_pairwise (IPO, paper §2.3, τ = β): ((h_w − h_l) − 1/(2β))² — cancels (`ipo_pairwise_loss`).
  TRL's ``ipo`` divides each h by its answer's length first, so log Z(x)/|y_w| − log Z(x)/|y_l|
  stays: it needs the normalised reference.
- hinge (TRL; SLiC's calibration loss on reference log-ratios): max(0, 1 − β(h_w − h_l)) — cancels.
- slic (SLiC, paper §2.3): max(0, δ − log π_θ(y_w|x) + log π_θ(y_l|x)) − λ·log π_θ(y_w|x) — uses no
  reference at all (`slic_loss`), so neither log Z(x) nor α enters the loss.
- sppo_hard (TRL; SPPO eq. 4.7 with P(y_w ≻ π_t) = 1, P(y_l ≻ π_t) = 0, η = 1/β):
  (h_w − 1/(2β))² + (h_l + 1/(2β))² — each h on its own: log Z(x) does NOT cancel.

For losses where it does not cancel, `log_partition_monte_carlo` estimates log Z(x) from samples
of π_(t-1): Z(x) = E_{y~π_(t-1)}[(π_base(y|x)/π_(t-1)(y|x))^(1−α)] (``training.normalized_reference``).
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


def ipo_pairwise_loss(chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, beta: float) -> torch.Tensor:
    """The paper's IPO per pair (§2.3, Azar et al. with τ = β): ((h_w − h_l) − 1/(2β))², where
    h = log π_θ(y|x) − log π_ref(y|x) is summed over the answer's tokens (not averaged: log Z cancels)."""
    return ((chosen_logratios - rejected_logratios) - 1.0 / (2.0 * beta)) ** 2


def slic_loss(
    policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor, delta: float, lam: float = 0.0
) -> torch.Tensor:
    """The paper's SLiC per pair (§2.3, Zhao et al. 2023), with the SFT answer y_w as y_ref (SPIN):
    max(0, δ − log π_θ(y_w|x) + log π_θ(y_l|x)) − λ·log π_θ(y_w|x). No reference policy enters it."""
    calibration = torch.relu(delta - (policy_chosen_logps - policy_rejected_logps))
    return calibration - lam * policy_chosen_logps if lam else calibration
