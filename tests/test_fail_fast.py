"""The wrong hardware, or an engine that could not work, is refused before any stage: one line
naming the knob, exit 2, no run recorded (`alphaspin.backends.check_engines`, called by
`alphaspin run` before its first stage; `alphaspin.workspace.resolve_device`)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from alphaspin.backends import served_lora_ranks
from alphaspin.config import ConfigError, load_config
from alphaspin.models import check_weights, resolve_model_path
from alphaspin.workspace import nvidia_gpus, resolve_device

ROOT = Path(__file__).resolve().parents[1]
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="torch can use CUDA here: nothing to refuse")


def refused(tmp_path: Path, tiny_model: str, overrides: list[str], capsys) -> str:
    """``alphaspin run`` of the tiny quickstart with ``overrides``: its one-line error (exit 2, no run)."""
    from alphaspin.flows.cli import main

    runs = tmp_path / "runs"
    args = ["run", "--no-prefect", "-c", str(ROOT / "configs" / "quickstart.yaml")]
    for override in [f"run.runs_root={runs}", f"model.name_or_path={tiny_model}", *overrides]:
        args += ["--set", override]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("alphaspin: error: ") and "\n" not in err, err
    assert not runs.exists()  # nothing recorded: no run.json, no stage
    return err.removeprefix("alphaspin: error: ")


@pytest.fixture
def fake_gpu_node(tmp_path, monkeypatch):
    """This node as a GPU node whose GPUs torch cannot use: an ``nvidia-smi`` on PATH that answers
    the query as the real one does (a driver and two GPUs), while this process's torch has no CUDA."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'NVIDIA H100 80GB HBM3, 525.60.13'\necho 'NVIDIA H100 80GB HBM3, 525.60.13'\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")  # first: before a real one
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    nvidia_gpus.cache_clear()
    yield
    nvidia_gpus.cache_clear()


# -- the device -------------------------------------------------------------------------------------
@no_cuda
def test_cuda_asked_for_without_usable_cuda_names_torch_build_and_driver(tmp_path, tiny_model, capsys):
    err = refused(tmp_path, tiny_model, ["model.device=cuda"], capsys)
    assert err.startswith("model.device: cuda, but torch cannot use CUDA here: torch ")
    assert f"torch {torch.__version__} (" in err and "torch.cuda.is_available() False" in err
    build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "torch.version.cuda None"
    assert build in err
    assert (
        ("driver" in err)
        if shutil.which("nvidia-smi")
        else err.endswith("no nvidia-smi on this node (no NVIDIA driver)")
    )


@no_cuda
def test_auto_device_does_not_fall_back_to_the_cpu_on_a_gpu_node(
    tmp_path, tiny_model, capsys, fake_gpu_node, monkeypatch
):
    err = refused(tmp_path, tiny_model, [], capsys)
    assert err.startswith("model.device: unset (auto), but this node's GPUs are unusable: nvidia-smi lists 2 GPU(s) ")
    assert "(NVIDIA H100 80GB HBM3), driver 525.60.13" in err and "torch.cuda.is_available() False" in err
    assert err.endswith("or set model.device: cpu to run on the CPU anyway")
    # saying CPU on purpose runs: model.device cpu, or every GPU hidden from the process
    assert resolve_device("cpu") == "cpu"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert resolve_device(None) == resolve_device("auto") == "cpu"


@no_cuda
def test_cuda_on_a_gpu_node_torch_cannot_use_names_the_driver(fake_gpu_node):
    with pytest.raises(
        ConfigError, match=r"^model\.device: cuda:1, but torch cannot use CUDA here: .*driver 525\.60\.13$"
    ):
        resolve_device("cuda:1")


