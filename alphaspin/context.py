"""What every stage needs: the config, the run's storage, the device, lazily loaded shared
objects, and the cache key of each stage.

Cache key of a stage = hash(stage name, stage code version, the config fields it reads, the
digests of its input manifests). A changed knob therefore re-runs exactly the stages that read it
and those downstream (their inputs' digests change).
"""

from __future__ import annotations

import importlib.metadata
import logging
import platform
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from alphaspin.config import AlphaSpinConfig, dump_config
from alphaspin.storage import SCRATCH, RunStorage, StageDir, StageRecord, cache_key

logger = logging.getLogger(__name__)

# Bump a stage's version when its code changes what it writes: cached outputs then re-run.
STAGE_VERSIONS = {
    "sample_prompts": 1,
    "generate": 1,
    "build_pairs": 1,
    "reference_logps": 1,
    "train": 1,
    "evaluate": 1,
}
PACKAGES = (
    "alphaspin",
    "torch",
    "transformers",
    "peft",
    "trl",
    "datasets",
    "lm_eval",
    "prefect",
    "vllm",
    "fsspec",
    "s3fs",
)


class RunConflictError(RuntimeError):
    """A run id already holds a run with another config."""


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def stage_fields(config: AlphaSpinConfig, stage: str, iteration: int, member: str | None = None) -> dict[str, Any]:
    """The config fields a stage reads (and so its cache key depends on)."""
    c = config
    model = {"name_or_path": c.model.name_or_path, "dtype": c.model.dtype, "chat_template": c.model.chat_template}
    if stage == "sample_prompts":
        return {"data": c.data.model_dump(mode="json"), "seed": c.run.seed, "iteration": iteration,
                "history": c.method.history, "pairs": c.method.pairs_at(iteration)}  # fmt: skip
    if stage == "generate":
        generation = c.generation.model_dump(mode="json", exclude={"shard_size", "gpu_memory_utilization"})
        return {"model": model, "generation": generation, "member": member, "seed": c.run.seed, "iteration": iteration}
    if stage == "build_pairs":
        return {"iteration": iteration}
    if stage == "reference_logps":
        t = c.training
        return {"model": model, "alpha": c.method.alpha, "max_length": t.max_length,
                "normalized_reference": t.normalized_reference,
                "partition_samples": t.partition_samples if t.normalized_reference else None,
                "generation": c.generation.model_dump(mode="json") if t.normalized_reference else None}  # fmt: skip
    if stage == "train":
        training = c.training.model_dump(mode="json", exclude={"reference_batch_size", "save_steps"})
        return {"model": model, "training": training, "seed": c.run.seed, "iteration": iteration}
    if stage == "evaluate":
        return {"model": model, "evaluation": c.evaluation.model_dump(mode="json"), "beta": c.training.beta,
                "max_length": c.training.max_length}  # fmt: skip
    raise ValueError(f"unknown stage {stage!r}")


def stage_key(config: AlphaSpinConfig, stage: str, iteration: int, inputs: list[StageRecord | None],
              member: str | None = None) -> str:  # fmt: skip
    digests = [record.digest if record is not None else "none" for record in inputs]
    return cache_key(stage, STAGE_VERSIONS[stage], stage_fields(config, stage, iteration, member), digests)


