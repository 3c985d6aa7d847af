"""``alphaspin``: run α-SPIN, rerun one stage, inspect runs.

alphaspin run --config configs/quickstart.yaml [--set method.alpha=1.0 ...]
alphaspin rerun --run-id R --iteration 1 --stage train [--runs-root ./runs]
alphaspin plan --config configs/quickstart.yaml [--set ...] [--fork-from RUN]   (what would run, and why)
alphaspin status --run-id R [--runs-root ./runs]
alphaspin diff RUN_A RUN_B [--runs-root ./runs]                 (every config / provenance difference)
alphaspin diff RUN [--runs-root ./runs]            (stages that ran with other operational knobs than run.json's)
alphaspin export --run-id R --iteration t --out DIR [--merge] [--push-to-hub REPO_ID]   (θ_t on its own)
alphaspin config --config configs/paper-gemma-2b.yaml      (print the resolved config)
alphaspin grid -c configs/grid-cpu.yaml [--status] [--no-prefect]   (a grid of runs: cells x seeds)
alphaspin grid-report -c configs/grid-cpu.yaml              (mean ± 95% CI across seeds, Δ vs baseline;
                                                           on the synthetic task the KL rise after t*)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from alphaspin.config import AlphaSpinConfig, ConfigError, load_config
from alphaspin.dag import check_forced, parse_force
from alphaspin.data import DataError
from alphaspin.leases import LeaseHeldError
from alphaspin.preemption import Preempted, raise_on_sigterm
from alphaspin.runs import RunConflictError, stored_config
from alphaspin.stages import STAGE_NAMES
from alphaspin.storage import StorageError

logger = logging.getLogger("alphaspin")

# Errors whose message says all a person needs (the field or file, what was expected): one line.
KNOWN_ERRORS: tuple[type[BaseException], ...] = (
    ConfigError,
    DataError,
    RunConflictError,
    StorageError,
    LeaseHeldError,
    FileNotFoundError,
)


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", help="YAML recipe (configs/*.yaml); default: built-in defaults")
    parser.add_argument(
        "--set",
        "-s",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a field, e.g. --set method.alpha=1.0 --set method.history=inf (repeatable)",
    )


def _run_config(config: AlphaSpinConfig, args: argparse.Namespace, force: dict[int, set[str]]) -> list[dict]:
    from alphaspin.backends import check_engines
    from alphaspin.workspace import default_device

    if getattr(args, "no_wait", False):
        config.orchestration.wait_for_running_stage = False
    # Every stage of `alphaspin run` executes in this process: vLLM or the training launcher missing is
    # one line now, not a failed stage later.
    check_engines(config, config.model.device or default_device())
    if args.no_prefect:
        from alphaspin.pipeline import run

        return run(config, force=force, fork_from=args.fork_from)
    from alphaspin.flows.alphaspin_run import alphaspin_run, check_gpu_stages
    from alphaspin.tracking import check_tracking
    from alphaspin.workspace import Workspace

    check_gpu_stages(config)  # more GPU stages at once than GPUs: one line naming the knob, before the flow
    check_tracking(config)  # an unreachable tracker, a bad model or data file: one line here, not a traceback
    with Workspace(config) as workspace:
        workspace.check_inputs()

    return alphaspin_run(
        config=config, force=[f"{t}:{s}" for t, ss in force.items() for s in sorted(ss)], fork_from=args.fork_from
    )


def _log_dir() -> Path:
    import os
    import tempfile

    return Path(os.environ.get("ALPHASPIN_LOG_DIR") or Path(tempfile.gettempdir()) / "alphaspin-logs")


def _keep_log(config: AlphaSpinConfig, log_file: Path, name: str) -> str | None:
    """Copy the log into the run's storage (``<run>/logs/NAME``) once the run exists there."""
    from alphaspin.runs import Run

    storage = Run(config).storage
    try:
        if not storage.exists(storage.path("run.json")):
            return None
        storage.write_bytes(storage.path("logs", name), log_file.read_bytes())
    except Exception as error:  # the run's outcome stands; say where the log stayed instead
        logger.warning("could not copy the log into %s: %s", storage.url, error)
        return None
    return storage.unstrip(storage.path("logs", name))


