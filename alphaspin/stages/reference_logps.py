"""Stage ``reference_logps``: the geometric-mixture reference of every pair (paper §3.1).

lp_base (adapter disabled) and lp_prev (adapter θ_(t-1)) of both answers, on exactly the token
ids TRL trains on, and ref = α·lp_prev + (1−α)·lp_base (`alphaspin.reference`). Base log-probs of
the SFT answers never change: they are cached per (model, token ids) in the run's
``cache/base-chosen-logps`` and reused by later iterations.
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
import pandas as pd
import torch

from alphaspin.backends import make_backend
from alphaspin.config import AlphaSpinConfig
from alphaspin.generation import build_requests
from alphaspin.reference import geometric_reference_logps, log_partition_monte_carlo
from alphaspin.stage_spec import Artifact, Input, Job, StageSpec, pick
from alphaspin.storage import StageDir, sha256_bytes

BASE_CACHE = "cache/base-chosen-logps"


def reads(config: AlphaSpinConfig, iteration: int, member: str | None) -> dict[str, Any]:
    fields = pick(
        config,
        "model.name_or_path",
        "model.dtype",
        "model.chat_template",
        "method.alpha",
        "training.max_length",
        "training.normalized_reference",
    )
    if config.generation.losers_as_prefixes:  # cut-off losers are scored without the end-of-turn tokens
        fields.update(pick(config, "generation.truncated_losers"))
    if config.training.normalized_reference:  # the Monte-Carlo log Z(x) samples π_(t-1)
        fields.update(pick(config, "training.partition_samples", "generation", "run.seed"))
    return fields


def _chosen_cache_keys(config: AlphaSpinConfig, tokenized) -> list[str]:
    """One key per (model, dtype, truncated prompt+answer token ids)."""
    model = f"{config.model.name_or_path}|{config.model.dtype}|{config.training.max_length}"
    keys = []
    for prompt_ids, chosen_ids in zip(tokenized["prompt_ids"], tokenized["chosen_ids"], strict=True):
        ids = (list(prompt_ids) + list(chosen_ids))[: config.training.max_length]
        keys.append(sha256_bytes(f"{model}|{len(prompt_ids)}|{ids}".encode())[:32])
    return keys


def _read_base_cache(cache: StageDir) -> pd.DataFrame:
    frames = [cache.read_table(n) for n in cache.list_files() if n.endswith(".parquet")]
    if not frames:
        return pd.DataFrame(columns=["key", "logps", "tokens"])
    return pd.concat(frames, ignore_index=True).drop_duplicates("key")


def reference_logps(job: Job, pairs: Artifact, previous: Artifact | None) -> dict[str, Any]:
    from alphaspin.dpo import completion_logps

    ws, t = job.workspace, job.iteration
    training, alpha = job.config.training, job.config.method.alpha
    frame = pairs.read_table("pairs.parquet")
    tokenized = ws.tokenize_pairs(frame)
    dropped = len(frame) - len(tokenized)
    frame = frame.set_index("id").loc[list(tokenized["id"])].reset_index()
    pad, size = ws.tokenizer.pad_token_id, training.reference_batch_size

    def score(model, rows, sides):
        return completion_logps(model, rows, pad, training.max_length, size, ws.device, sides)

    model = ws.load_policy(previous)
    base_context = model.disable_adapter if previous is not None else contextlib.nullcontext
    cache = job.shared(BASE_CACHE)
    keys = _chosen_cache_keys(job.config, tokenized)
    cached = _read_base_cache(cache).set_index("key")
    hit = np.array([k in cached.index for k in keys], dtype=bool)
    with base_context():
        base_rejected = score(model, tokenized, ("rejected",))
        missing = tokenized.select(np.flatnonzero(~hit).tolist())
        base_missing = score(model, missing, ("chosen",)) if len(missing) else None
    chosen_logps = np.zeros(len(keys))
    chosen_tokens = np.zeros(len(keys), dtype=np.int64)
    if hit.any():
        chosen_logps[hit] = cached.loc[np.array(keys)[hit], "logps"].to_numpy()
        chosen_tokens[hit] = cached.loc[np.array(keys)[hit], "tokens"].to_numpy()
    if base_missing is not None:
        chosen_logps[~hit] = base_missing.chosen_logps.to_numpy()
        chosen_tokens[~hit] = base_missing.chosen_tokens.to_numpy()
        new = pd.DataFrame({"key": np.array(keys)[~hit], "logps": chosen_logps[~hit], "tokens": chosen_tokens[~hit]})
        cache.write_table(f"iter-{t}-{job.key[:12]}.parquet", new.drop_duplicates("key"))
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
        log_z = _log_partition(job, model, out, previous)
        out["log_partition"] = log_z
        ref_c, ref_r = ref_c - torch.tensor(log_z), ref_r - torch.tensor(log_z)
    out["ref_chosen_logps"], out["ref_rejected_logps"] = ref_c.numpy(), ref_r.numpy()
    del model
    job.out.write_table("reference.parquet", out)
    train, heldout = out[out.split == "train"], out[out.split == "heldout"]
    return {
        "pairs": len(train),
        "dropped_fully_truncated": dropped,
        "base_cache_hits": int(hit.sum()),
        "heldout/base_loglik_per_token": float(heldout.lp_base_chosen.sum() / max(1, heldout.chosen_tokens.sum())),
        "mean_ref_margin": float((train.ref_chosen_logps - train.ref_rejected_logps).mean()) if len(train) else None,
    }


def _log_partition(job: Job, model, frame: pd.DataFrame, previous: Artifact) -> np.ndarray:
    """Monte-Carlo log Z(x) per pair from k samples of π_(t-1) (normalized_reference)."""
    from alphaspin.dpo import completion_logps

    ws, config = job.workspace, job.config
    training = config.training
    k = training.partition_samples
    prompts = frame.drop_duplicates("prompt")[["id", "prompt"]]
    adapter_path = ws.local_adapter(previous)
    backend = make_backend(config.generation, ws.model_path, ws.tokenizer, ws.dtype, ws.device, [adapter_path])
    seed = config.generation.effective_seed(config.run.seed) + 7919
    try:
        rows = [(f"{i}#{j}", p) for i, p in zip(prompts.id, prompts.prompt, strict=True) for j in range(k)]
        completions = backend.complete(
            build_requests(ws.tokenizer, rows, adapter_path, seed, job.iteration, "partition")
        )
    finally:
        backend.close()
    texts = [c.text for c in completions]
    # Each sample is scored as the losers are: with no_eos, a cut-off sample as the prefix it is.
    samples = pd.DataFrame(
        {
            "id": [r[0] for r in rows],
            "prompt": [r[1] for r in rows],
            "chosen": texts,
            "rejected": texts,
            "rejected_truncated": [c.truncated for c in completions],
        }
    )
    tokenized = ws.tokenize_pairs(samples)
    pad, size = ws.tokenizer.pad_token_id, training.reference_batch_size
    prev = completion_logps(model, tokenized, pad, training.max_length, size, ws.device, ("rejected",))
    with model.disable_adapter():
        base = completion_logps(model, tokenized, pad, training.max_length, size, ws.device, ("rejected",))
    table = pd.DataFrame(
        {
            "prompt": samples.set_index("id").loc[list(tokenized["id"]), "prompt"].values,
            "prev": prev.rejected_logps.values,
            "base": base.rejected_logps.values,
        }
    )
    log_z = {}
    for prompt, group in table.groupby("prompt"):
        log_z[prompt] = float(
            log_partition_monte_carlo(
                torch.tensor(group.prev.values)[None], torch.tensor(group.base.values)[None], config.method.alpha
            )[0]
        )
    return frame.prompt.map(log_z).fillna(0.0).to_numpy()


SPEC = StageSpec(
    name="reference_logps",
    function=reference_logps,
    inputs=(Input("pairs", "build_pairs"), Input("previous", "train", at="previous")),
    reads=reads,
    version=3,  # 2: chat templates write BOS for tokenizers that add one; 3: cut-off losers (truncated_losers)
    gpu=True,
    description="Tokenize the pairs as TRL does and store lp_base, lp_prev and the geometric reference.",
)
