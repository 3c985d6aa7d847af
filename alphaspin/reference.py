"""The references of α-SPIN: the paper's geometric mixture (§3.1), the arithmetic mixture and the
parameter EMA of its future-work paragraph (§5, "Conclusion"), and the DPO margin against them.

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
of π_(t-1): Z(x) = E_{y~π_(t-1)}[(π_base(y|x)/π_(t-1)(y|x))^(1−α)] (``training.normalized_reference``);
`log_partition_jackknife` its bias (log of a mean is biased low) and standard error, and
`log_partition_interval` a confidence interval (the delta-method `log_partition_standard_error` understates
the spread at small k). Samples cut off at a length cap count with their
prefix's probabilities, which bounds the estimate's target from above: 0 ≤ Z_W − Z ≤
P_prev(cut)^α·P_base(cut)^(1−α) (`alphaspin.stages.reference_logps._log_partition`).

Cut-off losers (``generation.truncated_losers: no_eos``) are scored as their prefix p, and by the
same Hölder inequality (Σ_c a_c^α b_c^(1−α) ≤ (Σ_c a_c)^α (Σ_c b_c)^(1−α) over the completions c of p)
their reference is an upper bound of the untruncated mixture's mass on answers that start with p:

    π_(t-1)(p|x)^α · π_base(p|x)^(1−α) ≥ Σ_{y ⊒ p} π_(t-1)(y|x)^α · π_base(y|x)^(1−α),

with equality at α = 1 (and where the two policies agree on how p continues). The log of the ratio is
−log E_{c~π_(t-1)(·|x,p)}[(π_base(c|x,p)/π_(t-1)(c|x,p))^(1−α)] ≥ 0: the log-partition of p's
continuations (`prefix_reference_gap`).

The other references (``method.reference``) are normalised by construction, so no log Z is needed:
- arithmetic: π_ref = α·π_(t-1) + (1−α)·π_base (`arithmetic_reference_logps`);
- ema: π_ref = the policy whose LoRA weight delta is an exponential moving average of the iterates'
  deltas (`ema_coefficients`, `concatenate_lora`).
"""

from __future__ import annotations

import math

import torch


def geometric_reference_logps(lp_prev: torch.Tensor, lp_base: torch.Tensor, alpha: float) -> torch.Tensor:
    """α·lp_prev + (1−α)·lp_base, the unnormalised log π_ref of each sequence. Shapes: (batch,).
    Of a cut-off prefix, an upper bound of the mixture's mass on its completions (module docstring)."""
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha must be in (0, 1], got {alpha}")
    if alpha == 1.0:
        return lp_prev.clone()  # exactly SPIN: no 0·lp_base rounding
    return alpha * lp_prev + (1.0 - alpha) * lp_base


def log_partition_monte_carlo(
    lp_prev_samples: torch.Tensor, lp_base_samples: torch.Tensor, alpha: float
) -> torch.Tensor:
    """Estimate log Z(x) from k samples y_i ~ π_(t-1)(·|x): log (1/k) Σ_i exp((1−α)(lp_base_i − lp_prev_i)).

    Shapes: (batch, k) → (batch,). Consistent as k → ∞; biased low for finite k (Jensen), by
    E[log Ẑ] − log Z ≈ −Var(w)/(2k·E[w]²) to first order in 1/k (w = (π_base/π_(t-1))^(1−α)).
    """
    k = lp_prev_samples.shape[-1]
    return torch.logsumexp((1.0 - alpha) * (lp_base_samples - lp_prev_samples), dim=-1) - math.log(k)


def log_partition_standard_error(
    lp_prev_samples: torch.Tensor, lp_base_samples: torch.Tensor, alpha: float
) -> torch.Tensor:
    """Standard error of `log_partition_monte_carlo` by the delta method: with w_i = (π_base/π_(t-1))^(1−α)
    of the k samples, SE[log mean(w)] ≈ sd(w) / (√k · mean(w)).

    Computed in log space: r_i = w_i / mean(w) = exp(log w_i − log mean(w)), so sd(w)/mean(w) is the
    sample standard deviation (k − 1 in the denominator) of the r_i, which are O(1) whatever the scale
    of w. Shapes: (batch, k) → (batch,); NaN where k = 1 (no spread to measure).
    """
    k = lp_prev_samples.shape[-1]
    log_w = (1.0 - alpha) * (lp_base_samples - lp_prev_samples)
    if k < 2:
        return torch.full(log_w.shape[:-1], float("nan"), dtype=log_w.dtype)
    log_mean = torch.logsumexp(log_w, dim=-1, keepdim=True) - math.log(k)
    ratio = torch.exp(log_w - log_mean)
    return ratio.std(dim=-1, unbiased=True) / math.sqrt(k)


