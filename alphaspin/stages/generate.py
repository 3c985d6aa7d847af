"""Stage ``generate``: the losers y_l of one opponent member's share of the prompts, in shards.

One node per member of the opponent mixture (``generate-base``, ``generate-iter-k``; with a sampler
of the geometric mixture, ``generate-sir-iter-k`` / ``generate-token_geometric-iter-k`` /
``generate-gflownet-iter-k``, the last sampling the adapter of ``train_sampler``): each is
cached, retried and resumed on its own. An interrupted generation resumes by finished shards, and
per-request seeds make the resumed losers equal those of an uninterrupted run.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import pandas as pd
import torch

from alphaspin import preemption
from alphaspin.backends import make_backend
from alphaspin.config import AlphaSpinConfig, GenerationConfig
from alphaspin.generation import Completion, build_requests, render_prompt_ids, request_seed
from alphaspin.mixture import member_sampler
from alphaspin.opponent import score_samples, sir_log_weights_at_cap, sir_resample_log_weights
from alphaspin.provenance import FILE as PROVENANCE
from alphaspin.provenance import collect
from alphaspin.stage_spec import Artifact, Input, Job, StageSpec, pick

logger = logging.getLogger(__name__)

SHARD = "shards/shard-{index:05d}.parquet"
# Knobs that change how generation is executed, not what it writes.
# Where and how the vLLM engine runs, not what it samples (new knobs stay out of every key).
VLLM_EXECUTION = (
    "generation.vllm_python",
    "generation.vllm_cpu_kvcache_gib",
    "generation.vllm_start_timeout_seconds",
    "generation.vllm_concurrency",
    "generation.vllm_data_parallel_size",
    "generation.vllm_args",
)
EXECUTION_ONLY = ("generation.shard_size", "generation.gpu_memory_utilization", *VLLM_EXECUTION)
# Knobs of what later stages do with the losers, not of sampling them; except for sir, whose weights
# target the distribution that generation.truncated_losers trains (`sir_log_weights_at_cap`).
DOWNSTREAM_ONLY = ("generation.truncated_losers",)
PER_REQUEST_SEEDS = "generation.per_request_seeds"
# Knobs that a sampler of the geometric mixture never applies (it samples its target at temperature 1,
# top-p 1: `sampling_config`), so they stay out of its key, as they stay out of what it records.
UNTEMPERED = ("generation.temperature", "generation.top_p")


def seeding_fields(config: AlphaSpinConfig) -> dict[str, Any]:
    """``generation.per_request_seeds`` as a cache-key field, only where it changes what is sampled
    (vLLM with it off; the transformers backend seeds per batch either way): runs made before the
    knob existed keep their keys."""
    if config.generation.backend == "vllm" and not config.generation.per_request_seeds:
        return {PER_REQUEST_SEEDS: False}
    return {}


def reads(config: AlphaSpinConfig, iteration: int, member: str | None) -> dict[str, Any]:
    fields = pick(
        config,
        "model.name_or_path",
        "model.dtype",
        "model.chat_template",
        "generation",
        "run.seed",
        exclude=EXECUTION_ONLY + DOWNSTREAM_ONLY + (PER_REQUEST_SEEDS,),
    )
    fields.update(seeding_fields(config))
    sampler = member_sampler(member) if member is not None else None
    # A sampler of the geometric mixture π_(t-1)^α·π_base^(1-α); gflownet's is a trained adapter (an
    # input: train_sampler reads α and its knobs), sampled with the sampler's max_new_tokens.
    if sampler == "gflownet":
        from alphaspin.stages.train_sampler import max_new_tokens

        fields["method.gflownet.max_new_tokens"] = max_new_tokens(config)
    elif sampler is not None:
        fields.update(pick(config, "method.alpha"))
        if sampler == "sir":
            fields.update(pick(config, "method.sir_proposals", "training.max_length", "generation.truncated_losers"))
    if sampler is not None:
        for knob in UNTEMPERED:
            fields.pop(knob, None)
    return fields


def sampling_config(config: AlphaSpinConfig, sampler: str | None) -> GenerationConfig:
    """The generation settings a member's sampler actually uses: sir proposes from π_(t-1) itself,
    token_geometric samples the per-token mixture softmax(α·ℓ_(t-1) + (1-α)·ℓ_base) itself, and gflownet
    samples its trained policy, all at temperature 1 without nucleus truncation (gflownet up to the
    length it was trained on): each targets the geometric mixture, and tempering would change the
    target (`alphaspin.opponent`). A plain policy member (the arithmetic opponent) uses ``generation``
    as configured. What is returned here is what ``provenance.json`` records and `alphaspin diff` compares."""
    if sampler == "gflownet":
        from alphaspin.stages.train_sampler import max_new_tokens

        update = {"temperature": 1.0, "top_p": 1.0, "max_new_tokens": max_new_tokens(config)}
        return config.generation.model_copy(update=update)
    if sampler in ("sir", "token_geometric"):
        return config.generation.model_copy(update={"temperature": 1.0, "top_p": 1.0})
    return config.generation


def sampling_used(config: AlphaSpinConfig, member: str) -> dict[str, Any]:
    """The backend and sampling parameters of one member's generation, for ``provenance.json``."""
    sampler = member_sampler(member)
    used = sampling_config(config, sampler)
    # token_geometric mixes two policies token by token in-process, whatever generation.backend says.
    backend = "transformers (token_geometric, in-process)" if sampler == "token_geometric" else used.backend
    params = {
        "temperature": used.temperature,
        "top_p": used.top_p,
        "max_new_tokens": used.max_new_tokens,
        "seed": used.effective_seed(config.run.seed),
        "per_request_seeds": used.per_request_seeds or used.backend != "vllm",
        "batch_size": used.batch_size,
    }
    if sampler == "sir":  # its weights target what truncated_losers trains
        params.update(sir_proposals=config.method.sir_proposals, truncated_losers=config.generation.truncated_losers)
    if backend == "vllm":
        params.update(tensor_parallel_size=used.tensor_parallel_size, max_lora_rank=used.max_lora_rank)
    return {"member": member, "sampler": sampler or "policy", "backend": backend, "sampling": params}


