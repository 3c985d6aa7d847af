"""Samplers of the geometric-mixture opponent π_(t-1)^α·π_base^(1-α), on toy policies whose
sequences can be enumerated: SIR converges to the exact target as k grows; the per-token mixture
samples exactly its own (token-level) distribution, which differs from the sequence-level target
unless α = 1; and the KV-cached sampler on a real model equals a plain token-by-token loop."""

from __future__ import annotations

import contextlib
import itertools
import math

import pytest
import torch
from conftest import NO_BENCHMARKS

from alphaspin.opponent import (
    TokenGeometricSampler,
    sample_sequence,
    sir_log_weights,
    sir_resample,
    token_geometric_logprobs,
)


def total_variation(p: dict, q: dict) -> float:
    return 0.5 * sum(abs(p.get(k, 0.0) - q.get(k, 0.0)) for k in set(p) | set(q))


# -- SIR ------------------------------------------------------------------------------------------
PREV = torch.tensor([0.4, 0.3, 0.2, 0.1])  # π_(t-1) over four whole sequences
BASE = torch.tensor([0.1, 0.2, 0.3, 0.4])  # π_base


def geometric_target(alpha: float) -> dict[int, float]:
    unnormalised = PREV**alpha * BASE ** (1 - alpha)
    return {i: float(v) for i, v in enumerate(unnormalised / unnormalised.sum())}


def sir_frequencies(k: int, alpha: float, rows: int = 40_000, seed: int = 0) -> dict[int, float]:
    generator = torch.Generator().manual_seed(seed)
    proposals = torch.multinomial(PREV.expand(rows, -1), k, replacement=True, generator=generator)
    indices, _ = sir_resample(PREV.log()[proposals], BASE.log()[proposals], alpha, generator)
    chosen = proposals.gather(1, indices[:, None]).squeeze(1)
    counts = torch.bincount(chosen, minlength=4).double() / rows
    return {i: float(v) for i, v in enumerate(counts)}


def test_sir_weights_by_hand():
    # (1-α)(lp_base - lp_prev) with α = 0.5: 0.5·log(0.1/0.4) = log 0.5
    assert float(sir_log_weights(PREV.log()[:1], BASE.log()[:1], 0.5)) == pytest.approx(math.log(0.5))
    _, ess = sir_resample(torch.zeros(1, 4), torch.zeros(1, 4), 0.5)  # equal weights: ESS = k
    assert float(ess) == pytest.approx(4.0)
    _, ess = sir_resample(torch.tensor([[0.0, 0.0]]), torch.tensor([[0.0, -200.0]]), 0.5)  # one dominates
    assert float(ess) == pytest.approx(1.0)


def test_sir_converges_to_the_geometric_mixture_and_its_bias_shrinks_with_k():
    target = geometric_target(0.5)
    errors = {k: total_variation(sir_frequencies(k, 0.5), target) for k in (2, 8, 64)}
    # Monte-Carlo noise of the frequencies: TV ≈ Σ sqrt(p(1-p)/rows)/2 ≈ 0.004 at 40k rows.
    assert errors[64] < 0.015, errors
    assert errors[2] > errors[8] > errors[64], errors
    assert errors[2] > 0.03  # with two proposals SIR is far from the target: the bias is real
    # α = 1: every weight is 1, SIR returns a sample of π_(t-1) itself
    assert total_variation(sir_frequencies(4, 1.0), {i: float(p) for i, p in enumerate(PREV)}) < 0.015


# -- the per-token geometric mixture ---------------------------------------------------------------
A, B, EOS = 0, 1, 2
# Two-token answers over {A, B}, then EOS: p(first), p(second | first). The policies disagree more
# after A than after B, so the local normaliser z_2 depends on the first token.
PREV_TABLE = {(): [0.5, 0.5, 0.0], (A,): [0.9, 0.1, 0.0], (B,): [0.5, 0.5, 0.0]}
BASE_TABLE = {(): [0.5, 0.5, 0.0], (A,): [0.1, 0.9, 0.0], (B,): [0.5, 0.5, 0.0]}


