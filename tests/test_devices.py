"""Which GPUs each GPU stage (or local grid cell) gets when several run at once, without a GPU: the devices
this process may use are given (as CUDA_VISIBLE_DEVICES lists them), and so is the device that
``model.device`` resolved to where a test stands in for a CUDA node."""

from __future__ import annotations

import os
import threading

import pytest

from alphaspin.config import ConfigError
from alphaspin.devices import (
    GPU_STAGES,
    GpuPool,
    Gpus,
    engine_gpus,
    gpu_groups,
    gpus_per_stage,
    stage_gpus,
    visible_devices,
)


def test_the_visible_devices_are_cuda_visible_devices_else_the_gpus_torch_sees():
    assert visible_devices({"CUDA_VISIBLE_DEVICES": "2, 5"}) == ["2", "5"]
    assert visible_devices({"CUDA_VISIBLE_DEVICES": "GPU-1a,GPU-2b"}) == ["GPU-1a", "GPU-2b"]
    assert visible_devices({"CUDA_VISIBLE_DEVICES": ""}) == [] and visible_devices({"CUDA_VISIBLE_DEVICES": "-1"}) == []
    assert visible_devices({}, device_count=3) == ["0", "1", "2"]


def test_each_gpu_stage_at_once_gets_its_own_gpus(make_config):
    config = make_config("orchestration.gpu_stages=2")
    # a process that may use GPUs 2 and 5 (CUDA_VISIBLE_DEVICES=2,5): torch calls them cuda:0 and cuda:1
    groups = stage_gpus(config, 2, device="cuda", devices=["2", "5"])
    assert groups == [Gpus(("2",), 0), Gpus(("5",), 1)]
    assert [(g.torch_device, g.visible) for g in groups] == [("cuda:0", "2"), ("cuda:1", "5")]
    # an engine of 2 tensor-parallel ranks: each stage gets 2 GPUs, the first as its torch device
    wide = make_config("generation.backend=vllm", "generation.tensor_parallel_size=2", "generation.max_lora_rank=8")
    assert gpus_per_stage(wide) == 2
    assert stage_gpus(wide, 2, device="cuda", devices=list("0123")) == [Gpus(("0", "1"), 0), Gpus(("2", "3"), 2)]
    # two training processes per machine: 2 GPUs per stage as well
    assert (
        gpus_per_stage(
            make_config("training.num_processes=4", "training.num_machines=2", "training.main_process_ip=10.0.0.1")
        )
        == 2
    )
    # one at a time, or on the CPU: nothing handed out (model.device as configured)
    assert stage_gpus(config, 1, device="cuda", devices=["0", "1"]) is None
    assert stage_gpus(config, 2, device="cpu", devices=[]) is None


@pytest.mark.parametrize(
    ("overrides", "at_once", "devices", "message"),
    [
        ((), 3, ["0", "1"], f"{GPU_STAGES}: 3 GPU stages at once need 3 GPUs, but this process may use 2 (0, 1;"),
        (
            ("generation.backend=vllm", "generation.vllm_data_parallel_size=2", "generation.max_lora_rank=8"),
            2,
            ["0", "1", "2"],
            f"{GPU_STAGES}: 2 GPU stages at once × 2 GPUs each need 4 GPUs, but this process may use 3",
        ),
        ((), 2, [], f"{GPU_STAGES}: 2 GPU stages at once need 2 GPUs, but this process may use 0 (none;"),
        (("model.device=cuda:1",), 2, ["0", "1"], "model.device: cuda:1 pins every stage to one GPU"),
    ],
)
def test_more_gpu_stages_at_once_than_gpus_is_one_line_naming_the_knob(
    make_config, overrides, at_once, devices, message
):
    config = make_config(*overrides)
    device = config.model.device or "cuda"
    with pytest.raises(ConfigError) as error:
        stage_gpus(config, at_once, device=device, devices=devices)
    assert message in str(error.value) and "\n" not in str(error.value), str(error.value)


def test_the_pool_hands_concurrent_stages_distinct_gpus_and_waits_when_all_are_taken():
    pool = GpuPool(gpu_groups(["3", "7"], 1, 2, GPU_STAGES))
    first, second = pool.take(), pool.take()
    assert {first.visible, second.visible} == {"3", "7"} and first != second
    got: list[Gpus] = []
    waiter = threading.Thread(target=lambda: got.append(pool.take()))
    waiter.start()
    waiter.join(0.3)
    assert waiter.is_alive() and not got  # a third stage waits for a GPU
    pool.give(second)
    waiter.join(5)
    assert got == [second]


