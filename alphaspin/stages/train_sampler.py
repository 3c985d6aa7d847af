"""Stage ``train_sampler``: the gflownet opponent's sampler of π_(t-1)^α·π_base^(1-α) (paper Appendix A).

Only with ``method.opponent: gflownet`` and at t ≥ 1 (at t = 0 the mixture is π_base itself). A LoRA
sampler starts as θ_(t-1) and is fine-tuned with the modified sub-trajectory balance loss
(`alphaspin.gflownet`) on the iteration's training prompts (at most ``method.gflownet.prompts``);
``generate`` then samples the losers from it. Its target at the length cap follows
``generation.truncated_losers`` (`alphaspin.gflownet`, "Length"). Writes ``sampler/`` (the adapter) and
``train_log.json`` (one record per optimizer step).

Every ``method.gflownet.save_steps`` steps the whole training state (the sampler's weights, AdamW's
state, the sampling generator, the epoch's prompt order, the log) goes to ``_scratch/`` in the stage's
folder; a rerun of an interrupted stage (same cache key) resumes from it and ends exactly as an
uninterrupted run (`alphaspin.gflownet.train_sampler`); the checkpoint is cleared once the stage is done.
"""

from __future__ import annotations

import io
import logging
import shutil
from typing import Any

import torch

from alphaspin.config import AlphaSpinConfig
from alphaspin.stage_spec import Artifact, Input, Job, StageSpec, pick
from alphaspin.storage import SCRATCH

logger = logging.getLogger(__name__)

# Knobs that change how the sampler is trained, not what it converges to.
EXECUTION_ONLY = ("method.gflownet.micro_batch_size", "method.gflownet.save_steps")
CHECKPOINT = f"{SCRATCH}/sampler-checkpoint.pt"


def enabled(config: AlphaSpinConfig, iteration: int) -> bool:
    return config.method.opponent == "gflownet" and iteration >= 1


def max_new_tokens(config: AlphaSpinConfig) -> int:
    """The longest answer the sampler is trained on (and, by default, generates)."""
    return config.method.gflownet.max_new_tokens or config.generation.max_new_tokens


def reads(config: AlphaSpinConfig, iteration: int, member: str | None) -> dict[str, Any]:
    fields = pick(
        config,
        "model.name_or_path",
        "model.dtype",
        "model.chat_template",
        "method.alpha",
        "method.gflownet",
        "run.seed",
        exclude=EXECUTION_ONLY,
    )
    if config.method.gflownet.max_new_tokens is None:
        fields.update(pick(config, "generation.max_new_tokens"))
    # The reward of a cut-off answer: its prefix's under no_eos, the ended answer's under keep and drop
    # (`alphaspin.gflownet.cap_log_rewards`; keep and drop train the same sampler).
    if config.generation.losers_as_prefixes:
        fields.update(pick(config, "generation.truncated_losers"))
    return fields


