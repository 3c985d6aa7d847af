"""Run identity (`alphaspin.config.knob_kind`, docs/architecture.md "Run identity"): an operational knob
(how a stage executes) may change between attempts of a run, whose finished stages stay finished while
the next ones run with the new value and record it; a result knob still refuses, naming the fork."""

from __future__ import annotations

import re
import sys

import pytest
from conftest import tiny_overrides

from alphaspin.config import (
    OPERATIONAL_KNOBS,
    ORCHESTRATION_KNOBS,
    RESULT_KNOBS,
    dump_config,
    flat_config,
    knob_kind,
    knobs,
    load_config,
)
from alphaspin.dag import iteration_nodes
from alphaspin.pipeline import run
from alphaspin.provenance import diff_attempts, diff_runs
from alphaspin.runner import key_fields, node_key, plan
from alphaspin.runs import Run, RunConflictError
from alphaspin.stage_spec import Node
from alphaspin.stages import REGISTRY
from alphaspin.storage import MANIFEST, RunStorage

RECIPE = "configs/quickstart.yaml"
# Another valid value, on this machine, of every operational knob the tiny run can execute with
# (its own values: model.device unset, every other knob as configs/quickstart.yaml and the defaults).
ALTERNATIVES = {
    "model.device": "cpu",
    "generation.tensor_parallel_size": "2",
    "generation.gpu_memory_utilization": "0.5",
    "generation.max_lora_rank": "32",
    "generation.vllm_python": sys.executable,
    "generation.vllm_cpu_kvcache_gib": "1.0",
    "generation.vllm_start_timeout_seconds": "120",
    "generation.vllm_concurrency": "4",
    "generation.vllm_data_parallel_size": "2",
    "generation.vllm_args": '["--enforce-eager"]',
    "training.gradient_checkpointing": "true",
    "training.save_steps": "3",
    "training.reference_batch_size": "3",
    "training.main_process_ip": "127.0.0.1",
    "training.main_process_port": "29555",
    "training.rendezvous_timeout_seconds": "60",
    "evaluation.batch_size": "2",
    "evaluation.judge.api_key_env": "ALPHASPIN_TEST_JUDGE_KEY",
    "method.gflownet.micro_batch_size": "4",
    "method.gflownet.save_steps": "3",
}
# Operational knobs this machine cannot execute a run with: their identity and keys are checked instead.
NOT_EXECUTABLE_HERE = {
    "training.num_machines": "more than one machine (and num_processes a multiple of it)",
    "training.deepspeed_config": "DeepSpeed runs on GPUs only",
}
RESULT_CHANGES = [
    "generation.batch_size=4",  # the transformers backend's batch boundaries decide the draws
    "generation.shard_size=4",
    "training.num_processes=2",  # a larger effective batch
    "training.per_device_train_batch_size=1",
    "training.beta=0.3",
]


# -- the classification -----------------------------------------------------------------------------
def test_every_config_field_is_classified_exactly_once():
    fields = {key for key, _, _ in knobs()}
    kinds = [RESULT_KNOBS, set(OPERATIONAL_KNOBS), ORCHESTRATION_KNOBS]
    assert set().union(*kinds) == fields, "classify each new field in alphaspin/config.py (run identity)"
    assert sum(len(kind) for kind in kinds) == len(fields)  # no knob of two kinds
    assert {stage for stages in OPERATIONAL_KNOBS.values() for stage in stages} <= set(REGISTRY)
    assert knob_kind("orchestration.removed_knob") == "orchestration" and knob_kind("method.removed") == "result"


def _configs(make_config):
    """Configs that take every branch of the stages' ``reads``."""
    return [
        make_config(),
        make_config(
            "generation.backend=vllm", "evaluation.benchmark_backend=vllm", "generation.per_request_seeds=false"
        ),
        make_config("training.loss_type=sppo_hard", "training.normalized_reference=true"),
        make_config("method.opponent=sir", "generation.truncated_losers=drop", "training.num_processes=2"),
        make_config("method.opponent=gflownet"),
        make_config("method.reference=ema", "data.source=builtin:synthetic"),
    ]


def test_no_cache_key_holds_an_operational_or_orchestration_knob(make_config):
    """What a stage reads is a result knob unless declared operational; operational knobs leave its key."""
    read: set[str] = set()
    for config in _configs(make_config):
        every = set(flat_config(dump_config(config)))
        for t in (0, 1):
            for node in iteration_nodes(config, t):
                raw = REGISTRY[node.stage].reads(config, t, node.member)
                read |= {key for key in raw if key in every}
                fields = key_fields(node, config)
                assert all(knob_kind(key) == "result" for key in fields if key in every), node
                assert not set(raw) & ORCHESTRATION_KNOBS, node
    # the operational knobs some stage read for its key until they were classified
    assert {"evaluation.batch_size", "generation.tensor_parallel_size", "training.gradient_checkpointing"} <= read