def test_a_stage_on_its_gpus_runs_torch_there_and_its_children_see_only_them(make_config, monkeypatch):
    from alphaspin.evaluation import vllm_environment
    from alphaspin.vllm_server import EngineSettings, server_env
    from alphaspin.workspace import Workspace

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,5,6")
    config = make_config()
    with Workspace(config, gpus=Gpus(("5",), 1)) as workspace:
        assert workspace.device == "cuda:1"  # torch's index of GPU 5 in this process
    # the engine and lm-eval's vllm child of a stage on cuda:1 see GPU 5 only
    assert engine_gpus("cuda:1", 1) == ("5", 1) and engine_gpus("cuda:0", 2) == ("2,5", 0)
    assert engine_gpus("cuda", 2) == (None, None) and engine_gpus("cpu", 1) == (None, None)
    assert engine_gpus("cuda:2", 2) == (None, None)  # does not fit: the child sees what this process sees
    assert vllm_environment(config.generation, "cuda:1") == {"CUDA_VISIBLE_DEVICES": "5"}
    assert vllm_environment(config.generation, "cuda") == {}
    on_5 = EngineSettings(python="python", model_path="m", dtype="bfloat16", device="cuda", visible_devices="5")
    assert server_env(on_5, base={"CUDA_VISIBLE_DEVICES": "2,5,6"})["CUDA_VISIBLE_DEVICES"] == "5"
    everywhere = EngineSettings(python="python", model_path="m", dtype="bfloat16", device="cuda")
    assert server_env(everywhere, base={"CUDA_VISIBLE_DEVICES": "2,5,6"})["CUDA_VISIBLE_DEVICES"] == "2,5,6"
    # engines on other GPUs run side by side; one without its own GPUs shares them all
    on_6 = EngineSettings(python="python", model_path="m", dtype="bfloat16", device="cuda", visible_devices="6")
    assert not on_5.shares_gpus_with(on_6) and on_5.shares_gpus_with(everywhere)


def _cell_gpus(barrier) -> str:  # noqa: ANN001 (a manager's barrier)
    barrier.wait(timeout=120)  # both cells at once: two worker processes
    return os.environ["CUDA_VISIBLE_DEVICES"]


def test_local_grid_cells_at_once_each_own_a_gpu():
    """`alphaspin grid --no-prefect --concurrency 2`: each worker process owns one group (set before CUDA starts)."""
    from multiprocessing import get_context

    from alphaspin.grid import cell_pool

    with get_context("spawn").Manager() as manager, cell_pool(2, gpu_groups(["4", "9"], 1, 2, "concurrency")) as pool:
        barrier = manager.Barrier(2)
        futures = [pool.submit(_cell_gpus, barrier) for _ in range(2)]
        seen = sorted(future.result(timeout=180) for future in futures)
    assert seen == ["4", "9"]


