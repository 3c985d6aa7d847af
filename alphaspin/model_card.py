"""The model card (README.md) of an α-SPIN adapter: what it is, how it was trained, how to load it.

A pure function of the run's config and counts: the train stage writes it next to the adapter (without
the evaluate stage's metrics, which do not exist yet), and ``alphaspin export`` writes it again with
them. It never names a local path: a local base model or data file is named by its folder/file name.
"""

from __future__ import annotations

import json
from pathlib import PurePath
from typing import Any

from alphaspin.config import AlphaSpinConfig

# Where the builtin models come from (their weights are dequantised from a Q4_1 GGUF of this model).
BUILTIN_ORIGINS = {"smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}

CITATION = """@misc{alami2024investigating,
  title     = {Investigating Regularization of Self-Play Language Models},
  author    = {Alami, Reda and Abubaker, Abdalgader and Achab, Mastane and Seddik, Mohamed El Amine and Lahlou, Salem},
  year      = {2024},
  eprint    = {2404.04291},
  archivePrefix = {arXiv},
  primaryClass  = {cs.CL},
  url       = {https://arxiv.org/abs/2404.04291}
}"""


def _is_local(name: str) -> bool:
    return name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1


def public_name(name_or_path: str) -> str:
    """How a stored artifact names a model or adapter, as the card does: a builtin or hub id as
    written, a local folder by its folder name (never a path of this machine)."""
    if name_or_path.startswith("builtin:") or not _is_local(name_or_path):
        return name_or_path
    return PurePath(name_or_path.rstrip("/")).name


def describe_base(name_or_path: str) -> tuple[str | None, str]:
    """(hub id for the ``base_model`` front matter or None, how the card names the base model)."""
    if name_or_path.startswith("builtin:"):
        origin = BUILTIN_ORIGINS.get(name_or_path.removeprefix("builtin:"))
        text = f"`{name_or_path}` (alphaspin's builtin model"
        text += f": {origin}, dequantised from its Q4_1 GGUF)" if origin else ")"
        return origin, text
    if _is_local(name_or_path):
        return None, f"a local model folder named `{PurePath(name_or_path.rstrip('/')).name}`"
    return name_or_path, f"[`{name_or_path}`](https://huggingface.co/{name_or_path})"


def _describe_data(source: str) -> str:
    if source.startswith("builtin:") or not _is_local(source) and not PurePath(source).suffix:
        return f"`{source}`"
    return f"a local file named `{PurePath(source.rstrip('/')).name}`"


def _base_loader(name_or_path: str) -> str:
    """Python source that names the base model in the loading snippets."""
    if name_or_path.startswith("builtin:"):
        return f'resolve_model_path("{name_or_path}")'
    if _is_local(name_or_path):
        return f'"path/to/{PurePath(name_or_path.rstrip("/")).name}"'
    return f'"{name_or_path}"'


def _yaml_list(items: list[str]) -> str:
    return "".join(f"\n  - {item}" for item in items)


def _value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (dict, list)):
        return f"`{json.dumps(value, sort_keys=True)}`"
    return str(value)


def _table(rows: dict[str, Any]) -> str:
    lines = ["| | |", "|---|---|"]
    lines += [f"| {key} | {_value(value)} |" for key, value in rows.items()]
    return "\n".join(lines)


