"""The vLLM engine's parallelism and GPU memory, without vLLM or a GPU: the server's command line
(data parallel, extra arguments passed through verbatim, arguments alphaspin owns refused), lm-eval's
model_args of the same arguments, the concurrency default, the GPUs a split run's child asks for, the
bad-input checks before any stage, and the order in which GPU memory is handed from torch to the
engine (the CUDA memory calls and the engine's start replaced by recorders)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from alphaspin import gpu_memory, vllm_server
from alphaspin.backends import check_engine_gpus, check_engines
from alphaspin.child_runs import child_gpu_count, child_job_variables
from alphaspin.config import VLLM_CONCURRENCY_PER_ENGINE, AlphaSpinConfig, ConfigError, GenerationConfig
from alphaspin.evaluation import lm_eval_engine_args
from alphaspin.vllm_backend import engine_settings
from alphaspin.vllm_server import (
    OWNED_ARGS,
    EngineSettings,
    VllmServer,
    check_extra_args,
    model_args_of,
    server_command,
)

ROOT = Path(__file__).resolve().parents[1]
PYTHON = "/usr/bin/python3"


def _settings(**kw: Any) -> EngineSettings:
    return EngineSettings(python=PYTHON, model_path="/m", dtype="bfloat16", device="cuda", **kw)


def _generation(**kw: Any) -> GenerationConfig:
    return GenerationConfig(backend="vllm", vllm_python=PYTHON, **kw)


# -- the command line ------------------------------------------------------------------------------
def test_data_parallel_and_extra_args_reach_the_server_command() -> None:
    generation = _generation(
        tensor_parallel_size=2, vllm_data_parallel_size=4, vllm_args=["--enforce-eager", "--max-num-seqs", "128"]
    )
    settings = engine_settings("/m", generation, torch.bfloat16, "cuda:0")
    assert settings.data_parallel_size == 4
    assert settings.extra_args == ("--enforce-eager", "--max-num-seqs", "128")
    command = server_command(settings, 8000)
    assert command[command.index("--tensor-parallel-size") + 1] == "2"
    assert command[command.index("--data-parallel-size") + 1] == "4"  # vLLM 0.32's own server flag
    assert command[-3:] == ["--enforce-eager", "--max-num-seqs", "128"]  # verbatim, after ours
    # One replica: no data-parallel flag at all (the command of every run made before the knob).
    plain = server_command(engine_settings("/m", _generation(), torch.bfloat16, "cuda:0"), 8000)
    assert "--data-parallel-size" not in plain
    assert plain[plain.index("--gpu-memory-utilization") + 1] == "0.85"
    # The engine sized at start from the free memory overrides the configured share.
    sized = server_command(settings, 8000, gpu_memory_utilization=0.4)
    assert sized[sized.index("--gpu-memory-utilization") + 1] == "0.4"


def test_the_data_parallel_flag_is_vllms_own() -> None:
    """The flag spellings alphaspin writes are those vLLM 0.32's argument parser defines."""
    from alphaspin.vllm_server import VllmError, find_vllm_python

    try:
        env = Path(find_vllm_python(None)).parents[1]  # $ALPHASPIN_VLLM_PYTHON, else .venv-vllm
    except VllmError:
        pytest.skip("no vLLM environment to read vLLM's arguments from")
    found = sorted(env.glob("lib/python3*/site-packages/vllm/engine/arg_utils.py"))
    if not found:
        pytest.skip(f"no vllm package in {env}")
    arg_utils = found[0]
    text = arg_utils.read_text()
    for flag in ("--data-parallel-size", "-dp", "--tensor-parallel-size", "-tp", "--gpu-memory-utilization"):
        assert f'"{flag}"' in text, flag


def test_every_argument_of_the_command_is_owned_and_refused_as_an_extra() -> None:
    settings = _settings(data_parallel_size=2, max_model_len=512, seed=3)
    flags = {arg for arg in server_command(settings, 8000)[3:] if arg.startswith("-")}  # after python -m module
    assert flags <= set(OWNED_ARGS), flags - set(OWNED_ARGS)
    for flag in flags:
        with pytest.raises(ValueError, match=rf"generation\.vllm_args: '{flag}"):
            check_extra_args(["--enforce-eager", flag])


