"""Kill -9 inside generation and inside training, run the same command again: completed stages
are skipped, the interrupted one resumes (by shard / from its stored checkpoint), and the final
artifacts equal those of an uninterrupted run — no duplicated rows, nothing half-written."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_overrides
from safetensors.torch import load

from alphaspin.config import load_config
from alphaspin.runs import Run
from alphaspin.stage_spec import Node

pytestmark = pytest.mark.slow  # kill -9 inside real runs, then resume (minutes)

ROOT = Path(__file__).parents[1]
ITERATION_0 = ["method.iterations=0"]


def drive(point: str, overrides: list[str]) -> int:
    command = [sys.executable, str(ROOT / "tests" / "crash_driver.py"), point]
    for item in overrides:
        command += [item]
    return subprocess.run(command, cwd=ROOT, capture_output=True, timeout=600).returncode


def config_for(runs_root: Path, tiny_model: str) -> list[str]:
    return [*tiny_overrides(tiny_model, runs_root), *ITERATION_0]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_model) -> Run:
    overrides = config_for(tmp_path_factory.mktemp("clean"), tiny_model)
    assert drive("none", overrides) == 0
    return Run(load_config(ROOT / "configs/quickstart.yaml", overrides))


def files_of(ctx: Run) -> dict[str, bytes]:
    """Every file listed in the run's manifests, except those that hold wall times."""
    out = {}
    for stage in ("sample_prompts", "generate-base", "build_pairs", "reference_logps", "train", "evaluate"):
        folder = ctx.storage.stage(0, stage)
        manifest = folder.read_manifest()
        assert manifest is not None, stage
        for name in manifest["files"]:
            if name not in ("train_log.json", "metrics.json", "benchmarks/lm_eval/lm_eval_timing.json"):
                out[f"{stage}/{name}"] = folder.read_bytes(name)
    return out


@pytest.mark.parametrize("point", ["generate:2", "train:2"])
def test_sigkill_then_rerun_gives_the_uninterrupted_artifacts(point, uninterrupted, tmp_path, tiny_model):
    overrides = config_for(tmp_path / "runs", tiny_model)
    assert drive(point, overrides) == -signal.SIGKILL
    ctx = Run(load_config(ROOT / "configs/quickstart.yaml", overrides))
    stage = "generate-base" if point.startswith("generate") else "train"
    assert ctx.storage.stage(0, stage).read_manifest() is None  # the killed stage is not done
    partial = ctx.storage.stage(0, stage).list_files()
    if stage == "train":
        assert any("checkpoint-2" in name for name in partial)
    else:
        assert [n for n in partial if n.startswith("shards/")] == [
            "shards/shard-00000.parquet",
            "shards/shard-00001.parquet",
        ]

    assert drive("none", overrides) == 0
    resumed, clean = files_of(ctx), files_of(uninterrupted)
    assert sorted(resumed) == sorted(clean)
    for name, data in clean.items():
        if name.endswith(".safetensors"):  # compare tensors exactly, not container bytes
            a, b = load(resumed[name]), load(data)
            assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a), name
        else:
            assert resumed[name] == data, name
    pairs = ctx.dir(Node("build_pairs", 0)).read_table("pairs.parquet")
    assert pairs.id.is_unique and len(pairs) == 10
    if stage == "train":
        assert ctx.dir(Node("train", 0)).verify().metrics["resumed_from"] == "checkpoint-2"
        assert not ctx.dir(Node("train", 0)).list_files("_scratch")  # checkpoints cleared once done