def model_card(
    config: AlphaSpinConfig,
    iteration: int,
    metrics: dict[str, Any],
    pairs: dict[str, Any],
    evaluation: dict | None,
    merged: bool = False,
) -> str:
    """The README.md of θ_t (``iteration``): ``metrics`` are the train stage's (any subset), ``pairs`` the
    pair counts it trained on, ``evaluation`` the evaluate stage's metrics (None: not known yet);
    ``merged``: the card of a folder whose weights have the adapter merged in (``alphaspin export --merge``)."""
    method, training, lora = config.method, config.training, config.training.lora
    hub_id, base_text = describe_base(config.model.name_or_path)
    front = "---\n"
    if hub_id is not None:
        front += f"base_model: {hub_id}\n"
    front += f"library_name: {'transformers' if merged else 'peft'}\npipeline_tag: text-generation\ntags:" + _yaml_list(
        ["alpha-spin", "dpo", "lora", "peft", "trl", "self-play"]
    )
    front += "\n---\n"

    opponent = method.opponent + (f" ({method.sir_proposals} proposals)" if method.opponent == "sir" else "")
    reference = method.reference + (f" (decay {method.ema_decay})" if method.reference == "ema" else "")
    method_rows = {
        "iteration t": f"{iteration} of 0..{method.iterations}",
        "α (weight of π_(t-1) in π_ref ∝ π_(t-1)^α · π_base^(1-α); 1 = SPIN)": method.alpha,
        "h (history: opponents mixed)": method.history,
        "opponent": opponent,
        "reference": reference,
        "loss": training.loss_type,
        "β": training.beta,
        "LoRA r / alpha / dropout": f"{lora.r} / {lora.lora_alpha} / {lora.lora_dropout}",
        "LoRA target modules": ", ".join(sorted(lora.target_modules)),
        "learning rate": training.learning_rate,
        "epochs": training.num_train_epochs,
        "batch size (per device × accumulation)": (
            f"{training.per_device_train_batch_size} × {training.gradient_accumulation_steps}"
        ),
        "max length (tokens)": training.max_length,
        "seed": config.run.seed,
    }
    data_rows = {
        "SFT data": _describe_data(config.data.source),
        "held-out rows (never trained on)": config.data.heldout_size,
        **{f"pairs: {key}": value for key, value in sorted(pairs.items())},
        "losers cut off by max_new_tokens": f"{config.generation.truncated_losers} "
        f"(max_new_tokens {config.generation.max_new_tokens})",
        "opponent sampling": f"temperature {config.generation.temperature}, top_p {config.generation.top_p}",
    }
    base_src = _base_loader(config.model.name_or_path)
    builtin = config.model.name_or_path.startswith("builtin:")
    imports = ["from alphaspin.models import resolve_model_path  # the builtin's local folder"] if builtin else []
    parts = [
        front,
        f"# α-SPIN iteration {iteration}: "
        + (f"{base_text} with its LoRA adapter merged in" if merged else f"a LoRA adapter on {base_text}"),
        "",
        f"θ_{iteration} of an α-SPIN run (regularised self-play fine-tuning, "
        "[arXiv 2404.04291](https://arxiv.org/abs/2404.04291)), trained with "
        "alphaspin (TRL DPO + PEFT LoRA): the policy learns to prefer the SFT answers "
        "over answers sampled from its previous iterates (the opponent), with a DPO loss against a reference "
        "that mixes its previous iterate with the base model (weight α), which keeps it near the base.",
        "",
        f"Run `{config.run.run_id}`, iteration {iteration}.",
        "",
        "## Method",
        "",
        _table(method_rows),
        "",
        "## Data",
        "",
        _table(data_rows),
        "",
        "## Training",
        "",
        _table(dict(sorted(metrics.items()))) if metrics else "No training metrics recorded here.",
        "",
        "## Evaluation",
        "",
    ]
    if evaluation:
        parts.append(_table({k: v for k, v in sorted(evaluation.items()) if v is not None and k != "iteration"}))
    else:
        parts.append(
            f"The evaluate stage writes this iteration's metrics to `iter-{iteration}/evaluate/metrics.json` in "
            f"the run's storage; `alphaspin export --run-id {config.run.run_id} --iteration {iteration}` writes "
            "a card that includes them."
        )
    if merged:
        parts += [
            "",
            "## Use",
            "",
            "The adapter is merged into the weights: a plain transformers model folder.",
            "",
            "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            'model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")',
            'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")  # the run\'s chat template',
            "```",
            "",
            'With vLLM: `LLM(model="path/to/this/folder")`.',
            "",
        ]
    else:
        parts += [
            "",
            "## Use with PEFT",
            "",
            "```python",
            "from peft import PeftModel",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            *imports,
            "",
            f"base = AutoModelForCausalLM.from_pretrained({base_src})",
            'model = PeftModel.from_pretrained(base, "path/to/this/adapter")',
            'tokenizer = AutoTokenizer.from_pretrained("path/to/this/adapter")  # exported: the run\'s chat template',
            'messages = [{"role": "user", "content": "Hello!"}]',
            "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors='pt', "
            "return_dict=True)",
            "print(tokenizer.decode(model.generate(**inputs, max_new_tokens=64)[0]))",
            "```",
            "",
            "`alphaspin export --merge` writes a plain transformers folder instead "
            "(`AutoModelForCausalLM.from_pretrained(folder)`, or `LLM(model=folder)` in vLLM).",
            "",
            "## Use with vLLM",
            "",
            "```python",
            "from vllm import LLM, SamplingParams",
            "from vllm.lora.request import LoRARequest",
            *imports,
            "",
            f"llm = LLM(model={base_src}, enable_lora=True, max_lora_rank={max(lora.r, 8)})",
            'lora = LoRARequest("alphaspin", 1, "path/to/this/adapter")',
            'messages = [{"role": "user", "content": "Hello!"}]',
            "print(llm.chat(messages, SamplingParams(max_tokens=64), lora_request=lora)[0].outputs[0].text)",
            "```",
            "",
        ]
    parts += [
        "## Citation",
        "",
        "```bibtex",
        CITATION,
        "```",
        "",
    ]
    return "\n".join(parts)
