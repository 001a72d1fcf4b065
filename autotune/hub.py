"""Whether the Hugging Face hub can be reached, asked once and quickly.

Given a hub id on a machine without network, transformers retries every request for about a minute before it
gives up (and before it falls back on a cached copy). One TCP connection attempt to the hub's endpoint answers
the question in at most a few seconds: when it fails, models and tokenizers are loaded from the local cache
only, and a missing one is reported at once with what to do.
"""

from __future__ import annotations

import functools
import os
import socket
from urllib.parse import urlparse

from autotune.errors import UserError

CONNECT_TIMEOUT_S = 3.0
_TRUE = ("1", "true", "yes", "on")


def offline_by_env() -> bool:
    return any(os.environ.get(k, "").strip().lower() in _TRUE for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _endpoint() -> tuple[str, int]:
    url = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    parsed = urlparse(url)
    return parsed.hostname or "huggingface.co", parsed.port or (80 if parsed.scheme == "http" else 443)


@functools.lru_cache(maxsize=1)
def unreachable_reason() -> str | None:
    """None when a connection to the hub's endpoint opens; else why it does not (DNS, refused, timeout)."""
    host, port = _endpoint()
    try:
        socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        return f"{host}:{port}: {exc.strerror or exc.__class__.__name__}"
    return None


def local_only() -> tuple[bool, str | None]:
    """(load from the local cache only, why): the environment says offline, or the hub does not answer."""
    if offline_by_env():
        return True, "HF_HUB_OFFLINE is set"
    reason = unreachable_reason()
    return reason is not None, (f"the hub cannot be reached ({reason})" if reason else None)


def not_cached_error(what: str, name: str, why: str, detail: str = "") -> UserError:
    return UserError(
        f"{what} {name!r} is not in the local Hugging Face cache and {why}{f' ({detail})' if detail else ''}. "
        f"Download it on a machine with network (`hf download {name}`) and set model_name to that folder, or copy "
        "its Hugging Face cache here and set HF_HUB_OFFLINE=1; the offline demo model needs neither "
        "(model_name tiny-qwen3, tokenizer_name qwen3-offline)"
    )


def require_reachable(what: str, repo_id: str, filename: str = "config.json") -> None:
    """Fail now, before the data is prepared, when `repo_id` cannot be loaded: the hub does not answer (or the
    environment says offline) and the local cache has no copy of it (its `filename`). One cache lookup, no
    download."""
    local, why = local_only()
    if not local:
        return
    from huggingface_hub import try_to_load_from_cache

    if not isinstance(try_to_load_from_cache(repo_id, filename), str):
        raise not_cached_error(what, repo_id, why or "the hub is not used")
