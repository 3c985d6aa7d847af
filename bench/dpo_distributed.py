"""DPO training throughput on 2 processes vs 1 (the train stage with ``training.num_processes``).

Side by side in one run, on the same pairs, seed, LoRA init and data order, through the train stage's
own function (`alphaspin.stages.train.train_pairs`, storage on a local folder):

- ``one_process``: ``training.num_processes: 1``, batch 2b per step, trained inside this process;
- ``two_processes``: ``training.num_processes: 2``, batch b per rank, a child ``accelerate launch`` of
  two ranks (gloo on CPU) that average their gradients: the same 2b pairs per optimizer step.

Samples/s = pairs / the Trainer's own ``train_runtime`` (the training loop), and pairs / the stage's wall
time (with the launch, the ranks' imports and model loads). Per-step losses of both are recorded side by
side: with LoRA dropout off they agree to float precision (tests/test_distributed_training.py).
On a CPU the ranks share the machine's cores (``--num_cpu_threads_per_process`` = cores / ranks): two ranks
of 1 thread against one process of 2 threads, so no speed-up is expected; on GPUs each rank has its own.

    python -m bench.dpo_distributed                     # SmolLM2-135M, 4 steps of 4 pairs × 128 tokens
    python -m bench.dpo_distributed --model tiny --steps 2 --batch-size 2 --max-length 48   # smoke
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from bench import common
from bench.dpo_throughput import _pairs

NAME = "dpo_distributed"
KINDS = ("one_process", "two_processes")


def _reference(frame, model: str, max_length: int, batch_size: int):
    """The reference_logps stage's value at t = 0 (lp_base of both answers on TRL's token ids)."""
    import pandas as pd

    from alphaspin.config import TrainingConfig
    from alphaspin.dpo import completion_logps, dpo_config, pairs_to_dataset, prepare_for_logps, tokenize_like_trl
    from alphaspin.models import load_base_model, load_tokenizer

    tokenizer = load_tokenizer(model)
    with tempfile.TemporaryDirectory() as folder:
        args = dpo_config(TrainingConfig(max_length=max_length), folder, 0, use_cpu=True)
        tokenized = tokenize_like_trl(pairs_to_dataset(frame), tokenizer, args)
    base = prepare_for_logps(load_base_model(model, "float32", "cpu"))
    ref = completion_logps(base, tokenized, tokenizer.pad_token_id, max_length, batch_size, "cpu")
    columns = {"id": ref.id, "ref_chosen_logps": ref.chosen_logps, "ref_rejected_logps": ref.rejected_logps}
    return frame.merge(pd.DataFrame(columns), on="id")


def _train(kind: str, model: str, frame, batch_size: int, max_length: int, lora_r: int, seed: int, root: Path):
    from alphaspin.config import AlphaSpinConfig
    from alphaspin.stage_spec import Job, Node
    from alphaspin.stages.train import train_pairs
    from alphaspin.storage import RunStorage
    from alphaspin.workspace import Workspace

    processes = 2 if kind == "two_processes" else 1
    config = AlphaSpinConfig.model_validate(
        {
            "model": {"name_or_path": model, "device": "cpu"},
            "run": {"runs_root": str(root / kind), "seed": seed},
            "generation": {"truncated_losers": "keep"},  # the pairs are SFT answers: none cut off
            "training": {
                "per_device_train_batch_size": 2 * batch_size // processes,
                "num_processes": processes,
                "max_length": max_length,
                "learning_rate": 5e-4,
                "save_steps": 10_000,  # no checkpoints: the loop alone
                "lora": {"r": lora_r, "lora_alpha": 2 * lora_r, "lora_dropout": 0.0},
            },
        }
    )
    stage = RunStorage(config.run.runs_root, "bench").stage(0, "train")
    with Workspace(config) as ws:
        started = time.perf_counter()
        metrics = train_pairs(Job(Node("train", 0), config, stage, ws, kind), frame, None)
        wall = time.perf_counter() - started
    history = stage.read_json("train_log.json")
    end = next(h for h in history if "train_runtime" in h)
    return {
        "processes": processes,
        "per_device_batch_size": 2 * batch_size // processes,
        "stage_seconds": wall,
        "train_runtime_seconds": end["train_runtime"],
        "samples_per_second": len(frame) / end["train_runtime"],
        "samples_per_second_stage": len(frame) / wall,
        "losses": [h["loss"] for h in history if "loss" in h and "train_runtime" not in h],
        "steps": metrics["train/steps"],
    }


def run(
    model: str = common.SMOLLM2,
    steps: int = 4,
    batch_size: int = 2,
    max_length: int = 128,
    repeats: int = 1,
    lora_r: int = 16,
    seed: int = 0,
    data_source: str = "builtin:chatterbot",
) -> dict[str, Any]:
    """Train ``repeats`` times each way (alternating which goes first): ``steps`` optimizer steps of
    2 × ``batch_size`` pairs, in one process, and in two processes of ``batch_size`` pairs each."""
    import torch

    name = common.model_name(model)
    frame = _pairs(steps * 2 * batch_size, seed, data_source, fill_words=max_length)
    started = time.perf_counter()
    frame = _reference(frame, name, max_length, 2 * batch_size)
    reference_seconds = time.perf_counter() - started
    runs: dict[str, list[dict[str, Any]]] = {kind: [] for kind in KINDS}
    with tempfile.TemporaryDirectory(prefix="bench-dpo-distributed-") as folder:
        for repeat in range(repeats):
            for kind in KINDS if repeat % 2 == 0 else KINDS[::-1]:
                root = Path(folder) / f"repeat-{repeat}"
                runs[kind].append(_train(kind, name, frame, batch_size, max_length, lora_r, seed, root))
    sps = {kind: common.median([r["samples_per_second"] for r in runs[kind]]) for kind in KINDS}
    stage_sps = {kind: common.median([r["samples_per_second_stage"] for r in runs[kind]]) for kind in KINDS}
    curves = list(zip(runs["one_process"][0]["losses"], runs["two_processes"][0]["losses"], strict=True))
    summary = {
        "ratio_samples_per_second": sps["two_processes"] / sps["one_process"],
        "ratio_samples_per_second_stage": stage_sps["two_processes"] / stage_sps["one_process"],
        "samples_per_second": sps,
        "samples_per_second_stage": stage_sps,
        "loss_curves": {"one_process": [a for a, _ in curves], "two_processes": [b for _, b in curves]},
        "max_abs_loss_diff": max(abs(a - b) for a, b in curves),
        "target": None,
        "reference_pass_seconds": reference_seconds,
    }
    config = {
        "model": common.model_label(model),
        "device": "cpu",
        "steps": steps,
        "pairs": len(frame),
        "effective_batch": 2 * batch_size,
        "batch_size_per_rank": batch_size,
        "max_length": max_length,
        "lora_r": lora_r,
        "lora_dropout": 0.0,
        "seed": seed,
        "dtype": "float32",
        "data": data_source,
        "repeats": repeats,
        "torch_threads_parent": torch.get_num_threads(),
        "torch_threads_per_rank": max(1, (common.machine()["cpu_count"] or 1) // 2),
    }
    notes = [
        "samples_per_second: pairs / the Trainer's train_runtime (training loop); samples_per_second_stage: pairs / "
        "the train stage's wall time (launch, imports, model loads, adapter upload included)",
        "on CPU both variants share the same cores: 2 ranks × cores/2 threads vs 1 process × all cores (no target)",
        "loss per optimizer step; with 2 ranks the logged loss is the mean over the ranks (= the mean over the 2b pairs)",
    ]
    return common.result(NAME, config, {"runs": runs}, summary, notes)


def table(data: dict[str, Any]) -> str:
    s, c = data["summary"], data["config"]
    curves = s["loss_curves"]
    rows = [
        [kind, s["samples_per_second"][kind], s["samples_per_second_stage"][kind], " ".join(f"{x:.4f}" for x in curves[kind])]
        for kind in KINDS
    ]  # fmt: skip
    title = (
        f"DPO on 2 processes vs 1 ({c['model']}, cpu, {c['steps']} steps × {c['effective_batch']} pairs × "
        f"{c['max_length']} tokens): {s['ratio_samples_per_second']:.2f}× samples/s in the loop, "
        f"{s['ratio_samples_per_second_stage']:.2f}× for the whole stage; losses differ by ≤ {s['max_abs_loss_diff']:.1e}"
    )
    return common.format_table(["variant", "samples/s (loop)", "samples/s (stage)", "loss per step"], rows, title)


def main(argv: list[str] | None = None) -> int:
    common.script_setup()
    parser = common.base_parser(NAME, __doc__.split("\n\n")[0])
    parser.add_argument("--model", default=common.SMOLLM2, help="tiny, builtin:smollm2-135m-instruct, or a folder")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=2, help="pairs per rank (one process takes twice as many)")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=1, help="runs of each variant, alternating which goes first")
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", default="builtin:chatterbot", help="SFT source (data.source)")
    args = parser.parse_args(argv)
    with common.stdout_to_stderr():
        data = run(
            model=args.model,
            steps=args.steps,
            batch_size=args.batch_size,
            max_length=args.max_length,
            repeats=args.repeats,
            lora_r=args.lora_r,
            seed=args.seed,
            data_source=args.data,
        )
    common.emit(data, table(data), common.out_path(args, NAME))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
