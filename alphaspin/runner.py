"""The one cached runner: every stage of every iteration runs through `Runner`.

``prepare`` computes a node's cache key once (stage name, code version, the result knobs it
reads, its input digests), verifies its manifest once, and decides: ``cached`` (a valid manifest
under that key), ``adopt`` (the fork parent holds it under that key) or ``run`` — with the reason.
``execute`` then holds the stage's lease in run storage (a second process on the same run waits
instead of running it twice), adopts or runs the stage function, and commits the manifest with
the key's provenance and the operational knobs the stage ran with (`alphaspin.config.knob_kind`:
those never enter a key, so changing one between attempts keeps every finished stage). The Prefect
tasks call ``execute`` with what the flow ``prepare``d, and
``plan`` is ``prepare`` over the whole DAG without executing anything.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Literal

from alphaspin import console
from alphaspin.config import AlphaSpinConfig, knob_kind, operational_values
from alphaspin.dag import (
    InputRef,
    bind_inputs,
    disabled_inputs,
    iteration_nodes,
    node_inputs,
    trained_nodes,
    walk_iteration,
)
from alphaspin.leases import StageLease
from alphaspin.runs import Run
from alphaspin.sharing import key_lease
from alphaspin.stage_spec import Artifact, Job, Node
from alphaspin.stages import REGISTRY
from alphaspin.storage import SCRATCH, StageDir, StageRecord, StorageError, cache_key
from alphaspin.workspace import Workspace

logger = logging.getLogger(__name__)

Status = Literal["cached", "adopt", "run"]
Inputs = dict[str, StageRecord | list[StageRecord] | None]
STARTED = f"{SCRATCH}/started.json"


@dataclass(frozen=True)
class Prepared:
    """A node ready to execute: its key, what the runner will do, and why (small, picklable)."""

    node: Node
    key: str
    status: Status
    reason: str
    inputs: Inputs
    provenance: dict[str, Any] = field(default_factory=dict)
    record: StageRecord | None = None  # cached: the stage's record; adopt: the donor's
    force: bool = False
    source: str | None = None  # adopt: the run id of the donor (fork parent, or a sibling cell of a grid)


def _flat_digests(inputs: Inputs) -> dict[str, str | list[str] | None]:
    out: dict[str, str | list[str] | None] = {}
    for param, value in inputs.items():
        if value is None:
            out[param] = None
        elif isinstance(value, list):
            out[param] = [r.digest for r in sorted(value, key=lambda r: r.url)]
        else:
            out[param] = value.digest
    return out


def key_fields(node: Node, config: AlphaSpinConfig) -> dict[str, Any]:
    """The fields of a node's cache key: what its stage reads (``reads``), less the operational knobs
    (how it executes, not what it computes: `alphaspin.config.OPERATIONAL_KNOBS`)."""
    fields = REGISTRY[node.stage].reads(config, node.iteration, node.member)
    return {key: value for key, value in fields.items() if knob_kind(key) != "operational"}


def same_result(
    node: Node, manifest: dict[str, Any], fields: dict[str, Any], digests: dict, absent: set[str] = frozenset()
) -> bool:
    """Whether a manifest committed under another key holds what ``fields`` and ``digests`` would
    compute now: its key was computed (by an older alphaspin) with operational knobs among its fields,
    and its recorded provenance differs from now only in those. The recorded fields must give the
    manifest's own key back, so a provenance that does not describe its key never matches."""
    before = manifest.get("provenance") or {}
    if before.get("version") != REGISTRY[node.stage].version or before.get("inputs") != digests:
        return False
    old = before.get("fields")
    if not isinstance(old, dict) or _results_only(old) != fields:
        return False
    return node_key(node, old, digests, absent) == manifest.get("cache_key")


def _results_only(fields: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in fields.items() if knob_kind(key) != "operational"}


def node_key(
    node: Node, fields: dict[str, Any], digests: dict[str, str | list[str] | None], absent: set[str] = frozenset()
) -> str:
    """The cache key; ``absent``: inputs pointing at a stage disabled in this configuration, left out."""
    spec = REGISTRY[node.stage]
    identity = {"iteration": node.iteration, "member": node.member, "fields": fields}
    flat: list[str] = []
    for item in spec.inputs:
        if item.param in absent:
            continue
        value = digests[item.param]
        flat.extend(value if isinstance(value, list) else ["none" if value is None else value])
    return cache_key(spec.name, spec.version, identity, flat)


