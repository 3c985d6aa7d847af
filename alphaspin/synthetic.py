"""A task whose truth is known: ``data.source: builtin:synthetic``.

Every prompt x ("Pick a fruit for Alice Brown. Answer with one word.") belongs to a category, and
its answers have known probabilities p_data(y|x) that depend on the category only: 2–4 one-word
answers with skewed probabilities (0.75/0.25, 0.6/0.3/0.1 or 0.5/0.25/0.15/0.1). The SFT row of a
prompt is one sample y_w ~ p_data(·|x), so across the prompts of a category the answers' frequencies
follow p_data, and a model can learn the category's distribution and carry it to held-out prompts.

SPIN's theory (paper §2, Chen et al. 2024, Theorem 5.2) says the self-play fixed point is
π = p_data. On this task it can be measured exactly, with no sampling: every evaluate stage computes

    KL(p_data‖π_t)(x) = Σ_y p_data(y|x)·[log p_data(y|x) − log π_t(y|x)]
    mass_t(x)         = Σ_y π_t(y|x)                      (y over the support of p_data(·|x))

on the held-out prompts (`kl_and_support_mass`, `support_metrics`), with log π_t(y|x) the summed
log-prob of "the answer, then end of turn": the chat-templated answer up to and including the
template's end-of-turn marker (``<|im_end|>``, the token a sampler stops at), but not the newline
the template writes after it, which is no choice of the policy (`alphaspin.dpo.end_answers_at_marker`;
TRL's tokenization and `alphaspin.dpo.completion_logps` otherwise).

The task is generated from the fixed seed ``TASK_SEED``, not ``run.seed``: runs that differ in
``run.seed`` (the seeds of a grid) learn the same truth and differ only in their held-out split,
prompt sampling and generation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import pandas as pd

BUILTIN_SYNTHETIC = "builtin:synthetic"
TASK_SEED = 0
PROMPTS_PER_CATEGORY = 40

# Candidate answers per category; the seed picks 2–4 of them and who gets which probability.
# Capitalised: SmolLM2-135M-Instruct puts 2.7x more mass on them than on lower-case (0.45% vs 0.17%).
CATEGORIES: dict[str, tuple[str, ...]] = {
    "fruit": ("Apple", "Banana", "Cherry", "Grape"),
    "color": ("Red", "Blue", "Green", "Yellow"),
    "animal": ("Cat", "Dog", "Horse", "Owl"),
    "drink": ("Tea", "Coffee", "Juice", "Water"),
    "city": ("Paris", "Rome", "Tokyo", "Lima"),
    "metal": ("Gold", "Silver", "Iron", "Copper"),
    "tree": ("Oak", "Pine", "Maple", "Birch"),
    "season": ("Spring", "Summer", "Autumn", "Winter"),
    "sport": ("Tennis", "Soccer", "Golf", "Chess"),
    "instrument": ("Piano", "Violin", "Drum", "Flute"),
    "planet": ("Mars", "Venus", "Jupiter", "Saturn"),
    "flower": ("Rose", "Tulip", "Daisy", "Lily"),
}
# Skewed probabilities by support size (exact decimals; math.fsum of each is 1.0).
PROBABILITIES: dict[int, tuple[float, ...]] = {
    2: (0.75, 0.25),
    3: (0.6, 0.3, 0.1),
    4: (0.5, 0.25, 0.15, 0.1),
}
FIRST_NAMES = (
    "Alice", "Bruno", "Chloe", "Daniel", "Emma", "Felix", "Grace", "Hugo", "Iris", "Jonas", "Kara", "Liam",
    "Maya", "Noah", "Olga", "Pablo", "Quinn", "Rosa", "Samir", "Tara", "Umar", "Vera", "Wes", "Yara",
)  # fmt: skip
LAST_NAMES = (
    "Brown", "Chen", "Diaz", "Evans", "Fischer", "Garcia", "Hall", "Ito", "Jones", "Khan",
    "Lopez", "Moreau", "Novak", "Okafor", "Patel", "Rossi", "Silva", "Tanaka", "Weber", "Young",
)  # fmt: skip


@dataclass(frozen=True)
class SyntheticTask:
    """``support``: one row per (prompt, answer) with p_data(answer|prompt) (columns prompt, category,
    answer, probability); ``rows``: the SFT rows, one sampled answer per prompt (prompt, answer)."""

    support: pd.DataFrame
    rows: pd.DataFrame


def category_distributions(seed: int = TASK_SEED) -> dict[str, dict[str, float]]:
    """p_data(·|category): for each category, 2–4 of its candidates with skewed probabilities."""
    rng = np.random.default_rng([seed, 0x5EED])
    out = {}
    for category, candidates in CATEGORIES.items():
        k = int(rng.integers(2, 5))
        chosen = [candidates[i] for i in rng.permutation(len(candidates))[:k]]
        out[category] = dict(zip(chosen, PROBABILITIES[k], strict=True))
    return out


def prompt_text(category: str, name: str) -> str:
    article = "an" if category[0] in "aeiou" else "a"
    return f"Pick {article} {category} for {name}. Answer with one word."


def make_task(seed: int = TASK_SEED, prompts_per_category: int = PROMPTS_PER_CATEGORY) -> SyntheticTask:
    """The task: ``prompts_per_category`` prompts per category (distinct names), each with its
    category's support, and one SFT answer sampled per prompt; rows in a seeded order."""
    names = [f"{first} {last}" for first in FIRST_NAMES for last in LAST_NAMES]
    if not 0 < prompts_per_category <= len(names):
        raise ValueError(f"prompts_per_category must be in 1..{len(names)}, got {prompts_per_category}")
    rng = np.random.default_rng([seed, 0xDA7A])
    support, rows = [], []
    for category, distribution in category_distributions(seed).items():
        answers, probabilities = list(distribution), np.array(list(distribution.values()))
        picked = rng.permutation(len(names))[:prompts_per_category]
        samples = rng.choice(len(answers), size=prompts_per_category, p=probabilities / probabilities.sum())
        for index, sample in zip(picked, samples, strict=True):
            prompt = prompt_text(category, names[index])
            support.extend(
                {"prompt": prompt, "category": category, "answer": a, "probability": p} for a, p in distribution.items()
            )
            rows.append({"prompt": prompt, "answer": answers[sample]})
    order = rng.permutation(len(rows))
    return SyntheticTask(pd.DataFrame(support), pd.DataFrame(rows).iloc[order].reset_index(drop=True))


