"""Shared fixtures. Kept small: anything specific to one test module lives in that module."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported anywhere

import pytest


@pytest.fixture(scope="session")
def autotune_cache(tmp_path_factory):
    """One AUTOTUNE_CACHE for the session (inherited by CLI subprocesses): the offline Qwen3
    tokenizer is built into it once (~5 s) and reused by every test that trains."""
    from autotune.tokenizer import OFFLINE_QWEN3, load_tokenizer

    root = tmp_path_factory.mktemp("autotune-cache")
    saved = os.environ.get("AUTOTUNE_CACHE")
    os.environ["AUTOTUNE_CACHE"] = str(root)
    load_tokenizer(OFFLINE_QWEN3)
    yield root
    if saved is None:
        os.environ.pop("AUTOTUNE_CACHE", None)
    else:
        os.environ["AUTOTUNE_CACHE"] = saved
