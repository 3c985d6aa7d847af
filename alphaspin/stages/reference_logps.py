"""Stage ``reference_logps``: the reference log-prob of every pair (``method.reference``).

lp_base (adapter disabled) and lp_prev (adapter θ_(t-1)) of both answers, on exactly the token
ids TRL trains on, and the reference (`alphaspin.reference`):
- geometric (the paper, §3.1): α·lp_prev + (1−α)·lp_base, minus a Monte-Carlo log Z(x) with
  ``training.normalized_reference`` (`_log_partition`);
- arithmetic: log(α·π_(t-1) + (1−α)·π_base), from the same two columns;
- ema: lp_ema, the log-prob under the EMA adapter of stage ``ema_adapter`` (π_base at t = 0).
Base log-probs of the SFT answers never change: they are cached per (model, token ids) in the run's
``cache/base-chosen-logps`` and reused by later iterations.
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
import pandas as pd
import torch

from alphaspin.backends import make_backend
from alphaspin.config import AlphaSpinConfig, GenerationConfig
from alphaspin.generation import build_requests
from alphaspin.reference import (
    arithmetic_reference_logps,
    geometric_reference_logps,
    log_partition_interval,
    log_partition_jackknife,
    log_partition_monte_carlo,
)
from alphaspin.stage_spec import Artifact, Input, Job, StageSpec, pick
from alphaspin.stages.generate import PER_REQUEST_SEEDS, VLLM_EXECUTION, seeding_fields
from alphaspin.storage import StageDir, sha256_bytes

BASE_CACHE = "cache/base-chosen-logps"


# Generation knobs that do not change the partition samples: the sampler is π_(t-1) itself.
SAMPLER_OVERRIDDEN = (
    "generation.temperature",
    "generation.top_p",
    "generation.max_new_tokens",
    "generation.shard_size",
)


def reads(config: AlphaSpinConfig, iteration: int, member: str | None) -> dict[str, Any]:
    fields = pick(
        config,
        "model.name_or_path",
        "model.dtype",
        "model.chat_template",
        "method.reference",
        "training.max_length",
        "training.normalized_reference",
    )
    if config.generation.losers_as_prefixes:  # cut-off losers are scored without the end-of-turn tokens
        fields.update(pick(config, "generation.truncated_losers"))
    # ema's reference comes in as the ema_adapter input; at t = 0 every reference is π_base (π_θ(−1) = π_base),
    # whatever α: iteration 0 is the same stage for every α (a grid computes it once)
    if config.method.reference != "ema" and iteration > 0:
        fields.update(pick(config, "method.alpha"))
    if config.training.normalized_reference:  # the Monte-Carlo log Z(x) samples π_(t-1)
        fields.update(
            pick(
                config,
                "training.partition_samples",
                "training.partition_max_new_tokens",
                "generation",
                "run.seed",
                exclude=SAMPLER_OVERRIDDEN + VLLM_EXECUTION + (PER_REQUEST_SEEDS,),
            )
        )
        fields.update(seeding_fields(config))
    return fields


def partition_sampler(config: AlphaSpinConfig) -> GenerationConfig:
    """The generation settings of the log Z(x) samples: π_(t-1) itself (temperature 1, top-p 1, no
    top-k) up to ``training.partition_max_new_tokens`` (default training.max_length) tokens; backend,
    batch size and engine settings stay the user's."""
    limit = config.training.partition_max_new_tokens or config.training.max_length
    return config.generation.model_copy(update={"temperature": 1.0, "top_p": 1.0, "max_new_tokens": limit})


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


