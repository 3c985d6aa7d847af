"""The DAG of an α-SPIN run, derived from the stage declarations (`alphaspin.stages`).

Iteration t's nodes are the registry's stages in order, per-member stages expanded over the
opponent mixture at t (`alphaspin.mixture`). A node's inputs are the nodes its spec's `Input`s
point at; ``previous`` and ``member`` inputs reach back into earlier iterations (θ_(t-1), θ_k).
The plain runner and the Prefect flow both walk the DAG through `walk_iteration`: there is one loop
(the flow's walk with GPU stages at once starts each node once the `upstream_nodes` it reads are done).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TypeVar

from alphaspin.config import AlphaSpinConfig, ConfigError
from alphaspin.mixture import member_iteration, opponent_members
from alphaspin.stage_spec import Input, Node
from alphaspin.stages import REGISTRY, STAGE_NAMES

R = TypeVar("R")
InputRef = Node | list[Node] | None


def iteration_nodes(config: AlphaSpinConfig, iteration: int) -> list[Node]:
    """The nodes of iteration ``iteration`` in a topological order."""
    members = [m.name for m in opponent_members(iteration, config.method.history, config.method.opponent)]
    nodes: list[Node] = []
    for spec in REGISTRY.values():
        if not spec.enabled(config, iteration):
            continue
        if spec.per_member:
            nodes.extend(Node(spec.name, iteration, member) for member in members)
        else:
            nodes.append(Node(spec.name, iteration))
    return nodes


def _at(config: AlphaSpinConfig, stage: str, iteration: int) -> Node | None:
    """The node of a non-per-member ``stage`` at ``iteration``; None where the stage is disabled
    (e.g. no sampler to train, no EMA adapter to build in this configuration)."""
    return Node(stage, iteration) if REGISTRY[stage].enabled(config, iteration) else None


def _position(config: AlphaSpinConfig, node: Node, item: Input) -> InputRef:
    t = node.iteration
    if item.at == "same":
        return _at(config, item.stage, t)
    if item.at == "previous":
        return _at(config, item.stage, t - 1) if t > 0 else None
    if item.at == "history":
        return [n for k in range(t) if (n := _at(config, item.stage, k)) is not None]
    if item.at == "member":
        k = member_iteration(node.member) if node.member is not None else None
        return _at(config, item.stage, k) if k is not None else None
    if item.at == "members":
        members = opponent_members(t, config.method.history, config.method.opponent)
        return [Node(item.stage, t, m.name) for m in members]
    raise ValueError(f"{node.stage}: unknown input position {item.at!r}")


def node_inputs(config: AlphaSpinConfig, node: Node) -> dict[str, InputRef]:
    """The upstream nodes of ``node``, by the stage function's parameter name."""
    return {item.param: _position(config, node, item) for item in REGISTRY[node.stage].inputs}


def disabled_inputs(config: AlphaSpinConfig, node: Node) -> set[str]:
    """The inputs of ``node`` that point at a stage disabled in this configuration (always None).
    They stay out of the node's cache key, so adding an optional input to a stage keeps the keys of
    the configurations that do not use it."""
    out = set()
    for item in REGISTRY[node.stage].inputs:
        if item.at in ("same", "previous", "member") and _position(config, node, item) is None:
            t = node.iteration if item.at == "same" else node.iteration - 1
            if item.at == "member":
                k = member_iteration(node.member) if node.member is not None else None
                t = k if k is not None else -1
            if t >= 0 and not REGISTRY[item.stage].enabled(config, t):
                out.add(item.param)
    return out


def bind_inputs(refs: dict[str, InputRef], lookup: Callable[[Node], R]) -> dict[str, R | list[R] | None]:
    """``refs`` with every node replaced by ``lookup(node)`` (its record, or its artifact)."""
    out: dict[str, R | list[R] | None] = {}
    for param, ref in refs.items():
        if ref is None:
            out[param] = None
        elif isinstance(ref, list):
            out[param] = [lookup(n) for n in ref]
        else:
            out[param] = lookup(ref)
    return out


def walk_iteration(
    config: AlphaSpinConfig,
    iteration: int,
    records: dict[Node, R],
    execute: Callable[[Node, dict[str, R | list[R] | None]], R],
) -> dict[Node, R]:
    """Execute the nodes of one iteration in order; ``records`` holds the records of earlier
    iterations' nodes it needs (at least their ``train`` nodes) and receives the new ones."""
    for node in iteration_nodes(config, iteration):
        records[node] = execute(node, bind_inputs(node_inputs(config, node), records.__getitem__))
    return records


