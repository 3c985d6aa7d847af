"""Opponent membership and shares against Algorithm 2 of the paper, written out by hand."""

from fractions import Fraction as F

import pytest

from alphaspin.mixture import allocate_shares, assign_members, opponent_members

# (h, t) -> {member: weight}. h < ∞: uniform over π_θ(t-h)..π_θ(t-1) with π_θk = π_base for k < 0.
# h = ∞: uniform over π_θ0..π_θ(t-1) for t ≥ 1, π_base at t = 0.
EXPECTED = {
    (1, 0): {"base": F(1)},
    (1, 1): {"iter-0": F(1)},
    (1, 2): {"iter-1": F(1)},
    (1, 3): {"iter-2": F(1)},
    (1, 4): {"iter-3": F(1)},
    (2, 0): {"base": F(1)},  # slots -2, -1: both the base
    (2, 1): {"base": F(1, 2), "iter-0": F(1, 2)},
    (2, 2): {"iter-0": F(1, 2), "iter-1": F(1, 2)},
    (2, 3): {"iter-1": F(1, 2), "iter-2": F(1, 2)},
    (2, 4): {"iter-2": F(1, 2), "iter-3": F(1, 2)},
    (3, 0): {"base": F(1)},
    (3, 1): {"base": F(2, 3), "iter-0": F(1, 3)},
    (3, 2): {"base": F(1, 3), "iter-0": F(1, 3), "iter-1": F(1, 3)},
    (3, 3): {"iter-0": F(1, 3), "iter-1": F(1, 3), "iter-2": F(1, 3)},
    (3, 4): {"iter-1": F(1, 3), "iter-2": F(1, 3), "iter-3": F(1, 3)},
    ("inf", 0): {"base": F(1)},
    ("inf", 1): {"iter-0": F(1)},
    ("inf", 2): {"iter-0": F(1, 2), "iter-1": F(1, 2)},
    ("inf", 3): {"iter-0": F(1, 3), "iter-1": F(1, 3), "iter-2": F(1, 3)},
    ("inf", 4): {"iter-0": F(1, 4), "iter-1": F(1, 4), "iter-2": F(1, 4), "iter-3": F(1, 4)},
}


@pytest.mark.parametrize(("history", "t"), sorted(EXPECTED, key=str))
def test_members_match_algorithm_2(history, t):
    members = opponent_members(t, history)
    assert {m.name: m.weight for m in members} == EXPECTED[(history, t)]
    assert sum(m.weight for m in members) == 1


def test_paper_example_fictitious_play_iteration_3_contributes_a_third_each():
    # Paper §4.1: "in the fictitious play configuration, at iteration 3, we end up with 100k
    # triplets where every previous iteration contributes with 33%".
    shares = allocate_shares(100_000, opponent_members(3, "inf"))
    assert shares == {"iter-0": 33_334, "iter-1": 33_333, "iter-2": 33_333}


def test_shares_are_exact_when_divisible_and_sum_to_n():
    assert allocate_shares(12, opponent_members(2, 2)) == {"iter-0": 6, "iter-1": 6}
    assert allocate_shares(12, opponent_members(1, 3)) == {"base": 8, "iter-0": 4}
    for n in range(0, 17):
        for history in (1, 2, 3, "inf"):
            for t in range(5):
                assert sum(allocate_shares(n, opponent_members(t, history)).values()) == n


def test_assign_members_is_contiguous_blocks_in_member_order():
    assert assign_members(5, opponent_members(1, 2)) == ["base", "base", "base", "iter-0", "iter-0"]


def test_invalid_history_and_iteration():
    with pytest.raises(ValueError, match="history"):
        opponent_members(1, 0)
    with pytest.raises(ValueError, match="iteration"):
        opponent_members(-1, 2)
