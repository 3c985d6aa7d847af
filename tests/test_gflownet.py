"""The GFlowNet sampler of the geometric mixture (`alphaspin.gflownet`, paper Appendix A).

On a toy whose answers can be enumerated (vocabulary {A, B, EOS}, at most three tokens, two
prompts), π_(t-1) and π_base are two fixed "embedding + linear" policies and the sampler a third,
trainable one, initialised as π_(t-1): the modified sub-trajectory balance loss is checked by hand,
vanishes exactly at the target's own conditionals, and training with the library's loop brings the
sampler's exact distribution close to the normalised geometric mixture. Plus: the sampler adapter
starts as θ_(t-1) on a real (tiny) model, the DAG has ``train_sampler`` only for gflownet runs, and
a tiny end-to-end run.
"""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
from conftest import NO_BENCHMARKS

from alphaspin.gflownet import (
    GFlowNetSettings,
    Trajectories,
    log_z_estimates,
    prefix_log_rewards,
    step_logprobs,
    subtb_loss,
    train_sampler,
)

A, B, EOS, L = 0, 1, 2, 3
PROMPTS = (0, 1)
PREFIXES = [p for n in range(L + 1) for p in itertools.product((A, B), repeat=n)]  # 15 states per prompt
ANSWERS = PREFIXES  # every state can terminate: an answer is a prefix followed by EOS
INDEX = {(x, p): i for i, (x, p) in enumerate(itertools.product(PROMPTS, PREFIXES))}


def total_variation(p: dict, q: dict) -> float:
    return 0.5 * sum(abs(p.get(k, 0.0) - q.get(k, 0.0)) for k in set(p) | set(q))


class ToyPolicy(torch.nn.Module):
    """An embedding of the state (prompt, prefix) and a linear head over {A, B, EOS}; a state with
    L tokens can only terminate."""

    def __init__(self, seed: int, scale: float = 1.5):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.embed = torch.nn.Embedding(len(INDEX), 8, dtype=torch.float64)
        self.head = torch.nn.Linear(8, 3, dtype=torch.float64)
        with torch.no_grad():
            self.embed.weight.copy_(torch.randn(len(INDEX), 8, generator=generator, dtype=torch.float64))
            self.head.weight.copy_(scale * torch.randn(3, 8, generator=generator, dtype=torch.float64) / math.sqrt(8))
            self.head.bias.copy_(torch.tensor([0.0, 0.0, -0.5], dtype=torch.float64))

    def logits(self, prompt: int, prefix: tuple[int, ...]) -> torch.Tensor:
        if len(prefix) == L:
            return torch.tensor([-math.inf, -math.inf, 0.0], dtype=torch.float64)
        return self.head(self.embed(torch.tensor(INDEX[(prompt, prefix)])))

    def logprobs(self, prompt: int, prefix: tuple[int, ...]) -> torch.Tensor:
        return torch.log_softmax(self.logits(prompt, prefix), dim=-1)


def sequence_logprob(policy, prompt: int, answer: tuple[int, ...]) -> float:
    """log π(answer ⊤ | prompt), exactly."""
    with torch.no_grad():
        logp = sum(float(policy.logprobs(prompt, answer[:k])[token]) for k, token in enumerate(answer))
        return logp + float(policy.logprobs(prompt, answer)[EOS])


def distribution(policy, prompt: int) -> dict[tuple, float]:
    return {y: math.exp(sequence_logprob(policy, prompt, y)) for y in ANSWERS}


def geometric_target(prev, base, prompt: int, alpha: float) -> dict[tuple, float]:
    weights = {
        y: math.exp(alpha * sequence_logprob(prev, prompt, y) + (1 - alpha) * sequence_logprob(base, prompt, y))
        for y in ANSWERS
    }
    total = sum(weights.values())
    return {y: w / total for y, w in weights.items()}


def pad(rows: list[tuple[int, ...]]) -> Trajectories:
    width = max(len(r) for r in rows)
    tokens = torch.tensor([list(r) + [EOS] * (width - len(r)) for r in rows], dtype=torch.long).view(len(rows), width)
    return Trajectories(tokens, torch.tensor([len(r) for r in rows]))


