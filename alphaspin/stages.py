"""The six stages of one α-SPIN iteration (DESIGN.md), as plain functions.

    sample_prompts ─► generate (one per opponent member) ─► build_pairs ─► reference_logps ─► train ─► evaluate

Each takes the context, the iteration, and the records of its inputs; returns its own record.
A stage whose manifest verifies under its cache key is skipped (unless forced); otherwise it
writes its files, then its manifest. The Prefect tasks in ``tasks/`` and the plain CLI runner
call these same functions.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch

from alphaspin import data as sft_data
from alphaspin.context import Context, begin_stage, stage_dir_name, stage_key
from alphaspin.generation import build_requests, make_backend
from alphaspin.mixture import member_iteration, opponent_members
from alphaspin.reference import geometric_reference_logps, log_partition_monte_carlo
from alphaspin.storage import SCRATCH, StageRecord, sha256_bytes

logger = logging.getLogger(__name__)


def _done(ctx: Context, stage: str, t: int, key: str, force: bool, member: str | None = None) -> StageRecord | None:
    if force:
        return None
    record = ctx.stage(stage, t, member).verify(key)
    if record is None and ctx.parent is not None:  # a fork reuses its parent's identical stages
        record = ctx.stage(stage, t, member).adopt(ctx.parent.stage(t, stage_dir_name(stage, member)), key)
    if record is not None:
        logger.info("iter-%d/%s: cached (%s)", t, stage if member is None else f"generate-{member}", record.url)
    return record


# -- sample_prompts ------------------------------------------------------------------------------
def sample_prompts(ctx: Context, t: int, force: bool = False) -> StageRecord:
    """Sample the iteration's (x, y_w) rows and assign each to the opponent member that answers it."""
    key = stage_key(ctx.config, "sample_prompts", t, [])
    if (record := _done(ctx, "sample_prompts", t, key, force)) is not None:
        return record
    stage = ctx.stage("sample_prompts", t)
    begin_stage(stage, key, fresh=True)
    frame = sft_data.sample_prompts(ctx.sft, ctx.config.data, ctx.config.method, ctx.config.run.seed, t)
    stage.write_table("prompts.parquet", frame)
    shares = frame[frame.split == "train"].groupby("opponent").size().to_dict()
    members = [m.name for m in opponent_members(t, ctx.config.method.history)]
    return stage.commit("sample_prompts", t, key, {"pairs": int((frame.split == "train").sum()),
                        "heldout": int((frame.split == "heldout").sum()), "members": members,
                        "shares": {k: int(v) for k, v in shares.items()}})  # fmt: skip


# -- generate ------------------------------------------------------------------------------------
def generate_losers(ctx: Context, t: int, member: str, prompts: StageRecord, adapter: StageRecord | None,
                    force: bool = False) -> StageRecord:  # fmt: skip
    """Sample y_l for the member's share of prompts, in shards; an interrupted run resumes by shard."""
    if (member_iteration(member) is None) != (adapter is None):
        raise ValueError(f"generate {member}: the base needs no adapter, an iterate needs its train record")
    key = stage_key(ctx.config, "generate", t, [prompts, adapter], member)
    if (record := _done(ctx, "generate", t, key, force, member)) is not None:
        return record
    stage = ctx.stage("generate", t, member)
    begin_stage(stage, key, fresh=force)
    frame = ctx.stage("sample_prompts", t).read_table("prompts.parquet")
    rows = frame[frame.opponent == member].reset_index(drop=True)
    config = ctx.config.generation
    size = config.shard_size
    n_shards = max(1, math.ceil(len(rows) / size))
    existing = set(stage.list_files("shards"))
    todo = [i for i in range(n_shards) if f"shards/shard-{i:05d}.parquet" not in existing]
    if len(todo) < n_shards:
        logger.info("generate-%s: %d of %d shards already done", member, n_shards - len(todo), n_shards)
    started = time.monotonic()
    tokens = 0
    if todo and len(rows):
        adapter_path = ctx.local_adapter(adapter) if adapter is not None else None
        backend = make_backend(config, ctx.model_path, ctx.tokenizer, ctx.dtype, ctx.device,
                               [adapter_path] if adapter_path else [])  # fmt: skip
        seed = config.seed if config.seed is not None else ctx.config.run.seed
        try:
            for done, index in enumerate(todo):
                shard = rows.iloc[index * size : (index + 1) * size]
                requests = build_requests(ctx.tokenizer, list(zip(shard.id, shard.prompt, strict=True)),
                                          adapter_path, seed, t, member)  # fmt: skip
                texts = backend.generate(requests)
                tokens += sum(len(ctx.tokenizer(text)["input_ids"]) for text in texts)
                out = pd.DataFrame({"id": shard.id.values, "rejected": texts, "opponent": member})
                stage.write_table(f"shards/shard-{index:05d}.parquet", out)
                ctx.progress((done + 1) / len(todo), f"generate-{member}: shard {index + 1}/{n_shards}")
        finally:
            backend.close()
    elapsed = time.monotonic() - started
    metrics = {"rows": len(rows), "shards": n_shards, "new_tokens": tokens,
               "tokens_per_second": tokens / elapsed if tokens and elapsed > 0 else None,
               "backend": config.backend}  # fmt: skip
    return stage.commit("generate", t, key, metrics)


