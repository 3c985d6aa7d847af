"""Stage ``generate``: the losers y_l of one opponent member's share of the prompts, in shards.

One node per member of the opponent mixture (``generate-base``, ``generate-iter-k``): each is
cached, retried and resumed on its own. An interrupted generation resumes by finished shards, and
per-request seeds make the resumed losers equal those of an uninterrupted run.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import pandas as pd

from alphaspin.backends import make_backend
from alphaspin.config import AlphaSpinConfig
from alphaspin.generation import build_requests
from alphaspin.stage_spec import Artifact, Input, Job, StageSpec, pick

logger = logging.getLogger(__name__)

SHARD = "shards/shard-{index:05d}.parquet"
# Knobs that change how generation is executed, not what it writes.
EXECUTION_ONLY = ("generation.shard_size", "generation.gpu_memory_utilization")
# Knobs of what later stages do with the losers, not of sampling them.
DOWNSTREAM_ONLY = ("generation.truncated_losers",)


def reads(config: AlphaSpinConfig, iteration: int, member: str | None) -> dict[str, Any]:
    fields = pick(
        config,
        "model.name_or_path",
        "model.dtype",
        "model.chat_template",
        "generation",
        "run.seed",
        exclude=EXECUTION_ONLY + DOWNSTREAM_ONLY,
    )
    return fields


def generate(job: Job, prompts: Artifact, adapter: Artifact | None) -> dict[str, Any]:
    member, t, ws = job.node.member, job.iteration, job.workspace
    frame = prompts.read_table("prompts.parquet")
    rows = frame[frame.opponent == member].reset_index(drop=True)
    config = job.config.generation
    size = config.shard_size
    n_shards = max(1, math.ceil(len(rows) / size))
    existing = set(job.out.list_files("shards"))
    todo = [i for i in range(n_shards) if SHARD.format(index=i) not in existing]
    if len(todo) < n_shards:
        logger.info("%s: %d of %d shards already done", job.node.label, n_shards - len(todo), n_shards)
    started = time.monotonic()
    tokens = 0
    if todo and len(rows):
        adapter_path = ws.local_adapter(adapter) if adapter is not None else None
        backend = make_backend(
            config, ws.model_path, ws.tokenizer, ws.dtype, ws.device, [adapter_path] if adapter_path else []
        )
        seed = config.effective_seed(job.config.run.seed)
        try:
            for done, index in enumerate(todo):
                shard = rows.iloc[index * size : (index + 1) * size]
                requests = build_requests(
                    ws.tokenizer, list(zip(shard.id, shard.prompt, strict=True)), adapter_path, seed, t, member
                )
                completions = backend.complete(requests)
                texts = [c.text for c in completions]
                tokens += sum(len(ws.tokenizer(text)["input_ids"]) for text in texts)
                out = pd.DataFrame(
                    {
                        "id": shard.id.values,
                        "rejected": texts,
                        "opponent": member,
                        "truncated": [c.truncated for c in completions],
                    }
                )
                job.out.write_table(SHARD.format(index=index), out)
                ws.progress((done + 1) / len(todo), f"{job.node.folder}: shard {index + 1}/{n_shards}")
        finally:
            backend.close()
    elapsed = time.monotonic() - started
    shards = [job.out.read_table(SHARD.format(index=i)) for i in range(n_shards) if len(rows)]
    return {
        "rows": len(rows),
        "truncated": int(sum(int(shard.truncated.sum()) for shard in shards)),  # cut off by max_new_tokens
        "shards": n_shards,
        "new_tokens": tokens,
        "tokens_per_second": tokens / elapsed if tokens and elapsed > 0 else None,
        "backend": config.backend,
    }


def read_generations(generation: Artifact) -> pd.DataFrame:
    """The losers of one member's generate stage: (id, rejected, opponent, truncated)."""
    frames = [generation.read_table(name) for name in generation.files("shards/")]
    if not frames:
        return pd.DataFrame(columns=["id", "rejected", "opponent", "truncated"])
    return pd.concat(frames, ignore_index=True)


SPEC = StageSpec(
    name="generate",
    function=generate,
    inputs=(Input("prompts", "sample_prompts"), Input("adapter", "train", at="member")),
    reads=reads,
    version=3,  # 2: chat templates write BOS for tokenizers that add one; 3: the `truncated` column
    gpu=True,
    per_member=True,
    resumable=True,
    description="Sample the losers y_l of one opponent member's share of prompts.",
)
