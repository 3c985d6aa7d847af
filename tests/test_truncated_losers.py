"""Losers cut off by generation.max_new_tokens: recorded per loser, counted, and scored as the knob
generation.truncated_losers says (no_eos: the prefix without the chat template's end-of-turn ids,
in the reference stage and the trainer alike; drop: left out of training; keep: as before)."""

from __future__ import annotations

import copy
import types

import pandas as pd
import pytest
from conftest import NO_BENCHMARKS

from alphaspin.config import ConfigError, GenerationConfig, TrainingConfig, load_config
from alphaspin.generation import TransformersBackend, build_requests
from alphaspin.models import load_tokenizer
from alphaspin.stages import REGISTRY

PROMPTS = [("r0", "What is your name?"), ("r1", "Tell me a joke.")]
END_OF_TURN = "<|im_end|>\n"  # what the SmolLM2 (chatml) template writes after an assistant turn


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return load_tokenizer(tiny_model)


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _backend(tiny_model, tokenizer, max_new_tokens: int) -> TransformersBackend:
    """Sampling (the tiny model's greedy answer is a run of newlines), seeded per batch by the backend;
    records the ids ``model.generate`` returns."""
    sampling = GenerationConfig(temperature=1.0, top_p=1.0, max_new_tokens=max_new_tokens, batch_size=2)
    backend = TransformersBackend(tiny_model, tokenizer, sampling)
    backend.generated = []
    generate = backend.model.generate

    def recording(**kwargs):
        out = generate(**kwargs)
        backend.generated.extend(out[:, kwargs["input_ids"].shape[1] :].tolist())
        return out

    backend.model.generate = recording
    return backend


# -- the backends report truncation ---------------------------------------------------------------
def test_transformers_backend_reports_cut_off_and_ended_rows(tiny_model, tokenizer):
    n = 8
    requests = build_requests(tokenizer, PROMPTS, None, 0, 0, "base")
    capped = _backend(tiny_model, tokenizer, n)
    assert [c.truncated for c in capped.complete(requests)] == [True, True]
    r0, r1 = capped.generated
    assert len(r0) == len(r1) == n and tokenizer.eos_token_id not in r0 + r1  # the premise: no EOS within n

    # EOS := a token that r0 samples at step k + 1 (and not before) and r1 never samples. The same
    # seeds sample the same tokens until a row stops, so r0 now ends there and r1 runs to the cap.
    k = next(i for i, token in enumerate(r0) if token not in r0[:i] and token not in r1)
    stops_r0 = copy.deepcopy(tokenizer)
    stops_r0.eos_token = tokenizer.convert_ids_to_tokens(r0[k])
    assert stops_r0.eos_token_id == r0[k]
    longer = _backend(tiny_model, stops_r0, n)
    completions = longer.complete(requests)
    assert longer.generated[1] == r1 and longer.generated[0][: k + 1] == r0[: k + 1]
    assert [c.truncated for c in completions] == [False, True]
    assert completions[1].text == capped.generate(requests)[1]
    assert longer.generate(requests) == [c.text for c in completions]  # text-only callers
    # r0 hits EOS exactly at the cap: it ended, it was not cut off
    exact = _backend(tiny_model, stops_r0, k + 1)
    assert [c.truncated for c in exact.complete(requests)] == [False, True]
    assert exact.generated[0] == r0[: k + 1]


def test_completions_carry_the_generated_ids(tiny_model, tokenizer):
    """Each completion holds the ids generate sampled: all of them when cut off, up to and including
    EOS when it ended (what follows EOS in the batch is padding)."""
    requests = build_requests(tokenizer, PROMPTS, None, 0, 0, "base")
    capped = _backend(tiny_model, tokenizer, 8)
    completions = capped.complete(requests)
    assert [list(c.token_ids) for c in completions] == capped.generated
    r0 = capped.generated[0]
    k = next(i for i, token in enumerate(r0) if token not in r0[:i] and token not in capped.generated[1])
    stops_r0 = copy.deepcopy(tokenizer)
    stops_r0.eos_token = tokenizer.convert_ids_to_tokens(r0[k])
    ended = _backend(tiny_model, stops_r0, 8).complete(requests)
    assert list(ended[0].token_ids) == r0[: k + 1] and not ended[0].truncated
    assert list(ended[1].token_ids) == capped.generated[1]


