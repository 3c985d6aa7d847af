"""The adapter's model card on its own: front matter, the method's knobs, no local path."""

from __future__ import annotations

import yaml

from alphaspin.config import load_config
from alphaspin.model_card import model_card

PAIRS = {"trained": 16, "truncated losers (cut off by max_new_tokens)": 3}


def _front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n", 2)[1])


def test_card_of_a_builtin_model_names_its_hub_origin_and_the_method():
    config = load_config("configs/quickstart.yaml", ["method.alpha=0.8", "training.beta=0.2"])
    card = model_card(config, 1, {"train/steps": 4}, PAIRS, None)
    front = _front_matter(card)
    assert front["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert front["library_name"] == "peft"
    assert {"alpha-spin", "dpo", "lora"} <= set(front["tags"])
    assert "builtin:smollm2-135m-instruct" in card
    for text in ("| α (", "| 0.8 |", "| β | 0.2 |", "| h (", "| opponent | arithmetic |", "| reference | geometric |"):
        assert text in card, text
    assert "| loss | sigmoid |" in card and "16 / 32 / 0.05" in card and "| iteration t | 1 of 0..2 |" in card
    assert "| pairs: trained | 16 |" in card and "truncated losers" in card and "builtin:chatterbot" in card
    assert "iter-1/evaluate/metrics.json" in card  # the metrics are not known yet: where they will be
    assert "PeftModel.from_pretrained" in card and "enable_lora=True" in card and "LoRARequest" in card
    assert "2404.04291" in card and "@misc{" in card
    for block in card.split("```python\n")[1:]:  # the snippets are valid Python
        compile(block.split("```")[0], "snippet", "exec")


def test_card_of_a_local_model_names_no_path_and_has_the_evaluation(tmp_path):
    model = tmp_path / "models" / "my-base"
    data = tmp_path / "data" / "sft.jsonl"
    config = load_config(None, [f"model.name_or_path={model}", f"data.source={data}", "run.run_id=r1"])
    card = model_card(config, 0, {"train/loss": 0.6931}, {"trained": 8}, {"heldout/reward_accuracy": 0.75, "x": None})
    assert str(tmp_path) not in card and "/models/" not in card
    assert "base_model" not in _front_matter(card)  # not a hub id
    assert "`my-base`" in card and "`sft.jsonl`" in card
    assert "| heldout/reward_accuracy | 0.75 |" in card and "metrics.json" not in card
    assert "| train/loss | 0.6931 |" in card


def test_card_of_a_hub_model():
    config = load_config(None, ["model.name_or_path=google/gemma-2b", "method.reference=ema"])
    card = model_card(config, 2, {}, {"trained": 8}, None)
    assert _front_matter(card)["base_model"] == "google/gemma-2b"
    assert 'AutoModelForCausalLM.from_pretrained("google/gemma-2b")' in card and "ema (decay" in card