def test_more_local_grid_cells_at_once_than_gpus_is_refused_before_anything_is_written(
    tmp_path, tiny_model, monkeypatch
):
    """On a node whose process may use one GPU (stood in for: model.device resolves to cuda, one visible
    device), two cells at once are refused in one line naming the grid's concurrency; nothing is written."""
    from test_grid import tiny_grid

    import alphaspin.devices
    import alphaspin.workspace
    from alphaspin.grid import load_grid, run_local

    monkeypatch.setattr(alphaspin.workspace, "resolve_device", lambda configured: "cuda")
    monkeypatch.setattr(alphaspin.devices, "visible_devices", lambda *args, **kwargs: ["0"])
    grid = load_grid(tiny_grid(tmp_path, tiny_model))
    with pytest.raises(ConfigError) as error:
        run_local(grid, concurrency=2)
    message = str(error.value)
    assert message.startswith("concurrency (the grid file's, or --concurrency): 2 GPU stages at once need 2 GPUs")
    assert "lower concurrency" in message and "\n" not in message
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_the_flows_gpu_stages_at_once_each_get_their_own_gpus(make_config, monkeypatch, prefect_server):
    """The Prefect run with orchestration.gpu_stages=2 on a node stood in for (model.device resolves to cuda,
    the process may use GPUs 4, 9, 11): every stage function is replaced by one that records the workspace's
    GPUs and its time. Stages that ran at the same time (the members of iteration 1, evaluate@0 beside
    iteration 1) held different GPUs; every GPU stage ran on its group's first GPU as cuda:<index>."""
    import dataclasses
    import threading
    import time

    import alphaspin.devices
    import alphaspin.workspace
    from alphaspin.flows.alphaspin_run import alphaspin_run
    from alphaspin.stages import REGISTRY

    seen: dict[str, tuple] = {}
    # At the same time by construction, not by timing: each member's generate@1 waits for the other to start,
    # and evaluate@0 waits for iteration 1's generate to start (one stage after another, the waits time out).
    members_start, generate_1_started = threading.Barrier(2, timeout=120), threading.Event()

    def record(job, **inputs):
        start = time.monotonic()
        if job.node.stage == "generate" and job.iteration == 1:
            generate_1_started.set()
            members_start.wait()
        if job.node.stage == "evaluate" and job.iteration == 0:
            assert generate_1_started.wait(timeout=120), "evaluate@0 ran alone: iteration 1 did not start beside it"
        time.sleep(0.2)
        seen[job.node.label] = (job.workspace.gpus, job.workspace.device, start, time.monotonic())
        return {"score": 1.0}

    for name in list(REGISTRY):
        monkeypatch.setitem(REGISTRY, name, dataclasses.replace(REGISTRY[name], function=record))
    monkeypatch.setattr(alphaspin.workspace, "resolve_device", lambda configured: "cuda")
    monkeypatch.setattr(alphaspin.devices, "visible_devices", lambda *args, **kwargs: ["4", "9", "11"])
    state = alphaspin_run(config=make_config("orchestration.gpu_stages=2"), return_state=True)
    assert state.is_completed(), state

    gpu = {label: v for label, v in seen.items() if REGISTRY[label.split("/")[1].split("-")[0]].gpu}
    assert set(gpu) == {
        "iter-0/generate-base", "iter-0/reference_logps", "iter-0/train", "iter-0/evaluate",
        "iter-1/generate-base", "iter-1/generate-iter-0", "iter-1/reference_logps", "iter-1/train", "iter-1/evaluate",
    }  # fmt: skip
    for label, (gpus, device, _, _) in gpu.items():
        assert gpus is not None and gpus.ids[0] in ("4", "9", "11") and device == gpus.torch_device, label
        assert device == f"cuda:{['4', '9', '11'].index(gpus.ids[0])}", label
    assert all(seen[label][0] is None for label in seen if label not in gpu)  # CPU stages: nothing handed out
    overlapping = [
        (a, b)
        for a in gpu
        for b in gpu
        if a < b and gpu[a][2] < gpu[b][3] and gpu[b][2] < gpu[a][3]  # ran at the same time
    ]
    assert ("iter-1/generate-base", "iter-1/generate-iter-0") in overlapping, overlapping
    assert any(a == "iter-0/evaluate" or b == "iter-0/evaluate" for a, b in overlapping), overlapping
    for a, b in overlapping:
        assert gpu[a][0] != gpu[b][0], (a, b, gpu[a][0], gpu[b][0])


def test_alphaspin_run_refuses_more_gpu_stages_than_gpus_in_one_line_before_anything(
    tmp_path, tiny_model, monkeypatch, capsys
):
    """`alphaspin run --set orchestration.gpu_stages=3` on a node stood in for (model.device resolves to
    cuda, the process may use GPUs 0 and 1): exit 2, one line naming the knob, no run recorded."""
    from pathlib import Path

    import alphaspin.devices
    import alphaspin.workspace
    from alphaspin.flows.cli import main

    monkeypatch.setattr(alphaspin.workspace, "resolve_device", lambda configured: "cuda")
    monkeypatch.setattr(alphaspin.devices, "visible_devices", lambda *args, **kwargs: ["0", "1"])
    runs = tmp_path / "runs"
    recipe = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"
    args = ["run", "-c", str(recipe)]
    for item in (f"run.runs_root={runs}", f"model.name_or_path={tiny_model}", "orchestration.gpu_stages=3"):
        args += ["--set", item]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "alphaspin: error: orchestration.gpu_stages: 3 GPU stages at once need 3 GPUs, but this process may use 2 "
        "(0, 1; CUDA_VISIBLE_DEVICES, else the GPUs torch sees); lower orchestration.gpu_stages to at most 2"
    ), err
    assert not runs.exists()


def test_a_split_runs_child_asks_its_pool_for_the_gpus_of_its_stages_at_once(make_config):
    from alphaspin.child_runs import child_gpu_count, child_job_variables

    assert child_gpu_count(make_config())[0] == 1
    wanted, knobs = child_gpu_count(make_config("orchestration.gpu_stages=3"))
    assert wanted == 3 and knobs.endswith("× orchestration.gpu_stages = 3")
    wide = make_config("generation.tensor_parallel_size=2", "orchestration.gpu_stages=2")
    assert child_job_variables(wide, {"gpu_count": {"default": 1}}) == {"gpu_count": 4}
