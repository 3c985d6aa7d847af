"""The references of the paper's future-work paragraph (§5 of arXiv 2404.04291v1), and the sampler of the
Monte-Carlo log Z(x) of the geometric one.

By hand: π_prev = (0.5, 0.3, 0.2), π_base = (0.2, 0.2, 0.6), α = 0.75. The arithmetic reference is
0.75·π_prev + 0.25·π_base = (0.425, 0.275, 0.3): a distribution (sums to 1, so no log Z).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import NO_BENCHMARKS

from alphaspin.config import ConfigError, load_config
from alphaspin.reference import arithmetic_reference_logps, concatenate_lora, ema_coefficients
from alphaspin.stages.ema_adapter import ema_lora

PREV = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
BASE = torch.tensor([0.2, 0.2, 0.6], dtype=torch.float64)


def test_arithmetic_reference_by_hand():
    ref = arithmetic_reference_logps(PREV.log(), BASE.log(), 0.75)
    assert ref.exp().tolist() == pytest.approx([0.425, 0.275, 0.3], abs=1e-15)
    assert ref[0].item() == pytest.approx(math.log(0.425), abs=1e-15)
    assert ref.exp().sum().item() == pytest.approx(1.0, abs=1e-15)  # normalised: no log Z
    # long sequences (log-probs near −1000) do not underflow: log(0.75 e^a + 0.25 e^b) = a + log(0.75 + 0.25 e^(b−a))
    far = arithmetic_reference_logps(
        torch.tensor([-1000.0], dtype=torch.float64), torch.tensor([-1001.0], dtype=torch.float64), 0.75
    )
    assert far.item() == pytest.approx(-1000 + math.log(0.75 + 0.25 * math.exp(-1)), abs=1e-12)


def test_arithmetic_reference_alpha_one_is_spin_and_at_t0_is_the_base():
    assert torch.equal(arithmetic_reference_logps(PREV.log(), BASE.log(), 1.0), PREV.log())
    # t = 0: π_(−1) = π_base, so the mixture of the base with itself is the base
    assert torch.allclose(arithmetic_reference_logps(BASE.log(), BASE.log(), 0.3), BASE.log(), atol=1e-15)
    with pytest.raises(ValueError, match="alpha"):
        arithmetic_reference_logps(PREV.log(), BASE.log(), 0.0)


def test_ema_coefficients_by_hand():
    # decay 0.5: t = 1 → ΔW_ema = 0.5 ΔW_0 (the other half stays on the base); t = 3 → 0.125, 0.25, 0.5
    assert ema_coefficients(0.5, 1) == [0.5]
    assert ema_coefficients(0.5, 3) == [0.125, 0.25, 0.5]
    assert sum(ema_coefficients(0.9, 4)) == pytest.approx(1 - 0.9**4)  # base weight decay^t
    with pytest.raises(ValueError, match="decay"):
        ema_coefficients(1.0, 2)


def test_concatenated_lora_delta_is_the_weighted_sum_of_deltas_by_hand():
    # two rank-1 LoRAs of a 2×2 layer: B_0 A_0 = [[1, 2], [2, 4]], B_1 A_1 = [[0, 3], [0, -3]]
    a0, b0 = torch.tensor([[1.0, 2.0]]), torch.tensor([[1.0], [2.0]])
    a1, b1 = torch.tensor([[0.0, 1.0]]), torch.tensor([[3.0], [-3.0]])
    a, b = concatenate_lora([(a0, b0), (a1, b1)], [0.25, 0.5])
    assert a.shape == (2, 2) and b.shape == (2, 2)  # rank 2
    expected = [[0.25, 0.5 + 1.5], [0.5, 1.0 - 1.5]]  # 0.25·[[1,2],[2,4]] + 0.5·[[0,3],[0,-3]]
    assert (b @ a).tolist() == expected
    # averaging A and B separately is not the EMA of the deltas: ((A0+A1)/2)((B0+B1)/2) ≠ (B0A0 + B1A1)/2
    naive = ((b0 + b1) / 2) @ ((a0 + a1) / 2)
    assert not torch.allclose(naive, (b0 @ a0 + b1 @ a1) / 2)


def test_ema_adapter_merged_delta_equals_the_ema_of_merged_deltas():
    """Three toy adapters (rank 2, lora_alpha 4: scale 2) of two layers; the EMA adapter (rank 6,
    scale 1) has merged delta Σ c_k · 2 · B_k A_k for every layer, and θ_ema(t) = d·θ_ema(t−1) + (1−d)·θ_(t−1)."""
    generator = torch.Generator().manual_seed(0)
    layers = ("base_model.model.layers.0.q_proj", "base_model.model.layers.1.v_proj")
    config = {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"], "peft_type": "LORA"}
    adapters = []
    for _ in range(3):
        tensors = {}
        for layer in layers:
            tensors[f"{layer}.lora_A.weight"] = torch.randn(2, 5, generator=generator)
            tensors[f"{layer}.lora_B.weight"] = torch.randn(4, 2, generator=generator)
        adapters.append((tensors, dict(config)))
    decay = 0.6
    weights = ema_coefficients(decay, 3)
    tensors, ema_config = ema_lora(adapters, weights)
    assert (
        ema_config["r"] == 6 and ema_config["lora_alpha"] == 6 and ema_config["target_modules"] == ["q_proj", "v_proj"]
    )

    def delta(t, layer):
        return t[f"{layer}.lora_B.weight"].double() @ t[f"{layer}.lora_A.weight"].double()

    for layer in layers:
        merged = delta(tensors, layer) * (ema_config["lora_alpha"] / ema_config["r"])
        deltas = [2.0 * delta(t, layer) for t, _ in adapters]
        ema = torch.zeros_like(deltas[0])  # θ_ema(0) = θ_base
        for d in deltas:
            ema = decay * ema + (1 - decay) * d
        assert torch.allclose(merged, ema, atol=1e-5)


def test_reference_knobs_are_validated():
    config = load_config(None, ["method.reference=arithmetic", "training.loss_type=ipo"])
    assert config.method.reference == "arithmetic"  # normalised: every loss is allowed
    load_config(None, ["method.reference=ema", "training.loss_type=apo_zero", "method.alpha=0.5"])
    with pytest.raises(ConfigError, match="training.normalized_reference"):
        load_config(None, ["method.reference=ema", "training.normalized_reference=true"])
    with pytest.raises(ConfigError, match="method.reference"):
        load_config(None, ["method.reference=harmonic"])
    for bad in ("0", "1", "1.5"):
        with pytest.raises(ConfigError, match="method.ema_decay"):
            load_config(None, ["method.reference=ema", f"method.ema_decay={bad}"])
    with pytest.raises(ConfigError, match="training.partition_max_new_tokens"):
        load_config(None, ["training.partition_max_new_tokens=0"])
    # geometric with a loss that does not cancel log Z is still refused
    with pytest.raises(ConfigError, match="training.loss_type"):
        load_config(None, ["training.loss_type=ipo"])


def test_new_knobs_enter_exactly_the_reads_of_the_stages_that_use_them():
    from alphaspin.stages import REGISTRY

    def reading(config, knob):
        return {name for name, spec in REGISTRY.items() if any(k == knob for k in spec.reads(config, 1, None))}

    ema = load_config(None, ["method.reference=ema"])
    assert reading(ema, "method.ema_decay") == {"ema_adapter"}
    assert reading(ema, "method.reference") == {"reference_logps"}
    assert "method.alpha" not in REGISTRY["reference_logps"].reads(ema, 1, None)
    geometric = load_config(None, ["training.loss_type=ipo", "training.normalized_reference=true"])
    assert reading(geometric, "training.partition_max_new_tokens") == {"reference_logps"}
    assert reading(geometric, "generation.temperature") == {"generate"}  # the log Z sampler overrides it
    assert reading(load_config(None, []), "training.partition_max_new_tokens") == set()


def test_the_ema_stage_exists_only_with_the_ema_reference():
    from alphaspin.dag import iteration_nodes, node_inputs
    from alphaspin.stage_spec import Node

    default = load_config(None, [])
    assert all(n.stage != "ema_adapter" for t in (0, 1, 2) for n in iteration_nodes(default, t))
    assert node_inputs(default, Node("reference_logps", 1))["ema"] is None
    ema = load_config(None, ["method.reference=ema"])
    assert [n.stage for n in iteration_nodes(ema, 0)].count("ema_adapter") == 0  # θ_ema(0) = θ_base
    assert Node("ema_adapter", 2) in iteration_nodes(ema, 2)
    assert node_inputs(ema, Node("ema_adapter", 2)) == {"trained": [Node("train", 0), Node("train", 1)]}
    assert node_inputs(ema, Node("reference_logps", 2))["ema"] == Node("ema_adapter", 2)
    assert node_inputs(ema, Node("reference_logps", 0))["ema"] is None


# -- end to end, on the tiny model ----------------------------------------------------------------
@pytest.mark.slow
def test_arithmetic_reference_end_to_end(make_config):
    from alphaspin.pipeline import run
    from alphaspin.runs import Run
    from alphaspin.stage_spec import Node

    config = make_config("method.reference=arithmetic", "method.alpha=0.6", "training.loss_type=ipo", *NO_BENCHMARKS)
    results = run(config)
    assert all(math.isfinite(r["train/loss"]) for r in results)
    for t in (0, 1):
        table = Run(config).dir(Node("reference_logps", t)).read_table("reference.parquet")
        for side in ("chosen", "rejected"):
            prev, base = table[f"lp_prev_{side}"].to_numpy(), table[f"lp_base_{side}"].to_numpy()
            expected = np.logaddexp(math.log(0.6) + prev, math.log(0.4) + base)
            assert table[f"ref_{side}_logps"].to_numpy() == pytest.approx(expected, abs=1e-9)
        assert (table.log_partition == 0).all()
    table0 = Run(config).dir(Node("reference_logps", 0)).read_table("reference.parquet")
    assert table0.ref_chosen_logps.to_numpy() == pytest.approx(table0.lp_base_chosen.to_numpy(), abs=1e-9)


@pytest.mark.slow
def test_ema_reference_end_to_end(make_config):
    from alphaspin.pipeline import run
    from alphaspin.runs import Run
    from alphaspin.stage_spec import Node

    config = make_config("method.reference=ema", "method.ema_decay=0.5", "method.iterations=2", *NO_BENCHMARKS)
    run(config)
    stored = Run(config)
    table0 = stored.dir(Node("reference_logps", 0)).read_table("reference.parquet")
    assert table0.ref_chosen_logps.to_numpy() == pytest.approx(table0.lp_base_chosen.to_numpy(), abs=1e-9)
    for t in (1, 2):
        record = stored.stored_record(Node("ema_adapter", t))
        assert record.metrics["rank"] == 4 * t  # tiny config: LoRA r = 4, one block per earlier iterate
        table = stored.dir(Node("reference_logps", t)).read_table("reference.parquet")
        for side in ("chosen", "rejected"):
            assert table[f"ref_{side}_logps"].to_numpy() == pytest.approx(table[f"lp_ema_{side}"].to_numpy())
        # the EMA policy is neither θ_(t-1) nor the base
        assert not np.allclose(table.lp_ema_chosen, table.lp_prev_chosen)
        assert not np.allclose(table.lp_ema_chosen, table.lp_base_chosen)


@pytest.mark.slow
def test_log_partition_samples_come_from_the_previous_policy_itself(make_config, monkeypatch):
    """The log Z(x) sampler is π_(t-1): temperature 1, top-p 1, the long limit (not the losers'
    settings); a sample that reaches the limit is counted as cut off; the SE is stored per pair."""
    import alphaspin.stages.reference_logps as stage
    from alphaspin.pipeline import run
    from alphaspin.runs import Run
    from alphaspin.stage_spec import Node

    seen = []

    class FakeBackend:
        def __init__(self, config):
            self.config = config

        def complete(self, requests):
            # odd samples run past the limit (cut off, as the backend reports), even ones end early
            from alphaspin.generation import Completion

            return [
                Completion("Fine, thanks.", False) if r.id.endswith(("#0", "#2")) else Completion("word " * 40, True)
                for r in requests
            ]

        def close(self):
            pass

    def fake_make_backend(config, *args, **kwargs):
        seen.append(config)
        return FakeBackend(config)

    monkeypatch.setattr(stage, "make_backend", fake_make_backend)
    config = make_config(
        "training.loss_type=ipo",
        "training.normalized_reference=true",
        "training.partition_samples=2",
        "training.partition_max_new_tokens=16",
        "method.alpha=0.5",
        *NO_BENCHMARKS,
    )
    results = run(config)
    assert len(seen) == 1  # t = 1 only (Z = 1 at t = 0)
    sampler = seen[0]
    assert (sampler.temperature, sampler.top_p, sampler.max_new_tokens) == (1.0, 1.0, 16)
    assert config.generation.temperature == 0.7 and config.generation.max_new_tokens == 8  # not the user's
    stored = Run(config)
    table = stored.dir(Node("reference_logps", 1)).read_table("reference.parquet")
    assert table.log_partition_se.map(math.isfinite).all() and (table.log_partition_se > 0).all()
    # the jackknife bias (≤ 0 here: two samples, one of them cut off) and the interval around the corrected value
    assert (table.log_partition_bias <= 0).all()
    corrected = table.log_partition - table.log_partition_bias
    assert ((table.log_partition_low < corrected) & (corrected < table.log_partition_high)).all()
    metrics = stored.stored_record(Node("reference_logps", 1)).metrics
    prompts = table.prompt.nunique()
    assert metrics["partition/samples"] == 2 * prompts and metrics["partition/cut_off_samples"] == prompts
    assert metrics["partition/mean_log_z_se"] > 0 and metrics["partition/mean_log_z_bias"] <= 0
    assert all(math.isfinite(r["train/loss"]) for r in results)


def test_forcing_a_stage_the_run_does_not_have_is_refused_naming_its_knob():
    """``--force 1:ema_adapter`` without the EMA reference used to be accepted and do nothing."""
    from alphaspin.dag import check_forced, force_plan, parse_force

    geometric = load_config(None, [])
    with pytest.raises(ConfigError, match=r"--force '1:ema_adapter'.*method\.reference: ema.*'geometric'"):
        parse_force(["1:ema_adapter"], geometric.method.iterations, geometric)
    with pytest.raises(ConfigError, match=r"method\.opponent: gflownet.*'arithmetic'"):
        parse_force(["1:train_sampler"], geometric.method.iterations, geometric)
    with pytest.raises(ConfigError, match=r"--stage 2:ema_adapter.*method\.reference"):  # alphaspin rerun
        check_forced(geometric, {2: {"ema_adapter"}}, "--stage")
    with pytest.raises(ConfigError, match=r"force_stages 'ema_adapter'.*method\.reference: ema"):  # the flows' form
        force_plan(2, stages=["ema_adapter"], config=geometric)
    assert parse_force(["1:train"], 2, geometric) == {1: {"train"}}
    ema = load_config(None, ["method.reference=ema"])
    assert parse_force(["1:ema_adapter"], 2, ema) == {1: {"ema_adapter"}}
    with pytest.raises(ConfigError, match=r"t ≥ 1"):  # θ_ema(0) = θ_base: no stage at t = 0
        parse_force(["0:ema_adapter"], 2, ema)
    assert force_plan(2, stages=["ema_adapter"], config=ema) == {1: {"ema_adapter"}, 2: {"ema_adapter"}}


def test_the_pipeline_refuses_a_forced_absent_stage_before_any_work(make_config):
    from alphaspin.pipeline import run

    config = make_config()
    with pytest.raises(ConfigError, match="method.reference: ema"):
        run(config, force={1: {"ema_adapter"}})
    assert not list(Path(config.run.runs_root).glob("**/*.json"))  # nothing written


def test_compress_lora_by_hand_exact_when_the_rank_fits_and_the_best_approximation_otherwise():
    from alphaspin.reference import compress_lora

    # B·A = diag(3, 1, 0) on a 3×3 layer, written as a rank-3 LoRA (the third rank is zero)
    a = torch.eye(3, dtype=torch.float64)
    b = torch.diag(torch.tensor([3.0, 1.0, 0.0], dtype=torch.float64))
    a2, b2, lost, whole = compress_lora(a, b, 2)  # rank(B·A) = 2 fits: exact
    assert a2.shape == (2, 3) and b2.shape == (3, 2)
    assert torch.allclose(b2 @ a2, b @ a, atol=1e-12) and lost == pytest.approx(0.0, abs=1e-20) and whole == 10.0
    a1, b1, lost, whole = compress_lora(a, b, 1)  # the best rank 1: diag(3, 0, 0); error ‖diag(0,1,0)‖² = 1
    assert torch.allclose(b1 @ a1, torch.diag(torch.tensor([3.0, 0.0, 0.0], dtype=torch.float64)), atol=1e-12)
    assert (lost, whole) == (pytest.approx(1.0), pytest.approx(10.0))
    a4, b4, _, _ = compress_lora(a[:1], b[:, :1], 4)  # a rank-1 core, padded with zero ranks to 4
    assert a4.shape == (4, 3) and torch.allclose(b4 @ a4, b[:, :1] @ a[:1], atol=1e-12)


def _toy_adapters(shared: bool, count: int = 3, r: int = 2):
    """``count`` toy adapters (rank r, scale 2) of two layers; ``shared``: every iterate's A is the same,
    so the EMA delta Σ c_k s B_k A has rank r however many iterates it sums."""
    generator = torch.Generator().manual_seed(1)
    layers = ("base_model.model.layers.0.q_proj", "base_model.model.layers.1.v_proj")
    config = {"r": r, "lora_alpha": 2 * r, "target_modules": ["q_proj", "v_proj"], "peft_type": "LORA"}
    common = {layer: torch.randn(r, 6, generator=generator, dtype=torch.float64) for layer in layers}
    adapters = []
    for _ in range(count):
        tensors = {}
        for layer in layers:
            own = torch.randn(r, 6, generator=generator, dtype=torch.float64)
            tensors[f"{layer}.lora_A.weight"] = common[layer].clone() if shared else own
            tensors[f"{layer}.lora_B.weight"] = torch.randn(5, r, generator=generator, dtype=torch.float64)
        adapters.append((tensors, dict(config)))
    return adapters, layers


def test_the_ema_adapter_rank_cap_is_exact_when_the_rank_fits_and_reports_its_error_otherwise():
    weights = ema_coefficients(0.5, 3)

    def merged(tensors, config, layer):
        scale = config["lora_alpha"] / config["r"]
        return scale * tensors[f"{layer}.lora_B.weight"].double() @ tensors[f"{layer}.lora_A.weight"].double()

    for shared in (True, False):
        adapters, layers = _toy_adapters(shared)
        exact, exact_config = ema_lora(adapters, weights)  # rank 6: the concatenation
        errors: dict[str, float] = {}
        capped, capped_config = ema_lora(adapters, weights, max_rank=2, errors=errors)
        assert exact_config["r"] == 6 and capped_config["r"] == capped_config["lora_alpha"] == 2
        relative = []
        for layer in layers:
            want, got = merged(exact, exact_config, layer), merged(capped, capped_config, layer)
            relative.append(float((want - got).norm() / want.norm()))
            # the best rank-2 approximation: its error is what SVD says is left
            s = torch.linalg.svdvals(want)
            assert float((want - got).norm()) == pytest.approx(float(s[2:].norm()), rel=1e-9, abs=1e-12)
        assert errors["max_layer_relative_error"] == pytest.approx(max(relative), rel=1e-6, abs=1e-12)
        if shared:  # the three updates share A: rank 2 fits, the cap is exact
            assert errors["relative_error"] < 1e-12 and max(relative) < 1e-12
        else:
            assert 0.05 < errors["relative_error"] < 1 and max(relative) > 0.05
    errors = {}
    same, same_config = ema_lora(adapters, weights, max_rank=6, errors=errors)  # the cap is not reached
    assert same_config["r"] == 6 and errors["relative_error"] == 0.0
    assert all(torch.equal(same[k], exact[k]) for k in exact)


def test_ema_max_rank_enters_the_key_only_when_set():
    from alphaspin.stages import REGISTRY

    reads = REGISTRY["ema_adapter"].reads
    assert reads(load_config(None, ["method.reference=ema"]), 1, None) == {"method.ema_decay": 0.5}
    capped = load_config(None, ["method.reference=ema", "method.ema_max_rank=16"])
    assert reads(capped, 1, None)["method.ema_max_rank"] == 16
    with pytest.raises(ConfigError, match="method.ema_max_rank"):
        load_config(None, ["method.ema_max_rank=0"])


def test_the_ema_adapter_stage_caps_the_rank_and_reports_the_error(tmp_path):
    """The stage function on three stored toy adapters whose updates share A (rank 2 each): with
    method.ema_max_rank 2 it writes a rank-2 adapter, exact, and says so in its metrics; uncapped, rank 6."""
    import json
    import types

    from safetensors.torch import load_file, save_file

    from alphaspin.stages.ema_adapter import ema_adapter

    adapters, layers = _toy_adapters(shared=True)
    trained = []
    for k, (tensors, config) in enumerate(adapters):
        folder = tmp_path / f"iter-{k}"
        folder.mkdir()
        save_file({n: t.float().contiguous() for n, t in tensors.items()}, str(folder / "adapter_model.safetensors"))
        (folder / "adapter_config.json").write_text(json.dumps(config))
        trained.append(types.SimpleNamespace(iteration=k, folder=folder))

    def stage(max_rank):
        out = {}
        config = load_config(None, ["method.reference=ema", "method.ema_decay=0.5"])
        if max_rank is not None:
            config = load_config(
                None, ["method.reference=ema", "method.ema_decay=0.5", f"method.ema_max_rank={max_rank}"]
            )
        workspace = types.SimpleNamespace(local_adapter=lambda artifact: artifact.folder, scratch=tmp_path / "scratch")
        job = types.SimpleNamespace(
            workspace=workspace,
            iteration=3,
            config=config,
            key=f"key{max_rank}",
            out=types.SimpleNamespace(put_dir=lambda local, name: out.update(folder=local)),
        )
        metrics = ema_adapter(job, trained)
        return metrics, load_file(str(out["folder"] / "adapter_model.safetensors"))

    full, full_tensors = stage(None)
    assert full["rank"] == 6 and full["ema/concatenated_rank"] == 6 and full["ema/relative_error"] == 0.0
    capped, capped_tensors = stage(2)
    assert capped["rank"] == capped["ema/rank"] == 2 and capped["ema/exact"]
    assert capped["ema/relative_error"] < 1e-9
    for layer in layers:
        a, b = f"{layer}.lora_A.weight", f"{layer}.lora_B.weight"
        assert capped_tensors[a].shape[0] == 2
        merged = capped_tensors[b].double() @ capped_tensors[a].double()  # scale 1 (lora_alpha = r)
        assert torch.allclose(merged, full_tensors[b].double() @ full_tensors[a].double(), atol=1e-5)
