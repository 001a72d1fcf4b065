#!/usr/bin/env bash
# Set up autotune in ./.venv: idempotent, offline-friendly, asks nothing.
#
# torch is installed first and on its own, because a bare `torch` requirement on a machine without
# it pulls a multi-GB CUDA build. TORCH_SPEC picks it: the default, torch==2.13.0, resolves to a
# CPU build where one is on local disk (our dev/CI machines) and to PyPI's build elsewhere; on a GPU
# machine use e.g. TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu128".
# An already importable torch is kept as is.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if ! python -c "import torch" >/dev/null 2>&1; then
    # shellcheck disable=SC2086
    python -m pip install -q $TORCH_SPEC
fi
python -m pip install -q -e ".[test]"
echo "autotune $(python -c 'import autotune; print(autotune.__version__)') ready in .venv (torch $(python -c 'import torch; print(torch.__version__)'))" >&2
