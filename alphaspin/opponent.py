"""Samplers of the geometric-mixture opponent π_(t-1)^α · π_base^(1-α) / Z(x) (paper §3, Appendix A).

The paper's reference is this geometric mixture, but its opponent samples from the *arithmetic*
mixture of past iterates, because the geometric mixture does not factor over tokens and is hard
to sample. ``method.opponent`` offers samplers of the geometric mixture itself:

- ``sir`` — self-normalised importance resampling: k proposals y_1..y_k ~ π_(t-1)(·|x), weights
  w_i = π_ref(y_i)/π_(t-1)(y_i) ∝ (π_base(y_i|x)/π_(t-1)(y_i|x))^(1-α), one proposal drawn with
  probability w_i / Σ_j w_j. Its output distribution tends to the geometric mixture as k → ∞ (bias
  O(1/k)); the effective sample size (Σw)²/Σw² says how far the two policies have drifted apart.
- ``token_geometric`` — sample each token from the normalised per-token mixture
  softmax(α·log p_(t-1)(·|y_<s) + (1-α)·log p_base(·|y_<s)) (as the Nash-MD mixture of Munos et
  al. does). It is cheap (two forwards per token) but biased at the sequence level: it samples
  π_(t-1)^α·π_base^(1-α)(y) / Π_s z_s(y_<s), where z_s(y_<s) = Σ_v p_(t-1)(v|y_<s)^α p_base(v|y_<s)^(1-α)
  ≤ 1 is the local normaliser, instead of dividing by one global Z(x). Sequences through prefixes
  where the two policies disagree (small z_s) are over-weighted. It is exact when α ∈ {0, 1} or
  the policies agree.

No tempering: every sampler here samples at temperature 1 without nucleus (top-p) truncation,
whatever ``generation.temperature`` / ``generation.top_p`` say (those apply to the arithmetic
opponent's plain policies). The target of these samplers is the geometric mixture itself, the
distribution the DPO loss's reference is; tempering after mixing, softmax((α·ℓ_(t-1) + (1-α)·ℓ_base)/T)
with nucleus truncation, would sample another distribution (sharper for T < 1, with the tail cut),
and the losers would no longer come from the reference they are scored against (paper Appendix A).
So it is not offered as a knob; the generate stage's cache key and its ``provenance.json`` record
temperature 1 and top-p 1 for these members (`alphaspin.stages.generate.sampling_config`).

The pure functions here take tensors (tested on enumerable toy policies); `TokenGeometricSampler`
runs the per-token mixture on a PEFT model (adapter = π_(t-1), adapter disabled = π_base).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch

from alphaspin.generation import Completion, left_pad


def sir_log_weights(lp_prev: torch.Tensor, lp_base: torch.Tensor, alpha: float) -> torch.Tensor:
    """log w_i = (1-α)·(log π_base(y_i) − log π_(t-1)(y_i)): importance weights of proposals from
    π_(t-1) toward π_(t-1)^α·π_base^(1-α) (unnormalised). Shapes (..., k)."""
    return (1.0 - alpha) * (lp_base - lp_prev)


def sir_resample(
    lp_prev: torch.Tensor, lp_base: torch.Tensor, alpha: float, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One proposal per row drawn with probability w_i / Σ_j w_j, and the effective sample size
    (Σ w)² / Σ w² of the row (k when all weights are equal, 1 when one dominates).

    Shapes: (batch, k) → indices (batch,), ess (batch,).
    """
    return sir_resample_log_weights(sir_log_weights(lp_prev.double(), lp_base.double(), alpha), generator)


TRUNCATED_LOSERS = ("no_eos", "keep", "drop")


def sir_log_weights_at_cap(
    lp_prev: torch.Tensor,
    lp_base: torch.Tensor,
    cut: torch.Tensor,
    alpha: float,
    truncated_losers: str,
    end_prev: torch.Tensor | None = None,
    end_base: torch.Tensor | None = None,
) -> torch.Tensor:
    """Log importance weights of proposals drawn from π_(t-1) with a length cap L, toward the target
    that ``generation.truncated_losers`` trains (module docstring). Shapes (..., k).

    ``lp_prev``/``lp_base``: log-probs of each proposal *as generated*: a complete one is "answer, then
    end of turn", one cut off at the cap (``cut``) is its prefix p, with no end term (its proposal
    probability is π_(t-1)(p), the mass of every answer that starts with p). Then, by mode:

    - no_eos: (1-α)(lp_base − lp_prev) for every proposal; target G_L ∝ π_(t-1)^L(o)^α·π_base^L(o)^(1-α)
      over the outcomes o of capped generation (complete answers, and prefixes cut at L scored as
      prefixes), the very sequences DPO scores.
    - keep: a cut-off p is trained as the answer p⊤, so its target mass is π_(t-1)(p⊤)^α·π_base(p⊤)^(1-α):
      its weight adds α·``end_prev`` + (1-α)·``end_base`` (log π(⊤|x, p) under each policy) to the
      above; target K_L ∝ π_(t-1)^α·π_base^(1-α)(y⊤) over answers of at most L tokens.
    - drop: cut-off pairs are left out of training, so a cut-off proposal gets weight 0 in every row
      that has a complete one (its target D_L is the geometric mixture of answers that end within the
      cap); a row whose proposals were all cut keeps the no_eos weights (its loser is cut, and dropped).
    """
    log_w = sir_log_weights(lp_prev, lp_base, alpha)
    cut = cut.to(torch.bool)
    if truncated_losers == "no_eos":
        return log_w
    if truncated_losers == "keep":
        if end_prev is None or end_base is None:
            raise ValueError("sir with generation.truncated_losers: keep needs log π(⊤|x, p) of cut-off proposals")
        ended = log_w + alpha * end_prev + (1.0 - alpha) * end_base
        return torch.where(cut, ended, log_w)
    if truncated_losers == "drop":
        complete = (~cut).any(dim=-1, keepdim=True)
        return torch.where(cut & complete, torch.full_like(log_w, -math.inf), log_w)
    raise ValueError(f"generation.truncated_losers: expected one of {list(TRUNCATED_LOSERS)}, got {truncated_losers!r}")


