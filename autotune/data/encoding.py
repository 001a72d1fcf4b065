"""Turn samples into token ids + labels, the one place training and the solver agree on.

The conversation is rendered by the tokenizer's OWN chat template, so what we train on is
exactly what the model sees at inference:

    prompt = template(system? + history + user, add_generation_prompt=True)
    full   = prompt + answer + <|im_end|>

Labels are -100 over the prompt and equal to the ids over the answer *including* the
end-of-turn token, so the model learns to stop. Qwen's template writes a "\\n" after every
`<|im_end|>`; we omit it after the last turn: it is never predicted (generation stops at
`<|im_end|>`), it would only cost a token per example, and leaving it out keeps the invariant
"the last token is the labelled end-of-turn" true for truncated examples too.

Multi-turn samples train on every assistant turn of their history as well, in one row: each
assistant turn is preceded by exactly the generation prompt the template writes for it (the
text the template adds for the turns since the previous answer, read off the template by
rendering that answer as a sentinel), and only the assistant's own tokens are labelled. So
every answer is trained in the form the model generates it in, with its think block.

Reasoning traces (a pair's `reasoning`, an assistant turn's `reasoning_content`) go inside the
think block, as Qwen3 generates them: `<think>\\n{trace}\\n</think>\\n\\n{answer}`, labelled
(after the `<think>\\n` a thinking-only template puts in the prompt). Turns without a trace, and
every turn with reasoning="drop", keep the empty think block in the prompt (unlabelled).

Tools and tool calls are the template's too: a pair's `tools` go through the template's tools
section, and an assistant turn's `tool_calls` are labelled as the template writes them after its
content (the turn rendered with and without them; a template that writes nothing for them is an
error, not a turn trained without its calls). Tool turns are context like user turns. Text an
assistant turn marks `train: false` (a whole turn, or some of its parts) stays in the row, unlabelled.

Pairs are duck-typed: anything with `question`, `answer`, `source`, `line`, `system` and
`history` attributes, and optionally `reasoning`, `after`, `tools`, `answer_calls` and
`answer_parts` (autotune.data.parsing.QAPair).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

from autotune.config import OVERFLOW_POLICIES, REASONING_TRACES
from autotune.data.parsing import is_trained_turn
from autotune.errors import UserError
from autotune.fsutil import atomic_write_json

# Bump whenever the output of encode_pairs changes for the same inputs: invalidates caches.
# 2: an open <think> left by a thinking-only template is closed. 3: every assistant turn of a conversation is
# labelled; reasoning traces are trained inside the think block. 4: tools and tool calls rendered by the template,
# every assistant turn after the question labelled (tool flows, consecutive turns), per-part train flags.
ENCODING_VERSION = 4

IGNORE_INDEX = -100
END_OF_TURN = "<|im_end|>"
ASSISTANT_HEADER = "<|im_start|>assistant\n"
THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
# What Qwen3's hybrid template emits with enable_thinking=False: the answer follows it.
EMPTY_THINK = "<think>\n\n</think>\n\n"
# Stands in for the previous answer when the template renders the turns after it (see _segments).
_SENTINEL = "\u27e6autotune:previous-answer\u27e7"

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
    turns: int = 0  # assistant turns labelled, over all samples (a multi-turn sample has several)
    traces_trained: int = 0  # reasoning traces trained inside the think block
    traces_dropped: int = 0  # reasoning traces left out: reasoning_traces="drop", or no think block to put them in


# ---------------------------------------------------------------------------------------------
# Rendering


def build_messages(pair, system_prompt: str | None = None) -> list[dict[str, Any]]:
    """Chat messages for the prompt side of `pair` (everything before the answer: the history, the question and
    the turns after it, such as tool calls and their replies), as the chat template takes them.

    A pair's own `system` wins over the run-wide `system_prompt`: it is the more specific one.
    """
    messages: list[dict[str, Any]] = []
    system = getattr(pair, "system", None)
    if system is None:
        system = system_prompt
    if system is not None:
        messages.append({"role": "system", "content": system})
    messages.extend(_for_template(m) for m in _history_messages(getattr(pair, "history", ()) or ()))
    messages.append({"role": "user", "content": pair.question})
    messages.extend(_for_template(m) for m in _history_messages(getattr(pair, "after", ()) or ()))
    return messages


def _history_messages(history: Iterable[Any]) -> list[dict[str, Any]]:
    """Earlier turns, accepted as role/content messages (a copy of each, with every key it has) or as (question,
    answer) exchanges."""
    messages: list[dict[str, Any]] = []
    for turn in history:
        if isinstance(turn, Mapping):
            messages.append(dict(turn))
        elif hasattr(turn, "role") and hasattr(turn, "content"):
            messages.append({"role": turn.role, "content": turn.content})
        elif hasattr(turn, "question") and hasattr(turn, "answer"):
            messages += [{"role": "user", "content": turn.question}, {"role": "assistant", "content": turn.answer}]
        elif isinstance(turn, Sequence) and not isinstance(turn, str) and len(turn) == 2:
            messages += [{"role": "user", "content": turn[0]}, {"role": "assistant", "content": turn[1]}]
        else:
            raise TypeError(f"unsupported history turn {turn!r}: expected a role/content message or a (q, a) pair")
    return messages


# The keys of a turn the chat template reads; the others ("train", "parts") say what is labelled.
_TEMPLATE_KEYS = ("role", "content", "tool_calls", "name", "tool_call_id")


def _for_template(message: Mapping) -> dict[str, Any]:
    """A turn as the chat template takes it (no trace: the template renders an earlier turn's trace in some places
    and not in others, and the labels hold each trace where the model writes it)."""
    out = {key: message[key] for key in _TEMPLATE_KEYS if message.get(key) is not None}
    out.setdefault("content", "")
    return out


def _conversation(pair, system_prompt: str | None) -> list[dict[str, Any]]:
    """Every turn of a sample, its answer last, with every key of each (see parsing.QAPair)."""
    messages = build_messages(pair, system_prompt)
    before = [*_history_messages(getattr(pair, "history", ()) or ()), {"role": "user", "content": pair.question}]
    before += _history_messages(getattr(pair, "after", ()) or ())
    messages[len(messages) - len(before) :] = before
    answer: dict[str, Any] = {"role": "assistant", "content": pair.answer}
    if getattr(pair, "reasoning", None):
        answer["reasoning_content"] = pair.reasoning
    if getattr(pair, "answer_calls", ()):
        answer["tool_calls"] = [dict(call) for call in pair.answer_calls]
    if getattr(pair, "answer_parts", ()):
        answer["parts"] = [list(part) for part in pair.answer_parts]
    return messages + [answer]


def _tools(pair) -> list[dict] | None:
    """The tool list the chat template renders in its tools section (None: no tools section)."""
    return [dict(tool) for tool in getattr(pair, "tools", ()) or ()] or None


def render_prompt(tokenizer, pair, system_prompt: str | None = None, thinking_model: bool = False) -> str:
    """The prompt text, ending with the assistant header the answer follows.

    For a thinking model (Qwen3 hybrid) we pass enable_thinking=False, which makes the template
    emit the empty `<think>\\n\\n</think>\\n\\n` block: the model is prompted in the "answer
    directly" mode.

    Thinking-only templates (Qwen3-*-Thinking-2507) ignore enable_thinking and end the prompt
    with an open `<think>\\n`; we close it as the same empty block (whatever thinking_model
    says), else the answer would be trained, and prompted, as reasoning in a never-closed block.
    A template with no think handling at all (Qwen3-*-Instruct-2507) is left alone, even with
    thinking_model=True: that model has no thinking mode to switch off.
    """
    return _answer_prompt(tokenizer, build_messages(pair, system_prompt), thinking_model, _tools(pair))


def _render(tokenizer, messages: list[dict], tools: list[dict] | None, **options) -> str:
    """The chat template's text of `messages`, with `tools` in its tools section (None: none)."""
    return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, **options)


