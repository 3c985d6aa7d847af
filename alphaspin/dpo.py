"""The bridge to TRL: pair tables as TRL datasets, TRL's own tokenization, sequence log-probs on
exactly the token ids TRL trains on, and a DPOTrainer that uses a supplied reference.

TRL (≥ 0.29) uses dataset columns ``ref_chosen_logps``/``ref_rejected_logps`` only when
``precompute_ref_log_probs=True``, and then computes them itself from the model. α-SPIN's
reference is a geometric mixture of two policies that TRL cannot compute, so
`GeometricReferenceDPOTrainer` overrides the precompute step to keep the supplied columns.

It also computes the paper's loss forms that TRL lacks (``config.PAPER_LOSSES``: ``ipo_pairwise``,
``slic``; formulas in `alphaspin.reference`). TRL 1.16 has no per-pair loss method to override: its
``_compute_loss`` does the forward, the loss dispatch and the metrics in one body. So for those
names the trainer runs TRL's ``_compute_loss`` with the name replaced by ``sigmoid`` at weight 0
(TRL still does the forward, its other losses and every metric), takes the policy log-probs from
that same forward, and adds the paper's loss (`GeometricReferenceDPOTrainer.paper_pair_losses`).
"""

from __future__ import annotations

import logging
import types
from collections.abc import Callable
from typing import Any

import datasets
import pandas as pd
import torch
from trl import DPOConfig, DPOTrainer
from trl.trainer.dpo_trainer import DataCollatorForPreference
from trl.trainer.utils import add_fused_lm_head

from alphaspin.config import PAPER_LOSSES, TrainingConfig
from alphaspin.generation import chat_prompt
from alphaspin.reference import ipo_pairwise_loss, slic_loss

logger = logging.getLogger(__name__)

REFERENCE_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")
# Dataset column: True where the rejected answer is a prefix cut off by generation.max_new_tokens,
# to be tokenized without the chat template's end-of-turn tokens (`end_rejected_prefixes`).
PREFIX_COLUMN = "rejected_is_prefix"
# Pairs and dataset column: the token ids the loser was generated as (`alphaspin.generation.Completion`);
# a cut-off loser's rejected ids are these, not the re-tokenized text (`end_rejected_prefixes`).
GENERATED_COLUMN = "rejected_generated_ids"


def pairs_to_dataset(
    pairs: pd.DataFrame, extra_columns: tuple[str, ...] = (), losers_as_prefixes: bool = False
) -> datasets.Dataset:
    """Conversational preference rows: prompt = [user x], chosen = [assistant y_w], rejected = [assistant y_l].

    ``losers_as_prefixes`` (``generation.truncated_losers: no_eos``): rows whose ``rejected_truncated``
    is true get ``rejected_is_prefix``, so that `prepare_like_trl` ends their rejected ids where
    generation stopped, on the ids it generated (``rejected_generated_ids``, when the pairs have them)."""
    records: dict[str, list[Any]] = {
        "id": list(pairs["id"]),
        "prompt": [chat_prompt(p) for p in pairs["prompt"]],
        "chosen": [[{"role": "assistant", "content": c}] for c in pairs["chosen"]],
        "rejected": [[{"role": "assistant", "content": r}] for r in pairs["rejected"]],
    }
    for column in extra_columns:
        records[column] = [float(v) for v in pairs[column]]
    if losers_as_prefixes:
        if "rejected_truncated" not in pairs.columns:
            raise ValueError("generation.truncated_losers: no_eos needs the pairs' rejected_truncated column")
        records[PREFIX_COLUMN] = [bool(v) for v in pairs["rejected_truncated"]]
        if GENERATED_COLUMN in pairs.columns:
            records[GENERATED_COLUMN] = [
                [int(i) for i in ids] if ids is not None else [] for ids in pairs[GENERATED_COLUMN]
            ]
    return datasets.Dataset.from_dict(records)


