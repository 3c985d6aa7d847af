"""MT-Bench-style judging against a real OpenAI-compatible HTTP server on 127.0.0.1 that returns
canned judgments; scores and category statistics checked against hand-worked numbers."""

from __future__ import annotations

import json
import math
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from alphaspin.benchmarks.judge import (
    CATEGORIES,
    PROMPT_VERSION,
    ChatAnswer,
    JudgeClient,
    JudgeError,
    JudgmentParseError,
    aggregate,
    answer_questions,
    build_judge_messages,
    judge_answers,
    judge_metrics,
    load_questions,
    mean_confidence_interval,
    parse_rating,
    save_judgments,
)

T_975_DF1 = 12.706204736174707  # Student-t 97.5% quantiles (tables)
T_975_DF3 = 3.182446305284263


# ---------------------------------------------------------------------------------------------
# Questions and parsing


def test_bundled_questions_cover_the_eight_categories_with_two_turns():
    questions = load_questions()
    per_category = {c: [q for q in questions if q.category == c] for c in CATEGORIES}
    assert set(q.category for q in questions) == set(CATEGORIES)
    assert all(len(qs) >= 2 for qs in per_category.values())
    assert all(len(q.turns) == 2 for q in questions)
    for category in ("math", "reasoning", "coding"):
        assert all(q.reference is not None and len(q.reference) == 2 for q in per_category[category])
    subset = load_questions(categories=["math", "writing"], per_category=1)
    assert [q.question_id for q in subset] == ["writing-1", "math-1"]


def test_load_questions_names_the_bad_line(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text('{"question_id": "a", "category": "math", "turns": ["x"]}\n{"question_id": "a"}\n')
    with pytest.raises(ValueError, match=r"q.jsonl:2"):
        load_questions(path)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Good answer.\nRating: [[8]]", 8.0),
        ("Rating: [[ 7.5 ]]", 7.5),
        ("Mostly right [[3]] ... Rating: [[3]]", 3.0),
        ("[[10]]", 10.0),
    ],
)
def test_parse_rating(text, expected):
    assert parse_rating(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("I would give it a seven.", "no 'Rating"),
        ("Rating: 7", "no 'Rating"),
        ("Rating: [[N]]", "no 'Rating"),
        ("Rating: [[0]]", "outside 1-10"),
        ("Rating: [[11]]", "outside 1-10"),
        ("first [[4]] then Rating: [[6]]", "conflicting"),
    ],
)
def test_parse_rating_rejects_malformed_judgments(text, message):
    with pytest.raises(JudgmentParseError, match=message):
        parse_rating(text)


def test_answer_questions_runs_turn_by_turn_with_the_policy_own_history():
    questions = load_questions(categories=["writing", "math"], per_category=2)
    calls: list[list[list[dict]]] = []

    def generate(chats):
        calls.append(chats)
        return [f"answer {len(calls)}.{i}" for i in range(len(chats))]

    answers = answer_questions(generate, questions, system_prompt="Be brief.")
    assert len(calls) == 2 and all(len(batch) == 4 for batch in calls)  # one batched call per turn
    second = calls[1][2]
    assert [m["role"] for m in second] == ["system", "user", "assistant", "user"]
    assert second[2]["content"] == "answer 1.2" and second[3]["content"] == questions[2].turns[1]
    assert answers[2] == ChatAnswer(questions[2].question_id, "math", questions[2].turns, ["answer 1.2", "answer 2.2"])

    with pytest.raises(ValueError, match="expected 4 strings"):
        answer_questions(lambda chats: ["only one"], questions)


def test_judge_prompt_uses_reference_only_for_reference_categories():
    questions = {q.question_id: q for q in load_questions()}
    math_q, writing_q = questions["math-1"], questions["writing-1"]
    math_a = ChatAnswer("math-1", "math", math_q.turns, ["A1", "A2"])
    first = build_judge_messages(math_q, math_a, 0)[1]["content"]
    second = build_judge_messages(math_q, math_a, 1)[1]["content"]
    assert math_q.reference[0] in first and math_q.reference[1] in second and math_q.reference[1] not in first
    assert "A1" in second and "A2" in second and math_q.turns[1] in second  # turn 2 sees the whole conversation
    writing = build_judge_messages(writing_q, ChatAnswer("writing-1", "writing", writing_q.turns, ["W1", "W2"]), 0)
    assert "Reference Answer" not in writing[1]["content"]
    assert "Rating: [[5]]" in first  # the format the judge must use


# ---------------------------------------------------------------------------------------------
# A local OpenAI-compatible judge


