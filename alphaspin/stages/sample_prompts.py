"""Stage ``sample_prompts``: the iteration's (x, y_w) rows, each assigned to the opponent member
that answers it (Algorithm 2; the opponent mixture of `alphaspin.mixture`)."""

from __future__ import annotations

from typing import Any

from alphaspin import data as sft_data
from alphaspin.config import AlphaSpinConfig
from alphaspin.mixture import opponent_members
from alphaspin.stage_spec import Job, StageSpec, pick


def reads(config: AlphaSpinConfig, iteration: int, member: str | None) -> dict[str, Any]:
    pairs = "method.pairs_first_iteration" if iteration == 0 else "method.pairs_per_iteration"
    members = [
        (m.name, str(m.weight)) for m in opponent_members(iteration, config.method.history, config.method.opponent)
    ]
    return {**pick(config, "data", "run.seed", pairs), "opponent": members}


def sample_prompts(job: Job) -> dict[str, Any]:
    config, t = job.config, job.iteration
    frame = sft_data.sample_prompts(job.workspace.sft, config.data, config.method, config.run.seed, t)
    job.out.write_table("prompts.parquet", frame)
    train = frame[frame.split == "train"]
    return {
        "pairs": len(train),
        "heldout": int((frame.split == "heldout").sum()),
        "members": [m.name for m in opponent_members(t, config.method.history, config.method.opponent)],
        "shares": {k: int(v) for k, v in train.groupby("opponent").size().items()},
        # pool rows that repeat a held-out prompt or answer, never trained on
        "excluded_overlapping_heldout": int(frame.attrs.get("excluded_overlapping_heldout", 0)),
    }


SPEC = StageSpec(
    name="sample_prompts",
    function=sample_prompts,
    inputs=(),
    reads=reads,
    version=2,  # 2: held-out rows shuffled before assignment; held-out text kept out of training
    gpu=False,
    description="Sample the iteration's SFT rows and assign each to an opponent member.",
)