@pytest.mark.parametrize(
    ("arg", "knob"),
    [
        ("--tensor-parallel-size=4", "generation.tensor_parallel_size"),
        ("-dp", "generation.vllm_data_parallel_size"),
        ("--gpu_memory_utilization", "generation.gpu_memory_utilization"),
        ("--max-lora-rank", "generation.max_lora_rank"),
        ("--port", "alphaspin"),
    ],
)
def test_a_config_that_sets_an_owned_argument_is_refused_naming_the_knob(arg: str, knob: str, make_config) -> None:
    with pytest.raises(ConfigError) as error:
        make_config(f'generation.vllm_args=["{arg}", "2"]')
    line = str(error.value).splitlines()[-1].strip()  # under "invalid config <file>:", one line per field
    assert line.startswith("generation.vllm_args: ") and f"'{arg}'" in line and knob in line
    with pytest.raises(ValueError, match=rf"^generation\.vllm_args: '{arg}' .*{knob}"):
        check_extra_args([arg])  # as check_engines reports it
    check_extra_args(["--enforce-eager", "--max-num-seqs", "128", "--kv-cache-dtype=fp8"])  # not ours: passed
    assert make_config('generation.vllm_args=["--enforce-eager"]').generation.vllm_args == ["--enforce-eager"]


def test_extra_args_map_to_lm_eval_model_args() -> None:
    args = ["--enforce-eager", "--max-num-seqs", "128", "--kv-cache-dtype=fp8", "--no-enable-prefix-caching"]
    assert model_args_of(args) == {
        "enforce_eager": True,
        "max_num_seqs": 128,
        "kv_cache_dtype": "fp8",
        "enable_prefix_caching": False,
    }
    assert model_args_of(["--swap-space", "4.5", "--trust-remote-code"]) == {
        "swap_space": 4.5,
        "trust_remote_code": True,
    }
    assert lm_eval_engine_args(_generation()) == {}  # one GPU, nothing extra: lm-eval's args as before
    generation = _generation(tensor_parallel_size=2, vllm_data_parallel_size=2, vllm_args=["--enforce-eager"])
    assert lm_eval_engine_args(generation) == {
        "tensor_parallel_size": 2,
        "data_parallel_size": 2,
        "enforce_eager": True,
    }


@pytest.fixture
def vllm_child(monkeypatch) -> dict[str, Any]:
    """What `run_lm_eval` hands lm-eval's vllm child: its model_args, and its environment under "env"
    (the child itself is not started)."""
    from alphaspin.benchmarks import leaderboard

    seen: dict[str, Any] = {}

    def in_vllm_env(model_args, by_shots, manager, vllm_python, vllm_env, **run):
        seen.clear()
        seen.update(model_args, env=dict(vllm_env or {}))
        return [{"results": {}, "configs": {}}]

    monkeypatch.setattr(leaderboard, "_evaluate_in_vllm_env", in_vllm_env)
    monkeypatch.setattr(leaderboard, "_manager_for", lambda names: None)
    return seen


def test_engine_args_reach_lm_eval_but_not_its_record(vllm_child, tmp_path) -> None:
    """lm-eval's vllm model gets the engine's arguments; the stored record (an artifact) does not name
    them: they are operational knobs, and a run that changes them must keep its artifacts' bytes."""
    from alphaspin.benchmarks import leaderboard

    seen = vllm_child
    result = leaderboard.run_lm_eval(
        str(tmp_path),
        None,
        ["arc_easy"],
        backend="vllm",
        device="cuda",
        engine_args={"tensor_parallel_size": 2, "enforce_eager": True},
    )
    assert seen["tensor_parallel_size"] == 2 and seen["enforce_eager"] is True
    assert "tensor_parallel_size" not in result["model"]["model_args"]
    assert "enforce_eager" not in json.dumps(result["results"])


