"""The README is the user's manual: its knob table is the config's, its commands exist."""

from pathlib import Path

from alphaspin.config import knobs_markdown
from alphaspin.flows.cli import build_parser

ROOT = Path(__file__).parents[1]
README = (ROOT / "README.md").read_text()


def test_knob_table_matches_the_config():
    assert knobs_markdown() in README, "regenerate the table with: python -m alphaspin.config"


def test_ci_runs_the_readmes_test_command():
    assert "bash scripts/test.sh" in README and "bash scripts/run.sh" in README
    assert "bash scripts/test.sh" in (ROOT / ".ci" / "run").read_text()


def test_every_cli_command_is_documented():
    commands = build_parser()._subparsers._group_actions[0].choices
    for name in commands:
        assert f"alphaspin {name}" in README, name


def test_recipes_in_readme_exist():
    for recipe in ("quickstart", "paper-gemma-2b", "spin-official"):
        assert (ROOT / "configs" / f"{recipe}.yaml").exists() and f"configs/{recipe}.yaml" in README
