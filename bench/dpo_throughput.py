"""DPO training steps/s: α-SPIN's precomputed geometric reference vs TRL's default.

Side by side in one process, on the same pairs, LoRA config, seed and data order:

- ``geometric``: `alphaspin.dpo.GeometricReferenceDPOTrainer` reading ``ref_chosen_logps`` /
  ``ref_rejected_logps`` columns (what the train stage runs): one policy forward + backward per step.
- ``trl``: stock ``trl.DPOTrainer`` with ``precompute_ref_log_probs=False``: the reference (the
  base, adapters disabled) is computed by an extra forward in every step.

The supplied reference is the one the reference_logps stage writes at t = 0 (π_(−1) = π_base, so
α·lp_base + (1−α)·lp_base = lp_base), computed with `alphaspin.dpo.completion_logps`. With the
same LoRA init the two trainers must then log the same loss at step 1 (policy = base there, so
both are ln 2 exactly when the supplied reference equals TRL's); later steps agree as long as
the gradients do. Both are recorded and checked.

    python -m bench.dpo_throughput                      # SmolLM2-135M, 6 steps of 4 pairs × 128 tokens
    python -m bench.dpo_throughput --model tiny --steps 3 --batch-size 2 --max-length 64   # smoke
"""

from __future__ import annotations

import math
import shutil
import tempfile
import time
from typing import Any

from bench import common

NAME = "dpo_throughput"
TARGET = 1.4


class _StepTimer:
    """Wall time of each optimizer step (forward, backward, optimizer), from on_step_begin to on_step_end."""

    def __new__(cls):
        from transformers import TrainerCallback

        class Timer(TrainerCallback):
            def __init__(self):
                self.durations: list[float] = []
                self._start = 0.0

            def on_step_begin(self, args, state, control, **kwargs):
                self._start = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                self.durations.append(time.perf_counter() - self._start)

        return Timer()


def _pairs(n: int, seed: int, source: str, fill_words: int):
    """n (prompt, chosen, rejected) rows of real SFT text: chosen = the row's answer, rejected =
    another row's answer. With ``fill_words`` > 0 each answer is extended with further answers up
    to that many words, so that every sequence is cut at max_length and all steps have one shape
    (short chatterbot answers would make step times depend on which rows a batch drew)."""
    import numpy as np

    from alphaspin.config import DataConfig
    from alphaspin.data import load_sft

    sft = load_sft(DataConfig(source=source))
    rng = np.random.default_rng(seed)
    rows = sft.iloc[rng.permutation(len(sft))[:n]].reset_index(drop=True)
    answers = list(sft.answer)

    def filled(text: str) -> str:
        while fill_words and len(text.split()) < fill_words:
            text = f"{text} {answers[int(rng.integers(len(answers)))]}"
        return text

    frame = rows.rename(columns={"answer": "chosen"})[["id", "prompt", "chosen"]].copy()
    frame["rejected"] = list(rows.answer.iloc[np.roll(np.arange(len(rows)), 1)])
    frame["chosen"] = [filled(t) for t in frame.chosen]
    frame["rejected"] = [filled(t) for t in frame.rejected]
    return frame


def _lora_checksum(model) -> float:
    return float(sum(p.detach().double().abs().sum().item() for n, p in model.named_parameters() if "lora_" in n))


def _train(kind: str, model_path: str, tokenizer, frame, args, lora_config, seed: int) -> dict[str, Any]:
    import trl
    from transformers import PrinterCallback, set_seed

    from alphaspin.dpo import REFERENCE_COLUMNS, GeometricReferenceDPOTrainer, pairs_to_dataset
    from alphaspin.models import load_base_model

    set_seed(seed)
    base = load_base_model(model_path, _dtype_name(args), None if args.use_cpu else "cuda")
    started = time.perf_counter()
    if kind == "geometric":  # what the train stage runs: the reference comes from the dataset columns
        trainer = GeometricReferenceDPOTrainer(
            model=base,
            args=args,
            processing_class=tokenizer,
            train_dataset=pairs_to_dataset(frame, REFERENCE_COLUMNS),
            peft_config=lora_config,
        )
    else:  # TRL's default: the reference (adapters disabled) is a forward in every step
        assert not args.precompute_ref_log_probs
        trainer = trl.DPOTrainer(
            model=base,
            args=args,
            processing_class=tokenizer,
            train_dataset=pairs_to_dataset(frame),
            peft_config=lora_config,
        )
    init_seconds = time.perf_counter() - started
    trainer.remove_callback(PrinterCallback)  # it prints every log dict to stdout
    timer = _StepTimer()
    trainer.add_callback(timer)
    init = _lora_checksum(trainer.model)
    started = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - started
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {
        "step_seconds": timer.durations,
        "train_seconds": wall,
        "trainer_init_seconds": init_seconds,
        "losses": losses,
        "lora_init_checksum": init,
    }