def _header(
    console: Any, config: AlphaSpinConfig, command: str, recipe: str | None, log_file: Path, no_prefect: bool
) -> None:
    from prefect.settings import PREFECT_API_URL

    from alphaspin.runs import Run

    method = config.method
    what = f"t = 0..{method.iterations}, α = {method.alpha:g}, h = {method.history}, opponent {method.opponent}"
    console.print(
        f"alphaspin {command} · {config.run.run_id}" + (f" · recipe {recipe}" if recipe else "") + f" · {what}",
        style="bold",
    )
    console.print(f"  {'artifacts':<11} {Run(config).storage.url}")
    console.print(f"  {'full log':<11} {log_file}")
    if no_prefect:
        console.print(f"  {'Prefect':<11} not used (--no-prefect: the stages run in this process)")
    elif PREFECT_API_URL.value():
        console.print(f"  {'Prefect':<11} {PREFECT_API_URL.value()}")
    else:
        console.print(f"  {'Prefect':<11} temporary local server (set PREFECT_API_URL to keep runs in a UI)")


def _stamp() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())


@contextlib.contextmanager
def _captured(args: argparse.Namespace, log_file: Path) -> Iterator[TextIO]:
    """The libraries' output goes to ``log_file`` (and the terminal too with --verbose); yields the
    terminal stream for the console. `run`, `rerun` and `grid` run inside it."""
    from alphaspin.console import capture_output

    if not args.no_prefect:
        import prefect  # noqa: F401  (Prefect configures logging on import: take over after it)
    level = getattr(logging, str(args.log_level).upper(), logging.INFO)
    try:
        with capture_output(log_file, verbose=args.verbose, level=level) as terminal:
            yield terminal
    finally:
        logging.getLogger("prefect").setLevel(logging.WARNING)  # not "Stopping temporary server" after the end


def _run_in_console(config: AlphaSpinConfig, args: argparse.Namespace, force: dict[int, set[str]], command: str) -> int:
    """Run with a person's console: header, stage lines, iteration lines; all else in the log file."""
    from alphaspin.console import TerminalConsole, activate, duration
    from alphaspin.storage import check_storage

    check_storage(config.run.runs_root)  # a missing bucket, refused credentials or endpoint: one line, now

    stamp = _stamp()
    log_file = _log_dir() / f"{config.run.run_id}-{stamp}.log"
    started = time.monotonic()
    failure: tuple[str | None, BaseException] | None = None
    preempted: tuple[str | None, BaseException] | None = None
    with _captured(args, log_file) as terminal:
        console = TerminalConsole(terminal)
        _header(console, config, command, getattr(args, "config", None), log_file, args.no_prefect)
        logger.info("resolved config:\n%s", json.dumps(config.model_dump(mode="json"), indent=2))
        try:
            # A SIGTERM (Slurm, Kubernetes, a spot instance) stops the run in a known state: see
            # alphaspin.preemption (the train stage checkpoints first; Prefect's flow engine, while a flow
            # runs, marks the runs Crashed and hands the signal back to this handler).
            with activate(console), raise_on_sigterm(config.orchestration.preemption_grace_seconds):
                results = _run_config(config, args, force)
        except KNOWN_ERRORS:
            raise
        except Preempted as error:
            logger.warning("%s", error)
            preempted = (console.failed or console.running, error)
        except Exception as error:
            logger.exception("the run failed")
            failure = (console.failed or console.running, error)
        kept = _keep_log(config, log_file, f"{stamp}-{command}.log")
    if preempted is not None:
        stage, error = preempted
        where = f"{stage}: " if stage and stage not in str(error) else ""
        print(
            f"alphaspin: {where}{error}\n  The full log is in {kept or log_file}.",
            file=sys.stderr,
        )
        return Preempted.exit_code
    if failure is not None:
        stage, error = failure
        message = str(error).strip().splitlines()[0] if str(error).strip() else ""
        where = f"{stage} failed: " if stage else ""
        print(
            f"alphaspin: error: {where}{type(error).__name__}: {message}\n"
            f"  The full log, with the traceback, is in {kept or log_file}. Finished stages are kept: run the same "
            "command again to resume" + (f" from {stage}." if stage else "."),
            file=sys.stderr,
        )
        return 1
    from alphaspin.runs import Run

    report = Run(config).storage.stage(None, "report")
    console.print(f"  {'report':<11} {report.storage.unstrip(report.file('report.md'))}")
    console.print(f"  {'full log':<11} {kept or log_file}")
    console.print(f"done in {duration(time.monotonic() - started)}", style="bold")
    if args.json:
        print(
            json.dumps(
                {"run": config.run.run_id, "runs_root": config.run.runs_root, "iterations": results},
                indent=2,
                default=str,
            )
        )
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides)
    return _run_in_console(config, args, parse_force(args.force, config.method.iterations, config), "run")


