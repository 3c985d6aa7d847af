"""What each sampler of the geometric mixture targets at the length cap, under each
``generation.truncated_losers`` mode, on a toy whose answers can be enumerated.

Vocabulary {A, B, EOS}; two policies π_(t-1), π_base write up to M = 4 tokens (EOS forced after M) and
are sampled with a cap of L = 2 generated tokens, EOS included (as ``generation.max_new_tokens``): an
answer of at most one token ends, anything else is cut off after two tokens. The targets:

- G_L (no_eos): complete answers y⊤ weigh π_(t-1)(y⊤)^α·π_base(y⊤)^(1-α), cut-off prefixes p weigh
  π_(t-1)(p)^α·π_base(p)^(1-α) (the policies as generated with the cap, each outcome scored as DPO scores it);
- K_L (keep): a cut-off p weighs π_(t-1)(p⊤)^α·π_base(p⊤)^(1-α) (it is trained as the answer p⊤);
- D_L (drop): complete answers only.

SIR with the weights of `sir_log_weights_at_cap` converges to each; the GFlowNet's loss with the rewards
of `cap_log_rewards` vanishes exactly at each target's conditionals (and not at the other's); the
Monte-Carlo log Z(x)'s expectation, the GFlowNet's log Z and SIR's normaliser are one number under
no_eos. And the prefix bound of the geometric reference (Hölder), measured exactly on the toy.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from alphaspin.gflownet import cap_log_rewards, log_z_estimates, step_logprobs, subtb_loss
from alphaspin.opponent import sir_log_weights, sir_log_weights_at_cap, sir_resample_log_weights
from alphaspin.reference import geometric_reference_logps, prefix_reference_gap

A, B, EOS = 0, 1, 2
M, L, ALPHA = 4, 2, 0.5
PREFIXES = [p for n in range(M + 1) for p in itertools.product((A, B), repeat=n)]


class TablePolicy:
    """Random next-token log-probs per prefix (EOS forced after M tokens); ``eos_bias`` < 0 makes
    answers long, so that many are cut off at L."""

    def __init__(self, seed: int, eos_bias: float):
        generator = torch.Generator().manual_seed(seed)
        self.table = {}
        for prefix in PREFIXES:
            logits = 1.5 * torch.randn(3, generator=generator, dtype=torch.float64)
            logits[EOS] += eos_bias
            if len(prefix) == M:
                logits = torch.tensor([-math.inf, -math.inf, 0.0], dtype=torch.float64)
            self.table[prefix] = torch.log_softmax(logits, dim=-1)

    def logits(self, prefix: tuple[int, ...]) -> torch.Tensor:
        return self.table[prefix]

    def prefix(self, p: tuple[int, ...]) -> float:
        """log π(p): the mass of every answer that starts with p."""
        return sum(float(self.table[p[:k]][token]) for k, token in enumerate(p))

    def end(self, p: tuple[int, ...]) -> float:
        return float(self.table[p][EOS])

    def answer(self, y: tuple[int, ...]) -> float:
        """log π(y⊤)."""
        return self.prefix(y) + self.end(y)


PREV, BASE = TablePolicy(1, eos_bias=-1.0), TablePolicy(2, eos_bias=-0.5)
COMPLETE = [y for y in PREFIXES if len(y) <= L - 1]  # ended within the cap (EOS is the L-th token at most)
CUT = [p for p in PREFIXES if len(p) == L]
OUTCOMES = [(y, False) for y in COMPLETE] + [(p, True) for p in CUT]  # what capped generation returns


def as_generated(policy: TablePolicy, outcome) -> float:
    y, cut = outcome
    return policy.prefix(y) if cut else policy.answer(y)


def normalised(weights: dict) -> dict:
    total = sum(weights.values())
    return {k: v / total for k, v in weights.items()}


def target(mode: str, alpha: float = ALPHA) -> dict:
    """The exact target over OUTCOMES of ``mode`` (module docstring)."""
    weights = {}
    for outcome in OUTCOMES:
        y, cut = outcome
        if cut and mode == "drop":
            continue
        if cut and mode == "keep":  # trained as the answer p⊤
            weights[outcome] = math.exp(alpha * PREV.answer(y) + (1 - alpha) * BASE.answer(y))
        else:
            weights[outcome] = math.exp(alpha * as_generated(PREV, outcome) + (1 - alpha) * as_generated(BASE, outcome))
    return normalised(weights)


def total_variation(p: dict, q: dict) -> float:
    return 0.5 * sum(abs(p.get(k, 0.0) - q.get(k, 0.0)) for k in set(p) | set(q))


def test_the_toy_cuts_off_much():
    proposal = {o: math.exp(as_generated(PREV, o)) for o in OUTCOMES}
    assert sum(proposal.values()) == pytest.approx(1.0)  # capped generation is a distribution
    assert 0.4 < sum(proposal[(p, True)] for p in CUT) < 0.9
    assert sum(PREV.end(p) for p in CUT) / len(CUT) < -0.5  # π(⊤|p) well below 1: keep and no_eos differ


# -- SIR --------------------------------------------------------------------------------------------------
def sir_frequencies(mode: str, k: int = 64, rows: int = 40_000, old_scoring: bool = False, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    proposal = torch.tensor([math.exp(as_generated(PREV, o)) for o in OUTCOMES])
    drawn = torch.multinomial(proposal.expand(rows, -1), k, replacement=True, generator=generator)
    cut = torch.tensor([c for _, c in OUTCOMES])[drawn]
    if old_scoring:  # before: every proposal scored as an ended answer (as DPO keeps it), its proposal too
        lp_prev = torch.tensor([PREV.answer(y) for y, _ in OUTCOMES])[drawn]
        lp_base = torch.tensor([BASE.answer(y) for y, _ in OUTCOMES])[drawn]
        log_w = sir_log_weights(lp_prev, lp_base, ALPHA)
    else:
        lp_prev = torch.tensor([as_generated(PREV, o) for o in OUTCOMES])[drawn]
        lp_base = torch.tensor([as_generated(BASE, o) for o in OUTCOMES])[drawn]
        end_prev = torch.tensor([PREV.end(y) if c else 0.0 for y, c in OUTCOMES])[drawn]
        end_base = torch.tensor([BASE.end(y) if c else 0.0 for y, c in OUTCOMES])[drawn]
        log_w = sir_log_weights_at_cap(lp_prev, lp_base, cut, ALPHA, mode, end_prev, end_base)
    indices, _ = sir_resample_log_weights(log_w, generator)
    chosen = drawn.gather(1, indices[:, None]).squeeze(1)
    counts = torch.bincount(chosen, minlength=len(OUTCOMES)).double() / rows
    return {o: float(counts[i]) for i, o in enumerate(OUTCOMES) if counts[i] > 0}


@pytest.mark.parametrize("mode", ["no_eos", "keep", "drop"])
def test_sir_converges_to_the_target_of_each_mode(mode):
    frequencies = sir_frequencies(mode)
    # Monte-Carlo noise at 40k rows ≈ 0.005 in TV; SIR's O(1/k) bias at k = 64 is smaller still
    assert total_variation(frequencies, target(mode)) < 0.02, (mode, frequencies, target(mode))
    others = [m for m in ("no_eos", "keep", "drop") if m != mode]
    assert all(total_variation(target(mode), target(m)) > 0.1 for m in others)  # the targets differ


def test_sir_keep_no_longer_scores_a_cut_off_proposal_as_if_it_had_ended():
    cut_share = {
        "fixed": sum(v for (_, c), v in sir_frequencies("keep").items() if c),
        "old": sum(v for (_, c), v in sir_frequencies("keep", old_scoring=True).items() if c),
        "target": sum(v for (_, c), v in target("keep").items() if c),
    }
    assert cut_share["fixed"] == pytest.approx(cut_share["target"], abs=0.015), cut_share
    assert cut_share["old"] > cut_share["target"] + 0.1, cut_share  # the bug: cut-off losers over-drawn


def test_sir_drop_resamples_among_complete_proposals_and_loses_only_rows_without_one():
    rows, k = 20_000, 16
    frequencies = sir_frequencies("drop", k=k, rows=rows)
    lost = sum(v for (_, c), v in frequencies.items() if c)
    p_cut = sum(math.exp(PREV.prefix(p)) for p in CUT)
    assert lost == pytest.approx(p_cut**k, abs=0.01)  # only rows whose k proposals were all cut off
    assert lost < 0.2 < p_cut  # before, a cut-off loser was drawn (and its pair lost) about p_cut of the time
    # by hand: a row with complete proposals never returns a cut one, whatever their weights
    log_w = sir_log_weights_at_cap(
        torch.tensor([[0.0, -5.0, -1.0], [-2.0, -3.0, -4.0]]),
        torch.tensor([[9.0, -6.0, -1.0], [-2.0, -3.0, -4.0]]),
        torch.tensor([[True, False, True], [True, True, True]]),
        0.5,
        "drop",
    )
    assert log_w[0].tolist() == [-math.inf, -0.5, -math.inf] and torch.isfinite(log_w[1]).all()


def test_sir_weights_at_the_cap_by_hand():
    lp_prev, lp_base = torch.tensor([[-3.0, -2.0]]), torch.tensor([[-5.0, -1.0]])
    cut, end_prev, end_base = torch.tensor([[True, False]]), torch.tensor([[-4.0, 0.0]]), torch.tensor([[-2.0, 0.0]])
    no_eos = sir_log_weights_at_cap(lp_prev, lp_base, cut, 0.75, "no_eos")
    assert no_eos.tolist() == [[-0.5, 0.25]]
    keep = sir_log_weights_at_cap(lp_prev, lp_base, cut, 0.75, "keep", end_prev, end_base)
    assert keep.tolist() == [[-0.5 + 0.75 * -4.0 + 0.25 * -2.0, 0.25]]
    with pytest.raises(ValueError, match="keep"):
        sir_log_weights_at_cap(lp_prev, lp_base, cut, 0.75, "keep")


# -- GFlowNet --------------------------------------------------------------------------------------------
class ExactCapped:
    """The conditionals of a target over the capped tree: q(v|s) = F(sv)/F(s), q(⊤|s) = w(s⊤)/F(s)."""

    def __init__(self, weights: dict):
        self.weights = weights

    def flow(self, s: tuple[int, ...]) -> float:
        return sum(w for (y, _), w in self.weights.items() if y[: len(s)] == s)

    def logits(self, s: tuple[int, ...]) -> torch.Tensor:
        if len(s) == L:
            return torch.tensor([-math.inf, -math.inf, 0.0], dtype=torch.float64)
        ended = self.weights.get((s, False), 0.0)
        return torch.tensor([self.flow((*s, A)), self.flow((*s, B)), ended], dtype=torch.float64).log()


def trajectories():
    rows = [y for y, _ in OUTCOMES]
    width = max(len(r) for r in rows)
    tokens = torch.tensor([list(r) + [EOS] * (width - len(r)) for r in rows], dtype=torch.long)
    return tokens, torch.tensor([len(r) for r in rows])


def state_logits(policy, tokens, lengths) -> torch.Tensor:
    width = tokens.shape[1]
    return torch.stack(
        [
            torch.stack(
                [
                    policy.logits(tuple(row[:i])) if i <= n else torch.zeros(3, dtype=torch.float64)
                    for i in range(width + 1)
                ]
            )
            for row, n in zip(tokens.tolist(), lengths.tolist(), strict=True)
        ]
    )


def gflownet_loss(sampler, mode: str) -> tuple[float, torch.Tensor]:
    tokens, lengths = trajectories()
    prev = step_logprobs(state_logits(PREV, tokens, lengths), tokens, lengths, [EOS])
    base = step_logprobs(state_logits(BASE, tokens, lengths), tokens, lengths, [EOS])
    log_r = cap_log_rewards(*prev, *base, lengths, L, ALPHA, mode)
    pf, pterm = step_logprobs(state_logits(sampler, tokens, lengths), tokens, lengths, [EOS], forced_at=L)
    return float(subtb_loss(pf, pterm, log_r, lengths)), log_z_estimates(pf, pterm, log_r, lengths)


@pytest.mark.parametrize("mode", ["no_eos", "keep"])
def test_the_gflownet_loss_vanishes_exactly_at_the_target_of_its_mode(mode):
    exact = ExactCapped(target(mode))
    loss, estimates = gflownet_loss(exact, mode)
    assert loss == pytest.approx(0.0, abs=1e-24)
    other = "keep" if mode == "no_eos" else "no_eos"
    assert gflownet_loss(exact, other)[0] > 1e-3  # the other mode's reward is not balanced by it
    assert gflownet_loss(ExactCapped(target(other)), mode)[0] > 1e-3
    # its log Z estimates are all the log of the target's unnormalised mass
    unnormalised = {
        "no_eos": sum(math.exp(ALPHA * as_generated(PREV, o) + (1 - ALPHA) * as_generated(BASE, o)) for o in OUTCOMES),
        "keep": sum(math.exp(ALPHA * PREV.answer(y) + (1 - ALPHA) * BASE.answer(y)) for y, _ in OUTCOMES),
    }[mode]
    values = estimates[~torch.isnan(estimates)]
    assert values.tolist() == pytest.approx([math.log(unnormalised)] * len(values))


def test_under_drop_the_gflownet_trains_the_keep_target_whose_complete_answers_are_the_drop_target():
    tokens, lengths = trajectories()
    prev = step_logprobs(state_logits(PREV, tokens, lengths), tokens, lengths, [EOS])
    base = step_logprobs(state_logits(BASE, tokens, lengths), tokens, lengths, [EOS])
    assert torch.equal(
        cap_log_rewards(*prev, *base, lengths, L, ALPHA, "drop"),
        cap_log_rewards(*prev, *base, lengths, L, ALPHA, "keep"),
    )
    keep = target("keep")
    kept = normalised({o: v for o, v in keep.items() if not o[1]})  # build_pairs drops the cut-off losers
    assert total_variation(kept, target("drop")) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="truncated_losers"):
        cap_log_rewards(*prev, *base, lengths, L, ALPHA, "strip")


def test_under_no_eos_sir_the_gflownet_and_log_z_share_one_normaliser():
    """SIR's mean weight, the Monte-Carlo log Z's expectation and the GFlowNet's log Z are all Z_L."""
    proposal = {o: math.exp(as_generated(PREV, o)) for o in OUTCOMES}
    lp_prev = torch.tensor([as_generated(PREV, o) for o in OUTCOMES])
    lp_base = torch.tensor([as_generated(BASE, o) for o in OUTCOMES])
    cut = torch.tensor([c for _, c in OUTCOMES])
    weights = sir_log_weights_at_cap(lp_prev, lp_base, cut, ALPHA, "no_eos").exp()
    mean_weight = sum(proposal[o] * float(w) for o, w in zip(OUTCOMES, weights, strict=True))
    _, estimates = gflownet_loss(ExactCapped(target("no_eos")), "no_eos")
    assert math.log(mean_weight) == pytest.approx(float(estimates[0, 0]))
    untruncated = sum(math.exp(ALPHA * PREV.answer(y) + (1 - ALPHA) * BASE.answer(y)) for y in PREFIXES)
    assert mean_weight > untruncated  # Z_L ≥ Z (Hölder), the bound of the log Z docstring
    p_cut = sum(math.exp(PREV.prefix(p)) for p in CUT), sum(math.exp(BASE.prefix(p)) for p in CUT)
    assert mean_weight - untruncated <= p_cut[0] ** ALPHA * p_cut[1] ** (1 - ALPHA)


