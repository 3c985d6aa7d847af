"""End to end on a tiny model: two iterations through the plain runner, the stored reference
log-probs recomputed by hand, α = 1 against TRL's own reference, forks, and bad inputs."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch
from conftest import NO_BENCHMARKS
from transformers import AutoModelForCausalLM

from alphaspin.dag import iteration_nodes
from alphaspin.data import DataError
from alphaspin.flows.cli import main
from alphaspin.pipeline import run
from alphaspin.runner import Runner
from alphaspin.runs import Run, RunConflictError
from alphaspin.stage_spec import Artifact, Node
from alphaspin.storage import MANIFEST
from alphaspin.workspace import Workspace

STAGE_DIRS = {
    0: ["sample_prompts", "generate-base", "build_pairs", "reference_logps", "train", "evaluate"],
    1: ["sample_prompts", "generate-base", "generate-iter-0", "build_pairs", "reference_logps", "train", "evaluate"],
}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model):
    """One two-iteration run (t = 0, 1; h = 2; α = 0.95) shared by the tests of this module."""
    from conftest import tiny_overrides

    from alphaspin.config import load_config

    root = tmp_path_factory.mktemp("runs")
    config = load_config("configs/quickstart.yaml", tiny_overrides(tiny_model, root))
    results = run(config)
    return config, results


def test_two_iterations_write_every_stage_and_a_new_adapter(finished_run):
    config, results = finished_run
    ctx = Run(config)
    assert [r["iteration"] for r in results] == [0, 1]
    for t, names in STAGE_DIRS.items():
        found = sorted(p.rsplit("/", 2)[-2] for p in ctx.storage.fs.glob(ctx.storage.path(f"iter-{t}", "*", MANIFEST)))
        assert found == sorted(names)
        for name in names:
            assert ctx.storage.stage(t, name).verify() is not None, f"iter-{t}/{name}"
    adapters = [ctx.dir(Node("train", t)).read_bytes("adapter/adapter_model.safetensors") for t in (0, 1)]
    assert adapters[0] != adapters[1]
    for r in results:
        for key in ("train/loss", "heldout/loglik_per_token", "heldout/reward_accuracy"):
            assert math.isfinite(r[key]), key
    record = json.loads(ctx.storage.read_bytes(ctx.storage.path("run.json")))
    assert record["config"]["method"]["alpha"] == 0.95 and "trl" in record["versions"]


def test_prompts_shares_and_heldout_isolation(finished_run):
    config, _ = finished_run
    ctx = Run(config)
    heldout_ids = set()
    for t in (0, 1):
        prompts = ctx.dir(Node("sample_prompts", t)).read_table("prompts.parquet")
        train = prompts[prompts.split == "train"]
        assert len(train) == 6 and train.id.is_unique
        heldout_ids |= set(prompts[prompts.split == "heldout"].id)
        expected = {"base": 6} if t == 0 else {"base": 3, "iter-0": 3}  # h = 2
        assert train.groupby("opponent").size().to_dict() == expected
        pairs = ctx.dir(Node("build_pairs", t)).read_table("pairs.parquet")
        assert pairs.id.is_unique and len(pairs) == len(prompts)  # no duplicated rows
        assert set(pairs[pairs.split == "train"].id).isdisjoint(heldout_ids)
    assert len(heldout_ids) == 4  # the same held-out rows every iteration


def _logps_by_hand(model, tokenizer, prompt: str, answer: str, prefix: bool = False, generated=None) -> float:
    """Σ log π(answer tokens | chat-template prompt), from full logits (not TRL's code). ``prefix``: an
    answer cut off by max_new_tokens, scored without the template's closing ``<|im_end|>\\n``, on the ids
    the sampler generated (``generated``) where given: re-tokenizing its decoded text can give other ids."""
    prompt_ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
    full = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
    )
    prompt_ids, full = list(getattr(prompt_ids, "input_ids", prompt_ids)), list(getattr(full, "input_ids", full))
    if prefix:
        closing = list(tokenizer("<|im_end|>\n", add_special_tokens=False)["input_ids"])
        assert full[-len(closing) :] == closing
        full = full[: -len(closing)]
        if generated is not None and len(generated):
            full = list(prompt_ids) + [int(i) for i in generated]
    assert full[: len(prompt_ids)] == prompt_ids
    ids = torch.tensor([full[:96]])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), dim=-1)
    targets = ids[0, 1:]
    positions = range(len(prompt_ids) - 1, ids.shape[1] - 1)
    return float(sum(logp[i, targets[i]] for i in positions))


def test_stored_reference_logps_equal_hand_computation(finished_run, tiny_model):
    from peft import PeftModel

    config, _ = finished_run
    stored, ctx = Run(config), Workspace(config)
    table = stored.dir(Node("reference_logps", 1)).read_table("reference.parquet").head(3)
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    tokenizer = ctx.tokenizer
    # generation.truncated_losers: no_eos (the default): a cut-off loser is scored as the prefix it is
    assert config.generation.truncated_losers == "no_eos" and table.rejected_truncated.any()

    # a cut-off loser is scored on the ids it was generated as (build_pairs' rejected_generated_ids)
    pairs = stored.dir(Node("build_pairs", 1)).read_table("pairs.parquet").set_index("id")
    generated = {row_id: pairs.loc[row_id, "rejected_generated_ids"] for row_id in table.id}

    def by_hand(model, r, side):
        cut = side == "rejected" and r.rejected_truncated
        return _logps_by_hand(model, tokenizer, r.prompt, getattr(r, side), cut, generated[r.id] if cut else None)

    expected_base = [[by_hand(base, r, side) for side in ("chosen", "rejected")] for r in table.itertuples()]
    trained = Node("train", 0)
    adapter_dir = ctx.local_adapter(Artifact(stored.stored_record(trained), stored.dir(trained)))
    prev = PeftModel.from_pretrained(base, adapter_dir).eval()
    expected_prev = [[by_hand(prev, r, side) for side in ("chosen", "rejected")] for r in table.itertuples()]
    for i, row in enumerate(table.itertuples()):
        assert row.lp_base_chosen == pytest.approx(expected_base[i][0], abs=2e-4)
        assert row.lp_base_rejected == pytest.approx(expected_base[i][1], abs=2e-4)
        assert row.lp_prev_chosen == pytest.approx(expected_prev[i][0], abs=2e-4)
        assert row.lp_prev_rejected == pytest.approx(expected_prev[i][1], abs=2e-4)
        assert row.ref_chosen_logps == pytest.approx(0.95 * row.lp_prev_chosen + 0.05 * row.lp_base_chosen, abs=1e-9)
        assert row.ref_rejected_logps == pytest.approx(
            0.95 * row.lp_prev_rejected + 0.05 * row.lp_base_rejected, abs=1e-9
        )
    ctx.close()


def test_alpha_one_reproduces_the_reference_trl_computes_from_the_previous_iterate(finished_run, tiny_model, tmp_path):
    """With α = 1, our stored reference equals what TRL's own precompute gives for π_θ0 (on the ids
    the trainer trains on: cut-off losers without end-of-turn, generation.truncated_losers: no_eos)."""
    from peft import PeftModel
    from trl import DPOTrainer

    from alphaspin.dpo import dpo_config, pairs_to_dataset, prepare_like_trl

    class PrecomputingDPOTrainer(DPOTrainer):  # TRL's precompute, our tokenization
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return prepare_like_trl(self, dataset, processing_class, args, dataset_name)

    config, _ = finished_run
    spin = config.model_copy(deep=True)
    spin.method.alpha = 1.0
    spin.run.run_id = "spin-alpha-1"
    stored, source, ctx = Run(spin), Run(config), Workspace(spin)
    # a separate run that adopts the pairs and θ_0 of the finished run
    pairs_node, trained = Node("build_pairs", 1), Node("train", 0)
    pairs_record = stored.dir(pairs_node).adopt(source.dir(pairs_node), source.stored_record(pairs_node).cache_key)
    previous = stored.dir(trained).adopt(source.dir(trained), source.stored_record(trained).cache_key)
    Runner(stored, ctx).run_node(Node("reference_logps", 1), {"pairs": pairs_record, "previous": previous})
    ours = stored.dir(Node("reference_logps", 1)).read_table("reference.parquet")
    ours = ours[ours.split == "train"].reset_index(drop=True)
    assert (ours.ref_chosen_logps == ours.lp_prev_chosen).all()
    adapter = ctx.local_adapter(Artifact(previous, stored.dir(trained)))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), adapter, is_trainable=True)
    # TRL's own reference forward must see the model as ours does: without dropout.
    args = dpo_config(
        spin.training.model_copy(update={"disable_dropout": True}), str(tmp_path / "trl"), 0, use_cpu=True
    )
    dataset = pairs_to_dataset(ours, losers_as_prefixes=spin.generation.losers_as_prefixes)
    trainer = PrecomputingDPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=ctx.tokenizer)
    trl_ref = (
        pd.DataFrame(
            {
                "id": trainer.train_dataset["id"],
                "c": trainer.train_dataset["ref_chosen_logps"],
                "r": trainer.train_dataset["ref_rejected_logps"],
            }
        )
        .set_index("id")
        .loc[ours.id]
    )
    assert ours.ref_chosen_logps.to_numpy() == pytest.approx(trl_ref.c.to_numpy(), abs=2e-4)
    assert ours.ref_rejected_logps.to_numpy() == pytest.approx(trl_ref.r.to_numpy(), abs=2e-4)
    ctx.close()


def test_rerun_skips_everything_and_a_conflicting_config_is_refused(finished_run):
    config, results = finished_run
    ctx = Run(config)
    before = {t: ctx.dir(Node("train", t)).read_manifest()["attempt"] for t in (0, 1)}
    assert run(config)[1]["train/loss"] == pytest.approx(results[1]["train/loss"])
    assert {t: ctx.dir(Node("train", t)).read_manifest()["attempt"] for t in (0, 1)} == before
    changed = config.model_copy(deep=True)
    changed.training.beta = 0.3
    with pytest.raises(RunConflictError, match=r"training\.beta.*--fork-from"):
        run(changed)


def test_plan_says_what_would_run_and_why_without_writing(finished_run, capsys):
    from alphaspin.runner import plan

    config, _ = finished_run
    assert {row.status for row in plan(Run(config))} == {"cached"}
    # The same run id with another β: train reads β, so it re-runs; evaluate reads it and its input.
    changed = config.model_copy(deep=True)
    changed.training.beta = 0.3
    rows = {row.node.label: row for row in plan(Run(changed))}
    assert rows["iter-0/reference_logps"].status == "cached"
    assert rows["iter-0/train"].status == "run" and rows["iter-0/train"].reason == "training.beta changed (0.1 → 0.3)"
    assert "training.beta changed" in rows["iter-0/evaluate"].reason
    assert rows["iter-1/generate-iter-0"].reason == "input iter-0/train runs"
    # A fork: what its parent holds under the same key is adopted; the rest says what differs.
    fork = changed.model_copy(deep=True)
    fork.run.run_id = "planned-fork"
    rows = {row.node.label: row for row in plan(Run(fork, fork_from=config.run.run_id))}
    assert rows["iter-0/build_pairs"].status == "adopt" and rows["iter-1/generate-base"].status == "adopt"
    assert rows["iter-0/train"].reason == "differs from the fork parent's: training.beta changed (0.1 → 0.3)"
    assert not Run(fork).storage.exists(Run(fork).run_json)  # planning writes nothing
    # Through the CLI, as a person reads it.
    code = main(
        [
            "plan",
            "-c",
            "configs/quickstart.yaml",
            *[arg for item in tiny_overrides_of(config) for arg in ("--set", item)],
            "--set",
            "training.beta=0.3",
            "--set",
            "run.run_id=planned-fork",
            "--fork-from",
            config.run.run_id,
        ]
    )
    out = capsys.readouterr().out
    assert code == 0 and "iter-0/train" in out and "training.beta changed (0.1 → 0.3)" in out
    assert "to run," in out and "adopted from the fork parent" in out


def test_plan_names_a_corrupted_artifact_and_what_follows_it(finished_run):
    from alphaspin.runner import plan

    config, _ = finished_run
    copy = config.model_copy(deep=True)
    copy.run.run_id = "corrupted-copy"
    source, target = Run(config), Run(copy)
    for t in (0, 1):  # a copy of the finished run, to corrupt without harming the shared fixture
        for node in iteration_nodes(config, t):
            record = source.stored_record(node)
            target.dir(node).adopt(source.dir(node), record.cache_key)
    folder = target.dir(Node("build_pairs", 1))
    data = bytearray(folder.read_bytes("pairs.parquet"))
    data[len(data) // 2] ^= 0xFF
    folder.write_bytes("pairs.parquet", bytes(data))
    rows = {row.node.label: row for row in plan(target)}
    assert rows["iter-1/generate-iter-0"].status == "cached"
    assert rows["iter-1/build_pairs"].reason == "its artifacts fail verification (a file is missing or changed)"
    assert rows["iter-1/reference_logps"].reason == "input iter-1/build_pairs runs"
    assert rows["iter-1/train"].status == "run"


def tiny_overrides_of(config) -> list[str]:
    from conftest import tiny_overrides

    return tiny_overrides(config.model.name_or_path, config.run.runs_root)


def test_adding_a_stage_is_one_module_and_one_registry_entry(finished_run, monkeypatch):
    """A new stage declared as data (here: a count of each member's losers, reading build_pairs)
    enters the DAG, plan, the runner and the run without touching any other module."""
    from alphaspin.runner import plan
    from alphaspin.stage_spec import Input, StageSpec
    from alphaspin.stages import REGISTRY

    def count_losers(job, pairs):
        frame = pairs.read_table("pairs.parquet")
        counts = frame.groupby("opponent").size()
        job.out.write_json("counts.json", {k: int(v) for k, v in counts.items()})
        return {"members": len(counts)}

    spec = StageSpec(
        name="count_losers",
        function=count_losers,
        inputs=(Input("pairs", "build_pairs"),),
        reads=lambda config, t, member: {},
        version=1,
        gpu=False,
        description="Count losers per member.",
    )
    monkeypatch.setitem(REGISTRY, "count_losers", spec)
    config, _ = finished_run
    rows = {row.node.label: row for row in plan(Run(config))}
    assert rows["iter-1/count_losers"].status == "run" and rows["iter-1/count_losers"].reason == "not run yet"
    assert {r.status for label, r in rows.items() if "count_losers" not in label} == {"cached"}
    run(config)
    stored = Run(config)
    assert stored.dir(Node("count_losers", 1)).read_json("counts.json") == {"base": 5, "iter-0": 5}
    assert stored.stored_record(Node("count_losers", 0)).metrics == {"members": 1}


@pytest.mark.slow  # a whole forked run
def test_a_fork_with_a_new_beta_reuses_exactly_the_stages_that_do_not_read_it(finished_run):
    config, _ = finished_run
    fork = config.model_copy(deep=True)
    fork.training.beta = 0.3
    fork.run.run_id = "forked-beta"
    run(fork, fork_from=config.run.run_id)
    ctx = Run(fork)
    adopted = {
        (t, name): "adopted_from" in ctx.storage.stage(t, name).verify().metrics
        for t, names in STAGE_DIRS.items()
        for name in names
    }
    assert adopted == {
        (0, "sample_prompts"): True,
        (0, "generate-base"): True,
        (0, "build_pairs"): True,
        (0, "reference_logps"): True,
        (0, "train"): False,
        (0, "evaluate"): False,
        (1, "sample_prompts"): True,
        (1, "generate-base"): True,
        (1, "generate-iter-0"): False,
        (1, "build_pairs"): False,
        (1, "reference_logps"): False,
        (1, "train"): False,
        (1, "evaluate"): False,
    }


def test_missing_dataset_column_is_a_clear_error_and_writes_nothing(make_config, tmp_path, capsys):
    data = tmp_path / "sft.jsonl"
    data.write_text("\n".join(json.dumps({"question": f"q{i}", "answer": f"a{i}"}) for i in range(20)))
    config = make_config(f"data.source={data}")
    with pytest.raises(DataError, match=r"data\.prompt_column: .*sft\.jsonl has no column 'prompt'"):
        run(config)
    assert not (tmp_path / "runs").exists()
    code = main(
        [
            "run",
            "--no-prefect",
            "-c",
            "configs/quickstart.yaml",
            "--set",
            f"data.source={data}",
            "--set",
            f"run.runs_root={tmp_path / 'runs'}",
        ]
    )
    assert code == 2 and "data.prompt_column" in capsys.readouterr().err


def test_missing_model_path_is_a_clear_error_and_writes_nothing(make_config, tmp_path):
    config = make_config(f"model.name_or_path={tmp_path / 'no-such-model'}")
    with pytest.raises(FileNotFoundError, match=r"model\.name_or_path: no model folder"):
        run(config)
    assert not (tmp_path / "runs").exists()


def test_too_many_pairs_for_the_data_names_the_field(make_config):
    config = make_config("method.pairs_first_iteration=100000")
    with pytest.raises(DataError, match=r"method\.pairs_first_iteration"):
        run(config)


@pytest.mark.slow  # a whole extra run with sampling for log Z
def test_normalized_reference_subtracts_a_monte_carlo_log_partition(make_config, monkeypatch):
    """ipo does not cancel log Z(x); with normalized_reference the stored reference is
    α·lp_prev + (1−α)·lp_base − log Ẑ(x), Ẑ from samples of π_(t-1), the same for both answers; the
    samples are scored as generated ("answer, then end of turn", never the template's newline after it)."""
    import alphaspin.opponent as opponent
    from alphaspin.dpo import end_of_turn_ids

    scored_samples = []
    score_samples = opponent.score_samples

    def recording(*args, **kwargs):
        scored_samples.append(score_samples(*args, **kwargs))
        return scored_samples[-1]

    monkeypatch.setattr(opponent, "score_samples", recording)
    config = make_config(
        "training.loss_type=ipo",
        "training.normalized_reference=true",
        "training.partition_samples=2",
        "method.alpha=0.5",
        *NO_BENCHMARKS,
    )
    results = run(config)
    assert all(math.isfinite(r["train/loss"]) for r in results)
    ctx = Run(config)
    table = ctx.dir(Node("reference_logps", 1)).read_table("reference.parquet")
    assert (table.log_partition != 0).all() and table.log_partition.map(math.isfinite).all()
    assert (table.log_partition_se > 0).all() and table.log_partition_se.map(math.isfinite).all()
    expected = 0.5 * table.lp_prev_chosen + 0.5 * table.lp_base_chosen - table.log_partition
    assert table.ref_chosen_logps.to_numpy() == pytest.approx(expected.to_numpy(), abs=1e-9)
    assert (
        ctx.dir(Node("reference_logps", 0)).read_table("reference.parquet").log_partition == 0
    ).all()  # Z = 1 at t = 0
    (scored,) = scored_samples  # t = 1's log Z samples
    with Workspace(config) as ws:
        closing = end_of_turn_ids(ws.tokenizer)
    assert not any(list(ids[-len(closing) :]) == closing for ids in scored.tokenized["rejected_ids"])
    prompts = [i.split("#")[0] for i in scored.ids]
    log_w = 0.5 * (scored.lp_base - scored.lp_prev)
    by_id = table.set_index("id")
    for prompt_id in dict.fromkeys(prompts):
        rows = torch.tensor([p == prompt_id for p in prompts])
        expected = float(torch.logsumexp(log_w[rows], 0) - math.log(int(rows.sum())))
        assert by_id.loc[prompt_id, "log_partition"] == pytest.approx(expected, abs=1e-6)


def test_a_run_written_before_a_knob_existed_is_the_same_run(make_config, tmp_path):
    """Upgrading alphaspin adds knobs; a run.json written without one (its default keeps the old
    behaviour) still belongs to the same run, while a real change is still refused."""
    config = make_config()
    run_ = Run(config)
    record = run_.ensure()
    del record["config"]["generation"]["per_request_seeds"]  # as an older version wrote it
    del record["config"]["method"]["opponent"]
    run_.storage.write_json(run_.run_json, record)
    assert Run(config).ensure()["created"] == record["created"]
    changed = config.model_copy(deep=True)
    changed.method.alpha = 0.5
    with pytest.raises(RunConflictError, match=r"method\.alpha"):
        Run(changed).ensure()
