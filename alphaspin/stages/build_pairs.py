"""Stage ``build_pairs``: join the prompts with their generated losers into (x, y_w, y_l) pairs.

Each pair records whether its loser was cut off by ``generation.max_new_tokens``
(``rejected_truncated``) and the token ids it was generated as (``rejected_generated_ids``: a cut-off
loser is scored on those under ``truncated_losers: no_eos``, `alphaspin.dpo.end_rejected_prefixes`). With ``generation.truncated_losers: drop`` the training pairs whose loser
was cut off are left out here; held-out pairs are kept, so every iteration evaluates the same rows.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from alphaspin.config import AlphaSpinConfig
from alphaspin.stage_spec import Artifact, Input, Job, StageSpec
from alphaspin.stages.generate import read_generations

COLUMNS = ["id", "prompt", "chosen", "rejected", "rejected_truncated", "rejected_generated_ids", "opponent", "split"]


def reads(config: AlphaSpinConfig, iteration: int, member: str | None) -> dict[str, Any]:
    # A join of its inputs; of generation.truncated_losers only `drop` changes what it writes
    # (keep and no_eos differ in how later stages tokenize the same pairs).
    if config.generation.truncated_losers == "drop":
        return {"generation.truncated_losers": "drop"}
    return {}


def build_pairs(job: Job, prompts: Artifact, generations: list[Artifact]) -> dict[str, Any]:
    t = job.iteration
    frame = prompts.read_table("prompts.parquet")
    losers = pd.concat([read_generations(g) for g in generations], ignore_index=True)
    if losers.id.duplicated().any():
        raise RuntimeError(f"iter-{t}: a prompt has losers from two members; generation outputs are inconsistent")
    losers = losers.rename(columns={"truncated": "rejected_truncated", "generated_ids": "rejected_generated_ids"})
    if "rejected_generated_ids" not in losers.columns:  # shards of generate version < 5
        losers["rejected_generated_ids"] = [[] for _ in range(len(losers))]
    losers["rejected_generated_ids"] = [[int(i) for i in ids] for ids in losers.rejected_generated_ids]
    columns = ["id", "rejected", "rejected_truncated", "rejected_generated_ids"]
    pairs = frame.merge(losers[columns], on="id", how="inner", validate="one_to_one")
    if len(pairs) != len(frame):
        raise RuntimeError(f"iter-{t}: {len(frame) - len(pairs)} prompts have no generated loser")
    pairs = pairs.rename(columns={"answer": "chosen"})[COLUMNS].astype({"rejected_truncated": bool})
    train = pairs.split == "train"
    truncated = int((train & pairs.rejected_truncated).sum())
    dropped = 0
    if job.config.generation.truncated_losers == "drop":
        cut = train & pairs.rejected_truncated
        dropped = int(cut.sum())
        pairs = pairs[~cut].reset_index(drop=True)
        if not (pairs.split == "train").any():
            raise RuntimeError(
                f"iter-{t}: generation.truncated_losers: drop left no training pair (all {dropped} losers were cut "
                f"off by generation.max_new_tokens={job.config.generation.max_new_tokens}); raise max_new_tokens "
                "or use no_eos"
            )
    job.out.write_table("pairs.parquet", pairs)
    return {
        "pairs": int((pairs.split == "train").sum()),
        "heldout_pairs": int((pairs.split == "heldout").sum()),
        "empty_losers": int((pairs.rejected.str.strip() == "").sum()),
        "identical_to_winner": int((pairs.rejected == pairs.chosen).sum()),
        # training losers cut off by generation.max_new_tokens (before any drop), and their share
        "truncated_losers": truncated,
        "truncated_share": truncated / int(train.sum()) if train.any() else 0.0,
        "heldout_truncated_losers": int((pairs.rejected_truncated & (pairs.split == "heldout")).sum()),
        "dropped_truncated_losers": dropped,
    }


SPEC = StageSpec(
    name="build_pairs",
    function=build_pairs,
    inputs=(Input("prompts", "sample_prompts"), Input("generations", "generate", at="members")),
    reads=reads,
    version=3,  # 2: the rejected_truncated column; generation.truncated_losers: drop; 3: rejected_generated_ids
    gpu=False,
    description="Join prompts, human answers and generated losers into (x, y_w, y_l) pairs.",
)