def read_generations(ctx: Context, t: int, member: str) -> pd.DataFrame:
    stage = ctx.stage("generate", t, member)
    names = sorted(n for n in stage.read_manifest()["files"] if n.startswith("shards/"))
    frames = [stage.read_table(n) for n in names]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["id", "rejected", "opponent"])


# -- build_pairs ---------------------------------------------------------------------------------
def build_pairs(ctx: Context, t: int, prompts: StageRecord, generations: Sequence[StageRecord],
                force: bool = False) -> StageRecord:  # fmt: skip
    """Join prompts with their generated losers: (id, x, y_w, y_l, opponent, split)."""
    key = stage_key(ctx.config, "build_pairs", t, [prompts, *sorted(generations, key=lambda r: r.url)])
    if (record := _done(ctx, "build_pairs", t, key, force)) is not None:
        return record
    stage = ctx.stage("build_pairs", t)
    begin_stage(stage, key, fresh=True)
    frame = ctx.stage("sample_prompts", t).read_table("prompts.parquet")
    members = sorted(frame.opponent.unique())
    losers = pd.concat([read_generations(ctx, t, m) for m in members], ignore_index=True)
    if losers.id.duplicated().any():
        raise RuntimeError(f"iter-{t}: a prompt has losers from two members; generation outputs are inconsistent")
    pairs = frame.merge(losers[["id", "rejected"]], on="id", how="inner", validate="one_to_one")
    if len(pairs) != len(frame):
        raise RuntimeError(f"iter-{t}: {len(frame) - len(pairs)} prompts have no generated loser")
    pairs = pairs.rename(columns={"answer": "chosen"})[["id", "prompt", "chosen", "rejected", "opponent", "split"]]
    empty = int((pairs.rejected.str.strip() == "").sum())
    stage.write_table("pairs.parquet", pairs)
    return stage.commit("build_pairs", t, key, {"pairs": int((pairs.split == "train").sum()),
                        "heldout_pairs": int((pairs.split == "heldout").sum()), "empty_losers": empty,
                        "identical_to_winner": int((pairs.rejected == pairs.chosen).sum())})  # fmt: skip


# -- reference_logps -----------------------------------------------------------------------------
BASE_CACHE = "cache/base-chosen-logps"


def _model_with_adapter(ctx: Context, adapter: StageRecord | None, trainable: bool = False):
    """Base model with TRL's fused log-prob head, wrapped with ``adapter`` when given."""
    from peft import PeftModel

    from alphaspin.dpo import prepare_for_logps
    from alphaspin.models import load_base_model

    model = prepare_for_logps(load_base_model(ctx.config.model.name_or_path, ctx.config.model.dtype, ctx.device))
    if adapter is not None:
        model = PeftModel.from_pretrained(model, ctx.local_adapter(adapter), is_trainable=trainable)
    return model if trainable else model.eval()


def _chosen_cache_keys(ctx: Context, tokenized) -> list[str]:
    """One key per (model, dtype, truncated prompt+answer token ids): base log-probs of an SFT
    answer never change, so they are computed once and reused in later iterations."""
    model = f"{ctx.config.model.name_or_path}|{ctx.config.model.dtype}|{ctx.config.training.max_length}"
    keys = []
    for prompt_ids, chosen_ids in zip(tokenized["prompt_ids"], tokenized["chosen_ids"], strict=True):
        ids = (list(prompt_ids) + list(chosen_ids))[: ctx.config.training.max_length]
        keys.append(sha256_bytes(f"{model}|{len(prompt_ids)}|{ids}".encode())[:32])
    return keys


