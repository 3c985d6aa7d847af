"""The geometric reference and the DPO loss on toy policies whose sequences can be enumerated.

Here's the maths. For one prompt x, take Y = {y1, y2, y3} (every sequence the toy policies can
emit) with
    π_prev = (0.5, 0.3, 0.2),   π_base = (0.2, 0.2, 0.6),   π_θ = (0.6, 0.1, 0.3),   α = 0.95, β = 0.1.
The exact reference is π_ref(y) = π_prev(y)^α π_base(y)^(1−α) / Z, Z = Σ_y π_prev^α π_base^(1−α).
We store the unnormalised α·log π_prev + (1−α)·log π_base; the DPO margin of (y_w, y_l) = (y1, y3)
is the same with either, because log Z appears in both log-ratios.
"""

import math

import pytest
import torch

from alphaspin.reference import (
    dpo_margin,
    dpo_sigmoid_loss,
    geometric_reference_logps,
    log_partition_interval,
    log_partition_jackknife,
    log_partition_monte_carlo,
    log_partition_standard_error,
)

PREV = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
BASE = torch.tensor([0.2, 0.2, 0.6], dtype=torch.float64)
POLICY = torch.tensor([0.6, 0.1, 0.3], dtype=torch.float64)
ALPHA, BETA = 0.95, 0.1


def test_stored_reference_is_alpha_mixture_of_log_probs_by_hand():
    ref = geometric_reference_logps(PREV.log(), BASE.log(), ALPHA)
    by_hand = [
        0.95 * math.log(0.5) + 0.05 * math.log(0.2),
        0.95 * math.log(0.3) + 0.05 * math.log(0.2),
        0.95 * math.log(0.2) + 0.05 * math.log(0.6),
    ]
    assert ref.tolist() == pytest.approx(by_hand, abs=1e-15)
    assert ref[0].item() == pytest.approx(-0.7389617, abs=1e-7)  # -0.6584890 - 0.0804719


def test_log_z_cancels_in_the_dpo_margin():
    unnormalised = geometric_reference_logps(PREV.log(), BASE.log(), ALPHA)
    z = torch.exp(unnormalised).sum()
    assert z.item() == pytest.approx(0.5**0.95 * 0.2**0.05 + 0.3**0.95 * 0.2**0.05 + 0.2**0.95 * 0.6**0.05)
    normalised = unnormalised - z.log()  # the exact π_ref
    assert torch.exp(normalised).sum().item() == pytest.approx(1.0, abs=1e-15)
    w, lose = 0, 2
    with_stored = dpo_margin(POLICY.log()[w], POLICY.log()[lose], unnormalised[w], unnormalised[lose], BETA)
    with_exact = dpo_margin(POLICY.log()[w], POLICY.log()[lose], normalised[w], normalised[lose], BETA)
    assert with_stored.item() == pytest.approx(with_exact.item(), abs=1e-15)
    # and by hand: β[(log .6 − ref_w) − (log .3 − ref_l)]
    ref_w = 0.95 * math.log(0.5) + 0.05 * math.log(0.2)
    ref_l = 0.95 * math.log(0.2) + 0.05 * math.log(0.6)
    margin = 0.1 * ((math.log(0.6) - ref_w) - (math.log(0.3) - ref_l))
    assert with_stored.item() == pytest.approx(margin, abs=1e-15)
    loss = dpo_sigmoid_loss(with_stored)
    assert loss.item() == pytest.approx(-math.log(1 / (1 + math.exp(-margin))), abs=1e-15)


def test_alpha_one_is_spin_and_small_alpha_tends_to_the_base():
    assert torch.equal(geometric_reference_logps(PREV.log(), BASE.log(), 1.0), PREV.log())
    near_zero = geometric_reference_logps(PREV.log(), BASE.log(), 1e-9)
    assert torch.allclose(near_zero, BASE.log(), atol=1e-8)


def test_alpha_outside_unit_interval_is_rejected():
    for alpha in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="alpha"):
            geometric_reference_logps(PREV.log(), BASE.log(), alpha)


