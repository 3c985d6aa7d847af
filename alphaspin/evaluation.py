"""Held-out evaluation of θ_t, plus the configured benchmarks."""

from __future__ import annotations

import functools
import logging

import numpy as np
import pandas as pd
import torch

from alphaspin.config import GenerationConfig
from alphaspin.generation import GenerationRequest, left_pad
from alphaspin.reference import dpo_margin
from alphaspin.storage import StageDir
from alphaspin.workspace import Workspace

logger = logging.getLogger(__name__)


def heldout_metrics(policy: pd.DataFrame, heldout: pd.DataFrame, beta: float) -> dict[str, float]:
    """Mean log-likelihood per token of the held-out answers y_w (token-weighted), and the DPO
    reward accuracy/margin of θ_t on held-out pairs: margin = β[(lp_w − ref_w) − (lp_l − ref_l)]."""
    merged = heldout.merge(policy, on="id", suffixes=("", "_policy"))
    margin = dpo_margin(
        torch.tensor(merged.chosen_logps.values),
        torch.tensor(merged.rejected_logps.values),
        torch.tensor(merged.ref_chosen_logps.values),
        torch.tensor(merged.ref_rejected_logps.values),
        beta,
    ).numpy()
    return {
        "heldout/loglik_per_token": float(merged.chosen_logps.sum() / max(1, merged.chosen_tokens_policy.sum())),
        "heldout/reward_accuracy": float(np.mean(margin > 0)) if len(margin) else float("nan"),
        "heldout/reward_margin": float(np.mean(margin)) if len(margin) else float("nan"),
        "heldout/pairs": int(len(merged)),
    }


def evaluate_policy(ws: Workspace, t: int, model, heldout: pd.DataFrame, stage: StageDir) -> dict:
    from alphaspin.dpo import completion_logps

    config = ws.config
    metrics: dict = {}
    if len(heldout) and (config.evaluation.heldout_likelihood or config.evaluation.heldout_pairs):
        tokenized = ws.tokenize_pairs(heldout)
        policy = completion_logps(
            model,
            tokenized,
            ws.tokenizer.pad_token_id,
            config.training.max_length,
            config.evaluation.batch_size,
            ws.device,
        )
        found = heldout_metrics(policy, heldout, config.training.beta)
        if not config.evaluation.heldout_pairs:
            found = {k: v for k, v in found.items() if "reward" not in k}
        if not config.evaluation.heldout_likelihood:
            found.pop("heldout/loglik_per_token")
        metrics.update(found)
        stage.write_table("heldout_logps.parquet", policy)
    return metrics


def synthetic_metrics(ws: Workspace, model, heldout: pd.DataFrame, stage: StageDir) -> dict:
    """``builtin:synthetic``: KL(p_data‖π) and the mass π puts on the support (`alphaspin.synthetic`),
    mean over the held-out prompts, for θ_t (``synthetic/kl``, ``synthetic/support_mass``) and the
    base (adapter disabled: ``synthetic/base_kl``, ``synthetic/base_support_mass``). Every answer of
    every support is scored as "the answer, then end of turn" (TRL's tokenization up to the template's
    end-of-turn marker, without the newline after it: `end_answers_at_marker`; `completion_logps`);
    the per-answer log-probs go to ``synthetic_logps.parquet``."""
    from alphaspin.dpo import completion_logps, end_answers_at_marker
    from alphaspin.synthetic import support_metrics, support_of

    config = ws.config
    support = support_of(list(heldout["prompt"]))
    rows = pd.DataFrame(
        {
            "id": [f"support-{i}" for i in range(len(support))],
            "prompt": support["prompt"],
            "chosen": support["answer"],
            "rejected": support["answer"],
            "rejected_truncated": False,
        }
    )
    tokenized = end_answers_at_marker(ws.tokenize_pairs(rows), ws.tokenizer, ("chosen",))
    full = [len(ids) for ids in tokenized["chosen_ids"]]
    if len(tokenized) != len(rows) or any(
        len(p) + n > config.training.max_length for p, n in zip(tokenized["prompt_ids"], full, strict=True)
    ):
        raise ValueError(
            f"training.max_length: {config.training.max_length} cuts a synthetic prompt + answer; the exact KL "
            "needs every answer whole"
        )

    def score(policy) -> list[float]:
        scored = completion_logps(
            policy,
            tokenized,
            ws.tokenizer.pad_token_id,
            config.training.max_length,
            config.evaluation.batch_size,
            ws.device,
            sides=("chosen",),
        )
        return scored["chosen_logps"].tolist()

    table = support.assign(tokens=full, logps=score(model))
    with model.disable_adapter():
        table["base_logps"] = score(model)
    stage.write_table("synthetic_logps.parquet", table)
    policy, base = support_metrics(table, "logps"), support_metrics(table, "base_logps")
    return {
        "synthetic/kl": policy["kl"],
        "synthetic/support_mass": policy["support_mass"],
        "synthetic/base_kl": base["kl"],
        "synthetic/base_support_mass": base["support_mass"],
        "synthetic/prompts": policy["prompts"],
    }