class ToyProblem:
    """`alphaspin.gflownet.GFlowNetProblem` on the toy policies."""

    def __init__(self, sampler: ToyPolicy, prev: ToyPolicy, base: ToyPolicy, alpha: float):
        self.sampler, self.prev, self.base, self.alpha = sampler, prev, base, alpha

    def parameters(self):
        return list(self.sampler.parameters())

    def sample(self, prompts, temperature, generator):
        rows = []
        for prompt in prompts:
            prefix: tuple[int, ...] = ()
            while len(prefix) < L:
                with torch.no_grad():
                    probs = torch.softmax(self.sampler.logits(prompt, prefix) / temperature, dim=-1)
                token = int(torch.multinomial(probs, 1, generator=generator))
                if token == EOS:
                    break
                prefix = (*prefix, token)
            rows.append(prefix)
        return pad(rows)

    def _state_logits(self, policy, prompts, paths):
        width = paths.tokens.shape[1]
        out, past = [], torch.zeros(3, dtype=torch.float64)  # past a row's end: any finite logits
        for prompt, tokens, n in zip(prompts, paths.tokens.tolist(), paths.lengths.tolist(), strict=True):
            out.append(
                torch.stack([policy.logits(prompt, tuple(tokens[:i])) if i <= n else past for i in range(width + 1)])
            )
        return torch.stack(out)

    def sampler_logprobs(self, prompts, paths):
        logits = self._state_logits(self.sampler, prompts, paths)
        return step_logprobs(logits, paths.tokens, paths.lengths, [EOS], forced_at=L)

    def log_rewards(self, prompts, paths):
        prev = step_logprobs(self._state_logits(self.prev, prompts, paths), paths.tokens, paths.lengths, [EOS])
        base = step_logprobs(self._state_logits(self.base, prompts, paths), paths.tokens, paths.lengths, [EOS])
        return prefix_log_rewards(*prev, *base, self.alpha)


# -- the loss by hand -----------------------------------------------------------------------------------
def test_subtb_loss_on_a_two_step_trajectory_by_hand():
    # States s_0, s_1, s_2 (two tokens, then ⊤):
    #   log R = (-3, -2, -4), log q(y_1|s_0) = -0.5, log q(y_2|s_1) = -1, log q(⊤|s_i) = (-2, -1, -0.5).
    #   δ_01 = -3 - 0.5 - 1 + 2 + 2          = -0.5
    #   δ_12 = -2 - 1 - 0.5 + 4 + 1          =  1.5
    #   δ_02 = -3 - 0.5 - 1 - 0.5 + 4 + 2    =  1.0   (= δ_01 + δ_12)
    # λ = 0.5: weights λ^(j-i-1) = 1, 1, 0.5 → (0.25 + 2.25 + 0.5·1) / (1 + 1 + 0.5) = 3 / 2.5 = 1.2
    # λ = 1:   (0.25 + 2.25 + 1) / 3 = 7/6
    # A second row that terminates at once (n = 0) has no sub-trajectory: it changes nothing, and
    # whatever lies past a row's end (here -inf and nan) is ignored.
    log_pf = torch.tensor([[-0.5, -1.0], [math.nan, -math.inf]], dtype=torch.float64)
    log_pterm = torch.tensor([[-2.0, -1.0, -0.5], [-0.1, -math.inf, math.nan]], dtype=torch.float64)
    log_r = torch.tensor([[-3.0, -2.0, -4.0], [-1.0, math.nan, -math.inf]], dtype=torch.float64)
    lengths = torch.tensor([2, 0])
    assert float(subtb_loss(log_pf, log_pterm, log_r, lengths, 0.5)) == pytest.approx(1.2)
    assert float(subtb_loss(log_pf, log_pterm, log_r, lengths, 1.0)) == pytest.approx(7 / 6)
    assert float(subtb_loss(log_pf[1:], log_pterm[1:], log_r[1:], lengths[1:])) == 0.0
    # the log Z estimates e_i = log R_i − log q(⊤|s_i) − Σ_{k<i} log q(y_(k+1)|s_k):
    #   e_0 = -3 + 2 = -1, e_1 = -2 + 1 + 0.5 = -0.5, e_2 = -4 + 0.5 + 1.5 = -2; and δ_ij = e_i − e_j
    estimates = log_z_estimates(log_pf, log_pterm, log_r, lengths)
    assert estimates[0].tolist() == pytest.approx([-1.0, -0.5, -2.0])
    assert math.isnan(float(estimates[1, 1]))


