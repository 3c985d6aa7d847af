"""The losses of ``training.loss_type`` on toy numbers, through the trainer's real loss method.

Here's the maths. Three pairs, β = 0.5 (so 1/(2β) = 1 and SLiC's δ = 1/β = 2), sequence
log-probs (sums over answer tokens):

    pair                       1      2      3
    log π_θ(y_w|x)           −4.0   −6.0   −3.0
    log π_θ(y_l|x)           −5.0   −4.0   −6.5
    log π_ref(y_w|x)         −4.5   −5.0   −3.5
    log π_ref(y_l|x)         −4.0   −4.5   −6.0
    h_w = π_θ − π_ref (w)     0.5   −1.0    0.5
    h_l = π_θ − π_ref (l)    −1.0    0.5   −0.5
    m = h_w − h_l             1.5   −1.5    1.0
    raw = log π_θ(y_w) − log π_θ(y_l)   1.0   −2.0    3.5

    ipo_pairwise  (m − 1)²                         0.25  6.25  0      mean 6.5/3
    hinge         max(0, 1 − β·m)                  0.25  1.75  0.5    mean 2.5/3
    slic          max(0, 2 − raw)                  1     4     0      mean 5/3
    slic, λ=0.1   max(0, 2 − raw) − 0.1·log π_θ(y_w)  1.4  4.6  0.3    mean 6.3/3
    sppo_hard     (h_w − 1)² + (h_l + 1)²          0.25  6.25  0.5    mean 7/3

The trainer's loss is the mean over pairs. Adding a per-prompt constant log Z(x) to both reference
log-probs of a pair leaves m (hence ipo_pairwise, hinge, sigmoid) unchanged, and slic never reads the
reference; it moves h_w and h_l one by one, so it changes sppo_hard (and TRL's length-normalised
ipo when the two answers differ in length): those need ``training.normalized_reference``.
"""

from __future__ import annotations

import math
import types

import datasets
import pytest
import torch
from conftest import NO_BENCHMARKS

from alphaspin.config import LOG_Z_CANCELS, PAPER_LOSSES, ConfigError, TrainingConfig, load_config
from alphaspin.dpo import GeometricReferenceDPOTrainer, dpo_config
from alphaspin.reference import ipo_pairwise_loss, slic_loss

BETA = 0.5
POLICY_W = [-4.0, -6.0, -3.0]
POLICY_L = [-5.0, -4.0, -6.5]
REF_W = [-4.5, -5.0, -3.5]
REF_L = [-4.0, -4.5, -6.0]
LOG_Z = [0.7, -1.3, 2.0]  # one constant per prompt
CHOSEN_TOKENS = [3, 1, 2]  # answer lengths (only TRL's length-normalised ipo reads them)
REJECTED_TOKENS = [2, 3, 1]

BY_HAND = {
    "ipo_pairwise": (0.25 + 6.25 + 0.0) / 3,
    "hinge": (0.25 + 1.75 + 0.5) / 3,
    "slic": (1.0 + 4.0 + 0.0) / 3,
    "sppo_hard": (0.25 + 6.25 + 0.5) / 3,
    "sigmoid": sum(-math.log(1 / (1 + math.exp(-BETA * m))) for m in (1.5, -1.5, 1.0)) / 3,
}


# One conversational pair: the trainers below are built on it, only their loss methods are called.
ONE_PAIR = {
    "prompt": [[{"role": "user", "content": "hi"}]],
    "chosen": [[{"role": "assistant", "content": "a"}]],
    "rejected": [[{"role": "assistant", "content": "b"}]],
    "ref_chosen_logps": [0.0],
    "ref_rejected_logps": [0.0],
}


