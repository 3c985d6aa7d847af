"""GFlowNet fine-tuning of a sampler of the geometric mixture π_(t-1)^α·π_base^(1-α) (paper Appendix A).

The geometric mixture does not factor over tokens, so it cannot be sampled token by token. As in
the paper (following Hu et al. 2023, "Amortizing intractable inference in large language models",
GFNOrg/gfn-lm-tuning), a LoRA sampler q_θ, initialised from θ_(t-1), is fine-tuned with the
*modified sub-trajectory balance* loss toward the unnormalised reward

    R(y⊤ | x) = π_(t-1)(y⊤ | x)^α · π_base(y⊤ | x)^(1-α),
    π(y_≤i ⊤ | x) = Π_{k=1..i} π(y_k | x, y_<k) · π(⊤ | x, y_≤i),

where ⊤ is the termination (EOS) action. The states of the prefix tree are s_i = (x, y_1..y_i);
every state can terminate (append ⊤), so every prefix y_≤i is a candidate answer with reward
R_i = R(y_≤i ⊤ | x).

Modified sub-trajectory balance ("terminate anywhere": the state flow is not learned but written
through the termination probability, log F(s_i) = log R_i − log q(⊤ | s_i)). For a sampled
trajectory with n tokens before ⊤ and every pair of its states 0 ≤ i < j ≤ n:

    δ_ij = log R_i + Σ_{k=i+1..j} log q(y_k | s_(k-1)) + log q(⊤ | s_j) − log R_j − log q(⊤ | s_i)

    L = Σ_b Σ_{0≤i<j≤n_b} λ^(j-i-1) · δ_ij²  /  Σ_b Σ_{0≤i<j≤n_b} λ^(j-i-1)

(exactly gfn-lm-tuning's ``modified_subtb_loss``: its sub-trajectories of length l = j − i weigh
λ^(l-1), normalised by the total weight over the batch; the weights λ^(j-i) of the issue differ by
the factor λ, which the normalisation cancels). With the one-step terms
Δ_k = log R_k + log q(y_(k+1) | s_k) + log q(⊤ | s_(k+1)) − log R_(k+1) − log q(⊤ | s_k),
δ_ij = Σ_{k=i..j-1} Δ_k, so all pairs come from one cumulative sum.

Why it is the target: L = 0 on every trajectory means log R_j − log q(⊤|s_j) − Σ_{k≤j} log q(y_k|s_(k-1))
is the same number, log Z(x), at every state of every trajectory, i.e. the sampler's probability
of answering y = y_≤j is P_q(y⊤) = Π_{k≤j} q(y_k|s_(k-1)) · q(⊤|s_j) = R(y⊤|x) / Z(x): the normalised
geometric mixture (at the forced s_L: P_q(cut at y_≤L) = R_L / Z(x), with R_L as below). Those
per-state estimates of log Z(x) are what ``log_z_estimates`` returns; their spread within a prompt
measures how far the sampler is from balance.

Length: answers have at most L = max_new_tokens tokens. At s_L the sampler must stop, so its
q(⊤ | s_L) := 1 (log 0) in the loss — the sampler as it is actually run (generation cuts off at L
tokens, and s_L is then a cut-off answer). (gfn-lm-tuning keeps the model's unforced log q(⊤ | s_L)
there.) What the reward of s_L is decides the target, and it follows ``generation.truncated_losers``,
i.e. how DPO scores a cut-off loser (`cap_log_rewards`), so that the sampler, sir and the reference
target one distribution:

- no_eos (a cut-off loser is scored as its prefix): R_L = π_(t-1)(y_≤L | x)^α · π_base(y_≤L | x)^(1-α),
  the prefix's probabilities without any end term. The target is G_L, the geometric mixture of the
  two policies *as generated with the cap*: complete answers with π(y⊤), cut-off prefixes with π(p)
  (the mass of all the answers that start with p).
- keep (a cut-off loser is scored as if it had ended, p⊤): R_L = R(y_≤L ⊤ | x) with the policies' own
  π(⊤ | s_L). The target is K_L, the geometric mixture of answers y⊤ of at most L tokens: a cut-off
  prefix weighs π_(t-1)(⊤ | s_L)^α·π_base(⊤ | s_L)^(1-α) times its no_eos weight (e^−16 or so where the
  policies write on: cut-off losers become rare).
- drop (cut-off pairs left out): the keep reward; the losers that build_pairs keeps (complete ones)
  then follow K_L restricted to complete answers, which is D_L, the mixture of answers that end within
  the cap, and few are lost.

Training is on-policy with tempered exploration, as in gfn-lm-tuning: trajectories are sampled
from softmax(logits_q / τ) (τ = ``exploration_temperature``), then scored under q (with gradients),
π_(t-1) and π_base (without). Sub-trajectory balance holds for any training distribution with
full support, so τ ≠ 1 only changes which trajectories the loss sees, not its minimiser.

The pure pieces take tensors and are tested on an enumerable toy (`tests/test_gflownet.py`);
``train_sampler`` is the loop over any `GFlowNetProblem`; `PeftGFlowNet` is the problem on a PEFT
model with two adapters: "sampler" (q_θ, trainable) and "prev" (θ_(t-1), frozen); π_base is the
model with adapters disabled.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from alphaspin.generation import left_pad


# -- the pure loss -----------------------------------------------------------------------------------
def _pair_mask(lengths: torch.Tensor, width: int) -> torch.Tensor:
    """(B, width+1, width+1): True where 0 ≤ i < j ≤ n_b (the sub-trajectories of each row)."""
    idx = torch.arange(width + 1, device=lengths.device)
    i, j = idx[:, None], idx[None, :]
    return (i < j)[None] & (j[None] <= lengths[:, None, None])


def _pair_weights(width: int, subtb_lambda: float, device, dtype) -> torch.Tensor:
    idx = torch.arange(width + 1, device=device)
    span = (idx[None, :] - idx[:, None]).clamp(min=1) - 1  # j − i − 1 (clamped below the diagonal)
    return torch.as_tensor(subtb_lambda, dtype=dtype, device=device) ** span.to(dtype)


def subtb_total_weight(lengths: torch.Tensor, width: int, subtb_lambda: float = 1.0) -> torch.Tensor:
    """Σ_b Σ_{0≤i<j≤n_b} λ^(j-i-1): the normaliser of the loss (depends on the lengths only)."""
    weights = _pair_weights(width, subtb_lambda, lengths.device, torch.float64)
    return (weights[None] * _pair_mask(lengths, width)).sum()


def subtb_sum(
    log_pf: torch.Tensor,
    log_pterm: torch.Tensor,
    log_r: torch.Tensor,
    lengths: torch.Tensor,
    subtb_lambda: float = 1.0,
) -> torch.Tensor:
    """Σ_b Σ_{0≤i<j≤n_b} λ^(j-i-1) δ_ij² (the loss before normalisation; sums over micro-batches).

    Shapes: ``log_pf`` (B, N) = log q(y_(k+1) | s_k) for k < N (anything past n_b is ignored);
    ``log_pterm`` (B, N+1) = log q(⊤ | s_i); ``log_r`` (B, N+1) = log R(y_≤i ⊤); ``lengths`` (B,) = n_b ≤ N.
    """
    batch, width = log_pf.shape
    if log_pterm.shape != (batch, width + 1) or log_r.shape != (batch, width + 1) or lengths.shape != (batch,):
        raise ValueError(
            f"subtb: shapes log_pf {tuple(log_pf.shape)}, log_pterm {tuple(log_pterm.shape)}, "
            f"log_r {tuple(log_r.shape)}, lengths {tuple(lengths.shape)}; expected (B, N), (B, N+1), (B, N+1), (B,)"
        )
    if width == 0:
        return log_pf.sum() * 0.0 + log_pterm.sum() * 0.0
    mask = _pair_mask(lengths, width)
    # Entries past a row's end are zeroed so that no inf/nan leaks into the cumulative sum.
    step_valid = torch.arange(width, device=lengths.device)[None] < lengths[:, None]
    state_valid = torch.arange(width + 1, device=lengths.device)[None] <= lengths[:, None]
    log_pf = torch.where(step_valid, log_pf, torch.zeros_like(log_pf))
    log_pterm = torch.where(state_valid, log_pterm, torch.zeros_like(log_pterm))
    log_r = torch.where(state_valid, log_r.to(log_pterm.dtype), torch.zeros_like(log_pterm))
    delta = log_r[:, :-1] + log_pf + log_pterm[:, 1:] - log_r[:, 1:] - log_pterm[:, :-1]  # Δ_k, (B, N)
    cumulative = torch.cat([torch.zeros_like(delta[:, :1]), delta.cumsum(dim=1)], dim=1)  # C_i = Σ_{k<i} Δ_k
    pairs = cumulative[:, None, :] - cumulative[:, :, None]  # [b, i, j] = C_j − C_i = δ_ij
    weights = _pair_weights(width, subtb_lambda, log_pf.device, pairs.dtype)
    squared = torch.where(mask, pairs**2, torch.zeros_like(pairs))
    return (weights[None] * squared).sum()


def subtb_loss(
    log_pf: torch.Tensor,
    log_pterm: torch.Tensor,
    log_r: torch.Tensor,
    lengths: torch.Tensor,
    subtb_lambda: float = 1.0,
) -> torch.Tensor:
    """The modified sub-trajectory balance loss L of the module docstring (0 when no row has a
    sub-trajectory, i.e. every row terminated at once)."""
    total = subtb_total_weight(lengths, log_pf.shape[1], subtb_lambda)
    summed = subtb_sum(log_pf, log_pterm, log_r, lengths, subtb_lambda)
    return summed / total.clamp(min=1e-30).to(summed.dtype) if float(total) > 0 else summed * 0.0


def log_z_estimates(
    log_pf: torch.Tensor, log_pterm: torch.Tensor, log_r: torch.Tensor, lengths: torch.Tensor
) -> torch.Tensor:
    """(B, N+1): log R_i − log q(⊤|s_i) − Σ_{k<i} log q(y_(k+1)|s_k), the estimate of log Z(x) at
    every state (= log F(s_i) − log P_q(s_0 → s_i)); nan past a row's end. All equal at balance."""
    width = log_pf.shape[1]
    step_valid = torch.arange(width, device=lengths.device)[None] < lengths[:, None]
    state_valid = torch.arange(width + 1, device=lengths.device)[None] <= lengths[:, None]
    pf = torch.where(step_valid, log_pf, torch.zeros_like(log_pf))
    prefix = torch.cat([pf.new_zeros(pf.shape[0], 1), pf.cumsum(dim=1)], dim=1)  # N = 0 too
    estimates = log_r.to(prefix.dtype) - log_pterm - prefix
    return torch.where(state_valid, estimates, torch.full_like(estimates, math.nan))