def _columns(completions: list[Completion]) -> dict[str, list]:
    """The shard columns of the losers: text, whether cut off, and the generated ids (`Completion`)."""
    return {
        "rejected": [c.text for c in completions],
        "truncated": [c.truncated for c in completions],
        "generated_ids": [list(c.token_ids) for c in completions],
    }


class PlainSampler:
    """One policy (the base, or θ_k as a LoRA adapter) through the generation backend."""

    def __init__(
        self, job: Job, adapter: Artifact | None, config: GenerationConfig | None = None, folder: str = "adapter"
    ):
        ws = job.workspace
        self.job, self.config = job, config or job.config.generation
        self.adapter_path = ws.local_adapter(adapter, folder) if adapter is not None else None
        paths = [self.adapter_path] if self.adapter_path else []
        self.backend = make_backend(self.config, ws.model_path, ws.tokenizer, ws.dtype, ws.device, paths)
        self.seed = self.config.effective_seed(job.config.run.seed)

    def complete(self, rows: list[tuple[str, str]], member: str) -> list[Completion]:
        requests = build_requests(
            self.job.workspace.tokenizer, rows, self.adapter_path, self.seed, self.job.iteration, member
        )
        return self.backend.complete(requests)

    def __call__(self, shard: pd.DataFrame) -> dict[str, list]:
        completions = self.complete(list(zip(shard.id, shard.prompt, strict=True)), str(self.job.node.member))
        return _columns(completions)

    def close(self) -> None:
        self.backend.close()


