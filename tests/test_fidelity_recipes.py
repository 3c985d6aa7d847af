"""The shipped recipes load, and the paper recipes compute what the paper reports: the Open LLM
Leaderboard tasks, an MT-Bench-style judged chat (GPT-4 as judge), and a LoRA learning rate with
which zero-initialised adapters move (the paper's Appendix A: 1e-4 with LoRA r=16; 5e-7 is SPIN's
full fine-tuning rate)."""

from __future__ import annotations

from pathlib import Path

import pytest

from alphaspin.config import load_config

CONFIGS = Path(__file__).parents[1] / "configs"
PAPER_RECIPES = ["paper-gemma-2b.yaml", "spin-official.yaml"]


RECIPES = [p for p in sorted(CONFIGS.glob("*.yaml")) if not p.name.startswith("grid-")]  # grid-*: grids of runs


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_recipe_loads(path):
    load_config(path)


@pytest.mark.parametrize("name", PAPER_RECIPES)
def test_paper_recipes_run_the_papers_evaluation(name):
    config = load_config(CONFIGS / name)
    assert "open_llm_leaderboard" in config.evaluation.benchmarks
    judge = config.evaluation.judge
    assert judge.enabled
    assert judge.base_url != "local" and judge.base_url.startswith("https://")
    assert judge.model == "gpt-4"
    assert judge.api_key_env == "OPENAI_API_KEY"


@pytest.mark.parametrize("name", PAPER_RECIPES)
def test_paper_recipes_use_a_lora_learning_rate(name):
    config = load_config(CONFIGS / name)
    assert config.training.learning_rate >= 1e-5
    assert config.training.lora.lora_dropout == 0.05 and not config.training.disable_dropout