def _answer_prompt(tokenizer, messages: list[dict], thinking_model: bool, tools: list[dict] | None = None) -> str:
    extra = {"enable_thinking": False} if thinking_model else {}
    prompt = _render(tokenizer, messages, tools, add_generation_prompt=True, **extra)
    return _close_open_think(prompt)


def _after_header(prompt: str) -> str | None:
    """What the generation prompt writes after the last assistant header (None: no header)."""
    start = prompt.rfind(ASSISTANT_HEADER)
    return None if start < 0 else prompt[start + len(ASSISTANT_HEADER) :]


def _close_open_think(prompt: str) -> str:
    """Turn a trailing unclosed `<think>` after the last assistant header into EMPTY_THINK."""
    tail = _after_header(prompt)
    if tail is None or tail.strip() != THINK_OPEN:
        return prompt  # no think block, or one the template already closed
    return prompt[: len(prompt) - len(tail)] + EMPTY_THINK


def _generation_prompt(
    tokenizer, messages: list[dict], thinking_model: bool, reasoning: str | None, tools: list[dict] | None = None
):
    """(prompt, label prefix, trace trained) for the assistant turn that follows `messages`.

    Without a trace to train: the answer prompt (empty think block for thinking models). With one: the
    thinking-mode prompt, and the labels start with the think block, or, where a thinking-only template
    already opened it in the prompt, with the trace itself. A template with no think block at all (no
    thinking mode) cannot hold a trace: it is dropped.
    """
    answer_prompt = _answer_prompt(tokenizer, messages, thinking_model, tools)
    if reasoning is None or not thinking_model or THINK_OPEN not in (_after_header(answer_prompt) or ""):
        return answer_prompt, "", False
    thinking = _render(tokenizer, messages, tools, add_generation_prompt=True, enable_thinking=True)
    tail = (_after_header(thinking) or "").strip()
    body = reasoning.strip() + f"\n{THINK_CLOSE}\n\n"
    if tail == "":  # the hybrid template: the model opens the block itself
        return thinking, f"{THINK_OPEN}\n" + body, True
    if tail == THINK_OPEN:  # a thinking-only template opened it in the prompt
        return thinking, ("" if thinking.endswith("\n") else "\n") + body, True
    return answer_prompt, "", False


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


