"""What the tests share: the one copy of each helper (no test module imports another)."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]  # the source tree the tests run in