# -- the prefix bound of the geometric reference ----------------------------------------------------------
def exact_prefix_gap(p: tuple[int, ...], alpha: float) -> float:
    """log π_prev(p)^α π_base(p)^(1-α) − log Σ_{y ⊒ p} π_prev(y⊤)^α π_base(y⊤)^(1-α), by enumeration."""
    completions = [y for y in PREFIXES if y[: len(p)] == p]
    mass = sum(math.exp(alpha * PREV.answer(y) + (1 - alpha) * BASE.answer(y)) for y in completions)
    reference = float(
        geometric_reference_logps(
            torch.tensor(PREV.prefix(p), dtype=torch.float64), torch.tensor(BASE.prefix(p), dtype=torch.float64), alpha
        )
    )
    return reference - math.log(mass)


def test_the_geometric_reference_of_a_prefix_bounds_its_mass_from_above_exactly_at_alpha_one():
    gaps = {p: exact_prefix_gap(p, ALPHA) for p in CUT}
    assert all(g > 0 for g in gaps.values()) and max(gaps.values()) > 0.01, gaps
    assert all(exact_prefix_gap(p, 1.0) == pytest.approx(0.0, abs=1e-12) for p in CUT)
    # the Monte-Carlo estimate of prefix_reference_gap from continuations of π_prev converges to it
    generator = torch.Generator().manual_seed(0)
    for p, gap in gaps.items():
        tails = [y for y in PREFIXES if y[: len(p)] == p]
        lp_prev = torch.tensor([PREV.answer(y) - PREV.prefix(p) for y in tails])
        lp_base = torch.tensor([BASE.answer(y) - BASE.prefix(p) for y in tails])
        draws = torch.multinomial(lp_prev.exp(), 50_000, replacement=True, generator=generator)
        estimate = float(prefix_reference_gap(lp_prev[draws][None], lp_base[draws][None], ALPHA)[0])
        assert estimate == pytest.approx(gap, abs=0.01)
