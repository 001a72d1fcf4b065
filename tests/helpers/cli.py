"""Running the `autotune` command in tests: in-process (click's main), and as a real child process."""

from __future__ import annotations

import os
import subprocess
import sys

from autotune.cli import main
from helpers import REPO
from helpers.faults import stop


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """Run autotune in-process; (exit code, stdout, stderr)."""
    try:
        main([str(a) for a in argv])
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def cli_process(*args) -> subprocess.Popen:
    """`python -m autotune.cli ARGS` in the background (the caller bounds its time)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen(
        [sys.executable, "-m", "autotune.cli", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def run_cli_process(*args, timeout: float) -> tuple[int, str, str]:
    """`python -m autotune.cli ARGS` to completion within `timeout` (killed, never leaked, past it)."""
    proc = cli_process(*args)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    finally:
        stop(proc)
    return proc.returncode, stdout, stderr