def train_sampler(job: Job, prompts: Artifact, previous: Artifact | None) -> dict[str, Any]:
    from peft import PeftModel

    from alphaspin.generation import render_prompt_ids
    from alphaspin.gflownet import SAMPLER, GFlowNetSettings, PeftGFlowNet, add_sampler_adapter, summarise
    from alphaspin.gflownet import train_sampler as train_loop
    from alphaspin.models import load_base_model
    from alphaspin.training import _normalise_adapter_config

    if previous is None:
        raise ValueError(f"{job.node.label}: the gflownet sampler starts from θ_(t-1), which is missing")
    ws, config, t = job.workspace, job.config, job.iteration
    knobs = config.method.gflownet
    frame = prompts.read_table("prompts.parquet")
    texts = list(frame[frame.split == "train"].prompt)[: knobs.prompts]  # already in a seeded random order
    if not texts:
        raise ValueError(f"{job.node.label}: no training prompts to train the sampler on")
    tokenizer = ws.tokenizer
    prompt_ids = [render_prompt_ids(tokenizer, text) for text in texts]

    base = load_base_model(config.model.name_or_path, config.model.dtype, ws.device)
    model = PeftModel.from_pretrained(base, ws.local_adapter(previous), adapter_name="prev")
    add_sampler_adapter(model, knobs.lora_r)
    model.eval()  # no dropout anywhere: the q that is trained is the q that samples
    eos = tokenizer.eos_token_id
    problem = PeftGFlowNet(
        model,
        eos if isinstance(eos, list) else [eos],
        tokenizer.pad_token_id,
        config.method.alpha,
        max_new_tokens(config),
        ws.device,
        config.generation.truncated_losers,
    )
    settings = GFlowNetSettings(
        epochs=knobs.epochs,
        learning_rate=knobs.learning_rate,
        subtb_lambda=knobs.subtb_lambda,
        samples_per_prompt=knobs.samples_per_prompt,
        prompts_per_step=knobs.prompts_per_step,
        exploration_temperature=knobs.exploration_temperature,
        max_grad_norm=knobs.max_grad_norm,
        micro_batch_size=knobs.micro_batch_size,
    )
    steps_per_epoch = -(-len(prompt_ids) // knobs.prompts_per_step)
    total = steps_per_epoch * knobs.epochs

    def on_step(record: dict[str, Any]) -> None:
        ws.progress((record["step"] + 1) / total, f"step {record['step'] + 1}/{total}")
        if record["step"] % max(1, steps_per_epoch) == 0:
            logger.info("%s: %s", job.node.label, record)

    # The seed depends on the run and the iteration only: a rerun trains the same sampler.
    seed = config.run.seed * 1_000_003 + t
    torch.manual_seed(seed)
    resume = None
    if CHECKPOINT in job.out.list_files(SCRATCH):
        resume = torch.load(io.BytesIO(job.out.read_bytes(CHECKPOINT)), weights_only=True)
        logger.info("%s: resuming the sampler's training after step %d", job.node.label, resume["step"])

    def on_checkpoint(state: dict[str, Any]) -> None:
        buffer = io.BytesIO()
        torch.save(state, buffer)
        job.out.write_bytes(CHECKPOINT, buffer.getvalue())

    history = train_loop(
        problem,
        prompt_ids,
        settings,
        seed=seed,
        on_step=on_step,
        resume=resume,
        save_steps=knobs.save_steps,
        on_checkpoint=on_checkpoint,
    )

    out_dir = ws.scratch / f"sampler-out-{t}"
    shutil.rmtree(out_dir, ignore_errors=True)
    # PEFT writes an adapter not named "default" into a subfolder of that name.
    model.save_pretrained(str(out_dir), selected_adapters=[SAMPLER])
    adapter_dir = out_dir / SAMPLER
    _normalise_adapter_config(adapter_dir / "adapter_config.json", config.model.name_or_path)
    job.out.put_dir(adapter_dir, "sampler")
    job.out.write_json("train_log.json", history)
    del model, base
    return {
        **summarise(history),
        "prompts": len(prompt_ids),
        "max_new_tokens": max_new_tokens(config),
        "gflownet/resumed_from_step": resume["step"] if resume is not None else None,
    }


SPEC = StageSpec(
    name="train_sampler",
    function=train_sampler,
    inputs=(Input("prompts", "sample_prompts"), Input("previous", "train", at="previous")),
    reads=reads,
    # 2: adapter_config.json names the base model as the card does (no local path);
    # 3: the reward of a cut-off answer follows generation.truncated_losers (no_eos: its prefix's)
    version=3,
    gpu=True,
    resumable=True,  # its checkpoint in _scratch/ survives an interrupted attempt
    enabled=enabled,
    description="GFlowNet-fine-tune a LoRA sampler of π_(t-1)^α·π_base^(1-α) from θ_(t-1) (gflownet opponent).",
)