def sir_resample_log_weights(
    log_w: torch.Tensor, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """`sir_resample` from given log weights (rows of -inf but one allowed). (batch, k) → (batch,), (batch,)."""
    probs = torch.softmax(log_w.double(), dim=-1)
    indices = torch.multinomial(probs.float(), 1, generator=generator).squeeze(-1)
    ess = 1.0 / (probs**2).sum(dim=-1)
    return indices, ess


def token_geometric_logprobs(logits_prev: torch.Tensor, logits_base: torch.Tensor, alpha: float) -> torch.Tensor:
    """log softmax(α·log p_(t-1) + (1-α)·log p_base): the normalised per-token geometric mixture.
    A weight of 0 drops its policy entirely (0·log 0 would be nan where that policy has no mass)."""
    mixed = 0.0
    if alpha > 0.0:
        mixed = mixed + alpha * torch.log_softmax(logits_prev.float(), dim=-1)
    if alpha < 1.0:
        mixed = mixed + (1.0 - alpha) * torch.log_softmax(logits_base.float(), dim=-1)
    return torch.log_softmax(mixed, dim=-1)


def sample_sequence(
    next_logprobs: Callable[[tuple[int, ...]], torch.Tensor],
    eos: int,
    max_tokens: int,
    generator: torch.Generator,
) -> tuple[tuple[int, ...], bool]:
    """Sample token by token from ``next_logprobs(prefix)`` until ``eos`` or ``max_tokens``; returns the
    tokens (eos included) and whether the sequence was cut off. The reference loop of the samplers,
    used on toy policies whose distributions can be enumerated."""
    prefix: tuple[int, ...] = ()
    for _ in range(max_tokens):
        token = int(torch.multinomial(next_logprobs(prefix).exp(), 1, generator=generator))
        prefix = (*prefix, token)
        if token == eos:
            return prefix, False
    return prefix, True


@dataclass
class ScoredSamples:
    """Log-probs of samples of π_(t-1) as generated (`score_samples`), one entry per row of ``ids``
    (rows whose prompt fills training.max_length are left out by TRL's tokenization)."""

    ids: list[str]
    lp_prev: torch.Tensor  # (n,) log π_(t-1) of the answer + end-of-turn marker, or of the cut-off prefix
    lp_base: torch.Tensor  # (n,) the same under π_base
    tokenized: Any  # the scored rows (datasets.Dataset: prompt_ids, rejected_ids)
    end_prev: torch.Tensor | None = None  # (n,) log π_(t-1)(⊤ | x, p) of cut-off rows (0 elsewhere), with_end
    end_base: torch.Tensor | None = None


def score_samples(
    model,
    tokenizer,
    args,
    samples: pd.DataFrame,
    batch_size: int,
    device: str,
    with_end: bool = False,
) -> ScoredSamples:
    """log π_(t-1) (``model`` with its adapter) and log π_base (adapter disabled) of samples of a
    policy, each scored as what generation produced: a complete answer as "the answer, then end of
    turn" (the chat template's ids up to its end-of-turn marker, `alphaspin.dpo.end_answers_at_marker`:
    not the newline the template writes after it), a sample cut off at the length cap (``truncated``)
    as its prefix, without end-of-turn (`alphaspin.dpo.end_rejected_prefixes`). Ids and windows are
    TRL's (training.max_length in ``args``), as training scores the pairs. ``samples``: id, prompt,
    text, truncated (optionally generated_ids: a cut-off sample is then scored on those ids). ``with_end``: also log π(⊤ | x, p) of each cut-off prefix p under both policies,
    ⊤ = the end-of-turn marker (what ``generation.truncated_losers: keep`` adds to a cut-off loser).
    Used by the sir opponent's weights and the Monte-Carlo log Z(x) samples."""
    from alphaspin.dpo import (
        completion_logps,
        end_answers_at_marker,
        end_of_turn_marker,
        pairs_to_dataset,
        tokenize_like_trl,
    )

    frame = pd.DataFrame(
        {
            "id": list(samples["id"]),
            "prompt": list(samples["prompt"]),
            "chosen": list(samples["text"]),
            "rejected": list(samples["text"]),
            "rejected_truncated": [bool(v) for v in samples["truncated"]],
        }
    )
    if "generated_ids" in samples.columns:  # a cut-off sample is scored on the ids it was generated as
        frame["rejected_generated_ids"] = [[int(i) for i in ids] for ids in samples["generated_ids"]]
    dataset = pairs_to_dataset(frame, losers_as_prefixes=True)
    tokenized = end_answers_at_marker(tokenize_like_trl(dataset, tokenizer, args), tokenizer, ("rejected",))
    pad = tokenizer.pad_token_id

    def score(rows) -> torch.Tensor:
        found = completion_logps(model, rows, pad, args.max_length, batch_size, device, ("rejected",))
        return torch.tensor(found.rejected_logps.to_numpy(), dtype=torch.float64)

    lp_prev = score(tokenized)
    with model.disable_adapter():
        lp_base = score(tokenized)
    scored = ScoredSamples(list(tokenized["id"]), lp_prev, lp_base, tokenized)
    if with_end:
        cut_of = dict(zip(frame.id, frame.rejected_truncated, strict=True))
        rows = [i for i, row_id in enumerate(scored.ids) if cut_of[row_id]]
        scored.end_prev, scored.end_base = torch.zeros_like(lp_prev), torch.zeros_like(lp_base)
        if rows:
            marker = end_of_turn_marker(tokenizer)
            ended = tokenized.select(rows).map(lambda row: {"rejected_ids": list(row["rejected_ids"]) + marker})
            index = torch.tensor(rows)
            scored.end_prev[index] = score(ended) - lp_prev[index]
            with model.disable_adapter():
                scored.end_base[index] = score(ended) - lp_base[index]
    return scored


class TokenGeometricSampler:
    """Per-token geometric mixture of a PEFT model with its adapter (π_(t-1)) and without (π_base),
    sampled as it is (temperature 1, no top-p: see the module docstring for why it is not tempered).

    Two forwards per token, each with its own KV cache; every row samples from its own seeded
    generator, so a row's text does not depend on its batch (resume by shard stays exact).
    """

    def __init__(self, model, tokenizer, alpha: float, max_new_tokens: int, device: str, batch_size: int = 8):
        self.model, self.tokenizer, self.alpha = model, tokenizer, alpha
        self.max_new_tokens, self.device, self.batch_size = max_new_tokens, device, batch_size
        eos = tokenizer.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [eos])

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], seeds: Sequence[int]) -> list[Completion]:
        """The completion (text, cut off, generated ids) of each prompt (token ids of the rendered chat prompt)."""
        out: list[Completion] = []
        for start in range(0, len(prompts), self.batch_size):
            batch = prompts[start : start + self.batch_size]
            out.extend(self._batch(batch, seeds[start : start + self.batch_size]))
        return out

    def _batch(self, prompts: Sequence[Sequence[int]], seeds: Sequence[int]) -> list[Completion]:
        pad = self.tokenizer.pad_token_id
        ids, mask = left_pad(prompts, pad, self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        generators = [torch.Generator().manual_seed(int(seed)) for seed in seeds]
        caches: list = [None, None]  # π_(t-1), π_base
        tokens: list[list[int]] = [[] for _ in prompts]
        done = [False] * len(prompts)
        step_ids, step_positions = ids, positions
        for _ in range(self.max_new_tokens):
            logits = []
            for which in (0, 1):
                context = self.model.disable_adapter() if which == 1 else contextlib.nullcontext()
                with context:
                    result = self.model(
                        input_ids=step_ids,
                        attention_mask=mask,
                        position_ids=step_positions,
                        past_key_values=caches[which],
                        use_cache=True,
                    )
                caches[which] = result.past_key_values
                logits.append(result.logits[:, -1])
            probs = token_geometric_logprobs(logits[0], logits[1], self.alpha).exp().cpu()
            chosen = []
            for row, generator in enumerate(generators):
                token = int(torch.multinomial(probs[row], 1, generator=generator))
                chosen.append(token if not done[row] else pad)
                if not done[row]:
                    tokens[row].append(token)
                    done[row] = token in self.eos
            if all(done):
                break
            step_ids = torch.tensor(chosen, device=self.device)[:, None]
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            step_positions = step_positions[:, -1:] + 1
        return [
            Completion(self.tokenizer.decode(row, skip_special_tokens=True).strip(), not finished, tuple(row))
            for row, finished in zip(tokens, done, strict=True)
        ]
