"""builtin:synthetic, the task whose truth is known: the exact KL(p_data‖π) against hand-worked
numbers on a toy policy whose sequences can be enumerated, the generator (deterministic, a
distribution per prompt, rows that are samples of it), and a tiny run whose stored KL equals one
recomputed with plain transformers forward passes on the stored adapter."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from conftest import NO_BENCHMARKS

from alphaspin.config import DataConfig, MethodConfig
from alphaspin.data import load_sft, sample_prompts
from alphaspin.synthetic import (
    BUILTIN_SYNTHETIC,
    category_distributions,
    kl_and_support_mass,
    make_task,
    support_metrics,
    support_of,
)


# -- the math on a toy ---------------------------------------------------------------------------
# Toy policy π over sequences of tokens {a, b} ended by <eos>, the same next-token distribution at
# every step: π(a) = 0.5, π(b) = 0.3, π(<eos>) = 0.2. Every sequence's probability is a product:
#   π(a <eos>)   = 0.5 · 0.2       = 0.1
#   π(b <eos>)   = 0.3 · 0.2       = 0.06
#   π(a b <eos>) = 0.5 · 0.3 · 0.2 = 0.03
# p_data on these three answers: (0.5, 0.3, 0.2).
#   KL = 0.5·ln(0.5/0.1) + 0.3·ln(0.3/0.06) + 0.2·ln(0.2/0.03)
#      = 0.5·ln 5 + 0.3·ln 5 + 0.2·ln(20/3)
#      = 0.8047190 + 0.4828314 + 0.3794240 = 1.6669744
#   support mass = 0.1 + 0.06 + 0.03 = 0.19
def _toy_logps() -> list[float]:
    step = {"a": 0.5, "b": 0.3, "<eos>": 0.2}
    sequences = [["a", "<eos>"], ["b", "<eos>"], ["a", "b", "<eos>"]]
    return [sum(math.log(step[token]) for token in sequence) for sequence in sequences]


def test_kl_and_support_mass_equal_the_hand_computed_values():
    kl, mass = kl_and_support_mass([0.5, 0.3, 0.2], _toy_logps())
    assert kl == pytest.approx(0.5 * math.log(5) + 0.3 * math.log(5) + 0.2 * math.log(20 / 3), abs=1e-12)
    assert kl == pytest.approx(1.6669744, abs=1e-7)
    assert mass == pytest.approx(0.19, abs=1e-12)


def test_kl_is_zero_exactly_at_the_fixed_point_and_answers_outside_the_support_do_not_count():
    p = [0.6, 0.3, 0.1]
    kl, mass = kl_and_support_mass(p, np.log(p))
    assert kl == pytest.approx(0.0, abs=1e-15) and mass == pytest.approx(1.0)
    # an answer with p_data = 0 adds nothing, whatever π gives it
    assert kl_and_support_mass([0.6, 0.3, 0.1, 0.0], [*np.log(p), -0.01]) == pytest.approx((0.0, 1.0))
    # π putting half its mass elsewhere, uniformly scaled: KL = −Σ p·ln(1/2) = ln 2
    kl, mass = kl_and_support_mass(p, np.log(p) + math.log(0.5))
    assert kl == pytest.approx(math.log(2)) and mass == pytest.approx(0.5)


def test_kl_refuses_a_p_data_that_is_not_a_distribution():
    with pytest.raises(ValueError, match="distribution"):
        kl_and_support_mass([0.5, 0.4], [-1.0, -1.0])
    with pytest.raises(ValueError, match="one value per answer"):
        kl_and_support_mass([0.5, 0.5], [-1.0])


def test_support_metrics_average_over_prompts():
    # prompt x1: the toy above; prompt x2: π = p_data on two answers (KL 0, mass 1)
    table = pd.DataFrame(
        {
            "prompt": ["x1", "x1", "x1", "x2", "x2"],
            "probability": [0.5, 0.3, 0.2, 0.75, 0.25],
            "logps": [*_toy_logps(), math.log(0.75), math.log(0.25)],
        }
    )
    found = support_metrics(table)
    assert found["kl"] == pytest.approx(1.6669744 / 2, abs=1e-7)
    assert found["support_mass"] == pytest.approx((0.19 + 1.0) / 2)
    assert found["prompts"] == 2


# -- the generator ---------------------------------------------------------------------------------
def test_the_task_is_deterministic_and_every_prompt_has_a_distribution():
    first, again = make_task(), make_task()
    pd.testing.assert_frame_equal(first.rows, again.rows)
    pd.testing.assert_frame_equal(first.support, again.support)
    assert not make_task(seed=1).rows.equals(first.rows)
    assert first.rows.prompt.is_unique
    assert set(first.rows.prompt) == set(first.support.prompt)
    for prompt, group in first.support.groupby("prompt"):
        assert 2 <= len(group) <= 4 and group.answer.is_unique, prompt
        assert math.fsum(group.probability) == pytest.approx(1.0, abs=1e-12), prompt
        assert group.probability.max() >= 0.5  # skewed
    # every SFT answer is in its prompt's support
    merged = first.rows.merge(first.support, on=["prompt", "answer"], how="left")
    assert merged.probability.notna().all()


def test_rows_are_samples_of_p_data():
    task = make_task(prompts_per_category=480)
    merged = task.rows.merge(task.support[["prompt", "category"]].drop_duplicates(), on="prompt")
    for category, distribution in category_distributions().items():
        answers = merged[merged.category == category].answer
        n = len(answers)
        for answer, p in distribution.items():
            frequency = float((answers == answer).mean())
            assert abs(frequency - p) < 4 * math.sqrt(p * (1 - p) / n), (category, answer, frequency, p)


def test_builtin_source_splits_heldout_prompts_off_and_keeps_shared_answers():
    data = DataConfig(source=BUILTIN_SYNTHETIC, heldout_size=8)
    frame = load_sft(data)
    assert len(frame) == len(make_task().rows)
    method = MethodConfig(pairs_first_iteration=64, pairs_per_iteration=64)
    heldout = None
    for t in range(2):
        sampled = sample_prompts(frame, data, method, seed=3, iteration=t)
        train, held = sampled[sampled.split == "train"], sampled[sampled.split == "heldout"]
        assert set(train.prompt).isdisjoint(held.prompt) and len(train) == 64
        assert heldout is None or set(held.prompt) == heldout
        heldout = set(held.prompt)
        assert sampled.attrs["excluded_overlapping_heldout"] == 0  # answers repeat by design
    support = support_of(sorted(heldout))
    assert list(dict.fromkeys(support.prompt)) == sorted(heldout)
    with pytest.raises(ValueError, match="not prompts"):
        support_of(["What is your name?"])


# -- a tiny run ------------------------------------------------------------------------------------
def _answer_logp(model, tokenizer, prompt: str, answer: str) -> float:
    """log π(answer, then end of turn | chat-templated prompt) from full logits (not TRL's code): up to
    <|im_end|>, not the newline the template writes after it."""
    import torch

    user = [{"role": "user", "content": prompt}]
    prompt_ids = list(tokenizer.apply_chat_template(user, add_generation_prompt=True, return_dict=True)["input_ids"])
    full = list(
        tokenizer.apply_chat_template([*user, {"role": "assistant", "content": answer}], return_dict=True)["input_ids"]
    )
    assert full[: len(prompt_ids)] == prompt_ids and tokenizer.convert_ids_to_tokens(full[-2]) == "<|im_end|>"
    ids = torch.tensor([full])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), dim=-1)
    return float(sum(logp[i, full[i + 1]] for i in range(len(prompt_ids) - 1, len(full) - 2)))


def test_tiny_run_reports_the_exact_kl(make_config, tiny_model):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alphaspin.pipeline import run
    from alphaspin.runs import Run
    from alphaspin.stage_spec import Artifact, Node
    from alphaspin.workspace import Workspace

    config = make_config(
        f"data.source={BUILTIN_SYNTHETIC}",
        "method.iterations=0",
        *NO_BENCHMARKS,
    )
    (metrics,) = run(config)
    stored = Run(config)
    evaluate = stored.stored_record(Node("evaluate", 0))
    assert {"synthetic/kl", "synthetic/support_mass", "synthetic/base_kl", "synthetic/base_support_mass"} <= set(
        evaluate.metrics
    )
    assert metrics["synthetic/kl"] == evaluate.metrics["synthetic/kl"]
    heldout = stored.dir(Node("sample_prompts", 0)).read_table("prompts.parquet").query("split == 'heldout'")
    assert evaluate.metrics["synthetic/prompts"] == len(heldout) == config.data.heldout_size

    # independently: plain transformers forwards of the base and of θ_0 (the stored adapter)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    with Workspace(config) as ws:
        trained = Node("train", 0)
        adapter = ws.local_adapter(Artifact(stored.stored_record(trained), stored.dir(trained)))
        expected = {}
        for name, model in (("base_", base), ("", None)):
            if model is None:
                model = PeftModel.from_pretrained(base, adapter).eval()
            kls, masses = [], []
            for prompt in heldout.prompt:
                distribution = make_task().support.query("prompt == @prompt")
                logps = [_answer_logp(model, tokenizer, prompt, a) for a in distribution.answer]
                p = distribution.probability.to_numpy()
                kls.append(float(np.sum(p * (np.log(p) - np.array(logps)))))
                masses.append(float(np.sum(np.exp(logps))))
            expected[f"synthetic/{name}kl"] = np.mean(kls)
            expected[f"synthetic/{name}support_mass"] = np.mean(masses)
    for key, value in expected.items():
        assert evaluate.metrics[key] == pytest.approx(value, abs=1e-4), key
    assert evaluate.metrics["synthetic/kl"] != evaluate.metrics["synthetic/base_kl"]  # θ_0 moved
    table = stored.dir(Node("evaluate", 0)).read_table("synthetic_logps.parquet")
    assert set(table.prompt) == set(heldout.prompt)
