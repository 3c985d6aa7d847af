"""An explicit generation.seed of 0 is a seed, not "unset" (``seed or run_seed`` treated it as unset)."""

from __future__ import annotations

from alphaspin.config import GenerationConfig


def test_explicit_zero_seed_is_kept():
    assert GenerationConfig(seed=0).effective_seed(run_seed=42) == 0


def test_unset_seed_falls_back_to_the_run_seed():
    assert GenerationConfig().effective_seed(run_seed=42) == 42
    assert GenerationConfig(seed=7).effective_seed(run_seed=42) == 7
