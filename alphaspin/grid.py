"""A grid of runs: the paper's ablations with seeds (``alphaspin grid -c configs/grid-cpu.yaml``).

A grid file names a base recipe, axes of knobs and seeds; every cell (one value per axis) runs once
per seed, as the run ``<grid>-<cell>-s<seed>``, e.g. ``ablation-alpha0.95-h2-s0``::

    name: ablation
    recipe: quickstart.yaml              # relative to the grid file
    base: {method.iterations: 2}         # overrides of the recipe (dotted keys or nested sections)
    axes:
      method.alpha: [1.0, 0.95, 0.8]
      method.history: [1, 2, inf]
    seeds: [0, 1, 2]                     # run.seed
    baseline: {method.alpha: 1.0, method.history: 2}   # SPIN: the cell differences are taken against
    concurrency: 1                       # cells at once, locally
    deployment: alphaspin-recipe/gpu     # optional: each cell a flow run of this deployment (a work pool)

Everything is checked before anything runs, and refused with one line naming the axis: an unknown
knob, a value the knob refuses, an empty axis, a baseline that is not a cell, two cells that resolve
to the same config. Cells of one seed share every stage whose cache key is the same (`alphaspin.sharing`):
the config of a cell carries ``orchestration.grid``, and ``<runs_root>/<grid>/grid.json`` lists the cells.
"""

from __future__ import annotations

import copy
import itertools
import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from alphaspin.config import AlphaSpinConfig, ConfigError, config_from_dict, dump_config, flat_config, knobs
from alphaspin.devices import Gpus, gpus_per_stage, own_gpus, stage_gpus
from alphaspin.sharing import GRID_JSON, grid_storage
from alphaspin.storage import RunStorage, canonical_json, sha256_bytes

logger = logging.getLogger(__name__)

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
# Knobs a grid sets itself, or that say where and how a run executes rather than what it computes.
NOT_AXES = {
    "run.run_id": "cells are named from their values",
    "run.seed": "use seeds:",
    "run.runs_root": "use runs_root:",
}
SHORT_NAMES = {"method.alpha": "alpha", "method.history": "h", "training.loss_type": "loss", "training.beta": "beta"}


class GridFile(BaseModel):
    """The grid file (YAML), as written."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME_PATTERN, description="Name of the grid; its runs are <name>-<cell>-s<seed>.")
    recipe: str | None = Field(None, description="Base recipe (YAML), relative to the grid file; default: defaults.")
    base: dict[str, Any] = Field(default_factory=dict, description="Overrides of the recipe for every cell.")
    axes: dict[str, list[Any]] = Field(default_factory=dict, description="knob: [values]; the cells are their product.")
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1, description="run.seed of each cell's runs.")
    baseline: dict[str, Any] | None = Field(None, description="The cell differences are taken against: {axis: value}.")
    concurrency: int = Field(1, ge=1, description="Cells run at once locally (each a process).")
    deployment: str | None = Field(None, description="Run each cell as a flow run of this deployment (a work pool).")
    runs_root: str | None = Field(None, description="Where the runs live; default: the recipe's run.runs_root.")
    metrics: list[str] | None = Field(None, description="Metrics of the report; default: every evaluate metric.")


@dataclass(frozen=True)
class Cell:
    """One run of the grid: a cell (one value per axis) at one seed."""

    name: str  # "alpha0.95-h2"
    values: dict[str, Any]  # axis -> value, as resolved by the config ("inf", 0.95, ...)
    seed: int
    run_id: str
    config: AlphaSpinConfig


@dataclass
class Grid:
    spec: GridFile
    source: str
    runs_root: str
    cells: list[Cell]  # cell-major: every seed of the first cell, then the next cell
    baseline: str | None = None  # the baseline cell's name
    axes: dict[str, list[Any]] = field(default_factory=dict)  # resolved values, in order

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def cell_names(self) -> list[str]:
        return list(dict.fromkeys(cell.name for cell in self.cells))

    def runs_of(self, cell: str) -> list[Cell]:
        return [c for c in self.cells if c.name == cell]

    @property
    def storage(self) -> RunStorage:
        return grid_storage(self.runs_root, self.name)


# -- loading and validating -----------------------------------------------------------------------
def _one_line(error: Exception) -> str:
    """A multi-line config error as one line: its field messages joined."""
    lines = [line.strip().replace("(top level): ", "").replace("Value error, ", "") for line in str(error).splitlines()]
    lines = [line for line in lines if line]
    return "; ".join(lines[1:]) if len(lines) > 1 else (lines[0] if lines else repr(error))


def _set(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{key}: {part} is not a section")
        node = child
    node[parts[-1]] = copy.deepcopy(value)


def _get(config: AlphaSpinConfig, key: str) -> Any:
    value: Any = dump_config(config)
    for part in key.split("."):
        value = value[part]
    return value


def _label(key: str, value: Any) -> str:
    """``alpha0.95``, ``hinf``, ``opponent-sir``: a cell name's part for one axis value."""
    short = SHORT_NAMES.get(key, key.rsplit(".", 1)[-1])
    if isinstance(value, bool) or value is None:
        text = f"-{str(value).lower()}"
    elif isinstance(value, int | float):
        text = f"{value:g}" if isinstance(value, float) else str(value)
    elif str(value) == "inf":
        text = "inf"
    else:
        text = f"-{value}"
    return re.sub(r"[^A-Za-z0-9._-]", "_", f"{short}{text}")