def cmd_rerun(args: argparse.Namespace) -> int:
    config = stored_config(args.run_id, args.runs_root)
    if args.iteration > config.method.iterations:
        raise ConfigError(f"--iteration {args.iteration}: the run has iterations 0..{config.method.iterations}")
    force = {args.iteration: set(args.stage)}
    check_forced(config, force, "--stage")
    return _run_in_console(config, args, force, "rerun")


def cmd_status(args: argparse.Namespace) -> int:
    from alphaspin.dag import iteration_nodes
    from alphaspin.runs import Run

    config = stored_config(args.run_id, args.runs_root)
    run = Run(config)
    rows = []
    for t in range(config.method.iterations + 1):
        for node in iteration_nodes(config, t):
            record = run.dir(node).verify(check_hashes=args.verify)
            rows.append(
                {
                    "iteration": t,
                    "stage": node.folder,
                    "done": record is not None,
                    "metrics": record.metrics if record else None,
                }
            )
    print(json.dumps(rows, indent=2, default=str))
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from alphaspin.runner import plan
    from alphaspin.runs import Run

    config = load_config(args.config, args.overrides)
    run = Run(config, args.fork_from)
    if args.fork_from is not None and run.parent is not None and not run.parent.exists(run.parent.path("run.json")):
        raise ConfigError(f"--fork-from {args.fork_from}: no run at {run.parent.url}")
    rows = plan(run, parse_force(args.force, config.method.iterations, config))
    if args.json:
        print(
            json.dumps(
                [
                    {"iteration": r.node.iteration, "stage": r.node.folder, "status": r.status, "reason": r.reason}
                    for r in rows
                ],
                indent=2,
            )
        )
        return 0
    print(
        f"plan of run {config.run.run_id} at {run.storage.url}"
        + (f" (fork of {args.fork_from})" if args.fork_from else "")
    )
    width = max(len(r.node.label) for r in rows)
    for row in rows:
        why = "" if row.status == "cached" else f"  {row.reason}"
        print(f"  {row.node.label:<{width}}  {row.status:<6}{why}")
    counts = {s: sum(r.status == s for r in rows) for s in ("cached", "adopt", "run")}
    print(f"{counts['run']} to run, {counts['adopt']} adopted from the fork parent, {counts['cached']} cached")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from alphaspin.reporting import write_run_report
    from alphaspin.storage import RunStorage

    stored_config(args.run_id, args.runs_root)  # a clear error if there is no such run
    result = write_run_report(RunStorage(args.runs_root, args.run_id))
    print(result["markdown"])
    print(f"report written to {result['url']}", file=sys.stderr)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from alphaspin.reporting import compare

    for run_id in args.runs:
        stored_config(run_id, args.runs_root)
    result = compare(args.runs, args.runs_root, args.out, baseline=args.baseline)
    print((Path(args.out) / "comparison.md").read_text())
    print(f"charts written to {args.out}: {', '.join(sorted(result['files']))}", file=sys.stderr)
    return 0


