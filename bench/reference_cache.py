"""The reference_logps stage at t ≥ 1 with the cached base log-probs of the SFT answers vs
recomputing them.

The stage scores, on TRL's token ids: lp_base(y_w), lp_base(y_l) with the adapter disabled and
lp_prev(y_w), lp_prev(y_l) with θ_(t-1). lp_base(y_w) never changes (same model, same text), so
from iteration 1 on it is read from ``<run>/cache/base-chosen-logps`` instead of computed: 3 of 4
sides. The ratio is therefore bounded by the work of 4 sides over 3 — (2C + 2R) / (C + 2R) with
C, R the tokens of the prompt+chosen and prompt+rejected sequences: 4/3 when they are equally
long, up to 2 when the SFT answers are much longer than the generated losers — and the stage's
fixed costs (model load, tokenization, storage) pull it further towards 1.

Setup (product code throughout): a run in a temp folder, an iteration-0 adapter (small random
LoRA, standing in for θ_0), then iteration 1's real stages sample_prompts → generate (base and
iter-0: the h = 2 mixture) → build_pairs through the cached runner (`alphaspin.runner.Runner`).
Then the reference_logps node at t = 1 (`alphaspin.stages.reference_logps`) runs forced
(``Runner.run_node(Node("reference_logps", 1), inputs, force=True)``), alternately with the cache
folder removed ("recompute") and present ("cached").

    python -m bench.reference_cache                      # SmolLM2-135M, 24 pairs
    python -m bench.reference_cache --model tiny --pairs 4 --max-new-tokens 4    # smoke
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import common

NAME = "reference_cache"
TARGET = 1.5


def _padded_tokens(tokenized, max_length: int, batch_size: int, sides: tuple[str, ...]) -> int:
    """Tokens a completion_logps call feeds the model: per batch, the selected rows × the padded
    width, which TRL's collator takes over both sides (so a one-side call is as wide as both)."""
    lengths = [
        (min(len(p) + len(c), max_length), min(len(p) + len(r), max_length))
        for p, c, r in zip(tokenized["prompt_ids"], tokenized["chosen_ids"], tokenized["rejected_ids"], strict=True)
    ]
    total = 0
    for start in range(0, len(lengths), batch_size):
        batch = lengths[start : start + batch_size]
        total += len(batch) * len(sides) * max(max(pair) for pair in batch)
    return total


def _setup(stored, runner, workspace, reference, workdir: Path, seed: int):
    """Iteration 0's adapter as a committed train stage, then iteration 1's real stages up to
    build_pairs through the cached runner; returns the input records of the ``reference`` node."""
    from alphaspin.dag import bind_inputs, iteration_nodes, node_inputs
    from alphaspin.runner import begin_stage
    from alphaspin.stage_spec import Node

    config = stored.config
    stage = stored.dir(Node("train", 0))
    begin_stage(stage, "bench", fresh=True)
    stage.put_dir(
        common.lora_adapter(workspace.model_path, workdir / "adapter-0", seed, r=config.training.lora.r), "adapter"
    )
    records = {Node("train", 0): stage.commit("train", 0, "bench", {"note": "random LoRA standing in for θ_0 (bench)"})}
    for node in iteration_nodes(config, 1):  # sample_prompts, generate-base, generate-iter-0, build_pairs
        if node.stage == reference.stage:
            break
        records[node] = runner.run_node(node, bind_inputs(node_inputs(config, node), records.__getitem__))
    return bind_inputs(node_inputs(config, reference), records.__getitem__)