@dataclass
class _Segments:
    """A sample's text in order, each piece labelled or not and ending an assistant turn or not; and what happened
    to its traces."""

    parts: list[tuple[str, bool, bool]] = field(default_factory=list)  # (text, labelled, ends a trained turn)
    turns: int = 0
    traces_trained: int = 0
    traces_dropped: int = 0


def _segments(tokenizer, pair, system_prompt, thinking_model: bool, train_traces: bool, eot: str) -> _Segments:
    """Unlabelled context and labelled assistant text, alternating, for every assistant turn with something to train.

    The context before the first answer is the template's own prompt for it. The context before a later answer
    is what the template adds after the previous answer's end-of-turn, up to and including this answer's
    generation prompt: the template renders the turns with the previous answer replaced by a sentinel, and the
    text after the sentinel's end-of-turn is taken. The previous answer itself stays as it was trained (with its
    think block), so each answer is labelled exactly as the model generates it. A turn's tool calls are labelled
    as the template writes them after its content (see _calls_text); its parts marked train: false are context.
    """
    messages = _conversation(pair, system_prompt)
    tools = _tools(pair)
    if tools:
        _check_renders_tools(tokenizer, pair, tools)
    out = _Segments()
    previous = None
    after_previous = eot  # what the template writes after the previous answer's content (the sentinel), to its end
    for i, message in enumerate(messages):
        if not is_trained_turn(message):
            continue
        context = [_for_template(m) for m in messages[:i]]
        if previous is not None:
            context[previous]["content"] = _SENTINEL
        reasoning = message.get("reasoning_content")
        prompt, prefix, traced = _generation_prompt(
            tokenizer, context, thinking_model, reasoning if train_traces else None, tools
        )
        if reasoning:
            out.traces_trained += traced
            out.traces_dropped += not traced
        if previous is None:
            text = prompt
        else:
            at = prompt.find(_SENTINEL)
            text = prompt[at + len(_SENTINEL) :] if at >= 0 else ""
            if at < 0 or not text.startswith(after_previous):
                raise ValueError(
                    f"{_where(pair)}: the chat template does not write an earlier assistant turn as its content "
                    f"followed by {after_previous!r}, so the turns of a conversation cannot be labelled one by one"
                )
            text = text[len(after_previous) :]
        calls = _calls_text(tokenizer, pair, context, message, tools)
        pieces = [(text, False, False), (prefix, True, False)]
        pieces += [
            (piece, bool(trained), False) for piece, trained in message.get("parts") or [[message["content"], True]]
        ]
        out.parts += _merged([*pieces, (calls + eot, True, True)])
        out.turns += 1
        previous = i
        after_previous = _calls_text(tokenizer, pair, context, {**message, "content": _SENTINEL}, tools) + eot
    return out


