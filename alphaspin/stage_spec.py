"""A stage declared once, as data — the model is Kedro's ``node(func, inputs, outputs, name)``.

A `StageSpec` says everything the rest of the system needs to know about a stage: its name, the
upstream stages it reads (`Input`), the config fields it reads (``reads``), its code version,
whether it needs a GPU, whether an interrupted attempt resumes, and its function. The iteration
DAG (`alphaspin.dag`), the cached runner (`alphaspin.runner`), the Prefect tasks and ``plan`` are
all derived from the specs in `alphaspin.stages`; adding a stage is one module plus one entry there.

A stage function has the signature ``function(job: Job, **inputs: Artifact | list[Artifact] | None)
-> dict`` (its metrics): it gets its upstream artifacts explicitly, as TRL's trainers get
``model, args, train_dataset``, and writes its files into ``job.out``. The runner writes the
manifest.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import pandas as pd

from alphaspin.config import AlphaSpinConfig
from alphaspin.storage import StageDir, StageRecord

if TYPE_CHECKING:
    from alphaspin.workspace import Workspace

InputAt = Literal["same", "previous", "member", "members", "history"]


@dataclass(frozen=True)
class Input:
    """One upstream artifact of a stage, bound to the stage function's keyword ``param``.

    ``at`` says which node of ``stage`` it is:
    - ``same``: the node of ``stage`` at this iteration;
    - ``previous``: the node at iteration t−1 (None at t = 0: π_θ(−1) = π_base);
    - ``member``: the node at the iteration of this node's opponent member (None for the base);
    - ``members``: the nodes of every opponent member at this iteration (a list);
    - ``history``: the nodes at every earlier iteration 0..t−1 (a list, empty at t = 0).

    A node of a stage that is absent at that iteration (its spec's ``when`` is false) is None to the
    stages that read it: an optional stage is an optional input, with no other mechanism.
    """

    param: str
    stage: str
    at: InputAt = "same"


@dataclass(frozen=True)
class StageSpec:
    name: str
    function: Callable[..., dict[str, Any]]
    inputs: tuple[Input, ...]
    # The config fields the stage reads at (config, iteration, member), as flat ``dotted.key: value``:
    # they enter its cache key, and ``plan`` names the ones that changed.
    reads: Callable[[AlphaSpinConfig, int, str | None], dict[str, Any]]
    version: int  # bump when the code changes what the stage writes: cached outputs then re-run
    gpu: bool  # runs on the accelerator: Prefect's `gpu` tag and retries
    description: str
    per_member: bool = False  # one node per opponent member (generate)
    resumable: bool = False  # an interrupted attempt keeps its partial work (shards, checkpoints)
    # Whether the stage runs at all at (config, iteration), e.g. a sampler that only one opponent
    # needs; inputs that point at a disabled stage are None.
    enabled: Callable[[AlphaSpinConfig, int], bool] = lambda config, iteration: True


@dataclass(frozen=True, order=True)
class Node:
    """One execution unit: a stage at an iteration (and, for per-member stages, a member)."""

    stage: str
    iteration: int
    member: str | None = None

    @property
    def folder(self) -> str:
        """The stage's folder under ``iter-<t>/``: ``generate-<member>`` or the stage name."""
        return f"{self.stage}-{self.member}" if self.member is not None else self.stage

    @property
    def label(self) -> str:
        return f"iter-{self.iteration}/{self.folder}"


@dataclass(frozen=True)
class Artifact:
    """A finished upstream stage as a stage function sees it: its record and its files."""

    record: StageRecord
    dir: StageDir

    @property
    def metrics(self) -> dict[str, Any]:
        return self.record.metrics

    @property
    def digest(self) -> str:
        return self.record.digest

    @property
    def iteration(self) -> int | None:
        return self.record.iteration

    def read_table(self, name: str) -> pd.DataFrame:
        return self.dir.read_table(name)

    def read_json(self, name: str) -> Any:
        return self.dir.read_json(name)

    def files(self, under: str = "") -> list[str]:
        """Names of the files the manifest lists (under ``under``), sorted."""
        manifest = self.dir.read_manifest() or {"files": {}}
        return sorted(name for name in manifest["files"] if name.startswith(under))


@dataclass
class Job:
    """What a stage function gets besides its inputs: where it writes, and the shared workspace."""

    node: Node
    config: AlphaSpinConfig
    out: StageDir  # the stage's own folder: write files here; the runner writes the manifest
    workspace: Workspace
    key: str  # the stage's cache key (names side files such as the base log-prob cache)

    @property
    def iteration(self) -> int:
        return self.node.iteration

    def shared(self, name: str) -> StageDir:
        """A run-level folder shared by iterations (e.g. ``cache/base-chosen-logps``)."""
        return self.out.storage.stage(None, name)


def pick(config: AlphaSpinConfig, *paths: str, exclude: tuple[str, ...] = ()) -> dict[str, Any]:
    """The config values at ``paths`` as flat ``dotted.key: value`` (sections are flattened)."""
    data = config.model_dump(mode="json")
    out: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if prefix in exclude:
            return
        if isinstance(value, Mapping):
            for key, child in value.items():
                walk(f"{prefix}.{key}", child)
        else:
            out[prefix] = value

    for path in paths:
        value: Any = data
        for part in path.split("."):
            value = value[part]
        walk(path, value)
    return out
