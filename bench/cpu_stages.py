"""Wall time of each stage of the CPU default run (configs/quickstart.yaml through the plain
runner `alphaspin.pipeline.run`), optionally scaled down.

Each node is timed by wrapping the cached runner's `Runner.prepare` and `Runner.execute` in this
process (the stage functions of `alphaspin.stages.REGISTRY` run inside execute); product code is
untouched. The run goes to a temp folder (fresh: nothing cached).

    python -m bench.cpu_stages                                   # the quickstart as shipped (T=2, 16 pairs)
    python -m bench.cpu_stages --iterations 1 --pairs 8          # scaled down
    python -m bench.cpu_stages --model tiny --iterations 0 --pairs 4 --max-new-tokens 4   # smoke
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import common

NAME = "cpu_stages"


def run(
    recipe: str = "configs/quickstart.yaml",
    model: str | None = None,
    iterations: int | None = None,
    pairs: int | None = None,
    max_new_tokens: int | None = None,
    max_length: int | None = None,
    heldout: int | None = None,
    light_evaluation: bool = False,
    overrides: list[str] | None = None,
) -> dict[str, Any]:
    from alphaspin.config import dump_config, load_config
    from alphaspin.pipeline import run as run_pipeline

    workdir = Path(tempfile.mkdtemp(prefix="bench-cpu-stages-"))
    scaled = []
    if model is not None:
        scaled.append(f"model.name_or_path={common.model_name(model)}")
    if iterations is not None:
        scaled.append(f"method.iterations={iterations}")
    if pairs is not None:
        scaled += [f"method.pairs_first_iteration={pairs}", f"method.pairs_per_iteration={pairs}"]
    if max_new_tokens is not None:
        scaled.append(f"generation.max_new_tokens={max_new_tokens}")
    if max_length is not None:
        scaled.append(f"training.max_length={max_length}")
    if heldout is not None:
        scaled.append(f"data.heldout_size={heldout}")
    if light_evaluation:
        scaled += common.LIGHT_EVALUATION
    scaled += overrides or []
    config = load_config(recipe, [*scaled, f"run.runs_root={workdir / 'runs'}", "model.device=cpu"])
    log: list[dict[str, Any]] = []
    try:
        started = time.perf_counter()
        with common.timed_stages(log):
            results = run_pipeline(config)
        wall = time.perf_counter() - started
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    per_stage: dict[str, float] = {}
    for entry in log:
        per_stage[entry["stage"]] = per_stage.get(entry["stage"], 0.0) + entry["seconds"]
    stage_total = sum(per_stage.values())
    summary = {
        "wall_seconds": wall,
        "stage_seconds_total": stage_total,
        "seconds_per_stage": per_stage,
        "share_per_stage": {k: v / stage_total for k, v in per_stage.items()},
        "scaled_down": bool(scaled),
        "final_metrics": results[-1] if results else None,
    }
    resolved = dump_config(config)
    config_out = {
        "recipe": recipe,
        "overrides": scaled,
        "model": model and common.model_label(model) or resolved["model"]["name_or_path"],
        "iterations": f"0..{config.method.iterations}",
        "pairs": [config.method.pairs_first_iteration, config.method.pairs_per_iteration],
        "heldout": config.data.heldout_size,
        "max_new_tokens": config.generation.max_new_tokens,
        "max_length": config.training.max_length,
        "device": "cpu",
        "resolved": resolved,
    }
    calls = [{"label": common.stage_label(e), **e} for e in log]
    notes = ["scaled down from the recipe by " + ", ".join(scaled)] if scaled else ["the recipe as shipped"]
    notes.append(
        "wall_seconds - stage_seconds_total = the runner's own work (Run, Workspace, run.json, imports on first use)"
    )
    return common.result(NAME, config_out, {"stage_calls": calls, "iterations": results}, summary, notes)


def table(data: dict[str, Any]) -> str:
    calls = data["results"]["stage_calls"]
    iterations = sorted({c["iteration"] for c in calls})
    labels = list(dict.fromkeys(c["label"] for c in calls))
    seconds = {(c["label"], c["iteration"]): c["seconds"] for c in calls}
    rows = [
        [label, *(seconds.get((label, t)) for t in iterations), sum(seconds.get((label, t)) or 0.0 for t in iterations)]
        for label in labels
    ]
    s = data["summary"]
    rows.append(
        ["total", *(sum(v for (_, t), v in seconds.items() if t == it) for it in iterations), s["stage_seconds_total"]]
    )
    title = (
        f"CPU run per stage ({data['config']['model']}, t = {data['config']['iterations']}, pairs "
        f"{data['config']['pairs']}): wall {s['wall_seconds']:.1f} s" + (" [scaled down]" if s["scaled_down"] else "")
    )
    return common.format_table(["stage", *(f"t={t} s" for t in iterations), "all s"], rows, title)


def main(argv: list[str] | None = None) -> int:
    common.script_setup()
    parser = common.base_parser(NAME, __doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="configs/quickstart.yaml")
    parser.add_argument("--model", help="tiny, builtin:smollm2-135m-instruct, or a folder (default: the recipe's)")
    parser.add_argument("--iterations", type=int, help="T (default: the recipe's)")
    parser.add_argument("--pairs", type=int, help="pairs per iteration (default: the recipe's)")
    parser.add_argument("--max-new-tokens", type=int, help="generation.max_new_tokens (default: the recipe's)")
    parser.add_argument("--max-length", type=int, help="training.max_length (default: the recipe's)")
    parser.add_argument("--heldout", type=int, help="data.heldout_size (default: the recipe's)")
    parser.add_argument(
        "--light-evaluation",
        action="store_true",
        help="evaluate with the held-out metrics only (no lm-eval, no judged chat)",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other config override, as alphaspin run --set",
    )
    args = parser.parse_args(argv)
    with common.stdout_to_stderr():
        data = run(
            recipe=args.recipe,
            model=args.model,
            iterations=args.iterations,
            pairs=args.pairs,
            max_new_tokens=args.max_new_tokens,
            max_length=args.max_length,
            heldout=args.heldout,
            light_evaluation=args.light_evaluation,
            overrides=args.overrides,
        )
    common.emit(data, table(data), common.out_path(args, NAME))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
