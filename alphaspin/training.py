"""The train stage's body: TRL DPO with LoRA (PEFT) against the stored geometric reference, with
checkpoints mirrored into run storage so a retried stage resumes where it stopped."""

from __future__ import annotations

import json
import logging
import posixpath
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from transformers import TrainerCallback

from alphaspin import preemption
from alphaspin.model_card import model_card, public_name
from alphaspin.stage_spec import Artifact, Job
from alphaspin.storage import SCRATCH, StageDir
from alphaspin.tracking import Tracker, check_tracking
from alphaspin.workspace import Progress, Workspace

logger = logging.getLogger(__name__)

CHECKPOINTS = f"{SCRATCH}/checkpoints"


class StorageCheckpointCallback(TrainerCallback):
    """After the Trainer saves ``checkpoint-N`` locally, upload it into the stage's scratch area
    and delete older remote checkpoints (uploaded first, deleted after: one always survives).

    With several processes (`alphaspin.distributed`) every rank calls it: rank 0 uploads the folder,
    a rank on another machine uploads its own ``rng_state_<rank>.pth`` (absent from rank 0's folder),
    and the completion marker is written only once every rank's files are stored."""

    def __init__(self, stage: StageDir, output_dir: Path, progress: Progress, total_steps: int):
        self.stage, self.output_dir, self.progress, self.total_steps = stage, output_dir, progress, total_steps

    def on_save(self, args, state, control, **kwargs):
        from accelerate import PartialState

        name = f"checkpoint-{state.global_step}"
        local = self.output_dir / name
        ranks = PartialState()  # the Trainer's process group; its barriers are no-ops in one process
        ranks.wait_for_everyone()  # every rank has written its files of checkpoint N
        if state.is_world_process_zero and local.is_dir():
            self.stage.put_dir(local, posixpath.join(CHECKPOINTS, name))
        elif args.process_index != args.local_process_index:  # a machine other than rank 0's
            rng = f"rng_state_{args.process_index}.pth"
            self.stage.write_bytes(posixpath.join(CHECKPOINTS, name, rng), (local / rng).read_bytes())
        ranks.wait_for_everyone()
        if state.is_world_process_zero and local.is_dir():
            self.stage.write_json(posixpath.join(CHECKPOINTS, name, "_COMPLETE.json"), {"step": state.global_step})
            for old in _remote_checkpoints(self.stage):
                if old != name:
                    self.stage.storage.remove(self.stage.file(posixpath.join(CHECKPOINTS, old)), recursive=True)
            logger.info("checkpoint %s stored in %s", name, self.stage.url)
        return control

    def on_step_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
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


class PreemptionCallback(TrainerCallback):
    """Stop at the end of the step during which a SIGTERM arrived (`alphaspin.preemption`): store a
    checkpoint (``control.should_save``: the Trainer's own save, uploaded by `StorageCheckpointCallback`)
    and end training (``should_training_stop``). With several ranks the request is all-reduced (max) at
    every step end, so every rank stops after the same step and joins the checkpoint's barriers, whichever
    rank the signal reached first."""

    def __init__(self) -> None:
        self.stopped_at: int | None = None

    def on_step_end(self, args, state, control, **kwargs):
        if self._agreed(args):
            control.should_save = True
            control.should_training_stop = True
            if self.stopped_at is None:
                logger.warning("preempted by SIGTERM: storing checkpoint-%d and stopping", state.global_step)
            self.stopped_at = state.global_step
        return control

    @staticmethod
    def _agreed(args) -> bool:
        import torch
        import torch.distributed as dist

        wanted = preemption.requested()
        if args.world_size <= 1 or not dist.is_available() or not dist.is_initialized():
            return wanted
        flag = torch.tensor([1.0 if wanted else 0.0], device=args.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)


def _remote_checkpoints(stage: StageDir) -> list[str]:
    """Names of checkpoints fully uploaded (their _COMPLETE.json marker exists), oldest first."""
    names = {n.split("/")[2] for n in stage.list_files(CHECKPOINTS) if n.endswith("/_COMPLETE.json")}
    return sorted(names, key=lambda n: int(n.rsplit("-", 1)[-1]))


def _normalise_adapter_config(path: Path, base_model: str) -> None:
    """PEFT serialises ``target_modules`` from a set, in an order that changes with Python's hash
    seed; sort it so the same training writes the same bytes in every process (stable digests). PEFT
    names the base model by the folder it was loaded from, a path of this machine: name it as the
    model card does instead (``base_model``: model.name_or_path; `alphaspin.model_card.public_name`)."""
    config = json.loads(path.read_text())
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
    config["base_model_name_or_path"] = public_name(base_model)
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


@dataclass
class Fitted:
    """What training left on the local disk of rank 0: the adapter folder, TRL's log, the resumed checkpoint."""

    adapter_dir: Path
    history: list[dict[str, Any]]
    resumed_from: str | None