def _read_base_cache(ctx: Context) -> pd.DataFrame:
    folder = ctx.storage.stage(None, BASE_CACHE)
    frames = [folder.read_table(n) for n in folder.list_files() if n.endswith(".parquet")]
    if not frames:
        return pd.DataFrame(columns=["key", "logps", "tokens"])
    return pd.concat(frames, ignore_index=True).drop_duplicates("key")


def reference_logps(ctx: Context, t: int, pairs: StageRecord, previous: StageRecord | None,
                    force: bool = False) -> StageRecord:  # fmt: skip
    """Reference log-probs of every pair: lp_base (adapter disabled), lp_prev (adapter θ_(t-1)) and
    ref = α·lp_prev + (1−α)·lp_base, on the token ids TRL trains on (`alphaspin.reference`)."""
    from alphaspin.dpo import completion_logps, dpo_config, pairs_to_dataset, tokenize_like_trl

    if (t == 0) != (previous is None):
        raise ValueError("reference_logps: t = 0 uses π_(−1) = π_base; t ≥ 1 needs the train record of t−1")
    key = stage_key(ctx.config, "reference_logps", t, [pairs, previous])
    if (record := _done(ctx, "reference_logps", t, key, force)) is not None:
        return record
    stage = ctx.stage("reference_logps", t)
    begin_stage(stage, key, fresh=True)
    training, alpha = ctx.config.training, ctx.config.method.alpha
    frame = ctx.stage("build_pairs", t).read_table("pairs.parquet")
    args = dpo_config(training, str(ctx.workdir / "trl"), ctx.config.run.seed, use_cpu=ctx.device == "cpu")
    tokenized = tokenize_like_trl(pairs_to_dataset(frame), ctx.tokenizer, args)
    dropped = len(frame) - len(tokenized)
    frame = frame.set_index("id").loc[list(tokenized["id"])].reset_index()
    pad, size = ctx.tokenizer.pad_token_id, training.reference_batch_size

    def score(model, rows, sides):
        return completion_logps(model, rows, pad, training.max_length, size, ctx.device, sides)

    model = _model_with_adapter(ctx, previous)
    base_context = model.disable_adapter if previous is not None else _nullcontext
    # Base log-probs of the SFT answers: from the cache where present.
    keys = _chosen_cache_keys(ctx, tokenized)
    cache = _read_base_cache(ctx).set_index("key")
    hit = np.array([k in cache.index for k in keys], dtype=bool)
    with base_context():
        base_rejected = score(model, tokenized, ("rejected",))
        missing = tokenized.select(np.flatnonzero(~hit).tolist())
        base_missing = score(model, missing, ("chosen",)) if len(missing) else None
    chosen_logps = np.zeros(len(keys))
    chosen_tokens = np.zeros(len(keys), dtype=np.int64)
    if hit.any():
        chosen_logps[hit] = cache.loc[np.array(keys)[hit], "logps"].to_numpy()
        chosen_tokens[hit] = cache.loc[np.array(keys)[hit], "tokens"].to_numpy()
    if base_missing is not None:
        chosen_logps[~hit] = base_missing.chosen_logps.to_numpy()
        chosen_tokens[~hit] = base_missing.chosen_tokens.to_numpy()
        new = pd.DataFrame({"key": np.array(keys)[~hit], "logps": chosen_logps[~hit], "tokens": chosen_tokens[~hit]})
        ctx.storage.stage(None, BASE_CACHE).write_table(f"iter-{t}-{key[:12]}.parquet", new.drop_duplicates("key"))
    out = frame.copy()
    out["lp_base_chosen"] = chosen_logps
    out["lp_base_rejected"] = base_rejected.rejected_logps.to_numpy()
    out["chosen_tokens"] = chosen_tokens
    out["rejected_tokens"] = base_rejected.rejected_tokens.to_numpy()
    if previous is None:  # π_θ(−1) = π_base
        out["lp_prev_chosen"], out["lp_prev_rejected"] = out.lp_base_chosen, out.lp_base_rejected
    else:
        prev = score(model, tokenized, ("chosen", "rejected"))
        out["lp_prev_chosen"], out["lp_prev_rejected"] = prev.chosen_logps.to_numpy(), prev.rejected_logps.to_numpy()
    ref_c = geometric_reference_logps(
        torch.tensor(out.lp_prev_chosen.values), torch.tensor(out.lp_base_chosen.values), alpha
    )
    ref_r = geometric_reference_logps(
        torch.tensor(out.lp_prev_rejected.values), torch.tensor(out.lp_base_rejected.values), alpha
    )
    out["log_partition"] = 0.0
    if training.normalized_reference and previous is not None and alpha < 1.0:
        log_z = _log_partition(ctx, t, model, out, previous)
        out["log_partition"] = log_z
        ref_c, ref_r = ref_c - torch.tensor(log_z), ref_r - torch.tensor(log_z)
    out["ref_chosen_logps"], out["ref_rejected_logps"] = ref_c.numpy(), ref_r.numpy()
    del model
    stage.write_table("reference.parquet", out)
    train = out[out.split == "train"]
    return stage.commit("reference_logps", t, key, {
        "pairs": len(train), "dropped_fully_truncated": dropped, "base_cache_hits": int(hit.sum()),
        "heldout/base_loglik_per_token": float(out[out.split == "heldout"].lp_base_chosen.sum()
                                               / max(1, out[out.split == "heldout"].chosen_tokens.sum())),
        "mean_ref_margin": float((train.ref_chosen_logps - train.ref_rejected_logps).mean()) if len(train) else None,
    })  # fmt: skip


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _log_partition(ctx: Context, t: int, model, frame: pd.DataFrame, previous: StageRecord) -> np.ndarray:
    """Monte-Carlo log Z(x) per pair from k samples of π_(t-1) (normalized_reference)."""
    from alphaspin.dpo import completion_logps, dpo_config, pairs_to_dataset, tokenize_like_trl

    training = ctx.config.training
    k = training.partition_samples
    prompts = frame.drop_duplicates("prompt")[["id", "prompt"]]
    adapter_path = ctx.local_adapter(previous)
    backend = make_backend(ctx.config.generation, ctx.model_path, ctx.tokenizer, ctx.dtype, ctx.device, [adapter_path])
    seed = (ctx.config.generation.seed or ctx.config.run.seed) + 7919
    try:
        rows = [(f"{i}#{j}", p) for i, p in zip(prompts.id, prompts.prompt, strict=True) for j in range(k)]
        texts = backend.generate(build_requests(ctx.tokenizer, rows, adapter_path, seed, t, "partition"))
    finally:
        backend.close()
    samples = pd.DataFrame({"id": [r[0] for r in rows], "prompt": [r[1] for r in rows], "chosen": texts,
                            "rejected": texts})  # fmt: skip
    args = dpo_config(training, str(ctx.workdir / "trl"), ctx.config.run.seed, use_cpu=ctx.device == "cpu")
    tokenized = tokenize_like_trl(pairs_to_dataset(samples), ctx.tokenizer, args)
    pad, size = ctx.tokenizer.pad_token_id, training.reference_batch_size
    prev = completion_logps(model, tokenized, pad, training.max_length, size, ctx.device, ("chosen",))
    with model.disable_adapter():
        base = completion_logps(model, tokenized, pad, training.max_length, size, ctx.device, ("chosen",))
    table = pd.DataFrame({"prompt": samples.set_index("id").loc[list(tokenized["id"]), "prompt"].values,
                          "prev": prev.chosen_logps.values, "base": base.chosen_logps.values})  # fmt: skip
    log_z = {}
    for prompt, group in table.groupby("prompt"):
        log_z[prompt] = float(log_partition_monte_carlo(
            torch.tensor(group.prev.values)[None], torch.tensor(group.base.values)[None], ctx.config.method.alpha)[0])  # fmt: skip
    return frame.prompt.map(log_z).fillna(0.0).to_numpy()


