"""Every bad data file gets one line: the file, the line or row, and what was expected — no
traceback, nothing written (through the library and through the CLI, with and without Prefect)."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from alphaspin.config import DataConfig
from alphaspin.data import DataError, load_sft
from alphaspin.flows.cli import main

GOOD = [{"prompt": f"question {i}?", "answer": f"answer {i}."} for i in range(20)]


def _jsonl(rows) -> str:
    return "\n".join(json.dumps(r) for r in rows) + "\n"


CASES = {
    "broken.jsonl": (_jsonl(GOOD[:3]) + '{"prompt": "q", "answer": \n', r"broken\.jsonl line 4: not valid JSON"),
    "array-line.jsonl": (_jsonl(GOOD[:2]) + "[1, 2]\n", r"array-line\.jsonl line 3: expected a JSON object, got list"),
    "empty.jsonl": ("", r"empty\.jsonl is empty"),
    "blank.jsonl": ("\n\n", r"blank\.jsonl is empty; expected one JSON object per line"),
    "broken.json": ('[{"prompt": "q",\n "answer": }]', r"broken\.json line 2: not valid JSON"),
    "scalar.json": ("42", r"scalar\.json: expected a JSON array of objects or an object of columns, got int"),
    "numbers.jsonl": (
        _jsonl([*GOOD[:5], {"prompt": 7, "answer": "a"}, *GOOD[5:]]),
        r"data\.prompt_column: .*numbers\.jsonl line 6: column 'prompt' holds int '7'; expected text",
    ),
    "lists.json": (
        json.dumps([*GOOD[:2], {"prompt": "q", "answer": ["a", "b"]}]),
        r"data\.answer_column: .*lists\.json row 2: column 'answer' holds list",
    ),
    "empty.csv": ("", r"empty\.csv is empty"),
    "header-only.csv": ("prompt,answer\n", r"header-only\.csv has a header but no data rows"),
    "ragged.csv": ('prompt,answer\n"q1","a1"\n"q2","a2","extra","more"\n', r"ragged\.csv: not valid CSV \(.*line 3"),
    "broken.parquet": ("this is not parquet", r"broken\.parquet: not a valid parquet file"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_bad_file_is_one_line_naming_the_file_and_where(tmp_path, name):
    text, message = CASES[name]
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(DataError, match=message) as caught:
        load_sft(DataConfig(source=str(path), heldout_size=2))
    assert "\n" not in str(caught.value)


def test_messages_that_are_not_a_list_of_messages_name_the_row(tmp_path):
    path = tmp_path / "chats.jsonl"
    rows = [
        {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
        for i in range(5)
    ]
    rows.insert(3, {"messages": "hello"})
    path.write_text(_jsonl(rows))
    with pytest.raises(
        DataError, match=r"data\.messages_column: .*chats\.jsonl line 4: column 'messages' must be a list"
    ):
        load_sft(DataConfig(source=str(path), messages_column="messages", heldout_size=2))


def test_a_parquet_with_a_wrong_type_names_the_row(tmp_path):
    path = tmp_path / "sft.parquet"
    pd.DataFrame({"prompt": [f"q{i}" for i in range(10)], "answer": list(range(10))}).to_parquet(path)
    with pytest.raises(DataError, match=r"sft\.parquet row 0: column 'answer' holds int"):
        load_sft(DataConfig(source=str(path), heldout_size=2))


@pytest.mark.parametrize("prefect", [False, True])
def test_the_cli_prints_one_line_and_writes_nothing(tmp_path, capsys, tiny_model, prefect):
    path = tmp_path / "broken.jsonl"
    path.write_text(_jsonl(GOOD[:3]) + "{not json}\n")
    runs = tmp_path / "runs"
    args = [
        "run",
        "-c",
        "configs/quickstart.yaml",
        "--set",
        f"data.source={path}",
        "--set",
        f"run.runs_root={runs}",
        "--set",
        f"model.name_or_path={tiny_model}",
    ]
    code = main(args if prefect else [*args, "--no-prefect"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip() == f"alphaspin: error: data.source: {path} line 4: not valid JSON " + (
        "(Expecting property name enclosed in double quotes at column 2); expected one JSON object per line"
    )
    assert not runs.exists()
