"""The config rejects bad input with errors that name the field; recipes load."""

from pathlib import Path

import pytest

from alphaspin.config import ConfigError, load_config

# grid-*.yaml are grids of runs, not recipes (tests/test_grid.py loads them)
CONFIGS = sorted(p for p in (Path(__file__).parents[1] / "configs").glob("*.yaml") if not p.name.startswith("grid-"))


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_recipe_loads(path):
    config = load_config(path)
    assert 0 < config.method.alpha <= 1


def test_defaults_and_overrides():
    config = load_config(None, ["method.alpha=1.0", "method.history=inf", "training.beta=0.25", "run.run_id=x"])
    assert (config.method.alpha, config.method.history, config.training.beta) == (1.0, "inf", 0.25)
    assert load_config(None, ["method.history=.inf"]).method.history == "inf"  # YAML infinity


@pytest.mark.parametrize(
    ("text", "field", "expected"),
    [
        ("method:\n  alpha: 0\n", "method.alpha", "greater than 0"),
        ("method:\n  alpha: 1.5\n", "method.alpha", "less than or equal to 1"),
        ("method:\n  history: 0\n", "method.history", "integer ≥ 1 or 'inf'"),
        ("method:\n  history: forever\n", "method.history", "integer ≥ 1 or 'inf'"),
        ("method:\n  pairs_per_iteration: 0\n", "method.pairs_per_iteration", "greater than 0"),
        ("training:\n  bta: 0.1\n", "training.bta", "unknown field"),
        ("nonsense: 1\n", "nonsense", "unknown field"),
        ("training:\n  lora:\n    r: -1\n", "training.lora.r", "greater than 0"),
        ("training:\n  loss_type: ipo\n", "training.loss_type", "does not cancel log Z"),
        ("training:\n  loss_type: banana\n", "training.loss_type", "Input should be"),
        ("run:\n  run_id: 'a/b'\n", "run.run_id", "pattern"),
        ("run:\n  runs_root: s3://key:secret@bucket/x\n", "run.runs_root", "credentials"),
    ],
)
def test_bad_values_name_the_field(tmp_path, text, field, expected):
    with pytest.raises(ConfigError) as error:
        load_config(write(tmp_path, text))
    message = str(error.value)
    assert f"{field}:" in message and expected in message


def test_ipo_is_allowed_for_spin_or_with_a_normalised_reference(tmp_path):
    assert load_config(None, ["training.loss_type=ipo", "method.alpha=1.0"]).training.loss_type == "ipo"
    config = load_config(None, ["training.loss_type=ipo", "training.normalized_reference=true"])
    assert config.training.normalized_reference


def test_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "method: [unclosed\n"))
    with pytest.raises(ConfigError, match="mapping of sections"):
        load_config(write(tmp_path, "- a\n- b\n"))
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(None, ["method.alpha"])