def test_without_nvidia_smi_auto_is_the_cpu_and_says_nothing(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi
    nvidia_gpus.cache_clear()
    try:
        assert nvidia_gpus() is None
        assert resolve_device(None) == ("cuda" if torch.cuda.is_available() else "cpu")
    finally:
        nvidia_gpus.cache_clear()


@pytest.mark.parametrize("recipe", ["paper-gemma-2b.yaml", "spin-official.yaml"])
def test_gpu_recipes_ask_for_cuda(recipe):
    assert load_config(ROOT / "configs" / recipe).model.device == "cuda"


def test_the_paper_grid_asks_for_cuda():
    from alphaspin.grid import load_grid

    assert {cell.config.model.device for cell in load_grid(ROOT / "configs" / "grid-paper.yaml").cells} == {"cuda"}


# -- vLLM's LoRA capacity ------------------------------------------------------------------------------
def test_max_lora_rank_below_the_adapters_rank_is_refused_before_any_stage(tmp_path, tiny_model, capsys):
    err = refused(
        tmp_path, tiny_model, ["generation.backend=vllm", "training.lora.r=32", "generation.max_lora_rank=16"], capsys
    )
    assert err == (
        "generation.max_lora_rank: 16 is below training.lora.r = 32, the rank of the adapters vLLM serves "
        "(generation.backend: vllm); set generation.max_lora_rank to at least 32"
    )


def test_which_engines_serve_adapters(make_config):
    vllm_gen = make_config("generation.backend=vllm", "training.lora.r=32")
    assert served_lora_ranks(vllm_gen, "cpu") == {"generation.backend: vllm": 32}
    # t = 0 only and no judged chat: the engine serves the base alone
    base_only = make_config("generation.backend=vllm", "method.iterations=0", "evaluation.judge.enabled=false")
    assert served_lora_ranks(base_only, "cpu") == {}
    # lm-eval's vllm backend loads the adapter as a LoRA on a GPU; on a CPU it gets it merged into the weights
    lm_eval = make_config("evaluation.benchmark_backend=vllm", "training.lora.r=32")
    assert served_lora_ranks(lm_eval, "cuda") == {"evaluation.benchmark_backend: vllm": 32}
    assert served_lora_ranks(lm_eval, "cpu") == {}
    assert served_lora_ranks(make_config("training.lora.r=32"), "cuda") == {}  # transformers serves any rank


# -- the model's weights -------------------------------------------------------------------------------
def test_a_missing_model_folder_is_refused_before_any_stage(tmp_path, tiny_model, capsys):
    err = refused(tmp_path, tiny_model, [f"model.name_or_path={tmp_path / 'no-such-model'}"], capsys)
    assert err == f"model.name_or_path: no model folder at '{tmp_path / 'no-such-model'}'"


def test_a_model_folder_without_weights_is_refused(tmp_path, tiny_model, capsys):
    hollow = tmp_path / "hollow"
    shutil.copytree(tiny_model, hollow, ignore=shutil.ignore_patterns("*.safetensors"))
    err = refused(tmp_path, tiny_model, [f"model.name_or_path={hollow}"], capsys)
    assert err.startswith(f"model.name_or_path: {hollow} holds no weights (expected *.safetensors")


def test_a_missing_local_judge_is_refused_naming_its_field(tmp_path, tiny_model, capsys):
    err = refused(tmp_path, tiny_model, [f"evaluation.judge.model={tmp_path / 'no-judge'}"], capsys)
    assert err == f"evaluation.judge.model: no model folder at '{tmp_path / 'no-judge'}'"


def test_a_hub_id_the_offline_cache_lacks_is_refused(tmp_path, tiny_model, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    err = refused(tmp_path, tiny_model, ["model.name_or_path=alphaspin-tests/never-downloaded"], capsys)
    assert err.startswith(
        "model.name_or_path: 'alphaspin-tests/never-downloaded' is not a local folder, the hub is off (HF_HUB_OFFLINE) "
        "and the hub cache holds no copy of it"
    )
    assert "`hf download alphaspin-tests/never-downloaded`" in err


def _cached_snapshot(cache: Path, repo_id: str, model: str, with_weights: bool = True) -> Path:
    """``repo_id`` in a hub cache laid out as huggingface_hub lays it out (refs/main → snapshots/<commit>)."""
    commit = "0" * 40
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    ignore = None if with_weights else shutil.ignore_patterns("*.safetensors")
    shutil.copytree(model, snapshot, ignore=ignore)
    return snapshot


def test_offline_a_cached_hub_model_is_its_local_snapshot(tmp_path, tiny_model, monkeypatch):
    """Offline, a hub id the cache holds resolves to its snapshot folder: transformers and the vLLM
    engine get the same local folder; a cached copy without weights is refused."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    snapshot = _cached_snapshot(tmp_path / "hub", "acme/tiny", tiny_model)
    assert resolve_model_path("acme/tiny") == str(snapshot)
    check_weights("acme/tiny")
    _cached_snapshot(tmp_path / "hub", "acme/config-only", tiny_model, with_weights=False)
    with pytest.raises(
        FileNotFoundError,
        match=r"^evaluation\.judge\.model: 'acme/config-only' \(the hub cache's .*\) holds no weights",
    ):
        check_weights("acme/config-only", "evaluation.judge.model")
    # with the hub on, a hub id is left to the download (transformers, the engine)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert resolve_model_path("acme/not-cached") == "acme/not-cached"
