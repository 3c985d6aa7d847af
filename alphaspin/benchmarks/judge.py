"""MT-Bench-style judged chat: two-turn questions, answers from the policy, 1-10 grades from a judge LLM.

The paper (arXiv 2404.04291, §5, figures 2-6) reports MT-Bench scores per category for each iteration.
MT-Bench (Zheng et al., 2023) grades every turn of an 80-question, 8-category, two-turn benchmark with
a strong LLM ("single-answer grading"), the judge ending with ``Rating: [[N]]``; for math,
reasoning and coding the judge also sees a reference answer. This module follows that protocol with
its own small question set (``data/chat_questions.jsonl``, three original questions per category)
and its own prompt wording (``PROMPT_VERSION``); MT-Bench's own questions, prompts and parser are
`alphaspin.benchmarks.mt_bench` (``judge.questions: mt_bench``), through the same client and
``judge_answers``. The judge is any OpenAI-compatible ``/v1/chat/completions`` endpoint (OpenAI,
vLLM, llama.cpp server, ...).

Scores: a question's score is the mean of its two turn ratings; a category's score is the mean of
its questions' scores (equal to MT-Bench's mean over turn ratings, since every question has two
turns). The 95% confidence interval is a Student-t interval over question scores,
``mean ± t_{0.975, n-1} · s / √n``: the questions are the independent units (the two turns of a
question are not independent), and with three questions a category the t quantile (4.30 at n = 3)
honestly shows how wide that is.

Nothing is returned partially: a turn the judge cannot grade after its retries raises ``JudgeError``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import httpx

logger = logging.getLogger(__name__)

CATEGORIES = ("writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities")
"""MT-Bench's eight categories, in the order its radar charts use."""
REFERENCE_CATEGORIES = frozenset({"reasoning", "math", "coding"})
"""Categories graded against a reference answer (as in MT-Bench)."""
PROMPT_VERSION = "alphaspin-single-v1"
CI_METHOD = "student-t 95% over question scores"
UNPARSED_RATING = -1.0
"""MT-Bench's rating of a judgment that does not parse (FastChat); never produced by `parse_rating`."""

Chat = list[dict[str, str]]


class JudgeError(RuntimeError):
    """The judge could not grade an answer (endpoint down, HTTP errors, or malformed judgments)."""


class JudgmentParseError(ValueError):
    """A judgment without exactly one valid ``Rating: [[N]]`` (N from 1 to 10)."""


@dataclass(frozen=True)
class ChatQuestion:
    question_id: str
    category: str
    turns: list[str]
    reference: list[str] | None = None


@dataclass(frozen=True)
class ChatAnswer:
    question_id: str
    category: str
    turns: list[str]
    answers: list[str]


@dataclass(frozen=True)
class QuestionScore:
    """The judge's grades of one answered question."""

    question_id: str
    category: str
    turn_scores: list[float]
    judgments: list[str]
    attempts: list[int]
    judge_model: str
    judge_temperature: float
    prompt_version: str = PROMPT_VERSION

    @property
    def score(self) -> float | None:
        """Mean of the turn ratings; MT-Bench's failed ratings (`UNPARSED_RATING`) left out (None if all failed)."""
        valid = [s for s in self.turn_scores if s != UNPARSED_RATING]
        return sum(valid) / len(valid) if valid else None


# ---------------------------------------------------------------------------------------------
# Questions and answers


def load_questions(
    path: str | Path | None = None,
    *,
    categories: Iterable[str] | None = None,
    per_category: int | None = None,
) -> list[ChatQuestion]:
    """Read two-turn questions from a JSONL file (default: the bundled ``data/chat_questions.jsonl``).

    Each line: ``{"question_id", "category", "turns": [str, ...], "reference": [str, ...]?}``.
    ``categories`` and ``per_category`` select a subset (the first questions of each category).
    """
    if path is None:
        text = resources.files("alphaspin.benchmarks").joinpath("data/chat_questions.jsonl").read_text("utf-8")
        source = "alphaspin/benchmarks/data/chat_questions.jsonl"
    else:
        text, source = Path(path).read_text("utf-8"), str(path)
    wanted = set(categories) if categories is not None else None
    questions: list[ChatQuestion] = []
    seen: set[str] = set()
    taken: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            question = ChatQuestion(
                question_id=str(row["question_id"]),
                category=str(row["category"]),
                turns=[str(turn) for turn in row["turns"]],
                reference=[str(ref) for ref in row["reference"]] if row.get("reference") else None,
            )
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ValueError(f"{source}:{number}: not a chat question ({error})") from error
        if not question.turns or (question.reference is not None and len(question.reference) != len(question.turns)):
            raise ValueError(f"{source}:{number}: expected ≥ 1 turn and one reference per turn")
        if question.question_id in seen:
            raise ValueError(f"{source}:{number}: duplicate question_id {question.question_id!r}")
        seen.add(question.question_id)
        if wanted is not None and question.category not in wanted:
            continue
        if per_category is not None and taken.get(question.category, 0) >= per_category:
            continue
        taken[question.category] = taken.get(question.category, 0) + 1
        questions.append(question)
    return questions


