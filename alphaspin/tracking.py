"""Experiment tracking: one tracker run per α-SPIN run, fed from every process that works on it.

``tracking.backends`` names the trackers (``tensorboard``, ``mlflow``; none by default). What each gets:

- the resolved config as params (MLflow: dotted keys, `mlflow_params`; the whole config also as the
  artifact ``config.json``), once, when the tracker run is created;
- TRL's per-step train logs, named ``iter-<t>/<TRL's name>`` (``iter-1/loss``, ``iter-1/rewards/margins``)
  at the trainer's global step (`alphaspin.training.TrackingCallback`). The trainer counts steps from 1 again in every
  iteration; the prefix keeps iterations apart (in TensorBoard each iteration is then one section),
  where a step offset would need the step counts of all earlier iterations, which a stage run alone
  on another machine does not have;
- the evaluate stage's metrics under their own names at step = iteration t (`Tracker.log_metrics`),
  once per iteration, where the pipeline and the flow publish them;
- the report (report.md and its charts) as MLflow artifacts under ``report/``, at the end.

Where it lives (``<run>`` = ``<runs_root>/<run_id>``)::

    <run>/tracking/mlflow.json       the MLflow run (tracking URI, experiment id, run id): every process
                                     resumes this run, so a stage on another machine logs into the same one
    <run>/tracking/mlflow.db         the local MLflow store (sqlite), unless tracking.mlflow_uri names one
    <run>/tracking/mlartifacts/      its artifacts
    <run>/tracking/tensorboard/      TensorBoard event files, one or more per process (written in a local
                                     folder, uploaded through run storage: s3:// works too)

The MLflow client is used directly (``MlflowClient``), not transformers' ``report_to="mlflow"``: that
callback logs the TrainingArguments as params, which MLflow refuses to change between iterations
(``output_dir`` differs), and starts and ends runs through MLflow's global state. ``report_to``
stays empty, so tracking changes nothing TRL is configured with, and no stage reads ``tracking.*``:
turning it on changes no cache key and no artifact.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from alphaspin.config import AlphaSpinConfig, ConfigError, dump_config
from alphaspin.storage import RunStorage

logger = logging.getLogger(__name__)

FOLDER = "tracking"
MLFLOW_RECORD = f"{FOLDER}/mlflow.json"
TENSORBOARD = f"{FOLDER}/tensorboard"
# MLflow 3 accepts 6000 characters per param value; older servers accept 500. Longer values (long
# lists, Jinja chat templates) are cut to this with a marker; config.json holds them whole.
PARAM_VALUE_LIMIT = 500
TRUNCATED = "...[truncated]"
_METRIC_NAME = re.compile(r"[^0-9A-Za-z_\-. :/]")  # the characters MLflow allows in a metric name
LOCAL_UI = "http://127.0.0.1:5000"  # where `mlflow ui` serves by default


def flatten(value: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested sections as dotted keys: {"method": {"alpha": 0.95}} → {"method.alpha": 0.95}."""
    out: dict[str, Any] = {}
    for key, item in value.items():
        if isinstance(item, dict) and item:
            out.update(flatten(item, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = item
    return out


def param_value(value: Any) -> str:
    """A config value as an MLflow param: strings as they are, anything else as JSON, cut at PARAM_VALUE_LIMIT."""
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    if len(text) > PARAM_VALUE_LIMIT:
        text = text[: PARAM_VALUE_LIMIT - len(TRUNCATED)] + TRUNCATED
    return text


def mlflow_params(config: AlphaSpinConfig) -> dict[str, str]:
    """The resolved config as MLflow params: dotted keys, values as `param_value` writes them."""
    return {key: param_value(value) for key, value in flatten(dump_config(config)).items()}


def numeric(metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The numbers of ``metrics`` (bools, None, text dropped), named as MLflow allows."""
    return {
        _METRIC_NAME.sub("_", f"{prefix}{key}"): float(value)
        for key, value in metrics.items()
        if isinstance(value, int | float) and not isinstance(value, bool)
    }


def local_store_uri(storage: RunStorage) -> str:
    return f"sqlite:///{storage.path(FOLDER, 'mlflow.db')}"


def check_tracking(config: AlphaSpinConfig) -> None:
    """Fail fast, before any work, with one line naming the knob, when a configured tracker cannot work:
    its package is missing, the local store would not be on a local disk, or the server does not answer."""
    backends = config.tracking.backends
    for name in backends:
        if importlib.util.find_spec(name) is None:
            raise ConfigError(f"tracking.backends: {name} is not installed (pip install 'alphaspin[tracking]')")
    if "mlflow" not in backends:
        return
    uri = config.tracking.mlflow_uri
    if uri is None:
        storage = RunStorage(config.run.runs_root, config.run.run_id)
        if storage.protocol not in ("file", "local"):
            raise ConfigError(
                f"tracking.mlflow_uri: not set, and the local MLflow store (an sqlite file) cannot live in "
                f"{storage.url}; run.runs_root is not a local folder, so name an MLflow server"
            )
        return
    if uri.startswith(("http://", "https://")):
        import httpx

        try:  # any answer will do (auth errors come from the client later); no answer is the error
            httpx.get(f"{uri.rstrip('/')}/health", timeout=10.0)
        except httpx.HTTPError as error:
            reason = " ".join(str(error).split()) or type(error).__name__
            raise ConfigError(f"tracking.mlflow_uri: cannot reach the MLflow server at {uri}: {reason}") from None


class Tracker:
    """The trackers of one run in one process. Every method is a no-op with ``tracking.backends: []``.

    The MLflow run is created on first use (the record ``<run>/tracking/mlflow.json`` written) and
    resumed by every later process; TensorBoard events go to a local folder, uploaded by `flush`."""

    def __init__(self, config: AlphaSpinConfig, storage: RunStorage | None = None):
        self.config = config
        self.storage = storage or RunStorage(config.run.runs_root, config.run.run_id)
        self.backends = set(config.tracking.backends)
        self._client: Any = None
        self._run: dict[str, str] | None = None
        self._writer: Any = None
        self._local_tb: Path | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.backends)

    # -- MLflow -------------------------------------------------------------------------------------
    @property
    def mlflow_uri(self) -> str:
        return self.config.tracking.mlflow_uri or local_store_uri(self.storage)

    def _mlflow(self) -> tuple[Any, str]:
        """The client and the run id: the recorded run, or a new one (params logged) when there is none."""
        if self._run is None:
            from mlflow import MlflowClient

            uri = self.mlflow_uri
            self._client = MlflowClient(tracking_uri=uri)
            path = self.storage.path(MLFLOW_RECORD)
            record = self.storage.read_json(path) if self.storage.exists(path) else None
            if record is None or record.get("tracking_uri") != uri:
                record = self._create_mlflow_run(uri)
                self.storage.write_json(path, record)
            self._run = record
        return self._client, self._run["run_id"]

    def _create_mlflow_run(self, uri: str) -> dict[str, str]:
        from mlflow.entities import Param

        client, name = self._client, self.config.tracking.experiment_name
        experiment = client.get_experiment_by_name(name)
        if experiment is not None:
            experiment_id = experiment.experiment_id
        else:  # the local store keeps its artifacts beside it, not in the working directory
            local = self.config.tracking.mlflow_uri is None
            location = Path(self.storage.path(FOLDER, "mlartifacts")).as_uri() if local else None
            experiment_id = client.create_experiment(name, artifact_location=location)
        tags = {"alphaspin.run_id": self.config.run.run_id, "alphaspin.run_url": self.storage.url}
        run_id = client.create_run(experiment_id, run_name=self.config.run.run_id, tags=tags).info.run_id
        params = [Param(key, value) for key, value in mlflow_params(self.config).items()]
        for start in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            client.log_batch(run_id, params=params[start : start + 100])
        client.log_dict(run_id, dump_config(self.config), "config.json")
        logger.info("MLflow run %s created in %s (experiment %s)", run_id, uri, name)
        return {"tracking_uri": uri, "experiment_id": experiment_id, "run_id": run_id}

    # -- TensorBoard --------------------------------------------------------------------------------
    def _tensorboard(self) -> Any:
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._local_tb = Path(tempfile.mkdtemp(prefix="alphaspin-tensorboard-"))
            self._writer = SummaryWriter(log_dir=str(self._local_tb))  # a file named by time, host and pid
        return self._writer

    # -- what the pipeline calls ----------------------------------------------------------------------
    def start(self) -> dict[str, tuple[str, str]]:
        """Create or resume the tracker run; each backend's (link, text), for the Prefect link artifact."""
        links = {}
        if "mlflow" in self.backends:
            client, run_id = self._mlflow()
            if client.get_run(run_id).info.status != "RUNNING":  # a rerun of a finished run
                client.update_run(run_id, status="RUNNING")
            links["mlflow"] = self.mlflow_link()
        if "tensorboard" in self.backends:
            where = self.storage.unstrip(self.storage.path(TENSORBOARD))
            links["tensorboard"] = (where, f"TensorBoard event files: tensorboard --logdir {where}")
        return links

    def mlflow_link(self) -> tuple[str, str]:
        _, run_id = self._mlflow()
        assert self._run is not None
        page = f"#/experiments/{self._run['experiment_id']}/runs/{run_id}"
        uri = self.mlflow_uri
        if uri.startswith(("http://", "https://")):
            return f"{uri.rstrip('/')}/{page}", f"MLflow run {run_id}"
        return f"{LOCAL_UI}/{page}", f"MLflow run {run_id} (serve it first: mlflow ui --backend-store-uri {uri})"

    def log_metrics(self, metrics: dict[str, Any], step: int, prefix: str = "") -> None:
        values = numeric(metrics, prefix)
        if not values or not self.enabled:
            return
        if "mlflow" in self.backends:
            from mlflow.entities import Metric

            client, run_id = self._mlflow()
            now = int(time.time() * 1000)
            client.log_batch(run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])
        if "tensorboard" in self.backends:
            writer = self._tensorboard()
            for key, value in values.items():
                writer.add_scalar(key, value, step)

    def log_report(self) -> None:
        """The run's report folder (report.md, charts; `alphaspin.reporting`) as MLflow artifacts ``report/``."""
        if "mlflow" not in self.backends:
            return
        client, run_id = self._mlflow()
        with tempfile.TemporaryDirectory() as tmp:
            self.storage.stage(None, "report").get_dir("", tmp)
            client.log_artifacts(run_id, tmp, "report")

    def flush(self) -> None:
        """Upload this process's TensorBoard event files into run storage (whole, replacing the last upload)."""
        if self._writer is None or self._local_tb is None:
            return
        self._writer.flush()
        for path in sorted(p for p in self._local_tb.rglob("*") if p.is_file()):
            rel = path.relative_to(self._local_tb).as_posix()
            self.storage.write_bytes(self.storage.path(TENSORBOARD, rel), path.read_bytes())

    def finish(self) -> None:
        """The run is done: upload the events, mark the MLflow run finished (a rerun resumes it)."""
        self.flush()
        if "mlflow" in self.backends:
            client, run_id = self._mlflow()
            client.set_terminated(run_id, "FINISHED")

    def close(self) -> None:
        self.flush()
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._local_tb is not None:
            shutil.rmtree(self._local_tb, ignore_errors=True)
            self._local_tb = None

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
