"""Which GPUs a stage gets when GPU stages run at once in one process.

On the Prefect path the GPU stages that the DAG lets run at once (the opponent members' generate stages
of an iteration) run together, up to ``orchestration.gpu_stages`` of them; cells of a local grid run
``--concurrency`` at a time. Each such stage (or cell) gets its own group of GPUs from the devices this
process may use (`visible_devices`: ``CUDA_VISIBLE_DEVICES``, else every GPU torch sees), as many as one
stage uses (`gpus_per_stage`): its torch work runs on the first GPU of the group (``cuda:<index>`` in
this process), its children (the vLLM engine, lm-eval's vllm model) see only the group
(``CUDA_VISIBLE_DEVICES``); a grid cell in its own process sees only its group.

Nothing is handed out where one stage runs at a time (everything as before: ``model.device`` as
configured, children see what this process sees) or on the CPU (stages run at once, no devices).
Asking for more at once than the GPUs allow is one `ConfigError` line naming the knob, before any stage.
"""

from __future__ import annotations

import contextvars
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from alphaspin.config import AlphaSpinConfig, ConfigError

GPU_STAGES = "orchestration.gpu_stages"

# How many runs share this process's GPUs at once: a Prefect grid flow running its cells as threads sets
# it for the cells' subflows (each cell's GPU stages then take GPUs from the same pool).
RUNS_IN_PROCESS: contextvars.ContextVar[int] = contextvars.ContextVar("alphaspin_runs_in_process", default=1)


@dataclass(frozen=True)
class Gpus:
    """The GPUs of one stage: ``ids`` as the children's ``CUDA_VISIBLE_DEVICES`` lists them, ``index``
    the torch index of the first of them in this process."""

    ids: tuple[str, ...]
    index: int

    @property
    def torch_device(self) -> str:
        return f"cuda:{self.index}"

    @property
    def visible(self) -> str:
        return ",".join(self.ids)


def visible_devices(environ: Mapping[str, str] | None = None, device_count: int | None = None) -> list[str]:
    """The GPUs this process may use, as ``CUDA_VISIBLE_DEVICES`` names them (indices or UUIDs): that
    variable's list when set (empty or -1: none), else ``0..n-1`` for the n GPUs torch sees."""
    env = os.environ if environ is None else environ
    value = env.get("CUDA_VISIBLE_DEVICES")
    if value is not None:
        items = [item.strip() for item in value.split(",") if item.strip()]
        return [] if items == ["-1"] else items
    if device_count is None:
        import torch

        device_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return [str(i) for i in range(device_count)]


def gpus_per_stage(config: AlphaSpinConfig) -> int:
    """The GPUs one stage uses: a vLLM engine's tensor × data parallel ranks (generation, reference samples,
    lm-eval's vllm model) and the train stage's processes on one machine (as `child_runs.child_gpu_count`)."""
    training = config.training
    return max(config.generation.engine_gpus, training.num_processes // training.num_machines, 1)


def gpu_groups(devices: Sequence[str], per_stage: int, at_once: int, knob: str) -> list[Gpus]:
    """``devices`` cut into groups of ``per_stage`` (every whole group: a pool to take from), refused in one
    line naming ``knob`` when fewer than ``at_once`` groups fit."""
    need = per_stage * at_once
    if need > len(devices):
        each = f" × {per_stage} GPUs each" if per_stage > 1 else ""
        raise ConfigError(
            f"{knob}: {at_once} GPU stages at once{each} need {need} GPUs, but this process may use "
            f"{len(devices)} ({', '.join(devices) or 'none'}; CUDA_VISIBLE_DEVICES, else the GPUs torch sees); "
            f"lower {knob} to at most {len(devices) // per_stage or 1}"
        )
    return [Gpus(tuple(devices[i : i + per_stage]), i) for i in range(0, len(devices) - per_stage + 1, per_stage)]


def stage_gpus(
    config: AlphaSpinConfig,
    at_once: int,
    knob: str = GPU_STAGES,
    device: str | None = None,
    devices: Sequence[str] | None = None,
) -> list[Gpus] | None:
    """The GPU groups to hand out when ``at_once`` GPU stages run together under ``config`` (None: hand
    out nothing, one at a time or on the CPU). ``device``: ``model.device`` as resolved here (default:
    `alphaspin.workspace.resolve_device`); ``devices``: `visible_devices` (both for tests)."""
    if at_once <= 1:
        return None
    if device is None:
        from alphaspin.workspace import resolve_device

        device = resolve_device(config.model.device)
    if not device.startswith("cuda"):
        return None
    if device.partition(":")[2]:
        raise ConfigError(
            f"model.device: {device} pins every stage to one GPU, but {knob} asks for {at_once} GPU stages at once, "
            "each on its own GPU; set model.device: cuda (or leave it unset)"
        )
    return gpu_groups(visible_devices() if devices is None else devices, gpus_per_stage(config), at_once, knob)


class GpuPool:
    """GPU groups taken by the stages that run at once and given back when they end (thread-safe)."""

    def __init__(self, groups: Sequence[Gpus]):
        self.groups = tuple(groups)
        self._free = list(self.groups)
        self._changed = threading.Condition()

    def take(self) -> Gpus:
        """The first free group (lowest GPU first), waiting while every group is in use."""
        with self._changed:
            while not self._free:
                self._changed.wait()
            return self._free.pop(0)

    def give(self, gpus: Gpus) -> None:
        with self._changed:
            self._free.append(gpus)
            self._free.sort(key=lambda g: g.index)
            self._changed.notify()


_POOLS: dict[tuple[Gpus, ...], GpuPool] = {}
_POOLS_LOCK = threading.Lock()


def shared_pool(groups: Sequence[Gpus]) -> GpuPool:
    """The one pool of this process for ``groups``: the runs of a grid that share the process share it."""
    with _POOLS_LOCK:
        return _POOLS.setdefault(tuple(groups), GpuPool(groups))


def own_gpus(queue) -> None:  # noqa: ANN001 (a multiprocessing queue)
    """A local grid's worker process: take one group's ``CUDA_VISIBLE_DEVICES`` (before CUDA starts)."""
    os.environ["CUDA_VISIBLE_DEVICES"] = queue.get()


def engine_gpus(device: str, count: int, environ: Mapping[str, str] | None = None) -> tuple[str | None, int | None]:
    """A child's ``CUDA_VISIBLE_DEVICES`` and the torch index of its first GPU, for a stage on ``device``
    whose child uses ``count`` GPUs: on ``cuda:N``, GPUs N..N+count-1 of this process (as
    ``CUDA_VISIBLE_DEVICES`` names them; a stage's own group always fits, `stage_gpus` checked it). Else, or
    where they do not fit (``model.device: cuda:N`` on a node without N+count GPUs): (None, None), the child
    sees what this process sees and vLLM's own check speaks."""
    kind, _, index = device.partition(":")
    if kind != "cuda" or not index.isdigit():
        return None, None
    first = int(index)
    devices = visible_devices(environ)
    if first + count > len(devices):
        return None, None
    return ",".join(devices[first : first + count]), first