def load_grid(path: str | Path, overrides: list[str] | None = None) -> Grid:
    """Read and check a grid file; ``overrides`` ("key=value", as --set) apply to every cell's base."""
    from alphaspin.config import apply_overrides, load_config, read_yaml

    path = Path(path)
    raw = read_yaml(path, "grid file")
    try:
        spec = GridFile.model_validate(raw or {})
    except ValidationError as error:
        item = error.errors()[0]
        where = ".".join(str(p) for p in item["loc"]) or "(top level)"
        message = "unknown field" if item["type"] == "extra_forbidden" else item["msg"]
        raise ConfigError(f"grid file {path}: {where}: {message}") from None
    data: dict[str, Any] = {}
    if spec.recipe is not None:
        recipe = (path.parent / spec.recipe).resolve()
        load_config(recipe, [])  # a bad recipe fails here, naming its file
        data = yaml.safe_load(recipe.read_text()) or {}
    for key, value in flat_config(spec.base).items():
        _set(data, key, value)
    apply_overrides(data, list(overrides or []))
    if spec.runs_root is not None:
        _set(data, "run.runs_root", spec.runs_root)
    try:
        base = config_from_dict(copy.deepcopy(data), f"grid {spec.name} (base)")
    except ConfigError as error:
        raise ConfigError(f"grid {spec.name}: base: {_one_line(error)}") from None

    known = {key for key, _, _ in knobs()}
    axes: dict[str, list[Any]] = {}
    for axis, values in spec.axes.items():
        if axis not in known:
            raise ConfigError(f"grid {spec.name}: axis {axis}: unknown knob (see `alphaspin run --help`)")
        if axis in NOT_AXES or axis.startswith("orchestration."):
            why = NOT_AXES.get(axis, "it changes how a run executes, not what it computes")
            raise ConfigError(f"grid {spec.name}: axis {axis}: not a grid axis ({why})")
        if not values:
            raise ConfigError(f"grid {spec.name}: axis {axis}: no values")
        resolved = []
        for value in values:
            one = copy.deepcopy(data)
            _set(one, axis, value)
            try:
                resolved.append(_get(config_from_dict(one, axis), axis))
            except ConfigError as error:
                raise ConfigError(
                    f"grid {spec.name}: axis {axis}: value {value!r} refused: {_one_line(error)}"
                ) from None
        for i, j in itertools.combinations(range(len(values)), 2):
            if resolved[i] == resolved[j]:
                raise ConfigError(
                    f"grid {spec.name}: axis {axis}: values {values[i]!r} and {values[j]!r} resolve to the same "
                    "config (two cells would be the same run)"
                )
        axes[axis] = resolved
    if len(set(spec.seeds)) != len(spec.seeds) or any(s < 0 for s in spec.seeds):
        raise ConfigError(f"grid {spec.name}: seeds {spec.seeds}: expected distinct integers ≥ 0")

    cells: list[Cell] = []
    seen: dict[str, str] = {}
    for combination in itertools.product(*axes.values()) if axes else [()]:
        values = dict(zip(axes, combination, strict=True))
        name = "-".join(_label(k, v) for k, v in values.items()) or "base"
        if name in seen:
            raise ConfigError(f"grid {spec.name}: cells {seen[name]} and {values} get the same name {name!r}")
        seen[name] = str(values)
        for seed in spec.seeds:
            run_id = f"{spec.name}-{name}-s{seed}"
            one = copy.deepcopy(data)
            for key, value in values.items():
                _set(one, key, value)
            _set(one, "run.seed", seed)
            _set(one, "run.run_id", run_id)
            _set(one, "orchestration.grid", spec.name)
            try:
                config = config_from_dict(one, run_id)
            except ConfigError as error:
                where = ", ".join(f"{k}={v}" for k, v in values.items())
                raise ConfigError(f"grid {spec.name}: cell {where}: {_one_line(error)}") from None
            cells.append(Cell(name, values, seed, run_id, config))
    _check_distinct(spec.name, cells)
    grid = Grid(spec, str(path), base.run.runs_root, cells, axes=axes)
    grid.baseline = _baseline(grid, data)
    return grid


