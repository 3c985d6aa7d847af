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
from collections.abc import Callable, Sequence

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
    log_w = sir_log_weights(lp_prev.double(), lp_base.double(), alpha)
    probs = torch.softmax(log_w, dim=-1)
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