def test_the_alternatives_cover_every_operational_knob():
    assert set(ALTERNATIVES) | set(NOT_EXECUTABLE_HERE) == set(OPERATIONAL_KNOBS)
    assert not set(ALTERNATIVES) & set(NOT_EXECUTABLE_HERE)


# -- a finished tiny run, rerun -------------------------------------------------------------------
@pytest.fixture(scope="module")
def finished(tiny_model, tmp_path_factory):
    """A finished two-iteration tiny run, and ``make(*overrides)`` for its config with changes."""
    root = tmp_path_factory.mktemp("identity") / "runs"

    def make(*overrides: str):
        return load_config(RECIPE, [*tiny_overrides(tiny_model, root), *overrides])

    results = run(make())
    return make, results


def _attempts(config) -> dict[str, str]:
    storage = Run(config).storage
    found = {}
    for path in storage.fs.glob(storage.path("iter-*", "*", MANIFEST)):
        iteration, folder = path.rsplit("/", 3)[-3:-1]
        found[f"{iteration}/{folder}"] = storage.stage(int(iteration[5:]), folder).read_manifest()["attempt"]
    return found


@pytest.mark.slow  # one tiny run (~15 s on 2 idle cores), then ~1 s per knob
@pytest.mark.parametrize("knob", sorted(ALTERNATIVES))
def test_a_rerun_after_an_operational_change_reuses_every_finished_stage(finished, knob):
    make, results = finished
    changed = make(f"{knob}={ALTERNATIVES[knob]}")
    before = _attempts(changed)
    assert len(before) == 13
    assert {row.status for row in plan(Run(changed))} == {"cached"}
    again = run(changed)
    assert _attempts(changed) == before  # nothing re-ran
    assert [r["iteration"] for r in again] == [0, 1]
    assert again[1]["train/loss"] == results[1]["train/loss"]
    # run.json now holds the new value (what a split orchestration's children and `rerun` read back)
    record = Run(changed).record()
    value = flat_config(dump_config(changed))[knob]
    assert flat_config(record["config"])[knob] == value
    assert record["changes"][-1]["changed"][knob][1] == value


@pytest.mark.slow
@pytest.mark.parametrize("change", RESULT_CHANGES)
def test_a_result_change_still_refuses_naming_the_knob_and_the_fork(finished, change):
    make, _ = finished
    knob = change.split("=")[0]
    config = make(change)
    before = _attempts(config)
    fork = r"--set run\.run_id=NEW --fork-from " + re.escape(config.run.run_id)
    with pytest.raises(RunConflictError, match=rf"changed: {re.escape(knob)}\)\..*{fork}"):
        run(config)
    assert _attempts(config) == before