def test_monte_carlo_log_partition_converges_to_exact_log_z():
    exact = torch.log((PREV**ALPHA * BASE ** (1 - ALPHA)).sum())
    generator = torch.Generator().manual_seed(0)
    draws = torch.multinomial(PREV, 200_000, replacement=True, generator=generator)
    estimate = log_partition_monte_carlo(PREV.log()[draws][None], BASE.log()[draws][None], ALPHA)
    assert estimate.item() == pytest.approx(exact.item(), abs=2e-3)
    # with every sequence weighted by its probability the identity is exact: Z = E_prev[(base/prev)^(1−α)]
    assert (PREV * (BASE / PREV) ** (1 - ALPHA)).sum().log().item() == pytest.approx(exact.item(), abs=1e-15)


# -- the Monte-Carlo log Z(x): its bias and its standard error (issue 11) -------------------------
# A toy where w = (π_base/π_prev)^(1−α) has a real spread: with α = 0.5 and these four sequences,
# E[w] = Z = Σ √(π_prev π_base) ≈ 0.948 and v = Var(w)/E[w]² ≈ 0.113. The estimator log Ẑ_k = log mean of k
# draws of w has E[log Ẑ_k] − log Z = −v/(2k) + (s/3 − 3v²/4)/k² + O(1/k³) (expanding log(1 + ε) with
# ε = Ẑ_k/Z − 1 to fourth order; s = E[(w/Z − 1)³]): the delta method is the 1/k term.
TOY_PREV = torch.tensor([0.40, 0.30, 0.20, 0.10], dtype=torch.float64)
TOY_BASE = torch.tensor([0.15, 0.30, 0.30, 0.25], dtype=torch.float64)
TOY_ALPHA = 0.5


def _toy_moments():
    w = (TOY_BASE / TOY_PREV) ** (1 - TOY_ALPHA)
    z = (TOY_PREV * w).sum()  # = Σ π_prev^α π_base^(1−α)
    rel = w / z - 1
    v = (TOY_PREV * rel**2).sum().item()
    s = (TOY_PREV * rel**3).sum().item()
    return z.log().item(), v, s


def _draw_log_z(k: int, batches: int, seed: int):
    """``batches`` independent estimates log Ẑ_k (and their SEs), each from k draws of π_prev."""
    generator = torch.Generator().manual_seed(seed)
    draws = torch.multinomial(TOY_PREV, batches * k, replacement=True, generator=generator).view(batches, k)
    lp_prev, lp_base = TOY_PREV.log()[draws], TOY_BASE.log()[draws]
    return (
        log_partition_monte_carlo(lp_prev, lp_base, TOY_ALPHA),
        log_partition_standard_error(lp_prev, lp_base, TOY_ALPHA),
    )


def test_toy_partition_function_is_the_sum_of_the_geometric_mixture():
    log_z, v, _ = _toy_moments()
    by_hand = math.sqrt(0.40 * 0.15) + math.sqrt(0.30 * 0.30) + math.sqrt(0.20 * 0.30) + math.sqrt(0.10 * 0.25)
    assert math.exp(log_z) == pytest.approx(by_hand, abs=1e-15)  # 0.2449 + 0.3 + 0.2449 + 0.1581
    assert v == pytest.approx(0.1127, abs=1e-4)  # a spread the bias test can see