class SirSampler:
    """Self-normalised importance resampling toward π_(t-1)^α·π_base^(1-α) (`alphaspin.opponent`):
    k proposals per prompt from π_(t-1) itself (temperature 1, top-p 1), scored under π_(t-1) and
    π_base as generated (`score_samples`: "answer, then end of turn", or a cut-off prefix), weighted
    toward the target ``generation.truncated_losers`` trains (`sir_log_weights_at_cap`), one resampled
    by weight with a per-row seed."""

    def __init__(self, job: Job, adapter: Artifact):
        exact = sampling_config(job.config, "sir")
        self.job, self.k = job, job.config.method.sir_proposals
        self.proposals = PlainSampler(job, adapter, exact)
        self.model = job.workspace.load_policy(adapter)  # scores the proposals; loaded once for every shard
        self.ess: list[float] = []

    def __call__(self, shard: pd.DataFrame) -> dict[str, list]:
        ws, job = self.job.workspace, self.job
        mode, alpha = job.config.generation.truncated_losers, job.config.method.alpha
        rows = [(f"{i}#{j}", p) for i, p in zip(shard.id, shard.prompt, strict=True) for j in range(self.k)]
        completions = self.proposals.complete(rows, f"{job.node.member}-proposals")
        texts = [c.text for c in completions]
        samples = pd.DataFrame(
            {
                "id": [r[0] for r in rows],
                "prompt": [r[1] for r in rows],
                "text": texts,
                "truncated": [c.truncated for c in completions],
                "generated_ids": [list(c.token_ids) for c in completions],  # a cut-off one is scored on these
            }
        )
        training = job.config.training
        scored = score_samples(
            self.model, ws.tokenizer, ws.dpo_args(), samples, training.reference_batch_size, ws.device, mode == "keep"
        )
        if len(scored.ids) != len(samples):
            raise ValueError(f"{job.node.label}: a prompt fills training.max_length; its proposals cannot be scored")
        shape = (len(shard), self.k)
        cut = torch.tensor(samples.truncated.to_numpy()).view(shape)
        ends = [e.view(shape) if e is not None else None for e in (scored.end_prev, scored.end_base)]
        log_w = sir_log_weights_at_cap(scored.lp_prev.view(shape), scored.lp_base.view(shape), cut, alpha, mode, *ends)
        chosen, ess = [], []
        for row, row_id in enumerate(shard.id):
            generator = torch.Generator().manual_seed(
                request_seed(self.proposals.seed, job.iteration, str(job.node.member), str(row_id))
            )
            index, row_ess = sir_resample_log_weights(log_w[row : row + 1], generator)
            chosen.append(completions[row * self.k + int(index[0])])
            ess.append(float(row_ess[0]))
        self.ess.extend(ess)
        return {**_columns(chosen), "sir_ess": ess}

    def metrics(self) -> dict[str, Any]:
        mean = sum(self.ess) / len(self.ess) if self.ess else None
        return {"sir/mean_ess": mean, "sir/mean_ess_fraction": mean / self.k if mean is not None else None}

    def close(self) -> None:
        self.proposals.close()
        del self.model


class TokenGeometricSampler:
    """Per-token geometric mixture of θ_(t-1) and the base (`alphaspin.opponent.TokenGeometricSampler`)."""

    def __init__(self, job: Job, adapter: Artifact):
        from alphaspin.opponent import TokenGeometricSampler as Sampler

        ws, config = job.workspace, job.config
        self.job, self.model = job, ws.load_policy(adapter)
        self.seed = config.generation.effective_seed(config.run.seed)
        self.sampler = Sampler(
            self.model,
            ws.tokenizer,
            config.method.alpha,
            config.generation.max_new_tokens,
            ws.device,
            config.generation.batch_size,
        )

    def __call__(self, shard: pd.DataFrame) -> dict[str, list]:
        ws, job, member = self.job.workspace, self.job, str(self.job.node.member)
        prompts = [render_prompt_ids(ws.tokenizer, p) for p in shard.prompt]
        seeds = [request_seed(self.seed, job.iteration, member, str(i)) for i in shard.id]
        return _columns(self.sampler.generate(prompts, seeds))

    def close(self) -> None:
        del self.model


def _sampler(job: Job, adapter: Artifact | None, trained_sampler: Artifact | None = None):
    sampler = member_sampler(str(job.node.member))
    if sampler is None:
        return PlainSampler(job, adapter)
    if sampler == "gflownet":
        # The sampler is a LoRA policy (`alphaspin.gflownet`): sampled as it was trained, at
        # temperature 1 without nucleus truncation, up to the length it was trained on.
        if trained_sampler is None:
            raise ValueError(f"{job.node.label}: the gflownet opponent needs iter-{job.iteration}/train_sampler")
        return PlainSampler(job, trained_sampler, sampling_config(job.config, sampler), folder="sampler")
    if adapter is None:
        raise ValueError(f"{job.node.label}: the {sampler} sampler needs θ_(t-1)")
    if sampler == "sir":
        return SirSampler(job, adapter)
    if sampler == "token_geometric":
        return TokenGeometricSampler(job, adapter)
    raise ValueError(f"{job.node.label}: unknown opponent sampler {sampler!r} (method.opponent)")