# -- build_pairs: the column, the counts, drop ------------------------------------------------------
class _Table:
    def __init__(self, tables: dict[str, pd.DataFrame]):
        self.tables = tables

    def read_table(self, name: str) -> pd.DataFrame:
        return self.tables[name].copy()

    def files(self, under: str = "") -> list[str]:
        return sorted(n for n in self.tables if n.startswith(under))

    def write_table(self, name: str, frame: pd.DataFrame) -> None:
        self.tables[name] = frame


def _build_pairs(truncated_losers: str):
    """build_pairs on 4 training + 2 held-out prompts answered by two members; losers t1, t3 (train)
    and h1 (held-out) were cut off."""
    from alphaspin.stages.build_pairs import build_pairs

    ids = ["t0", "t1", "t2", "t3", "h0", "h1"]
    prompts = pd.DataFrame(
        {
            "id": ids,
            "prompt": [f"prompt {i}" for i in ids],
            "answer": [f"answer {i}" for i in ids],
            "opponent": ["base", "iter-0"] * 3,
            "split": ["train"] * 4 + ["heldout"] * 2,
        }
    )
    cut = {"t1", "t3", "h1"}
    shards = [
        pd.DataFrame(
            {
                "id": [i for i in ids[m::2]],
                "rejected": [f"loser {i}" for i in ids[m::2]],
                "opponent": member,
                "truncated": [i in cut for i in ids[m::2]],
                "generated_ids": [[m, len(i)] for i in ids[m::2]],
            }
        )
        for m, member in enumerate(["base", "iter-0"])
    ]
    config = types.SimpleNamespace(generation=GenerationConfig(truncated_losers=truncated_losers, max_new_tokens=8))
    out = _Table({})
    job = types.SimpleNamespace(iteration=0, config=config, out=out)
    generations = [_Table({"shards/shard-00000.parquet": shard}) for shard in shards]
    metrics = build_pairs(job, prompts=_Table({"prompts.parquet": prompts}), generations=generations)
    return metrics, out.tables["pairs.parquet"]


@pytest.mark.parametrize("mode", ["keep", "no_eos"])
def test_build_pairs_records_and_counts_cut_off_losers(mode):
    metrics, pairs = _build_pairs(mode)
    assert pairs.set_index("id").rejected_truncated.to_dict() == {
        "t0": False,
        "t1": True,
        "t2": False,
        "t3": True,
        "h0": False,
        "h1": True,
    }
    assert metrics["truncated_losers"] == 2 and metrics["truncated_share"] == 0.5
    assert metrics["heldout_truncated_losers"] == 1 and metrics["dropped_truncated_losers"] == 0
    assert metrics["pairs"] == 4 and metrics["heldout_pairs"] == 2
    # the ids each loser was generated as travel with it (member index, len(id) in this toy)
    assert pairs.set_index("id").rejected_generated_ids.map(list).to_dict()["t1"] == [1, 2]


def test_drop_leaves_cut_off_losers_out_of_training_only():
    metrics, pairs = _build_pairs("drop")
    train = pairs[pairs.split == "train"]
    assert list(train.id) == ["t0", "t2"] and not train.rejected_truncated.any()
    assert list(pairs[pairs.split == "heldout"].id) == ["h0", "h1"]  # held-out rows stay the same every iteration
    assert metrics["truncated_losers"] == 2 and metrics["dropped_truncated_losers"] == 2 and metrics["pairs"] == 2


# -- no_eos: the reference stage and the trainer see the same prefix ids --------------------------------
def _pairs() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "id": ["cut", "ended"],
            "prompt": ["Hello there", "How are you?"],
            "chosen": ["Hi!", "Fine, thanks."],
            "rejected": ["Go away, I am", "Why do you ask"],
            "rejected_truncated": [True, False],
            "ref_chosen_logps": [-10.0, -12.0],
            "ref_rejected_logps": [-11.0, -13.0],
        }
    )


def _chat_ids(tokenizer, prompt: str, answer: str | None) -> list[int]:
    messages = [{"role": "user", "content": prompt}]
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    result = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, add_generation_prompt=not answer)
    return list(result["input_ids"])


