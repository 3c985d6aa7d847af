"""``alphaspin export``: θ_t of a tiny run as a merged transformers folder and as a PEFT adapter folder,
both giving the pipeline's own logits; the CLI's one-line errors and --push-to-hub's token check."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import yaml
from peft import AutoPeftModelForCausalLM, PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from alphaspin.export import export_adapter
from alphaspin.models import load_base_model, load_tokenizer
from alphaspin.pipeline import run
from alphaspin.runs import Run
from alphaspin.stage_spec import Node

ROOT = Path(__file__).resolve().parents[1]


def _cli():
    """The worktree's flows/cli.py (the installed alphaspin.flows may be another checkout)."""
    spec = importlib.util.spec_from_file_location("cli_under_test", ROOT / "flows" / "cli.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model):
    """One iteration (t = 0) of the tiny run, evaluated on held-out likelihood and pairs only."""
    from conftest import NO_BENCHMARKS, tiny_overrides

    from alphaspin.config import load_config

    root = tmp_path_factory.mktemp("runs")
    overrides = [*tiny_overrides(tiny_model, root), "method.iterations=0", *NO_BENCHMARKS]
    config = load_config(ROOT / "configs" / "quickstart.yaml", overrides)
    run(config)
    return config


@pytest.fixture(scope="module")
def pipeline_policy(finished_run, tmp_path_factory):
    """θ_0 as the pipeline holds it: the base model wrapped with the stored adapter."""
    adapter = tmp_path_factory.mktemp("adapter") / "adapter"
    Run(finished_run).dir(Node("train", 0)).get_dir("adapter", adapter)
    base = load_base_model(finished_run.model.name_or_path, finished_run.model.dtype, "cpu")
    return PeftModel.from_pretrained(base, str(adapter)).eval()


def _pair_ids(config) -> torch.Tensor:
    """Chat-template token ids of a few training pairs' prompt + answer, padded to one batch."""
    tokenizer = load_tokenizer(config.model.name_or_path, config.model.chat_template)
    pairs = Run(config).dir(Node("build_pairs", 0)).read_table("pairs.parquet").head(3)
    rows = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p.prompt}, {"role": "assistant", "content": p.rejected}],
            tokenize=True,
            return_dict=True,
        )["input_ids"]
        for p in pairs.itertuples()
    ]
    width = min(len(r) for r in rows)
    return torch.tensor([r[:width] for r in rows])


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def _check_folder(config, out: Path) -> None:
    card = (out / "README.md").read_text()
    evaluation = Run(config).dir(Node("evaluate", 0)).verify().metrics
    assert "heldout/loglik_per_token" in evaluation
    assert f"| heldout/loglik_per_token | {evaluation['heldout/loglik_per_token']:.4g} |" in card
    assert "metrics.json" not in card  # the full card: the metrics themselves
    assert str(Path(config.model.name_or_path).parent) not in card and str(out) not in card
    front = yaml.safe_load(card.split("---\n", 2)[1])
    merged = not (out / "adapter_config.json").exists()
    assert front["library_name"] == ("transformers" if merged else "peft") and "alpha-spin" in front["tags"]
    run_tokenizer = load_tokenizer(config.model.name_or_path, config.model.chat_template)
    assert AutoTokenizer.from_pretrained(out).chat_template == run_tokenizer.chat_template
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["temperature"] == config.generation.temperature and generation["do_sample"] is True