def upstream_nodes(refs: dict[str, InputRef]) -> list[Node]:
    """Every node that ``refs`` (`node_inputs`) points at, once each, in order."""
    found: list[Node] = []
    for ref in refs.values():
        for node in ref if isinstance(ref, list) else [ref] if ref is not None else []:
            if node not in found:
                found.append(node)
    return found


def trained_nodes(before: int) -> list[Node]:
    """The train nodes of iterations 0..before-1: what an iteration may read from earlier ones."""
    return [Node("train", k) for k in range(before)]


# -- forced stages --------------------------------------------------------------------------------
# The knob that puts an optional stage in the DAG (`StageSpec.enabled`), for the one-line refusal of a
# forced stage that this configuration does not have.
OPTIONAL_STAGES = {
    "ema_adapter": ("method.reference", "ema"),
    "train_sampler": ("method.opponent", "gflownet"),
}


def _absent(config: AlphaSpinConfig, stage: str, where: str) -> ConfigError:
    knob = OPTIONAL_STAGES.get(stage)
    if knob is None:
        return ConfigError(f"{where}: this run has no {stage} stage there")
    field, wanted = knob
    section, name = field.split(".")
    current = getattr(getattr(config, section), name)
    return ConfigError(
        f"{where}: the {stage} stage runs only with {field}: {wanted} (this run has {current!r}) and at t ≥ 1; "
        "forcing it would do nothing"
    )


def check_forced(config: AlphaSpinConfig, force: dict[int, set[str]], where: str = "--force") -> None:
    """Refuse a forced stage that the DAG does not have at that iteration (``--force 1:ema_adapter``
    without ``method.reference: ema``), naming the knob that enables it: before, it was accepted and
    did nothing."""
    for t, stages in sorted(force.items()):
        for stage in sorted(stages):
            if stage in REGISTRY and not REGISTRY[stage].enabled(config, t):
                raise _absent(config, stage, f"{where} {t}:{stage}")


def parse_force(
    items: Iterable[str], iterations: int | None = None, config: AlphaSpinConfig | None = None
) -> dict[int, set[str]]:
    """``["1:train", "0:generate"]`` → {1: {"train"}, 0: {"generate"}}; errors name the item. With
    ``config``, a stage absent from that iteration's DAG is refused (`check_forced`)."""
    force: dict[int, set[str]] = {}
    for item in items:
        t, sep, stage = str(item).partition(":")
        if not sep or not t.strip().isdigit() or stage.strip() not in STAGE_NAMES:
            raise ConfigError(f"--force {item!r}: expected ITERATION:STAGE with STAGE one of {list(STAGE_NAMES)}")
        if iterations is not None and int(t) > iterations:
            raise ConfigError(f"--force {item!r}: the run has iterations 0..{iterations}")
        if config is not None and not REGISTRY[stage.strip()].enabled(config, int(t)):
            raise _absent(config, stage.strip(), f"--force {item!r}")
        force.setdefault(int(t), set()).add(stage.strip())
    return force


def force_plan(
    iterations: int,
    items: Iterable[str] = (),
    stages: Iterable[str] = (),
    only_iterations: Iterable[int] = (),
    config: AlphaSpinConfig | None = None,
) -> dict[int, set[str]]:
    """Forced stages per iteration from "T:STAGE" items plus ``stages`` in ``only_iterations``
    (every iteration when empty): the CLI's, the flows' and the deployments' one parser. With
    ``config``, an item whose stage that iteration lacks is refused, and so is a stage of ``stages``
    that none of those iterations has (``ema_adapter`` without ``method.reference: ema``); a stage
    that some of them have is forced where it exists."""
    force = parse_force(items, iterations, config)
    stages = list(stages)
    for stage in stages:
        if stage not in STAGE_NAMES:
            raise ConfigError(f"force_stages: {stage!r} is not a stage; expected one of {list(STAGE_NAMES)}")
    selected = list(only_iterations) or list(range(iterations + 1))
    for stage in stages:
        present = [t for t in selected if config is None or REGISTRY[stage].enabled(config, t)]
        if not present:
            raise _absent(config, stage, f"force_stages {stage!r} (iterations {selected})")
        for t in present:
            force.setdefault(t, set()).add(stage)
    return force
