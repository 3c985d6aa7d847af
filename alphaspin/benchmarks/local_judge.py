"""A small OpenAI-compatible chat-completions server over a local transformers model, so the
judged chat runs offline on a CPU (the quickstart's judge).

It serves ``POST /v1/chat/completions``. With ``guided_choice`` (the request field vLLM's OpenAI
server also accepts) the reply is the choice of highest log-likelihood after the chat-template
prompt — a 135M model cannot be trusted to write "Rating: [[N]]" on its own, but it can rank the
ten possible ratings. Without it, the reply is a greedy generation. This is a stand-in for a real
judge (a large model behind vLLM or a hosted API); its scores say little about quality.
"""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch

logger = logging.getLogger(__name__)

RATING_CHOICES = [f"Rating: [[{n}]]" for n in range(1, 11)]


class LocalJudgeServer:
    """``with LocalJudgeServer(model_path) as server: server.base_url`` — serves on 127.0.0.1."""

    def __init__(self, model_path: str, chat_template: str | None = None, device: str = "cpu", port: int = 0):
        from transformers import AutoModelForCausalLM

        from alphaspin.models import load_tokenizer

        self.tokenizer = load_tokenizer(model_path, chat_template)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).to(device).eval()
        self.device = device
        self.lock = threading.Lock()  # one forward at a time: the model is not thread-safe
        judge = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's naming)
                if not self.path.rstrip("/").endswith("/chat/completions"):
                    self._send(404, {"error": {"message": f"no route {self.path}"}})
                    return
                try:
                    body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                    text = judge.complete(body["messages"], body.get("guided_choice"), int(body.get("max_tokens", 256)))
                except (KeyError, ValueError, TypeError) as error:
                    self._send(400, {"error": {"message": f"bad request: {error}"}})
                    return
                self._send(
                    200,
                    {
                        "object": "chat.completion",
                        "model": body.get("model", "local"),
                        "choices": [
                            {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}
                        ],
                    },
                )

            def _send(self, code: int, payload: dict[str, Any]) -> None:
                data = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):  # quiet
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}/v1"

    def __enter__(self) -> LocalJudgeServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)

    def _prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        result = self.tokenizer.apply_chat_template(
            messages, tokenize=True, return_dict=True, add_generation_prompt=True
        )
        return list(result["input_ids"])

    @torch.no_grad()
    def complete(self, messages: list[dict[str, str]], choices: list[str] | None, max_tokens: int) -> str:
        prompt = self._prompt_ids(messages)
        with self.lock:
            if choices:
                return choices[int(torch.argmax(self._choice_logps(prompt, choices)))]
            ids = torch.tensor([prompt], device=self.device)
            out = self.model.generate(
                ids, max_new_tokens=max_tokens, do_sample=False, pad_token_id=self.tokenizer.pad_token_id
            )
            return self.tokenizer.decode(out[0, len(prompt) :], skip_special_tokens=True).strip()

    @torch.no_grad()
    def _choice_logps(self, prompt: list[int], choices: list[str]) -> torch.Tensor:
        """Σ log p(choice tokens | prompt) for each choice, in two forwards: the prompt with the
        choices' common prefix ("Rating: [["), then every choice's remaining tokens as one batch
        continuing from that key/value cache (repeated per choice). Scoring each choice alone from a
        copy of the cache cost ten forwards and ten cache copies per judgment (~2x slower on CPU)."""
        tokens = [self.tokenizer(choice, add_special_tokens=False)["input_ids"] for choice in choices]
        common = 0
        while all(len(t) > common + 1 for t in tokens) and len({t[common] for t in tokens}) == 1:
            common += 1
        ids = torch.tensor([prompt + tokens[0][:common]], device=self.device)
        out = self.model(input_ids=ids, use_cache=True, logits_to_keep=common + 1)
        logp = torch.log_softmax(out.logits[0].float(), dim=-1)  # positions predicting prefix[0..], then rest[0]
        prefix = sum((logp[k, tokens[0][k]] for k in range(common)), torch.tensor(0.0))
        first = logp[common]
        rests = [t[common:] for t in tokens]
        scores = torch.stack([prefix + first[rest[0]] for rest in rests])
        width = max(len(rest) for rest in rests) - 1
        if width == 0:
            return scores
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        batch = torch.tensor([rest[:-1] + [pad] * (width - len(rest) + 1) for rest in rests], device=self.device)
        mask = torch.tensor(
            [[1] * ids.shape[1] + [1] * (len(rest) - 1) + [0] * (width - len(rest) + 1) for rest in rests],
            device=self.device,
        )
        cache = out.past_key_values
        cache.batch_repeat_interleave(len(rests))
        logits = self.model(input_ids=batch, attention_mask=mask, past_key_values=cache, use_cache=True).logits
        steps = torch.log_softmax(logits.float(), dim=-1)
        for i, rest in enumerate(rests):
            for k in range(1, len(rest)):
                scores[i] = scores[i] + steps[i, k - 1, rest[k]]
        return scores