def _table_logits(table: dict, prefix: tuple[int, ...]) -> torch.Tensor:
    if len(prefix) == 2:
        return torch.tensor([-math.inf, -math.inf, 0.0])  # EOS after two tokens
    return torch.tensor(table[prefix]).log()


def sequence_probability(table: dict, sequence: tuple[int, ...]) -> float:
    prob = 1.0
    for position, token in enumerate(sequence):
        prob *= float(torch.softmax(_table_logits(table, sequence[:position]), -1)[token])
    return prob


SEQUENCES = [(*pair, EOS) for pair in itertools.product((A, B), repeat=2)]


def token_level_distribution(alpha: float) -> dict[tuple, float]:
    out = {}
    for sequence in SEQUENCES:
        logp = 0.0
        for position, token in enumerate(sequence):
            prefix = sequence[:position]
            mixed = token_geometric_logprobs(
                _table_logits(PREV_TABLE, prefix)[None], _table_logits(BASE_TABLE, prefix)[None], alpha
            )
            logp += float(mixed[0, token])
        out[sequence] = math.exp(logp)
    return out


def sequence_level_target(alpha: float) -> dict[tuple, float]:
    weights = {
        s: sequence_probability(PREV_TABLE, s) ** alpha * sequence_probability(BASE_TABLE, s) ** (1 - alpha)
        for s in SEQUENCES
    }
    total = sum(weights.values())
    return {s: w / total for s, w in weights.items()}


def test_token_geometric_logprobs_by_hand():
    prev, base = torch.tensor([[0.9, 0.1]]).log(), torch.tensor([[0.1, 0.9]]).log()
    mixed = token_geometric_logprobs(prev, base, 0.5).exp()  # sqrt(.09) each: 0.3/0.6 = 1/2
    assert mixed.tolist()[0] == pytest.approx([0.5, 0.5])
    assert token_geometric_logprobs(prev, base, 1.0).exp().tolist()[0] == pytest.approx([0.9, 0.1])


def test_the_per_token_sampler_samples_its_own_distribution_which_is_biased_at_the_sequence_level():
    alpha, rows = 0.5, 20_000
    generator = torch.Generator().manual_seed(1)

    def next_logprobs(prefix):
        prev, base = _table_logits(PREV_TABLE, prefix), _table_logits(BASE_TABLE, prefix)
        return token_geometric_logprobs(prev[None], base[None], alpha)[0]

    counts: dict[tuple, int] = {}
    for _ in range(rows):
        sequence, cut_off = sample_sequence(next_logprobs, EOS, 5, generator)
        assert not cut_off
        counts[sequence] = counts.get(sequence, 0) + 1
    frequencies = {s: c / rows for s, c in counts.items()}
    exact = token_level_distribution(alpha)
    assert sum(exact.values()) == pytest.approx(1.0)
    assert total_variation(frequencies, exact) < 0.015
    # The bias, exactly: after A the policies disagree (z_2 = 0.6), after B they agree (z_2 = 1),
    # so the per-token mixture gives the A-branch 1/2 where the geometric mixture gives 0.6/1.6.
    target = sequence_level_target(alpha)
    assert exact[(A, A, EOS)] + exact[(A, B, EOS)] == pytest.approx(0.5)
    assert target[(A, A, EOS)] + target[(A, B, EOS)] == pytest.approx(0.6 / 1.6)
    assert total_variation(exact, target) == pytest.approx(0.5 - 0.6 / 1.6)
    # α = 1: no mixing, no bias
    assert total_variation(token_level_distribution(1.0), sequence_level_target(1.0)) == pytest.approx(0.0, abs=1e-6)