def prefix_reference_gap(lp_prev_continuations: torch.Tensor, lp_base_continuations: torch.Tensor, alpha: float):
    """Monte-Carlo size of the prefix bound (module docstring) of cut-off prefixes: with k continuations
    c_i ~ π_(t-1)(·|x, p) and their log-probs under both policies (as complete answers' tails), the
    estimate −log mean_i (π_base(c_i|x,p)/π_(t-1)(c_i|x,p))^(1−α) of log [π_(t-1)(p)^α π_base(p)^(1−α)] −
    log Σ_{y ⊒ p} π_(t-1)(y)^α π_base(y)^(1−α). Shapes (batch, k) → (batch,). Biased high for finite k
    (the log of a mean is biased low, `log_partition_monte_carlo`)."""
    return -log_partition_monte_carlo(lp_prev_continuations, lp_base_continuations, alpha)


def log_partition_jackknife(
    lp_prev_samples: torch.Tensor, lp_base_samples: torch.Tensor, alpha: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(bias, standard error) of `log_partition_monte_carlo` by the jackknife over the k samples.

    With θ̂ = log mean(w) of all k samples and θ_(i) = log mean(w) of the k − 1 others, θ̄ = mean_i θ_(i):
    bias ≈ (k − 1)(θ̄ − θ̂) (an estimate of E[θ̂] − log Z, negative: Jensen), SE = √((k − 1)/k · Σ_i (θ_(i) − θ̄)²).

    Why not the delta method alone: sd(w)/(√k·mean(w)) linearises log at mean(w) and uses the sample sd
    of k skewed weights, both of which understate the spread at small k. On an enumerable toy (six
    answers, α = 0.5, tests/test_reference_math.py) at k = 4: the spread of θ̂ over draws is 0.356,
    the mean delta-method SE 0.288, the mean jackknife SE 0.321; the bias is −0.067, the mean jackknife
    bias −0.059. Shapes (batch, k) → (batch,), (batch,); NaN where k < 2.
    """
    k = lp_prev_samples.shape[-1]
    log_w = (1.0 - alpha) * (lp_base_samples.double() - lp_prev_samples.double())
    if k < 2:
        nan = torch.full(log_w.shape[:-1], float("nan"), dtype=log_w.dtype)
        return nan, nan.clone()
    full = torch.logsumexp(log_w, dim=-1) - math.log(k)
    # leave-one-out log-means: log(Σ_j w_j − w_i) − log(k − 1), computed as logsumexp over the others
    others = log_w.unsqueeze(-2).expand(*log_w.shape[:-1], k, k)
    keep = ~torch.eye(k, dtype=torch.bool)
    loo = torch.logsumexp(others.masked_fill(~keep, float("-inf")), dim=-1) - math.log(k - 1)
    mean = loo.mean(dim=-1)
    bias = (k - 1) * (mean - full)
    se = ((k - 1) / k * ((loo - mean.unsqueeze(-1)) ** 2).sum(dim=-1)).sqrt()
    return bias, se


def log_partition_interval(
    estimate: torch.Tensor, bias: torch.Tensor, se: torch.Tensor, k: int, level: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """A ``level`` interval for log Z(x): the bias-corrected estimate θ̂ − bias ± t_(k−1) · SE (jackknife
    bias and SE, `log_partition_jackknife`; Student's t with k − 1 degrees of freedom for the few samples).

    Honest, not exact: on the toy of `log_partition_jackknife` the 95% interval covers the true log Z in
    89% of draws at k = 4 (the delta-method θ̂ ± 1.96·SE: 78%), 90% at k = 8 and 93% at k = 16; with
    heavier-tailed weights (policies far apart) the gap is larger. NaN where k < 2."""
    from scipy.stats import t as student

    if k < 2:
        nan = torch.full_like(estimate, float("nan"), dtype=torch.float64)
        return nan, nan.clone()
    half = float(student.ppf(0.5 + level / 2.0, k - 1)) * se
    centre = estimate - bias
    return centre - half, centre + half


def arithmetic_reference_logps(lp_prev: torch.Tensor, lp_base: torch.Tensor, alpha: float) -> torch.Tensor:
    """log(α·π_(t-1)(y|x) + (1−α)·π_base(y|x)) of each sequence, from its log-probs. Shapes: (batch,).

    The arithmetic mixture the paper names as future work in its conclusion (§5 of arXiv 2404.04291v1:
    "replacing the geometric mixture that is used as reference policy in α-SPIN with an arithmetic
    mixture ... in the loss"). It is a probability distribution for every α (a convex combination of
    two), so no log Z(x) appears and every loss may use it. Computed as logsumexp(log α + lp_prev,
    log(1−α) + lp_base); α = 1 is SPIN (lp_prev exactly), and at t = 0 (π_(−1) = π_base) it is lp_base.
    """
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha must be in (0, 1], got {alpha}")
    if alpha == 1.0:
        return lp_prev.clone()
    stacked = torch.stack([math.log(alpha) + lp_prev, math.log1p(-alpha) + lp_base])
    return torch.logsumexp(stacked, dim=0)


def ema_coefficients(decay: float, iterations: int) -> list[float]:
    """Weights c_k of θ_k (k = 0..t−1) in the EMA reference of iteration t = ``iterations``.

    θ_ema(0) = θ_base (weight delta 0: the reference of t = 0 is π_base, the paper's π_θ(−1)), and
    θ_ema(t) = decay·θ_ema(t−1) + (1−decay)·θ_(t−1), so in weight deltas
    ΔW_ema(t) = Σ_{k<t} (1−decay)·decay^(t−1−k)·ΔW_k; the remaining weight decay^t stays on the base.
    """
    if not 0.0 < decay < 1.0:
        raise ValueError(f"decay must be in (0, 1), got {decay}")
    return [(1.0 - decay) * decay ** (iterations - 1 - k) for k in range(iterations)]


def concatenate_lora(
    factors: list[tuple[torch.Tensor, torch.Tensor]], weights: list[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """One LoRA (A, B) of rank Σ r_i whose delta B·A is exactly Σ_i weights_i · B_i·A_i.

    Σ c_i B_i A_i = [c_1 B_1, ..., c_n B_n] · [A_1; ...; A_n]: A's (r_i × in) stacked by rows, B's
    (out × r_i) side by side, each scaled by its weight (fold each adapter's own LoRA scale
    lora_alpha/r into its weight). Averaging A and B separately would not do: B·A is bilinear, and
    e.g. averaging (A, B) with the base's (0, 0) at weight 1−c scales the delta by c², not c.
    """
    if len(factors) != len(weights) or not factors:
        raise ValueError("concatenate_lora: one weight per (A, B), at least one")
    a = torch.cat([A for A, _ in factors], dim=0)
    b = torch.cat([w * B for (_, B), w in zip(factors, weights, strict=True)], dim=1)
    return a, b


def compress_lora(a: torch.Tensor, b: torch.Tensor, max_rank: int) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """The best rank-``max_rank`` LoRA (A', B') of the delta B·A (truncated SVD, Eckart–Young), and
    (‖B·A − B'·A'‖_F², ‖B·A‖_F²). Exact (error 0 up to rounding) whenever rank(B·A) ≤ max_rank, e.g. when
    the concatenated adapters' deltas share directions.

    Without forming B·A (out × in): with thin QRs B = Q_b R_b and Aᵀ = Q_a R_a, B·A = Q_b (R_b R_aᵀ) Q_aᵀ,
    so the SVD of the small core R_b R_aᵀ = U S Vᵀ gives B·A = (Q_b U) S (Q_a V)ᵀ; keep the top
    ``max_rank`` singular values, split as √S on each side. A core smaller than ``max_rank`` is padded
    with zero ranks, so every module has the same rank (one LoRA config)."""
    if a.shape[0] != b.shape[1]:
        raise ValueError(f"compress_lora: A {tuple(a.shape)} and B {tuple(b.shape)} do not chain")
    qb, rb = torch.linalg.qr(b)
    qa, ra = torch.linalg.qr(a.T)
    u, s, vh = torch.linalg.svd(rb @ ra.T)
    k = min(max_rank, s.shape[0])
    root = s[:k].sqrt()
    b_new = torch.zeros(b.shape[0], max_rank, dtype=b.dtype)
    a_new = torch.zeros(max_rank, a.shape[1], dtype=a.dtype)
    b_new[:, :k] = (qb @ u[:, :k]) * root
    a_new[:k] = root[:, None] * (vh[:k] @ qa.T)
    return a_new, b_new, float((s[k:] ** 2).sum()), float((s**2).sum())


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