def run(
    model: str = common.SMOLLM2,
    pairs: int = 24,
    heldout: int = 4,
    max_length: int = 128,
    max_new_tokens: int = 32,
    reference_batch_size: int = 8,
    repeats: int = 2,
    seed: int = 0,
    data_source: str = "builtin:chatterbot",
) -> dict[str, Any]:
    import numpy as np

    import alphaspin.dpo
    from alphaspin.config import config_from_dict
    from alphaspin.generation import render_prompt_ids
    from alphaspin.runner import Runner
    from alphaspin.runs import Run
    from alphaspin.stage_spec import Node
    from alphaspin.stages.reference_logps import BASE_CACHE
    from alphaspin.workspace import Workspace

    workdir = Path(tempfile.mkdtemp(prefix="bench-refcache-"))
    config = config_from_dict(
        {
            "run": {"run_id": "bench-reference-cache", "runs_root": str(workdir / "runs"), "seed": seed},
            "model": {"name_or_path": common.model_name(model), "dtype": "float32"},
            "data": {"source": data_source, "heldout_size": heldout},
            "method": {
                "alpha": 0.95,
                "history": 2,
                "iterations": 1,
                "pairs_first_iteration": pairs,
                "pairs_per_iteration": pairs,
            },
            "generation": {"max_new_tokens": max_new_tokens, "batch_size": 8, "shard_size": 64},
            "training": {"max_length": max_length, "reference_batch_size": reference_batch_size},
        }
    )
    stored = Run(config)
    workspace = Workspace(config)
    runner = Runner(stored, workspace)
    reference = Node("reference_logps", 1)
    forward_log: list[dict[str, Any]] = []
    original = alphaspin.dpo.completion_logps

    def timed_completion_logps(model_, tokenized, *args, **kwargs):
        # completion_logps(model, tokenized, pad_token_id, max_length, batch_size, device, sides)
        names = ("pad_token_id", "max_length", "batch_size", "device", "sides")
        bound = {**dict(zip(names, args, strict=False)), **kwargs}
        sides = tuple(bound.get("sides", ("chosen", "rejected")))
        started = time.perf_counter()
        out = original(model_, tokenized, *args, **kwargs)
        forward_log.append(
            {
                "sides": sides,
                "sequences": len(tokenized) * len(sides),
                "padded_tokens": _padded_tokens(tokenized, bound["max_length"], bound["batch_size"], sides),
                "seconds": time.perf_counter() - started,
            }
        )
        return out

    runs: dict[str, list[dict[str, Any]]] = {"recompute": [], "cached": []}
    tables: dict[str, Any] = {}
    try:
        runner.ensure_run()
        started = time.perf_counter()
        inputs = _setup(stored, runner, workspace, reference, workdir, seed)
        setup_seconds = time.perf_counter() - started
        cache = stored.storage.path(BASE_CACHE)
        alphaspin.dpo.completion_logps = timed_completion_logps
        # untimed warm-up: loads files into the page cache and writes the base cache
        runner.run_node(reference, inputs, force=True)
        for repeat in range(repeats):
            order = ("recompute", "cached") if repeat % 2 == 0 else ("cached", "recompute")
            for mode in order:
                if mode == "recompute":
                    stored.storage.remove(cache, recursive=True)
                elif not stored.storage.find_files(cache):
                    raise RuntimeError("the base cache should exist before a cached run")
                forward_log.clear()
                started = time.perf_counter()
                record = runner.run_node(reference, inputs, force=True)
                wall = time.perf_counter() - started
                runs[mode].append(
                    {
                        "stage_seconds": wall,
                        "forward_seconds": sum(c["seconds"] for c in forward_log),
                        "sequences_scored": sum(c["sequences"] for c in forward_log),
                        "padded_tokens": sum(c["padded_tokens"] for c in forward_log),
                        "base_cache_hits": record.metrics["base_cache_hits"],
                        "calls": list(forward_log),
                    }
                )
                tables[mode] = stored.dir(reference).read_table("reference.parquet")
        frame = tables["cached"]
        train = frame[frame.split == "train"]
        pair_count = len(frame)
        prompt_tokens = float(sum(len(render_prompt_ids(workspace.tokenizer, p)) for p in frame.prompt))
    finally:
        alphaspin.dpo.completion_logps = original
        workspace.close()
        shutil.rmtree(workdir, ignore_errors=True)

    # the same reference either way (up to float rounding of a different batch composition)
    diff = max(
        float(np.max(np.abs(tables["cached"][c].to_numpy() - tables["recompute"][c].to_numpy())))
        for c in ("lp_base_chosen", "ref_chosen_logps", "ref_rejected_logps")
    )
    if diff > 1e-3:
        raise AssertionError(f"cached and recomputed references differ by {diff}")
    if any(r["base_cache_hits"] != pair_count for r in runs["cached"]) or any(
        r["base_cache_hits"] for r in runs["recompute"]
    ):
        raise AssertionError(f"unexpected cache hits: {runs}")
    chosen = prompt_tokens + float(frame.chosen_tokens.sum())  # tokens of the prompt+chosen sequences
    rejected = prompt_tokens + float(frame.rejected_tokens.sum())
    bound = (2 * chosen + 2 * rejected) / (chosen + 2 * rejected)
    median = {
        mode: {k: common.median([r[k] for r in rs]) for k in ("stage_seconds", "forward_seconds")}
        for mode, rs in runs.items()
    }
    padded_bound = runs["recompute"][0]["padded_tokens"] / runs["cached"][0]["padded_tokens"]
    stage_ratio = median["recompute"]["stage_seconds"] / median["cached"]["stage_seconds"]
    forward_ratio = median["recompute"]["forward_seconds"] / median["cached"]["forward_seconds"]
    summary = {
        "ratio_stage_wall": stage_ratio,
        "ratio_forward_only": forward_ratio,
        "target": TARGET,
        "meets_target": stage_ratio >= TARGET,
        "seconds": median,
        "forward_work_bound": bound,
        "padded_work_ratio": padded_bound,
        "sequence_tokens": {
            "prompt+chosen": chosen,
            "prompt+rejected": rejected,
            "mean_chosen_completion": float(frame.chosen_tokens.mean()),
            "mean_rejected_completion": float(frame.rejected_tokens.mean()),
        },
        "max_abs_diff_cached_vs_recomputed": diff,
        "setup_seconds": setup_seconds,
    }
    config_out = {
        "model": common.model_label(model),
        "device": workspace.device,
        "iteration": 1,
        "pairs": pair_count,
        "train_pairs": len(train),
        "max_length": max_length,
        "max_new_tokens": max_new_tokens,
        "reference_batch_size": reference_batch_size,
        "repeats": repeats,
        "seed": seed,
        "data": data_source,
        "alpha": 0.95,
        "history": 2,
    }
    notes = [
        "recompute: scores base(chosen), base(rejected), prev(chosen), prev(rejected); cached: the same minus "
        "base(chosen), read from the run's cache (base_cache_hits = all pairs)",
        "ratio_stage_wall includes loading the model and adapter, tokenization and storage; ratio_forward_only times "
        "the completion_logps calls alone; the forward work is bounded by 4/3 at equal chosen/rejected lengths",
        "best case for the cache: every row of iteration 1 was scored before (the warm-up run); in a run the hits at "
        "t >= 1 are the held-out rows plus the training rows sampled again",
        "forward_work_bound counts real tokens; padded_work_ratio counts what the model is fed (TRL's collator pads a "
        "batch to its longest chosen or rejected sequence, also when only one side is scored)",
    ]
    return common.result(NAME, config_out, {"runs": runs}, summary, notes)