@lru_cache(maxsize=1)
def default_task() -> SyntheticTask:
    """The task of ``data.source: builtin:synthetic``."""
    return make_task()


def support_of(prompts: Sequence[str], task: SyntheticTask | None = None) -> pd.DataFrame:
    """The support rows (prompt, category, answer, probability) of ``prompts``, in their order."""
    support = (task or default_task()).support
    known = set(support["prompt"])
    missing = [p for p in prompts if p not in known]
    if missing:
        raise ValueError(f"not prompts of the {BUILTIN_SYNTHETIC} task: {missing[:3]}")
    order = {p: i for i, p in enumerate(dict.fromkeys(prompts))}
    picked = support[support["prompt"].isin(order)]
    return picked.sort_values("prompt", key=lambda s: s.map(order), kind="stable").reset_index(drop=True)


def kl_and_support_mass(p_data: Sequence[float], logps: Sequence[float]) -> tuple[float, float]:
    """(KL(p_data‖π), Σ_y π(y)) over one prompt's support: Σ_y p(y)·[log p(y) − log π(y)] and
    Σ_y exp(log π(y)), for the answers y with p(y) > 0. ``logps``: log π(y|x) of each answer."""
    p = np.asarray(p_data, dtype=np.float64)
    lp = np.asarray(logps, dtype=np.float64)
    if p.shape != lp.shape or p.ndim != 1:
        raise ValueError("p_data and logps: one value per answer")
    if (p < 0).any() or not math.isclose(math.fsum(p), 1.0, abs_tol=1e-9):
        raise ValueError(f"p_data must be a distribution over the support, got {p.tolist()}")
    positive = p > 0
    kl = float(np.sum(p[positive] * (np.log(p[positive]) - lp[positive])))
    return kl, float(np.sum(np.exp(lp[positive])))


def support_metrics(table: pd.DataFrame, column: str = "logps") -> dict[str, float]:
    """Means over prompts of `kl_and_support_mass`; ``table`` has prompt, probability and ``column``."""
    per_prompt = [
        kl_and_support_mass(group["probability"].to_numpy(), group[column].to_numpy())
        for _, group in table.groupby("prompt", sort=False)
    ]
    if not per_prompt:
        return {"kl": float("nan"), "support_mass": float("nan"), "prompts": 0}
    kl, mass = np.array(per_prompt).T
    return {"kl": float(kl.mean()), "support_mass": float(mass.mean()), "prompts": len(per_prompt)}