def test_step_logprobs_and_rewards_by_hand():
    logits = torch.tensor([[[0.0, 0.0, 0.0], [math.log(2), 0.0, 0.0], [0.0, 0.0, 0.0]]], dtype=torch.float64)
    tokens, lengths = torch.tensor([[A, B]]), torch.tensor([2])
    token, term = step_logprobs(logits, tokens, lengths, [EOS])
    assert token[0].tolist() == pytest.approx([math.log(1 / 3), math.log(1 / 4)])
    assert term[0].tolist() == pytest.approx([math.log(1 / 3), math.log(1 / 4), math.log(1 / 3)])
    _, forced = step_logprobs(logits, tokens, lengths, [EOS], forced_at=2)  # cut off at 2 tokens: ⊤ is sure
    assert forced[0].tolist() == pytest.approx([math.log(1 / 3), math.log(1 / 4), 0.0])
    _, two_eos = step_logprobs(logits, tokens, lengths, [B, EOS])  # ⊤ = either of two EOS tokens
    assert float(two_eos[0, 0]) == pytest.approx(math.log(2 / 3))
    # log R_i = α(Σ_{k≤i} log π_prev + log π_prev(⊤)) + (1-α)(same for π_base); α = 1/4
    reward = prefix_log_rewards(token, term, torch.zeros_like(token), torch.zeros_like(term), 0.25)
    expected = [0.25 * math.log(1 / 3), 0.25 * math.log(1 / 12), 0.25 * math.log(1 / 36)]
    assert reward[0].tolist() == pytest.approx(expected)


# -- the loss vanishes exactly at the target's conditionals ---------------------------------------------
class ExactSampler:
    """q(v | s) = F(s v) / F(s), q(⊤ | s) = R(s⊤) / F(s) with F(s) = Σ_{answers y ⊒ s} R(y⊤):
    the conditionals of the normalised geometric mixture."""

    def __init__(self, prev, base, alpha: float, perturb: float = 0.0):
        self.reward = {
            (x, y): math.exp(alpha * sequence_logprob(prev, x, y) + (1 - alpha) * sequence_logprob(base, x, y))
            for x in PROMPTS
            for y in ANSWERS
        }
        self.perturb = perturb

    def flow(self, x: int, s: tuple[int, ...]) -> float:
        return sum(r for (px, y), r in self.reward.items() if px == x and y[: len(s)] == s)

    def logits(self, x: int, s: tuple[int, ...]) -> torch.Tensor:
        if len(s) == L:
            return torch.tensor([-math.inf, -math.inf, 0.0], dtype=torch.float64)
        probs = [self.flow(x, (*s, A)), self.flow(x, (*s, B)), self.reward[(x, s)]]
        logits = torch.tensor(probs, dtype=torch.float64).log()
        return logits + torch.tensor([self.perturb, 0.0, 0.0], dtype=torch.float64)


def all_trajectories():
    return [x for x in PROMPTS for _ in ANSWERS], pad([y for _ in PROMPTS for y in ANSWERS])


@pytest.mark.parametrize("subtb_lambda", [1.0, 0.5])
def test_the_loss_is_zero_exactly_at_the_targets_conditionals(subtb_lambda):
    prev, base, alpha = ToyPolicy(1), ToyPolicy(2), 0.5
    prompts, paths = all_trajectories()
    exact = ExactSampler(prev, base, alpha)
    problem = ToyProblem(exact, prev, base, alpha)
    with torch.no_grad():
        log_r = problem.log_rewards(prompts, paths)
        log_pf, log_pterm = problem.sampler_logprobs(prompts, paths)
    assert float(subtb_loss(log_pf, log_pterm, log_r, paths.lengths, subtb_lambda)) == pytest.approx(0.0, abs=1e-24)
    # and its log Z estimates are log Z(x) = log Σ_y R(y⊤|x) at every state
    estimates = log_z_estimates(log_pf, log_pterm, log_r, paths.lengths)
    for row, x in enumerate(prompts):
        values = estimates[row][~torch.isnan(estimates[row])]
        assert values.tolist() == pytest.approx([math.log(exact.flow(x, ()))] * len(values))
    # any other sampler has a positive loss: π_(t-1) itself, or the exact one perturbed at one token
    for other in (prev, ExactSampler(prev, base, alpha, perturb=0.3)):
        with torch.no_grad():
            pf, pterm = ToyProblem(other, prev, base, alpha).sampler_logprobs(prompts, paths)
        assert float(subtb_loss(pf, pterm, log_r, paths.lengths, subtb_lambda)) > 1e-3


