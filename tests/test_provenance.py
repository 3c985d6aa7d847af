"""Provenance (`alphaspin.provenance`): stable hashes of the chat template and tokenizer, and
`diff_runs` / `alphaspin diff` listing what differs between two runs."""

from __future__ import annotations

import importlib.util
import os

import pytest
from conftest import NO_BENCHMARKS, tiny_overrides

from alphaspin.config import load_config
from alphaspin.provenance import collect, diff_runs, lm_eval_provenance, stage_provenance
from alphaspin.storage import RunStorage
from alphaspin.workspace import Workspace

RECIPE = os.path.join(os.path.dirname(__file__), "..", "configs", "quickstart.yaml")
FAST = ["method.iterations=0", *NO_BENCHMARKS]


def _config(model: str, root, *overrides: str):
    return load_config(RECIPE, [*tiny_overrides(model, root), *FAST, *overrides])


def _collect(config) -> dict:
    with Workspace(config) as ws:
        return collect(config, ws)


def test_collect_is_stable_and_follows_the_chat_template(tiny_model, tmp_path):
    config = _config(tiny_model, tmp_path)
    first, second = _collect(config), _collect(config)
    assert first == second
    assert len(first["chat_template"]["rendered_sha256"]) == 64
    assert "tokenizer_config.json" in first["tokenizer"]["files"]
    assert first["versions"]["torch"] and first["versions"]["python"]
    zephyr = _collect(_config(tiny_model, tmp_path, "model.chat_template=zephyr"))
    assert zephyr["chat_template"]["rendered_sha256"] != first["chat_template"]["rendered_sha256"]
    assert zephyr["chat_template"]["template_sha256"] != first["chat_template"]["template_sha256"]
    assert zephyr["tokenizer"] == first["tokenizer"]  # same files, another template


def test_lm_eval_provenance_from_the_record():
    record = {
        "tasks": {"arc_easy": 0},
        "limit": 4,
        "results": {"n-shot": {"arc_easy": 0}, "versions": {"arc_easy": 1.0}, "configs": {"arc_easy": {"x": 1}}},
    }
    found = lm_eval_provenance(record)
    assert found["tasks"] == {"arc_easy": 0} and found["n_shot"] == {"arc_easy": 0} and found["limit"] == 4
    assert set(found["task_config_sha256"]) == {"arc_easy"} and found["version"]
    assert lm_eval_provenance(None) is None


@pytest.fixture(scope="module")
def two_runs(tiny_model, tmp_path_factory):
    """Three tiny runs (t = 0 only): A, A' with A's config, and B with another temperature."""
    from alphaspin.pipeline import run

    root = tmp_path_factory.mktemp("prov") / "runs"
    for run_id, extra in (("a", []), ("a2", []), ("b", ["generation.temperature=1.0"])):
        run(_config(tiny_model, root, f"run.run_id={run_id}", *extra))
    return str(root)


def test_stages_record_their_provenance(two_runs):
    found = stage_provenance(RunStorage(two_runs, "a"))
    assert set(found) == {"iter-0/generate-base", "iter-0/evaluate"}
    generation = found["iter-0/generate-base"]["generation"]
    assert generation["backend"] == "transformers" and generation["sampling"]["temperature"] == 0.7
    assert found["iter-0/generate-base"]["chat_template"]["rendered_sha256"]
    assert found["iter-0/evaluate"]["lm_eval"] is None and found["iter-0/evaluate"]["versions"]["torch"]


def test_diff_runs_lists_the_knob_and_the_sampling_change(two_runs):
    rows = diff_runs(RunStorage(two_runs, "a"), RunStorage(two_runs, "b"))
    assert "config generation.temperature: 0.7 → 1.0" in rows
    assert "iter-0/generate-base generation.sampling.temperature: 0.7 → 1.0" in rows
    assert len(rows) == 2, rows


def test_identical_runs_have_no_differences(two_runs):
    assert diff_runs(RunStorage(two_runs, "a"), RunStorage(two_runs, "a2")) == []


def test_cli_diff(two_runs, capsys):
    spec = importlib.util.spec_from_file_location(
        "cli_under_test", os.path.join(os.path.dirname(__file__), "..", "flows", "cli.py")
    )
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    assert cli.main(["diff", "a", "a2", "--runs-root", two_runs]) == 0
    assert "no differences" in capsys.readouterr().out
    assert cli.main(["diff", "a", "b", "--runs-root", two_runs]) == 0
    out = capsys.readouterr().out
    assert "2 difference(s)" in out and "generation.temperature: 0.7 → 1.0" in out
    assert cli.main(["diff", "a", "missing", "--runs-root", two_runs]) == 2