def table(data: dict[str, Any]) -> str:
    s, c = data["summary"], data["config"]
    rows = [[mode, v["stage_seconds"], v["forward_seconds"]] for mode, v in s["seconds"].items()]
    rows.append(["ratio", s["ratio_stage_wall"], s["ratio_forward_only"]])
    title = (
        f"reference_logps at t=1 ({c['model']}, {c['device']}, {c['pairs']} pairs × ≤{c['max_length']} tokens): "
        f"recompute/cached = {s['ratio_stage_wall']:.2f}× stage, {s['ratio_forward_only']:.2f}× forwards "
        f"(work ratio {s['padded_work_ratio']:.2f}× padded, {s['forward_work_bound']:.2f}× real tokens; "
        f"target ≥ {TARGET}×)"
    )
    return common.format_table(["mode", "stage s", "forward s"], rows, title)


def main(argv: list[str] | None = None) -> int:
    common.script_setup()
    parser = common.base_parser(NAME, __doc__.split("\n\n")[0])
    parser.add_argument("--model", default=common.SMOLLM2, help="tiny, builtin:smollm2-135m-instruct, or a folder")
    parser.add_argument("--pairs", type=int, default=24, help="training pairs at t=1 (plus --heldout held-out rows)")
    parser.add_argument("--heldout", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--max-new-tokens", type=int, default=32, help="length of the generated losers")
    parser.add_argument("--reference-batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each mode, alternating which goes first")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", default="builtin:chatterbot", help="SFT source (data.source)")
    args = parser.parse_args(argv)
    with common.stdout_to_stderr():
        data = run(
            model=args.model,
            pairs=args.pairs,
            heldout=args.heldout,
            max_length=args.max_length,
            max_new_tokens=args.max_new_tokens,
            reference_batch_size=args.reference_batch_size,
            repeats=args.repeats,
            seed=args.seed,
            data_source=args.data,
        )
    common.emit(data, table(data), common.out_path(args, NAME))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