# -- training brings the sampler's exact distribution to the geometric mixture ---------------------------
def test_training_the_sampler_reaches_the_geometric_mixture():
    torch.manual_seed(0)
    prev, base, alpha = ToyPolicy(1), ToyPolicy(2), 0.5
    sampler = copy.deepcopy(prev)  # initialised from θ_(t-1), as the stage does
    for policy in (prev, base):
        policy.requires_grad_(False)
    targets = {x: geometric_target(prev, base, x, alpha) for x in PROMPTS}
    before = {x: total_variation(distribution(sampler, x), targets[x]) for x in PROMPTS}
    settings = GFlowNetSettings(
        epochs=120,
        learning_rate=0.05,
        subtb_lambda=1.0,
        samples_per_prompt=16,
        prompts_per_step=2,
        exploration_temperature=1.5,
        max_grad_norm=None,
    )
    history = train_sampler(ToyProblem(sampler, prev, base, alpha), list(PROMPTS), settings, seed=0)
    after = {x: total_variation(distribution(sampler, x), targets[x]) for x in PROMPTS}
    print(f"TV(π_(t-1), target) = {before}; TV(trained sampler, target) = {after}")
    print(f"first loss {history[0]['loss']:.4f}, last {history[-1]['loss']:.2e}; spread {history[-1]['log_z_spread']}")
    # The toy is far from its target at the start (the policies disagree) ...
    assert min(before.values()) > 0.15, before
    # ... and the trained sampler's *exact* distribution (no Monte-Carlo noise in this figure) is within
    # 0.02 of it: what is left is optimisation error, which the last steps' loss bounds (a loss of ~1e-4
    # means per-answer log-probability errors of ~1e-2, i.e. a TV of order 1e-2 at most).
    assert max(after.values()) < 0.02, after
    assert max(after.values()) < 0.1 * min(before.values())
    assert history[-1]["loss"] < 1e-2 * history[0]["loss"]
    assert history[-1]["log_z_spread"] < 0.05


# -- checkpoint and resume -------------------------------------------------------------------------------
def test_an_interrupted_training_resumes_from_its_checkpoint_and_ends_as_an_uninterrupted_one():
    """Interrupt during step 7 (checkpoints every 3 steps: the last after step 6, at an epoch's end), resume
    from it on a fresh sampler: the same history and exactly the same final weights."""
    import io

    prev, base, alpha = ToyPolicy(1), ToyPolicy(2), 0.5
    for policy in (prev, base):
        policy.requires_grad_(False)
    settings = GFlowNetSettings(
        epochs=4, learning_rate=0.05, samples_per_prompt=3, prompts_per_step=1, exploration_temperature=1.3
    )  # two prompts, one per step: 2 steps per epoch, 8 in all

    clean = copy.deepcopy(prev).requires_grad_(True)
    full = train_sampler(ToyProblem(clean, prev, base, alpha), list(PROMPTS), settings, seed=5)

    class Interrupted(Exception):
        pass

    saved: list[bytes] = []

    def store(state):  # as the stage stores it: torch.save, read back with weights_only
        buffer = io.BytesIO()
        torch.save(state, buffer)
        saved.append(buffer.getvalue())

    def crash(record):
        if record["step"] == 6:  # the 7th step: after the checkpoint of step 6
            raise Interrupted

    with pytest.raises(Interrupted):
        train_sampler(
            ToyProblem(copy.deepcopy(prev).requires_grad_(True), prev, base, alpha),
            list(PROMPTS),
            settings,
            seed=5,
            on_step=crash,
            save_steps=3,
            on_checkpoint=store,
        )
    assert len(saved) == 2  # after steps 3 and 6
    state = torch.load(io.BytesIO(saved[-1]), weights_only=True)
    # taken at the end of epoch 2 (its order used up): the resumed run draws epoch 3's order next
    assert (state["step"], state["epoch"], state["position"], len(state["history"])) == (6, 2, 2, 6)
    resumed_sampler = ToyPolicy(99)  # whatever it holds: the checkpoint's weights replace it
    seen = []
    resumed = train_sampler(
        ToyProblem(resumed_sampler, prev, base, alpha),
        list(PROMPTS),
        settings,
        seed=5,
        on_step=lambda record: seen.append(record["step"]),
        resume=state,
    )
    assert seen == [6, 7]  # only the steps not done
    assert resumed == full
    for a, b in zip(resumed_sampler.parameters(), clean.parameters(), strict=True):
        assert torch.equal(a, b)
    # a mid-epoch checkpoint (after step 3: epoch 1, its second prompt next) resumes exactly too
    mid = torch.load(io.BytesIO(saved[0]), weights_only=True)
    assert (mid["step"], mid["epoch"], mid["position"]) == (3, 1, 1)
    again = ToyPolicy(98)
    assert train_sampler(ToyProblem(again, prev, base, alpha), list(PROMPTS), settings, seed=5, resume=mid) == full
    assert all(torch.equal(a, b) for a, b in zip(again.parameters(), clean.parameters(), strict=True))