def slic_settings(training: TrainingConfig) -> dict[str, float]:
    """The trainer's SLiC arguments from the config: δ = ``training.slic_delta``, λ = ``training.slic_lambda``."""
    return {"slic_delta": training.slic_delta, "slic_lambda": training.slic_lambda}


def dpo_config(training: TrainingConfig, output_dir: str, seed: int, use_cpu: bool, **overrides: Any) -> DPOConfig:
    """TRL's DPOConfig from ours (same names where TRL has them)."""
    values: dict[str, Any] = dict(
        output_dir=output_dir,
        beta=training.beta,
        loss_type=[training.loss_type],
        label_smoothing=training.label_smoothing,
        learning_rate=training.learning_rate,
        num_train_epochs=training.num_train_epochs,
        per_device_train_batch_size=training.per_device_train_batch_size,
        per_device_eval_batch_size=training.reference_batch_size,
        gradient_accumulation_steps=training.gradient_accumulation_steps,
        max_length=training.max_length,
        truncation_mode="keep_start",
        warmup_steps=training.warmup_steps,
        gradient_checkpointing=training.gradient_checkpointing,
        disable_dropout=training.disable_dropout,
        precompute_ref_log_probs=True,
        precompute_ref_batch_size=training.reference_batch_size,
        seed=seed,
        data_seed=seed,
        use_cpu=use_cpu,
        bf16=mixed_precision(training, use_cpu) == "bf16",
        fp16=mixed_precision(training, use_cpu) == "fp16",
        report_to=[],
        logging_steps=1,
        save_strategy="steps",
        save_steps=training.save_steps,
        save_total_limit=1,
        dataset_num_proc=None,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    values.update(overrides)
    return DPOConfig(**values)


def mixed_precision(training: TrainingConfig, use_cpu: bool) -> str:
    """``training.mixed_precision`` resolved: ``auto`` is bf16 on a GPU that supports it, else ``no``."""
    if training.mixed_precision != "auto":
        return training.mixed_precision
    return "bf16" if not use_cpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def end_of_turn_ids(tokenizer: Any) -> list[int]:
    """The ids the chat template writes after an assistant message's content, closing the turn
    (chatml: ``<|im_end|>`` and a newline; zephyr: EOS and a newline)."""
    sentinel = "ALPHASPIN-END-OF-CONTENT"
    text = tokenizer.apply_chat_template(
        [*chat_prompt("x"), {"role": "assistant", "content": sentinel}], tokenize=False
    )
    if text.count(sentinel) != 1:
        raise ValueError("model.chat_template: cannot locate the assistant content in the rendered chat")
    closing = text.split(sentinel, 1)[1]
    return list(tokenizer(closing, add_special_tokens=False)["input_ids"]) if closing else []


def end_rejected_prefixes(dataset: datasets.Dataset, tokenizer: Any) -> datasets.Dataset:
    """Remove the end-of-turn ids (`end_of_turn_ids`) from ``rejected_ids`` of the rows marked
    ``rejected_is_prefix``: a loser cut off by ``generation.max_new_tokens`` is then scored and
    trained as the prefix the policy wrote, not as an answer the policy chose to end there.

    Why this is the default (``generation.truncated_losers: no_eos``): TRL renders every answer
    through the chat template, which closes the turn after it. A cut-off loser would then read
    "cut text + end-of-turn", and DPO would learn that ending abruptly is bad, from a signal that
    is an artifact of the cap (the policy never ended there). Dropping those pairs instead loses
    data and biases the losers toward short answers; scoring the prefix keeps every sample and
    scores exactly what was generated.

    "Exactly": the prefix is the token ids the sampler generated (column ``rejected_generated_ids``,
    where the pairs carry them), not the re-tokenized decoded text, which can differ (a word written
    in two pieces re-tokenizes as one token; decoding strips a leading space). Without that column
    (pairs written before it existed) the re-tokenized text is used. A no-op on datasets without
    the ``rejected_is_prefix`` column."""
    if PREFIX_COLUMN not in dataset.column_names:
        return dataset
    closing = end_of_turn_ids(tokenizer)
    generated = GENERATED_COLUMN in dataset.column_names
    if not closing and not generated:
        return dataset

    def strip(example: dict[str, Any]) -> dict[str, Any]:
        ids = list(example["rejected_ids"])
        if not example[PREFIX_COLUMN]:
            return {"rejected_ids": ids}
        if closing and ids[-len(closing) :] != closing:
            raise ValueError(
                f"generation.truncated_losers: no_eos: the rejected ids of row {example.get('id')!r} do not end "
                f"with the chat template's end-of-turn ids {closing}; use truncated_losers keep or drop"
            )
        if generated and example[GENERATED_COLUMN]:
            return {"rejected_ids": list(example[GENERATED_COLUMN])}
        return {"rejected_ids": ids[: -len(closing)] if closing else ids}

    ended = dataset.map(strip, desc="Ending cut-off losers where generation stopped")
    return ended.remove_columns(GENERATED_COLUMN) if generated else ended


def end_of_turn_marker(tokenizer: Any) -> list[int]:
    """The part of `end_of_turn_ids` that the policy itself writes to end its answer: up to and
    including the first end-of-sequence id, the token generation stops at (chatml: ``<|im_end|>``;
    zephyr: EOS). What the template writes after it (a newline) is not a choice of the policy. A
    template whose closing holds no EOS id: all of its closing ids."""
    closing = end_of_turn_ids(tokenizer)
    eos = tokenizer.eos_token_id
    stops = set(eos if isinstance(eos, list) else [eos])
    for position, token in enumerate(closing):
        if token in stops:
            return closing[: position + 1]
    return closing


def end_answers_at_marker(
    dataset: datasets.Dataset, tokenizer: Any, sides: tuple[str, ...] = ("chosen", "rejected")
) -> datasets.Dataset:
    """Score "the answer, then end of turn": the ``<side>_ids`` that end with the template's
    end-of-turn ids (`end_of_turn_ids`) keep only its marker (`end_of_turn_marker`), so the sequence
    is what a sampler stopped at EOS produced (answer + ``<|im_end|>``, not the newline after it).
    Rows without the closing (a cut-off prefix of `end_rejected_prefixes`) are left as they are.
    For probabilities of answers (the samplers' weights, log Z(x), the synthetic task's exact KL);
    training keeps TRL's ids."""
    closing, marker = end_of_turn_ids(tokenizer), end_of_turn_marker(tokenizer)
    if closing == marker:
        return dataset

    def end(example: dict[str, Any]) -> dict[str, Any]:
        out = {}
        for side in sides:
            ids = list(example[f"{side}_ids"])
            ended = len(ids) >= len(closing) and ids[-len(closing) :] == closing
            out[f"{side}_ids"] = ids[: -len(closing)] + marker if ended else ids
        return out

    return dataset.map(end, desc="Ending answers at the end-of-turn marker")


def prepare_like_trl(trainer: Any, dataset: datasets.Dataset, tokenizer: Any, args: DPOConfig, name: str):
    """TRL's ``DPOTrainer._prepare_dataset``, then `end_rejected_prefixes`: the one tokenization of
    both the reference stage (`tokenize_like_trl`) and the trainer (`GeometricReferenceDPOTrainer`)."""
    return end_rejected_prefixes(DPOTrainer._prepare_dataset(trainer, dataset, tokenizer, args, name), tokenizer)


def tokenize_like_trl(dataset: datasets.Dataset, tokenizer: Any, args: DPOConfig) -> datasets.Dataset:
    """Tokenize preference rows with TRL's own ``DPOTrainer._prepare_dataset`` (prompt_ids,
    chosen_ids, rejected_ids; rows whose prompt fills max_length dropped) and end cut-off losers
    as `GeometricReferenceDPOTrainer` does (`prepare_like_trl`), so our reference log-probs are
    computed on exactly the ids the trainer will see. For conversational rows that method only
    reads ``self._tokenizer`` when adding EOS to plain-text rows; a namespace stands in.
    """
    shim = types.SimpleNamespace(_tokenizer=tokenizer)
    return prepare_like_trl(shim, dataset, tokenizer, args, "pairs")


def prepare_for_logps(model: torch.nn.Module) -> torch.nn.Module:
    """Add TRL's fused LM head (per-token log-probs without full logits) to a plain model, once.
    Must run before PEFT wraps the model, as TRL's trainer does."""
    if not getattr(model, "_alphaspin_fused_head", False):
        add_fused_lm_head(model)
        model._alphaspin_fused_head = True
    return model


@torch.no_grad()
def completion_logps(
    model: torch.nn.Module,
    tokenized: datasets.Dataset,
    pad_token_id: int,
    max_length: int,
    batch_size: int,
    device: str,
    sides: tuple[str, ...] = ("chosen", "rejected"),
    on_batch: Callable[[int], None] | None = None,
) -> pd.DataFrame:
    """Sum of completion-token log-probs of each row's chosen/rejected answer under ``model``
    (as TRL's ``compute_ref_log_probs`` sums them), and the number of completion tokens.

    ``sides`` selects which answers to score, so a cached side costs no forward.
    Returns columns id, <side>_logps, <side>_tokens for each side.
    """
    collator = DataCollatorForPreference(pad_token_id=pad_token_id, max_length=max_length, truncation_mode="keep_start")
    result: dict[str, list[Any]] = {"id": list(tokenized["id"])}
    for side in sides:
        result[f"{side}_logps"], result[f"{side}_tokens"] = [], []
    rows = tokenized.select_columns(["prompt_ids", "chosen_ids", "rejected_ids"])
    for start in range(0, len(rows), batch_size):
        examples = [rows[i] for i in range(start, min(start + batch_size, len(rows)))]
        batch = collator(examples)  # [chosen...; rejected...]
        half = len(examples)
        selected = []
        if "chosen" in sides:
            selected.append(slice(0, half))
        if "rejected" in sides:
            selected.append(slice(half, 2 * half))
        index = torch.cat([torch.arange(2 * half)[s] for s in selected])
        input_ids = batch["input_ids"][index].to(device)
        attention = batch["attention_mask"][index].to(device)
        completion = batch["completion_mask"][index].to(device)
        labels = input_ids.masked_fill(completion == 0, -100)
        out = model(input_ids=input_ids, attention_mask=attention, labels=labels, fused_lm_head=True, use_cache=False)
        shift = completion[..., 1:]
        per_token = out.log_probs[:, -shift.size(1) :].float()
        sums = per_token.sum(dim=1).cpu()
        counts = shift.sum(dim=1).cpu()
        for k, side in enumerate(s for s in ("chosen", "rejected") if s in sides):
            result[f"{side}_logps"].extend(sums[k * half : (k + 1) * half].tolist())
            result[f"{side}_tokens"].extend(counts[k * half : (k + 1) * half].tolist())
        if on_batch:
            on_batch(half)
    return pd.DataFrame(result)


class GeometricReferenceDPOTrainer(DPOTrainer):
    """TRL's DPOTrainer trained against reference log-probs supplied as dataset columns
    (α-SPIN's geometric mixture, computed by the reference_logps stage) instead of computing them,
    on the ids of `prepare_like_trl` (the reference stage's tokenization), with the paper's losses
    TRL lacks (``ipo_pairwise``, ``slic``) added to TRL's loss dispatch.

    ``slic_delta`` / ``slic_lambda`` are SLiC's margin δ and SFT weight λ (paper §2.3), from
    ``training.slic_delta`` / ``training.slic_lambda`` (`slic_settings`). Constructed without them, δ is
    1/β (the margin TRL's hinge puts on log-ratios: max(0, 1 − β·m) = β·max(0, 1/β − m)) and λ = 0."""

    def __init__(self, *args: Any, slic_delta: float | None = None, slic_lambda: float = 0.0, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.slic_delta = 1.0 / self.beta if slic_delta is None else float(slic_delta)
        self.slic_lambda = float(slic_lambda)
        ours = [t for t in self.loss_types if t in PAPER_LOSSES]
        if ours and (
            self.ld_alpha is not None
            or self.f_divergence_type != "reverse_kl"
            or self.use_weighting
            or not self.precompute_ref_logps
        ):
            raise ValueError(
                f"loss_type {ours} is computed from summed log-probs and the supplied reference columns: it needs "
                "precompute_ref_log_probs=True and no ld_alpha, f_divergence_type or use_weighting"
            )

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        return prepare_like_trl(self, dataset, processing_class, args, dataset_name)

    def _precompute_ref_logps(self, dataset: datasets.Dataset, name: str, batch_size: int) -> datasets.Dataset:
        missing = [c for c in REFERENCE_COLUMNS if c not in dataset.column_names]
        if missing:
            raise ValueError(
                f"{name} dataset has no {missing} columns: α-SPIN trains against a supplied geometric reference"
            )
        return dataset

    def paper_pair_losses(
        self,
        loss_type: str,
        chosen_logps: torch.Tensor,
        rejected_logps: torch.Tensor,
        ref_chosen_logps: torch.Tensor,
        ref_rejected_logps: torch.Tensor,
    ) -> torch.Tensor:
        """Per-pair loss of one of the paper's losses TRL lacks, from summed sequence log-probs. Shapes: (batch,)."""
        if loss_type == "ipo_pairwise":
            return ipo_pairwise_loss(chosen_logps - ref_chosen_logps, rejected_logps - ref_rejected_logps, self.beta)
        if loss_type == "slic":
            return slic_loss(chosen_logps, rejected_logps, self.slic_delta, self.slic_lambda)
        raise ValueError(f"not one of the paper's losses {list(PAPER_LOSSES)}: {loss_type!r}")

    def _compute_loss(self, model, inputs, return_outputs):
        ours = [(t, w) for t, w in zip(self.loss_types, self.loss_weights, strict=True) if t in PAPER_LOSSES]
        if not ours:
            return super()._compute_loss(model, inputs, return_outputs)
        policy_outputs: list[Any] = []

        def forward(*args: Any, **kwargs: Any) -> Any:
            outputs = model(*args, **kwargs)
            if not policy_outputs:  # TRL's first call is the policy forward (the reference is precomputed)
                policy_outputs.append(outputs)
            return outputs

        loss_types, loss_weights = self.loss_types, self.loss_weights
        self.loss_types = ["sigmoid" if t in PAPER_LOSSES else t for t in loss_types]
        self.loss_weights = [0.0 if t in PAPER_LOSSES else w for t, w in zip(loss_types, loss_weights, strict=True)]
        try:
            result = super()._compute_loss(forward, inputs, return_outputs)
        finally:
            self.loss_types, self.loss_weights = loss_types, loss_weights
        loss, outputs = result if return_outputs else (result, None)

        # the policy's sequence log-probs exactly as TRL sums them (ld_alpha is refused in __init__)
        seq_len = inputs["completion_mask"].size(1) - 1
        logps = policy_outputs[0].log_probs[:, -seq_len:].sum(dim=1)
        chosen_logps, rejected_logps = logps.chunk(2, dim=0)
        for loss_type, weight in ours:
            per_pair = self.paper_pair_losses(
                loss_type, chosen_logps, rejected_logps, inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
            )
            loss = loss + per_pair.mean() * weight
        return (loss, outputs) if return_outputs else loss
