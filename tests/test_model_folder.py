"""Converted model folders are written atomically and tolerate a concurrent writer."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from alphaspin.models import save_model_folder


def _tiny(tiny_model: str):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=8,
        intermediate_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    return LlamaForCausalLM(config), tokenizer


def test_a_second_writer_of_the_same_folder_keeps_the_first_copy(tiny_model, tmp_path):
    model, tokenizer = _tiny(tiny_model)
    target = tmp_path / "models" / "m"
    save_model_folder(model, tokenizer, target)
    first = (target / "config.json").read_bytes()
    save_model_folder(model, tokenizer, target)  # the folder exists: the race's loser must not fail
    assert (target / "config.json").read_bytes() == first
    assert [p.name for p in target.parent.iterdir()] == ["m"]  # no temporary sibling left behind


def test_a_failed_rename_without_a_finished_folder_is_an_error(tiny_model, tmp_path):
    model, tokenizer = _tiny(tiny_model)
    target = tmp_path / "models" / "m"
    target.mkdir(parents=True)
    (target / "stray").write_text("not a model")  # non-empty, no config.json: not another writer's copy
    with pytest.raises(OSError):
        save_model_folder(model, tokenizer, target)