# -- the sampler adapter on a real (tiny) model -----------------------------------------------------------
def test_the_sampler_adapter_starts_as_theta_prev_and_trains_alone(tiny_model, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alphaspin.gflownet import PREV, SAMPLER, PeftGFlowNet, add_sampler_adapter, use_adapter

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    torch.manual_seed(0)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model), lora).save_pretrained(tmp_path / "prev")
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    model = PeftModel.from_pretrained(base, tmp_path / "prev", adapter_name=PREV)
    add_sampler_adapter(model, rank=6)  # a larger rank: θ_(t-1)'s four ranks plus two that start at zero
    model.eval()
    ids = torch.tensor([tokenizer("Hello there")["input_ids"]])
    with torch.no_grad():
        sampler_logits = model(input_ids=ids).logits
        use_adapter(model, PREV)
        prev_logits = model(input_ids=ids).logits
        with model.disable_adapter():
            base_logits = model(input_ids=ids).logits
        use_adapter(model, SAMPLER)
    assert torch.allclose(sampler_logits, prev_logits, atol=1e-5)
    assert not torch.allclose(prev_logits, base_logits, atol=1e-3)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(f".{SAMPLER}." in n for n in trainable)
    # sampled trajectories: lengths ≤ max_len, and the forced ⊤ at max_len in the sampler's log-probs
    problem = PeftGFlowNet(model, [tokenizer.eos_token_id], tokenizer.pad_token_id, 0.5, 3, "cpu")
    prompts = [tokenizer("Hello there")["input_ids"], tokenizer("Hi")["input_ids"]] * 2
    paths = problem.sample(prompts, 1.0, torch.Generator().manual_seed(0))
    assert paths.lengths.max() <= 3 and paths.tokens.shape[1] == int(paths.lengths.max())
    log_pf, log_pterm = problem.sampler_logprobs(prompts, paths)
    log_r = problem.log_rewards(prompts, paths)
    assert log_pf.requires_grad and not log_r.requires_grad
    for row, n in enumerate(paths.lengths.tolist()):
        if n == 3:
            assert float(log_pterm[row, 3].detach()) == 0.0
    # the reward of a cut-off answer (n = 3 = max_len) follows generation.truncated_losers: under no_eos
    # (the default) its prefix's, under keep the ended answer's, with the policies' log π(⊤ | s_3)
    assert problem.truncated_losers == "no_eos" and (paths.lengths == 3).any()
    keep = PeftGFlowNet(model, [tokenizer.eos_token_id], tokenizer.pad_token_id, 0.5, 3, "cpu", "keep")
    keep_r = keep.log_rewards(prompts, paths)
    with torch.no_grad():
        use_adapter(model, PREV)
        prev_logits = problem._state_logits(prompts, paths)
        with model.disable_adapter():
            base_logits = problem._state_logits(prompts, paths)
        use_adapter(model, SAMPLER)
    (tp, ep), (tb, eb) = (
        step_logprobs(x, paths.tokens, paths.lengths, [tokenizer.eos_token_id]) for x in (prev_logits, base_logits)
    )
    for row, n in enumerate(paths.lengths.tolist()):
        prefix = 0.5 * float(tp[row, :n].sum()) + 0.5 * float(tb[row, :n].sum())
        ended = prefix + 0.5 * float(ep[row, n]) + 0.5 * float(eb[row, n])
        assert float(keep_r[row, n]) == pytest.approx(ended, abs=1e-4)
        assert float(log_r[row, n]) == pytest.approx(prefix if n == 3 else ended, abs=1e-4)
        assert float(log_r[row, :n].sub(keep_r[row, :n]).abs().max() if n else 0.0) < 1e-5  # earlier states alike
    # the scoring forward (one pass, left padding) equals token-by-token log-probs without padding
    row = 0
    n = int(paths.lengths[row])
    with torch.no_grad():
        full = torch.tensor([prompts[row] + paths.tokens[row, :n].tolist()])
        logp = torch.log_softmax(model(input_ids=full).logits[0, len(prompts[row]) - 1 :], -1)
    expected = [float(logp[k, paths.tokens[row, k]]) for k in range(n)]
    assert log_pf[row, :n].tolist() == pytest.approx(expected, abs=1e-4)


