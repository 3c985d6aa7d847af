"""A tiny randomly initialised Llama with SmolLM2's tokenizer and chat template, for fast tests.

Built deterministically from a seed (no download): ~1.6 M parameters, most in the embeddings.
"""

from __future__ import annotations

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from alphaspin.models import cache_dir, resolve_model_path, save_model_folder


def tiny_model_path(seed: int = 0, head_dim: int = 8) -> str:
    """Folder of the tiny model, built once per seed under the alphaspin cache. ``head_dim=32`` gives
    the variant vLLM's CPU attention runs (it supports head sizes from 32 up, not 8)."""
    name = f"tiny-llama-seed{seed}" if head_dim == 8 else f"tiny-llama-hd{head_dim}-seed{seed}"
    target = cache_dir() / "models" / name
    if (target / "config.json").exists():
        return str(target)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("builtin:smollm2-135m-instruct"))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32 if head_dim == 8 else 2 * head_dim,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4 if head_dim == 8 else 2,
        num_key_value_heads=2 if head_dim == 8 else 1,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    save_model_folder(LlamaForCausalLM(config), tokenizer, target)
    return str(target)
