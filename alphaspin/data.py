"""SFT data D = {(x, y_w)}: loading, the held-out split, and per-iteration prompt sampling.

Every row gets a stable id (a hash of its prompt and answer), so which data each iteration used
is recorded by id in its ``prompts.parquet`` (the official SPIN code leaves this ambiguous).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from alphaspin.config import DataConfig, MethodConfig
from alphaspin.mixture import assign_members, opponent_members
from alphaspin.synthetic import BUILTIN_SYNTHETIC, default_task

logger = logging.getLogger(__name__)

BUILTIN_CHATTERBOT = "builtin:chatterbot"
BUILTIN_SOURCES = (BUILTIN_CHATTERBOT, BUILTIN_SYNTHETIC)  # rows come as (prompt, answer), no columns to pick


class DataError(ValueError):
    """The SFT data cannot be used; names the source and the field."""


def row_id(prompt: str, answer: str) -> str:
    return hashlib.sha256(json.dumps([prompt, answer]).encode()).hexdigest()[:16]


def _chatterbot_rows() -> pd.DataFrame:
    """(prompt, answer) pairs from consecutive turns of the English chatterbot-corpus dialogues."""
    return _chatterbot_table().copy()


@functools.lru_cache(maxsize=1)
def _chatterbot_table() -> pd.DataFrame:
    """The parsed corpus, once per process (a process that runs several stages, runs or grid cells reads
    it once); callers get a copy. libyaml's parser where PyYAML has it (its wheels do): the same
    documents in 0.03 s instead of 0.42 s, read at the start of every run and stage process."""
    import yaml

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "data.source: builtin:chatterbot needs the chatterbot-corpus package (pip install --no-deps chatterbot-corpus)"
        )
    folder = Path(spec.submodule_search_locations[0]) / "data" / "english"
    rows = []
    for path in sorted(folder.glob("*.yml")):
        document = yaml.load(path.read_text(encoding="utf-8"), Loader=loader) or {}  # a safe loader: C or pure
        for dialogue in document.get("conversations", []):
            turns = [str(turn).strip() for turn in dialogue if str(turn).strip()]
            rows.extend({"prompt": a, "answer": b} for a, b in zip(turns, turns[1:], strict=False))
    return pd.DataFrame(rows)


def _read_jsonl(path: Path) -> pd.DataFrame:
    """One JSON object per line; a bad line is named by its number (pandas would only say "Expected object")."""
    records = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(
                    f"data.source: {path} line {number}: not valid JSON ({error.msg} at column {error.colno}); "
                    "expected one JSON object per line"
                ) from None
            if not isinstance(record, dict):
                raise DataError(
                    f"data.source: {path} line {number}: expected a JSON object, got {type(record).__name__}"
                )
            records.append(record)
    if not records:
        raise DataError(f"data.source: {path} is empty; expected one JSON object per line")
    return pd.DataFrame.from_records(records)


def _read_json(path: Path) -> pd.DataFrame:
    """A JSON array of objects (or an object of equal-length columns)."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise DataError(
            f"data.source: {path} line {error.lineno}: not valid JSON ({error.msg} at column {error.colno})"
        ) from None
    if isinstance(document, list):
        bad = next((i for i, record in enumerate(document) if not isinstance(record, dict)), None)
        if bad is not None:
            raise DataError(
                f"data.source: {path} item {bad}: expected a JSON object, got {type(document[bad]).__name__}"
            )
        frame = pd.DataFrame.from_records(document)
    elif isinstance(document, dict) and all(isinstance(v, list) for v in document.values()):
        try:
            frame = pd.DataFrame(document)
        except ValueError as error:
            raise DataError(f"data.source: {path}: columns of different lengths ({error})") from None
    else:
        raise DataError(
            f"data.source: {path}: expected a JSON array of objects or an object of columns, "
            f"got {type(document).__name__}"
        )
    if frame.empty:
        raise DataError(f"data.source: {path} holds no rows")
    return frame