def _merged(pieces: list[tuple[str, bool, bool]]) -> list[tuple[str, bool, bool]]:
    """Adjacent pieces labelled alike joined into one (each piece is tokenized on its own), empty ones dropped."""
    out: list[tuple[str, bool, bool]] = []
    for text, labelled, ends in pieces:
        if not text:
            continue
        if out and out[-1][1] == labelled:
            out[-1] = (out[-1][0] + text, labelled, ends)
        else:
            out.append((text, labelled, ends))
    return out


def _calls_text(tokenizer, pair, context: list[dict], message: Mapping, tools: list[dict] | None) -> str:
    """What the chat template writes for an assistant turn's tool calls, between its content and its end-of-turn
    ("" for a turn without tool calls): the turn rendered with and without its calls, the difference taken. A
    template that writes nothing for them would train the turn without its calls: a UserError says so."""
    if not message.get("tool_calls"):
        return ""
    turn = _for_template(message)
    plain = _render(tokenizer, [*context, {**turn, "tool_calls": None}], tools)
    called = _render(tokenizer, [*context, turn], tools)
    end = plain.rfind(END_OF_TURN)
    tail = plain[end:]
    if end < 0 or not called.startswith(plain[:end]) or not called.endswith(tail) or len(called) <= len(plain):
        raise UserError(
            f"{_where(pair)}: the tokenizer's chat template does not render an assistant turn's tool_calls (it "
            "writes them nowhere between the turn's content and its end), so the calls would not be trained. Fix: use "
            "the model's own tokenizer (tokenizer_name: null), whose Qwen3 template renders them, or write the calls "
            "as <tool_call> text in the assistant's content."
        )
    return called[end : len(called) - len(tail)]


def _check_renders_tools(tokenizer, pair, tools: list[dict]) -> None:
    """A UserError where the chat template ignores a record's tools: the model would learn to call tools it was
    never shown."""
    question = [{"role": "user", "content": pair.question}]
    if _render(tokenizer, question, tools) == _render(tokenizer, question, None):
        raise UserError(
            f"{_where(pair)}: the record has 'tools', but the tokenizer's chat template does not render a tools "
            "section, so the model would not see them. Fix: use the model's own tokenizer (tokenizer_name: null), "
            "whose Qwen3 template renders them, or remove 'tools' from the records."
        )


def _tokenize_pairs(
    tokenizer, pairs: Sequence, system_prompt, thinking_model, reasoning: str = "train"
) -> list[tuple[list[tuple[list[int], bool, bool]], _Segments]]:
    """Per pair: its token parts [(ids, labelled, ends a trained turn), ...] (a part that ends a turn ends with the
    end-of-turn id) and its segments.

    Each part is tokenized on its own, batched over all pairs (one call into the Rust tokenizer is much faster
    than a loop of small ones). A context part is then exactly what inference encodes as the prompt; at a
    context/answer seam the template's "\\n" stays its own token, as it does at inference, even where an answer
    starting with a newline would have merged with it ("\\n\\n\\n" pre-tokenizes as one chunk).
    """
    eot_id = end_of_turn_id(tokenizer)
    eot = tokenizer.convert_ids_to_tokens(eot_id)
    segments = [_segments(tokenizer, p, system_prompt, thinking_model, reasoning == "train", eot) for p in pairs]
    ids = iter(_batch_ids(tokenizer, [text for seg in segments for text, _, _ in seg.parts]))
    out = []
    for pair, seg in zip(pairs, segments):
        parts = [(next(ids), labelled, ends) for _, labelled, ends in seg.parts]
        for part, _, ends in parts:
            if ends and (not part or part[-1] != eot_id):
                raise ValueError(
                    f"{_where(pair)}: answer encoding does not end with {eot!r}; is it a ChatML tokenizer?"
                )
        out.append((parts, seg))
    return out


def _batch_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    return tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]


def _where(pair) -> str:
    return f"{getattr(pair, 'source', '?')}:{getattr(pair, 'line', '?')}"


