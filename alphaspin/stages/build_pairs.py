"""Stage ``build_pairs``: join the prompts with their generated losers into (x, y_w, y_l) pairs."""

from __future__ import annotations

from typing import Any

import pandas as pd

from alphaspin.config import AlphaSpinConfig
from alphaspin.stage_spec import Artifact, Input, Job, StageSpec
from alphaspin.stages.generate import read_generations


def reads(config: AlphaSpinConfig, iteration: int, member: str | None) -> dict[str, Any]:
    return {}  # a pure join of its inputs


def build_pairs(job: Job, prompts: Artifact, generations: list[Artifact]) -> dict[str, Any]:
    t = job.iteration
    frame = prompts.read_table("prompts.parquet")
    losers = pd.concat([read_generations(g) for g in generations], ignore_index=True)
    if losers.id.duplicated().any():
        raise RuntimeError(f"iter-{t}: a prompt has losers from two members; generation outputs are inconsistent")
    pairs = frame.merge(losers[["id", "rejected"]], on="id", how="inner", validate="one_to_one")
    if len(pairs) != len(frame):
        raise RuntimeError(f"iter-{t}: {len(frame) - len(pairs)} prompts have no generated loser")
    pairs = pairs.rename(columns={"answer": "chosen"})[["id", "prompt", "chosen", "rejected", "opponent", "split"]]
    job.out.write_table("pairs.parquet", pairs)
    return {
        "pairs": int((pairs.split == "train").sum()),
        "heldout_pairs": int((pairs.split == "heldout").sum()),
        "empty_losers": int((pairs.rejected.str.strip() == "").sum()),
        "identical_to_winner": int((pairs.rejected == pairs.chosen).sum()),
    }


SPEC = StageSpec(
    name="build_pairs",
    function=build_pairs,
    inputs=(Input("prompts", "sample_prompts"), Input("generations", "generate", at="members")),
    reads=reads,
    version=1,
    gpu=False,
    description="Join prompts, human answers and generated losers into (x, y_w, y_l) pairs.",
)