def generate(job: Job, prompts: Artifact, adapter: Artifact | None, sampler: Artifact | None = None) -> dict[str, Any]:
    member, ws = job.node.member, job.workspace
    frame = prompts.read_table("prompts.parquet")
    rows = frame[frame.opponent == member].reset_index(drop=True)
    config = job.config.generation
    size = config.shard_size
    n_shards = max(1, math.ceil(len(rows) / size))
    existing = set(job.out.list_files("shards"))
    todo = [i for i in range(n_shards) if SHARD.format(index=i) not in existing]
    if len(todo) < n_shards:
        logger.info("%s: %d of %d shards already done", job.node.label, n_shards - len(todo), n_shards)
    job.out.write_json(PROVENANCE, {**collect(job.config, ws), "generation": sampling_used(job.config, str(member))})
    started = time.monotonic()
    tokens = 0
    extra: dict[str, Any] = {}
    if todo and len(rows):
        draw = _sampler(job, adapter, sampler)
        try:
            for done, index in enumerate(todo):
                if preemption.requested():  # a SIGTERM while this stage runs beside others, off the main thread
                    raise preemption.Preempted(
                        f"{job.node.label}: preempted by SIGTERM before shard {index + 1}/{n_shards}; the finished "
                        f"shards are kept: {preemption.RESUME_HINT}"
                    )
                shard = rows.iloc[index * size : (index + 1) * size]
                columns = draw(shard)
                texts = columns.pop("rejected")
                tokens += sum(len(ws.tokenizer(text)["input_ids"]) for text in texts)
                truncated = columns.pop("truncated")
                out = pd.DataFrame(
                    {"id": shard.id.values, "rejected": texts, "opponent": member, "truncated": truncated, **columns}
                )
                job.out.write_table(SHARD.format(index=index), out)
                ws.progress((done + 1) / len(todo), f"shard {index + 1}/{n_shards}")
            extra = draw.metrics() if hasattr(draw, "metrics") else {}
        finally:
            draw.close()
    elapsed = time.monotonic() - started
    shards = [job.out.read_table(SHARD.format(index=i)) for i in range(n_shards) if len(rows)]
    return {
        "rows": len(rows),
        "truncated": int(sum(int(shard.truncated.sum()) for shard in shards)),  # cut off by max_new_tokens
        "shards": n_shards,
        "new_tokens": tokens,
        "tokens_per_second": tokens / elapsed if tokens and elapsed > 0 else None,
        "backend": config.backend,
        "sampler": member_sampler(str(member)) or "policy",
        **extra,
    }


def read_generations(generation: Artifact) -> pd.DataFrame:
    """The losers of one member's generate stage: (id, rejected, opponent, truncated, generated_ids;
    generated_ids is absent from shards written before version 5)."""
    frames = [generation.read_table(name) for name in generation.files("shards/")]
    if not frames:
        return pd.DataFrame(columns=["id", "rejected", "opponent", "truncated", "generated_ids"])
    return pd.concat(frames, ignore_index=True)


SPEC = StageSpec(
    name="generate",
    function=generate,
    # sampler: the gflownet opponent's trained sampler (None unless train_sampler is enabled).
    inputs=(
        Input("prompts", "sample_prompts"),
        Input("adapter", "train", at="member"),
        Input("sampler", "train_sampler"),
    ),
    reads=reads,
    # 2: chat templates write BOS for tokenizers that add one; 3: the `truncated` column; 4: provenance.json;
    # 5: the `generated_ids` column (a cut-off loser is scored on the ids it was generated as)
    version=5,
    gpu=True,
    per_member=True,
    resumable=True,
    description="Sample the losers y_l of one opponent member's share of prompts.",
)