def answer_questions(
    generate: Callable[[list[Chat]], list[str]],
    questions: Sequence[ChatQuestion],
    *,
    system_prompt: str | None = None,
) -> list[ChatAnswer]:
    """Answer every question turn by turn: one ``generate`` call per turn, over all questions at once.

    ``generate`` receives chats (lists of ``{"role", "content"}``: the optional system prompt, the
    earlier turns with the policy's own earlier answers, and the new user turn) and returns one
    assistant reply per chat, in order.
    """
    chats: list[Chat] = [[{"role": "system", "content": system_prompt}] if system_prompt else [] for _ in questions]
    answers: list[list[str]] = [[] for _ in questions]
    for turn in range(max((len(q.turns) for q in questions), default=0)):
        active = [i for i, question in enumerate(questions) if turn < len(question.turns)]
        for i in active:
            chats[i].append({"role": "user", "content": questions[i].turns[turn]})
        replies = generate([[dict(message) for message in chats[i]] for i in active])
        if len(replies) != len(active) or not all(isinstance(reply, str) for reply in replies):
            raise ValueError(f"generate: expected {len(active)} strings for turn {turn + 1}, got {replies!r:.200}")
        for i, reply in zip(active, replies, strict=True):
            chats[i].append({"role": "assistant", "content": reply})
            answers[i].append(reply)
    return [
        ChatAnswer(question_id=q.question_id, category=q.category, turns=list(q.turns), answers=a)
        for q, a in zip(questions, answers, strict=True)
    ]


# ---------------------------------------------------------------------------------------------
# Judge prompt and parsing

JUDGE_SYSTEM_PROMPT = "You are a careful and impartial judge of the answers of AI assistants."

_CRITERIA = (
    "Judge helpfulness, relevance, accuracy, depth, creativity and level of detail. Do not let the length "
    "of the answer sway you, and be as objective as possible."
)
_REFERENCE_CRITERIA = (
    "A reference answer is given: compare the assistant's answer with it, point out any mistakes, and "
    "weigh correctness above everything else."
)
_FORMAT = (
    "First explain your assessment in a few sentences. Then, on the last line, give a score from 1 (worst) to "
    '10 (best) in exactly this format: "Rating: [[5]]".'
)


def build_judge_messages(question: ChatQuestion, answer: ChatAnswer, turn: int) -> Chat:
    """Single-answer grading prompt for ``turn`` (0-based) of an answered question.

    Turn 0 shows the question and the answer; later turns show the whole conversation so far and
    ask for a grade of the last answer only. Reference categories add the reference answer(s).
    """
    use_reference = question.category in REFERENCE_CATEGORIES and question.reference is not None
    parts = [
        f"Grade the assistant's {'answer' if turn == 0 else 'last answer'} in the conversation below.",
        _CRITERIA,
    ]
    if use_reference:
        parts.append(_REFERENCE_CRITERIA)
    parts.append(_FORMAT)
    conversation = []
    for k in range(turn + 1):
        conversation.append(f"### User\n{answer.turns[k]}\n\n### Assistant\n{answer.answers[k]}")
    body = "\n\n".join(conversation)
    text = "\n".join(parts) + f"\n\n<|The Start of the Conversation|>\n{body}\n<|The End of the Conversation|>"
    if use_reference:
        assert question.reference is not None
        text += f"\n\n<|The Start of the Reference Answer|>\n{question.reference[turn]}\n<|The End of the Reference Answer|>"
    return [{"role": "system", "content": JUDGE_SYSTEM_PROMPT}, {"role": "user", "content": text}]


