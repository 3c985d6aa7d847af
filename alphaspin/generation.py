"""Generating the losers y_l: one request per prompt, answered by one opponent member.

A request carries the chat (rendered with the tokenizer's chat template and the generation
prompt, exactly as TRL renders the prompt it trains on — the official SPIN code does not,
uclaml/SPIN#33), the member's adapter (None for the base) and a per-request seed. Backends:

- ``TransformersBackend``: batched ``generate`` on CPU or GPU.
- ``VllmBackend`` (``alphaspin.vllm_backend``): one vLLM engine serving the base and every
  member's LoRA adapter.

`alphaspin.backends.make_backend` picks one from ``generation.backend``. ``complete`` returns each
request's text and whether ``generation.max_new_tokens`` cut it off (`Completion`); ``generate``
only the texts.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from transformers import PreTrainedTokenizerBase

from alphaspin.config import GenerationConfig

# torch's global generator, shared by the threads of a process. transformers' sampling draws from it after
# seeding it per batch, and loading a LoRA adapter draws from it (its initial weights, then overwritten):
# stages that run at once in one process (orchestration.gpu_stages) hold this lock around both, so no thread
# draws from another's seeded stream and the samples equal those of one stage at a time.
GLOBAL_RNG = threading.RLock()
# Stages that draw from that generator all along (the train stages' dropout masks and data order, evaluate's
# lm-eval, which seeds it, and the models it loads) hold GLOBAL_RNG for their whole run (tasks.execute_stage):
# beside one of them, another stage samples only before or after it.
GLOBAL_RNG_STAGES = frozenset({"train", "train_sampler", "evaluate"})

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationRequest:
    id: str
    prompt_ids: tuple[int, ...]  # chat template + generation prompt, as TRL tokenizes the prompt
    adapter_path: str | None  # the member's LoRA adapter; None = base policy
    seed: int


def chat_prompt(prompt: str) -> list[dict[str, str]]:
    """The conversational prompt both generation and training use."""
    return [{"role": "user", "content": prompt}]


def render_prompt_ids(tokenizer: PreTrainedTokenizerBase, prompt: str) -> list[int]:
    """Token ids of the prompt, as TRL's DPO tokenization computes ``prompt_ids``."""
    result = tokenizer.apply_chat_template(
        chat_prompt(prompt), tokenize=True, return_dict=True, add_generation_prompt=True
    )
    return list(result["input_ids"])


def request_seed(base_seed: int, iteration: int, member: str, row_id: str) -> int:
    """A per-request seed that does not depend on batch composition or on resumption."""
    digest = hashlib.sha256(f"{base_seed}/{iteration}/{member}/{row_id}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def build_requests(
    tokenizer: PreTrainedTokenizerBase,
    rows: Sequence[tuple[str, str]],
    adapter_path: str | None,
    base_seed: int,
    iteration: int,
    member: str,
) -> list[GenerationRequest]:
    """Requests for ``rows`` = [(id, prompt), ...] answered by one member."""
    return [
        GenerationRequest(
            row_id,
            tuple(render_prompt_ids(tokenizer, prompt)),
            adapter_path,
            request_seed(base_seed, iteration, member, row_id),
        )
        for row_id, prompt in rows
    ]


@dataclass(frozen=True)
class Completion:
    """One request's answer: the decoded text, whether ``generation.max_new_tokens`` cut it off
    (the sampler stopped at the cap, not at an end-of-sequence token), and the token ids the sampler
    generated (its end-of-sequence token included when it stopped there; empty where unknown).

    The ids matter for a cut-off loser under ``generation.truncated_losers: no_eos``: it is scored
    and trained as the prefix the policy wrote, and re-tokenizing its decoded text need not give
    that prefix back (a word the sampler wrote in two pieces comes back as one token, a stripped
    space goes missing): `alphaspin.dpo.end_rejected_prefixes` uses these ids instead."""

    text: str
    truncated: bool
    token_ids: tuple[int, ...] = ()


def generated_ids(ids: Sequence[int], eos_ids: set[int]) -> tuple[int, ...]:
    """The ids a sampler generated: up to and including the first end-of-sequence token (what
    follows it in a batch is padding), or all of them when it was cut off."""
    out = []
    for token in ids:
        out.append(int(token))
        if int(token) in eos_ids:
            break
    return tuple(out)


