"""Held-out rows: their opponents are a seeded shuffle (not file-order blocks, which confound the
opponent with the source's topic order), and no held-out text (prompt or answer) is in the training
pool (chatterbot repeats turns: the answer of one row is the prompt of the next)."""

from __future__ import annotations

import pandas as pd
import pytest

from alphaspin.config import DataConfig, MethodConfig
from alphaspin.data import heldout_permutation, load_sft, row_id, sample_prompts, split_heldout
from alphaspin.mixture import assign_members, opponent_members


def _frame(prompts: list[str], answers: list[str]) -> pd.DataFrame:
    frame = pd.DataFrame({"prompt": prompts, "answer": answers})
    frame.insert(0, "id", [row_id(p, a) for p, a in zip(prompts, answers, strict=True)])
    return frame


def _topic_sorted(n_topics: int = 4, per_topic: int = 12) -> pd.DataFrame:
    """A source in topic order, with no text shared between rows."""
    rows = [(f"{topic}-q{i}", f"{topic}-a{i}") for topic in "ABCDEFGH"[:n_topics] for i in range(per_topic)]
    return _frame([p for p, _ in rows], [a for _, a in rows])


def _heldout_in_file_order(frame: pd.DataFrame, sampled: pd.DataFrame) -> list[str]:
    position = {row_id: i for i, row_id in enumerate(frame["id"])}
    heldout = sampled[sampled.split == "heldout"]
    return [o for _, o in sorted(zip(heldout["id"].map(position), heldout["opponent"], strict=True))]


def _is_contiguous_blocks(names: list[str]) -> bool:
    changes = sum(a != b for a, b in zip(names, names[1:], strict=False))
    return changes <= len(set(names)) - 1


def test_heldout_opponents_are_not_file_order_blocks():
    frame = _topic_sorted()
    data, method = DataConfig(heldout_size=8), MethodConfig(history=2, pairs_per_iteration=8)
    # t = 1, h = 2: base and iter-0 answer half each. A seeded shuffle is a block split only by chance
    # (2 of 70 orders); file-order assignment is one for every seed.
    blocks = [
        _is_contiguous_blocks(_heldout_in_file_order(frame, sample_prompts(frame, data, method, seed, 1)))
        for seed in range(6)
    ]
    assert not all(blocks)


@pytest.mark.parametrize(("seed", "iteration"), [(0, 1), (3, 2), (42, 1)])
def test_heldout_opponents_follow_the_seeded_permutation(seed, iteration):
    frame = _topic_sorted()
    data, method = DataConfig(heldout_size=8), MethodConfig(history=2, pairs_per_iteration=8)
    sampled = sample_prompts(frame, data, method, seed, iteration)
    _, heldout = split_heldout(frame, data.heldout_size, seed)
    order = heldout_permutation(len(heldout), seed, iteration)
    expected = dict(
        zip(heldout["id"].iloc[order], assign_members(len(heldout), opponent_members(iteration, 2)), strict=True)
    )
    got = sampled[sampled.split == "heldout"]
    assert dict(zip(got["id"], got["opponent"], strict=True)) == expected
    # the same (seed, iteration) gives the same assignment
    again = sample_prompts(frame, data, method, seed, iteration)
    assert again[again.split == "heldout"]["opponent"].tolist() == got["opponent"].tolist()


def _chained() -> pd.DataFrame:
    """Like chatterbot: rows are consecutive turns (t_i, t_(i+1)), and a common answer repeats."""
    turns = [f"turn {i}" for i in range(41)]
    prompts, answers = turns[:-1], turns[1:]
    prompts += [f"question {i}" for i in range(20)]
    answers += ["Yes." if i % 2 else "turn 7" for i in range(20)]
    prompts += ["say yes"]
    answers += ["Yes."]
    return _frame(prompts, answers)


@pytest.mark.parametrize("seed", [0, 1, 5])
def test_no_heldout_text_in_any_train_split(seed):
    frame = _chained()
    data = DataConfig(heldout_size=8)
    pool, heldout = split_heldout(frame, data.heldout_size, seed)
    texts = set(heldout["prompt"]) | set(heldout["answer"])
    assert not (set(pool["prompt"]) | set(pool["answer"])) & texts
    removed = len(frame) - data.heldout_size - len(pool)
    assert removed > 0
    method = MethodConfig(history=2, pairs_first_iteration=len(pool), pairs_per_iteration=len(pool))
    for t in range(3):
        sampled = sample_prompts(frame, data, method, seed, t)
        train = sampled[sampled.split == "train"]
        assert not (set(train["prompt"]) | set(train["answer"])) & texts, t
        assert sorted(sampled[sampled.split == "heldout"]["id"]) == sorted(heldout["id"])
        assert sampled.attrs["excluded_overlapping_heldout"] == removed


def test_too_few_rows_after_exclusion_says_why():
    frame = _chained()
    pool, _ = split_heldout(frame, 8, 0)
    method = MethodConfig(pairs_first_iteration=len(pool) + 1)
    with pytest.raises(ValueError, match="share a prompt or answer with the held-out rows"):
        sample_prompts(frame, DataConfig(heldout_size=8), method, 0, 0)


@pytest.mark.parametrize("seed", [0, 42])
def test_chatterbot_heldout_text_is_not_in_the_pool(seed):
    pytest.importorskip("chatterbot_corpus")
    data = DataConfig(source="builtin:chatterbot", heldout_size=8)
    frame = load_sft(data)
    pool, heldout = split_heldout(frame, data.heldout_size, seed)
    texts = set(heldout["prompt"]) | set(heldout["answer"])
    assert not (set(pool["prompt"]) | set(pool["answer"])) & texts
    assert len(heldout) == 8
