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

from alphaspin.reference import dpo_margin, dpo_sigmoid_loss, geometric_reference_logps, log_partition_monte_carlo

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
