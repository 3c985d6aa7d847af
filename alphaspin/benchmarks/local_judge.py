"""A small OpenAI-compatible chat-completions server over a local transformers model, so the
judged chat runs offline on a CPU (the quickstart's judge).

It serves ``POST /v1/chat/completions``. With ``guided_choice`` (the request field vLLM's OpenAI
server also accepts) the reply is the choice of highest log-likelihood after the chat-template
prompt — a 135M model cannot be trusted to write "Rating: [[N]]" on its own, but it can rank the
ten possible ratings. Without it, the reply is a greedy generation. This is a stand-in for a real
judge (a large model behind vLLM or a hosted API); its scores say little about quality.
"""

from __future__ import annotations

import copy
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
        """Σ log p(choice tokens | prompt) for each choice. The prompt runs once; each choice then
        continues from a copy of its key/value cache (the prompt is ~100x longer than a choice)."""
        ids = torch.tensor([prompt], device=self.device)
        out = self.model(input_ids=ids, use_cache=True, logits_to_keep=1)  # only the last position's logits
        first = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
        scores = []
        for choice in choices:
            tokens = self.tokenizer(choice, add_special_tokens=False)["input_ids"]
            total = first[tokens[0]]
            if len(tokens) > 1:
                cache = copy.deepcopy(out.past_key_values)
                rest = (
                    self.model(
                        input_ids=torch.tensor([tokens[:-1]], device=self.device), past_key_values=cache, use_cache=True
                    )
                    .logits[0]
                    .float()
                )
                logp = torch.log_softmax(rest, dim=-1)
                total = total + logp[torch.arange(len(tokens) - 1), torch.tensor(tokens[1:])].sum()
            scores.append(total)
        return torch.stack(scores)
