"""The train stage on several processes (`alphaspin.distributed`): a child ``accelerate launch`` of
real TRL DPO ranks on CPU (gloo), checked against the one-process trainer.

The stage function (`alphaspin.stages.train.train_pairs`) runs here on made-up pairs with made-up reference
log-probs: what is checked is how training is executed, not what the pairs say. Failures are injected into
the ranks through ``tests/distributed_inject/sitecustomize.py``; the product code is unchanged.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load

from alphaspin import distributed
from alphaspin.config import AlphaSpinConfig
from alphaspin.stage_spec import Job, Node
from alphaspin.stages.train import train_pairs
from alphaspin.storage import RunStorage
from alphaspin.workspace import Workspace

ROOT = Path(__file__).parents[1]
INJECT = ROOT / "tests" / "distributed_inject"
PAIRS = 8


def pairs_frame() -> pd.DataFrame:
    """Eight short pairs with fixed reference log-probs (the trainer takes them as given)."""
    n = range(PAIRS)
    return pd.DataFrame(
        {
            "id": [f"p{i}" for i in n],
            "prompt": [f"What is {i} plus {i}?" for i in n],
            "chosen": [f"It is {2 * i}." for i in n],
            "rejected": [f"Maybe {i + 7}, or not." for i in n],
            "rejected_truncated": [i % 3 == 0 for i in n],
            "ref_chosen_logps": [-20.0 - i for i in n],
            "ref_rejected_logps": [-25.0 + i for i in n],
        }
    )


def train(config: AlphaSpinConfig, progress: list | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """The train stage of iteration 0 on `pairs_frame`: its metrics and the stored adapter's tensors."""
    stage = RunStorage(config.run.runs_root, "run").stage(0, "train")
    hook = (lambda fraction, message: progress.append((fraction, message))) if progress is not None else None
    with Workspace(config, progress=hook) as ws:
        job = Job(node=Node("train", 0), config=config, out=stage, workspace=ws, key="test")
        metrics = train_pairs(job, pairs_frame(), None)
    return metrics, load(stage.read_bytes("adapter/adapter_model.safetensors"))


def worst_relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """max over tensors of max|a − b| / max|a| (LoRA B starts at 0, so for B this is relative to the update)."""
    assert a.keys() == b.keys()
    return max(((a[k] - b[k]).abs().max() / a[k].abs().max()).item() for k in a)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def inject(monkeypatch: pytest.MonkeyPatch):
    """``inject("raise:1")``: the ranks started from now on break as tests/distributed_inject says."""

    def set_(what: str) -> None:
        monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(INJECT), str(ROOT), os.environ.get("PYTHONPATH", "")]))
        monkeypatch.setenv("ALPHASPIN_TEST_INJECT", what)

    return set_


# Four optimizer steps of one pair per rank, a checkpoint after each (LoRA dropout on: the resumed ranks
# must get their own RNG states back).
TWO_RANKS = ["training.num_processes=2", "training.per_device_train_batch_size=1", "training.save_steps=1"]


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory, tiny_model) -> tuple[dict, dict[str, torch.Tensor], list]:
    from conftest import tiny_overrides

    from alphaspin.config import load_config

    root = tmp_path_factory.mktemp("two-ranks")
    config = load_config(ROOT / "configs/quickstart.yaml", [*tiny_overrides(tiny_model, root / "runs"), *TWO_RANKS])
    progress: list = []
    metrics, adapter = train(config, progress)
    return metrics, adapter, progress


# -- bad input: one line naming the knob, before anything is written -----------------------------------
def test_too_many_processes_fail_before_anything_is_written(make_config):
    config = make_config(f"training.num_processes={(os.cpu_count() or 1) + 1}")
    stage = RunStorage(config.run.runs_root, "run").stage(0, "train")
    with Workspace(config) as ws, pytest.raises(ValueError, match=r"^training\.num_processes=\d+: .*CPU core") as e:
        train_pairs(Job(Node("train", 0), config, stage, ws, "test"), pairs_frame(), None)
    assert "\n" not in str(e.value)
    assert stage.list_files() == []


def test_missing_accelerate_names_the_knob(make_config, monkeypatch):
    monkeypatch.setattr(distributed, "find_spec", lambda name: None if name == "accelerate" else object())
    with pytest.raises(ValueError, match=r"^training\.num_processes=2: .*accelerate is not installed"):
        distributed.check_launch(make_config("training.num_processes=2").training, "cpu")


def test_deepspeed_needs_a_gpu_and_an_existing_file(make_config, monkeypatch, tmp_path):
    training = make_config(f"training.deepspeed_config={tmp_path / 'zero2.json'}").training
    with pytest.raises(ValueError, match=r"^training\.deepspeed_config=.*: DeepSpeed ZeRO needs GPUs"):
        distributed.check_launch(training, "cpu")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match=r"^training\.deepspeed_config=.*zero2\.json: no such file$"):
        distributed.check_launch(training, "cuda")


