"""The workspace of one process: the device, a scratch folder, and what is loaded lazily once and
shared by the stages it runs (tokenizer, SFT data, downloaded adapters).

The run itself (config, storage, run.json, fork parent) is `alphaspin.runs.Run`; a workspace
holds nothing that must survive the process.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch

from alphaspin.config import AlphaSpinConfig

if TYPE_CHECKING:
    import datasets

    from alphaspin.stage_spec import Artifact
    from alphaspin.tracking import Tracker

logger = logging.getLogger(__name__)

Progress = Callable[[float, str], None]


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class Workspace:
    def __init__(self, config: AlphaSpinConfig, progress: Progress | None = None):
        self.config = config
        self.device = config.model.device or default_device()
        self.scratch = Path(tempfile.mkdtemp(prefix="alphaspin-"))
        # Progress (fraction done, message with "done/total"): to the terminal's console when one
        # is active, and to ``progress`` (the Prefect tasks turn it into progress artifacts).
        self._progress_hook = progress
        self._tokenizer: Any = None
        self._sft: pd.DataFrame | None = None
        self._adapters: dict[str, Path] = {}
        self._tracker: Tracker | None = None

    def progress(self, fraction: float, message: str) -> None:
        from alphaspin.console import current

        if self._progress_hook is not None:
            self._progress_hook(fraction, message)
        current().stage_progress(fraction, message)

    # -- the base model and data, loaded once ---------------------------------------------------
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

    def check_inputs(self) -> None:
        """Load the model path, tokenizer and data: a bad input fails here, before anything is written."""
        _ = self.model_path, self.tokenizer, self.sft

    @property
    def tracker(self) -> Tracker:
        """The run's experiment trackers in this process (`alphaspin.tracking`; no-ops when none is configured)."""
        if self._tracker is None:
            from alphaspin.tracking import Tracker

            self._tracker = Tracker(self.config)
        return self._tracker

    # -- adapters and policies ------------------------------------------------------------------
    def local_adapter(self, trained: Artifact, folder: str = "adapter") -> str:
        """A local folder holding the adapter of a finished stage (``adapter/`` of train, ``sampler/``
        of train_sampler), downloaded once."""
        key = f"{trained.digest}/{folder}"
        if key not in self._adapters:
            target = self.scratch / f"{folder}-{trained.iteration}-{trained.digest[:8]}"
            trained.dir.get_dir(folder, target)
            self._adapters[key] = target
        return str(self._adapters[key])

    def load_policy(self, adapter: Artifact | None, trainable: bool = False):
        """The base model with TRL's fused log-prob head, wrapped with ``adapter`` when given."""
        from peft import PeftModel

        from alphaspin.dpo import prepare_for_logps
        from alphaspin.models import load_base_model

        model = prepare_for_logps(load_base_model(self.config.model.name_or_path, self.config.model.dtype, self.device))
        if adapter is not None:
            model = PeftModel.from_pretrained(model, self.local_adapter(adapter), is_trainable=trainable)
        return model if trainable else model.eval()

    # -- TRL --------------------------------------------------------------------------------------
    def dpo_args(self, output_dir: str | None = None, **overrides: Any):
        """TRL's DPOConfig for this run (the one place it is assembled)."""
        from alphaspin.dpo import dpo_config

        output_dir = output_dir or str(self.scratch / "trl")
        return dpo_config(
            self.config.training, output_dir, self.config.run.seed, use_cpu=self.device == "cpu", **overrides
        )

    def tokenize_pairs(self, frame: pd.DataFrame) -> datasets.Dataset:
        """Pairs (id, prompt, chosen, rejected[, rejected_truncated]) tokenized exactly as the trainer
        tokenizes them (TRL's tokenization; cut-off losers ended as ``generation.truncated_losers`` says)."""
        from alphaspin.dpo import pairs_to_dataset, tokenize_like_trl

        dataset = pairs_to_dataset(frame, losers_as_prefixes=self.config.generation.losers_as_prefixes)
        return tokenize_like_trl(dataset, self.tokenizer, self.dpo_args())

    def close(self) -> None:
        if self._tracker is not None:
            self._tracker.close()
        shutil.rmtree(self.scratch, ignore_errors=True)

    def __enter__(self) -> Workspace:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