class CannedJudge:
    """Grades the last assistant answer in the prompt: the answer carries ``score=N``; ``malformed``
    answers get one unparseable judgment first, ``flaky`` answers one HTTP 500 first."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        self.seen: dict[str, int] = {}
        self.lock = threading.Lock()

    def reply(self, body: dict) -> tuple[int, dict]:
        prompt = body["messages"][-1]["content"]
        last_answer = prompt.rsplit("### Assistant\n", 1)[1].split("<|The End of the Conversation|>")[0]
        with self.lock:
            self.seen[last_answer] = self.seen.get(last_answer, 0) + 1
            first_time = self.seen[last_answer] == 1
        if "flaky" in last_answer and first_time:
            return 500, {"error": {"message": "overloaded"}}
        if "always-malformed" in last_answer or ("malformed" in last_answer and first_time):
            return 200, _completion("The answer is decent, I would say seven out of ten.")
        if "unauthorized" in last_answer:
            return 401, {"error": {"message": "bad key"}}
        score = re.search(r"score=(\d+)", last_answer).group(1)
        return 200, _completion(f"The answer is judged.\nRating: [[{score}]]")


def _completion(text: str) -> dict:
    return {
        "id": "x",
        "object": "chat.completion",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}}],
    }


@pytest.fixture
def judge_server():
    canned = CannedJudge()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 (http.server's naming)
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with canned.lock:
                canned.requests.append({"path": self.path, **body})
                canned.headers.append(dict(self.headers))
            status, payload = canned.reply(body)
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", canned
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


# Turn answers and the ratings the canned judge gives them. Question scores (mean of 2 turns):
# writing-1 (8+6)/2 = 7, writing-2 (9+7)/2 = 8, math-1 (4+2)/2 = 3, math-2 (5+5)/2 = 5.
ANSWERS = {
    "writing-1": ["score=8", "score=6"],
    "writing-2": ["score=9", "score=7"],
    "math-1": ["score=4 malformed", "score=2"],
    "math-2": ["score=5", "score=5 flaky"],
}


def _answers(questions, table=ANSWERS):
    return answer_questions(lambda chats: [table[_qid(questions, chat)][len(chat) // 2] for chat in chats], questions)


def _qid(questions, chat):
    return next(q.question_id for q in questions if q.turns[0] == chat[0]["content"])


def test_judge_scores_and_category_statistics_by_hand(judge_server, monkeypatch, tmp_path):
    url, canned = judge_server
    monkeypatch.setenv("ALPHASPIN_TEST_JUDGE_KEY", "sk-test")
    questions = load_questions(categories=["writing", "math"], per_category=2)
    answers = _answers(questions)

    with JudgeClient(url, "judge-model", api_key_env="ALPHASPIN_TEST_JUDGE_KEY", retry_backoff_s=0) as client:
        scores = judge_answers(client, questions, answers, concurrency=3)

    assert [(s.question_id, s.turn_scores, s.score) for s in scores] == [
        ("writing-1", [8.0, 6.0], 7.0),
        ("writing-2", [9.0, 7.0], 8.0),
        ("math-1", [4.0, 2.0], 3.0),
        ("math-2", [5.0, 5.0], 5.0),
    ]
    # The malformed judgment and the HTTP 500 were each retried once: 8 turns, 10 requests.
    assert [s.attempts for s in scores] == [[1, 1], [1, 1], [2, 1], [1, 2]]
    assert len(canned.requests) == 10
    assert {r["path"] for r in canned.requests} == {"/v1/chat/completions"}
    assert {(r["model"], r["temperature"]) for r in canned.requests} == {("judge-model", 0.0)}
    assert {h["Authorization"] for h in canned.headers} == {"Bearer sk-test"}
    assert all(s.judge_model == "judge-model" and s.judge_temperature == 0.0 for s in scores)

    result = aggregate(scores)
    # writing: mean 7.5, s = sqrt(((7-7.5)² + (8-7.5)²)/1) = 0.7071, se = s/√2 = 0.5, ± t(1)·0.5
    writing = result["categories"]["writing"]
    assert writing["mean"] == pytest.approx(7.5) and writing["stderr"] == pytest.approx(0.5) and writing["n"] == 2
    assert (writing["ci_low"], writing["ci_high"]) == pytest.approx((7.5 - T_975_DF1 * 0.5, 7.5 + T_975_DF1 * 0.5))
    # math: mean 4, s = sqrt(2), se = 1
    math_ = result["categories"]["math"]
    assert (math_["mean"], math_["stderr"]) == pytest.approx((4.0, 1.0))
    assert math_["ci_high"] == pytest.approx(4.0 + T_975_DF1)
    # overall over the 4 questions: mean 5.75, s² = (1.25² + 2.25² + 2.75² + 0.75²)/3 = 14.75/3, se = s/2
    se = math.sqrt(14.75 / 3) / 2
    overall = result["overall"]
    assert (overall["mean"], overall["stderr"], overall["n"]) == pytest.approx((5.75, se, 4))
    assert overall["ci_low"] == pytest.approx(5.75 - T_975_DF3 * se)
    assert list(result["categories"]) == ["writing", "math"]  # MT-Bench order
    assert result["judge"] == {"model": "judge-model", "temperature": 0.0, "prompt_version": PROMPT_VERSION}

    flat = judge_metrics(result)
    assert flat["judge/writing"] == 7.5 and flat["judge/overall"] == 5.75
    assert flat["judge/math_stderr"] == pytest.approx(1.0)

    files = save_judgments(tmp_path, answers, scores, result)
    lines = [json.loads(line) for line in open(files["judgments"])]
    assert [line["score"] for line in lines] == [7.0, 8.0, 3.0, 5.0] and lines[0]["judge_model"] == "judge-model"
    assert json.loads(open(files["summary"]).read())["overall"]["mean"] == 5.75


def test_a_judgment_that_stays_malformed_raises_instead_of_dropping_the_question(judge_server):
    url, canned = judge_server
    questions = load_questions(categories=["writing"], per_category=2)
    table = {"writing-1": ["score=8", "score=6"], "writing-2": ["score=9", "always-malformed"]}
    with JudgeClient(url, "judge-model", max_retries=2, retry_backoff_s=0) as client:
        with pytest.raises(JudgeError, match=r"question 'writing-2' turn 2 after 3 attempts") as info:
            judge_answers(client, questions, _answers(questions, table), concurrency=1)
    assert url in str(info.value) and "no 'Rating" in str(info.value)


def test_client_errors_are_not_retried(judge_server, monkeypatch):
    url, canned = judge_server
    monkeypatch.delenv("ALPHASPIN_UNSET_KEY", raising=False)
    client = JudgeClient(url + "/v1", "judge-model", api_key_env="ALPHASPIN_UNSET_KEY", retry_backoff_s=0)
    messages = [{"role": "user", "content": "### Assistant\nunauthorized<|The End of the Conversation|>"}]
    with pytest.raises(JudgeError, match="HTTP 401.*ALPHASPIN_UNSET_KEY is not set"):
        client.judge(messages)
    assert len(canned.requests) == 1 and "Authorization" not in canned.headers[0]
    client.close()


def test_a_down_endpoint_raises_judge_error_naming_it():
    with socket.socket() as probe:  # a port with nothing listening
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    questions = load_questions(categories=["stem"], per_category=1)
    answers = _answers(questions, {"stem-1": ["score=7", "score=7"]})
    with JudgeClient(f"http://127.0.0.1:{port}", "judge-model", max_retries=2, timeout=2, retry_backoff_s=0) as client:
        with pytest.raises(JudgeError, match=rf"http://127.0.0.1:{port}/v1/chat/completions.*3 attempts.*ConnectError"):
            judge_answers(client, questions, answers)


def test_mean_confidence_interval_edge_cases():
    assert mean_confidence_interval([4.0]) == {"mean": 4.0, "stderr": None, "ci_low": None, "ci_high": None, "n": 1}
    assert mean_confidence_interval([3.0, 3.0, 3.0])["ci_low"] == 3.0
    with pytest.raises(ValueError):
        mean_confidence_interval([])


def test_the_local_judge_ranks_choices_by_their_exact_log_likelihood(tiny_model):
    """The batched scoring (one forward for the prompt and the choices' common prefix, one for the
    rest of every choice) equals log p(choice | prompt) from a plain forward of prompt + choice."""
    import torch

    from alphaspin.benchmarks.local_judge import RATING_CHOICES, LocalJudgeServer

    judge = LocalJudgeServer(tiny_model)
    prompt = judge._prompt_ids([{"role": "user", "content": "Rate this answer: the sky is green."}])
    choices = [*RATING_CHOICES, "No", "Rating: fine"]  # different lengths, a shorter common prefix
    scores = judge._choice_logps(prompt, choices)
    with torch.no_grad():
        for choice, score in zip(choices, scores, strict=True):
            tokens = judge.tokenizer(choice, add_special_tokens=False)["input_ids"]
            logits = judge.model(input_ids=torch.tensor([prompt + tokens])).logits[0].float()
            logp = torch.log_softmax(logits[len(prompt) - 1 : -1], dim=-1)
            expected = logp[torch.arange(len(tokens)), torch.tensor(tokens)].sum()
            assert abs(float(score) - float(expected)) < 1e-4, choice