def test_more_processes_than_gpus(make_config, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ValueError, match=r"^training\.num_processes=4: 4 processes per machine but .* 2 GPU"):
        distributed.check_launch(make_config("training.num_processes=4").training, "cuda")
    distributed.check_launch(make_config("training.num_processes=4", "training.num_machines=2",
                                         "training.main_process_ip=10.0.0.1").training, "cuda")  # fmt: skip


def test_fp16_on_cpu_and_uneven_machines_are_refused(make_config):
    with pytest.raises(ValueError, match=r"^training\.mixed_precision=fp16 needs a GPU"):
        distributed.check_launch(
            make_config("training.num_processes=2", "training.mixed_precision=fp16").training, "cpu"
        )
    with pytest.raises(ValueError, match=r"training\.num_processes: 3 is not a multiple of training\.num_machines"):
        make_config("training.num_processes=3", "training.num_machines=2", "training.main_process_ip=10.0.0.1")
    with pytest.raises(ValueError, match=r"training\.main_process_ip: needed"):
        make_config("training.num_processes=2", "training.num_machines=2")


def test_launch_command(make_config, tmp_path):
    training = make_config(
        "training.num_processes=4",
        "training.num_machines=2",
        "training.main_process_ip=10.0.0.1",
        "training.mixed_precision=bf16",
    ).training
    command = distributed.launch_command(training, "cuda", "s3://b/spec.json", tmp_path, 1, 29501)
    flags = dict(zip(command[3:-5:2], command[4:-5:2], strict=False))
    assert command[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    assert flags["--num_processes"] == "4" and flags["--num_machines"] == "2" and flags["--machine_rank"] == "1"
    assert flags["--main_process_ip"] == "10.0.0.1" and flags["--main_process_port"] == "29501"
    assert flags["--mixed_precision"] == "bf16" and flags["--max_restarts"] == "0"
    assert "--multi_gpu" in command and "--use_deepspeed" not in command
    assert command[-5:] == ["-m", "alphaspin.distributed", "worker", "s3://b/spec.json", str(tmp_path)]
    deepspeed = training.model_copy(update={"deepspeed_config": "/etc/zero2.json"})
    command = distributed.launch_command(deepspeed, "cuda", "s3://b/spec.json", tmp_path, 0, 29501)
    assert "--multi_gpu" not in command and command[command.index("--deepspeed_config_file") + 1] == "/etc/zero2.json"


def test_default_config_keeps_the_train_stages_cache_key(make_config):
    """The new knobs enter the key only when set: existing runs keep their cached train stages."""
    from alphaspin.stages.train import reads

    fields = reads(make_config(), 0, None)
    assert not any(("process" in k or "machine" in k or "precision" in k or "deepspeed" in k) for k in fields)
    assert reads(make_config("training.num_processes=2"), 0, None)["training.num_processes"] == 2
    assert reads(make_config("training.main_process_port=29555"), 0, None) == fields


# -- a failing child never hangs the stage -----------------------------------------------------------
def test_a_rank_that_raises_fails_the_stage_with_its_error(make_config, inject):
    inject("raise:1")
    config = make_config("training.num_processes=2")
    start = time.monotonic()
    with pytest.raises(distributed.DistributedTrainingError, match="injected failure on rank 1") as error:
        train(config)
    assert time.monotonic() - start < 120
    assert "exit code 1" in str(error.value)


def test_a_failing_parent_kills_the_whole_launch(tmp_path):
    """The launcher and its ranks are one process group; the stage kills it when it fails itself."""
    script = "import os, subprocess, sys, time; print(os.getpid(), subprocess.Popen([sys.executable, '-c', "
    script += "'import time; time.sleep(60)']).pid, flush=True); time.sleep(60)"
    polls = []

    def interrupted() -> None:
        polls.append(1)
        if (tmp_path / "launch.out").read_text().strip():
            raise KeyboardInterrupt

    start = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        distributed.supervise([sys.executable, "-c", script], tmp_path, "test", on_poll=interrupted)
    assert time.monotonic() - start < 30
    for pid in map(int, (tmp_path / "launch.out").read_text().split()):
        deadline = time.monotonic() + 10  # the grandchild got SIGTERM with the group; it may take a moment to exit
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not alive(pid), pid


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting for its reaper does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in "ZX"
    except FileNotFoundError:
        return False


# -- the same training as one process -------------------------------------------------------------------
@pytest.mark.slow
def test_two_processes_match_one_process_with_twice_the_batch(make_config, tmp_path):
    """2 ranks × 2 pairs per step vs 1 process × 4 pairs per step, 2 optimizer steps, fp32, LoRA dropout off
    (the ranks draw dropout masks from their own RNG streams, one process from one stream).

    Here's the maths: each step both runs see the same 4 pairs (accelerate shards the batches of one seeded
    sampler: rank r takes batches 2k + r of size 2), TRL's DPO loss is a mean over pairs, and DDP averages
    the ranks' gradients, so mean(mean over pairs 0–1, mean over pairs 2–3) = mean over pairs 0–3: the same
    gradient up to the order of float additions (padding differs too: each rank pads to its own longest
    pair, masked out). In fp32 that is ~1e-7 relative per gradient; AdamW then divides by √v + ε, which
    amplifies differences of gradient entries near 0 (ε = 1e-8). Measured on this test: max|Δ| ≈ 4e-8
    absolute, 5e-5 relative to a tensor's largest entry (for LoRA B, which starts at 0, that is relative to
    the update itself); losses equal to 1e-6. Bound: 1e-3 relative (20× margin) — a wrong averaging
    (sum instead of mean, one rank's gradient only, a different data order) is off by O(1).
    """
    one_metrics, one = train(make_config("training.per_device_train_batch_size=4", "training.lora.lora_dropout=0"))
    two_config = make_config(
        "training.per_device_train_batch_size=2",
        "training.lora.lora_dropout=0",
        "training.num_processes=2",
        f"run.runs_root={tmp_path / 'two-ranks'}",
    )
    two_metrics, two = train(two_config)
    assert one_metrics["train/steps"] == two_metrics["train/steps"] == 2
    assert worst_relative_difference(one, two) < 1e-3
    assert two_metrics["train/loss"] == pytest.approx(one_metrics["train/loss"], rel=1e-5)


@pytest.mark.slow
def test_progress_of_rank_zero_reaches_the_stage(two_process_run):
    metrics, _, progress = two_process_run
    assert metrics["train/steps"] == 4 and metrics["resumed_from"] is None
    assert progress[-1] == (1.0, "step 4/4")


@pytest.mark.slow
def test_two_processes_resume_from_a_stored_checkpoint(two_process_run, make_config, inject):
    """Rank 0 is SIGKILLed after checkpoint 2 is stored: the stage fails (never hangs); run again, the ranks
    resume from checkpoint 2 (each with its own RNG state: LoRA dropout is on) and end where an uninterrupted
    2-process run ends, bit for bit (measured: the same arithmetic in the same order; a two-rank all-reduce is
    one commutative addition), as the one-process resume does in test_resume.py."""
    config = make_config(*TWO_RANKS)
    inject("kill-after-checkpoint:2")
    with pytest.raises(distributed.DistributedTrainingError, match="exit code"):
        train(config)
    stage = RunStorage(config.run.runs_root, "run").stage(0, "train")
    assert stage.read_manifest() is None and stage.list_files("_scratch/checkpoints/checkpoint-2")
    assert "_scratch/checkpoints/checkpoint-2/rng_state_1.pth" in stage.list_files("_scratch/checkpoints")
    inject("")
    metrics, resumed = train(config)
    assert metrics["resumed_from"] == "checkpoint-2"
    _, uninterrupted, _ = two_process_run
    assert uninterrupted.keys() == resumed.keys()
    assert all(torch.equal(uninterrupted[k], resumed[k]) for k in resumed)


@pytest.mark.slow
def test_two_machines_on_localhost_train_like_two_processes_on_one(two_process_run, make_config, tmp_path):
    """Two launchers (machine ranks 0 and 1, one process each) rendezvous on 127.0.0.1: machine 0 is the
    stage, machine 1 joins with the documented command and its own work folder (no shared disk but run
    storage). Same ranks, same data, same arithmetic as 2 processes on one machine: equal adapters (measured:
    bit for bit; bound 1e-6 relative because each rank here gets both cores' threads instead of one, which may
    reorder a matmul's sums on a larger model)."""
    config = make_config(
        *TWO_RANKS, "training.num_machines=2", "training.main_process_ip=127.0.0.1", f"training.main_process_port={free_port()}"
    )  # fmt: skip
    spec = RunStorage(config.run.runs_root, "run").stage(0, "train").file(distributed.SPEC)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "alphaspin.distributed", "join", spec, "--machine-rank", "1", "--timeout", "300"]
    with (tmp_path / "machine-1.log").open("wb") as log:
        machine_1 = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            metrics, adapter = train(config)
            assert machine_1.wait(timeout=120) == 0, (tmp_path / "machine-1.log").read_text()[-3000:]
        finally:
            machine_1.kill()
    _, one_machine, _ = two_process_run
    assert metrics["train/steps"] == 4
    assert worst_relative_difference(one_machine, adapter) < 1e-6