@pytest.mark.parametrize("k", [2, 4, 8])
def test_monte_carlo_log_z_bias_is_minus_var_over_2k_mean_squared(k):
    """Mean bias over N = 400k independent batches of k draws. The tolerance is 4 Monte-Carlo standard
    errors of that mean (sd of log Ẑ_k over the batches / √N: ≈ 4e-4 at k = 2, 1.9e-4 at k = 8) plus the
    size of the next term of the expansion, |s/3 − 3v²/4|/k² (≈ 1e-3 at k = 2, 6e-5 at k = 8), which the
    delta method leaves out (the exact bias, by enumerating the multinomial, is −0.02867 at k = 2 against
    −v/4 = −0.02817). The bias itself (−0.029 at k = 2) is ~75 Monte-Carlo errors away from 0, and a wrong
    estimator (a missing − log k, the mean of log w) is off by far more than the tolerance."""
    log_z, v, s = _toy_moments()
    batches = 400_000
    estimates, _ = _draw_log_z(k, batches, seed=k)
    bias = estimates.mean().item() - log_z
    mc_error = estimates.std().item() / math.sqrt(batches)
    delta = -v / (2 * k)
    next_term = abs(s / 3 - 3 * v**2 / 4) / k**2
    assert bias < 0  # Jensen: biased low
    assert abs(bias - delta) <= 4 * mc_error + next_term, (bias, delta, mc_error, next_term)


def test_monte_carlo_log_z_bias_vanishes_as_k_grows():
    log_z, v, _ = _toy_moments()
    biases = {}
    for k in (4, 64, 1024):
        batches = 4_000_000 // k
        estimates, _ = _draw_log_z(k, batches, seed=100 + k)
        mc_error = estimates.std().item() / math.sqrt(batches)
        biases[k] = estimates.mean().item() - log_z
        assert abs(biases[k] - (-v / (2 * k))) <= 4 * mc_error + v**2 / k**2, k
    assert abs(biases[1024]) < abs(biases[64]) < abs(biases[4])
    assert abs(biases[1024]) < 5e-4


def test_standard_error_matches_the_spread_of_the_estimator_for_large_k():
    """For k = 256 the per-batch delta-method SE, sd(w)/(√k·mean(w)), averaged over 20k batches, equals
    the empirical sd of log Ẑ_k over those batches, and both equal √(v/k). The empirical sd has a relative
    Monte-Carlo error of ≈ 1/√(2N) = 0.5% (w is light-tailed here); 3% leaves room for that and the
    O(1/k) terms of the delta method."""
    _, v, _ = _toy_moments()
    k = 256
    estimates, ses = _draw_log_z(k, 20_000, seed=7)
    empirical = estimates.std().item()
    assert ses.mean().item() == pytest.approx(empirical, rel=0.03)
    assert empirical == pytest.approx(math.sqrt(v / k), rel=0.03)


def test_standard_error_by_hand_and_in_log_space():
    # k = 2, α = 0.5: log w = ½(lp_base − lp_prev) = (log 2, 0) → w = (2, 1), mean 1.5, sample sd 1/√2
    lp_prev = torch.tensor([[math.log(0.25), math.log(0.5)]], dtype=torch.float64)
    lp_base = torch.tensor([[math.log(1.0), math.log(0.5)]], dtype=torch.float64)
    se = log_partition_standard_error(lp_prev, lp_base, 0.5)
    assert se.item() == pytest.approx((1 / math.sqrt(2)) / (math.sqrt(2) * 1.5), abs=1e-15)
    # the same weights scaled by e^-2000 (log-probs of long sequences): no underflow, same SE
    far = log_partition_standard_error(lp_prev - 4000, lp_base - 8000, 0.5)
    assert far.item() == pytest.approx(se.item(), abs=1e-12)
    assert torch.isnan(log_partition_standard_error(lp_prev[:, :1], lp_base[:, :1], 0.5)).all()  # k = 1


# -- the stored spread of log Ẑ: jackknife bias, SE and interval (issue 20) ----------------------------
# A toy with heavier-tailed weights (the policies disagree more): six answers, α = 0.5. At k = 4 the
# delta-method SE understates the spread of log Ẑ there as it did on the quickstart (0.267 against 0.328).
HEAVY_PREV = torch.tensor([0.40, 0.25, 0.15, 0.10, 0.06, 0.04], dtype=torch.float64)
HEAVY_BASE = torch.tensor([0.05, 0.10, 0.15, 0.20, 0.20, 0.30], dtype=torch.float64)


