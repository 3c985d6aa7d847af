"""``alphaspin export``: θ_t of a run as a folder that stands on its own.

Without ``merge`` the folder holds the PEFT adapter (adapter_config.json, adapter_model.safetensors),
loadable with ``PeftModel.from_pretrained(base, folder)`` or ``AutoPeftModelForCausalLM``; with
``merge`` the adapter merged into the base weights (PEFT ``merge_and_unload``), a plain transformers
folder for ``AutoModelForCausalLM.from_pretrained(folder)`` or vLLM. Both hold the tokenizer with the
run's chat template, a generation_config.json with the run's sampling settings, and the full model card
(with the evaluate stage's metrics when that stage is done).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from alphaspin.config import AlphaSpinConfig, ConfigError
from alphaspin.model_card import model_card
from alphaspin.runs import Run, stored_config
from alphaspin.stage_spec import Node

logger = logging.getLogger(__name__)

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {out}: exists and is not an empty folder (choose a new folder)")


def _generation_config(config: AlphaSpinConfig, model_path: str, tokenizer):
    from transformers import GenerationConfig

    try:
        generation = GenerationConfig.from_pretrained(model_path)
    except OSError:  # the base model has none
        generation = GenerationConfig()
    sampling = config.generation
    generation.do_sample = sampling.temperature > 0
    if generation.do_sample:
        generation.temperature, generation.top_p = sampling.temperature, sampling.top_p
    generation.pad_token_id = tokenizer.pad_token_id
    if generation.eos_token_id is None:
        generation.eos_token_id = tokenizer.eos_token_id
    return generation


def export_adapter(run_id: str, runs_root: str, iteration: int, out: str | Path, merge: bool = False) -> Path:
    """Write θ_``iteration`` of run ``run_id`` into the new (or empty) folder ``out``; returns ``out``."""
    from peft import PeftModel

    from alphaspin.models import load_base_model, load_tokenizer, resolve_model_path
    from alphaspin.training import pair_counts

    out = Path(out)
    config = stored_config(run_id, runs_root)
    if not 0 <= iteration <= config.method.iterations:
        raise ConfigError(f"--iteration {iteration}: the run has iterations 0..{config.method.iterations}")
    _check_out(out)
    run = Run(config)
    train_dir = run.dir(Node("train", iteration))
    train = train_dir.verify()
    if train is None:
        raise FileNotFoundError(
            f"--iteration {iteration}: iter-{iteration}/train of run {run_id} is not done (no valid manifest at "
            f"{train_dir.url}); run the iteration first"
        )
    evaluation = run.dir(Node("evaluate", iteration)).verify()
    reference = run.dir(Node("reference_logps", iteration)).verify()
    if reference is not None:
        frame = run.dir(Node("reference_logps", iteration)).read_table("reference.parquet")
        pairs = pair_counts(frame[frame.split == "train"].reset_index(drop=True))
    else:
        pairs = {"trained": train.metrics.get("pairs")}
    train_metrics = {k: v for k, v in train.metrics.items() if k != "resumed_from" and v is not None}

    model_path = resolve_model_path(config.model.name_or_path)
    tokenizer = load_tokenizer(config.model.name_or_path, config.model.chat_template)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        adapter = tmp / "adapter-download"
        train_dir.get_dir("adapter", adapter)
        folder = tmp / "export"
        folder.mkdir()
        if merge:
            base = load_base_model(config.model.name_or_path, config.model.dtype, "cpu")
            merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
            merged.save_pretrained(folder)
        else:
            for name in ADAPTER_FILES:
                shutil.copy2(adapter / name, folder / name)
            adapter_config = json.loads((folder / "adapter_config.json").read_text())
            # The folder the run resolved (loadable on this machine), or the hub id the user wrote.
            adapter_config["base_model_name_or_path"] = (
                config.model.name_or_path if model_path == config.model.name_or_path else model_path
            )
            (folder / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2, sort_keys=True) + "\n")
        tokenizer.save_pretrained(folder)
        _generation_config(config, model_path, tokenizer).save_pretrained(folder)
        card = model_card(
            config, iteration, train_metrics, pairs, evaluation.metrics if evaluation else None, merged=merge
        )
        (folder / "README.md").write_text(card)
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(folder, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("exported iter-%d of run %s to %s (%s)", iteration, run_id, out, "merged" if merge else "adapter")
    return out


def hub_token(repo_id: str) -> str:
    """HF_TOKEN, or a one-line error naming --push-to-hub."""
    token = os.environ.get("HF_TOKEN")
    if not token:
        raise ConfigError(f"--push-to-hub {repo_id}: set HF_TOKEN to a Hugging Face token with write access")
    return token


def push_to_hub(folder: str | Path, repo_id: str) -> str:
    """Upload ``folder`` to the model repo ``repo_id`` (created if missing); returns the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=hub_token(repo_id))
    api.create_repo(repo_id, repo_type="model", exist_ok=True)
    commit = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model")
    return str(getattr(commit, "commit_url", commit))