def _fit(parts: list[tuple[list[int], bool, bool]], max_length: int, overflow: str, eot_id: int) -> dict | None:
    """Apply the length policy to one tokenized sample; None means dropped.

    Truncation cuts the labelled turn the limit falls in (ending it with its end-of-turn, so the model still sees
    and learns a terminated turn) and everything after it; where the limit falls in a turn's part that is not
    trained (train: false), that turn goes whole. Context is never cut, so a sample whose first answer has no room
    for one token and its end-of-turn is dropped. A row always ends with a labelled end-of-turn.
    """
    truncated = sum(len(ids) for ids, _, _ in parts) > max_length
    if truncated:
        if overflow == "drop":
            return None
        kept: list[tuple[list[int], bool, bool]] = []
        used = 0
        for ids, labelled, ends in parts:
            if used + len(ids) <= max_length:
                kept.append((ids, labelled, ends))
                used += len(ids)
                continue
            room = max_length - used - 1  # answer tokens that fit beside the end-of-turn
            if labelled and room >= 1:
                kept.append((ids[:room] + [eot_id], True, True))
            break
        while kept and not kept[-1][2]:
            kept.pop()
        if not kept:
            return None
        parts = kept
    input_ids: list[int] = []
    labels: list[int] = []
    for ids, labelled, _ in parts:
        input_ids += ids
        labels += ids if labelled else [IGNORE_INDEX] * len(ids)
    answer_tokens = sum(len(ids) for ids, labelled, _ in parts if labelled)
    return {
        "input_ids": input_ids,
        "labels": labels,
        "prompt_tokens": len(input_ids) - answer_tokens,  # unlabelled: system, questions, templates
        "answer_tokens": answer_tokens,  # labelled: every answer with its end-of-turn
        "truncated": truncated,
    }


def _check_policy(max_length: int, overflow: str, reasoning: str = "train") -> None:
    if overflow not in OVERFLOW_POLICIES:
        raise ValueError(f"overflow must be one of {OVERFLOW_POLICIES}, got {overflow!r}")
    if reasoning not in REASONING_TRACES:
        raise ValueError(f"reasoning must be one of {REASONING_TRACES}, got {reasoning!r}")
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")


def encode_pairs(
    tokenizer,
    pairs: Sequence,
    max_length: int,
    system_prompt: str | None = None,
    thinking_model: bool = False,
    overflow: str = "truncate",
    reasoning: str = "train",
) -> tuple[list[dict], EncodeReport]:
    _check_policy(max_length, overflow, reasoning)
    pairs = list(pairs)
    report = EncodeReport(total=len(pairs))
    examples = []
    eot_id = end_of_turn_id(tokenizer)
    for pair, (parts, seg) in zip(pairs, _tokenize_pairs(tokenizer, pairs, system_prompt, thinking_model, reasoning)):
        example = _fit(parts, max_length, overflow, eot_id)
        if example is None:
            report.dropped += 1
            report.dropped_sources.append(_where(pair))
            continue
        report.truncated += example["truncated"]
        report.turns += seg.turns
        report.traces_trained += seg.traces_trained
        report.traces_dropped += seg.traces_dropped
        examples.append(example)
    report.kept = len(examples)
    return examples, report


def labelled_spans(labels: Sequence[int]) -> list[tuple[int, int]]:
    """[start, end) of each run of labelled positions."""
    spans: list[tuple[int, int]] = []
    for i, label in enumerate(labels):
        if label == IGNORE_INDEX:
            continue
        if spans and spans[-1][1] == i:
            spans[-1] = (spans[-1][0], i + 1)
        else:
            spans.append((i, i + 1))
    return spans


# ---------------------------------------------------------------------------------------------
# Length statistics (the solver picks the sequence length from these)


def sample_lengths(
    tokenizer, pairs: Sequence, system_prompt: str | None = None, thinking_model: bool = False, reasoning="train"
) -> list[tuple[int, int]]:
    """(unlabelled, labelled) untruncated token counts of each sample."""
    encoded = _tokenize_pairs(tokenizer, list(pairs), system_prompt, thinking_model, reasoning)
    return [
        (sum(len(ids) for ids, lab, _ in parts if not lab), sum(len(ids) for ids, lab, _ in parts if lab))
        for parts, _ in encoded
    ]


