"""Stage ``evaluate``: θ_t on the held-out rows training never sees (log-likelihood per token of
y_w; DPO reward accuracy and margin against this iteration's reference; on ``builtin:synthetic`` the
exact KL(p_data‖π_t) and support mass, next to the base's), then the configured benchmarks (lm-eval,
judged chat). Any failure fails the stage: never done with missing numbers."""

from __future__ import annotations

from typing import Any

from alphaspin.config import AlphaSpinConfig
from alphaspin.provenance import FILE as PROVENANCE
from alphaspin.provenance import lm_eval_provenance, machine_facts, package_versions
from alphaspin.stage_spec import Artifact, Input, Job, StageSpec, pick
from alphaspin.synthetic import BUILTIN_SYNTHETIC

# The lm-eval record `alphaspin.evaluation.run_benchmarks` stores in this stage's folder.
LM_EVAL_RECORD = "benchmarks/lm_eval/lm_eval_results.json"


def reads(config: AlphaSpinConfig, iteration: int, member: str | None) -> dict[str, Any]:
    fields = pick(
        config,
        "model.name_or_path",
        "model.dtype",
        "model.chat_template",
        "evaluation",
        "training.beta",
        "training.max_length",
    )
    if config.generation.losers_as_prefixes:  # held-out pairs are tokenized as the reference stage did
        fields.update(pick(config, "generation.truncated_losers"))
    # vLLM answers the judged chat / runs lm-eval (greedy, but not bit-equal to transformers'); its
    # LoRA rank matters there. Only then, so the keys of runs on the transformers backend stay as they were.
    if config.generation.backend == "vllm" and config.evaluation.judge.enabled:
        fields.update(pick(config, "generation.backend"))
    if config.evaluation.benchmark_backend == "vllm" or fields.get("generation.backend") == "vllm":
        fields.update(pick(config, "generation.max_lora_rank"))
    if config.data.source == BUILTIN_SYNTHETIC:  # the exact KL to the task's p_data
        fields.update(pick(config, "data.source"))
    return fields


def evaluate(job: Job, trained: Artifact, reference: Artifact) -> dict[str, Any]:
    from alphaspin.evaluation import evaluate_policy, run_benchmarks, synthetic_metrics

    ws, t = job.workspace, job.iteration
    frame = reference.read_table("reference.parquet")
    heldout = frame[frame.split == "heldout"].reset_index(drop=True)
    model = ws.load_policy(trained)
    metrics = evaluate_policy(ws, t, model, heldout, job.out)
    if job.config.data.source == BUILTIN_SYNTHETIC:
        metrics.update(synthetic_metrics(ws, model, heldout, job.out))
    metrics.update(run_benchmarks(ws, t, model, ws.local_adapter(trained), job.out))
    metrics["heldout/base_loglik_per_token"] = reference.metrics.get("heldout/base_loglik_per_token")
    for key in ("train/loss", "train/reward_margin", "train/reward_accuracy"):
        metrics[key] = trained.metrics.get(key)
    job.out.write_json("metrics.json", {"iteration": t, **metrics})
    record = LM_EVAL_RECORD if LM_EVAL_RECORD in job.out.list_files("benchmarks") else None
    lm_eval = lm_eval_provenance(job.out.read_json(record) if record else None)
    job.out.write_json(PROVENANCE, {"versions": package_versions(), "lm_eval": lm_eval, "machine": machine_facts()})
    return metrics


SPEC = StageSpec(
    name="evaluate",
    function=evaluate,
    inputs=(Input("trained", "train"), Input("reference", "reference_logps")),
    reads=reads,
    # 2: chat templates write BOS for tokenizers that add one; 3: provenance.json;
    # 4: no machine facts or local paths in the lm-eval record and judgments (model named as the card does);
    # 5: builtin:synthetic answers scored as "answer, then end of turn" (without the template's newline)
    version=5,
    gpu=True,
    description="Evaluate θ_t on held-out pairs and the configured benchmarks.",
)