def test_no_eos_ends_a_cut_off_loser_where_generation_stopped(tokenizer, tmp_path):
    from alphaspin.dpo import dpo_config, end_of_turn_ids, pairs_to_dataset, tokenize_like_trl

    closing = end_of_turn_ids(tokenizer)
    assert closing == _ids(tokenizer, END_OF_TURN)
    args = dpo_config(TrainingConfig(max_length=96), str(tmp_path / "trl"), seed=0, use_cpu=True)
    frame = _pairs()
    prefix = tokenize_like_trl(pairs_to_dataset(frame, losers_as_prefixes=True), tokenizer, args)
    keep = tokenize_like_trl(pairs_to_dataset(frame), tokenizer, args)
    for row, kept, (_, pair) in zip(prefix, keep, frame.iterrows(), strict=True):
        prompt_ids = _chat_ids(tokenizer, pair.prompt, None)
        full = _chat_ids(tokenizer, pair.prompt, pair.rejected)
        assert row["prompt_ids"] == prompt_ids == full[: len(prompt_ids)]
        assert kept["rejected_ids"] == full[len(prompt_ids) :]  # keep: the answer + end-of-turn
        assert kept["rejected_ids"][-2:] == closing
        expected = full[len(prompt_ids) : -len(closing)] if pair.rejected_truncated else kept["rejected_ids"]
        assert row["rejected_ids"] == expected
        assert row["chosen_ids"] == kept["chosen_ids"] and row["chosen_ids"][-2:] == closing  # y_w ended
    assert tokenizer.decode(prefix[0]["rejected_ids"]) == "Go away, I am"


def test_no_eos_scores_a_cut_off_loser_on_its_generated_ids_not_its_retokenized_text(tokenizer, tmp_path):
    """The sampler wrote " Go away, I am" as " Go", " a", "way", ...: decoding gives "Go away, I am"
    (leading space stripped, "away" one token when re-tokenized). The prefix scored and trained is the
    generated ids themselves; a loser that ended, or pairs without the column, keep the text's ids."""
    from alphaspin.dpo import dpo_config, pairs_to_dataset, tokenize_like_trl

    args = dpo_config(TrainingConfig(max_length=96), str(tmp_path / "trl"), seed=0, use_cpu=True)
    written = _ids(tokenizer, " Go") + _ids(tokenizer, " a") + _ids(tokenizer, "way, I am")
    retokenized = _ids(tokenizer, "Go away, I am")
    assert tokenizer.decode(written).strip() == "Go away, I am" and written != retokenized  # the premise
    frame = _pairs()
    frame["rejected_generated_ids"] = [written, _ids(tokenizer, "Why do you ask") + [tokenizer.eos_token_id]]
    rows = tokenize_like_trl(pairs_to_dataset(frame, losers_as_prefixes=True), tokenizer, args)
    assert rows[0]["rejected_ids"] == written  # the cut-off loser: exactly what was generated
    assert "rejected_generated_ids" not in rows.column_names  # nothing extra reaches TRL's collator
    without = tokenize_like_trl(pairs_to_dataset(_pairs(), losers_as_prefixes=True), tokenizer, args)
    assert without[0]["rejected_ids"] == retokenized  # before: the re-tokenized text
    assert rows[1]["rejected_ids"] == without[1]["rejected_ids"]  # the ended loser: as TRL tokenizes it
    keep = tokenize_like_trl(pairs_to_dataset(frame), tokenizer, args)
    assert keep[0]["rejected_ids"][: len(retokenized)] == retokenized  # keep/drop: the text, ended


def test_the_trainer_trains_on_the_reference_stage_ids(make_config, tiny_model):
    """The dataset GeometricReferenceDPOTrainer ends up with, built as run_training builds it,
    has the ids Workspace.tokenize_pairs (the reference stage) scored."""
    from alphaspin.dpo import REFERENCE_COLUMNS, GeometricReferenceDPOTrainer, pairs_to_dataset
    from alphaspin.models import load_base_model
    from alphaspin.workspace import Workspace

    config = make_config()
    assert config.generation.truncated_losers == "no_eos"  # the default
    with Workspace(config) as ws:
        pairs = _pairs()
        written = _ids(ws.tokenizer, " Go") + _ids(ws.tokenizer, " a") + _ids(ws.tokenizer, "way, I am")
        pairs["rejected_generated_ids"] = [written, []]
        reference = ws.tokenize_pairs(pairs)
        assert reference["rejected_ids"][0] == written
        dataset = pairs_to_dataset(pairs, REFERENCE_COLUMNS, losers_as_prefixes=config.generation.losers_as_prefixes)
        trainer = GeometricReferenceDPOTrainer(
            model=load_base_model(tiny_model), args=ws.dpo_args(), train_dataset=dataset, processing_class=ws.tokenizer
        )
        trained = trainer.train_dataset
        for column in ("id", "prompt_ids", "chosen_ids", "rejected_ids"):
            assert trained[column] == reference[column]
        assert trained["rejected_ids"][0][-2:] != _ids(ws.tokenizer, END_OF_TURN)
        assert trained["rejected_ids"][1][-2:] == _ids(ws.tokenizer, END_OF_TURN)


