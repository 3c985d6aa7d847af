"""The train stage's body: TRL DPO with LoRA (PEFT) against the stored geometric reference, with
checkpoints mirrored into run storage so a retried stage resumes where it stopped."""

from __future__ import annotations

import json
import logging
import posixpath
import shutil
from pathlib import Path
from typing import Any

import pandas as pd
from transformers import TrainerCallback

from alphaspin.model_card import model_card
from alphaspin.stage_spec import Artifact, Job
from alphaspin.storage import SCRATCH, StageDir
from alphaspin.tracking import Tracker, check_tracking
from alphaspin.workspace import Progress

logger = logging.getLogger(__name__)

CHECKPOINTS = f"{SCRATCH}/checkpoints"


class StorageCheckpointCallback(TrainerCallback):
    """After the Trainer saves ``checkpoint-N`` locally, upload it into the stage's scratch area
    and delete older remote checkpoints (uploaded first, deleted after: one always survives)."""

    def __init__(self, stage: StageDir, output_dir: Path, progress: Progress, total_steps: int):
        self.stage, self.output_dir, self.progress, self.total_steps = stage, output_dir, progress, total_steps

    def on_save(self, args, state, control, **kwargs):
        name = f"checkpoint-{state.global_step}"
        local = self.output_dir / name
        if local.is_dir():
            self.stage.put_dir(local, posixpath.join(CHECKPOINTS, name))
            self.stage.write_json(posixpath.join(CHECKPOINTS, name, "_COMPLETE.json"), {"step": state.global_step})
            for old in _remote_checkpoints(self.stage):
                if old != name:
                    self.stage.storage.remove(self.stage.file(posixpath.join(CHECKPOINTS, old)), recursive=True)
            logger.info("checkpoint %s stored in %s", name, self.stage.url)
        return control

    def on_step_end(self, args, state, control, **kwargs):
        self.progress(state.global_step / max(1, self.total_steps), f"step {state.global_step}/{self.total_steps}")
        return control


class TrackingCallback(TrainerCallback):
    """TRL's per-step logs of iteration t into the run's trackers (`alphaspin.tracking`), named
    ``iter-<t>/<name>`` at the global step; TensorBoard events uploaded with every checkpoint and at the end."""

    def __init__(self, tracker: Tracker, iteration: int):
        self.tracker, self.prefix = tracker, f"iter-{iteration}/"

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            self.tracker.log_metrics(logs, state.global_step, self.prefix)
        return control

    def on_save(self, args, state, control, **kwargs):
        self.tracker.flush()
        return control

    def on_train_end(self, args, state, control, **kwargs):
        self.tracker.flush()
        return control


def _remote_checkpoints(stage: StageDir) -> list[str]:
    """Names of checkpoints fully uploaded (their _COMPLETE.json marker exists), oldest first."""
    names = {n.split("/")[2] for n in stage.list_files(CHECKPOINTS) if n.endswith("/_COMPLETE.json")}
    return sorted(names, key=lambda n: int(n.rsplit("-", 1)[-1]))


def _normalise_adapter_config(path: Path) -> None:
    """PEFT serialises ``target_modules`` from a set, in an order that changes with Python's hash
    seed; sort it so the same training writes the same bytes in every process (stable digests)."""
    config = json.loads(path.read_text())
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _summarise(history: list[dict[str, Any]]) -> dict[str, Any]:
    steps = [h for h in history if "loss" in h and "rewards/margins" in h]
    if not steps:
        return {}
    last_epoch = max(h.get("epoch", 0) for h in steps)
    epoch_start = last_epoch - 1.0
    final = [h for h in steps if h.get("epoch", 0) > epoch_start] or steps
    mean = lambda k: float(sum(h[k] for h in final) / len(final))  # noqa: E731
    return {
        "train/loss": mean("loss"),
        "train/reward_margin": mean("rewards/margins"),
        "train/reward_accuracy": mean("rewards/accuracies"),
        "train/first_loss": float(steps[0]["loss"]),
        "train/steps": int(steps[-1].get("step", len(steps))),
    }