def _check_distinct(name: str, cells: list[Cell]) -> None:
    """Two cells whose configs are the same (other than their names) would compute the same run twice."""
    seen: dict[str, Cell] = {}
    for cell in cells:
        resolved = dump_config(cell.config)
        resolved["run"].pop("run_id")
        key = repr(sorted(flat_config(resolved).items()))
        if key in seen:
            other = seen[key]
            axes = [a for a in cell.values if cell.values[a] != other.values[a]] or list(cell.values)
            raise ConfigError(
                f"grid {name}: axis {', '.join(axes)}: cells {other.name} and {cell.name} resolve to the same config"
            )
        seen[key] = cell


def _baseline(grid: Grid, data: dict[str, Any]) -> str | None:
    chosen = grid.spec.baseline
    if chosen is None:
        return None
    for axis in chosen:
        if axis not in grid.axes:
            raise ConfigError(f"grid {grid.name}: baseline: {axis} is not an axis of the grid ({list(grid.axes)})")
    missing = [axis for axis in grid.axes if axis not in chosen and len(grid.axes[axis]) > 1]
    if missing:
        raise ConfigError(f"grid {grid.name}: baseline: give a value of axis {', '.join(missing)}")
    wanted = {}
    for axis, value in chosen.items():
        one = copy.deepcopy(data)
        _set(one, axis, value)
        try:
            wanted[axis] = _get(config_from_dict(one, axis), axis)
        except ConfigError as error:
            raise ConfigError(f"grid {grid.name}: baseline: axis {axis}: {_one_line(error)}") from None
        if wanted[axis] not in grid.axes[axis]:
            raise ConfigError(
                f"grid {grid.name}: baseline: axis {axis}: {value!r} is not one of its values {grid.axes[axis]}"
            )
    for cell in grid.cells:
        if all(cell.values[a] == v for a, v in wanted.items()):
            return cell.name
    raise ConfigError(f"grid {grid.name}: baseline {chosen}: not a cell of the grid")  # pragma: no cover