def test_no_eos_needs_the_truncation_column():
    from alphaspin.dpo import pairs_to_dataset

    with pytest.raises(ValueError, match="rejected_truncated"):
        pairs_to_dataset(_pairs().drop(columns="rejected_truncated"), losers_as_prefixes=True)


# -- the knob: validated, and in exactly the keys of the stages that read it -----------------------------
def test_knob_is_validated():
    assert GenerationConfig().truncated_losers == "no_eos"
    with pytest.raises(ConfigError, match=r"generation\.truncated_losers"):
        load_config(None, ["generation.truncated_losers=strip"])


def test_knob_enters_exactly_the_keys_of_the_stages_that_read_it(make_config):
    keys = {}
    for mode in ("keep", "drop", "no_eos"):
        config = make_config(f"generation.truncated_losers={mode}")
        keys[mode] = {
            name: spec.reads(config, 1, "iter-0" if name == "generate" else None) for name, spec in REGISTRY.items()
        }
    for name in ("sample_prompts", "generate"):
        assert keys["keep"][name] == keys["drop"][name] == keys["no_eos"][name], name
    # except sir's generate: its weights target what the mode trains (alphaspin.opponent.sir_log_weights_at_cap)
    sir = {
        mode: REGISTRY["generate"].reads(make_config(f"generation.truncated_losers={mode}"), 1, "sir-iter-0")
        for mode in ("keep", "drop", "no_eos")
    }
    assert len({repr(sorted(fields.items())) for fields in sir.values()}) == 3
    assert all(fields["generation.truncated_losers"] == mode for mode, fields in sir.items())
    for member in ("iter-0", "token_geometric-iter-0", "gflownet-iter-0"):
        assert "generation.truncated_losers" not in REGISTRY["generate"].reads(make_config(), 1, member), member
    # build_pairs writes other pairs only with drop; keep and no_eos tokenize the same pairs differently
    assert keys["keep"]["build_pairs"] == keys["no_eos"]["build_pairs"] != keys["drop"]["build_pairs"]
    for name in ("reference_logps", "train", "evaluate"):
        assert keys["keep"][name] == keys["drop"][name] != keys["no_eos"][name], name
        assert keys["no_eos"][name]["generation.truncated_losers"] == "no_eos"


# -- a whole tiny run ----------------------------------------------------------------------------------
@pytest.mark.slow  # a whole tiny run (~25 s)
def test_tiny_run_scores_and_trains_cut_off_losers_as_prefixes(make_config, monkeypatch):
    from alphaspin.dpo import GeometricReferenceDPOTrainer, end_of_turn_ids
    from alphaspin.pipeline import run
    from alphaspin.runs import Run
    from alphaspin.stage_spec import Node
    from alphaspin.workspace import Workspace

    trained: list = []
    original = GeometricReferenceDPOTrainer.train

    def record(self, *args, **kwargs):
        trained.append(self.train_dataset)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(GeometricReferenceDPOTrainer, "train", record)
    config = make_config(*NO_BENCHMARKS)
    run(config)
    ctx = Run(config)
    with Workspace(config) as ws:
        closing = end_of_turn_ids(ws.tokenizer)
        for t, dataset in enumerate(trained):
            pairs_dir = ctx.dir(Node("build_pairs", t))
            pairs = pairs_dir.read_table("pairs.parquet")
            train = pairs[pairs.split == "train"]
            assert pairs_dir.read_manifest()["metrics"]["truncated_losers"] == int(train.rejected_truncated.sum()) > 0
            reference = ctx.dir(Node("reference_logps", t)).read_table("reference.parquet")
            rows = reference[reference.split == "train"].reset_index(drop=True)
            scored = ws.tokenize_pairs(rows)
            assert dataset["id"] == scored["id"] == list(rows.id)
            assert dataset["rejected_ids"] == scored["rejected_ids"] and dataset["chosen_ids"] == scored["chosen_ids"]
            for ids, cut in zip(dataset["rejected_ids"], rows.rejected_truncated, strict=True):
                assert (ids[-len(closing) :] == closing) != cut
            # the stored reference counted exactly those completion tokens (none cut by training.max_length here)
            lengths = [len(p) + len(r) for p, r in zip(dataset["prompt_ids"], dataset["rejected_ids"], strict=True)]
            fits = [n <= config.training.max_length for n in lengths]
            counted = rows.rejected_tokens[fits].tolist()
            assert counted == [len(r) for r, f in zip(dataset["rejected_ids"], fits, strict=True) if f]
