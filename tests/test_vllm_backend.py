"""The vLLM backend: request building (no GPU, no vLLM), the conversion to vLLM objects against a
stand-in `vllm` module, and one real multi-LoRA generation on a GPU (skipped without one)."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
import torch

from alphaspin.backends import make_backend
from alphaspin.config import GenerationConfig
from alphaspin.generation import build_requests, render_prompt_ids, request_seed
from alphaspin.models import load_tokenizer
from alphaspin.vllm_backend import (
    VllmBackend,
    build_vllm_inputs,
    engine_kwargs,
    lora_int_id,
    lora_spec,
    serving_lora_rank,
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


def test_per_request_seeds_off_leaves_seeding_to_the_engine(tokenizer, tmp_path):
    """generation.per_request_seeds=false: no row carries a seed (vLLM's batched sampler), the engine
    gets generation.seed (else 0); the generate stage's cache key changes only then, and only on vLLM."""
    from alphaspin.config import AlphaSpinConfig
    from alphaspin.stages.generate import reads

    _, requests = _mixture_requests(tokenizer, {"base": None, "iter-0": "/x/a0", "iter-1": "/x/a1"})
    batched = CONFIG.model_copy(update={"per_request_seeds": False})
    assert all("seed" not in i["sampling"] for i in build_vllm_inputs(requests, batched))
    assert engine_kwargs("/m", batched, "float32", [])["seed"] == 0
    assert engine_kwargs("/m", batched.model_copy(update={"seed": 5}), "float32", [])["seed"] == 5
    assert "seed" not in engine_kwargs("/m", CONFIG, "float32", [])  # per-request seeds: engine seed unused

    default = AlphaSpinConfig(generation=CONFIG)
    assert "generation.per_request_seeds" not in reads(default, 1, "base")  # keys of existing runs unchanged
    off = AlphaSpinConfig(generation=batched)
    assert reads(off, 1, "base") == {**reads(default, 1, "base"), "generation.per_request_seeds": False}
    on_cpu = AlphaSpinConfig(generation=GenerationConfig(per_request_seeds=False))  # transformers: no effect
    assert reads(on_cpu, 1, "base") == reads(AlphaSpinConfig(), 1, "base")


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


def test_engine_serves_every_adapter_in_one_engine(tmp_path):
    adapters = [_adapter(tmp_path / "a0"), _adapter(tmp_path / "a1", rank=8)]
    kwargs = engine_kwargs("/models/m", CONFIG.model_copy(update={"tensor_parallel_size": 2}), torch.bfloat16, adapters)
    assert kwargs == {
        "model": "/models/m",
        "tokenizer": "/models/m",
        "dtype": "bfloat16",
        "tensor_parallel_size": 2,
        "gpu_memory_utilization": 0.85,
        "generation_config": "vllm",
        "enable_lora": True,
        "max_lora_rank": 16,
        "max_loras": 2,
        "max_cpu_loras": 2,
    }
    base_only = engine_kwargs("/models/m", CONFIG, "float32", [])
    assert base_only["enable_lora"] is False and "max_loras" not in base_only and base_only["dtype"] == "float32"


def test_lora_rank_is_rounded_up_to_a_served_rank_and_checked(tmp_path):
    assert serving_lora_rank(GenerationConfig(max_lora_rank=12), []) == 16
    assert serving_lora_rank(GenerationConfig(max_lora_rank=64), []) == 64
    with pytest.raises(ValueError, match="generation.max_lora_rank"):
        serving_lora_rank(GenerationConfig(max_lora_rank=16), [_adapter(tmp_path / "big", rank=32)])


# -- the conversion to vLLM objects, against a stand-in vllm module -----------------------------
class _Recorder:
    def __init__(self, **kwargs):
        self.kwargs = kwargs


def _fake_vllm(monkeypatch) -> dict:
    """Install a minimal `vllm` whose LLM records its calls and answers each prompt with its own
    last prompt token then EOS (finish_reason "stop"), or, when max_tokens is 1, with that token
    alone (finish_reason "length", as vLLM reports a row cut off by max_tokens); returns the record."""
    seen: dict = {"shutdown": 0, "cleanup": 0}

    class LoRARequest:
        def __init__(self, lora_name, lora_int_id, lora_path):
            self.args = (lora_name, lora_int_id, lora_path)

    class Core:
        def shutdown(self):
            seen["shutdown"] += 1

    class LLM:
        def __init__(self, **kwargs):
            seen["engine"] = kwargs
            self.llm_engine = types.SimpleNamespace(engine_core=Core())

        def generate(self, prompts, params, use_tqdm=True, lora_request=None):
            seen.update(prompts=prompts, params=params, lora_request=lora_request)
            eos = seen["eos"]
            outputs = []
            for p, param in zip(prompts, params, strict=True):
                cut = param.kwargs["max_tokens"] < 2
                ids = [p["prompt_token_ids"][-2]] + ([] if cut else [eos])
                completion = types.SimpleNamespace(token_ids=ids, finish_reason="length" if cut else "stop")
                outputs.append(types.SimpleNamespace(outputs=[completion]))
            return outputs

    def cleanup():
        seen["cleanup"] += 1

    vllm = types.ModuleType("vllm")
    vllm.LLM, vllm.SamplingParams = LLM, _Recorder
    inputs = types.ModuleType("vllm.inputs")
    inputs.TokensPrompt = lambda prompt_token_ids: {"prompt_token_ids": prompt_token_ids}
    lora = types.ModuleType("vllm.lora")
    lora_request = types.ModuleType("vllm.lora.request")
    lora_request.LoRARequest = LoRARequest
    distributed = types.ModuleType("vllm.distributed")
    parallel_state = types.ModuleType("vllm.distributed.parallel_state")
    parallel_state.cleanup_dist_env_and_memory = cleanup
    modules = {
        "vllm": vllm,
        "vllm.inputs": inputs,
        "vllm.lora": lora,
        "vllm.lora.request": lora_request,
        "vllm.distributed": distributed,
        "vllm.distributed.parallel_state": parallel_state,
    }
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    return seen


def test_backend_sends_each_request_with_its_lora_request_and_seed(tokenizer, tmp_path, monkeypatch):
    seen = _fake_vllm(monkeypatch)
    seen["eos"] = tokenizer.eos_token_id
    adapters = {"base": None, "iter-0": _adapter(tmp_path / "a0"), "iter-1": _adapter(tmp_path / "a1")}
    backend = make_backend(
        CONFIG,
        "/models/m",
        tokenizer,
        torch.bfloat16,
        "cuda",
        [adapters["iter-0"], adapters["iter-1"], adapters["iter-0"]],
    )
    assert isinstance(backend, VllmBackend)
    assert seen["engine"]["enable_lora"] and seen["engine"]["max_loras"] == 2 and seen["engine"]["dtype"] == "bfloat16"
    members, requests = _mixture_requests(tokenizer, adapters)
    texts = backend.generate(requests)
    # one call for the whole mixed batch, each row with its own adapter and seed
    assert [p["prompt_token_ids"] for p in seen["prompts"]] == [list(r.prompt_ids) for r in requests]
    expected_loras = [None if adapters[m] is None else tuple(lora_spec(adapters[m]).values()) for m in members]
    assert [lr.args if lr else None for lr in seen["lora_request"]] == expected_loras
    assert [p.kwargs["seed"] for p in seen["params"]] == [r.seed for r in requests]
    assert all(p.kwargs["stop_token_ids"] == [tokenizer.eos_token_id] for p in seen["params"])
    # decoded with our tokenizer, special tokens dropped
    assert texts == [tokenizer.decode([r.prompt_ids[-2]], skip_special_tokens=True).strip() for r in requests]
    with pytest.raises(ValueError, match="not served"):
        backend.generate(build_requests(tokenizer, PROMPTS[:1], str(tmp_path / "other"), 0, 0, "iter-5"))
    backend.close()
    backend.close()  # idempotent
    assert seen["shutdown"] == 1 and seen["cleanup"] == 1


def test_base_only_engine_sends_no_lora_requests(tokenizer, monkeypatch):
    seen = _fake_vllm(monkeypatch)
    seen["eos"] = tokenizer.eos_token_id
    backend = VllmBackend("/models/m", tokenizer, CONFIG, dtype=torch.float16)
    backend.generate(build_requests(tokenizer, PROMPTS, None, 0, 0, "base"))
    assert seen["engine"]["enable_lora"] is False and seen["lora_request"] is None
    assert backend.generate([]) == []
    backend.close()


def test_finish_reason_length_is_reported_as_truncated(tokenizer, monkeypatch):
    seen = _fake_vllm(monkeypatch)
    seen["eos"] = tokenizer.eos_token_id
    requests = build_requests(tokenizer, PROMPTS, None, 0, 0, "base")
    backend = VllmBackend("/models/m", tokenizer, CONFIG, dtype=torch.float16)
    ended = backend.complete(requests)
    assert [c.truncated for c in ended] == [False] * len(PROMPTS)  # stopped at EOS
    backend.config = CONFIG.model_copy(update={"max_new_tokens": 1})
    cut = backend.complete(requests)
    assert [p.kwargs["max_tokens"] for p in seen["params"]] == [1] * len(PROMPTS)
    assert [c.truncated for c in cut] == [True] * len(PROMPTS)  # finish_reason "length"
    assert [c.text for c in cut] == [c.text for c in ended] == backend.generate(requests)
    backend.close()


def test_missing_vllm_is_a_clear_error(tokenizer, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError
    with pytest.raises(ImportError, match="generation.backend: vllm"):
        make_backend(CONFIG, "/models/m", tokenizer, torch.bfloat16, "cuda", [])


# -- real generation on a GPU --------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_vllm_generates_a_multi_lora_mixture_on_gpu(tokenizer, tmp_path):
    pytest.importorskip("vllm", reason="vllm is not installed (pip install 'alphaspin[gpu]')")
    from peft import LoraConfig, get_peft_model

    from alphaspin.models import load_base_model, resolve_model_path

    model_path = resolve_model_path("builtin:smollm2-135m-instruct")
    adapters = {"base": None}
    for k in range(2):  # two random (non-zero) adapters, so each member really differs from the base
        torch.manual_seed(k)
        lora = LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        peft_model = get_peft_model(load_base_model(model_path), lora)
        peft_model.save_pretrained(tmp_path / f"a{k}")
        adapters[f"iter-{k}"] = str(tmp_path / f"a{k}")
    free_before, _ = torch.cuda.mem_get_info()
    backend = VllmBackend(
        model_path,
        tokenizer,
        CONFIG.model_copy(update={"gpu_memory_utilization": 0.3}),
        dtype=torch.bfloat16,
        adapter_paths=[adapters["iter-0"], adapters["iter-1"]],
    )
    try:
        members, requests = _mixture_requests(tokenizer, adapters)
        texts = backend.generate(requests)
        assert len(texts) == len(requests) and all(isinstance(t, str) for t in texts)
        one_token = CONFIG.model_copy(update={"gpu_memory_utilization": 0.3, "max_new_tokens": 1})
        backend.config, config = one_token, backend.config
        assert all(c.truncated for c in backend.complete(requests))  # finish_reason "length" from the engine
        backend.config = config
        assert backend.generate(requests) == texts  # per-request seeds: the same text every time
        assert backend.generate(requests[2:3]) == texts[2:3]  # and whatever else shares the batch
        greedy = GenerationConfig(backend="vllm", temperature=0.0, max_new_tokens=16)
        backend.config = greedy
        by_member = {m: backend.generate(build_requests(tokenizer, PROMPTS, adapters[m], 0, 0, m)) for m in adapters}
        assert by_member["iter-0"] != by_member["base"] and by_member["iter-1"] != by_member["iter-0"]
    finally:
        backend.close()
    free_after, _ = torch.cuda.mem_get_info()
    assert free_after > free_before - 2 * 2**30, "the engine's GPU memory was not released"
