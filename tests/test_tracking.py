"""Experiment tracking against the real thing: a tiny run (T = 1) tracked in a local MLflow store and
TensorBoard event files, read back with MLflow's client and TensorBoard's EventAccumulator; the
config as params; an unreachable server refused before any work."""

from __future__ import annotations

import socket

import pytest

from alphaspin.config import ConfigError
from alphaspin.flows.cli import main
from alphaspin.pipeline import run
from alphaspin.runner import plan
from alphaspin.runs import Run
from alphaspin.stages import REGISTRY
from alphaspin.tracking import (
    MLFLOW_RECORD,
    PARAM_VALUE_LIMIT,
    TENSORBOARD,
    Tracker,
    check_tracking,
    flatten,
    mlflow_params,
)

pytest.importorskip("mlflow")
pytest.importorskip("tensorboard")

TRACKED = "tracking.backends=[tensorboard, mlflow]"


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory, tiny_model):
    from conftest import NO_BENCHMARKS, tiny_overrides

    from alphaspin.config import load_config

    root = tmp_path_factory.mktemp("runs")
    # the held-out metrics are enough to track; lm-eval and the judged chat would triple the run's time
    config = load_config("configs/quickstart.yaml", [*tiny_overrides(tiny_model, root), *NO_BENCHMARKS, TRACKED])
    return config, run(config)


@pytest.mark.slow  # a whole tiny run: ~45 s on 2 cores
def test_mlflow_run_holds_the_config_the_metrics_and_the_report(tracked_run):
    from mlflow import MlflowClient

    config, results = tracked_run
    storage = Run(config).storage
    record = storage.read_json(storage.path(MLFLOW_RECORD))
    assert record["tracking_uri"] == f"sqlite:///{storage.path('tracking', 'mlflow.db')}"  # under the run folder
    client = MlflowClient(tracking_uri=record["tracking_uri"])
    tracked = client.get_run(record["run_id"])
    assert tracked.info.run_name == config.run.run_id and tracked.info.status == "FINISHED"

    params = tracked.data.params
    assert params == mlflow_params(config)
    assert params["method.alpha"] == "0.95" and params["training.lora.r"] == "4"
    assert params["tracking.backends"] == '["tensorboard", "mlflow"]'

    # the evaluate stage's metrics, once per iteration, at step t
    for key in ("heldout/loglik_per_token", "heldout/reward_accuracy", "train/loss"):
        history = client.get_metric_history(record["run_id"], key)
        assert [m.step for m in history] == [0, 1], key
        assert [m.value for m in history] == pytest.approx([r[key] for r in results]), key
    # TRL's per-step logs, one name per iteration, at the trainer's steps 1..N
    for t in (0, 1):  # 6 pairs, 2 per step
        steps = [m.step for m in client.get_metric_history(record["run_id"], f"iter-{t}/loss")]
        assert steps == [1, 2, 3], t
        assert client.get_metric_history(record["run_id"], f"iter-{t}/rewards/margins")

    artifacts = {a.path for a in client.list_artifacts(record["run_id"])}
    assert {"config.json", "report"} <= artifacts
    report = {a.path for a in client.list_artifacts(record["run_id"], "report")}
    assert "report/report.md" in report and any(p.endswith(".png") for p in report)