_RATING = re.compile(r"\[\[\s*([0-9]+(?:\.[0-9]+)?)\s*\]\]")


def parse_rating(text: str) -> float:
    """The score N of ``Rating: [[N]]`` in a judgment (N from 1 to 10, decimals allowed).

    Raises ``JudgmentParseError`` when there is no ``[[N]]``, when several disagree, or when N is
    out of range. (A number without the double brackets is not accepted: judges that drift from the
    format are retried rather than guessed at.)
    """
    if not isinstance(text, str):
        raise JudgmentParseError(f"judgment is not text: {text!r:.100}")
    found = {float(match) for match in _RATING.findall(text)}
    if not found:
        raise JudgmentParseError(f"no 'Rating: [[N]]' in judgment: {text[-200:]!r}")
    if len(found) > 1:
        raise JudgmentParseError(f"conflicting ratings {sorted(found)} in judgment: {text[-200:]!r}")
    rating = found.pop()
    if not 1.0 <= rating <= 10.0:
        raise JudgmentParseError(f"rating {rating} outside 1-10 in judgment: {text[-200:]!r}")
    return rating


# ---------------------------------------------------------------------------------------------
# Client


class JudgeClient:
    """An OpenAI-compatible chat-completions judge over httpx.

    ``base_url`` is the server root (``http://127.0.0.1:8000``) or its ``/v1`` URL
    (``https://api.openai.com/v1``). The API key is read from the environment variable named by
    ``api_key_env`` at construction (never from config); without it no Authorization header is sent
    (local servers). Attempts per judgment = 1 + ``max_retries``; connection errors, timeouts, HTTP
    429/5xx, unreadable responses and malformed judgments are retried with exponential backoff,
    other HTTP errors (401, 404, ...) fail at once.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str | None = "OPENAI_API_KEY",
        temperature: float = 0.0,
        max_retries: int = 3,
        timeout: float = 120.0,
        *,
        max_tokens: int = 1024,
        retry_backoff_s: float = 1.0,
        extra_body: Mapping[str, Any] | None = None,
    ) -> None:
        if max_retries < 0:
            raise ValueError(f"max_retries: expected ≥ 0, got {max_retries}")
        root = base_url.rstrip("/")
        self.endpoint = root + ("/chat/completions" if root.endswith("/v1") else "/v1/chat/completions")
        self.model = model
        self.temperature = temperature
        self.max_retries = max_retries
        self.max_tokens = max_tokens
        self.retry_backoff_s = retry_backoff_s
        self.api_key_env = api_key_env
        # Server-specific request fields, e.g. {"guided_choice": [...]} for vLLM or the local judge.
        self.extra_body = dict(extra_body or {})
        headers = {"Content-Type": "application/json"}
        api_key = os.environ.get(api_key_env) if api_key_env else None
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self._http = httpx.Client(timeout=timeout, headers=headers)

    def __enter__(self) -> JudgeClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def complete(self, messages: Chat) -> str:
        """One chat completion; raises ``_RetryableError`` or ``JudgeError``."""
        payload = {
            "model": self.model,
            "messages": messages,
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
            **self.extra_body,
        }
        try:
            response = self._http.post(self.endpoint, json=payload)
        except httpx.TransportError as error:  # connection refused, timeouts, broken connections
            raise _RetryableError(f"{type(error).__name__}: {error}") from error
        if response.status_code == 429 or response.status_code >= 500:
            raise _RetryableError(f"HTTP {response.status_code}: {response.text[:200]}")
        if response.status_code >= 400:
            hint = ""
            if response.status_code in (401, 403) and self.api_key_env and not os.environ.get(self.api_key_env):
                hint = f" (the environment variable {self.api_key_env} is not set)"
            raise JudgeError(
                f"judge endpoint {self.endpoint} (model {self.model!r}) refused the request: "
                f"HTTP {response.status_code}{hint}: {response.text[:300]}"
            )
        try:
            content = response.json()["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError) as error:
            raise _RetryableError(f"unreadable response {response.text[:200]!r}") from error
        if not isinstance(content, str):
            raise _RetryableError(f"response without text content: {content!r:.200}")
        return content

    def judge(
        self,
        messages: Chat,
        *,
        label: str = "",
        parse: Callable[[str], float] | None = None,
        unparsed: float | None = None,
    ) -> tuple[float, str, int]:
        """Grade one prompt: ``(rating, judgment text, attempts used)``, retrying as documented.

        ``parse`` reads the rating (default `parse_rating`; raises ``JudgmentParseError``). With
        ``unparsed`` set (MT-Bench's -1), a judgment that still does not parse after the retries
        gives ``(unparsed, its text, attempts)`` instead of raising; endpoint errors still raise."""
        parse = parse or parse_rating
        errors: list[str] = []
        last_unparsed: str | None = None
        for attempt in range(1, self.max_retries + 2):
            if attempt > 1 and self.retry_backoff_s > 0:
                time.sleep(self.retry_backoff_s * 2 ** (attempt - 2))
            try:
                text = self.complete(messages)
                return parse(text), text, attempt
            except JudgmentParseError as error:
                last_unparsed = text
                errors.append(f"attempt {attempt}: {error}")
                logger.warning("judge %s %s: %s", self.endpoint, label, error)
            except _RetryableError as error:
                last_unparsed = None
                errors.append(f"attempt {attempt}: {error}")
                logger.warning("judge %s %s: %s", self.endpoint, label, error)
        if unparsed is not None and last_unparsed is not None:
            logger.warning(
                "judge %s %s: no rating after %d attempts; scored %s", self.endpoint, label, attempt, unparsed
            )
            return unparsed, last_unparsed, attempt
        raise JudgeError(
            f"judge endpoint {self.endpoint} (model {self.model!r}) could not grade {label or 'an answer'} "
            f"after {self.max_retries + 1} attempts: " + "; ".join(errors)
        )


class _RetryableError(Exception):
    pass


# ---------------------------------------------------------------------------------------------
# Judging and aggregation


def judge_answers(
    client: JudgeClient,
    questions: Sequence[ChatQuestion],
    answers: Sequence[ChatAnswer],
    *,
    concurrency: int = 4,
    build_messages: Callable[[ChatQuestion, ChatAnswer, int], Chat] = build_judge_messages,
    parse: Callable[[str], float] | None = None,
    unparsed: float | None = None,
    prompt_version: str = PROMPT_VERSION,
) -> list[QuestionScore]:
    """Grade every turn of every answer; one ``QuestionScore`` per answer, in the order of ``answers``.

    Raises ``JudgeError`` if any turn cannot be graded (no partial results) and ``ValueError`` if an
    answer has no matching question or a different number of turns. ``build_messages``, ``parse``,
    ``unparsed`` and ``prompt_version`` select another protocol (MT-Bench's own: `alphaspin.benchmarks.mt_bench`).
    """
    by_id = {question.question_id: question for question in questions}
    jobs: list[tuple[int, int, Chat, str]] = []
    for index, answer in enumerate(answers):
        question = by_id.get(answer.question_id)
        if question is None:
            raise ValueError(f"answers: no question with id {answer.question_id!r}")
        if len(answer.answers) != len(question.turns):
            raise ValueError(
                f"answers: {answer.question_id!r} has {len(answer.answers)} answers for {len(question.turns)} turns"
            )
        for turn in range(len(question.turns)):
            label = f"question {answer.question_id!r} turn {turn + 1}"
            jobs.append((index, turn, build_messages(question, answer, turn), label))

    def run(job: tuple[int, int, Chat, str]) -> tuple[float, str, int]:
        return client.judge(job[2], label=job[3], parse=parse, unparsed=unparsed)

    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        futures = [pool.submit(run, job) for job in jobs]
        try:
            results = [future.result() for future in futures]
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)  # don't keep grading once the result is lost
            raise

    graded: dict[int, dict[int, tuple[float, str, int]]] = {}
    for (index, turn, _, _), result in zip(jobs, results, strict=True):
        graded.setdefault(index, {})[turn] = result
    scores = []
    for index, answer in enumerate(answers):
        turns = [graded[index][turn] for turn in sorted(graded[index])]
        scores.append(
            QuestionScore(
                question_id=answer.question_id,
                category=answer.category,
                turn_scores=[rating for rating, _, _ in turns],
                judgments=[text for _, text, _ in turns],
                attempts=[attempts for _, _, attempts in turns],
                judge_model=client.model,
                judge_temperature=client.temperature,
                prompt_version=prompt_version,
            )
        )
    return scores


def mean_confidence_interval(values: Sequence[float], confidence: float = 0.95) -> dict[str, float | int | None]:
    """``{"mean", "stderr", "ci_low", "ci_high", "n"}``: Student-t interval ``mean ± t·s/√n``.

    ``s`` is the sample standard deviation (n - 1); with one value the stderr and interval are None.
    """
    n = len(values)
    if n == 0:
        raise ValueError("mean_confidence_interval: no values")
    mean = sum(values) / n
    if n == 1:
        return {"mean": mean, "stderr": None, "ci_low": None, "ci_high": None, "n": 1}
    from scipy.stats import t as student_t  # scipy comes with lm-eval (via scikit-learn)

    stderr = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) / math.sqrt(n)
    half_width = float(student_t.ppf(0.5 + confidence / 2, df=n - 1)) * stderr
    return {"mean": mean, "stderr": stderr, "ci_low": mean - half_width, "ci_high": mean + half_width, "n": n}


def aggregate(scores: Sequence[QuestionScore]) -> dict[str, Any]:
    """Per-category and overall mean question score with a 95% Student-t CI (see module docstring).

    Returns ``{"categories": {category: {mean, stderr, ci_low, ci_high, n}}, "overall": {...},
    "ci_method": ..., "judge": {"model", "temperature", "prompt_version"}}``; categories follow
    ``CATEGORIES`` order, then any others alphabetically.
    """
    if not scores:
        raise ValueError("aggregate: no scores")
    judges = {(s.judge_model, s.judge_temperature, s.prompt_version) for s in scores}
    if len(judges) > 1:
        raise ValueError(f"aggregate: scores come from different judges {sorted(judges)}")
    model, temperature, prompt_version = judges.pop()
    by_category: dict[str, list[float]] = {}
    for score in scores:
        by_category.setdefault(score.category, []).append(score.score)
    order = [c for c in CATEGORIES if c in by_category] + sorted(set(by_category) - set(CATEGORIES))
    return {
        "categories": {category: mean_confidence_interval(by_category[category]) for category in order},
        "overall": mean_confidence_interval([score.score for score in scores]),
        "ci_method": CI_METHOD,
        "judge": {"model": model, "temperature": temperature, "prompt_version": prompt_version},
    }


def judge_metrics(aggregated: Mapping[str, Any], prefix: str = "judge") -> dict[str, float]:
    """Flat metrics for the report: ``judge/<category>``, ``judge/overall`` and their ``_stderr``,
    ``_ci_low``, ``_ci_high`` companions (None values left out)."""
    flat: dict[str, float] = {}
    entries = {**aggregated["categories"], "overall": aggregated["overall"]}
    for name, stats in entries.items():
        key = f"{prefix}/{name}"
        flat[key] = stats["mean"]
        for suffix in ("stderr", "ci_low", "ci_high"):
            if stats.get(suffix) is not None:
                flat[f"{key}_{suffix}"] = stats[suffix]
    return flat


def save_judgments(
    out_dir: str | Path,
    answers: Sequence[ChatAnswer],
    scores: Sequence[QuestionScore],
    aggregated: Mapping[str, Any] | None = None,
) -> dict[str, str]:
    """Write ``answers.jsonl``, ``judgments.jsonl`` and ``judge_summary.json`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"answers": out / "answers.jsonl", "judgments": out / "judgments.jsonl"}
    paths["answers"].write_text("".join(json.dumps(asdict(a), ensure_ascii=False) + "\n" for a in answers))
    paths["judgments"].write_text(
        "".join(json.dumps({**asdict(s), "score": s.score}, ensure_ascii=False) + "\n" for s in scores)
    )
    if aggregated is not None:
        paths["summary"] = out / "judge_summary.json"
        paths["summary"].write_text(json.dumps(aggregated, indent=2, allow_nan=False) + "\n")
    return {name: str(path) for name, path in paths.items()}


__all__ = [
    "CATEGORIES",
    "CI_METHOD",
    "PROMPT_VERSION",
    "ChatAnswer",
    "ChatQuestion",
    "JudgeClient",
    "JudgeError",
    "JudgmentParseError",
    "QuestionScore",
    "aggregate",
    "answer_questions",
    "build_judge_messages",
    "judge_answers",
    "judge_metrics",
    "load_questions",
    "mean_confidence_interval",
    "parse_rating",
    "save_judgments",
]