def vllm_environment(generation: GenerationConfig, device: str) -> dict[str, str]:
    """What lm-eval's vllm backend needs in its environment: the CPU KV cache size on a CPU; on ``cuda:N``
    (the stage's own GPUs, `alphaspin.devices`) only GPUs N.. of this process."""
    if str(device).startswith("cpu"):
        from alphaspin.vllm_server import cpu_kvcache_env

        return cpu_kvcache_env(generation.vllm_cpu_kvcache_gib)
    from alphaspin.devices import engine_gpus

    visible, _ = engine_gpus(str(device), generation.tensor_parallel_size * generation.vllm_data_parallel_size)
    return {} if visible is None else {"CUDA_VISIBLE_DEVICES": visible}


def lm_eval_engine_args(generation: GenerationConfig) -> dict:
    """lm-eval's vllm model_args of how the engine runs: tensor and data parallel (when above 1) and
    ``generation.vllm_args`` (`alphaspin.vllm_server.model_args_of`)."""
    from alphaspin.vllm_server import model_args_of

    args: dict = {}
    if generation.tensor_parallel_size > 1:
        args["tensor_parallel_size"] = generation.tensor_parallel_size
    if generation.vllm_data_parallel_size > 1:
        args["data_parallel_size"] = generation.vllm_data_parallel_size
    args.update(model_args_of(generation.vllm_args))
    return args


def hand_over_gpu(ws: Workspace, model) -> None:
    """Before a vLLM engine starts in a stage that holds ``model`` on the GPU: move the model to the
    CPU and give torch's cached memory back (`alphaspin.gpu_memory.offload`), so the engine gets the
    memory it is configured for (vLLM refuses to start when less is free). Nothing to do on a CPU."""
    if str(ws.device).startswith("cuda"):
        from alphaspin.gpu_memory import offload

        offload(model)


def run_benchmarks(ws: Workspace, t: int, model, adapter_path: str, stage: StageDir) -> dict:
    """lm-eval tasks and the judged chat on base + adapter t; their files go into the stage.
    Any failure raises: a stage is never marked done with missing numbers. A vLLM engine (lm-eval's
    vllm model, the judged chat on generation.backend vllm) gets the GPU after the policy is moved off
    it (`hand_over_gpu`); the transformers judged chat gets the policy back on the device."""
    config = ws.config.evaluation
    metrics: dict = {}
    out = ws.scratch / f"benchmarks-{t}"
    if config.benchmarks:
        from alphaspin.benchmarks.leaderboard import leaderboard_metrics, run_lm_eval
        from alphaspin.model_card import public_name

        ws.progress(0.1, "lm-eval")
        if config.benchmark_backend == "vllm":
            hand_over_gpu(ws, model)
        result = run_lm_eval(
            ws.model_path,
            adapter_path,
            list(config.benchmarks),
            num_fewshot=config.benchmark_num_fewshot,
            limit=config.benchmark_limit,
            batch_size=config.batch_size,
            device=ws.device,
            dtype=ws.config.model.dtype,
            backend=config.benchmark_backend,
            output_dir=str(out / "lm_eval"),
            adapter_label=f"iter-{t}/train/adapter",
            model_label=public_name(ws.config.model.name_or_path),
            max_lora_rank=ws.config.generation.max_lora_rank,
            vllm_python=ws.config.generation.vllm_python,
            vllm_env=vllm_environment(ws.config.generation, ws.device),
            engine_args=lm_eval_engine_args(ws.config.generation),
        )
        metrics.update(leaderboard_metrics(result))
    if config.judge.enabled:
        ws.progress(0.5, "judged chat")
        if ws.config.generation.backend != "vllm" and config.benchmarks and config.benchmark_backend == "vllm":
            model.to(ws.device)  # the transformers judged chat answers with the policy, moved off for lm-eval
        metrics.update(_judged_chat(ws, model, adapter_path, out / "judge"))
    if out.exists():
        stage.put_dir(out, "benchmarks")
    return metrics