def run_training(job: Job, pairs: pd.DataFrame, previous: Artifact | None) -> dict:
    """Train θ_t from θ_(t-1) (a fresh LoRA at t = 0) on ``pairs`` (with their reference columns),
    resuming from the last checkpoint stored in ``job.out``; the adapter goes to ``job.out/adapter``."""
    from peft import LoraConfig, PeftModel

    from alphaspin.dpo import REFERENCE_COLUMNS, GeometricReferenceDPOTrainer, pairs_to_dataset
    from alphaspin.models import load_base_model

    t, stage, ws, config = job.iteration, job.out, job.workspace, job.config
    if pairs.empty:
        raise ValueError(f"iter-{t}/train: no training pairs (all dropped by training.max_length?)")
    if ws.tracker.enabled:  # a worker without the tracking extra, or cut off from the server: fail before training
        check_tracking(config)
    output_dir = ws.scratch / f"train-{t}"
    shutil.rmtree(output_dir, ignore_errors=True)
    resume_from = None
    remote = _remote_checkpoints(stage)
    if remote:
        resume_from = output_dir / remote[-1]
        stage.get_dir(posixpath.join(CHECKPOINTS, remote[-1]), resume_from)
        logger.info("iter-%d/train: resuming from %s", t, remote[-1])

    base = load_base_model(config.model.name_or_path, config.model.dtype, ws.device)
    lora = config.training.lora
    peft_config = None
    if previous is None:
        peft_config = LoraConfig(
            r=lora.r,
            lora_alpha=lora.lora_alpha,
            lora_dropout=lora.lora_dropout,
            target_modules=list(lora.target_modules),
            task_type="CAUSAL_LM",
        )
        model = base
    else:  # θ_t starts from θ_(t-1)
        model = PeftModel.from_pretrained(base, ws.local_adapter(previous), is_trainable=True)
    args = ws.dpo_args(output_dir=str(output_dir))
    # The trainer tokenizes it with `alphaspin.dpo.prepare_like_trl`, as the reference stage did.
    dataset = pairs_to_dataset(pairs, REFERENCE_COLUMNS, losers_as_prefixes=config.generation.losers_as_prefixes)
    trainer = GeometricReferenceDPOTrainer(
        model=model, args=args, train_dataset=dataset, processing_class=ws.tokenizer, peft_config=peft_config
    )
    total = trainer.get_train_dataloader().__len__()
    total_steps = max(
        1, int(round(total * config.training.num_train_epochs / config.training.gradient_accumulation_steps))
    )
    trainer.add_callback(StorageCheckpointCallback(stage, output_dir, ws.progress, total_steps))
    if ws.tracker.enabled:
        trainer.add_callback(TrackingCallback(ws.tracker, t))
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)

    adapter_dir = ws.scratch / f"adapter-out-{t}"
    shutil.rmtree(adapter_dir, ignore_errors=True)
    # TRL keeps a frozen copy of θ_(t-1) as adapter "ref"; only "default" (θ_t) is the result.
    trainer.model.save_pretrained(str(adapter_dir), selected_adapters=["default"])
    _normalise_adapter_config(adapter_dir / "adapter_config.json")
    history = trainer.state.log_history
    metrics = {**_summarise(history), "pairs": len(pairs), "resumed_from": remote[-1] if remote else None}
    # Replaces PEFT's template card (which names the base model's local folder). Only the integer
    # metrics: floats differ in the last bits across CPUs, and the card's bytes are digested.
    counts = {k: v for k, v in metrics.items() if isinstance(v, int) and not isinstance(v, bool)}
    (adapter_dir / "README.md").write_text(model_card(config, t, counts, pair_counts(pairs), None))
    stage.put_dir(adapter_dir, "adapter")
    stage.write_json("train_log.json", history)
    return metrics


def pair_counts(pairs: pd.DataFrame) -> dict[str, int]:
    """The model card's pair counts of the training pairs ``pairs`` (reference.parquet's train rows)."""
    counts = {"trained": len(pairs)}
    if "rejected_truncated" in pairs.columns:
        counts["truncated losers (cut off by max_new_tokens)"] = int(pairs.rejected_truncated.astype(bool).sum())
    if "opponent" in pairs.columns:
        counts.update({f"losers from {k}": int(v) for k, v in sorted(pairs.groupby("opponent").size().items())})
    return counts