def _read_file(path: Path) -> pd.DataFrame:
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".json", ".parquet", ".csv"):
        raise DataError(f"data.source: {path}: unsupported file type {suffix!r} (jsonl, json, parquet, csv)")
    if path.stat().st_size == 0:
        raise DataError(f"data.source: {path} is empty")
    if suffix == ".jsonl":
        return _read_jsonl(path)
    if suffix == ".json":
        return _read_json(path)
    if suffix == ".parquet":
        import pyarrow

        try:
            return pd.read_parquet(path)
        except (pyarrow.ArrowException, OSError) as error:
            raise DataError(f"data.source: {path}: not a valid parquet file ({str(error).splitlines()[0]})") from None
    try:
        frame = pd.read_csv(path)
    except pd.errors.EmptyDataError:
        raise DataError(f"data.source: {path} is empty; expected a header row and data rows") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as error:
        raise DataError(f"data.source: {path}: not valid CSV ({str(error).strip().splitlines()[-1]})") from None
    if frame.empty:
        raise DataError(f"data.source: {path} has a header but no data rows")
    return frame


def _read_table(source: str, config: DataConfig) -> pd.DataFrame:
    path = Path(source).expanduser()
    if path.is_dir():
        import datasets

        try:
            loaded = datasets.load_from_disk(str(path))
        except FileNotFoundError:
            raise DataError(
                f"data.source: {path} is a folder but not a dataset saved by datasets' save_to_disk"
            ) from None
        if isinstance(loaded, datasets.DatasetDict):
            if config.split not in loaded:
                raise DataError(f"data.split: {source} has splits {sorted(loaded)}, not {config.split!r}")
            loaded = loaded[config.split]
        return loaded.to_pandas()
    if path.exists():
        return _read_file(path)
    if source.startswith((".", "/", "~")) or source.endswith((".jsonl", ".json", ".parquet", ".csv")):
        raise DataError(f"data.source: no file or folder at {source}")
    import datasets  # a hub dataset id; needs the network

    return datasets.load_dataset(source, split=config.split).to_pandas()


def _where(source: str, index: int) -> str:
    """How a person finds row ``index`` (0-based, in file order) of the source."""
    return f"line {index + 1}" if source.endswith(".jsonl") else f"row {index}"


def _check_text(frame: pd.DataFrame, column: str, field: str, source: str) -> None:
    """Every value of a text column is a string (or missing): a number or a list is a wrong type."""
    bad = frame[column].map(lambda v: not (isinstance(v, str) or v is None or (isinstance(v, float) and np.isnan(v))))
    if bad.any():
        index = int(np.flatnonzero(bad.to_numpy())[0])
        value = frame[column].iloc[index]
        raise DataError(
            f"data.{field}: {source} {_where(source, index)}: column {column!r} holds {type(value).__name__} "
            f"{str(value)[:40]!r}; expected text"
        )


def _first_turns(messages: object, source: str, index: int, column: str) -> tuple[str, str] | None:
    if messages is None:
        return None
    if not isinstance(messages, list | tuple | np.ndarray) or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages
    ):
        raise DataError(
            f"data.messages_column: {source} {_where(source, index)}: column {column!r} must be a list of "
            "{role, content} messages"
        )
    user = next((m.get("content") for m in messages if m["role"] == "user"), None)
    answer = next((m.get("content") for m in messages if m["role"] == "assistant"), None)
    if (user is not None and not isinstance(user, str)) or (answer is not None and not isinstance(answer, str)):
        raise DataError(f"data.messages_column: {source} {_where(source, index)}: a message's content is not text")
    return (user, answer) if user and answer else None


def load_sft(config: DataConfig) -> pd.DataFrame:
    """All usable (id, prompt, answer) rows of the source, deduplicated by prompt, in a stable order."""
    source = config.source
    if source == BUILTIN_CHATTERBOT:
        frame = _chatterbot_rows()
    elif source == BUILTIN_SYNTHETIC:
        frame = default_task().rows.copy()
    else:
        frame = _read_table(source, config)
    if config.messages_column is not None:
        if config.messages_column not in frame.columns:
            raise DataError(
                f"data.messages_column: {source} has no column {config.messages_column!r} "
                f"(columns: {sorted(map(str, frame.columns))})"
            )
        column = config.messages_column
        pairs = [_first_turns(m, source, i, column) for i, m in enumerate(frame[column])]
        frame = pd.DataFrame([p for p in pairs if p is not None], columns=["prompt", "answer"])
    elif source not in BUILTIN_SOURCES:
        for field, column in (("prompt_column", config.prompt_column), ("answer_column", config.answer_column)):
            if column not in frame.columns:
                raise DataError(
                    f"data.{field}: {source} has no column {column!r} (columns: {sorted(map(str, frame.columns))})"
                )
        _check_text(frame, config.prompt_column, "prompt_column", source)
        _check_text(frame, config.answer_column, "answer_column", source)
        frame = frame[[config.prompt_column, config.answer_column]].set_axis(["prompt", "answer"], axis=1)
    frame = frame.dropna()
    frame = frame[(frame["prompt"].astype(str).str.strip() != "") & (frame["answer"].astype(str).str.strip() != "")]
    frame = frame.astype({"prompt": str, "answer": str}).drop_duplicates("prompt", keep="first")
    if config.max_rows is not None:
        frame = frame.head(config.max_rows)
    frame = frame.reset_index(drop=True)
    frame.insert(0, "id", [row_id(p, a) for p, a in zip(frame["prompt"], frame["answer"], strict=True)])
    if len(frame) <= config.heldout_size:
        raise DataError(
            f"data.source: {source} has {len(frame)} usable rows, not more than data.heldout_size={config.heldout_size}"
        )
    return frame