@pytest.mark.parametrize(("engine_args", "eager"), [(None, True), ({"enforce_eager": False}, False)])
def test_on_a_cpu_lm_eval_s_vllm_model_runs_eager_in_one_process(vllm_child, tmp_path, engine_args, eager) -> None:
    """vLLM's CPU platform compiles a model without LoRA with inductor (about 100 s of CPU before a benchmark
    of seconds): on a CPU lm-eval's vllm model runs eager and in one process, unless the user says otherwise."""
    from alphaspin.benchmarks import leaderboard

    seen = vllm_child
    result = leaderboard.run_lm_eval(
        str(tmp_path), None, ["arc_easy"], backend="vllm", device="cpu", engine_args=engine_args
    )
    assert seen["enforce_eager"] is eager and seen["distributed_executor_backend"] == "uni"
    assert seen["env"]["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    assert "enforce_eager" not in result["model"]["model_args"]
    leaderboard.run_lm_eval(str(tmp_path), None, ["arc_easy"], backend="vllm", device="cuda")
    assert "enforce_eager" not in seen and "distributed_executor_backend" not in seen  # a GPU: vLLM's defaults


# -- the concurrency default -----------------------------------------------------------------------
def test_concurrency_default_is_sized_from_the_engine() -> None:
    assert _generation().engine_concurrency == VLLM_CONCURRENCY_PER_ENGINE
    assert _generation(vllm_data_parallel_size=4).engine_concurrency == 4 * VLLM_CONCURRENCY_PER_ENGINE
    assert _generation(vllm_data_parallel_size=4, vllm_concurrency=7).engine_concurrency == 7


# -- a split run's child ---------------------------------------------------------------------------
def _template(name: str) -> dict[str, Any]:
    return json.loads((ROOT / "deploy" / name).read_text())["variables"]["properties"]


@pytest.mark.parametrize(
    ("generation", "training", "gpus", "named"),
    [
        ({}, {}, 1, "generation.tensor_parallel_size"),
        ({"tensor_parallel_size": 2, "vllm_data_parallel_size": 3}, {}, 6, "vllm_data_parallel_size = 2 × 3"),
        ({"tensor_parallel_size": 2}, {"num_processes": 4}, 4, "training.num_processes = 4"),
        ({"vllm_data_parallel_size": 4}, {"num_processes": 2}, 4, "generation.vllm_data_parallel_size"),
        ({}, {"num_processes": 8, "num_machines": 2, "main_process_ip": "10.0.0.1"}, 4, "training.num_machines = 2"),
    ],
)
def test_a_split_child_asks_for_the_gpus_of_its_engine_or_its_training(generation, training, gpus, named) -> None:
    config = AlphaSpinConfig.model_validate({"generation": generation, "training": training})
    wanted, knobs = child_gpu_count(config)
    assert (wanted, named in knobs) == (gpus, True)
    assert child_job_variables(config, _template("k8s-gpu-job-template.json")) == {"gpu_count": gpus}
    # Docker's default gpu_count -1 (every GPU; the GPU-owning worker's own decide) is left as it is
    assert child_job_variables(config, _template("docker-gpu-job-template.json")) == {}
    pinned = {**_template("docker-gpu-job-template.json")}
    pinned["gpu_device_ids"] = {**pinned["gpu_device_ids"], "default": ["0"]}
    if gpus > 1:
        with pytest.raises(ConfigError, match=rf"{named.split(' ')[0]}.*{gpus} GPUs, but the child's pool is pinned"):
            child_job_variables(config, pinned)
    else:
        assert child_job_variables(config, pinned) == {}


# -- bad input before any stage --------------------------------------------------------------------
def test_a_data_parallel_size_the_engine_refuses_is_one_line_naming_the_knob(make_config) -> None:
    with pytest.raises(ConfigError, match=r"generation\.vllm_data_parallel_size"):
        make_config("generation.vllm_data_parallel_size=0")
    generation = _generation(tensor_parallel_size=2, vllm_data_parallel_size=2)
    with pytest.raises(ConfigError) as error:
        check_engine_gpus(generation, "cuda", visible=3)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("generation.vllm_data_parallel_size: 2 (generation.tensor_parallel_size) × 2 = 4 GPUs")
    assert "sees 3" in message
    check_engine_gpus(generation, "cuda", visible=4)
    check_engine_gpus(generation, "cpu")  # the CPU engine has no GPUs to count
    with pytest.raises(ConfigError, match=r"^generation\.tensor_parallel_size: 4 .* × 1 = 4 GPUs"):
        check_engine_gpus(_generation(tensor_parallel_size=4), "cuda", visible=2)
    # check_engines (the run's pre-flight) reaches the check: on this machine a CUDA device is not usable,
    # so it is the device that is refused first; on CPU the GPU count is not a question.
    config = make_config(
        "generation.backend=vllm", "generation.vllm_data_parallel_size=2", f"generation.vllm_python={PYTHON}"
    )
    assert check_engines(config, "cpu") == "cpu"


def test_check_engines_counts_the_gpus_this_process_sees(make_config, monkeypatch) -> None:
    from alphaspin import workspace

    monkeypatch.setattr(workspace, "resolve_device", lambda device: "cuda")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    config = make_config(
        "generation.backend=vllm", "generation.vllm_data_parallel_size=4", f"generation.vllm_python={PYTHON}"
    )
    with pytest.raises(ConfigError, match=r"^generation\.vllm_data_parallel_size: .* = 4 GPUs .* sees 2"):
        check_engines(config)


# -- GPU memory handed over ------------------------------------------------------------------------
class _Recorder:
    def __init__(self, monkeypatch, free_gib: float, total_gib: float = 80.0):
        self.calls: list[str] = []
        self.command: list[str] = []
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "empty_cache", lambda: self.calls.append("empty_cache"))

        def mem_get_info(*args):
            self.calls.append("mem_get_info")
            return int(free_gib * 2**30), int(total_gib * 2**30)

        monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
        real_collect = gpu_memory.gc.collect

        def collect(*args):
            self.calls.append("gc.collect")
            return real_collect(*args)

        monkeypatch.setattr(gpu_memory.gc, "collect", collect)

        def spawn(command, log, env):
            self.calls.append("engine start")
            self.command = command
            raise _Started

        monkeypatch.setattr(vllm_server, "_spawn", spawn)