def begin_stage(stage: StageDir, key: str, fresh: bool) -> None:
    """Prepare a stage folder to (re)run under ``key``.

    Partial work of an interrupted attempt with the same key is kept (generation shards, training
    checkpoints), so the stage resumes. A forced rerun, a changed key, or a manifest that exists
    but failed verification (a corrupted artifact) starts from an empty folder.
    """
    try:
        started = stage.read_json(STARTED)
    except (FileNotFoundError, ValueError):
        started = None
    has_manifest = stage.read_manifest() is not None
    if fresh or has_manifest or not started or started.get("cache_key") != key:
        stage.reset(keep_scratch=False)
        stage.clear_scratch()
        stage.write_json(STARTED, {"cache_key": key, "started": time.time()})
    else:
        logger.info("%s: resuming an interrupted attempt", stage.url)


class Runner:
    """Runs the nodes of one run. ``workspace`` is needed only to execute (not to prepare or plan)."""

    def __init__(self, run: Run, workspace: Workspace | None = None):
        self.run = run
        self.workspace = workspace

    @property
    def config(self) -> AlphaSpinConfig:
        return self.run.config

    def ensure_run(self, fork_from: str | None = None) -> dict[str, Any]:
        """run.json: created (after the model and data load: a bad input leaves nothing behind) or checked."""
        if self.run.record() is None and self.workspace is not None:
            self.workspace.check_inputs()
        device = self.workspace.device if self.workspace is not None else None
        return self.run.ensure(fork_from, device=device)

    # -- prepare ----------------------------------------------------------------------------------
    def prepare(self, node: Node, inputs: Inputs, force: bool = False) -> Prepared:
        spec = REGISTRY[node.stage]
        refs = node_inputs(self.config, node)
        missing = [param for param, ref in refs.items() if ref is not None and inputs.get(param) is None]
        if missing:
            raise ValueError(f"{node.label}: inputs {missing} are missing (upstream records of {refs})")
        inputs = {param: inputs.get(param) if ref is not None else None for param, ref in refs.items()}
        fields = key_fields(node, self.config)
        digests = _flat_digests(inputs)
        absent = disabled_inputs(self.config, node)
        key = node_key(node, fields, digests, absent)
        provenance = {
            "version": spec.version,
            "fields": fields,
            "inputs": digests,
            "operational": operational_values(self.config, node.stage),
        }
        prepared = dict(node=node, key=key, inputs=inputs, provenance=provenance, force=force)
        if force:
            return Prepared(status="run", reason="forced", **prepared)
        out = self.run.dir(node)
        manifest = out.read_manifest()
        if manifest is not None and self._holds(node, manifest, key, fields, digests, absent):
            record = out.verify(manifest["cache_key"], manifest=manifest)
            if record is not None:
                return Prepared(status="cached", reason="cached", record=record, **prepared)
        found = None  # the fork parent's manifest: a fork's new stage says what differs from it
        for donor in self.run.donors():
            source = donor.stage(node.iteration, node.folder)
            theirs = source.read_manifest()
            if donor is self.run.parent:
                found = theirs
            if theirs is not None and self._holds(node, theirs, key, fields, digests, absent):
                reason = f"adopted from {donor.run_id}"
                return Prepared(
                    status="adopt", reason=reason, record=source.record(theirs), source=donor.run_id, **prepared
                )
        return Prepared(status="run", reason=self._why(node, out, manifest, found, provenance, key), **prepared)

    @staticmethod
    def _holds(node: Node, manifest: dict, key: str, fields: dict, digests: dict, absent: set[str]) -> bool:
        """Whether a manifest holds the node as computed now: under ``key``, or under the key an older
        alphaspin computed with operational knobs in it (`same_result`)."""
        return manifest.get("cache_key") == key or same_result(node, manifest, fields, digests, absent)

    def _why(
        self, node: Node, out: StageDir, manifest: dict | None, parent: dict | None, provenance: dict, key: str
    ) -> str:
        """Why a node must run: never run, interrupted, corrupted, or which knob/input/version changed
        (against its own last manifest, or for a fork's new stage, against the parent's)."""
        if manifest is None:
            try:
                started = out.read_json(STARTED)
            except (FileNotFoundError, ValueError, StorageError):  # unreadable: the stage itself will say
                started = None
            if started is not None:
                resumes = started.get("cache_key") == key and REGISTRY[node.stage].resumable
                return "an interrupted attempt resumes" if resumes else "an interrupted attempt starts again"
            if parent is None:
                return "not run yet"
            changes = self._changes(parent, provenance)
            return f"differs from the fork parent's: {changes}" if changes else "differs from the fork parent's"
        if self._holds(
            node, manifest, key, provenance["fields"], provenance["inputs"], disabled_inputs(self.config, node)
        ):
            return "its artifacts fail verification (a file is missing or changed)"
        return self._changes(manifest, provenance) or "its cache key changed"

    @staticmethod
    def _changes(manifest: dict, provenance: dict) -> str:
        """What differs between the provenance a manifest recorded and ``provenance`` now."""
        before = manifest.get("provenance")
        if not before:
            return ""
        reasons = _knob_changes(before, provenance["version"], provenance["fields"])
        for param, digest in provenance["inputs"].items():
            if before.get("inputs", {}).get(param) != digest:
                reasons.append(f"input {param} was re-executed")
        return "; ".join(reasons)

    # -- execute ----------------------------------------------------------------------------------
    def execute(self, prepared: Prepared) -> StageRecord:
        node = prepared.node
        if prepared.status == "cached" and prepared.record is not None:
            logger.info("%s: cached", node.label)
            console.current().stage_reused(node.label, "cached")
            return prepared.record
        try:
            record, how = self._execute(prepared)
        except BaseException as error:
            console.current().stage_failed(node.label, error)
            raise
        if how == "ran":
            console.current().stage_finished(node.label, record.metrics)
        else:
            console.current().stage_reused(node.label, how)
        return record

    def _execute(self, prepared: Prepared) -> tuple[StageRecord, str]:
        """Adopt or run a node under its lease; says which (``ran``, ``adopted``, ``done elsewhere``)."""
        node, key = prepared.node, prepared.key
        spec = REGISTRY[node.stage]
        out = self.run.dir(node)
        settings = self.config.orchestration
        lease = StageLease(
            self.run.storage,
            f"iter-{node.iteration}-{node.folder}",
            label=node.label,
            ttl=settings.lease_seconds,
            wait=settings.wait_for_running_stage,
        )
        with self._key_lease(prepared), lease:
            if lease.waited and not prepared.force:  # the holder may have done it meanwhile
                record = out.verify(key)
                if record is not None:
                    logger.info("%s: done by another process meanwhile", node.label)
                    return record, "done elsewhere"
            if not prepared.force:  # a donor may hold it (or, in a grid, have computed it meanwhile)
                record = self._adopt(prepared, out)
                if record is not None:
                    return record, "adopted"
                if prepared.status == "adopt":
                    logger.warning("%s: the copy of %s does not verify; running it", node.label, prepared.source)
            if self.workspace is None:
                raise RuntimeError(f"{node.label}: executing a stage needs a Workspace")
            logger.info("%s: running (%s)", node.label, prepared.reason)
            console.current().stage_started(node.label, prepared.reason)
            begin_stage(out, key, fresh=prepared.force or not spec.resumable)
            job = Job(node=node, config=self.config, out=out, workspace=self.workspace, key=key)
            metrics = spec.function(job, **self._artifacts(node, prepared.inputs))
            if lease.lost:  # we stalled past the lease and another process took the stage over
                raise RuntimeError(f"{node.label}: lost its lease to another process while running; not committing")
            # The operational values it ran with, the device model.device resolved to here, and the GPUs
            # this process was given (CUDA_VISIBLE_DEVICES: a GPU-owning worker's, None when unset).
            provenance = {
                **prepared.provenance,
                "device": self.workspace.device,
                "visible_gpus": os.environ.get("CUDA_VISIBLE_DEVICES"),
            }
            return out.commit(spec.name, node.iteration, key, metrics, provenance=provenance), "ran"

    def _key_lease(self, prepared: Prepared) -> AbstractContextManager:
        """In a grid: the lease on the stage's cache key, held by the one cell that computes it."""
        grid, settings = self.config.orchestration.grid, self.config.orchestration
        if grid is None or prepared.force:
            return nullcontext()
        return key_lease(
            self.config.run.runs_root,
            grid,
            prepared.node.stage,
            prepared.key,
            label=f"{prepared.node.label} (key {prepared.key[:12]}) for grid {grid}",
            ttl=settings.lease_seconds,
            wait=settings.wait_for_running_stage,
        )

    def _adopt(self, prepared: Prepared, out: StageDir) -> StageRecord | None:
        """A donor's copy of the node under its key (the prepared donor first), or None."""
        node, key = prepared.node, prepared.key
        fields, digests = prepared.provenance["fields"], prepared.provenance["inputs"]
        absent = disabled_inputs(self.config, node)
        donors = sorted(self.run.donors(), key=lambda donor: donor.run_id != prepared.source)
        for donor in donors:
            source = donor.stage(node.iteration, node.folder)
            theirs = source.read_manifest()
            if theirs is None or not self._holds(node, theirs, key, fields, digests, absent):
                continue
            record = out.adopt(source, theirs["cache_key"])  # under the donor's key: its digest carries over
            if record is not None:
                logger.info("%s: adopted from %s", node.label, donor.run_id)
                return record
        return None

    def _artifacts(self, node: Node, inputs: Inputs) -> dict[str, Any]:
        refs = node_inputs(self.config, node)
        out: dict[str, Any] = {}
        for param, ref in refs.items():
            value = inputs[param]
            if ref is None or value is None:
                out[param] = None
            elif isinstance(ref, list):
                out[param] = [Artifact(r, self.run.dir(n)) for n, r in zip(ref, value, strict=True)]  # type: ignore[arg-type]
            else:
                out[param] = Artifact(value, self.run.dir(ref))  # type: ignore[arg-type]
        return out

    def run_node(self, node: Node, inputs: Inputs, force: bool = False) -> StageRecord:
        return self.execute(self.prepare(node, inputs, force))

    # -- whole iterations -------------------------------------------------------------------------
    def stored_records(self, iteration: int) -> dict[Node, StageRecord]:
        """The train records of iterations before ``iteration``, from storage (an iteration run alone)."""
        return {node: self.run.stored_record(node) for node in trained_nodes(iteration)}

    def stored_inputs(self, node: Node) -> Inputs:
        """A node's input records, read from storage (a stage run alone)."""
        return bind_inputs(node_inputs(self.config, node), self.run.stored_record)