# -- the grid's record in storage ----------------------------------------------------------------
def write_grid_record(grid: Grid) -> dict[str, Any]:
    """``<runs_root>/<grid>/grid.json``: the cells (cells read it to find their donors)."""
    record = {
        "name": grid.name,
        "source": grid.source,
        "axes": grid.axes,
        "seeds": grid.spec.seeds,
        "baseline": grid.baseline,
        "cells": [{"cell": c.name, "seed": c.seed, "run_id": c.run_id, "values": c.values} for c in grid.cells],
        "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    storage = grid.storage
    storage.write_json(storage.path(GRID_JSON), record)
    return record


# -- progress ----------------------------------------------------------------------------------------
def cell_progress(cell: Cell) -> dict[str, Any]:
    """How far one run of the grid is: stages done (of them adopted), iterations evaluated, state."""
    from alphaspin.dag import iteration_nodes
    from alphaspin.leases import LEASES
    from alphaspin.runs import Run

    run = Run(cell.config)
    config = cell.config
    nodes = [n for t in range(config.method.iterations + 1) for n in iteration_nodes(config, t)]
    done = adopted = 0
    evaluated = []
    for node in nodes:
        manifest = run.dir(node).read_manifest()
        if manifest is None:
            continue
        done += 1
        adopted += "adopted_from" in manifest.get("metrics", {})
        if node.stage == "evaluate":
            evaluated.append(node.iteration)
    leases = run.storage.find_files(run.storage.path(LEASES))
    started = run.record() is not None
    if done == len(nodes):
        state = "done"
    elif leases:
        state = "running"
    else:
        state = "partial" if started else "pending"
    return {
        "cell": cell.name,
        "seed": cell.seed,
        "run_id": cell.run_id,
        "state": state,
        "stages": f"{done}/{len(nodes)}",
        "stages_done": done,
        "stages_total": len(nodes),
        "adopted": adopted,
        "iterations_evaluated": evaluated,
    }


def grid_status(grid: Grid) -> list[dict[str, Any]]:
    return [cell_progress(cell) for cell in grid.cells]


def sharing_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Stage executions the grid computed vs adopted from another cell; ``saved`` = adopted / all."""
    done = sum(r["stages_done"] for r in rows)
    adopted = sum(r["adopted"] for r in rows)
    return {
        "stages": done,
        "executed": done - adopted,
        "adopted": adopted,
        "saved": adopted / done if done else 0.0,
    }


def format_status(grid: Grid, rows: list[dict[str, Any]]) -> str:
    width = max(len(r["run_id"]) for r in rows)
    lines = [f"grid {grid.name} at {grid.storage.url}: {len(grid.cell_names)} cells x {len(grid.spec.seeds)} seeds"]
    for r in rows:
        evaluated = ",".join(map(str, r["iterations_evaluated"])) or "-"
        lines.append(
            f"  {r['run_id']:<{width}}  {r['state']:<8} stages {r['stages']:>7} (adopted {r['adopted']})  "
            f"evaluated iterations {evaluated}"
        )
    summary = sharing_summary(rows)
    lines.append(
        f"{summary['executed']} stage executions computed, {summary['adopted']} adopted from another cell: "
        f"{100 * summary['saved']:.0f}% saved"
    )
    return "\n".join(lines)


# -- running the cells locally -----------------------------------------------------------------------
def _run_cell(config_json: dict[str, Any], threads: int | None) -> list[dict]:
    """One cell in this process (a worker of the pool, or the caller itself)."""
    from alphaspin.pipeline import run

    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    return run(config_from_dict(config_json, config_json["run"]["run_id"]))


def run_local(
    grid: Grid, concurrency: int | None = None, on_done: Callable[[Cell, BaseException | None], None] | None = None
) -> dict[str, BaseException]:
    """Run every cell with the plain runner, ``concurrency`` at a time (each in its own process when
    more than one; torch threads split between them). Finished stages are cached, so this resumes.
    Returns the cells that failed (the others still run)."""
    import os
    from concurrent.futures import as_completed

    concurrency = concurrency or grid.spec.concurrency
    groups = cell_gpus(grid, concurrency)  # before anything is written
    write_grid_record(grid)
    failed: dict[str, BaseException] = {}
    if concurrency == 1:
        for cell in grid.cells:
            logger.info("grid %s: cell %s", grid.name, cell.run_id)
            try:
                _run_cell(dump_config(cell.config), None)
                error = None
            except Exception as caught:  # noqa: BLE001 (reported with the other cells' outcome)
                logger.exception("grid %s: cell %s failed", grid.name, cell.run_id)
                failed[cell.run_id] = error = caught
            if on_done:
                on_done(cell, error)
        return failed
    threads = max(1, (os.cpu_count() or 1) // concurrency)
    with cell_pool(concurrency, groups) as pool:
        futures = {pool.submit(_run_cell, dump_config(cell.config), threads): cell for cell in grid.cells}
        for future in as_completed(futures):
            cell = futures[future]
            error = future.exception()
            if error is not None:
                logger.error("grid %s: cell %s failed: %s", grid.name, cell.run_id, error)
                failed[cell.run_id] = error
            if on_done:
                on_done(cell, error)
    return failed


CONCURRENCY = "concurrency (the grid file's, or --concurrency)"


def cell_gpus(grid: Grid, concurrency: int, per_cell: int = 1) -> list[Gpus] | None:
    """The GPU groups of ``concurrency`` cells at once, ``per_cell`` GPU stages each (`alphaspin.devices`):
    None on the CPU or one at a time; more than the GPUs allow is refused naming the grid's concurrency."""
    if concurrency * per_cell <= 1:
        return None
    widest = max(grid.cells, key=lambda cell: gpus_per_stage(cell.config)).config
    knob = CONCURRENCY if per_cell == 1 else f"{CONCURRENCY} × orchestration.gpu_stages={per_cell}"
    return stage_gpus(widest, concurrency * per_cell, knob)


def cell_pool(concurrency: int, groups: Sequence[Gpus] | None = None):  # noqa: ANN201
    """The process pool of cells run at once locally: each worker process owns one group of ``groups``
    (its ``CUDA_VISIBLE_DEVICES``, set before CUDA starts in it), so cells never share a GPU."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    context = get_context("spawn")
    if not groups:
        return ProcessPoolExecutor(max_workers=concurrency, mp_context=context)
    queue = context.Queue()
    for gpus in groups[:concurrency]:
        queue.put(gpus.visible)
    return ProcessPoolExecutor(max_workers=concurrency, mp_context=context, initializer=own_gpus, initargs=(queue,))


def idempotency_key(grid: Grid, cell: Cell) -> str:
    """The key of a cell's flow run of the deployment (grid, cell, config): a retried grid finds the
    cell's run instead of starting a second one (``-retry<n>`` is appended after a failed one)."""
    digest = sha256_bytes(canonical_json(dump_config(cell.config)).encode())[:12]
    return f"{grid.name}-{cell.run_id}-{digest}"