def log_z_spread(estimates: torch.Tensor, groups: Sequence[Any]) -> tuple[float, float]:
    """(mean over groups of the standard deviation of the log Z estimates of the group's states,
    mean estimate): ``groups`` names the prompt of each row; 0 spread = balance on those samples."""
    spreads, means = [], []
    for group in dict.fromkeys(groups):
        rows = [i for i, g in enumerate(groups) if g == group]
        values = estimates[rows].flatten()
        values = values[~torch.isnan(values)]
        if values.numel():
            means.append(float(values.mean()))
            spreads.append(float(values.std(unbiased=False)) if values.numel() > 1 else 0.0)
    if not spreads:
        return math.nan, math.nan
    return sum(spreads) / len(spreads), sum(means) / len(means)


# -- log-probabilities of a trajectory --------------------------------------------------------------
def step_logprobs(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    lengths: torch.Tensor,
    eos_ids: Sequence[int],
    forced_at: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """From the logits at the states s_0..s_N (B, N+1, V) and the tokens y_1..y_N (B, N):
    log π(y_(k+1) | s_k) (B, N) and log π(⊤ | s_i) (B, N+1), ⊤ being any of ``eos_ids``
    (logsumexp of their log-probs). ``forced_at`` = L: a row with n_b = L terminates for sure
    there (the sampler cut off at max_new_tokens), so its log π(⊤ | s_L) is 0."""
    logp = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    gathered = logp[:, :-1].gather(-1, tokens.clamp(min=0)[..., None]).squeeze(-1)
    term = torch.logsumexp(logp[..., list(eos_ids)], dim=-1)
    if forced_at is not None:
        width = term.shape[1]
        forced = (lengths == forced_at)[:, None] & (torch.arange(width, device=term.device)[None] == forced_at)
        term = torch.where(forced, torch.zeros_like(term), term)
    return gathered, term


def prefix_log_rewards(
    token_prev: torch.Tensor,
    term_prev: torch.Tensor,
    token_base: torch.Tensor,
    term_base: torch.Tensor,
    alpha: float,
) -> torch.Tensor:
    """log R_i = α·log π_(t-1)(y_≤i ⊤) + (1-α)·log π_base(y_≤i ⊤), (B, N+1), from per-token log-probs
    (B, N) and termination log-probs (B, N+1) of each policy. A weight of 0 drops its policy."""

    def sequence(token: torch.Tensor, term: torch.Tensor) -> torch.Tensor:
        prefix = torch.cat([token.new_zeros(token.shape[0], 1), token.cumsum(dim=1)], dim=1)  # N = 0 too
        return prefix + term

    out = 0.0
    if alpha > 0.0:
        out = out + alpha * sequence(token_prev, term_prev)
    if alpha < 1.0:
        out = out + (1.0 - alpha) * sequence(token_base, term_base)
    return out


def cap_log_rewards(
    token_prev: torch.Tensor,
    term_prev: torch.Tensor,
    token_base: torch.Tensor,
    term_base: torch.Tensor,
    lengths: torch.Tensor,
    max_len: int,
    alpha: float,
    truncated_losers: str,
) -> torch.Tensor:
    """log R_i of every state (`prefix_log_rewards`), with the reward of a cut-off answer (a row with
    n_b = ``max_len``, at s_L) as ``generation.truncated_losers`` scores it (module docstring): under
    no_eos the prefix's, without the policies' end term; under keep and drop the answer y_≤L ⊤'s."""
    if truncated_losers not in ("no_eos", "keep", "drop"):
        raise ValueError(f"generation.truncated_losers: expected no_eos, keep or drop, got {truncated_losers!r}")
    if truncated_losers == "no_eos":
        width = term_prev.shape[1]
        cut = (lengths == max_len)[:, None] & (torch.arange(width, device=term_prev.device)[None] == max_len)
        term_prev = torch.where(cut, torch.zeros_like(term_prev), term_prev)
        term_base = torch.where(cut, torch.zeros_like(term_base), term_base)
    return prefix_log_rewards(token_prev, term_prev, token_base, term_base, alpha)


# -- the training loop ------------------------------------------------------------------------------
@dataclass
class Trajectories:
    tokens: torch.Tensor  # (B, N) token ids, padded past each row's length
    lengths: torch.Tensor  # (B,) tokens before ⊤ (a row of length max_len was cut off there)


class GFlowNetProblem(Protocol):
    """What `train_sampler` needs: a trainable sampler q, its reward, and a way to sample from it.
    ``prompts`` has one entry per trajectory."""

    def parameters(self) -> list[torch.nn.Parameter]: ...

    def sample(self, prompts: Sequence[Any], temperature: float, generator: torch.Generator) -> Trajectories: ...

    def sampler_logprobs(self, prompts: Sequence[Any], paths: Trajectories) -> tuple[torch.Tensor, torch.Tensor]:
        """(log q(y_(k+1)|s_k) (B, N), log q(⊤|s_i) (B, N+1)) with gradients, forced ⊤ at max_len."""
        ...

    def log_rewards(self, prompts: Sequence[Any], paths: Trajectories) -> torch.Tensor:
        """log R_i (B, N+1), without gradients: of y_≤i ⊤, and at a cut-off row's s_L as `cap_log_rewards`."""
        ...


@dataclass(frozen=True)
class GFlowNetSettings:
    epochs: int = 10
    learning_rate: float = 1e-4
    subtb_lambda: float = 1.0
    samples_per_prompt: int = 4
    prompts_per_step: int = 4
    exploration_temperature: float = 1.0
    max_grad_norm: float | None = 1.0
    micro_batch_size: int = 16  # trajectories per forward with gradients


def train_sampler(
    problem: GFlowNetProblem,
    prompts: Sequence[Any],
    settings: GFlowNetSettings,
    seed: int = 0,
    on_step: Callable[[dict[str, Any]], None] | None = None,
    resume: dict[str, Any] | None = None,
    save_steps: int | None = None,
    on_checkpoint: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Fine-tune the problem's sampler with the modified SubTB loss, on-policy with tempered
    exploration: every step takes ``prompts_per_step`` prompts (shuffled each epoch), samples
    ``samples_per_prompt`` trajectories of each, and takes one AdamW step on the loss of the batch
    (accumulated over micro-batches, normalised by the batch's total weight). Returns one record
    per step: epoch, step, loss, log_z_spread, log_z_mean, mean_length.

    Checkpoints: every ``save_steps`` steps (not after the last) ``on_checkpoint`` gets the whole
    training state (`checkpoint_state`: the sampler's trainable tensors, AdamW's state, the sampling
    generator's state, the epoch's prompt order and position, the history). Passed back as
    ``resume``, training continues from that step and ends exactly as an uninterrupted one (the same
    random draws, the same updates)."""
    generator = torch.Generator().manual_seed(int(seed))
    params = [p for p in problem.parameters() if p.requires_grad]
    if not params:
        raise ValueError("gflownet: the sampler has no trainable parameters")
    optimizer = torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=0.0)
    history: list[dict[str, Any]] = []
    step, epoch, position, order = 0, 0, 0, None
    if resume is not None:
        step, epoch, position, order, history = restore_state(resume, params, optimizer, generator)
    total_steps = settings.epochs * -(-len(prompts) // settings.prompts_per_step)
    while epoch < settings.epochs:
        if order is None:
            order = torch.randperm(len(prompts), generator=generator).tolist()
        while position < len(order):
            start = position
            chosen = order[start : start + settings.prompts_per_step]
            rows = [i for i in chosen for _ in range(settings.samples_per_prompt)]
            batch = [prompts[i] for i in rows]
            with torch.no_grad():
                paths = problem.sample(batch, settings.exploration_temperature, generator)
                log_r = problem.log_rewards(batch, paths)
            width = paths.tokens.shape[1]
            total = subtb_total_weight(paths.lengths, width, settings.subtb_lambda)
            optimizer.zero_grad(set_to_none=True)
            loss_value, estimates = 0.0, []
            for lo in range(0, len(batch), settings.micro_batch_size):
                part = slice(lo, lo + settings.micro_batch_size)
                sub = Trajectories(paths.tokens[part], paths.lengths[part])
                log_pf, log_pterm = problem.sampler_logprobs(batch[part], sub)
                part_r, part_lengths = log_r[part].to(log_pf.device), sub.lengths.to(log_pf.device)
                summed = subtb_sum(log_pf, log_pterm, part_r, part_lengths, settings.subtb_lambda)
                if float(total) > 0:
                    part_loss = summed / float(total)
                    part_loss.backward()
                    loss_value += float(part_loss.detach())
                estimates.append(log_z_estimates(log_pf.detach(), log_pterm.detach(), part_r, part_lengths).cpu())
            if float(total) > 0:
                if settings.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
                optimizer.step()
            spread, mean = log_z_spread(torch.cat(estimates), rows)
            record = {
                "epoch": epoch,
                "step": step,
                "loss": loss_value,
                "log_z_spread": spread,
                "log_z_mean": mean,
                "mean_length": float(paths.lengths.float().mean()),
            }
            history.append(record)
            if on_step is not None:
                on_step(record)
            step += 1
            position = start + settings.prompts_per_step
            if save_steps and on_checkpoint is not None and step % save_steps == 0 and step < total_steps:
                on_checkpoint(checkpoint_state(step, epoch, position, order, history, params, optimizer, generator))
        epoch, position, order = epoch + 1, 0, None
    return history


def checkpoint_state(
    step: int,
    epoch: int,
    position: int,
    order: list[int],
    history: list[dict[str, Any]],
    params: list[torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
) -> dict[str, Any]:
    """Everything `train_sampler` needs to go on after ``step`` steps (for ``torch.save``)."""
    return {
        "step": step,
        "epoch": epoch,
        "position": position,
        "order": list(order),
        "history": [dict(h) for h in history],
        "params": [p.detach().cpu().clone() for p in params],
        "optimizer": copy.deepcopy(optimizer.state_dict()),
        "generator": generator.get_state(),
    }


def restore_state(
    state: dict[str, Any], params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer, generator
) -> tuple[int, int, int, list[int], list[dict[str, Any]]]:
    """Load a `checkpoint_state` into the sampler, AdamW and the generator; (step, epoch, position,
    order, history) to go on from."""
    saved = state["params"]
    if len(saved) != len(params) or any(s.shape != p.shape for s, p in zip(saved, params, strict=True)):
        raise ValueError("gflownet: the checkpoint's sampler does not match this sampler (shapes differ)")
    with torch.no_grad():
        for param, value in zip(params, saved, strict=True):
            param.copy_(value.to(param.device, param.dtype))
    optimizer.load_state_dict(state["optimizer"])
    generator.set_state(state["generator"])
    return state["step"], state["epoch"], state["position"], list(state["order"]), list(state["history"])


def summarise(history: list[dict[str, Any]]) -> dict[str, Any]:
    """Metrics of a training: the last epoch's mean loss and log Z spread, the first step's loss."""
    if not history:
        return {}
    last = max(h["epoch"] for h in history)
    final = [h for h in history if h["epoch"] == last]

    def mean(key: str) -> float:
        values = [h[key] for h in final if not math.isnan(h[key])]
        return sum(values) / len(values) if values else math.nan

    return {
        "gflownet/final_loss": mean("loss"),
        "gflownet/first_loss": history[0]["loss"],
        "gflownet/log_z_spread": mean("log_z_spread"),
        "gflownet/log_z_mean": mean("log_z_mean"),
        "gflownet/mean_length": mean("mean_length"),
        "gflownet/steps": len(history),
    }


# -- the problem on a PEFT model ----------------------------------------------------------------------
SAMPLER, PREV = "sampler", "prev"


def add_sampler_adapter(model, rank: int | None = None) -> None:
    """Add a trainable LoRA adapter ``sampler`` to a PeftModel whose adapter ``prev`` is θ_(t-1),
    computing exactly θ_(t-1)'s ΔW = s·B·A at the start: its first r_prev ranks are θ_(t-1)'s (B
    scaled by θ_(t-1)'s s = lora_alpha / r, the sampler's own scaling being 1), the rest of B zero.
    ``rank`` defaults to θ_(t-1)'s and may only be larger. No dropout: q is trained on-policy, so
    the q that is trained must be the q that samples."""
    from peft import LoraConfig

    prev = model.peft_config[PREV]
    if getattr(prev, "use_dora", False) or getattr(prev, "use_rslora", False):
        raise ValueError("gflownet: θ_(t-1) uses DoRA/rsLoRA; the sampler copies plain LoRA adapters only")
    rank = rank or prev.r
    if rank < prev.r:
        raise ValueError(f"method.gflownet.lora_r: {rank} < θ_(t-1)'s rank {prev.r}; the sampler starts as θ_(t-1)")
    modules = sorted(prev.target_modules) if isinstance(prev.target_modules, set) else prev.target_modules
    config = LoraConfig(
        r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=modules, task_type="CAUSAL_LM", bias="none"
    )
    model.add_adapter(SAMPLER, config)
    with torch.no_grad():
        for module in model.modules():
            lora_a = getattr(module, "lora_A", None)
            if not isinstance(lora_a, torch.nn.ModuleDict) or PREV not in lora_a or SAMPLER not in lora_a:
                continue
            a_prev, b_prev = module.lora_A[PREV].weight, module.lora_B[PREV].weight
            a_new, b_new = module.lora_A[SAMPLER].weight, module.lora_B[SAMPLER].weight
            r_prev = a_prev.shape[0]
            a_new[:r_prev].copy_(a_prev)
            b_new.zero_()
            b_new[:, :r_prev].copy_(b_prev * module.scaling[PREV])
    use_adapter(model, SAMPLER)


def use_adapter(model, name: str) -> None:
    """Activate adapter ``name``; only ``sampler`` is ever trainable (PEFT's set_adapter would
    otherwise make the active adapter trainable)."""
    model.set_adapter(name)
    for param_name, param in model.named_parameters():
        param.requires_grad_(f".{SAMPLER}." in param_name)


class PeftGFlowNet:
    """`GFlowNetProblem` on a PeftModel with adapters ``sampler`` (q_θ) and ``prev`` (θ_(t-1));
    π_base is the model with adapters disabled. Prompts are token-id lists (rendered chat prompts)."""

    def __init__(
        self,
        model,
        eos_ids: Sequence[int],
        pad_id: int,
        alpha: float,
        max_len: int,
        device: str,
        truncated_losers: str = "no_eos",
    ):
        self.model, self.eos_ids, self.pad_id = model, sorted(set(eos_ids)), pad_id
        self.alpha, self.max_len, self.device = alpha, max_len, device
        self.truncated_losers = truncated_losers  # the reward of a cut-off answer (`cap_log_rewards`)

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for n, p in self.model.named_parameters() if f".{SAMPLER}." in n]

    @torch.no_grad()
    def sample(self, prompts: Sequence[Sequence[int]], temperature: float, generator: torch.Generator) -> Trajectories:
        use_adapter(self.model, SAMPLER)
        was_training = self.model.training
        self.model.eval()
        ids, mask = left_pad(prompts, self.pad_id, self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        lengths = torch.full((len(prompts),), self.max_len, dtype=torch.long)
        done = torch.zeros(len(prompts), dtype=torch.bool)
        tokens: list[torch.Tensor] = []
        cache, step_ids, step_positions = None, ids, positions
        eos = torch.tensor(self.eos_ids)
        for step in range(self.max_len):
            out = self.model(
                input_ids=step_ids,
                attention_mask=mask,
                position_ids=step_positions,
                past_key_values=cache,
                use_cache=True,
            )
            cache = out.past_key_values
            probs = torch.softmax(out.logits[:, -1].float().cpu() / temperature, dim=-1)
            chosen = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
            ends = ~done & torch.isin(chosen, eos)
            lengths[ends] = step
            done |= ends
            chosen = torch.where(done, torch.full_like(chosen, self.pad_id), chosen)
            tokens.append(chosen)
            if bool(done.all()):
                break
            step_ids = chosen.to(self.device)[:, None]
            mask = torch.cat([mask, (~done).long().to(self.device)[:, None]], dim=1)
            step_positions = step_positions[:, -1:] + 1
        self.model.train(was_training)
        width = int(lengths.max())
        stacked = torch.stack(tokens, dim=1)[:, :width] if tokens else torch.zeros(len(prompts), 0, dtype=torch.long)
        return Trajectories(stacked.contiguous(), lengths)

    def _state_logits(self, prompts: Sequence[Sequence[int]], paths: Trajectories) -> torch.Tensor:
        """Logits at s_0..s_N (B, N+1, V): one forward of prompt + tokens."""
        ids, mask = left_pad(prompts, self.pad_id, self.device)
        width = ids.shape[1]
        tokens = paths.tokens.to(self.device)
        valid = (torch.arange(tokens.shape[1])[None] < paths.lengths[:, None]).long().to(self.device)
        full_ids = torch.cat([ids, tokens], dim=1)
        full_mask = torch.cat([mask, valid], dim=1)
        positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
        logits = self.model(input_ids=full_ids, attention_mask=full_mask, position_ids=positions).logits
        return logits[:, width - 1 :]

    def sampler_logprobs(
        self, prompts: Sequence[Sequence[int]], paths: Trajectories
    ) -> tuple[torch.Tensor, torch.Tensor]:
        use_adapter(self.model, SAMPLER)
        logits = self._state_logits(prompts, paths)
        lengths = paths.lengths.to(self.device)
        return step_logprobs(logits, paths.tokens.to(self.device), lengths, self.eos_ids, forced_at=self.max_len)

    @torch.no_grad()
    def log_rewards(self, prompts: Sequence[Sequence[int]], paths: Trajectories) -> torch.Tensor:
        was_training = self.model.training
        self.model.eval()
        tokens, lengths = paths.tokens.to(self.device), paths.lengths.to(self.device)
        found = {}
        for which in ("prev", "base"):
            if (which == "prev" and self.alpha == 0.0) or (which == "base" and self.alpha == 1.0):
                found[which] = (None, None)
                continue
            if which == "prev":
                use_adapter(self.model, PREV)
                context = contextlib.nullcontext()
            else:
                context = self.model.disable_adapter()
            with context:
                logits = self._state_logits(prompts, paths)
            found[which] = step_logprobs(logits, tokens, lengths, self.eos_ids)
        use_adapter(self.model, SAMPLER)
        self.model.train(was_training)
        (tp, ep), (tb, eb) = found["prev"], found["base"]
        tp = tp if tp is not None else torch.zeros_like(tb)
        ep = ep if ep is not None else torch.zeros_like(eb)
        tb = tb if tb is not None else torch.zeros_like(tp)
        eb = eb if eb is not None else torch.zeros_like(ep)
        return cap_log_rewards(tp, ep, tb, eb, lengths, self.max_len, self.alpha, self.truncated_losers).cpu()