def run_training(
    job: Job,
    pairs: pd.DataFrame,
    previous: Artifact | None,
    launch: Callable[[Job, pd.DataFrame, Artifact | None], Fitted] | None = None,
) -> dict:
    """Train θ_t from θ_(t-1) (a fresh LoRA at t = 0) on ``pairs`` (with their reference columns),
    resuming from the last checkpoint stored in ``job.out``; the adapter goes to ``job.out/adapter``.

    Without ``launch`` (``training.num_processes: 1``) `fit` trains in this process; the train stage
    passes `alphaspin.distributed.run_distributed` for several processes, which runs `fit` in every rank
    of a child ``accelerate launch``, and this process stores what rank 0 wrote."""
    t, stage, ws, config = job.iteration, job.out, job.workspace, job.config
    if pairs.empty:
        raise ValueError(f"iter-{t}/train: no training pairs (all dropped by training.max_length?)")
    if ws.tracker.enabled:  # a worker without the tracking extra, or cut off from the server: fail before training
        check_tracking(config)
    if launch is not None:
        fitted = launch(job, pairs, previous)
    else:
        fitted = fit(
            ws,
            stage,
            pairs,
            ws.local_adapter(previous) if previous is not None else None,
            t,
            ws.scratch / f"train-{t}",
            ws.scratch / f"adapter-out-{t}",
        )
    adapter_dir, history = fitted.adapter_dir, fitted.history
    _normalise_adapter_config(adapter_dir / "adapter_config.json", config.model.name_or_path)
    metrics = {**_summarise(history), "pairs": len(pairs), "resumed_from": fitted.resumed_from}
    # Replaces PEFT's template card (which names the base model's local folder). Only the integer
    # metrics: floats differ in the last bits across CPUs, and the card's bytes are digested.
    counts = {k: v for k, v in metrics.items() if isinstance(v, int) and not isinstance(v, bool)}
    (adapter_dir / "README.md").write_text(model_card(config, t, counts, pair_counts(pairs), None))
    stage.put_dir(adapter_dir, "adapter")
    stage.write_json("train_log.json", history)
    return metrics


def fit(
    ws: Workspace,
    stage: StageDir,
    pairs: pd.DataFrame,
    previous_adapter: str | None,
    iteration: int,
    output_dir: Path,
    adapter_dir: Path,
    **dpo_overrides: Any,
) -> Fitted:
    """TRL DPO with LoRA in this process, as one rank of the job when launched by `alphaspin.distributed`
    (``output_dir`` is then shared by the ranks of one machine). Resumes from the newest checkpoint stored in
    ``stage``; rank 0 saves θ_t into ``adapter_dir``."""
    from peft import LoraConfig, PeftModel

    from alphaspin.dpo import REFERENCE_COLUMNS, GeometricReferenceDPOTrainer, pairs_to_dataset, slic_settings
    from alphaspin.models import load_base_model

    config = ws.config
    args = ws.dpo_args(output_dir=str(output_dir), **dpo_overrides)
    remote = _remote_checkpoints(stage)
    resume_from = output_dir / remote[-1] if remote else None
    with args.main_process_first(local=True, desc="checkpoint download"):  # one download per machine
        if args.local_process_index == 0:
            shutil.rmtree(output_dir, ignore_errors=True)
            if resume_from is not None:
                stage.get_dir(posixpath.join(CHECKPOINTS, remote[-1]), resume_from)
                logger.info("iter-%d/train: resuming from %s", iteration, remote[-1])

    base = load_base_model(config.model.name_or_path, config.model.dtype, ws.device)
    lora = config.training.lora
    peft_config = None
    if previous_adapter is None:
        peft_config = LoraConfig(
            r=lora.r,
            lora_alpha=lora.lora_alpha,
            lora_dropout=lora.lora_dropout,
            target_modules=list(lora.target_modules),
            task_type="CAUSAL_LM",
        )
        model = base
    else:  # θ_t starts from θ_(t-1)
        model = PeftModel.from_pretrained(base, previous_adapter, is_trainable=True)
        # The stored adapter names its base as the card does (`_normalise_adapter_config`); while
        # training, PEFT's save checks the folder the base was loaded from (a name would ask the hub).
        model.peft_config["default"].base_model_name_or_path = base.name_or_path
    # The trainer tokenizes it with `alphaspin.dpo.prepare_like_trl`, as the reference stage did.
    dataset = pairs_to_dataset(pairs, REFERENCE_COLUMNS, losers_as_prefixes=config.generation.losers_as_prefixes)
    trainer = GeometricReferenceDPOTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=ws.tokenizer,
        peft_config=peft_config,
        **slic_settings(config.training),
    )
    total = trainer.get_train_dataloader().__len__()  # per process: the loader is sharded over the ranks
    total_steps = max(
        1, int(round(total * config.training.num_train_epochs / config.training.gradient_accumulation_steps))
    )
    trainer.add_callback(StorageCheckpointCallback(stage, output_dir, ws.progress, total_steps))
    if trainer.is_world_process_zero() and ws.tracker.enabled:
        trainer.add_callback(TrackingCallback(ws.tracker, iteration))
    preempt = PreemptionCallback()
    trainer.add_callback(preempt)
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    if preempt.stopped_at is not None:  # the checkpoint of that step is stored: the rerun resumes there
        raise preemption.Preempted(
            f"iter-{iteration}/train: preempted by SIGTERM at step {preempt.stopped_at}/{total_steps}; "
            f"checkpoint-{preempt.stopped_at} is stored in {stage.url}: {preemption.RESUME_HINT}"
        )

    if trainer.is_world_process_zero():
        shutil.rmtree(adapter_dir, ignore_errors=True)
        # TRL keeps a frozen copy of θ_(t-1) as adapter "ref"; only "default" (θ_t) is the result.
        trainer.model.save_pretrained(str(adapter_dir), selected_adapters=["default"])
    return Fitted(adapter_dir, trainer.state.log_history, remote[-1] if remote else None)


def pair_counts(pairs: pd.DataFrame) -> dict[str, int]:
    """The model card's pair counts of the training pairs ``pairs`` (reference.parquet's train rows)."""
    counts = {"trained": len(pairs)}
    if "rejected_truncated" in pairs.columns:
        counts["truncated losers (cut off by max_new_tokens)"] = int(pairs.rejected_truncated.astype(bool).sum())
    if "opponent" in pairs.columns:
        counts.update({f"losers from {k}": int(v) for k, v in sorted(pairs.groupby("opponent").size().items())})
    return counts