def _knob_changes(before: dict, version: int, fields: dict[str, Any]) -> list[str]:
    """The code version and config fields that differ from a manifest's recorded provenance."""
    reasons = []
    if before.get("version") != version:
        reasons.append(f"stage code version {before.get('version')} → {version}")
    old = _results_only(before.get("fields", {}))  # an older manifest's fields may hold operational knobs
    for knob in sorted(set(old) | set(fields)):
        if old.get(knob) != fields.get(knob):
            reasons.append(f"{knob} changed ({_short(old.get(knob))} → {_short(fields.get(knob))})")
    return reasons


def _inputs_run(labels: list[str]) -> str:
    return f"input {labels[0]} runs" if len(labels) == 1 else f"inputs {', '.join(labels)} run"


def _short(value: Any, width: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= width else text[: width - 1] + "…"


# -- plan -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PlanRow:
    node: Node
    status: Status
    reason: str


def _nodes(ref: InputRef) -> Iterator[Node]:
    if isinstance(ref, list):
        yield from ref
    elif ref is not None:
        yield ref


def plan(run: Run, force: dict[int, set[str]] | None = None) -> list[PlanRow]:
    """What running ``run`` would do to every node, and why, without executing or writing anything."""
    runner = Runner(run)
    config = run.config
    known: dict[Node, StageRecord | None] = {}
    rows: list[PlanRow] = []
    for t in range(config.method.iterations + 1):
        forced = (force or {}).get(t, set())
        for node in iteration_nodes(config, t):
            refs = node_inputs(config, node)
            pending = [n.label for ref in refs.values() for n in _nodes(ref) if known.get(n) is None]
            if pending:
                spec = REGISTRY[node.stage]
                manifest = run.dir(node).read_manifest()
                if manifest is None and run.parent_dir(node) is not None:
                    manifest = run.parent_dir(node).read_manifest()  # type: ignore[union-attr]
                before = (manifest or {}).get("provenance")
                knobs = _knob_changes(before, spec.version, key_fields(node, config)) if before else []
                reason = "forced" if node.stage in forced else "; ".join([*knobs, _inputs_run(pending)])
                rows.append(PlanRow(node, "run", reason))
                known[node] = None
                continue
            prepared = runner.prepare(node, bind_inputs(refs, known.__getitem__), force=node.stage in forced)  # type: ignore[arg-type]
            rows.append(PlanRow(node, prepared.status, prepared.reason))
            known[node] = prepared.record if prepared.status != "run" else None
    return rows


__all__ = ["Prepared", "Runner", "PlanRow", "begin_stage", "key_fields", "plan", "same_result", "walk_iteration"]