def _dtype_name(args) -> str:
    return "bfloat16" if args.bf16 else "float32"


def run(
    model: str = common.SMOLLM2,
    steps: int = 6,
    batch_size: int = 4,
    max_length: int = 128,
    pairs: int | None = None,
    repeats: int = 1,
    warmup_steps: int = 1,
    lora_r: int = 16,
    lora_dropout: float = 0.0,
    gradient_checkpointing: bool = False,
    beta: float = 0.1,
    seed: int = 0,
    data_source: str = "builtin:chatterbot",
    fill: bool = True,
    threads: int | None = None,
) -> dict[str, Any]:
    """Train both trainers ``repeats`` times (alternating which goes first) for ``steps`` steps;
    the ratio is the median step time of TRL's default over the geometric trainer's (the first
    ``warmup_steps`` steps of every run excluded)."""
    import pandas as pd
    import torch
    from peft import LoraConfig

    from alphaspin.config import TrainingConfig
    from alphaspin.dpo import completion_logps, dpo_config, pairs_to_dataset, prepare_for_logps, tokenize_like_trl
    from alphaspin.models import load_base_model, load_tokenizer, resolve_model_path

    common.set_threads(threads)
    if steps <= warmup_steps:
        raise ValueError("steps must exceed warmup_steps")
    name = common.model_name(model)
    model_path = resolve_model_path(name)
    tokenizer = load_tokenizer(name)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    n = pairs or steps * batch_size
    frame = _pairs(n, seed, data_source, fill_words=max_length if fill else 0)
    training = TrainingConfig(
        beta=beta,
        per_device_train_batch_size=batch_size,
        max_length=max_length,
        reference_batch_size=batch_size,
        gradient_checkpointing=gradient_checkpointing,
        learning_rate=5e-4,
    )
    workdir = tempfile.mkdtemp(prefix="bench-dpo-")
    try:
        overrides = {"max_steps": steps, "save_strategy": "no", "logging_steps": 1}
        args = dpo_config(training, workdir, seed, use_cpu=device == "cpu", **overrides)
        stock_args = dpo_config(
            training, workdir, seed, use_cpu=device == "cpu", precompute_ref_log_probs=False, **overrides
        )
        # The reference_logps stage's computation at t = 0: lp_base of both answers on TRL's token ids.
        tokenized = tokenize_like_trl(pairs_to_dataset(frame), tokenizer, args)
        started = time.perf_counter()
        base = prepare_for_logps(load_base_model(name, _dtype_name(args), device))
        ref = completion_logps(base, tokenized, tokenizer.pad_token_id, max_length, batch_size, device)
        reference_seconds = time.perf_counter() - started
        del base
        frame = frame.merge(
            pd.DataFrame(
                {"id": ref.id, "ref_chosen_logps": ref.chosen_logps, "ref_rejected_logps": ref.rejected_logps}
            ),
            on="id",
        )
        tokens = [
            min(len(r["prompt_ids"]) + len(r[s]), max_length) for r in tokenized for s in ("chosen_ids", "rejected_ids")
        ]
        lora = LoraConfig(
            r=lora_r,
            lora_alpha=2 * lora_r,
            lora_dropout=lora_dropout,
            task_type="CAUSAL_LM",
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        )
        runs: dict[str, list[dict[str, Any]]] = {"geometric": [], "trl": []}
        for repeat in range(repeats):
            order = ("geometric", "trl") if repeat % 2 == 0 else ("trl", "geometric")
            for kind in order:
                kind_args = args if kind == "geometric" else stock_args
                runs[kind].append(_train(kind, model_path, tokenizer, frame, kind_args, lora, seed))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    def steady(kind: str) -> list[float]:
        return [d for r in runs[kind] for d in r["step_seconds"][warmup_steps:]]

    step = {kind: common.median(steady(kind)) for kind in runs}
    ratio = step["trl"] / step["geometric"]
    fastest = {kind: min(steady(kind)) for kind in runs}  # least disturbed by other processes on a shared CPU
    # the same batch in both trainers (same seed, same sampler): ratios of step i to step i
    paired = [
        t / g
        for gr, tr in zip(runs["geometric"], runs["trl"], strict=True)
        for g, t in zip(gr["step_seconds"][warmup_steps:], tr["step_seconds"][warmup_steps:], strict=True)
    ]
    first = [(g["losses"][0], t["losses"][0]) for g, t in zip(runs["geometric"], runs["trl"], strict=True)]
    step1_diff = max(abs(g - t) for g, t in first)
    later = [
        abs(a - b)
        for g, t in zip(runs["geometric"], runs["trl"], strict=True)
        for a, b in zip(g["losses"][1:], t["losses"][1:], strict=True)
    ]
    same_init = len({round(r["lora_init_checksum"], 6) for rs in runs.values() for r in rs}) == 1
    loss_ok = step1_diff <= 1e-4 and all(math.isfinite(g) for g, _ in first)
    summary = {
        "ratio_steps_per_second": ratio,
        "target": TARGET,
        "meets_target": ratio >= TARGET,
        "ratio_fastest_steps": fastest["trl"] / fastest["geometric"],
        "ratio_paired_steps_median": common.median(paired),
        "steps_per_second": {kind: 1.0 / s for kind, s in step.items()},
        "median_step_seconds": step,
        "fastest_step_seconds": fastest,
        "step1_loss": {"geometric": first[0][0], "trl": first[0][1], "abs_diff": step1_diff, "ln2": math.log(2)},
        "step1_losses_agree": loss_ok,
        "later_steps_max_abs_loss_diff": max(later) if later else None,
        "same_lora_init": same_init,
        "reference_pass_seconds": reference_seconds,
        "reference_pass_amortised_per_step": reference_seconds / steps,
    }
    if not loss_ok:
        raise AssertionError(f"step-1 losses differ: {first} (the supplied reference is not TRL's reference)")
    config = {
        "model": common.model_label(model),
        "device": device,
        "steps": steps,
        "warmup_steps_excluded": warmup_steps,
        "repeats": repeats,
        "pairs": len(frame),
        "batch_size": batch_size,
        "max_length": max_length,
        "mean_sequence_tokens": sum(tokens) / len(tokens),
        "lora_r": lora_r,
        "lora_dropout": lora_dropout,
        "gradient_checkpointing": gradient_checkpointing,
        "beta": beta,
        "seed": seed,
        "dtype": _dtype_name(args),
        "data": data_source,
        "answers": "filled to max_length with further SFT answers" if fill else "SFT answers as they are",
        "torch_threads": torch.get_num_threads(),
    }
    notes = [
        "ratio_fastest_steps: the same with each trainer's fastest step (robust to other processes' load); "
        "ratio_paired_steps_median: median over step i of trl step i / geometric step i (the same batch)",
        "ratio = median steady-state step time of stock trl.DPOTrainer (precompute_ref_log_probs=False, reference "
        "forward with adapters disabled every step) / GeometricReferenceDPOTrainer (reference read from columns)",
        "reference_pass_seconds: the one-off forward that computes the columns (the reference_logps stage); it is paid "
        "once per iteration, not once per epoch and step",
    ]
    return common.result(NAME, config, {"runs": runs}, summary, notes)