def test_merged_export_is_a_plain_model_with_the_pipelines_logits(finished_run, pipeline_policy, tmp_path):
    out = export_adapter(finished_run.run.run_id, finished_run.run.runs_root, 0, tmp_path / "merged", merge=True)
    assert not (out / "adapter_config.json").exists() and (out / "config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = _pair_ids(finished_run)
    expected = _logits(pipeline_policy, ids)
    assert (expected - _logits(load_base_model(finished_run.model.name_or_path), ids)).abs().max() > 1e-4
    assert (_logits(merged, ids) - expected).abs().max() < 1e-4
    _check_folder(finished_run, out)
    card = (out / "README.md").read_text()  # the card says what the folder is: merged weights, not an adapter
    assert "library_name: transformers" in card and "with its LoRA adapter merged in" in card
    assert "PeftModel" not in card and "LoRARequest" not in card


def test_adapter_export_loads_with_peft(finished_run, pipeline_policy, tmp_path):
    out = tmp_path / "adapter"
    out.mkdir()  # an empty folder is fine
    export_adapter(finished_run.run.run_id, finished_run.run.runs_root, 0, out)
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= {p.name for p in out.iterdir()}
    ids = _pair_ids(finished_run)
    expected = _logits(pipeline_policy, ids)
    base = load_base_model(finished_run.model.name_or_path)
    assert (_logits(PeftModel.from_pretrained(base, str(out)).eval(), ids) - expected).abs().max() < 1e-4
    auto = AutoPeftModelForCausalLM.from_pretrained(str(out)).eval()  # the base named in adapter_config.json
    assert (_logits(auto, ids) - expected).abs().max() < 1e-4
    _check_folder(finished_run, out)


def test_adapter_card_written_by_train_names_no_local_path(finished_run):
    card = Run(finished_run).dir(Node("train", 0)).read_bytes("adapter/README.md").decode()
    assert "tiny-llama-seed0" in card and str(Path(finished_run.model.name_or_path).parent) not in card
    assert "iter-0/evaluate/metrics.json" in card and "| pairs: trained | 6 |" in card


def test_cli_errors_are_one_line_naming_the_flag(finished_run, tmp_path, capsys, monkeypatch):
    cli = _cli()
    root, run_id = finished_run.run.runs_root, finished_run.run.run_id
    args = cli.build_parser().parse_args(["export", "--run-id", "R", "--iteration", "0", "--out", "D", "--merge"])
    assert args.func is cli.cmd_export and args.merge and args.push_to_hub is None and args.runs_root == "./runs"

    def error(*argv: str) -> str:
        assert cli.main(["--log-level", "WARNING", "export", *argv]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("alphaspin: error: ")
        return lines[0]

    out = str(tmp_path / "out")
    assert "--run-id nope" in error("--run-id", "nope", "--runs-root", root, "--iteration", "0", "--out", out)
    assert "--iteration 3" in error("--run-id", run_id, "--runs-root", root, "--iteration", "3", "--out", out)
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    assert "--out" in error("--run-id", run_id, "--runs-root", root, "--iteration", "0", "--out", str(full))
    # a run whose iteration 0 has not been trained
    fresh = finished_run.model_copy(deep=True)
    fresh.run.run_id = "not-trained"
    Run(fresh).ensure()
    message = error("--run-id", "not-trained", "--runs-root", root, "--iteration", "0", "--out", out)
    assert "--iteration 0" in message and "not done" in message
    # --push-to-hub without HF_TOKEN: refused before anything is exported
    monkeypatch.delenv("HF_TOKEN", raising=False)
    message = error("--run-id", run_id, "--runs-root", root, "--iteration", "0", "--out", out, "--push-to-hub", "a/b")
    assert "--push-to-hub a/b" in message and "HF_TOKEN" in message and not Path(out).exists()


def test_cli_export_without_push_uploads_nothing(finished_run, tmp_path, capsys, monkeypatch):
    import huggingface_hub

    class NoHub:
        def __init__(self, *args, **kwargs):
            raise AssertionError("an upload was attempted")

    monkeypatch.setattr(huggingface_hub, "HfApi", NoHub)
    monkeypatch.setenv("HF_TOKEN", "hf_not_used")
    out = tmp_path / "out"
    argv = ["export", "--run-id", finished_run.run.run_id, "--runs-root", finished_run.run.runs_root]
    assert _cli().main([*argv, "--iteration", "0", "--out", str(out)]) == 0
    assert "exported iter-0" in capsys.readouterr().out and (out / "adapter_model.safetensors").exists()