def reference_logps(job: Job, pairs: Artifact, previous: Artifact | None, ema: Artifact | None) -> dict[str, Any]:
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
    reference = job.config.method.reference
    sides = {
        side: (torch.tensor(out[f"lp_prev_{side}"].values), torch.tensor(out[f"lp_base_{side}"].values))
        for side in ("chosen", "rejected")
    }
    out["log_partition"], out["log_partition_se"] = 0.0, 0.0
    out["log_partition_bias"], out["log_partition_low"], out["log_partition_high"] = 0.0, 0.0, 0.0
    partition: dict[str, Any] = {}
    if previous is None and reference != "ema":  # t = 0: π_ref = π_base exactly, not α·lp + (1−α)·lp rounded
        ref_c, ref_r = torch.tensor(out.lp_base_chosen.values), torch.tensor(out.lp_base_rejected.values)
    elif reference == "arithmetic":
        ref_c, ref_r = (arithmetic_reference_logps(*sides[side], alpha) for side in ("chosen", "rejected"))
    elif reference == "ema":  # θ_ema(0) = θ_base: the EMA adapter exists from t = 1
        if ema is None:
            out["lp_ema_chosen"], out["lp_ema_rejected"] = out.lp_base_chosen, out.lp_base_rejected
        else:
            model.load_adapter(ws.local_adapter(ema), adapter_name="ema")
            model.set_adapter("ema")
            lp_ema = score(model, tokenized, ("chosen", "rejected"))
            out["lp_ema_chosen"], out["lp_ema_rejected"] = (
                lp_ema.chosen_logps.to_numpy(),
                lp_ema.rejected_logps.to_numpy(),
            )
        ref_c, ref_r = torch.tensor(out.lp_ema_chosen.values), torch.tensor(out.lp_ema_rejected.values)
    else:
        ref_c, ref_r = (geometric_reference_logps(*sides[side], alpha) for side in ("chosen", "rejected"))
        if training.normalized_reference and previous is not None and alpha < 1.0:
            log_z, spread, partition = _log_partition(job, model, out, previous)
            out["log_partition"] = log_z
            for column in ("se", "bias", "low", "high"):
                out[f"log_partition_{column}"] = spread[column]
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
        **partition,
    }


