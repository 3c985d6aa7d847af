"""Chat templates produce exactly the BOS the tokenizer expects.

transformers 5 and TRL tokenize conversations through the chat template without adding special
tokens, so a model whose tokenizer adds BOS in plain encoding (gemma) sees BOS only if the template
writes it. The built-in templates add ``{{ bos_token }}`` for such tokenizers, and `load_tokenizer`
refuses any template that renders no BOS or two. Tokenizers that add no BOS (SmolLM2, the tiny
model) render exactly as before.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from tokenizers.processors import TemplateProcessing
from transformers import AutoTokenizer

from alphaspin.models import CHAT_TEMPLATES, check_special_tokens, load_tokenizer

# The built-in templates as they were at 0a7e752 (before BOS handling): the SmolLM2 case must not change.
HEAD_TEMPLATES = {
    "chatml": (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    "zephyr": (
        "{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
    ),
}
CONVERSATIONS = [
    ([{"role": "user", "content": "Hello, who are you?"}], True),
    ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there."}], False),
    ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}], True),
]
BOS = "<|endoftext|>"  # id 0 in SmolLM2's vocabulary; the BOS-adding test tokenizer uses it as its BOS


def _ids(tokenizer, messages, add_generation_prompt) -> list[int]:
    result = tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, add_generation_prompt=add_generation_prompt
    )
    return list(result["input_ids"])


@pytest.fixture(scope="module")
def bos_model_dir(tiny_model: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tiny model's folder (config + tokenizer) with a tokenizer that adds BOS in plain encoding,
    as gemma's does."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokenizer.bos_token = BOS
    bos_id = tokenizer.convert_tokens_to_ids(BOS)
    tokenizer._tokenizer.post_processor = TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    target = tmp_path_factory.mktemp("bos") / "bos-model"
    target.mkdir()
    shutil.copy(Path(tiny_model) / "config.json", target / "config.json")
    tokenizer.save_pretrained(target)
    reloaded = AutoTokenizer.from_pretrained(target)
    assert reloaded("x")["input_ids"][0] == reloaded.bos_token_id == bos_id  # the premise
    return str(target)


# -- tokenizers that add no BOS: unchanged ------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(HEAD_TEMPLATES))
def test_builtin_templates_render_as_before_for_the_tiny_tokenizer(tiny_model, name):
    before = AutoTokenizer.from_pretrained(tiny_model)
    before.chat_template = HEAD_TEMPLATES[name]
    now = load_tokenizer(tiny_model, name)
    assert now.chat_template == HEAD_TEMPLATES[name]
    for messages, generation_prompt in CONVERSATIONS:
        assert _ids(now, messages, generation_prompt) == _ids(before, messages, generation_prompt)


def test_own_template_renders_as_before_for_the_tiny_tokenizer(tiny_model):
    before = AutoTokenizer.from_pretrained(tiny_model)
    now = load_tokenizer(tiny_model)
    assert now.chat_template == before.chat_template
    for messages, generation_prompt in CONVERSATIONS:
        assert _ids(now, messages, generation_prompt) == _ids(before, messages, generation_prompt)


# -- tokenizers that add BOS (gemma) ---------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(CHAT_TEMPLATES))
def test_builtin_templates_start_with_exactly_one_bos(bos_model_dir, name):
    tokenizer = load_tokenizer(bos_model_dir, name)
    for messages, generation_prompt in CONVERSATIONS:
        ids = _ids(tokenizer, messages, generation_prompt)
        assert ids[0] == tokenizer.bos_token_id and ids[1] != tokenizer.bos_token_id, (name, ids[:3])


def test_trl_tokenization_sees_one_bos(bos_model_dir):
    """The ids TRL trains on (and our reference log-probs are computed on) start with one BOS."""
    import pandas as pd

    from alphaspin.config import TrainingConfig
    from alphaspin.dpo import dpo_config, pairs_to_dataset, tokenize_like_trl

    tokenizer = load_tokenizer(bos_model_dir, "zephyr")
    pairs = pd.DataFrame({"id": ["a"], "prompt": ["Hello"], "chosen": ["Hi!"], "rejected": ["Bye."]})
    args = dpo_config(TrainingConfig(max_length=64), "unused-output-dir", seed=0, use_cpu=True)
    row = tokenize_like_trl(pairs_to_dataset(pairs), tokenizer, args)[0]
    assert row["prompt_ids"][0] == tokenizer.bos_token_id != row["prompt_ids"][1]


def test_template_without_bos_is_refused(bos_model_dir):
    with pytest.raises(ValueError, match=r"(?s)bos-model.*custom.*no BOS"):
        load_tokenizer(bos_model_dir, HEAD_TEMPLATES["zephyr"])


def test_own_template_without_bos_is_refused(bos_model_dir):
    # The copied tokenizer keeps SmolLM2's own template, which writes no <|endoftext|>.
    with pytest.raises(ValueError, match=r"(?s)bos-model.*own.*no BOS"):
        load_tokenizer(bos_model_dir)


def test_template_with_two_bos_is_refused(bos_model_dir):
    double = "{{ bos_token }}{{ bos_token }}" + HEAD_TEMPLATES["chatml"]
    with pytest.raises(ValueError, match=r"(?s)bos-model.*custom.*twice"):
        load_tokenizer(bos_model_dir, double)


def test_check_names_the_model_and_template(bos_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(bos_model_dir)
    tokenizer.chat_template = HEAD_TEMPLATES["zephyr"]
    with pytest.raises(ValueError) as error:
        check_special_tokens(tokenizer, "google/gemma-2b", "zephyr")
    assert "google/gemma-2b" in str(error.value) and "zephyr" in str(error.value)
    tokenizer.chat_template = "{{ bos_token }}" + HEAD_TEMPLATES["zephyr"]
    check_special_tokens(tokenizer, "google/gemma-2b", "zephyr")  # one BOS: accepted


def test_no_check_for_tokenizers_without_bos(tiny_model):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokenizer.chat_template = "{{ bos_token }}{{ bos_token }}" + HEAD_TEMPLATES["chatml"]
    check_special_tokens(tokenizer, tiny_model, "custom")  # the tokenizer adds no BOS: nothing expected