def left_pad(
    prompts: Sequence[Sequence[int]], pad_id: int, device: str | torch.device = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask of a batch, left-padded to its longest row, so that generation
    continues from the last prompt token of every row. Shapes (batch, width)."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + list(p) for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    return ids, mask


class GenerationBackend(Protocol):
    def complete(self, requests: Sequence[GenerationRequest]) -> list[Completion]:
        """The completion of each request (text and whether it was cut off), in order."""
        ...

    def generate(self, requests: Sequence[GenerationRequest]) -> list[str]:
        """The decoded completion of each request, in order (``complete`` without the truncation flags)."""
        ...

    def close(self) -> None: ...


class TransformersBackend:
    """Batched sampling with ``model.generate``; loads the base once and swaps adapters by name."""

    def __init__(
        self,
        model_path: str,
        tokenizer: PreTrainedTokenizerBase,
        config: GenerationConfig,
        dtype: torch.dtype = torch.float32,
        device: str = "cpu",
    ):
        from transformers import AutoModelForCausalLM

        self.config = config
        self.tokenizer = tokenizer
        self.device = device
        with GLOBAL_RNG:
            self.base = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(device).eval()
        self.model = self.base
        self._adapters: dict[str, str] = {}  # path -> adapter name

    def _select(self, adapter_path: str | None):
        from peft import PeftModel

        if adapter_path is None:
            return self.model.disable_adapter() if isinstance(self.model, PeftModel) else _null()
        if adapter_path not in self._adapters:
            name = f"member{len(self._adapters)}"
            if isinstance(self.model, PeftModel):
                self.model.load_adapter(adapter_path, adapter_name=name)
            else:
                self.model = PeftModel.from_pretrained(self.base, adapter_path, adapter_name=name).eval()
            self._adapters[adapter_path] = name
        self.model.set_adapter(self._adapters[adapter_path])
        return _null()

    def generate(
        self, requests: Sequence[GenerationRequest], on_batch: Callable[[int], None] | None = None
    ) -> list[str]:
        return [c.text for c in self.complete(requests, on_batch)]

    @torch.no_grad()
    def complete(
        self, requests: Sequence[GenerationRequest], on_batch: Callable[[int], None] | None = None
    ) -> list[Completion]:
        outputs: list[Completion] = []
        size = self.config.batch_size
        for start in range(0, len(requests), size):
            batch = requests[start : start + size]
            adapters = {r.adapter_path for r in batch}
            if len(adapters) != 1:
                raise ValueError("a batch must be answered by one member")
            with GLOBAL_RNG, self._select(adapters.pop()):
                outputs.extend(self._generate_batch(batch))
            if on_batch:
                on_batch(len(batch))
        return outputs

    def _generate_batch(self, batch: Sequence[GenerationRequest]) -> list[Completion]:
        pad = self.tokenizer.pad_token_id
        input_ids, attention = left_pad([r.prompt_ids for r in batch], pad)
        width = input_ids.shape[1]
        # transformers samples a batch from one generator: seed it from the batch's first request,
        # so a shard regenerated after a crash gives the same text. That generator is torch's global one,
        # shared by the threads of this process: stages generating at once (orchestration.gpu_stages)
        # take turns per batch (GLOBAL_RNG), or one would draw from the other's seeded stream.
        sampling = self.config.temperature > 0
        with GLOBAL_RNG:
            torch.manual_seed(batch[0].seed)
            generated = self.model.generate(
                input_ids=input_ids.to(self.device),
                attention_mask=attention.to(self.device),
                max_new_tokens=self.config.max_new_tokens,
                do_sample=sampling,
                temperature=self.config.temperature if sampling else None,
                top_p=self.config.top_p if sampling else None,
                top_k=None,
                pad_token_id=pad,
                eos_token_id=self.tokenizer.eos_token_id,
            )
        completions = generated[:, width:]
        # generate stops a row at EOS (then pads it) or at max_new_tokens: a row without EOS was cut off.
        ended = (completions == self.tokenizer.eos_token_id).any(dim=1).tolist()
        eos = {int(self.tokenizer.eos_token_id)}
        return [
            Completion(
                self.tokenizer.decode(ids, skip_special_tokens=True).strip(),
                not stopped,
                generated_ids(ids.tolist(), eos),
            )
            for ids, stopped in zip(completions, ended, strict=True)
        ]

    def close(self) -> None:
        del self.model, self.base
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False