def test_jackknife_bias_and_standard_error_by_hand():
    # k = 3, α = 0.5, log w = (log 4, log 1, log 1)/… : w = (4, 1, 1) → θ̂ = log 2; leave-one-out means
    # (1, 2.5, 2.5) → θ_(i) = (0, log 2.5, log 2.5), θ̄ = (2/3)·log 2.5
    lp_prev = torch.tensor([[0.0, 0.0, 0.0]], dtype=torch.float64)
    lp_base = torch.tensor([[2 * math.log(4.0), 0.0, 0.0]], dtype=torch.float64)
    bias, se = log_partition_jackknife(lp_prev, lp_base, 0.5)
    mean = 2 / 3 * math.log(2.5)
    assert bias.item() == pytest.approx(2 * (mean - math.log(2.0)), abs=1e-14)
    spread = (0 - mean) ** 2 + 2 * (math.log(2.5) - mean) ** 2
    assert se.item() == pytest.approx(math.sqrt(2 / 3 * spread), abs=1e-14)
    # far in log space (long sequences): the same numbers
    far_bias, far_se = log_partition_jackknife(lp_prev - 3000, lp_base - 3000, 0.5)
    assert (far_bias.item(), far_se.item()) == (pytest.approx(bias.item()), pytest.approx(se.item()))
    low, high = log_partition_interval(log_partition_monte_carlo(lp_prev, lp_base, 0.5), bias, se, 3)
    t_2 = 4.302652729911275  # Student's t, 2 degrees of freedom, 97.5%
    centre = math.log(2.0) - bias.item()
    assert (low.item(), high.item()) == (
        pytest.approx(centre - t_2 * se.item()),
        pytest.approx(centre + t_2 * se.item()),
    )
    assert all(torch.isnan(x).all() for x in log_partition_jackknife(lp_prev[:, :1], lp_base[:, :1], 0.5))


@pytest.mark.parametrize("toy", ["light", "heavy"])
def test_stored_spread_is_honest_at_k_4_where_log_z_is_known(toy):
    """200k batches of k = 4 draws, log Z known exactly. The jackknife SE is nearer the real spread of
    log Ẑ than the delta-method SE; the jackknife bias is the real bias to 0.01 (so the bias-corrected
    estimate is nearly unbiased); the 95% interval covers log Z in ≥ 88% of batches where θ̂ ± 1.96·SE_delta
    covers ≤ 80%. (Monte-Carlo error of a coverage: √(0.1·0.9/2e5) ≈ 7e-4.)"""
    prev, base = (TOY_PREV, TOY_BASE) if toy == "light" else (HEAVY_PREV, HEAVY_BASE)
    log_z = float(torch.log((prev * base).sqrt().sum()))  # α = 0.5
    k, batches = 4, 200_000
    generator = torch.Generator().manual_seed(11)
    draws = torch.multinomial(prev, batches * k, replacement=True, generator=generator).view(batches, k)
    lp_prev, lp_base = prev.log()[draws], base.log()[draws]
    estimate = log_partition_monte_carlo(lp_prev, lp_base, 0.5)
    delta_se = log_partition_standard_error(lp_prev, lp_base, 0.5)
    bias, se = log_partition_jackknife(lp_prev, lp_base, 0.5)
    low, high = log_partition_interval(estimate, bias, se, k)
    spread, true_bias = estimate.std().item(), estimate.mean().item() - log_z
    print(
        f"{toy}: spread {spread:.3f}, delta SE {delta_se.mean():.3f}, jackknife SE {se.mean():.3f}; "
        f"bias {true_bias:.4f}, jackknife bias {bias.mean():.4f}"
    )
    assert delta_se.mean() < se.mean() < spread  # both below, the jackknife nearer
    assert abs(bias.mean().item() - true_bias) < 0.01 and true_bias < -0.01
    assert abs((estimate - bias).mean().item() - log_z) < abs(true_bias) / 1.5
    covered = ((low <= log_z) & (log_z <= high)).double().mean().item()
    delta_covered = ((estimate - 1.96 * delta_se <= log_z) & (log_z <= estimate + 1.96 * delta_se)).double().mean()
    assert covered >= 0.88 and delta_covered.item() <= 0.80, (covered, delta_covered)