# -- train ---------------------------------------------------------------------------------------
def train(ctx: Context, t: int, reference: StageRecord, previous: StageRecord | None,
          force: bool = False) -> StageRecord:  # fmt: skip
    """Train θ_t from θ_(t-1) (a fresh LoRA at t = 0) with TRL's DPO loss against the stored
    geometric reference; checkpoints into storage every ``training.save_steps`` steps."""
    from alphaspin.training import run_training

    key = stage_key(ctx.config, "train", t, [reference, previous])
    if (record := _done(ctx, "train", t, key, force)) is not None:
        return record
    stage = ctx.stage("train", t)
    begin_stage(stage, key, fresh=force)
    frame = ctx.stage("reference_logps", t).read_table("reference.parquet")
    metrics = run_training(ctx, t, stage, frame[frame.split == "train"].reset_index(drop=True), previous)
    stage.clear_scratch()
    return stage.commit("train", t, key, metrics)


# -- evaluate ------------------------------------------------------------------------------------
def evaluate(ctx: Context, t: int, trained: StageRecord, reference: StageRecord, force: bool = False) -> StageRecord:
    """Held-out metrics of θ_t: mean log-likelihood per token of the held-out SFT answers, and the
    DPO reward accuracy and margin on held-out pairs against this iteration's reference."""
    from alphaspin.evaluation import evaluate_policy, run_benchmarks

    key = stage_key(ctx.config, "evaluate", t, [trained, reference])
    if (record := _done(ctx, "evaluate", t, key, force)) is not None:
        return record
    stage = ctx.stage("evaluate", t)
    begin_stage(stage, key, fresh=True)
    frame = ctx.stage("reference_logps", t).read_table("reference.parquet")
    heldout = frame[frame.split == "heldout"].reset_index(drop=True)
    model = _model_with_adapter(ctx, trained)
    metrics = evaluate_policy(ctx, t, model, heldout, stage)
    metrics.update(run_benchmarks(ctx, t, model, ctx.local_adapter(trained), stage))
    metrics["heldout/base_loglik_per_token"] = reference.metrics.get("heldout/base_loglik_per_token")
    metrics["train/loss"] = trained.metrics.get("train/loss")
    metrics["train/reward_margin"] = trained.metrics.get("train/reward_margin")
    metrics["train/reward_accuracy"] = trained.metrics.get("train/reward_accuracy")
    stage.write_json("metrics.json", {"iteration": t, **metrics})
    return stage.commit("evaluate", t, key, metrics)