def _judged_chat(ws: Workspace, model, adapter_path: str, out) -> dict:
    from alphaspin.benchmarks import judge as chat
    from alphaspin.benchmarks import mt_bench
    from alphaspin.benchmarks.local_judge import RATING_CHOICES, LocalJudgeServer
    from alphaspin.benchmarks.mt_bench import MT_BENCH
    from alphaspin.model_card import public_name
    from alphaspin.models import resolve_model_path

    settings = ws.config.evaluation.judge
    protocol: dict = {}
    if settings.questions == MT_BENCH:  # MT-Bench's own questions, prompts and rating parser (FastChat)
        bench = mt_bench.load_mt_bench(settings.categories, settings.per_category)
        questions = bench.questions
        protocol = {
            "build_messages": functools.partial(mt_bench.judge_messages, bench.prompts),
            "parse": mt_bench.parse_or_raise,
            "unparsed": chat.UNPARSED_RATING,
            "prompt_version": mt_bench.PROMPT_VERSION,
        }
    else:
        questions = chat.load_questions(
            settings.questions, categories=settings.categories, per_category=settings.per_category
        )
    answer = _vllm_chat if ws.config.generation.backend == "vllm" else _generate_chat
    answers = chat.answer_questions(
        lambda chats: answer(ws, model, chats, settings.answer_max_new_tokens, adapter_path), questions
    )
    extra = {"guided_choice": RATING_CHOICES} if settings.guided_choice else None

    def score(base_url: str, model_name: str) -> list:
        with chat.JudgeClient(
            base_url,
            model_name,
            api_key_env=settings.api_key_env,
            temperature=settings.temperature,
            max_retries=settings.max_retries,
            max_tokens=settings.max_tokens,
            extra_body=extra,
        ) as client:
            concurrency = 1 if base_url == "local" else 4
            return chat.judge_answers(client, questions, answers, concurrency=concurrency, **protocol)

    if settings.base_url == "local":
        path = resolve_model_path(settings.model)
        with LocalJudgeServer(path, device=ws.device) as server:
            # The stored judgments name the judge as the model card names a model: no local path.
            scores = score(server.base_url, public_name(settings.model))
    else:
        scores = score(settings.base_url, settings.model)
    if settings.questions == MT_BENCH:
        aggregated = mt_bench.aggregate(scores, bench.provenance)
        chat.save_judgments(str(out), answers, scores, aggregated)
        return mt_bench.metrics(aggregated)
    aggregated = chat.aggregate(scores)
    chat.save_judgments(str(out), answers, scores, aggregated)
    return chat.judge_metrics(aggregated)


def _chat_ids(tokenizer, chat: list[dict]) -> list[int]:
    return list(
        tokenizer.apply_chat_template(chat, tokenize=True, return_dict=True, add_generation_prompt=True)["input_ids"]
    )


def _vllm_chat(ws: Workspace, model, chats: list[list[dict]], max_new_tokens: int, adapter_path: str) -> list[str]:
    """Greedy replies of θ_t to chats from the generation engine (generation.backend: vllm), the
    adapter as a LoRA request: the same engine the generate stages use."""
    from alphaspin.backends import make_backend

    hand_over_gpu(ws, model)  # the engine starts next: the policy (used for held-out scores) leaves the GPU
    config = ws.config.generation.model_copy(
        update={"temperature": 0.0, "top_p": 1.0, "max_new_tokens": max_new_tokens}
    )
    backend = make_backend(config, ws.model_path, ws.tokenizer, ws.dtype, ws.device, [adapter_path])
    try:
        requests = [
            GenerationRequest(f"chat-{i}", tuple(_chat_ids(ws.tokenizer, c)), adapter_path, 0)
            for i, c in enumerate(chats)
        ]
        return [c.text for c in backend.complete(requests)]
    finally:
        backend.close()


@torch.no_grad()
def _generate_chat(
    ws: Workspace, model, chats: list[list[dict]], max_new_tokens: int, adapter_path: str | None = None
) -> list[str]:
    """Greedy replies of θ_t to chats, with the training chat template (left-padded batches)."""
    tokenizer, replies = ws.tokenizer, []
    size = ws.config.evaluation.batch_size
    for start in range(0, len(chats), size):
        prompts = [_chat_ids(tokenizer, c) for c in chats[start : start + size]]
        pad = tokenizer.pad_token_id
        ids, mask = left_pad(prompts, pad, ws.device)
        width = ids.shape[1]
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=tokenizer.eos_token_id,
        )
        replies.extend(tokenizer.decode(row[width:], skip_special_tokens=True).strip() for row in out)
    return replies