# -- the KV-cached sampler on a real (tiny) model -----------------------------------------------------
def test_kv_cached_token_geometric_sampler_equals_a_plain_token_loop(tiny_model):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = get_peft_model(base, lora).eval()  # a non-zero adapter: π_(t-1) ≠ π_base
    prompts = [tokenizer("Hello there, how are you?")["input_ids"], tokenizer("Hi")["input_ids"]]  # left padding
    seeds, alpha, steps = [11, 12], 0.7, 6
    sampler = TokenGeometricSampler(model, tokenizer, alpha, max_new_tokens=steps, device="cpu", batch_size=2)
    eos = tokenizer.eos_token_id
    cached = sampler._batch(prompts, seeds)

    @torch.no_grad()
    def plain(prompt, seed):  # no cache, no padding: the whole sequence through the model each step
        def next_logprobs(prefix):
            ids = torch.tensor([list(prompt) + list(prefix)])
            prev = model(input_ids=ids).logits[0, -1]
            with model.disable_adapter():
                base_logits = model(input_ids=ids).logits[0, -1]
            return token_geometric_logprobs(prev[None], base_logits[None], alpha)[0]

        tokens, cut_off = sample_sequence(next_logprobs, eos, steps, torch.Generator().manual_seed(seed))
        return tokenizer.decode(list(tokens), skip_special_tokens=True).strip(), cut_off, tuple(tokens)

    # text, cut off, and the generated ids (what a no_eos cut-off loser is scored on)
    assert [(c.text, c.truncated, c.token_ids) for c in cached] == [
        plain(p, s) for p, s in zip(prompts, seeds, strict=True)
    ]
    assert cached != TokenGeometricSampler(model, tokenizer, alpha, steps, "cpu", 2)._batch(prompts, [13, 14])


@pytest.mark.slow
@pytest.mark.parametrize(
    ("opponent", "truncated_losers"), [("sir", "no_eos"), ("sir", "keep"), ("token_geometric", "no_eos")]
)
def test_a_run_with_a_geometric_mixture_opponent(make_config, opponent, truncated_losers):
    from alphaspin.pipeline import run
    from alphaspin.runs import Run
    from alphaspin.stage_spec import Node

    config = make_config(
        f"method.opponent={opponent}",
        "method.sir_proposals=3",
        f"generation.truncated_losers={truncated_losers}",
        *NO_BENCHMARKS,
    )
    results = run(config)
    assert all(math.isfinite(r["train/loss"]) for r in results)
    stored = Run(config)
    member = f"{opponent}-iter-0"
    record = stored.stored_record(Node("generate", 1, member))
    assert record.metrics["sampler"] == opponent and record.metrics["rows"] == 6 + 4  # all of t = 1's prompts
    prompts = stored.dir(Node("sample_prompts", 1)).read_table("prompts.parquet")
    assert set(prompts.opponent) == {member}
    if opponent == "sir":
        assert 1.0 <= record.metrics["sir/mean_ess"] <= 3.0
        shard = stored.dir(Node("generate", 1, member)).read_table("shards/shard-00000.parquet")
        assert shard.sir_ess.between(1.0, 3.0).all()