__all__ = ["SCRATCH", "build_pairs", "evaluate", "generate_losers", "reference_logps", "sample_prompts", "train"]


# -- upstream records from storage ----------------------------------------------------------------
def stored_record(ctx: Context, stage: str, t: int, member: str | None = None) -> StageRecord:
    """The verified record of a finished stage, for running a later stage on its own."""
    record = ctx.stage(stage, t, member).verify()
    if record is None:
        name = stage if member is None else f"generate-{member}"
        raise FileNotFoundError(
            f"iter-{t}/{name} of run {ctx.config.run.run_id} is not done (no valid manifest at "
            f"{ctx.stage(stage, t, member).url}); run the iteration first"
        )
    return record


def stored_inputs(ctx: Context, stage: str, t: int, member: str | None = None) -> dict[str, object]:
    """Keyword inputs of ``stage`` at iteration t, read from storage (see `tasks.run_stage`)."""
    previous = stored_record(ctx, "train", t - 1) if t > 0 else None
    if stage == "sample_prompts":
        return {}
    if stage == "generate":
        if member is None:
            raise ValueError("the generate stage needs a member (e.g. base, iter-0)")
        k = member_iteration(member)
        return {"member": member, "prompts": stored_record(ctx, "sample_prompts", t),
                "adapter": stored_record(ctx, "train", k) if k is not None else None}  # fmt: skip
    if stage == "build_pairs":
        members = opponent_members(t, ctx.config.method.history)
        return {"prompts": stored_record(ctx, "sample_prompts", t),
                "generations": [stored_record(ctx, "generate", t, m.name) for m in members]}  # fmt: skip
    if stage == "reference_logps":
        return {"pairs": stored_record(ctx, "build_pairs", t), "previous": previous}
    if stage == "train":
        return {"reference": stored_record(ctx, "reference_logps", t), "previous": previous}
    if stage == "evaluate":
        return {"trained": stored_record(ctx, "train", t), "reference": stored_record(ctx, "reference_logps", t)}
    raise ValueError(f"unknown stage {stage!r}")


def stored_trained(ctx: Context, before: int) -> dict[int, StageRecord]:
    """Train records of iterations 0..before-1 (the adapters an iteration may need)."""
    return {k: stored_record(ctx, "train", k) for k in range(before)}