def table(data: dict[str, Any]) -> str:
    s, c = data["summary"], data["config"]
    rows = [
        [kind, f"{1 / sps:.3f}", f"{sps:.3f}", s["step1_loss"][kind]] for kind, sps in s["steps_per_second"].items()
    ]
    title = (
        f"DPO throughput ({c['model']}, {c['device']}, batch {c['batch_size']} × {c['max_length']} tokens, "
        f"{c['steps']} steps × {c['repeats']}): ratio {s['ratio_steps_per_second']:.2f}× median, "
        f"{s['ratio_fastest_steps']:.2f}× fastest steps "
        f"(target ≥ {TARGET}×), step-1 losses agree: {s['step1_losses_agree']}"
    )
    return common.format_table(["trainer", "s/step", "steps/s", "step-1 loss"], rows, title)


def main(argv: list[str] | None = None) -> int:
    common.script_setup()
    parser = common.base_parser(NAME, __doc__.split("\n\n")[0])
    parser.add_argument("--model", default=common.SMOLLM2, help="tiny, builtin:smollm2-135m-instruct, or a folder")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup-steps", type=int, default=1, help="first steps of each run left out of the median")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each trainer, alternating which goes first")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--pairs", type=int, help="default: steps × batch size")
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--lora-dropout", type=float, default=0.0)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", default="builtin:chatterbot", help="SFT source (data.source)")
    parser.add_argument(
        "--no-fill",
        dest="fill",
        action="store_false",
        help="keep the SFT answers' own lengths (steps then differ in shape)",
    )
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args(argv)
    with common.stdout_to_stderr():
        data = run(
            model=args.model,
            steps=args.steps,
            batch_size=args.batch_size,
            max_length=args.max_length,
            pairs=args.pairs,
            repeats=args.repeats,
            warmup_steps=args.warmup_steps,
            lora_r=args.lora_r,
            lora_dropout=args.lora_dropout,
            gradient_checkpointing=args.gradient_checkpointing,
            seed=args.seed,
            data_source=args.data,
            fill=args.fill,
            threads=args.threads,
        )
    common.emit(data, table(data), common.out_path(args, NAME))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
