"""Stage ``train``: θ_t from θ_(t-1) (a fresh LoRA at t = 0) with TRL's DPO loss against the
stored geometric reference; checkpoints into storage every ``training.save_steps`` steps, and at once
on a SIGTERM (`alphaspin.preemption`), so a retried stage resumes where it stopped (`alphaspin.training`)."""

from __future__ import annotations

from typing import Any

import pandas as pd

from alphaspin.config import AlphaSpinConfig
from alphaspin.stage_spec import Artifact, Input, Job, StageSpec, pick

# Knobs that change how training is executed, not what it writes.
EXECUTION_ONLY = (
    "training.reference_batch_size",
    "training.save_steps",
    "training.num_machines",
    "training.main_process_ip",
    "training.main_process_port",
    "training.rendezvous_timeout_seconds",
    "training.deepspeed_config",
)
# Knobs that change what training writes but were added after runs existed: they enter the key only
# when set away from their default, so the train stages of existing runs keep their keys (stay cached).
# num_processes multiplies the effective batch; mixed_precision changes the arithmetic.
KEYED_WHEN_SET = {"training.num_processes": 1, "training.mixed_precision": "auto"}
# Knobs of the log Z(x) estimate: reference_logps reads them, train sees their effect through its input.
REFERENCE_ONLY = ("training.partition_samples", "training.partition_max_new_tokens")
# SLiC's δ and λ: in the key of slic runs only (other losses never read them; their keys stay as they were).
SLIC_ONLY = ("training.slic_delta", "training.slic_lambda")


def reads(config: AlphaSpinConfig, iteration: int, member: str | None) -> dict[str, Any]:
    fields = pick(
        config,
        "model.name_or_path",
        "model.dtype",
        "model.chat_template",
        "training",
        "run.seed",
        exclude=EXECUTION_ONLY + REFERENCE_ONLY + SLIC_ONLY + tuple(KEYED_WHEN_SET),
    )
    if config.training.loss_type == "slic":
        fields.update(pick(config, *SLIC_ONLY))
    fields.update({k: v for k, v in pick(config, *KEYED_WHEN_SET).items() if v != KEYED_WHEN_SET[k]})
    if config.generation.losers_as_prefixes:  # the trainer tokenizes cut-off losers without end-of-turn
        fields.update(pick(config, "generation.truncated_losers"))
    return fields


def train_pairs(job: Job, pairs: pd.DataFrame, previous: Artifact | None) -> dict[str, Any]:
    """`alphaspin.training.run_training` in this process, or in the ranks of a child ``accelerate
    launch`` when ``training.num_processes`` (or machines, or a DeepSpeed config) asks for it."""
    from alphaspin import distributed, preemption
    from alphaspin.training import run_training  # looked up at call time (bench.resume wraps it)

    launch = distributed.run_distributed if distributed.is_launched(job.config.training) else None
    # A SIGTERM while training: checkpoint at the end of the step, then stop (`alphaspin.preemption`).
    with preemption.graceful_sigterm(job.node.label, job.config.orchestration.preemption_grace_seconds):
        return run_training(job, pairs, previous, launch)


def train(job: Job, reference: Artifact, previous: Artifact | None) -> dict[str, Any]:
    frame = reference.read_table("reference.parquet")
    metrics = train_pairs(job, frame[frame.split == "train"].reset_index(drop=True), previous)
    job.out.clear_scratch()
    return metrics


SPEC = StageSpec(
    name="train",
    function=train,
    inputs=(Input("reference", "reference_logps"), Input("previous", "train", at="previous")),
    reads=reads,
    version=4,  # 2: LoRA dropout active (training.disable_dropout); BOS in templates; 3: model card;
    # 4: adapter_config.json names the base model as the card does (no local path)
    gpu=True,
    resumable=True,
    description="DPO-train θ_t from θ_(t-1) against the stored reference; checkpoints into storage.",
)