# -- scoring proposals as generated ------------------------------------------------------------------
def test_samples_are_scored_as_generated_answer_then_end_of_turn_or_the_cut_off_prefix(tiny_model, tmp_path):
    """`score_samples` (sir's weights, the log Z(x) samples): a complete sample is "the answer, then end of
    turn" (up to <|im_end|>, not the template's newline after it), a cut-off one its prefix; the end term
    of a cut-off prefix is log π(<|im_end|> | x, p). Checked against plain forwards, under θ and the base."""
    import pandas as pd
    from peft import LoraConfig, get_peft_model

    from alphaspin.config import TrainingConfig
    from alphaspin.dpo import dpo_config, end_of_turn_ids, end_of_turn_marker, prepare_for_logps
    from alphaspin.models import load_base_model, load_tokenizer
    from alphaspin.opponent import score_samples

    tokenizer = load_tokenizer(tiny_model)
    closing, marker = end_of_turn_ids(tokenizer), end_of_turn_marker(tokenizer)
    assert tokenizer.convert_ids_to_tokens(closing) == ["<|im_end|>", "Ċ"] and marker == closing[:1]
    torch.manual_seed(0)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = get_peft_model(prepare_for_logps(load_base_model(tiny_model)), lora).eval()
    args = dpo_config(TrainingConfig(max_length=96), str(tmp_path / "trl"), seed=0, use_cpu=True)
    samples = pd.DataFrame(
        {
            "id": ["ended", "cut"],
            "prompt": ["How are you?", "Hello there"],
            "text": ["Fine, thanks.", "Go away, I am"],
            "truncated": [False, True],
        }
    )
    scored = score_samples(model, tokenizer, args, samples, batch_size=2, device="cpu", with_end=True)
    assert scored.ids == ["ended", "cut"]

    @torch.no_grad()
    def plain(prompt: str, answer: str, cut: bool) -> tuple[float, float]:
        user = [{"role": "user", "content": prompt}]
        prompt_ids = tokenizer.apply_chat_template(user, add_generation_prompt=True, return_dict=True)["input_ids"]
        full = tokenizer.apply_chat_template([*user, {"role": "assistant", "content": answer}], return_dict=True)[
            "input_ids"
        ]
        assert full[-len(closing) :] == closing
        scored_ids = full[: -len(closing)] if cut else full[:-1]  # the prefix, or the answer + <|im_end|>
        logp = torch.log_softmax(model(input_ids=torch.tensor([full])).logits[0].double(), dim=-1)
        total = float(sum(logp[i, full[i + 1]] for i in range(len(prompt_ids) - 1, len(scored_ids) - 1)))
        end = float(logp[len(full) - len(closing) - 1, marker[0]])  # log π(<|im_end|> | x, answer)
        return total, end

    for row, (prompt, text, cut) in enumerate(zip(samples.prompt, samples.text, samples.truncated, strict=True)):
        expected = scored.tokenized[row]["rejected_ids"]
        assert (expected[-1:] == marker) != cut and expected[-1] != closing[-1]  # never the newline
        for lp, end, context in (
            (scored.lp_prev, scored.end_prev, contextlib.nullcontext),
            (scored.lp_base, scored.end_base, model.disable_adapter),
        ):
            with context():
                total, end_term = plain(prompt, text, cut)
            assert float(lp[row]) == pytest.approx(total, abs=2e-4)
            assert float(end[row]) == (pytest.approx(end_term, abs=2e-4) if cut else 0.0)
    assert float(scored.lp_prev[0]) != pytest.approx(float(scored.lp_base[0]), abs=1e-3)  # θ ≠ base


def test_token_geometric_records_and_keys_the_untempered_sampling_it_runs():
    """The per-token mixture is sampled as it is (temperature 1, top-p 1): provenance, `alphaspin diff`
    and the cache key say so, whatever generation.temperature / top_p are (they apply to plain members)."""
    from alphaspin.config import load_config
    from alphaspin.stages import REGISTRY
    from alphaspin.stages.generate import sampling_used

    warm = load_config(None, ["method.opponent=token_geometric", "generation.temperature=0.7", "generation.top_p=0.9"])
    cold = load_config(None, ["method.opponent=token_geometric", "generation.temperature=0.3", "generation.top_p=0.5"])
    for sampler in ("token_geometric", "sir"):
        member = f"{sampler}-iter-0"
        used = sampling_used(warm, member)["sampling"]
        assert (used["temperature"], used["top_p"]) == (1.0, 1.0), sampler
        reads = REGISTRY["generate"].reads
        assert "generation.temperature" not in reads(warm, 1, member) and "generation.top_p" not in reads(
            warm, 1, member
        )
        assert reads(warm, 1, member) == reads(cold, 1, member)  # one key: the same losers are sampled
    # a plain policy member (the arithmetic opponent, and t = 0's base) applies and records them
    assert sampling_used(warm, "base")["sampling"]["temperature"] == 0.7
    assert REGISTRY["generate"].reads(warm, 0, "base")["generation.temperature"] == 0.7
    assert REGISTRY["generate"].reads(warm, 0, "base") != REGISTRY["generate"].reads(cold, 0, "base")