class _Started(Exception):
    """Raised by the stand-in engine start: the engine is never really started."""


class _Policy(torch.nn.Linear):
    """A model whose moves are recorded (the policy evaluate holds on the GPU)."""

    def __init__(self, calls: list[str]):
        super().__init__(2, 2)
        self._calls = calls

    def to(self, *args, **kwargs):
        self._calls.append(f"model.to({args[0]})")
        return self


def test_an_engine_starts_only_after_torch_released_the_gpu(monkeypatch) -> None:
    recorder = _Recorder(monkeypatch, free_gib=76.0)
    with pytest.raises(_Started):
        VllmServer(_settings())
    assert recorder.calls == ["gc.collect", "empty_cache", "mem_get_info", "engine start"]
    command = recorder.command
    assert command[command.index("--gpu-memory-utilization") + 1] == "0.85"  # 76 of 80 GiB free: as configured


def test_an_engine_is_sized_from_the_memory_actually_free(monkeypatch, caplog) -> None:
    recorder = _Recorder(monkeypatch, free_gib=40.0)
    with caplog.at_level("WARNING"), pytest.raises(_Started):
        VllmServer(_settings())
    command = recorder.command
    assert command[command.index("--gpu-memory-utilization") + 1] == "0.48"  # 40/80 free − 0.02 headroom
    assert "generation.gpu_memory_utilization: 0.85 of the GPU asked, 0.50 free" in caplog.text


def test_the_judged_chat_moves_the_policy_off_the_gpu_before_its_engine_starts(monkeypatch, make_config) -> None:
    """evaluate scores held-out pairs with the policy on the GPU, then starts the engine for the judged
    chat: the policy leaves the GPU and torch's cache is emptied first."""
    from alphaspin import backends, evaluation

    recorder = _Recorder(monkeypatch, free_gib=76.0)
    policy = _Policy(recorder.calls)
    monkeypatch.setattr(gpu_memory, "_on_cuda", lambda model: True)

    def make_backend(*args, **kwargs):
        recorder.calls.append("engine start")
        raise _Started

    monkeypatch.setattr(backends, "make_backend", make_backend)

    class Ws:
        device = "cuda"
        config = make_config("generation.backend=vllm")
        model_path = tokenizer = dtype = None

    with pytest.raises(_Started):
        evaluation._vllm_chat(Ws(), policy, [[{"role": "user", "content": "hi"}]], 8, "/adapter")
    assert recorder.calls == ["model.to(cpu)", "gc.collect", "empty_cache", "engine start"]


def test_lm_eval_on_vllm_gets_the_gpu_after_the_policy_left_it(monkeypatch, make_config) -> None:
    from alphaspin import evaluation
    from alphaspin.benchmarks import leaderboard

    recorder = _Recorder(monkeypatch, free_gib=76.0)
    policy = _Policy(recorder.calls)
    monkeypatch.setattr(gpu_memory, "_on_cuda", lambda model: True)

    def run_lm_eval(*args, **kwargs):
        recorder.calls.append("engine start")
        assert kwargs["engine_args"] == {"data_parallel_size": 2}
        raise _Started

    monkeypatch.setattr(leaderboard, "run_lm_eval", run_lm_eval)

    class Ws:
        device = "cuda"
        config = make_config(
            "evaluation.benchmarks=[arc_easy]",
            "evaluation.benchmark_backend=vllm",
            "generation.vllm_data_parallel_size=2",
        )
        scratch = Path("/nonexistent")
        model_path = "/m"

        def progress(self, fraction, message):
            pass

    with pytest.raises(_Started):
        evaluation.run_benchmarks(Ws(), 0, policy, "/adapter", None)
    assert recorder.calls == ["model.to(cpu)", "gc.collect", "empty_cache", "engine start"]
