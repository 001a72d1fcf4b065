"""Silence one known-harmless library message, and nothing else, before the library is imported.

bitsandbytes (0.50, on a CPU with AVX512-BF16) logs at import time that it could not load an optional CPU
kernel from the HF hub and asks for `pip install kernels`. autotune never uses that kernel (modeling.py keeps
4-bit layers in their training layout, which does not call it), so every torch command would print advice
that does not apply. The filter sits on that one logger and matches that one message, so bitsandbytes' other
warnings still show; it must be installed before bitsandbytes is first imported (peft imports it, and
transformers imports peft), which is why importing this module installs it.
"""

from __future__ import annotations

import logging

# The logger bitsandbytes' CPU backend logs through, and the start of the message.
_LOGGER = "bitsandbytes.backends.cpu.ops"
_MESSAGE = "Failed to load CPU gemm_4bit_forward from kernels-community"


class _DropKernelsHint(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_MESSAGE)


_FILTER = _DropKernelsHint()


def install() -> None:
    """Idempotent: the filter is added once to that one logger."""
    logger = logging.getLogger(_LOGGER)
    if _FILTER not in logger.filters:
        logger.addFilter(_FILTER)


install()