# -- the DAG ------------------------------------------------------------------------------------------------
def test_train_sampler_is_in_the_dag_only_for_gflownet_runs_at_t_at_least_1():
    from alphaspin.config import load_config
    from alphaspin.dag import iteration_nodes, node_inputs
    from alphaspin.stage_spec import Node

    for opponent in ("arithmetic", "sir", "token_geometric"):
        config = load_config(None, [f"method.opponent={opponent}"])
        assert "train_sampler" not in [n.stage for n in iteration_nodes(config, 1)]
        generate = next(n for n in iteration_nodes(config, 1) if n.stage == "generate")
        assert node_inputs(config, generate)["sampler"] is None
    config = load_config(None, ["method.opponent=gflownet"])
    assert "train_sampler" not in [n.stage for n in iteration_nodes(config, 0)]
    nodes = iteration_nodes(config, 1)
    assert [n.folder for n in nodes[:3]] == ["sample_prompts", "train_sampler", "generate-gflownet-iter-0"]
    inputs = node_inputs(config, Node("generate", 1, "gflownet-iter-0"))
    assert inputs["sampler"] == Node("train_sampler", 1) and inputs["adapter"] == Node("train", 0)
    assert node_inputs(config, Node("train_sampler", 1)) == {
        "prompts": Node("sample_prompts", 1),
        "previous": Node("train", 0),
    }


def test_gflownet_knobs_enter_only_the_stages_that_use_them():
    from alphaspin.config import load_config
    from alphaspin.stages import REGISTRY

    config = load_config(None, ["method.opponent=gflownet"])
    sampler_reads = REGISTRY["train_sampler"].reads(config, 1, None)
    assert sampler_reads["method.gflownet.epochs"] == 10 and sampler_reads["method.alpha"] == config.method.alpha
    assert "method.gflownet.micro_batch_size" not in sampler_reads  # memory only
    assert sampler_reads["generation.max_new_tokens"] == config.generation.max_new_tokens
    for name, spec in REGISTRY.items():
        if name in ("train_sampler", "generate"):
            continue
        member = None
        assert not any(k.startswith("method.gflownet") for k in spec.reads(config, 1, member)), name
    generate_reads = REGISTRY["generate"].reads(config, 1, "gflownet-iter-0")
    assert [k for k in generate_reads if k.startswith("method.")] == ["method.gflownet.max_new_tokens"]
    # other opponents' generate nodes do not read them, and their keys leave the absent sampler out
    plain = load_config(None, [])
    assert not any(k.startswith("method.gflownet") for k in REGISTRY["generate"].reads(plain, 1, "iter-0"))


def test_the_absent_sampler_input_leaves_existing_generate_keys_unchanged():
    from alphaspin.config import load_config
    from alphaspin.dag import disabled_inputs
    from alphaspin.runner import node_key
    from alphaspin.stage_spec import Node
    from alphaspin.stages import REGISTRY
    from alphaspin.storage import cache_key

    config = load_config(None, [])
    node = Node("generate", 1, "iter-0")
    assert disabled_inputs(config, node) == {"sampler"}
    fields = {"x": 1}
    key = node_key(node, fields, {"prompts": "p", "adapter": "a", "sampler": None}, disabled_inputs(config, node))
    identity = {"iteration": 1, "member": "iter-0", "fields": fields}
    assert key == cache_key("generate", REGISTRY["generate"].version, identity, ["p", "a"])  # as before the input


