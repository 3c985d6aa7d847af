"""Work shared between the cells of a grid of runs (`alphaspin.grid`): donors and key leases.

A grid's cells are separate runs (``<runs_root>/<grid>-<cell>-s<seed>/``) whose configs differ in a
few knobs, so many of their stages have the same cache key: iteration 0 is the same for every α and
h (its reference is π_base, its only opponent the base), and at t = 1 the generations of one h are
the same for every α. A cache key never contains the run id, so a stage another run holds under the
same key can be adopted (copied, keeping its digest, with ``adopted_from`` in its metrics) instead of
computed, exactly as a fork adopts from its parent.

``<runs_root>/<grid>/grid.json`` lists the cells; a run whose ``orchestration.grid`` names the grid
takes the other cells of its seed as donors. Two cells must not compute the same key at the same
time, so a cell about to run a stage first holds a lease named by the stage's key in
``<runs_root>/<grid>/_leases/`` (`alphaspin.leases`): the second cell waits, then adopts.
"""

from __future__ import annotations

from typing import Any

from alphaspin.leases import StageLease
from alphaspin.storage import RunStorage

GRID_JSON = "grid.json"


def grid_storage(runs_root: str, grid: str) -> RunStorage:
    """The grid's own folder, ``<runs_root>/<grid>/`` (grid.json, key leases, the report)."""
    return RunStorage(runs_root, grid)


def read_grid_record(runs_root: str, grid: str) -> dict[str, Any] | None:
    """The stored grid.json of ``grid``, or None before the grid was started."""
    storage = grid_storage(runs_root, grid)
    path = storage.path(GRID_JSON)
    return storage.read_json(path) if storage.exists(path) else None


def donor_run_ids(runs_root: str, grid: str, run_id: str) -> list[str]:
    """The other cells of ``run_id``'s seed in ``grid``, in grid order (cells of other seeds share
    nothing: every stage reads run.seed or an input that does)."""
    record = read_grid_record(runs_root, grid) or {"cells": []}
    seeds = {cell["run_id"]: cell["seed"] for cell in record["cells"]}
    if run_id not in seeds:
        return []
    return [other for other, seed in seeds.items() if seed == seeds[run_id] and other != run_id]


def key_lease(runs_root: str, grid: str, stage: str, key: str, label: str, ttl: float, wait: bool) -> StageLease:
    """The lease a cell holds while it computes ``stage`` under ``key`` for the whole grid."""
    return StageLease(grid_storage(runs_root, grid), f"{stage}-{key}", label=label, ttl=ttl, wait=wait)