def split_heldout(
    frame: pd.DataFrame, heldout_size: int, seed: int, shared_answers: bool = False
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(training pool, held-out rows): a seeded permutation of the rows; held-out never trains.

    No held-out text trains either: a pool row whose prompt or answer equals a held-out row's prompt
    or answer is dropped (chatterbot's rows are consecutive turns, so one row's answer is the next
    row's prompt). How many were dropped: ``pool.attrs["excluded_overlapping_heldout"]``.
    ``shared_answers`` (builtin:synthetic): answers come from a small set by design, so a pool row
    may repeat a held-out answer; prompts stay disjoint and no held-out text is a pool prompt.
    """
    order = np.random.default_rng([seed, 0xE7A1]).permutation(len(frame))
    heldout = frame.iloc[np.sort(order[:heldout_size])].reset_index(drop=True)
    pool = frame.iloc[np.sort(order[heldout_size:])]
    texts = set(heldout["prompt"]) | set(heldout["answer"])
    if shared_answers:
        overlapping = pool["prompt"].isin(texts) | pool["answer"].isin(set(heldout["prompt"]))
    else:
        overlapping = pool["prompt"].isin(texts) | pool["answer"].isin(texts)
    pool = pool[~overlapping].reset_index(drop=True)
    pool.attrs["excluded_overlapping_heldout"] = int(overlapping.sum())
    return pool, heldout


def heldout_permutation(n: int, seed: int, iteration: int) -> np.ndarray:
    """The order in which the ``n`` held-out rows are shared among the opponent members at ``iteration``:
    a permutation seeded by (run seed, t), so a member's share is not a block of the source's order."""
    return np.random.default_rng([seed, iteration, 0x4E1D]).permutation(n)


def sample_prompts(
    frame: pd.DataFrame, data: DataConfig, method: MethodConfig, seed: int, iteration: int
) -> pd.DataFrame:
    """The prompts of one iteration with the opponent member that writes each loser.

    n_0 rows at t = 0 and n after, drawn without replacement from the training pool with a seed
    that depends on (run seed, t); then all held-out rows (split "heldout") in a seeded order
    (`heldout_permutation`). Each split is divided among the opponent members in proportion to
    their weights (`alphaspin.mixture`). ``attrs["excluded_overlapping_heldout"]``: pool rows left
    out because they share a prompt or answer with a held-out row.
    """
    pool, heldout = split_heldout(frame, data.heldout_size, seed, shared_answers=data.source == BUILTIN_SYNTHETIC)
    excluded = pool.attrs["excluded_overlapping_heldout"]
    n = method.pairs_at(iteration)
    if n > len(pool):
        field = "pairs_first_iteration" if iteration == 0 else "pairs_per_iteration"
        raise DataError(
            f"method.{field}: {n} pairs asked at t={iteration} but the training pool has only {len(pool)} rows "
            f"({data.source} minus {data.heldout_size} held out and {excluded} rows that share a prompt or answer "
            "with the held-out rows)"
        )
    rng = np.random.default_rng([seed, iteration])
    train = pool.iloc[rng.permutation(len(pool))[:n]].reset_index(drop=True)
    members = opponent_members(iteration, method.history, method.opponent)
    train["opponent"] = assign_members(len(train), members)
    train["split"] = "train"
    heldout = heldout.iloc[heldout_permutation(len(heldout), seed, iteration)].reset_index(drop=True)
    heldout["opponent"] = assign_members(len(heldout), members)
    heldout["split"] = "heldout"
    result = pd.concat([train, heldout], ignore_index=True)
    result.attrs = {"excluded_overlapping_heldout": excluded}
    return result
