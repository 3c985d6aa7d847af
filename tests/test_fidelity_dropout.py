"""LoRA dropout is active as configured: TRL's DPOConfig.disable_dropout (default True) would set
every torch.nn.Dropout of the policy to p=0 when the trainer is built (trl DPOTrainer.__init__)."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from alphaspin.config import TrainingConfig


def _lora_dropouts(model: torch.nn.Module) -> list[torch.nn.Dropout]:
    found = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleDict) and name.endswith("lora_dropout"):
            found.extend(m for m in module.values() if isinstance(m, torch.nn.Dropout))
    return found


def _build_trainer(tiny_model: str, tmp_path, training: TrainingConfig):
    """As alphaspin.training.run_training builds it at t = 0: a plain base model and a fresh LoRA config."""
    from peft import LoraConfig

    from alphaspin.dpo import REFERENCE_COLUMNS, GeometricReferenceDPOTrainer, dpo_config, pairs_to_dataset
    from alphaspin.models import load_base_model, load_tokenizer

    tokenizer = load_tokenizer(tiny_model)
    model = load_base_model(tiny_model)
    lora = training.lora
    peft_config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.lora_alpha,
        lora_dropout=lora.lora_dropout,
        target_modules=list(lora.target_modules),
        task_type="CAUSAL_LM",
    )
    pairs = pd.DataFrame(
        {
            "id": ["a", "b"],
            "prompt": ["Hello there", "How are you?"],
            "chosen": ["Hi!", "Fine, thanks."],
            "rejected": ["Go away.", "Why do you ask"],
            "ref_chosen_logps": [-10.0, -12.0],
            "ref_rejected_logps": [-11.0, -13.0],
        }
    )
    args = dpo_config(training, str(tmp_path / "trl"), seed=0, use_cpu=True)
    return GeometricReferenceDPOTrainer(
        model=model,
        args=args,
        train_dataset=pairs_to_dataset(pairs, REFERENCE_COLUMNS),
        processing_class=tokenizer,
        peft_config=peft_config,
    )


def test_default_config_keeps_dropout_on():
    assert TrainingConfig().disable_dropout is False


@pytest.mark.parametrize(("disable", "expected"), [(False, 0.05), (True, 0.0)])
def test_lora_dropout_survives_the_trainer(tiny_model, tmp_path, disable, expected):
    training = TrainingConfig(
        disable_dropout=disable, max_length=32, per_device_train_batch_size=2, lora={"r": 4, "lora_dropout": 0.05}
    )
    trainer = _build_trainer(tiny_model, tmp_path, training)
    dropouts = _lora_dropouts(trainer.model)
    assert dropouts, "no LoRA dropout modules found in the trainer's model"
    assert {d.p for d in dropouts} == {expected}
