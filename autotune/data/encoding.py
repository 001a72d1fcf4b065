"""Turn QA pairs into token ids + labels, the one place training and the solver agree on.

The conversation is rendered by the tokenizer's OWN chat template, so what we train on is
exactly what the model sees at inference:

    prompt = template(system? + history + user, add_generation_prompt=True)
    full   = prompt + answer + <|im_end|>

Labels are -100 over the prompt and equal to the ids over the answer *including* the
end-of-turn token, so the model learns to stop. Qwen's template writes a "\\n" after every
`<|im_end|>`; we omit it: it is never predicted (generation stops at `<|im_end|>`), it would
only cost a token per example, and leaving it out keeps the invariant "the last token is the
labelled end-of-turn" true for truncated examples too.

Pairs are duck-typed: anything with `question`, `answer`, `source`, `line`, `system` and
`history` attributes (autotune.data.parsing.QAPair).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from autotune.config import OVERFLOW_POLICIES
from autotune.fsutil import atomic_write_json

# Bump whenever the output of encode_pairs changes for the same inputs: invalidates caches.
ENCODING_VERSION = 2  # 2: an open <think> left by a thinking-only template is closed

IGNORE_INDEX = -100
END_OF_TURN = "<|im_end|>"
ASSISTANT_HEADER = "<|im_start|>assistant\n"
THINK_OPEN = "<think>"
# What Qwen3's hybrid template emits with enable_thinking=False: the answer follows it.
EMPTY_THINK = "<think>\n\n</think>\n\n"

# Touches the byte-level, CJK, emoji, digit-splitting and special-token paths of a tokenizer:
# two tokenizers that encode this identically are, for caching purposes, the same tokenizer.
_PROBE_TEXT = "Hello, world! 你好 🙂 def f(x): return x**2\n\n  12345 <|im_start|>user<|im_end|>"


@dataclass
class EncodeReport:
    total: int = 0
    kept: int = 0
    truncated: int = 0
    dropped: int = 0
    dropped_sources: list[str] = field(default_factory=list)  # "file:line" of each dropped pair


# ---------------------------------------------------------------------------------------------
# Rendering


def build_messages(pair, system_prompt: str | None = None) -> list[dict[str, str]]:
    """Chat messages for the prompt side of `pair` (everything before the answer).

    A pair's own `system` wins over the run-wide `system_prompt`: it is the more specific one.
    """
    messages: list[dict[str, str]] = []
    system = getattr(pair, "system", None)
    if system is None:
        system = system_prompt
    if system is not None:
        messages.append({"role": "system", "content": system})
    messages.extend(_history_messages(getattr(pair, "history", ()) or ()))
    messages.append({"role": "user", "content": pair.question})
    return messages


def _history_messages(history: Iterable[Any]) -> list[dict[str, str]]:
    """Earlier turns, accepted as role/content messages or as (question, answer) exchanges."""
    messages: list[dict[str, str]] = []
    for turn in history:
        if isinstance(turn, Mapping):
            messages.append({"role": turn["role"], "content": turn["content"]})
        elif hasattr(turn, "role") and hasattr(turn, "content"):
            messages.append({"role": turn.role, "content": turn.content})
        elif hasattr(turn, "question") and hasattr(turn, "answer"):
            messages += [{"role": "user", "content": turn.question}, {"role": "assistant", "content": turn.answer}]
        elif isinstance(turn, Sequence) and not isinstance(turn, str) and len(turn) == 2:
            messages += [{"role": "user", "content": turn[0]}, {"role": "assistant", "content": turn[1]}]
        else:
            raise TypeError(f"unsupported history turn {turn!r}: expected a role/content message or a (q, a) pair")
    return messages


def render_prompt(tokenizer, pair, system_prompt: str | None = None, thinking_model: bool = False) -> str:
    """The prompt text, ending with the assistant header the answer follows.

    For a thinking model (Qwen3 hybrid) we pass enable_thinking=False, which makes the template
    emit the empty `<think>\\n\\n</think>\\n\\n` block: training answers carry no reasoning, so
    the model is taught the "answer directly" mode it will be prompted with.

    Thinking-only templates (Qwen3-*-Thinking-2507) ignore enable_thinking and end the prompt
    with an open `<think>\\n`; we close it as the same empty block (whatever thinking_model
    says), else the answer would be trained, and prompted, as reasoning in a never-closed block.
    A template with no think handling at all (Qwen3-*-Instruct-2507) is left alone, even with
    thinking_model=True: that model has no thinking mode to switch off.
    """
    extra = {"enable_thinking": False} if thinking_model else {}
    prompt = tokenizer.apply_chat_template(
        build_messages(pair, system_prompt), tokenize=False, add_generation_prompt=True, **extra
    )
    return _close_open_think(prompt)


def _close_open_think(prompt: str) -> str:
    """Turn a trailing unclosed `<think>` after the last assistant header into EMPTY_THINK."""
    start = prompt.rfind(ASSISTANT_HEADER)
    if start < 0:
        return prompt
    start += len(ASSISTANT_HEADER)
    if prompt[start:].strip() != THINK_OPEN:
        return prompt  # no think block, or one the template already closed
    return prompt[:start] + EMPTY_THINK


# ---------------------------------------------------------------------------------------------
# Tokenization


def end_of_turn_id(tokenizer) -> int:
    """`<|im_end|>` for ChatML tokenizers (Qwen base models use <|endoftext|> as eos, so not eos)."""
    token_id = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    if isinstance(token_id, int) and token_id != tokenizer.unk_token_id:
        return token_id
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has neither {END_OF_TURN} nor an eos token")
    return tokenizer.eos_token_id


def _tokenize_pairs(tokenizer, pairs: Sequence, system_prompt, thinking_model) -> list[tuple[list[int], list[int]]]:
    """(prompt_ids, answer_ids) per pair; answer_ids end with the end-of-turn id.

    Batched, because one call into the Rust tokenizer is much faster than a loop of small ones.
    """
    eot_id = end_of_turn_id(tokenizer)
    eot = tokenizer.convert_ids_to_tokens(eot_id)
    prompts = [render_prompt(tokenizer, p, system_prompt, thinking_model) for p in pairs]
    fulls = [prompt + p.answer + eot for prompt, p in zip(prompts, pairs)]
    prompt_ids = _batch_ids(tokenizer, prompts)
    full_ids = _batch_ids(tokenizer, fulls)

    out = []
    for pair, prompt, full in zip(pairs, prompt_ids, full_ids):
        if full[: len(prompt)] == prompt and len(full) > len(prompt):
            answer = full[len(prompt) :]
        else:
            # The template's prompt ends in "\n", so the split holds unless the answer itself
            # starts with whitespace+newline ("\n\nfoo" pre-tokenizes as one "\n\n\n" chunk).
            # Then keep the prompt exactly as inference will encode it and encode the answer
            # on its own: the model still learns to generate these answer tokens after it.
            answer = _batch_ids(tokenizer, [pair.answer + eot])[0]
        if not answer or answer[-1] != eot_id:
            raise ValueError(f"{_where(pair)}: answer encoding does not end with {eot!r}; is it a ChatML tokenizer?")
        out.append((prompt, answer))
    return out


def _batch_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    return tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]


def _where(pair) -> str:
    return f"{getattr(pair, 'source', '?')}:{getattr(pair, 'line', '?')}"


def _fit(prompt: list[int], answer: list[int], max_length: int, overflow: str) -> dict | None:
    """Apply the length policy to one tokenized pair; None means dropped."""
    truncated = False
    if len(prompt) + len(answer) > max_length:
        # Room for answer text once the prompt and the end-of-turn are in.
        room = max_length - len(prompt) - 1
        if overflow == "drop" or room < 1:
            return None
        # Cut the answer, never the prompt, and keep the end-of-turn so the model still sees
        # (and learns) a terminated turn.
        answer = answer[:room] + answer[-1:]
        truncated = True
    return {
        "input_ids": prompt + answer,
        "labels": [IGNORE_INDEX] * len(prompt) + answer,
        "prompt_tokens": len(prompt),
        "answer_tokens": len(answer),  # labelled tokens, end-of-turn included
        "truncated": truncated,
    }


def _check_policy(max_length: int, overflow: str) -> None:
    if overflow not in OVERFLOW_POLICIES:
        raise ValueError(f"overflow must be one of {OVERFLOW_POLICIES}, got {overflow!r}")
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")


def encode_pairs(
    tokenizer,
    pairs: Sequence,
    max_length: int,
    system_prompt: str | None = None,
    thinking_model: bool = False,
    overflow: str = "truncate",
) -> tuple[list[dict], EncodeReport]:
    _check_policy(max_length, overflow)
    pairs = list(pairs)
    report = EncodeReport(total=len(pairs))
    examples = []
    for pair, (prompt, answer) in zip(pairs, _tokenize_pairs(tokenizer, pairs, system_prompt, thinking_model)):
        example = _fit(prompt, answer, max_length, overflow)
        if example is None:
            report.dropped += 1
            report.dropped_sources.append(_where(pair))
            continue
        report.truncated += example["truncated"]
        examples.append(example)
    report.kept = len(examples)
    return examples, report


# ---------------------------------------------------------------------------------------------
# Length statistics (the solver picks the sequence length from these)


def length_stats(tokenizer, pairs: Sequence, system_prompt: str | None = None, thinking_model: bool = False) -> dict:
    """Untruncated token lengths: {"count", "prompt", "answer", "total"}.

    Each of prompt/answer/total is {p50, p90, p95, p99, max, mean}; answer includes the
    end-of-turn token, total = prompt + answer = the length encode_pairs would need.
    Percentiles are nearest-rank (the smallest length with at least p% of examples at or below
    it), so every value is a length that actually occurs: "p95 = 812" means a max_length of 812
    keeps 95% of examples whole. An empty input gives count 0 and all-zero stats.
    """
    encoded = _tokenize_pairs(tokenizer, list(pairs), system_prompt, thinking_model)
    prompt = [len(p) for p, _ in encoded]
    answer = [len(a) for _, a in encoded]
    total = [p + a for p, a in zip(prompt, answer)]
    return {"count": len(encoded), "prompt": _summary(prompt), "answer": _summary(answer), "total": _summary(total)}


def nearest_rank(sorted_values: Sequence[int], pct: float) -> int:
    if not sorted_values:
        return 0
    rank = max(1, math.ceil(pct / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def _summary(values: list[int]) -> dict:
    ordered = sorted(values)
    stats: dict[str, float] = {f"p{p}": nearest_rank(ordered, p) for p in (50, 90, 95, 99)}
    stats["max"] = ordered[-1] if ordered else 0
    stats["mean"] = sum(ordered) / len(ordered) if ordered else 0.0
    return stats


# ---------------------------------------------------------------------------------------------
# On-disk cache


def tokenizer_fingerprint(tokenizer) -> str:
    """Name + vocab size + chat template + a probe encoding: any of these changing changes ids."""
    template = (
        tokenizer.chat_template
        if isinstance(tokenizer.chat_template, str)
        else json.dumps(tokenizer.chat_template, sort_keys=True)
    )
    probe = tokenizer(_PROBE_TEXT, add_special_tokens=False)["input_ids"]
    parts = [
        str(tokenizer.name_or_path),
        str(len(tokenizer)),
        _sha256(template or ""),
        _sha256(json.dumps(probe)),
    ]
    return _sha256("\0".join(parts))


def cache_key(
    tokenizer, pairs: Sequence, max_length: int, *, system_prompt, thinking_model: bool, overflow: str
) -> str:
    h = hashlib.sha256()
    settings = {
        "encoding_version": ENCODING_VERSION,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "system_prompt": system_prompt,
        "thinking_model": thinking_model,
        "overflow": overflow,
        "max_length": max_length,
    }
    h.update(json.dumps(settings, sort_keys=True).encode())
    for pair in pairs:
        # source/line are in the key because the cached report names dropped pairs by them.
        record = [
            pair.question,
            pair.answer,
            getattr(pair, "system", None),
            _history_messages(getattr(pair, "history", ()) or ()),
            str(getattr(pair, "source", "")),
            getattr(pair, "line", None),
        ]
        h.update(json.dumps(record, ensure_ascii=False).encode())
        h.update(b"\n")
    return h.hexdigest()


def load_or_encode(
    tokenizer,
    pairs: Sequence,
    max_length: int,
    cache_dir: str | os.PathLike | None,
    *,
    system_prompt: str | None = None,
    thinking_model: bool = False,
    overflow: str = "truncate",
) -> tuple[list[dict], EncodeReport, bool]:
    """encode_pairs with a JSON cache at cache_dir/<key>.json; returns (examples, report, cache_hit).

    The key covers the data, the tokenizer and every option, so any change is a miss. A
    cache file that is unreadable or malformed is treated as a miss and overwritten.
    cache_dir=None disables caching.
    """
    _check_policy(max_length, overflow)
    pairs = list(pairs)
    opts: dict[str, Any] = dict(system_prompt=system_prompt, thinking_model=thinking_model, overflow=overflow)
    if cache_dir is None:
        return (*encode_pairs(tokenizer, pairs, max_length, **opts), False)

    key = cache_key(tokenizer, pairs, max_length, **opts)
    path = Path(cache_dir) / f"{key}.json"
    cached = _read_cache(path, key)
    if cached is not None:
        return (*cached, True)

    examples, report = encode_pairs(tokenizer, pairs, max_length, **opts)
    atomic_write_json(
        path,
        {
            "key": key,
            "encoding_version": ENCODING_VERSION,
            "report": asdict(report),
            "examples": [_pack(ex) for ex in examples],
        },
    )
    return examples, report, False


# Cached examples are stored as {"ids": "1 2 3", "prompt_tokens": n, "truncated": b}: labels
# follow from ids + prompt_tokens, and a string keeps atomic_write_json's indented output to one
# line per example instead of one line per token.


def _pack(example: dict) -> dict:
    return {
        "ids": " ".join(map(str, example["input_ids"])),
        "prompt_tokens": example["prompt_tokens"],
        "truncated": example["truncated"],
    }


def _unpack(packed: dict) -> dict:
    ids = [int(t) for t in packed["ids"].split()]
    n = packed["prompt_tokens"]
    if not isinstance(n, int) or not 0 < n < len(ids) or not isinstance(packed["truncated"], bool):
        raise ValueError("malformed cached example")
    return {
        "input_ids": ids,
        "labels": [IGNORE_INDEX] * n + ids[n:],
        "prompt_tokens": n,
        "answer_tokens": len(ids) - n,
        "truncated": packed["truncated"],
    }


def _read_cache(path: Path, key: str) -> tuple[list[dict], EncodeReport] | None:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if data["key"] != key or data["encoding_version"] != ENCODING_VERSION:
            return None
        report = EncodeReport(**data["report"])
        examples = [_unpack(packed) for packed in data["examples"]]
        if len(examples) != report.kept:
            return None
        return examples, report
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        # Truncated/edited/foreign file: rebuild rather than crash a training run over a cache.
        return None


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# ---------------------------------------------------------------------------------------------
# Batching


class CausalLMCollator:
    """Right-pad encoded examples into LongTensors: input_ids, attention_mask, labels.

    Padding uses `pad_token_id` for inputs, -100 for labels (ignored by the loss) and 0 in the
    attention mask. The batch length is the longest example, rounded up to
    `pad_to_multiple_of` (tensor-core friendly); `pad_to_length` forces a fixed length instead,
    which the solver uses to measure worst-case memory. An example longer than
    `pad_to_length` is an error, not silently cut.
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None, pad_to_length: int | None = None):
        if pad_token_id is None:
            raise ValueError("pad_token_id is required (Qwen uses <|endoftext|>)")
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of
        self.pad_to_length = pad_to_length

    def _target_length(self, longest: int) -> int:
        if self.pad_to_length is not None:
            if longest > self.pad_to_length:
                raise ValueError(f"example of {longest} tokens exceeds pad_to_length={self.pad_to_length}")
            length = self.pad_to_length
        else:
            length = longest
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        return length

    def __call__(self, features: Sequence[Mapping]) -> dict:
        import torch

        length = self._target_length(max(len(f["input_ids"]) for f in features))
        input_ids = torch.full((len(features), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(features), length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(features), length), dtype=torch.long)
        for row, feature in enumerate(features):
            n = len(feature["input_ids"])
            input_ids[row, :n] = torch.tensor(feature["input_ids"], dtype=torch.long)
            labels[row, :n] = torch.tensor(feature["labels"], dtype=torch.long)
            attention_mask[row, :n] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
