"""Rewrite the README's config-key table from the schema (autotune.config), so the two never drift.

python scripts/readme_config_table.py          # rewrite README.md in place
python scripts/readme_config_table.py --check  # exit 1 if README.md is out of date
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from autotune.config import config_reference_markdown  # noqa: E402  (after the path insert above)

START, END = "<!-- config-keys:start -->", "<!-- config-keys:end -->"


def render(readme: str) -> str:
    head, rest = readme.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{config_reference_markdown()}\n{END}{tail}"


def main(argv: list[str]) -> int:
    path = ROOT / "README.md"
    current = path.read_text(encoding="utf-8")
    wanted = render(current)
    if "--check" in argv:
        return 0 if wanted == current else 1
    if wanted != current:
        path.write_text(wanted, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