def cmd_diff(args: argparse.Namespace) -> int:
    from alphaspin.provenance import diff_attempts, diff_runs
    from alphaspin.storage import RunStorage

    for run_id in (args.run_a, args.run_b):
        if run_id is not None:
            stored_config(run_id, args.runs_root)  # a clear error if there is no such run
    if args.run_b is None:
        rows = diff_attempts(RunStorage(args.runs_root, args.run_a))
        print(
            f"{args.run_a}: "
            + (
                f"{len(rows)} difference(s) from run.json's operational knobs (the latest attempt's)"
                if rows
                else "every stage ran with run.json's operational knobs"
            )
        )
        for row in rows:
            print(f"  {row}")
        return 0
    rows = diff_runs(RunStorage(args.runs_root, args.run_a), RunStorage(args.runs_root, args.run_b))
    print(f"{args.run_a} → {args.run_b}: " + (f"{len(rows)} difference(s)" if rows else "no differences"))
    for row in rows:
        print(f"  {row}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from alphaspin.export import export_adapter, hub_token, push_to_hub

    if args.push_to_hub:
        hub_token(args.push_to_hub)  # a missing token fails before the export, not after
    out = export_adapter(args.run_id, args.runs_root, args.iteration, args.out, merge=args.merge)
    print(f"exported iter-{args.iteration} of run {args.run_id} to {out} ({'merged' if args.merge else 'adapter'})")
    if args.push_to_hub:
        print(f"pushed to https://huggingface.co/{args.push_to_hub}: {push_to_hub(out, args.push_to_hub)}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides)
    print(json.dumps(config.model_dump(mode="json"), indent=2))
    return 0


def cmd_grid(args: argparse.Namespace) -> int:
    from alphaspin.grid import format_status, grid_status, load_grid, run_local
    from alphaspin.grid_report import write_grid_report

    grid = load_grid(args.config, args.overrides)  # every bad input refused here, before anything runs
    if args.status:
        rows = grid_status(grid)
        print(json.dumps(rows, indent=2) if args.json else format_status(grid, rows))
        return 0
    if args.no_prefect and grid.spec.deployment:
        raise ConfigError(f"grid {grid.name}: deployment {grid.spec.deployment} runs cells through Prefect")
    from alphaspin.console import TerminalConsole, activate, duration

    log_file = _log_dir() / f"grid-{grid.name}-{_stamp()}.log"
    started = [time.monotonic()]
    with _captured(args, log_file) as terminal:
        # One line per finished cell (stages ran / adopted from another cell / cached); the live line
        # shows the running stage on a terminal; every stage's detail is in the log.
        console = TerminalConsole(terminal, stage_lines=args.verbose, iteration_lines=args.verbose)
        cells, seeds = len(grid.cell_names), len(grid.spec.seeds)
        console.print(f"alphaspin grid · {grid.name} · {cells} cells x {seeds} seeds · {args.config}", style="bold")
        console.print(f"  {'runs':<11} {grid.storage.url}")
        console.print(f"  {'full log':<11} {log_file}")

        def on_done(cell: Any, error: BaseException | None) -> None:
            took = duration(time.monotonic() - started[0])
            outcome = f"failed: {type(error).__name__}: {str(error).strip()[:200]}" if error else ""
            mark = "✗" if error else "✓"
            console.print(f"  {mark} {cell.run_id:<32} {took:>10}  {console.take_totals()}  {outcome}".rstrip())
            started[0] = time.monotonic()

        with activate(console):
            if args.no_prefect:
                failed = run_local(grid, args.concurrency, on_done=on_done)
                report = write_grid_report(grid)
            else:
                from alphaspin.flows.grid import run_grid_flow

                failed = {}
                report = {"url": run_grid_flow(grid, args.config, args.overrides, args.concurrency)["report"]}
    print(format_status(grid, grid_status(grid)))
    print(f"report written to {report['url']}/report.md", file=sys.stderr)
    if failed:
        print(f"alphaspin: error: {len(failed)} cell(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def cmd_grid_report(args: argparse.Namespace) -> int:
    from alphaspin.grid import load_grid
    from alphaspin.grid_report import write_grid_report

    report = write_grid_report(load_grid(args.config, args.overrides))
    print(report["markdown"])
    print(f"report written to {report['url']}: {', '.join(report['files'])}", file=sys.stderr)
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    print(json.dumps(AlphaSpinConfig.model_json_schema(), indent=2))
    return 0


def _add_console_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--verbose",
        "-v",
        action="store_true",
        help="also show the libraries' logs and progress bars (TRL, transformers, lm-eval, Prefect) in the "
        "terminal; they always go to the run's log file (<run>/logs/)",
    )
    parser.add_argument("--json", action="store_true", help="print every iteration's metrics as JSON at the end")


def _knobs_epilog() -> str:
    """Every config knob with its default and help, for ``alphaspin run --help``."""
    from alphaspin.config import knobs

    lines = ["config knobs (YAML sections, or --set KEY=VALUE):"]
    lines += [f"  {key} (default {default}): {text}" for key, default, text in knobs()]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="alphaspin",
        description="Regularized self-play fine-tuning (α-SPIN, arXiv 2404.04291): Prefect flows over cached stages "
        "with every artifact in fsspec storage (local folder or any S3-compatible bucket).",
    )
    parser.add_argument("--log-level", default="INFO", help="Python logging level (default INFO)")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser(
        "run",
        help="run α-SPIN iterations t = 0..T (skips stages already done)",
        description="Run a recipe. Completed stages (valid manifest, same cache key) are skipped, "
        "so the same command resumes an interrupted run.",
        epilog=_knobs_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_config_args(run)
    run.add_argument(
        "--force",
        action="append",
        default=[],
        metavar="T:STAGE",
        help=f"re-run a stage even if done, e.g. --force 1:train; stages: {', '.join(STAGE_NAMES)}",
    )
    run.add_argument(
        "--fork-from",
        metavar="RUN_ID",
        help="record that this run (a new run.run_id) forks RUN_ID's recipe with changed knobs",
    )
    run.add_argument("--no-prefect", action="store_true", help="run the stages in this process without Prefect")
    run.add_argument(
        "--no-wait",
        action="store_true",
        help="if another process is running a stage of this run, stop with an error naming it "
        "instead of waiting (orchestration.wait_for_running_stage=false)",
    )
    _add_console_args(run)
    run.set_defaults(func=cmd_run)

    plan_ = sub.add_parser(
        "plan",
        help="print what `run` would do to every stage, and why, without running anything",
        description="Every stage of every iteration: cached, adopted from the fork parent, or to "
        "run - and for each one that runs, why (a knob it reads changed, an input re-runs, its "
        "artifacts fail verification, ...).",
    )
    _add_config_args(plan_)
    plan_.add_argument("--fork-from", metavar="RUN_ID", help="plan this run as a fork of RUN_ID")
    plan_.add_argument("--force", action="append", default=[], metavar="T:STAGE", help="as for run")
    plan_.add_argument("--json", action="store_true", help="print the plan as JSON")
    plan_.set_defaults(func=cmd_plan)

    rerun = sub.add_parser(
        "rerun",
        help="force one stage of one iteration of an existing run, and what follows it",
        description="Re-execute STAGE at ITERATION; downstream stages re-run because their cache "
        "keys include upstream manifests; upstream stages stay cached.",
    )
    rerun.add_argument("--run-id", required=True, help="the run (its config is read from run.json)")
    rerun.add_argument("--runs-root", default="./runs", help="fsspec URL holding the run (default ./runs)")
    rerun.add_argument("--iteration", "-t", type=int, required=True, help="iteration t")
    rerun.add_argument(
        "--stage", action="append", required=True, choices=STAGE_NAMES, help="stage to force (repeatable)"
    )
    rerun.add_argument("--no-prefect", action="store_true", help="run without Prefect")
    rerun.add_argument("--no-wait", action="store_true", help="as for run")
    _add_console_args(rerun)
    rerun.set_defaults(func=cmd_rerun, fork_from=None)

    status = sub.add_parser("status", help="list a run's stages, whether each verifies, and their metrics")
    status.add_argument("--run-id", required=True)
    status.add_argument("--runs-root", default="./runs")
    status.add_argument("--verify", action="store_true", help="check every file's sha256 (slower)")
    status.set_defaults(func=cmd_status)

    report = sub.add_parser("report", help="write a run's markdown report and charts into <run>/report/")
    report.add_argument("--run-id", required=True)
    report.add_argument("--runs-root", default="./runs")
    report.set_defaults(func=cmd_report)

    comp = sub.add_parser("compare", help="charts and differences of several runs side by side (SPIN vs α-SPIN)")
    comp.add_argument("runs", nargs="+", metavar="RUN_ID", help="run ids under --runs-root (the first is the baseline)")
    comp.add_argument("--runs-root", default="./runs")
    comp.add_argument("--out", default="./comparison", help="local folder for comparison.md and the PNG charts")
    comp.add_argument("--baseline", help="run id the differences are taken against (default: the first)")
    comp.set_defaults(func=cmd_compare)

    diff = sub.add_parser(
        "diff",
        help="every difference between two runs: config, device, versions, per-stage provenance",
        description="Why don't my numbers match: lists the config knobs (a → b), run.json's device and package "
        "versions, and per iteration and stage the recorded provenance (chat template and tokenizer hashes, "
        "generation backend and sampling parameters, package and lm-eval versions, lm-eval tasks and few-shot) "
        "and the operational knobs and device each stage ran with, that differ between RUN_A and RUN_B. With "
        "RUN_A alone: the stages of that run that ran with operational knobs (batch sizes of no-grad passes, "
        "engine memory, device, addresses) other than those in its run.json (the latest attempt's).",
    )
    diff.add_argument("run_a", metavar="RUN_A")
    diff.add_argument("run_b", metavar="RUN_B", nargs="?", help="the run to compare with (default: RUN_A's attempts)")
    diff.add_argument("--runs-root", default="./runs", help="fsspec URL holding both runs (default ./runs)")
    diff.set_defaults(func=cmd_diff)
    export = sub.add_parser(
        "export",
        help="write θ_t of a run as a standalone folder (PEFT adapter, or --merge: a plain transformers model)",
        description="Export the adapter of iteration t with the tokenizer (the run's chat template), a "
        "generation_config.json and a model card with the evaluate stage's metrics. Without --merge the folder "
        "is a PEFT adapter (PeftModel.from_pretrained / AutoPeftModelForCausalLM); with --merge the adapter is "
        "merged into the base weights (AutoModelForCausalLM.from_pretrained(DIR), vLLM).",
    )
    export.add_argument("--run-id", required=True, help="the run (its config is read from run.json)")
    export.add_argument("--runs-root", default="./runs", help="fsspec URL holding the run (default ./runs)")
    export.add_argument("--iteration", "-t", type=int, required=True, help="iteration t (its train stage must be done)")
    export.add_argument("--out", required=True, help="local folder to write (new, or empty)")
    export.add_argument("--merge", action="store_true", help="merge the adapter into the base model's weights")
    export.add_argument(
        "--push-to-hub", metavar="REPO_ID", help="then upload the folder to this Hugging Face model repo (HF_TOKEN)"
    )
    export.set_defaults(func=cmd_export)

    show = sub.add_parser("config", help="print the resolved config of a recipe (after --set overrides)")
    _add_config_args(show)
    show.set_defaults(func=cmd_config)

    grid = sub.add_parser(
        "grid",
        help="run a grid of runs (a recipe, axes of knobs, seeds); identical stages are computed once",
        description="Every cell (one value per axis) once per seed, as the run <grid>-<cell>-s<seed>. Stages "
        "whose cache key another cell of the seed holds are adopted, not recomputed. Re-running resumes the grid; "
        "the report (grid-report) is written at the end.",
    )
    grid.add_argument("--config", "-c", required=True, help="grid file (YAML; see configs/grid-*.yaml)")
    grid.add_argument("--set", "-s", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                      help="override a knob of every cell (repeatable)")  # fmt: skip
    grid.add_argument("--status", action="store_true", help="show every cell's progress instead of running")
    grid.add_argument("--json", action="store_true", help="with --status: as JSON")
    grid.add_argument("--no-prefect", action="store_true", help="run the cells without Prefect (local processes)")
    grid.add_argument("--concurrency", type=int, help="cells at once locally (default: the grid file's)")
    grid.add_argument(
        "--verbose", "-v", action="store_true", help="also show every stage and the libraries' output in the terminal"
    )
    grid.set_defaults(func=cmd_grid)

    grid_report = sub.add_parser(
        "grid-report",
        help="write a grid's report: mean ± 95%% CI across seeds, Δ vs the baseline cell, charts; on the synthetic "
        "task per cell the iteration of the lowest KL and the rise after it, paired against SPIN at the same h",
    )
    grid_report.add_argument("--config", "-c", required=True, help="grid file (YAML)")
    grid_report.add_argument("--set", "-s", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    grid_report.set_defaults(func=cmd_grid_report)

    schema = sub.add_parser("schema", help="print the config's JSON schema (every knob with its help)")
    schema.set_defaults(func=cmd_schema)
    return parser


def main(argv: list[str] | None = None) -> int:
    # A temporary Prefect server is this command's private database: it sends no usage telemetry (on
    # a machine without internet access its telemetry service prints an ERROR, or a "database is
    # locked" traceback, into the terminal). A user's own setting wins.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per Prefect API call otherwise
    try:
        return args.func(args)
    except KNOWN_ERRORS as error:
        print(f"alphaspin: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