def _log_partition(
    job: Job, model, frame: pd.DataFrame, previous: Artifact
) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, Any]]:
    """Monte-Carlo log Z(x) per pair, its spread (columns ``se``, ``bias``, ``low``, ``high``), and the
    sampler's counts (normalized_reference).

    k = ``training.partition_samples`` samples y ~ π_(t-1)(·|x) per prompt, drawn from π_(t-1) itself
    (`partition_sampler`: temperature 1, top-p 1, no top-k; the losers' settings would bias the
    estimate), then log Ẑ = log mean_i (π_base(y_i|x)/π_(t-1)(y_i|x))^(1−α) which is what is subtracted.
    A complete sample is scored as "the answer, then end of turn" (`alphaspin.opponent.score_samples`:
    its ids up to the template's end-of-turn marker, e.g. ``<|im_end|>``, without the newline the
    template writes after it), so Z(x) = Σ_y π_(t-1)(y⊤|x)^α·π_base(y⊤|x)^(1−α) over answers y⊤.
    Stored beside it (`alphaspin.reference`): the jackknife SE (``log_partition_se``; the delta-method SE
    understates the spread at small k), the jackknife estimate of its Jensen bias E[log Ẑ] − log Z
    (``log_partition_bias``, ≤ 0 typically), and the 95% interval of the bias-corrected estimate
    (``log_partition_low``/``_high``, Student's t with k − 1 degrees of freedom; below nominal coverage
    at small k: about 89% at k = 4 on the heavier-tailed toy of tests/test_reference_math.py).

    Cut-off samples. What is scored of a sample is at most ``training.max_length`` tokens of prompt +
    answer (TRL's truncation: the very window in which the training pairs' reference log-probs are
    computed), and a sample may stop at the generation limit without its end token. Such a sample is
    not a complete sequence; it is kept, with the probabilities of its scored prefix (no end-of-turn
    token is scored). Then, with W the window, the mean weight
    is unbiased for Z_W = Σ_{complete y in W} π_prev^α π_base^(1−α) + Σ_{prefixes p that fill W}
    π_prev(p)^α π_base(p)^(1−α), and by Hölder's inequality (Σ_y a^α b^(1−α) ≤ (Σ a)^α (Σ b)^(1−α)
    over the completions of each prefix)

        0 ≤ Z_W − Z ≤ P_prev(cut)^α · P_base(cut)^(1−α),

    a bias upwards bounded by the cut-off tail masses, which vanishes as the limit grows past the
    answers. Z_W is also exactly the normaliser of the reference over the truncated sequences that
    training scores. The same Hölder step, for one prefix: the geometric reference of a cut-off
    loser p (``generation.truncated_losers: no_eos``), π_prev(p)^α·π_base(p)^(1−α), is an upper bound
    of the mass Σ_{y ⊒ p} π_prev(y)^α·π_base(y)^(1−α) that the untruncated mixture puts on answers
    starting with p, exact at α = 1 (`alphaspin.reference.geometric_reference_logps`). Dropping cut-off samples instead would estimate E[w | complete] (bias of either
    sign, ~P_prev(cut)) and leave prompts whose samples are all cut with no estimate at all. The
    count of cut-off samples is reported (``partition/cut_off_samples``): a large share means the
    estimate is of Z_W rather than Z. The generation backend says which samples hit the limit.
    On top of this, log of a mean is biased low by ≈ −Var(w)/(2k·E[w]²) (`log_partition_monte_carlo`).
    """
    from alphaspin.opponent import score_samples

    ws, config = job.workspace, job.config
    training = config.training
    k = training.partition_samples
    sampler = partition_sampler(config)
    prompts = frame.drop_duplicates("prompt")[["id", "prompt"]]
    adapter_path = ws.local_adapter(previous)
    backend = make_backend(sampler, ws.model_path, ws.tokenizer, ws.dtype, ws.device, [adapter_path])
    seed = config.generation.effective_seed(config.run.seed) + 7919
    try:
        rows = [(f"{i}#{j}", p) for i, p in zip(prompts.id, prompts.prompt, strict=True) for j in range(k)]
        completions = backend.complete(
            build_requests(ws.tokenizer, rows, adapter_path, seed, job.iteration, "partition")
        )
    finally:
        backend.close()
    samples = pd.DataFrame(
        {
            "id": [r[0] for r in rows],
            "prompt": [r[1] for r in rows],
            "text": [c.text for c in completions],
            "truncated": [c.truncated for c in completions],  # stopped by the limit, not by its end
            "generated_ids": [list(c.token_ids) for c in completions],  # a cut-off one is scored on these
        }
    )
    # A complete sample is scored as "answer, then end of turn" (not the template's newline after it), a
    # cut-off one as the prefix it is, whatever generation.truncated_losers says of the losers: see the
    # docstring for what is then estimated.
    scored = score_samples(model, ws.tokenizer, ws.dpo_args(), samples, training.reference_batch_size, ws.device)
    tokenized = scored.tokenized
    cut = np.array(
        [
            truncated or len(p) + len(c) > training.max_length
            for truncated, p, c in zip(
                samples.set_index("id").loc[scored.ids, "truncated"],
                tokenized["prompt_ids"],
                tokenized["rejected_ids"],
                strict=True,
            )
        ]
    )
    table = pd.DataFrame(
        {
            "prompt": samples.set_index("id").loc[scored.ids, "prompt"].values,
            "prev": scored.lp_prev.numpy(),
            "base": scored.lp_base.numpy(),
        }
    )
    alpha = config.method.alpha
    log_z: dict[str, float] = {}
    spread: dict[str, dict[str, float]] = {"se": {}, "bias": {}, "low": {}, "high": {}}
    for prompt, group in table.groupby("prompt"):
        lp_prev, lp_base = torch.tensor(group.prev.values)[None], torch.tensor(group.base.values)[None]
        estimate = log_partition_monte_carlo(lp_prev, lp_base, alpha)
        bias, se = log_partition_jackknife(lp_prev, lp_base, alpha)
        low, high = log_partition_interval(estimate, bias, se, lp_prev.shape[-1])
        log_z[prompt] = float(estimate[0])
        for column, value in (("se", se), ("bias", bias), ("low", low), ("high", high)):
            spread[column][prompt] = float(value[0])
    ses, biases = np.array(list(spread["se"].values())), np.array(list(spread["bias"].values()))
    metrics = {
        "partition/samples": len(table),
        "partition/cut_off_samples": int(cut.sum()),
        "partition/mean_log_z_se": float(np.nanmean(ses)) if np.isfinite(ses).any() else None,
        "partition/mean_log_z_bias": float(np.nanmean(biases)) if np.isfinite(biases).any() else None,
    }
    columns = {name: frame.prompt.map(values).to_numpy(dtype=float) for name, values in spread.items()}  # NaN: k = 1
    return frame.prompt.map(log_z).fillna(0.0).to_numpy(), columns, metrics


SPEC = StageSpec(
    name="reference_logps",
    function=reference_logps,
    inputs=(
        Input("pairs", "build_pairs"),
        Input("previous", "train", at="previous"),
        Input("ema", "ema_adapter"),  # None unless method.reference: ema and t ≥ 1
    ),
    reads=reads,
    # 2: chat templates write BOS for tokenizers that add one; 3: cut-off losers (truncated_losers), log Z
    # samples from π_(t-1) itself, log_partition_se column, method.reference (arithmetic, ema); 4: log Z samples
    # scored as "answer, then end of turn" (without the template's newline); 5: cut-off losers and log Z samples
    # scored on their generated ids (rejected_generated_ids); log_partition_se by the jackknife,
    # log_partition_bias / _low / _high
    version=5,
    gpu=True,
    description="Tokenize the pairs as TRL does and store lp_base, lp_prev and the reference (method.reference).",
)