@pytest.fixture(scope="module")
def trainer(tiny_model, tmp_path_factory) -> GeometricReferenceDPOTrainer:
    """A real trainer on the tiny model (never trained here): only its loss method is called."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    args = dpo_config(TrainingConfig(beta=BETA), str(tmp_path_factory.mktemp("trl")), seed=0, use_cpu=True)
    return GeometricReferenceDPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_model),
        args=args,
        train_dataset=datasets.Dataset.from_dict(ONE_PAIR),
        processing_class=AutoTokenizer.from_pretrained(tiny_model),
    )


def trainer_loss(trainer, loss_type, ref_shift=(0.0, 0.0, 0.0), slic_lambda=0.0):
    """``trainer._compute_loss`` (TRL's, with our override) on a stand-in model whose per-token
    log-probs sum to the table's sequence log-probs; returns (loss, d loss / d policy log-probs)."""
    policy = torch.tensor(POLICY_W + POLICY_L, requires_grad=True)
    lengths = torch.tensor(CHOSEN_TOKENS + REJECTED_TOKENS)
    width = int(lengths.max()) + 1
    completion_mask = (torch.arange(width)[None, :] >= 1) & (torch.arange(width)[None, :] <= lengths[:, None])
    token_mask = completion_mask[:, 1:].float()
    per_token = token_mask * (policy / lengths)[:, None]  # the answer's tokens share its log-prob

    def model(**kwargs):
        shape = per_token.shape
        return types.SimpleNamespace(
            log_probs=per_token,
            entropy=torch.zeros(shape),
            mean_logits=torch.zeros(shape),
            is_top1=torch.zeros(shape, dtype=torch.bool),
        )

    shift = torch.tensor(ref_shift)
    inputs = {
        "input_ids": torch.ones(len(lengths), width, dtype=torch.long),
        "attention_mask": torch.ones(len(lengths), width, dtype=torch.long),
        "completion_mask": completion_mask.long(),
        "ref_chosen_logps": torch.tensor(REF_W) + shift,
        "ref_rejected_logps": torch.tensor(REF_L) + shift,
    }
    saved = trainer.loss_types, trainer.loss_weights, trainer.slic_lambda
    trainer.loss_types, trainer.loss_weights, trainer.slic_lambda = [loss_type], [1.0], slic_lambda
    try:
        loss = trainer._compute_loss(model, inputs, return_outputs=False)
    finally:
        trainer.loss_types, trainer.loss_weights, trainer.slic_lambda = saved
    loss.backward()
    return loss.item(), policy.grad.tolist()


@pytest.mark.parametrize("loss_type", sorted(BY_HAND))
def test_trainer_loss_equals_the_formula_by_hand(trainer, loss_type):
    assert trainer.beta == BETA and trainer.slic_delta == 2.0  # δ = 1/β
    loss, _ = trainer_loss(trainer, loss_type)
    assert loss == pytest.approx(BY_HAND[loss_type], abs=1e-6)


def test_slic_sft_term_by_hand(trainer):
    loss, grad = trainer_loss(trainer, "slic", slic_lambda=0.1)
    assert loss == pytest.approx((1.4 + 4.6 + 0.3) / 3, abs=1e-6)
    # d/d log π_θ(y_w): (−1[hinge active] − λ)/3; d/d log π_θ(y_l): +1[hinge active]/3
    assert grad == pytest.approx([-1.1 / 3, -1.1 / 3, -0.1 / 3, 1 / 3, 1 / 3, 0.0], abs=1e-6)


def test_the_paper_losses_carry_the_gradient(trainer):
    """The paper's losses are added to TRL's (which computes them as weight-0 sigmoid): the gradient
    is theirs. ipo_pairwise: d/dlog π_θ(y_w) = 2(m − 1)/3, d/dlog π_θ(y_l) = −2(m − 1)/3."""
    _, grad = trainer_loss(trainer, "ipo_pairwise")
    by_hand = [2 * (m - 1) / 3 for m in (1.5, -1.5, 1.0)]
    assert grad == pytest.approx(by_hand + [-g for g in by_hand], abs=1e-6)


@pytest.mark.parametrize("loss_type", ["ipo_pairwise", "hinge", "slic", "sigmoid"])
def test_log_z_cancels_in_the_pairwise_losses(trainer, loss_type):
    assert loss_type in LOG_Z_CANCELS
    assert trainer_loss(trainer, loss_type, ref_shift=LOG_Z)[0] == pytest.approx(BY_HAND[loss_type], abs=1e-6)


def test_log_z_does_not_cancel_in_sppo_or_trl_ipo(trainer):
    # sppo_hard with each h shifted by −log Z: h_w = (−0.2, 0.3, −1.5), h_l = (−1.7, 1.8, −2.5)
    #   (−1.2)² + (−0.7)² = 1.93,  (−0.7)² + 2.8² = 8.33,  (−2.5)² + (−1.5)² = 8.5
    sppo = trainer_loss(trainer, "sppo_hard", ref_shift=LOG_Z)[0]
    assert sppo == pytest.approx((1.93 + 8.33 + 8.5) / 3, abs=1e-5)
    assert abs(sppo - BY_HAND["sppo_hard"]) > 1.0
    # TRL's ipo: ((h_w/|y_w| − h_l/|y_l|) − 1)²; a shift leaves log Z·(1/|y_w| − 1/|y_l|) behind
    h_w = [h - z for h, z in zip((0.5, -1.0, 0.5), LOG_Z, strict=True)]
    h_l = [h - z for h, z in zip((-1.0, 0.5, -0.5), LOG_Z, strict=True)]
    ipo = [trainer_loss(trainer, "ipo", ref_shift=s)[0] for s in ((0.0, 0.0, 0.0), LOG_Z)]
    by_hand = [
        sum(((w / nw - lo / nl) - 1) ** 2 for w, lo, nw, nl in zip(hw, hl, CHOSEN_TOKENS, REJECTED_TOKENS, strict=True))
        / 3
        for hw, hl in (((0.5, -1.0, 0.5), (-1.0, 0.5, -0.5)), (h_w, h_l))
    ]
    assert ipo == pytest.approx(by_hand, abs=1e-5)
    assert abs(ipo[1] - ipo[0]) > 0.1


def test_reference_functions_by_hand():
    h_w, h_l = torch.tensor([0.5, -1.0, 0.5]), torch.tensor([-1.0, 0.5, -0.5])
    assert ipo_pairwise_loss(h_w, h_l, BETA).tolist() == pytest.approx([0.25, 6.25, 0.0])
    lw, ll = torch.tensor(POLICY_W), torch.tensor(POLICY_L)
    assert slic_loss(lw, ll, delta=2.0).tolist() == pytest.approx([1.0, 4.0, 0.0])
    assert slic_loss(lw, ll, delta=2.0, lam=0.1).tolist() == pytest.approx([1.4, 4.6, 0.3])


# -- configuration ------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_type", ["ipo_pairwise", "slic", "hinge"])
def test_pairwise_paper_losses_are_allowed_with_alpha_below_one(loss_type):
    config = load_config(None, [f"training.loss_type={loss_type}", "method.alpha=0.5"])
    assert config.training.loss_type == loss_type and not config.training.normalized_reference


def test_sppo_needs_the_normalised_reference_below_alpha_one():
    with pytest.raises(ConfigError) as error:
        load_config(None, ["training.loss_type=sppo_hard", "method.alpha=0.95"])
    message = str(error.value)
    assert "training.loss_type" in message and "training.normalized_reference" in message
    assert "'sppo_hard'" in message and "does not cancel log Z" in message
    normalised = ["training.loss_type=sppo_hard", "training.normalized_reference=true", "method.alpha=0.95"]
    assert load_config(None, normalised).training.loss_type == "sppo_hard"
    assert load_config(None, ["training.loss_type=sppo_hard", "method.alpha=1.0"]).training.loss_type == "sppo_hard"


def test_loss_type_reaches_trl_and_the_train_cache_key(tmp_path):
    from alphaspin.stages.train import reads

    for loss_type in PAPER_LOSSES:
        config = load_config(None, [f"training.loss_type={loss_type}"])
        assert dpo_config(config.training, str(tmp_path), seed=0, use_cpu=True).loss_type == [loss_type]
        assert reads(config, 0, None)["training.loss_type"] == loss_type


# -- real training, tiny ------------------------------------------------------------------------


@pytest.mark.slow  # two iterations of the tiny run per loss
@pytest.mark.parametrize(
    ("overrides", "first_loss"),
    [
        (("training.loss_type=ipo_pairwise",), (0 - 1 / (2 * 0.1)) ** 2),  # (m − 1/(2β))², m = 0: 25
        (("training.loss_type=slic",), None),  # reads the raw log-probs: no closed form at step 1
        (
            ("training.loss_type=sppo_hard", "training.normalized_reference=true", "training.partition_samples=2"),
            2 * (1 / (2 * 0.1)) ** 2,  # (0 − 1/(2β))² + (0 + 1/(2β))²: 50
        ),
    ],
    ids=["ipo_pairwise", "slic", "sppo_hard-normalized"],
)
def test_tiny_run_trains_with_each_paper_loss(make_config, overrides, first_loss):
    """At t = 0 the fresh LoRA (B = 0) is the base model and the reference is the base model too,
    so every h = 0 at the first step and the first logged loss is the loss's value at m = 0."""
    from alphaspin.pipeline import run
    from alphaspin.runs import Run
    from alphaspin.stage_spec import Node

    config = make_config(*overrides, "method.alpha=0.5", *NO_BENCHMARKS)
    assert config.training.beta == 0.1
    results = run(config)
    assert len(results) == 2 and all(math.isfinite(r["train/loss"]) for r in results)
    stored = Run(config)
    for t in (0, 1):
        losses = [h["loss"] for h in stored.dir(Node("train", t)).read_json("train_log.json") if "loss" in h]
        assert losses and all(math.isfinite(v) for v in losses)
    if first_loss is not None:
        log = stored.dir(Node("train", 0)).read_json("train_log.json")
        assert next(h["loss"] for h in log if "loss" in h) == pytest.approx(first_loss, rel=1e-3)


def test_slic_takes_the_papers_delta_and_lambda_from_the_config(tiny_model, tmp_path):
    """SLiC as the paper writes it (§2.3), with δ and λ knobs: δ = 1, λ = 0.1 by default (the paper requires
    δ > 0, λ > 0). On the table: raw = 1, −2, 3.5 → max(0, 1 − raw) = 0, 3, 0; −0.1·log π_θ(y_w) = 0.4, 0.6,
    0.3; mean (0.4 + 3.6 + 0.3)/3. δ no longer follows β: β = 0.5 here, 1/β = 2."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alphaspin.dpo import slic_settings

    training = TrainingConfig(beta=BETA, loss_type="slic")
    assert slic_settings(training) == {"slic_delta": 1.0, "slic_lambda": 0.1}
    configured = GeometricReferenceDPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_model),
        args=dpo_config(training, str(tmp_path / "trl"), seed=0, use_cpu=True),
        train_dataset=datasets.Dataset.from_dict(ONE_PAIR),
        processing_class=AutoTokenizer.from_pretrained(tiny_model),
        **slic_settings(training),
    )
    assert (configured.slic_delta, configured.slic_lambda) == (1.0, 0.1)
    loss, grad = trainer_loss(configured, "slic", slic_lambda=configured.slic_lambda)
    assert loss == pytest.approx((0.4 + 3.6 + 0.3) / 3, abs=1e-6)
    # d/d log π_θ(y_w) = (−1[hinge active] − λ)/3; d/d log π_θ(y_l) = 1[hinge active]/3: only pair 2 is active
    assert grad == pytest.approx([-0.1 / 3, -1.1 / 3, -0.1 / 3, 0.0, 1 / 3, 0.0], abs=1e-6)
    wide = slic_settings(TrainingConfig(loss_type="slic", slic_delta=4.0, slic_lambda=0.0))
    assert slic_loss(torch.tensor([-4.0]), torch.tensor([-5.0]), wide["slic_delta"], wide["slic_lambda"]).item() == 3.0


def test_slic_knobs_enter_only_the_keys_of_slic_runs():
    from alphaspin.stages import REGISTRY

    reads = REGISTRY["train"].reads
    sigmoid = load_config(None, [])
    assert not any(k.startswith("training.slic") for k in reads(sigmoid, 1, None))
    assert reads(sigmoid, 1, None) == reads(load_config(None, ["training.slic_lambda=0.5"]), 1, None)
    slic = load_config(None, ["training.loss_type=slic", "training.slic_delta=2"])
    assert reads(slic, 1, None)["training.slic_delta"] == 2.0 and reads(slic, 1, None)["training.slic_lambda"] == 0.1
    for bad in ("training.slic_delta=0", "training.slic_lambda=-1"):
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            load_config(None, [bad])