def stage_dir_name(stage: str, member: str | None = None) -> str:
    return f"generate-{member}" if stage == "generate" else stage


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class Context:
    config: AlphaSpinConfig
    storage: RunStorage
    device: str
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="alphaspin-")))
    _tokenizer: Any = None
    _sft: pd.DataFrame | None = None
    _adapters: dict[str, Path] = field(default_factory=dict)
    parent: RunStorage | None = None  # the run this one was forked from, whose identical stages it adopts
    # Progress hook (fraction done, message): Prefect tasks turn it into progress artifacts.
    progress: Callable[[float, str], None] = field(default=lambda fraction, message: None)

    @classmethod
    def create(cls, config: AlphaSpinConfig) -> Context:
        storage = RunStorage(config.run.runs_root, config.run.run_id)
        return cls(config=config, storage=storage, device=config.model.device or default_device())

    @property
    def model_path(self) -> str:
        from alphaspin.models import resolve_model_path

        return resolve_model_path(self.config.model.name_or_path)

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from alphaspin.models import load_tokenizer

            self._tokenizer = load_tokenizer(self.config.model.name_or_path, self.config.model.chat_template)
        return self._tokenizer

    @property
    def sft(self) -> pd.DataFrame:
        if self._sft is None:
            from alphaspin.data import load_sft

            self._sft = load_sft(self.config.data)
        return self._sft

    @property
    def dtype(self) -> torch.dtype:
        from alphaspin.models import torch_dtype

        return torch_dtype(self.config.model.dtype)

    def stage(self, stage: str, iteration: int, member: str | None = None) -> StageDir:
        return self.storage.stage(iteration, stage_dir_name(stage, member))

    def local_adapter(self, train_record: StageRecord) -> str:
        """A local folder holding the adapter of a finished train stage (downloaded once)."""
        if train_record.digest not in self._adapters:
            stage = self.stage("train", train_record.iteration)
            target = self.workdir / f"adapter-{train_record.iteration}-{train_record.digest[:8]}"
            stage.get_dir("adapter", target)
            self._adapters[train_record.digest] = target
        return str(self._adapters[train_record.digest])

    def close(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)

    def _set_parent(self, fork_from: str | None) -> None:
        if fork_from is not None and fork_from != self.config.run.run_id:
            self.parent = RunStorage(self.config.run.runs_root, fork_from)

    # -- run.json -----------------------------------------------------------------------------
    def ensure_run(self, fork_from: str | None = None) -> dict[str, Any]:
        """Create run.json, or check that the existing run has the same config.

        Orchestration knobs and the run's location may differ; anything else is a conflict that
        would mix two configurations' artifacts under one run id.
        """
        path = self.storage.path("run.json")
        resolved = dump_config(self.config)
        comparable = _comparable(resolved)
        if self.storage.exists(path):
            existing = self.storage.read_json(path)
            before = _comparable(existing.get("config", {}))
            if before != comparable:
                changed = sorted(_diff(before, comparable))
                raise RunConflictError(
                    f"run {self.storage.url} exists with a different config (changed: {', '.join(changed)}). "
                    f"Choose a new run.run_id, or fork it: alphaspin run ... --set run.run_id=NEW --fork-from "
                    f"{self.config.run.run_id} (the new run reuses every stage whose inputs are unchanged)."
                )
            self._set_parent(existing.get("forked_from"))
            return existing
        # Check the model and the data before writing anything: a bad input leaves no run behind.
        _ = self.model_path, self.tokenizer, self.sft
        if fork_from is not None:
            parent = RunStorage(self.config.run.runs_root, fork_from)
            if not parent.exists(parent.path("run.json")):
                raise RunConflictError(f"--fork-from {fork_from}: no run at {parent.url}")
        self._set_parent(fork_from)
        record = {
            "run_id": self.config.run.run_id,
            "config": resolved,
            "versions": package_versions(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "device": self.device,
            "forked_from": fork_from,
        }
        self.storage.write_json(path, record)
        return record


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    trimmed = {k: v for k, v in config.items() if k != "orchestration"}
    run = dict(trimmed.get("run", {}))
    run.pop("runs_root", None)
    trimmed["run"] = run
    return trimmed


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in set(a) | set(b):
            out.extend(_diff(a.get(key), b.get(key), f"{prefix}{key}."))
        return out
    return [prefix.rstrip(".")] if a != b else []


def begin_stage(stage: StageDir, key: str, fresh: bool) -> None:
    """Prepare a stage folder to (re)run under ``key``.

    Partial work of an interrupted attempt with the same key is kept (generation shards, training
    checkpoints), so the stage resumes. A forced rerun, a changed key, or a manifest that exists
    but failed verification (a corrupted artifact) starts from an empty folder.
    """
    marker = f"{SCRATCH}/started.json"
    started = None
    try:
        started = stage.read_json(marker)
    except (FileNotFoundError, ValueError):
        started = None
    has_manifest = stage.read_manifest() is not None
    if fresh or has_manifest or not started or started.get("cache_key") != key:
        stage.reset(keep_scratch=False)
        stage.clear_scratch()
        stage.write_json(marker, {"cache_key": key, "started": time.time()})
    else:
        logger.info("%s: resuming an interrupted attempt", stage.url)