def summarize_lengths(lengths: Sequence[tuple[int, int]]) -> dict:
    """{"count", "prompt", "answer", "total"} of (prompt, answer) lengths (see length_stats)."""
    prompt = [p for p, _ in lengths]
    answer = [a for _, a in lengths]
    total = [p + a for p, a in lengths]
    return {"count": len(lengths), "prompt": _summary(prompt), "answer": _summary(answer), "total": _summary(total)}


def length_stats(
    tokenizer, pairs: Sequence, system_prompt: str | None = None, thinking_model: bool = False, reasoning="train"
) -> dict:
    """Untruncated token lengths: {"count", "prompt", "answer", "total"}.

    Each of prompt/answer/total is {p50, p90, p95, p99, max, mean}; answer counts the labelled tokens (every
    assistant turn, end-of-turn included), prompt the rest, total = prompt + answer = the length encode_pairs
    would need. Percentiles are nearest-rank (the smallest length with at least p% of examples at or below
    it), so every value is a length that actually occurs: "p95 = 812" means a max_length of 812
    keeps 95% of examples whole. An empty input gives count 0 and all-zero stats.
    """
    return summarize_lengths(sample_lengths(tokenizer, pairs, system_prompt, thinking_model, reasoning))


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
    tokenizer,
    pairs: Sequence,
    max_length: int,
    *,
    system_prompt,
    thinking_model: bool,
    overflow: str,
    reasoning: str = "train",
) -> str:
    h = hashlib.sha256()
    settings = {
        "encoding_version": ENCODING_VERSION,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "system_prompt": system_prompt,
        "thinking_model": thinking_model,
        "overflow": overflow,
        "reasoning": reasoning,
        "max_length": max_length,
    }
    h.update(json.dumps(settings, sort_keys=True).encode())
    for pair in pairs:
        # source/line are in the key because the cached report names dropped pairs by them.
        # Every turn with every key (tool calls, train flags, parts), and the tools: all of it shapes the row.
        record = [
            _conversation(pair, None),
            _tools(pair),
            str(getattr(pair, "source", "")),
            getattr(pair, "line", None),
        ]
        h.update(json.dumps(record, ensure_ascii=False, sort_keys=True, default=str).encode())
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
    reasoning: str = "train",
) -> tuple[list[dict], EncodeReport, bool]:
    """encode_pairs with a JSON cache at cache_dir/<key>.json; returns (examples, report, cache_hit).

    The key covers the data, the tokenizer and every option, so any change is a miss. A
    cache file that is unreadable or malformed is treated as a miss and overwritten.
    cache_dir=None disables caching.
    """
    _check_policy(max_length, overflow, reasoning)
    pairs = list(pairs)
    opts: dict[str, Any] = dict(
        system_prompt=system_prompt, thinking_model=thinking_model, overflow=overflow, reasoning=reasoning
    )
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


# Cached examples are stored as {"ids": "1 2 3", "spans": "5:9 14:20", "truncated": b}: labels follow
# from ids + the [start, end) spans of labelled tokens, and strings keep atomic_write_json's indented output
# to one line per example instead of one line per token.


def _pack(example: dict) -> dict:
    return {
        "ids": " ".join(map(str, example["input_ids"])),
        "spans": " ".join(f"{a}:{b}" for a, b in labelled_spans(example["labels"])),
        "truncated": example["truncated"],
    }


def _unpack(packed: dict) -> dict:
    ids = [int(t) for t in packed["ids"].split()]
    spans = [tuple(int(x) for x in span.split(":")) for span in packed["spans"].split()]
    bounds = [0] + [x for span in spans for x in span]
    # Spans ascend, are non-empty and apart, the first leaves a prompt, the last ends the row.
    ordered = all(len(span) == 2 for span in spans) and all(x < y for x, y in pairwise(bounds))
    if not spans or not ordered or bounds[-1] != len(ids) or not isinstance(packed["truncated"], bool):
        raise ValueError("malformed cached example")
    labels = [IGNORE_INDEX] * len(ids)
    for a, b in spans:
        labels[a:b] = ids[a:b]
    answer = sum(b - a for a, b in spans)
    return {
        "input_ids": ids,
        "labels": labels,
        "prompt_tokens": len(ids) - answer,
        "answer_tokens": answer,
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
