"""The workspace of one process: the device, a scratch folder, and what is loaded lazily once and
shared by the stages it runs (tokenizer, SFT data, downloaded adapters).

The run itself (config, storage, run.json, fork parent) is `alphaspin.runs.Run`; a workspace
holds nothing that must survive the process.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch

from alphaspin.config import AlphaSpinConfig, ConfigError

if TYPE_CHECKING:
    import datasets

    from alphaspin.devices import Gpus
    from alphaspin.stage_spec import Artifact
    from alphaspin.tracking import Tracker

logger = logging.getLogger(__name__)

Progress = Callable[[float, str], None]


@dataclass(frozen=True)
class NvidiaGpus:
    """What ``nvidia-smi`` says about this node: its GPUs' names and the driver version (or why it failed)."""

    names: tuple[str, ...]
    driver: str | None
    error: str | None = None

    def describe(self) -> str:
        if self.error is not None:
            return f"nvidia-smi failed: {self.error}"
        return (
            f"nvidia-smi lists {len(self.names)} GPU(s) ({', '.join(dict.fromkeys(self.names))}), driver {self.driver}"
        )


@functools.cache
def nvidia_gpus() -> NvidiaGpus | None:
    """The GPUs and driver ``nvidia-smi`` reports, or None on a node without ``nvidia-smi``."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    query = [exe, "--query-gpu=name,driver_version", "--format=csv,noheader"]
    try:
        done = subprocess.run(query, capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as error:
        return NvidiaGpus((), None, str(error))
    if done.returncode != 0:
        said = (done.stdout + done.stderr).strip().splitlines()
        return NvidiaGpus((), None, said[-1] if said else f"exit code {done.returncode}")
    rows = [line.rsplit(",", 1) for line in done.stdout.splitlines() if "," in line]
    return NvidiaGpus(tuple(name.strip() for name, _ in rows), rows[0][1].strip() if rows else None)


def _torch_cuda_state() -> str:
    """torch's side of CUDA in one clause: its build, is_available(), and torch's own reason."""
    try:
        torch.cuda.init()
        reason = "no CUDA device"
    except Exception as error:  # torch's own words: "Torch not compiled with CUDA enabled", "driver too old", ...
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "CPU-only build, torch.version.cuda None"
    return f"torch {torch.__version__} ({build}), torch.cuda.is_available() False: {reason}"


def _gpus_hidden() -> bool:
    """The user hid every GPU from this process (CUDA_VISIBLE_DEVICES empty or -1): CPU on purpose."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return visible is not None and visible.strip() in ("", "-1")


def resolve_device(configured: str | None) -> str:
    """The torch device of ``model.device``: unset or ``auto`` is cuda when torch can use a GPU,
    else cpu. Refused in one line naming ``model.device`` (`ConfigError`), before anything runs:

    - ``cuda`` (or ``cuda:N``) where torch cannot use CUDA: the message names torch's build
      (``torch.version.cuda``), ``torch.cuda.is_available()`` with torch's reason, and the driver that
      ``nvidia-smi`` reports (or that there is none);
    - auto on a node whose ``nvidia-smi`` lists GPUs that torch cannot use (a CPU-only torch, a driver
      older than torch's CUDA build). This is an error, not a warning: falling back to the CPU there runs
      a GPU recipe on the CPU for days, or fails later in the vLLM engine, and a warning scrolls away in
      a stage's log; ``model.device: cpu`` (or ``CUDA_VISIBLE_DEVICES=""``) says CPU on purpose.
    """
    if configured in (None, "auto"):
        if torch.cuda.is_available():
            return "cuda"
        gpus = nvidia_gpus()
        if gpus is not None and gpus.names and not _gpus_hidden():
            raise ConfigError(
                f"model.device: unset (auto), but this node's GPUs are unusable: {gpus.describe()}, and "
                f"{_torch_cuda_state()}; install a torch CUDA build this driver supports (README: On your machine), "
                "or set model.device: cpu to run on the CPU anyway"
            )
        return "cpu"
    if configured.startswith("cuda"):
        if not torch.cuda.is_available():
            gpus = nvidia_gpus()
            driver = gpus.describe() if gpus is not None else "no nvidia-smi on this node (no NVIDIA driver)"
            raise ConfigError(
                f"model.device: {configured}, but torch cannot use CUDA here: {_torch_cuda_state()}; {driver}"
            )
        index = configured.partition(":")[2]
        if index and (not index.isdigit() or int(index) >= torch.cuda.device_count()):
            raise ConfigError(
                f"model.device: {configured}, but torch sees {torch.cuda.device_count()} GPU(s) (cuda:0.."
                f"cuda:{torch.cuda.device_count() - 1})"
            )
    return configured


def default_device() -> str:
    """The device when ``model.device`` is unset (`resolve_device`)."""
    return resolve_device(None)


class Workspace:
    def __init__(self, config: AlphaSpinConfig, progress: Progress | None = None, gpus: Gpus | None = None):
        """``gpus``: the stage's own GPUs when GPU stages run at once (`alphaspin.devices`): its torch work
        runs on the first (``cuda:<index>``), its children see only them; None: ``model.device``."""
        self.config = config
        self.gpus = gpus
        self.device = gpus.torch_device if gpus is not None else resolve_device(config.model.device)
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
        from alphaspin.generation import GLOBAL_RNG
        from alphaspin.models import load_base_model

        path = self.local_adapter(adapter) if adapter is not None else None
        with GLOBAL_RNG:  # loading draws from torch's global generator: not while another stage samples from it
            model = prepare_for_logps(
                load_base_model(self.config.model.name_or_path, self.config.model.dtype, self.device)
            )
            if path is not None:
                model = PeftModel.from_pretrained(model, path, is_trainable=trainable)
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