@pytest.mark.slow
def test_the_next_stage_runs_with_the_new_value_and_records_it(finished, capsys):
    make, results = finished
    config = make("evaluation.batch_size=2", "generation.vllm_concurrency=4")
    ctx = Run(config)
    ctx.dir(Node("evaluate", 1)).reset()  # iter-1/evaluate is what an interrupted attempt left undone
    before = _attempts(config)
    rows = {row.node.label: row for row in plan(ctx)}
    assert rows["iter-1/evaluate"].status == "run" and rows["iter-1/evaluate"].reason == "not run yet"
    again = run(config)
    after = _attempts(config)
    assert after == {**before, "iter-1/evaluate": after["iter-1/evaluate"]}  # only it ran
    ran = ctx.dir(Node("evaluate", 1)).read_manifest()["provenance"]
    assert ran["operational"]["evaluation.batch_size"] == 2 and ran["device"] == "cpu"
    assert ran["operational"]["generation.vllm_concurrency"] == 4
    assert "evaluation.batch_size" not in ran["fields"]  # not in its key
    first = ctx.dir(Node("evaluate", 0)).read_manifest()["provenance"]["operational"]
    assert first["evaluation.batch_size"] == 8
    assert set(ctx.dir(Node("train", 1)).read_manifest()["provenance"]["operational"]) == {
        key for key, stages in OPERATIONAL_KNOBS.items() if "train" in stages
    }
    # The same numbers up to float noise: held-out log-probs in batches of 2 instead of 8.
    for key in ("heldout/loglik_per_token", "heldout/reward_margin"):
        assert again[1][key] == pytest.approx(results[1][key], rel=1e-4, abs=1e-5), key
    assert again[1]["heldout/reward_accuracy"] == results[1]["heldout/reward_accuracy"]
    # What ran with what: within the run (against run.json, which holds this attempt's values), and through the CLI.
    storage = ctx.storage
    assert ctx.record()["changes"][-1]["changed"]["evaluation.batch_size"] == [8, 2]
    rows = diff_attempts(storage)
    assert "iter-0/evaluate ran with evaluation.batch_size = 8 (run.json: 2)" in rows
    assert "iter-0/generate-base ran with generation.vllm_concurrency = null (run.json: 4)" in rows
    assert not any(row.startswith("iter-1/evaluate ") for row in rows)
    assert not any(row.startswith(("iter-0/train", "iter-0/sample_prompts")) for row in rows)  # not steered
    from alphaspin.flows.cli import main

    assert main(["diff", config.run.run_id, "--runs-root", config.run.runs_root]) == 0
    out = capsys.readouterr().out
    assert f"{len(rows)} difference(s)" in out and "evaluation.batch_size = 8 (run.json: 2)" in out
    # Between two runs: a fork that adopts everything but its last evaluate, run again with the old value.
    fork = make("run.run_id=identity-fork")
    run(fork, force={1: {"evaluate"}}, fork_from=config.run.run_id)
    between = diff_runs(storage, RunStorage(fork.run.runs_root, fork.run.run_id))
    assert "iter-1/evaluate ran with evaluation.batch_size: 2 → 8" in between
    assert not any(" ran with " in row and not row.startswith("iter-1/evaluate ") for row in between)


@pytest.mark.slow
def test_a_stage_keyed_with_operational_knobs_by_an_older_alphaspin_stays_cached(finished):
    """Before the classification, stages read operational knobs into their keys: such a manifest keeps
    holding its stage (after an upgrade, and after an operational change), not a result change."""
    make, _ = finished
    config = make()
    node = Node("evaluate", 1)
    stage = Run(config).dir(node)
    manifest = stage.read_manifest()
    recorded = manifest["provenance"]
    fields = REGISTRY["evaluate"].reads(config, 1, None)  # as the old runner keyed it: unfiltered
    assert "evaluation.batch_size" in fields
    old_key = node_key(node, fields, recorded["inputs"])
    stage.commit(
        "evaluate",
        1,
        old_key,
        manifest["metrics"],
        attempt=manifest["attempt"],
        provenance={"version": recorded["version"], "fields": fields, "inputs": recorded["inputs"]},
    )
    for overrides in ((), ("evaluation.batch_size=2",)):
        assert {row.status for row in plan(Run(make(*overrides)))} == {"cached"}, overrides
    assert run(make("evaluation.batch_size=2"))[1]["iteration"] == 1
    assert stage.read_manifest()["cache_key"] == old_key  # it stayed finished as it was
    changed = {row.node.label: row for row in plan(Run(make("evaluation.benchmark_limit=5")))}
    assert changed["iter-1/evaluate"].status == "run"
    assert changed["iter-1/evaluate"].reason == "evaluation.benchmark_limit changed (10 → 5)"
    # A provenance that does not give its manifest's key back holds nothing.
    stage.commit("evaluate", 1, old_key, manifest["metrics"], provenance={**recorded, "fields": {**fields, "x": 1}})
    assert {row.node.label: row.status for row in plan(Run(config))}["iter-1/evaluate"] == "run"
    # as it was, for the other tests of this module
    stage.commit(
        "evaluate", 1, manifest["cache_key"], manifest["metrics"], attempt=manifest["attempt"], provenance=recorded
    )
    assert {row.status for row in plan(Run(config))} == {"cached"}


def test_knobs_of_several_machines_change_no_identity_and_no_key(make_config):
    """num_machines and deepspeed_config cannot execute on this machine: the identity check and the
    train stage's key are what let a run move to machines that can."""
    base = make_config("training.num_processes=2", "run.run_id=two-processes")
    Run(base).ensure()
    spread = make_config(
        "training.num_processes=2",
        "run.run_id=two-processes",
        "training.num_machines=2",
        "training.main_process_ip=10.0.0.1",
        "training.deepspeed_config=/etc/zero2.json",
    )
    Run(spread).ensure()  # accepted: not a conflict
    assert key_fields(Node("train", 0), spread) == key_fields(Node("train", 0), base)
    with pytest.raises(RunConflictError, match=r"changed: training\.num_processes\)"):
        Run(make_config("training.num_processes=4", "run.run_id=two-processes")).ensure()
