"""Digests of every artifact of a tiny run, to prove that a refactor changes no output.

    python tests/artifact_digests.py --write     # record tests/data/tiny-run-digests.json (on purpose only)

Two fingerprints per file:
- ``sha256``: the exact bytes (tensors of a .safetensors file, not its container). Compared when the
  machine computes with the same CPU kernels as the machine that recorded them.
- ``values``: the content with floats rounded (tables column by column, tensors by their sums and
  norms, JSON with floats rounded): compared everywhere, so a different CPU's last-bit float noise
  does not fail the test, while any real change in what a stage writes does.

Update the recorded digests only when a stage's code version changes on purpose.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "data" / "tiny-run-digests.json"
# Files that hold wall times or dates, or package versions and the machine (provenance.json: the same on
# one machine, but the rounded fingerprints are compared across machines, whose installs differ;
# tests/test_provenance.py checks its hashes): every other file of a run is reproducible and names no
# local path (a local model by its folder's name, as the model card does) and no machine fact
# (tests/test_artifact_digests.py scans them).
VOLATILE = ("train_log.json", "metrics.json", "benchmarks/lm_eval/lm_eval_timing.json", "provenance.json")
DIGITS = 4  # significant digits kept in the rounded fingerprint


def _round(value: float) -> float | str:
    if not math.isfinite(value):
        return str(value)
    return float(f"{value:.{DIGITS}g}")


# lm-eval records the git commit of the working directory: it changes with every commit.
COMMIT_FIELDS = ("git_hash", "upper_git_hash")


def _round_json(value: Any) -> Any:
    if isinstance(value, float):
        return _round(value)
    if isinstance(value, dict):
        return {k: _round_json(v) for k, v in value.items() if k not in COMMIT_FIELDS}
    if isinstance(value, list):
        return [_round_json(v) for v in value]
    return value


def _strip_commit(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip_commit(v) for k, v in value.items() if k not in COMMIT_FIELDS}
    if isinstance(value, list):
        return [_strip_commit(v) for v in value]
    return value


def fingerprint(name: str, data: bytes) -> dict[str, Any]:
    if name.endswith(".safetensors"):
        from safetensors.torch import load

        tensors = load(data)
        exact = hashlib.sha256()
        values = {}
        for key in sorted(tensors):
            tensor = tensors[key].contiguous()
            exact.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
            exact.update(tensor.view(-1).view(dtype=__import__("torch").uint8).numpy().tobytes())
            as_float = tensor.double()
            values[key] = [list(tensor.shape), _round(float(as_float.sum())), _round(float(as_float.norm()))]
        return {"sha256": exact.hexdigest(), "values": values}
    if name.endswith(".parquet"):
        import pandas as pd

        frame = pd.read_parquet(io.BytesIO(data))
        values = {}
        for column in frame.columns:
            series = frame[column]
            if series.dtype.kind == "f":
                values[column] = [_round(float(v)) for v in series]
            else:
                values[column] = hashlib.sha256(json.dumps(series.astype(str).tolist()).encode()).hexdigest()[:16]
        return {"sha256": hashlib.sha256(data).hexdigest(), "values": values}
    if name.endswith(".json"):
        content = _round_json(json.loads(data))
        text = json.dumps(content, sort_keys=True)
        exact = json.dumps(_strip_commit(json.loads(data)), sort_keys=True)
        return {
            "sha256": hashlib.sha256(exact.encode()).hexdigest(),
            "values": hashlib.sha256(text.encode()).hexdigest()[:16],
        }
    return {"sha256": hashlib.sha256(data).hexdigest(), "values": hashlib.sha256(data).hexdigest()[:16]}


def run_digests(storage) -> dict[str, dict[str, Any]]:
    """Fingerprints of every non-volatile file listed in the run's stage manifests."""
    from alphaspin.storage import MANIFEST

    out: dict[str, dict[str, Any]] = {}
    for path in sorted(storage.fs.glob(storage.path("iter-*", "*", MANIFEST))):
        iteration, stage = path.rsplit("/", 3)[-3:-1]
        folder = storage.stage(int(iteration.removeprefix("iter-")), stage)
        for name in sorted(folder.read_manifest()["files"]):
            if name not in VOLATILE:
                out[f"{iteration}/{stage}/{name}"] = fingerprint(name, folder.read_bytes(name))
    return out


def cpu_kernels() -> str:
    import torch

    return f"torch {torch.__version__} {torch.backends.cpu.get_cpu_capability()}"


def tiny_run_config(runs_root: Path):
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import tiny_overrides

    from alphaspin.config import load_config
    from alphaspin.testing.tiny_model import tiny_model_path

    return load_config(ROOT / "configs" / "quickstart.yaml", tiny_overrides(tiny_model_path(), runs_root))


def main() -> None:
    import tempfile

    from alphaspin.pipeline import run
    from alphaspin.storage import RunStorage

    with tempfile.TemporaryDirectory() as folder:
        config = tiny_run_config(Path(folder) / "runs")
        run(config)
        digests = run_digests(RunStorage(config.run.runs_root, config.run.run_id))
    document = {"cpu_kernels": cpu_kernels(), "files": digests}
    if "--write" in sys.argv:
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(json.dumps(document, indent=1, sort_keys=True) + "\n")
        print(f"wrote {GOLDEN} ({len(digests)} files)")
    else:
        print(json.dumps(document, indent=1, sort_keys=True))


if __name__ == "__main__":
    main()
