"""A run in storage: its config, ``run.json``, its fork parent, and the records of its stages.

``<runs_root>/<run_id>/run.json`` binds a run id to the result knobs of one config: running the id
with other result knobs is refused (it would mix two configurations' artifacts), while operational
knobs (how a stage executes: batch sizes of no-grad passes, engine memory, device, addresses) and
orchestration knobs may change between attempts (`alphaspin.config.knob_kind`). run.json's config
holds the operational values of the latest attempt (each change is logged in its ``changes``), so
what reads the config back from it (a split orchestration's child runs, ``alphaspin rerun``) executes
with them; each stage's manifest records the values it ran with. A fork (``--fork-from``) records its
parent, whose identical stages the runner adopts.
"""

from __future__ import annotations

import copy
import importlib.metadata
import platform
import time
from typing import Any

from alphaspin.config import AlphaSpinConfig, ConfigError, config_from_dict, dump_config, flat_config, knob_kind
from alphaspin.sharing import donor_run_ids
from alphaspin.stage_spec import Node
from alphaspin.storage import RunStorage, StageDir, StageRecord

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


class Run:
    """One run's storage and identity. ``parent`` is the run it was forked from (or None)."""

    def __init__(self, config: AlphaSpinConfig, fork_from: str | None = None):
        self.config = config
        self.storage = RunStorage(config.run.runs_root, config.run.run_id)
        self.parent: RunStorage | None = None
        self._donors: list[RunStorage] | None = None
        recorded = self.record()
        self._set_parent(recorded.get("forked_from") if recorded else fork_from)

    @property
    def run_json(self) -> str:
        return self.storage.path("run.json")

    def record(self) -> dict[str, Any] | None:
        """The stored run.json, or None before the run is created."""
        return self.storage.read_json(self.run_json) if self.storage.exists(self.run_json) else None

    def _set_parent(self, fork_from: str | None) -> None:
        if fork_from is not None and fork_from != self.config.run.run_id:
            self.parent = RunStorage(self.config.run.runs_root, fork_from)
            self._donors = None

    def ensure(self, fork_from: str | None = None, device: str | None = None) -> dict[str, Any]:
        """Create run.json, or check that the existing run has the same result knobs.

        Operational and orchestration knobs (the run's location included) may differ: changed
        operational values are written into run.json's config (and logged in ``changes``), and the
        stages that run now record them; a changed result knob is a conflict.
        The caller checks the model and data first (`Workspace.check_inputs`): a bad input
        leaves no run behind.
        """
        resolved = dump_config(self.config)
        comparable = _comparable(resolved)
        existing = self.record()
        if existing is not None:
            stored = _upgraded(existing.get("config", {}), self.run_json)
            before = _comparable(stored)
            if before != comparable:
                changed = sorted(key for key in set(before) | set(comparable) if before.get(key) != comparable.get(key))
                raise RunConflictError(
                    f"run {self.storage.url} exists with a different config (changed: {', '.join(changed)}). "
                    f"Choose a new run.run_id, or fork it: alphaspin run ... --set run.run_id=NEW --fork-from "
                    f"{self.config.run.run_id} (the new run reuses every stage whose inputs are unchanged)."
                )
            self._set_parent(existing.get("forked_from"))
            return self._update_operational(existing, stored, resolved)
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
            "device": device,
            "forked_from": fork_from,
        }
        self.storage.write_json(self.run_json, record)
        return record

    def _update_operational(
        self, existing: dict[str, Any], stored: dict[str, Any], resolved: dict[str, Any]
    ) -> dict[str, Any]:
        """run.json with this attempt's operational values (rewritten only when one changed)."""
        old, new = flat_config(stored), flat_config(resolved)
        changed = {
            key: [old.get(key), value]
            for key, value in new.items()
            if knob_kind(key) == "operational" and old.get(key) != value
        }
        if not changed:
            return existing
        config = _set_flat(stored, {key: value for key, (_, value) in changed.items()})
        entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "changed": changed}
        record = {**existing, "config": config, "changes": [*existing.get("changes", []), entry]}
        self.storage.write_json(self.run_json, record)
        return record

    # -- stage folders and records ----------------------------------------------------------------
    def dir(self, node: Node) -> StageDir:
        return self.storage.stage(node.iteration, node.folder)

    def parent_dir(self, node: Node) -> StageDir | None:
        return self.parent.stage(node.iteration, node.folder) if self.parent is not None else None

    def donors(self) -> list[RunStorage]:
        """Runs whose stages under the same cache key this run adopts: its fork parent, then the
        other cells of its seed when it is a cell of a grid (`alphaspin.sharing`)."""
        if self._donors is None:
            found = [self.parent] if self.parent is not None else []
            grid, root = self.config.orchestration.grid, self.config.run.runs_root
            if grid is not None:
                found += [RunStorage(root, run_id) for run_id in donor_run_ids(root, grid, self.config.run.run_id)]
            self._donors = found
        return self._donors

    def stored_record(self, node: Node) -> StageRecord:
        """The verified record of a finished stage, for running a later stage on its own."""
        record = self.dir(node).verify()
        if record is None:
            raise FileNotFoundError(
                f"{node.label} of run {self.config.run.run_id} is not done (no valid manifest at "
                f"{self.dir(node).url}); run the iteration first"
            )
        return record


def stored_config(run_id: str, runs_root: str) -> AlphaSpinConfig:
    """The config recorded in ``<runs_root>/<run_id>/run.json``, located at ``runs_root`` (where it was
    found, which may differ from where it was created: a relative path, a mount)."""
    storage = RunStorage(runs_root, run_id)
    path = storage.path("run.json")
    if not storage.exists(path):
        raise ConfigError(f"--run-id {run_id}: no run at {storage.url} (no run.json)")
    config = config_from_dict(storage.read_json(path)["config"], f"{storage.url}/run.json")
    config.run.runs_root = runs_root
    return config


def _upgraded(config: dict[str, Any], where: str) -> dict[str, Any]:
    """A stored config as this version reads it: knobs added since it was written take their
    defaults (which keep the old behaviour), so upgrading alphaspin does not orphan existing runs."""
    try:
        return dump_config(config_from_dict(config, where))
    except ConfigError:  # a knob since removed or renamed: compare as stored, the diff names it
        return config


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    """The result knobs of a dumped config, flat: what a run id is bound to. How the run is executed
    (operational knobs), orchestrated and tracked may change between invocations."""
    return {key: value for key, value in flat_config(config).items() if knob_kind(key) == "result"}


def _set_flat(config: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """A copy of a dumped config with ``{"section.knob": value}`` set."""
    out = copy.deepcopy(config)
    for key, value in values.items():
        *sections, name = key.split(".")
        node = out
        for section in sections:
            node = node.setdefault(section, {})
        node[name] = value
    return out