@pytest.mark.slow
def test_a_run_with_the_gflownet_opponent(make_config):
    from alphaspin.pipeline import run
    from alphaspin.runs import Run
    from alphaspin.stage_spec import Node

    config = make_config(
        "method.opponent=gflownet",
        "method.gflownet.prompts=4",
        "method.gflownet.epochs=2",
        "method.gflownet.samples_per_prompt=2",
        "method.gflownet.prompts_per_step=2",
        "method.gflownet.max_new_tokens=6",
        "method.gflownet.learning_rate=1e-3",
        *NO_BENCHMARKS,
    )
    results = run(config)
    assert all(math.isfinite(r["train/loss"]) for r in results)
    stored = Run(config)
    trained = stored.stored_record(Node("train_sampler", 1))
    assert trained.metrics["prompts"] == 4 and trained.metrics["gflownet/steps"] == 2 * 2
    assert math.isfinite(trained.metrics["gflownet/final_loss"]) and trained.metrics["gflownet/log_z_spread"] >= 0
    folder = stored.dir(Node("train_sampler", 1))
    assert any(name.endswith("adapter_config.json") for name in folder.list_files("sampler"))
    assert len(folder.read_json("train_log.json")) == 4
    record = stored.stored_record(Node("generate", 1, "gflownet-iter-0"))
    assert record.metrics["sampler"] == "gflownet" and record.metrics["rows"] == 6 + 4
    assert stored.dir(Node("generate", 1, "gflownet-iter-0")).read_manifest() is not None
    assert stored.dir(Node("train_sampler", 1)).read_manifest() is not None
    assert stored.dir(Node("train_sampler", 0)).read_manifest() is None  # t = 0: the mixture is π_base


@pytest.mark.slow
def test_an_interrupted_train_sampler_stage_resumes_and_ends_as_an_uninterrupted_one(make_config, monkeypatch):
    """The stage checkpoints into its folder (_scratch/) every method.gflownet.save_steps; interrupted
    after step 3 (last checkpoint: step 2), the rerun resumes at step 2 and writes the same sampler."""
    from safetensors.torch import load

    import alphaspin.gflownet as gflownet
    from alphaspin.pipeline import run
    from alphaspin.runs import Run
    from alphaspin.stage_spec import Node
    from alphaspin.stages.train_sampler import CHECKPOINT

    knobs = [
        "method.iterations=1",
        "method.opponent=gflownet",
        "method.gflownet.prompts=4",
        "method.gflownet.epochs=2",
        "method.gflownet.samples_per_prompt=2",
        "method.gflownet.prompts_per_step=2",
        "method.gflownet.max_new_tokens=4",
        "method.gflownet.learning_rate=1e-3",
        "method.gflownet.save_steps=2",
        *NO_BENCHMARKS,
    ]
    original = gflownet.train_sampler

    class Interrupted(Exception):
        pass

    def interrupted(*args, on_step=None, **kwargs):
        def crash(record):
            if record["step"] == 2:  # the third step, after the checkpoint of step 2
                raise Interrupted

        return original(*args, on_step=crash, **kwargs)

    config = make_config(*knobs)
    monkeypatch.setattr(gflownet, "train_sampler", interrupted)
    with pytest.raises(Interrupted):
        run(config)
    monkeypatch.setattr(gflownet, "train_sampler", original)
    stored = Run(config)
    folder = stored.dir(Node("train_sampler", 1))
    assert folder.read_manifest() is None and CHECKPOINT in folder.list_files()
    run(config)
    assert stored.stored_record(Node("train_sampler", 1)).metrics["gflownet/resumed_from_step"] == 2
    assert CHECKPOINT not in folder.list_files()  # cleared once done
    name = next(n for n in folder.list_files("sampler") if n.endswith(".safetensors"))
    resumed_log, resumed = folder.read_json("train_log.json"), load(folder.read_bytes(name))

    run(config, force={1: {"train_sampler"}})  # the same stage again, from scratch, uninterrupted
    assert stored.stored_record(Node("train_sampler", 1)).metrics["gflownet/resumed_from_step"] is None
    clean = load(folder.read_bytes(name))
    assert resumed_log == folder.read_json("train_log.json") and len(resumed_log) == 4
    assert resumed.keys() == clean.keys() and all(torch.equal(resumed[k], clean[k]) for k in clean)