@pytest.mark.slow
def test_tensorboard_event_files_in_run_storage(tracked_run, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config, results = tracked_run
    storage = Run(config).storage
    events = storage.stage(None, TENSORBOARD).get_dir("", tmp_path / "tb")
    accumulator = EventAccumulator(str(events))
    accumulator.Reload()
    tags = set(accumulator.Tags()["scalars"])
    assert {"heldout/loglik_per_token", "iter-0/loss", "iter-1/loss", "iter-1/rewards/accuracies"} <= tags
    loglik = accumulator.Scalars("heldout/loglik_per_token")
    assert [e.step for e in loglik] == [0, 1]
    assert [e.value for e in loglik] == pytest.approx([r["heldout/loglik_per_token"] for r in results], rel=1e-6)
    assert [e.step for e in accumulator.Scalars("iter-1/loss")] == [1, 2, 3]


@pytest.mark.slow
def test_tracking_changes_no_cache_key(tracked_run):
    """No stage reads tracking.*: the same run without tracking finds every stage cached, and run.json
    does not count tracking as part of the run's identity."""
    config, _ = tracked_run
    untracked = config.model_copy(deep=True)
    untracked.tracking.backends = []
    for name, spec in REGISTRY.items():
        for t in (0, 1):
            fields = spec.reads(config, t, "base")
            assert not any(k.startswith("tracking") for k in fields), name
            assert fields == spec.reads(untracked, t, "base"), name
    assert {row.status for row in plan(Run(untracked))} == {"cached"}
    Run(untracked).ensure()  # the same run, not a conflicting config


def test_tracker_resumes_one_mlflow_run_and_uploads_tensorboard_events(make_config, tmp_path):
    """Two processes' worth of trackers (the flow's and a stage's) log into one MLflow run; each one's
    TensorBoard events land in run storage. The fast counterpart of the tracked run above."""
    from mlflow import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from transformers import TrainerControl, TrainerState

    from alphaspin.training import TrackingCallback

    config = make_config(TRACKED)
    with Tracker(config) as first:
        links = first.start()
        first.log_metrics({"heldout/reward_accuracy": 0.5, "pairs": 6, "resumed_from": None, "ok": True}, step=0)
    assert set(links) == {"mlflow", "tensorboard"} and "mlflow ui --backend-store-uri sqlite:///" in links["mlflow"][1]
    with Tracker(config) as stage:  # resumes the recorded run
        callback, state = TrackingCallback(stage, iteration=1), TrainerState()
        for step, loss in ((1, 0.69), (2, 0.5)):
            state.global_step = step
            callback.on_log(None, state, TrainerControl(), logs={"loss": loss, "rewards/margins": 0.1 * step})
        callback.on_train_end(None, state, TrainerControl())
        stage.finish()

    storage = Run(config).storage
    record = storage.read_json(storage.path(MLFLOW_RECORD))
    client = MlflowClient(tracking_uri=record["tracking_uri"])
    assert len(client.search_runs([record["experiment_id"]])) == 1
    tracked = client.get_run(record["run_id"])
    assert tracked.data.params == mlflow_params(config) and tracked.info.status == "FINISHED"
    assert tracked.data.metrics == {
        "heldout/reward_accuracy": 0.5,
        "pairs": 6.0,
        "iter-1/loss": 0.5,
        "iter-1/rewards/margins": 0.2,
    }
    assert [m.step for m in client.get_metric_history(record["run_id"], "iter-1/loss")] == [1, 2]

    files = storage.stage(None, TENSORBOARD).list_files()
    assert len(files) == 2 and all(name.startswith("events.out.tfevents.") for name in files)  # one per tracker
    accumulator = EventAccumulator(str(storage.stage(None, TENSORBOARD).get_dir("", tmp_path / "tb")))
    accumulator.Reload()
    assert [(e.step, e.value) for e in accumulator.Scalars("iter-1/loss")] == [(1, pytest.approx(0.69)), (2, 0.5)]
    assert [e.step for e in accumulator.Scalars("heldout/reward_accuracy")] == [0]


def test_config_as_params_dotted_and_cut_to_the_limit(make_config):
    assert flatten({"a": {"b": 1, "c": {"d": [1, 2]}, "e": {}}, "f": None}) == {
        "a.b": 1,
        "a.c.d": [1, 2],
        "a.e": {},
        "f": None,
    }
    template = "{% for m in messages %}" * 100  # a long Jinja chat template
    params = mlflow_params(make_config(f"model.chat_template={template!r}"))
    assert params["model.device"] == "null" and params["training.gradient_checkpointing"] == "false"
    assert params["training.lora.target_modules"].startswith('["q_proj", "k_proj"')
    cut = params["model.chat_template"]
    assert len(cut) == PARAM_VALUE_LIMIT and cut.endswith("...[truncated]") and template.startswith(cut[:-14])


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_unreachable_mlflow_server_is_one_line_before_any_work(make_config, tiny_model, capsys, tmp_path):
    from conftest import tiny_overrides

    uri = f"http://127.0.0.1:{_closed_port()}"
    config = make_config("tracking.backends=[mlflow]", f"tracking.mlflow_uri={uri}")
    with pytest.raises(ConfigError, match=r"^tracking\.mlflow_uri: cannot reach the MLflow server at http"):
        run(config)
    assert not Run(config).storage.exists(Run(config).storage.root)  # nothing written

    overrides = [
        *tiny_overrides(tiny_model, tmp_path / "cli"),
        "tracking.backends=[mlflow]",
        f"tracking.mlflow_uri={uri}",
    ]
    sets = [arg for item in overrides for arg in ("--set", item)]
    for mode in (["--no-prefect"], []):  # the Prefect path checks before the flow starts
        assert main(["run", "-c", "configs/quickstart.yaml", *mode, *sets]) == 2
        error = capsys.readouterr().err.strip().splitlines()
        assert error[-1].startswith(f"alphaspin: error: tracking.mlflow_uri: cannot reach the MLflow server at {uri}")
        assert not any("Traceback" in line for line in error)
    assert not (tmp_path / "cli").exists()


def test_local_store_needs_a_local_run_folder(make_config):
    config = make_config("tracking.backends=[mlflow]", "run.runs_root=memory://tracking-test/runs")
    with pytest.raises(ConfigError, match=r"^tracking\.mlflow_uri: not set.*memory://"):
        check_tracking(config)
    check_tracking(make_config("tracking.backends=[tensorboard]", "run.runs_root=memory://tracking-test/runs"))
