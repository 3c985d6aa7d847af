"""The opponent of α-SPIN: who writes the losers y_l at iteration t (Algorithm 2, §3.2, §4.1).

h < ∞:  y_l ~ (1/h) Σ_{τ=t-h}^{t-1} π_θτ, with the convention π_θk = π_base for k < 0.
h = ∞:  y_l ~ (1/t) Σ_{τ=0}^{t-1} π_θτ for t ≥ 1, and π_base at t = 0 (fictitious play).

Sampling from an arithmetic mixture = splitting the iteration's prompts into shares, one per
member, proportional to its weight, and sampling each share from that member (paper §4.1). With
the base convention, several slots of the history can all be the base: those merge into one
member whose weight is their count / h.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Literal

BASE = "base"


def member_name(iteration: int) -> str:
    """Name of π_θk: 'base' for k < 0, else 'iter-k' (the adapter trained at iteration k)."""
    return BASE if iteration < 0 else f"iter-{iteration}"


def member_iteration(name: str) -> int | None:
    """Inverse of `member_name`: the iteration whose adapter a member uses, None for the base
    (``iter-k`` and a geometric-mixture sampler's ``<sampler>-iter-k`` both use θ_k)."""
    return None if name == BASE else int(name.rsplit("iter-", 1)[1])


def member_sampler(name: str) -> str | None:
    """The geometric-mixture sampler of a member (``sir-iter-0`` → ``sir``), None for a plain policy."""
    prefix, _, _ = name.rpartition("-iter-")
    return prefix or None


@dataclass(frozen=True)
class Member:
    name: str  # "base" or "iter-k"
    weight: Fraction  # mixture weight; the weights of a mixture sum to 1


def opponent_members(iteration: int, history: int | Literal["inf"], opponent: str = "arithmetic") -> list[Member]:
    """The members of the opponent mixture at ``iteration`` with their exact weights.

    Ordered base first, then by iteration, so shares are assigned deterministically. With a sampler
    of the geometric mixture itself (``opponent`` sir, token_geometric, gflownet: the opponent is
    π_(t-1)^α·π_base^(1-α), paper §3 and Appendix A), there is one member, ``<opponent>-iter-(t-1)``,
    at t ≥ 1 (the history h plays no part), and the base at t = 0, where the mixture is π_base.
    """
    if iteration < 0:
        raise ValueError(f"iteration must be ≥ 0, got {iteration}")
    if opponent != "arithmetic":
        name = BASE if iteration == 0 else f"{opponent}-iter-{iteration - 1}"
        return [Member(name, Fraction(1))]
    if history == "inf":
        slots = [-1] if iteration == 0 else list(range(iteration))
    else:
        if history < 1:
            raise ValueError(f"history must be ≥ 1 or 'inf', got {history}")
        slots = list(range(iteration - history, iteration))
    counts: dict[str, int] = {}
    for slot in slots:
        name = member_name(slot)
        counts[name] = counts.get(name, 0) + 1
    total = len(slots)
    ordered = sorted(counts, key=lambda n: -1 if n == BASE else member_iteration(n))
    return [Member(name, Fraction(counts[name], total)) for name in ordered]


def allocate_shares(n: int, members: list[Member]) -> dict[str, int]:
    """Split ``n`` prompts among members in proportion to their weights (largest remainder).

    Exact when n·weight is an integer; otherwise the leftover prompts go to the members with the
    largest remainders, ties broken by the order of ``members`` (most recent last → base first).
    """
    if n < 0:
        raise ValueError(f"n must be ≥ 0, got {n}")
    if sum(m.weight for m in members) != 1:
        raise ValueError("member weights must sum to 1")
    exact = {m.name: m.weight * n for m in members}
    shares = {name: int(value) for name, value in exact.items()}  # floor, values are ≥ 0
    leftover = n - sum(shares.values())
    by_remainder = sorted(members, key=lambda m: -(exact[m.name] - shares[m.name]))
    for member in by_remainder[:leftover]:
        shares[member.name] += 1
    return shares


def assign_members(n: int, members: list[Member]) -> list[str]:
    """The member that writes the loser of each of the ``n`` prompts, in prompt order.

    Prompts are already in a seeded random order, so contiguous blocks are random shares.
    """
    shares = allocate_shares(n, members)
    return [m.name for m in members for _ in range(shares[m.name])]
