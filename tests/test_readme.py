"""The README's promises that code can check: its config table is the schema's, and CI runs its test command."""

import re
from pathlib import Path

from autotune.config import config_reference_markdown

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_config_table_matches_the_schema():
    table = README.split("<!-- config-keys:start -->")[1].split("<!-- config-keys:end -->")[0].strip()
    assert table == config_reference_markdown(), "regenerate it: python scripts/readme_config_table.py"


def test_ci_runs_exactly_the_readme_test_command():
    commands = re.findall(r"^(bash scripts/bootstrap\.sh && .+)$", README, flags=re.M)
    assert len(commands) >= 2, "README opens with two commands"
    demo, tests = commands[0], commands[1]
    assert "autotune demo" in demo and "pytest" in tests
    assert tests in (ROOT / ".ci" / "run").read_text()
