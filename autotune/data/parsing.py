"""Read a data directory of QA files (markdown, JSONL, JSON, parquet, arrow, CSV), or a hub dataset, into samples.

Markdown formats (from the original Qwen3 fine-tuning guide):

* ``simple_qa``::

      Q1: What is LoRA?
      A1: A low-rank adapter ...

* ``header_qa``::

      ### Q1: What is LoRA?
      A1: A low-rank adapter ...

Both are read by one line-based parser, so a forced ``simple_qa`` still reads ``### Q1:`` lines; the
format name only says which style a file uses. A marker is recognised only at the start of a line
(up to 3 spaces, optional ``#``..``######`` heading hashes, optional ``**`` bold), the prefix must be
the whole word (``Q3:`` yes, ``FAQ3:`` no), the number is optional (``Q:`` works), and the separator is
the configured one or a full-width colon. The answer may start on the line after ``A1:``.

Answers run until the next question, a heading (``#``..``######``), a horizontal rule (``---``) or the
end of the file; everything in between is kept verbatim (lists, indentation, ``_``/``*``/backticks),
only surrounding blank lines are trimmed. Text after a heading or rule that ended an answer is in no pair
(a sub-heading inside an answer cuts it short), so it is reported as skipped; a heading followed only by
blank lines and the next question is not. Inside fenced code blocks nothing is a marker or a heading.
Setext headings (text underlined with ``===``) are not recognised: the title line would stay in the
answer. Numbers are optional, and gaps are fine, but an answer numbered differently from the open
question is skipped, like a question without an answer; every skip is listed with its line and reason.

Custom markers: ``question_pattern`` / ``answer_pattern`` are regular expressions matched at the
start of a line (``re.match``). Optional named groups: ``num`` (the pair number, used to check that
Q and A numbers match) and ``text`` (the text on the marker line; without it, the rest of the line
after the match is used).

JSON Lines / JSON records: chat ``{"messages": [{"role": ..., "content": ...}]}`` (OpenAI, with ``tool_calls`` and
``tool`` turns; content a string or text parts), ShareGPT ``{"conversations": [{"from": "human"|"gpt"|"system"|
"function_call"|"observation"|"tool", "value": ...}]}``, alpaca ``{"instruction", "input", "output"}`` (with
LLaMA-Factory's ``history``), ``{"question", "answer"}`` and TRL's ``{"prompt", "completion"}``; any of them with a
``tools`` list. A JSON file holds a list of records or ``{"data": [...]}``. Parquet, arrow and CSV files hold the
same records, one per row, read through the ``datasets`` library; so does a hub dataset (``dataset_name``).

Every key of a record is read or reported (FileReport: ``kinds``, ``skip_reasons``, ``notes``). Records of other
training modes, DPO (``chosen``/``rejected``, LLaMA-Factory's ranking format) and KTO (a boolean ``label``,
``kto_tag``), are recognised, counted and skipped here; ``refuse_other_modes`` turns them into one UserError for
the commands that train. Records with images, video or audio are skipped (Qwen3 reads text).

A record is one sample. A chat's sample is its last assistant turn with something to train (text or tool calls,
not marked ``train: false``), the last user turn before it the question, the turns before that the history and the
turns in between (tool calls, tool replies, earlier assistant turns) ``after``; every assistant turn among them is
trained on too (see encoding.py). An assistant turn's reasoning trace comes from its ``reasoning_content``, or from
a ``<think>...</think>`` block opening its text (the opening tag may be missing, as thinking-only models write it),
or with ``reasoning_markers: think`` from a ``<|begin_of_thought|>`` or ``<reasoning>`` block; the answer is the
text after the block.

This module must stay cheap to import: no torch, no transformers, no datasets (imported when read).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from autotune.config import DATA_FORMATS, MARKDOWN_FORMATS, TABLE_FORMATS
from autotune.errors import UserError

MARKDOWN_EXTENSIONS = (".md", ".markdown")
EXTENSIONS: dict[str, tuple[str, ...]] = {
    "simple_qa": MARKDOWN_EXTENSIONS,
    "header_qa": MARKDOWN_EXTENSIONS,
    "jsonl": (".jsonl",),
    "json": (".json",),
    **{fmt: (f".{fmt}",) for fmt in TABLE_FORMATS},
}
EXTENSIONS["auto"] = tuple(dict.fromkeys(ext for fmt in DATA_FORMATS if fmt != "auto" for ext in EXTENSIONS[fmt]))
# What `Dataset.save_to_disk` writes beside its *.arrow files: metadata, not data.
DATASETS_METADATA = ("dataset_info.json", "state.json", "dataset_dict.json")

FULL_WIDTH_COLON = "\uff1a"
UTF8_BOM = b"\xef\xbb\xbf"


# --------------------------------------------------------------------------------------------------
# Data model


@dataclass(frozen=True)
class QAPair:
    """One training sample: a conversation whose last turn is `answer` to `question`.

    `history` holds the turns before `question` and `after` the turns between it and the answer (an agent's tool
    calls, the tools' replies, earlier assistant turns of the same reply), each a {"role", "content"} dict; an
    assistant turn may add "reasoning_content", "tool_calls" (OpenAI's shape, rendered by the chat template),
    "train": False (context, not trained) or "parts" ([text, trained] pieces of its content, from per-part train
    flags); a tool turn may add "name" and "tool_call_id". Every assistant turn with something to train is trained
    on, not only the last answer. `reasoning` is the answer's reasoning trace (the text of its think block), None
    when it has none; `answer_calls` and `answer_parts` are the answer's own tool calls and parts. `tools` is the
    record's tool list, which the chat template renders in its tools section.
    """

    question: str
    answer: str
    source: str  # file path relative to data_dir, with forward slashes
    line: int  # 1-based line where the question starts (JSONL: the record's line; JSON, tables: record index + 1)
    system: str | None = None
    history: tuple = ()  # earlier chat turns: ({"role": ..., "content": ...}, ...)
    reasoning: str | None = None
    after: tuple = ()  # turns between the question and the answer
    tools: tuple = ()  # tool schemas ({"type": "function", "function": {...}} or the function itself)
    answer_calls: tuple = ()  # the answer's tool calls
    answer_parts: tuple = ()  # the answer's content as (text, trained) pieces, where per-part flags split it

    def __hash__(self) -> int:
        # The generated hash would fail on the history dicts; equal pairs still hash equal without them.
        return hash((self.question, self.answer, self.source, self.line, self.system, len(self.history)))

    @property
    def turns(self) -> int:
        """Assistant turns trained on: the answer and each assistant turn before it with something to train."""
        return 1 + sum(1 for t in (*self.history, *self.after) if is_trained_turn(t))

    @property
    def traces(self) -> int:
        """Assistant turns that carry a reasoning trace."""
        return (self.reasoning is not None) + sum(
            1 for t in (*self.history, *self.after) if is_trained_turn(t) and t.get("reasoning_content")
        )

    def to_json(self) -> dict:
        out: dict[str, Any] = {
            "question": self.question,
            "answer": self.answer,
            "source": self.source,
            "line": self.line,
        }
        if self.reasoning is not None:
            out["reasoning"] = self.reasoning
        if self.system is not None:
            out["system"] = self.system
        if self.history:
            out["history"] = [dict(turn) for turn in self.history]
        for name in ("after", "tools", "answer_calls"):
            if getattr(self, name):
                out[name] = [dict(item) for item in getattr(self, name)]
        if self.answer_parts:
            out["answer_parts"] = [list(part) for part in self.answer_parts]
        return out


def is_trained_turn(turn) -> bool:
    """An assistant turn with something to train: text or tool calls, not marked train: false, and where per-part
    flags split its content, at least one part trained."""
    if not isinstance(turn, dict) or turn.get("role") != "assistant" or turn.get("train") is False:
        return False
    if turn.get("parts"):
        return any(trained for _, trained in turn["parts"]) or bool(turn.get("tool_calls"))
    return bool(str(turn.get("content") or "").strip() or turn.get("tool_calls"))


@dataclass
class FileReport:
    path: str
    format: str
    pairs: int  # samples: one per markdown pair, per JSON record, per table row
    skipped: list[dict] = field(default_factory=list)  # each {"line": int, "reason": str}
    encoding: str = "utf-8"
    encoding_guessed: bool = False  # no BOM, not UTF-8: read as GBK/GB18030 because it reads as Chinese
    # Records by the format recognised, used or skipped: chat, sharegpt, alpaca, qa, prompt-completion (SFT), and
    # dpo, kto (other training modes, never trained here).
    kinds: dict[str, int] = field(default_factory=dict)
    turns: int = 0  # assistant turns trained on (a multi-turn record has several)
    traces: int = 0  # of which carry a reasoning trace
    skip_reasons: dict[str, int] = field(default_factory=dict)  # skipped items by kind of reason
    # Records used whose reading changed or left out something, by what: a key not read, turns after the last
    # answer, reasoning markers mapped into the think block (or left as text), a tool reply's own tags removed.
    notes: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "path": self.path,
            "format": self.format,
            "pairs": self.pairs,
            "turns": self.turns,
            "traces": self.traces,
            "kinds": dict(self.kinds),
            "skipped": [dict(s) for s in self.skipped],
            "skip_reasons": dict(self.skip_reasons),
            "notes": dict(self.notes),
            "encoding": self.encoding,
            "encoding_guessed": self.encoding_guessed,
        }


def _file_report(
    source: str, fmt: str, pairs: list[QAPair], skipped: list[dict], kinds=None, skip_reasons=None, notes=None
) -> FileReport:
    return FileReport(
        source,
        fmt,
        len(pairs),
        skipped,
        kinds=dict(kinds or {}),
        turns=sum(p.turns for p in pairs),
        traces=sum(p.traces for p in pairs),
        skip_reasons=dict(skip_reasons or {}),
        notes=dict(notes or {}),
    )


def _count(counts: dict[str, int], key: str, n: int = 1) -> None:
    counts[key] = counts.get(key, 0) + n


@dataclass
class DataReport:
    files: list[FileReport]
    pairs: list[QAPair]
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {
            "files": [f.to_json() for f in self.files],
            "pairs": [p.to_json() for p in self.pairs],
            "totals": {name: self.totals(name) for name in ("kinds", "skip_reasons", "notes")},
        }

    def totals(self, name: str) -> dict[str, int]:
        """One of the files' counts (kinds, skip_reasons, notes) summed over every file."""
        out: dict[str, int] = {}
        for f in self.files:
            for key, n in getattr(f, name).items():
                _count(out, key, n)
        return out

    def summary(self) -> list[str]:
        """The counts `data inspect` and `train` print: records by format, skipped items by reason, notes."""
        lines = []
        for name, title in (("kinds", "records by format"), ("skip_reasons", "skipped"), ("notes", "notes")):
            counts = self.totals(name)
            if counts:
                lines.append(f"{title}: " + ", ".join(f"{key} {n}" for key, n in sorted(counts.items())))
        return lines


# --------------------------------------------------------------------------------------------------
# Reasoning traces

# A think block opening the answer; the opening tag may be missing, as in the output of templates that put
# `<think>` in the prompt (Qwen3-*-Thinking-2507), and as Qwen3's own template accepts.
THINK_CLOSE_TAG = "</think>"
_THINK_BLOCK = re.compile(r"\A\s*(?:<think>)?(?P<reasoning>.*?)</think>(?P<answer>.*)\Z", re.DOTALL)


class BrokenThink(ValueError):
    """An answer whose think block is not one block: opened and never closed, or nested. Trained as written, the
    model would learn to emit broken tags; the sample is skipped with this reason."""


def split_reasoning(text: str) -> tuple[str | None, str]:
    """(reasoning trace or None, answer) of an assistant text that may open with a `<think>...</think>` block.

    An empty block (`<think>\\n\\n</think>`, what Qwen3 writes for "no thinking") is no trace. BrokenThink for a
    block opened and not closed, or a second block inside or after the first.
    """
    opens = text.lstrip().startswith("<think>")
    if opens and "</think>" not in text:
        raise BrokenThink("think block opened and never closed (<think> without </think>)")
    if "</think>" not in text or ("<think>" in text and not opens):
        return None, text
    m = _THINK_BLOCK.match(text)
    if m is None:  # pragma: no cover - the checks above make the pattern match
        return None, text
    if "<think>" in m["reasoning"] or "<think>" in m["answer"] or "</think>" in m["answer"]:
        raise BrokenThink("think blocks nested or repeated (a <think> or </think> after the first opens)")
    reasoning = m["reasoning"].strip()
    return (reasoning or None), m["answer"].strip()


# Other common reasoning-trace markers, as (opening, closing) tags, and the wrapper some put around the answer after
# them (Bespoke-Stratos / OpenThoughts: <|begin_of_solution|>...<|end_of_solution|>), removed with them.
REASONING_MARKERS: dict[str, tuple[str, str, tuple[str, str] | None]] = {
    "<|begin_of_thought|>": (
        "<|begin_of_thought|>",
        "<|end_of_thought|>",
        ("<|begin_of_solution|>", "<|end_of_solution|>"),
    ),
    "<reasoning>": ("<reasoning>", "</reasoning>", None),
}


def split_marked_reasoning(text: str) -> tuple[str | None, str | None, str]:
    """(marker, reasoning trace, answer) of a text opening with one of REASONING_MARKERS' blocks; (None, None, text)
    for a text that opens with none. BrokenThink for a block opened and never closed, or opened twice."""
    stripped = text.lstrip()
    for name, (opening, closing, wrapper) in REASONING_MARKERS.items():
        if not stripped.startswith(opening):
            continue
        body, sep, answer = stripped[len(opening) :].partition(closing)
        if not sep:
            raise BrokenThink(f"reasoning block opened and never closed ({opening} without {closing})")
        if opening in body or opening in answer or closing in answer:
            raise BrokenThink(f"reasoning blocks nested or repeated (a second {opening} or {closing})")
        answer = answer.strip()
        if wrapper and answer.startswith(wrapper[0]) and answer.endswith(wrapper[1]):
            answer = answer[len(wrapper[0]) : len(answer) - len(wrapper[1])].strip()
        return name, body.strip() or None, answer
    return None, None, text


def reasoning_and_answer(text: str, markers: str, notes: dict[str, int]) -> tuple[str | None, str]:
    """(reasoning trace or None, answer) of an assistant text: a <think> block, or with reasoning_markers "think" one
    of the other markers' blocks; what was done with other markers is counted in `notes` (said by `data inspect`)."""
    reasoning, answer = split_reasoning(text)
    if reasoning is not None or THINK_CLOSE_TAG in text:
        return reasoning, answer
    marker, marked, rest = split_marked_reasoning(text) if markers == "think" else (_marker_in(text), None, text)
    if marker is None:
        return None, text
    if markers == "think":
        _count(notes, f"{marker} reasoning mapped into the think block")
        return marked, rest
    _count(notes, f"{marker} reasoning left as answer text (reasoning_markers: text)")
    return None, text


def _marker_in(text: str) -> str | None:
    stripped = text.lstrip()
    return next((name for name in REASONING_MARKERS if stripped.startswith(name)), None)


# --------------------------------------------------------------------------------------------------
# Decoding


@dataclass(frozen=True)
class Decoded:
    """A data file's text and how it was decoded: `guessed` when no BOM or strict UTF-8 settled it."""

    text: str
    encoding: str
    guessed: bool = False


# The share of a GB18030 reading's non-ASCII characters that must lie in GB2312 (the common simplified
# Chinese set) for the reading to be believed. Real GBK text is almost all GB2312; bytes of a Latin-1 or
# Windows-1252 file that happen to pair up as GB18030 mostly land outside it (mojibake).
_GB2312_SHARE = 0.95


def read_text(path: str | os.PathLike, encoding: str | None = None) -> Decoded:
    """Decode a data file strictly: `encoding` when the config names one (data_encoding); else a BOM (UTF-8,
    UTF-16) or valid UTF-8 settles it; else a legacy CJK encoding when exactly one of them reads as its script
    (a guess, said as such); two plausible readings (Korean EUC-KR bytes also decode as Chinese GB18030) are a
    UserError asking which; none, a UserError naming the first line that is not UTF-8. Nothing is ever decoded with
    replacement characters, so mojibake cannot pass silently."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise UserError(
            f"{path}: cannot read data file ({e.strerror or e}). Fix: check the path and its permissions."
        ) from e
    if encoding is not None:
        return Decoded(_strict(data, encoding, path, named=True), encoding)
    if data.startswith(UTF8_BOM):
        return Decoded(_strict(data[len(UTF8_BOM) :], "utf-8", path), "utf-8-sig")
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return Decoded(_strict(data, "utf-16", path), "utf-16")
    try:
        return Decoded(data.decode("utf-8"), "utf-8")
    except UnicodeDecodeError as exc:
        first_bad = exc.start
    readings = {}
    for candidate, reads_as in LEGACY_ENCODINGS.items():
        try:
            text = data.decode(candidate)
        except UnicodeDecodeError:
            continue
        if reads_as(text):
            readings[candidate] = text
    if len(readings) == 1:
        (guess, text), *_ = readings.items()
        return Decoded(text, guess, guessed=True)
    line = data.count(b"\n", 0, first_bad) + 1
    if readings:
        shown = "; ".join(f"as {name}: {text[:40]!r}" for name, text in readings.items())
        raise UserError(
            f"{path}:{line}: not UTF-8, and it reads two ways ({shown}). Fix: set data_encoding to the file's "
            f"encoding (--set data_encoding={next(iter(readings))}, or one of {', '.join(readings)}), or re-save the "
            "file as UTF-8."
        )
    raise UserError(
        f"{path}:{line}: not UTF-8 (byte 0x{data[first_bad]:02x}), and not Chinese GBK text either: it is likely "
        "Latin-1/Windows-1252 or binary. Fix: re-save the file as UTF-8 (most editors: 'Save with encoding' -> "
        "UTF-8)."
    )


def _strict(data: bytes, encoding: str, path, *, named: bool = False) -> str:
    try:
        return data.decode(encoding)
    except LookupError:
        raise UserError(
            f"data_encoding {encoding!r} is no encoding Python knows. Fix: a codec name such as utf-8, gb18030, "
            "cp949 (Korean), cp932 (Japanese), big5, cp1252."
        ) from None
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        why = (
            f"is not valid {encoding} (data_encoding)"
            if named
            else f"starts with a {encoding} byte-order mark but is not valid {encoding}"
        )
        raise UserError(f"{path}:{line}: the file {why}. Fix: re-save it as UTF-8.") from None


def _share(text: str, wanted) -> float:
    """The share of the text's non-ASCII characters for which `wanted` holds (0 where there is none)."""
    wide = [c for c in text if ord(c) > 0x7F]
    return sum(map(wanted, wide)) / len(wide) if wide else 0.0


def _reads_as_korean(text: str) -> bool:
    return _share(text, lambda c: "\uac00" <= c <= "\ud7a3" or "\u3130" <= c <= "\u318f") >= 0.8


def _reads_as_japanese(text: str) -> bool:
    kana = _share(text, lambda c: "\u3040" <= c <= "\u30ff")
    common = _share(text, lambda c: "\u3000" <= c <= "\u30ff" or "\u4e00" <= c <= "\u9fff" or "\uff00" <= c <= "\uffef")
    return kana >= 0.2 and common >= 0.95


def _in_gb2312(c: str) -> bool:
    try:
        c.encode("gb2312")
    except UnicodeEncodeError:
        return False
    return True


def _reads_as_chinese(text: str) -> bool:
    return _share(text, _in_gb2312) >= _GB2312_SHARE


# The legacy encodings a data file without a BOM that is not UTF-8 may be in, and how to tell that a decoding reads
# as the script it is for. Several may decode the same bytes (EUC-KR Korean also decodes as GB18030 Chinese
# garble): then read_text asks for data_encoding.
LEGACY_ENCODINGS = {"gb18030": _reads_as_chinese, "cp949": _reads_as_korean, "cp932": _reads_as_japanese}


def _split_lines(text: str) -> list[str]:
    # Not str.splitlines(): it also splits on form feeds and U+2028, which would shift line numbers
    # away from what an editor shows.
    if text.startswith("\ufeff"):
        text = text[1:]
    return text.replace("\r\n", "\n").replace("\r", "\n").split("\n")


# --------------------------------------------------------------------------------------------------
# Markdown


@dataclass(frozen=True)
class _Marker:
    num: int | None
    text: str
    styled: bool  # written as a heading or in bold (header_qa style)


@dataclass(frozen=True)
class Markers:
    """How markdown files mark questions and answers: the config's prefixes and separator ("Q1:" / "A1:"),
    or regexes that override them."""

    question_prefix: str = "Q"
    answer_prefix: str = "A"
    separator: str = ":"
    question_pattern: str | None = None
    answer_pattern: str | None = None

    @classmethod
    def of(cls, cfg) -> Markers:
        """A config's markers (any object with those attributes: autotune.config.Config in practice)."""
        return cls(*(getattr(cfg, f.name) for f in fields(cls)))

    def example(self) -> tuple[str, str]:
        """What a question line and an answer line look like, for messages."""
        q = self.question_pattern or f"{self.question_prefix}1{self.separator} ..."
        a = self.answer_pattern or f"{self.answer_prefix}1{self.separator} ..."
        return q, a


def check_markers(markers: Markers) -> None:
    """A UserError where the question/answer markers cannot work (an empty separator, a regex that does not
    compile), before any file is read."""
    _MarkerMatcher(markers)


class _MarkerMatcher:
    """Recognises question/answer marker lines, from prefixes or from user regexes."""

    def __init__(self, markers: Markers):
        m = markers
        _check_prefixes(m.question_prefix, m.answer_prefix, m.separator, m.question_pattern, m.answer_pattern)
        self.question = _compile_user_pattern("question_pattern", m.question_pattern) or _builtin_marker(
            m.question_prefix, m.separator
        )
        self.answer = _compile_user_pattern("answer_pattern", m.answer_pattern) or _builtin_marker(
            m.answer_prefix, m.separator
        )

    def match_question(self, line: str) -> _Marker | None:
        return _match_marker(self.question, line)

    def match_answer(self, line: str) -> _Marker | None:
        return _match_marker(self.answer, line)


def _check_prefixes(question_prefix, answer_prefix, separator, question_pattern, answer_pattern) -> None:
    # A prefix (and with it the separator) is only needed when no pattern replaces it.
    needed = {}
    if not question_pattern:
        needed["question_prefix"] = (question_prefix, "Q")
    if not answer_pattern:
        needed["answer_prefix"] = (answer_prefix, "A")
    if needed:
        needed["separator"] = (separator, ":")
    for key, (value, default) in needed.items():
        if not isinstance(value, str) or not value.strip():
            raise UserError(f"{key}: must be a non-empty string, got {value!r}. Fix: set {key} (default {default!r}).")
    if "question_prefix" in needed and "answer_prefix" in needed and question_prefix.strip() == answer_prefix.strip():
        raise UserError(
            f"question_prefix and answer_prefix are both {question_prefix!r}, so questions and answers cannot be told apart. "
            "Fix: use different prefixes (default Q and A)."
        )


def _builtin_marker(prefix: str, separator: str) -> re.Pattern:
    seps = sorted({separator.strip(), FULL_WIDTH_COLON}, key=len, reverse=True)
    sep = "(?:" + "|".join(re.escape(s) for s in seps) + ")"
    bold = r"(?:\*\*|__)"
    return re.compile(
        r"[ ]{0,3}(?P<hashes>\#{1,6}[ \t]+)?"  # optional ATX heading (header_qa)
        rf"(?P<bold>{bold})?"  # optional **Q1:** bold marker
        rf"{re.escape(prefix.strip())}[ \t]*(?P<num>\d+)?[ \t]*"  # the prefix must start right here: FAQ3 is no marker
        rf"{bold}?[ \t]*{sep}[ \t]*(?P<close>{bold})?"
        r"(?P<text>.*)$"
    )


def _compile_user_pattern(key: str, pattern: str | None) -> re.Pattern | None:
    if pattern is None or pattern == "":
        return None
    if not isinstance(pattern, str):
        raise UserError(
            f"{key}: must be a regular expression string, got {type(pattern).__name__}. Fix: quote it in the config."
        )
    try:
        compiled = re.compile(pattern)
    except re.error as e:
        raise UserError(
            f"{key}: invalid regular expression {pattern!r}: {e}. Fix: correct the regex (it is matched at the start of each line)."
        ) from e
    if compiled.match(""):
        raise UserError(
            f"{key}: the regular expression {pattern!r} matches an empty line, so every line would be a marker. "
            "Fix: make it require the marker text, e.g. '^Q\\d+:'."
        )
    return compiled


def _match_marker(pattern: re.Pattern, line: str) -> _Marker | None:
    m = pattern.match(line)
    if m is None:
        return None
    groups = m.groupdict()
    text = groups["text"] if groups.get("text") is not None else line[m.end() :]
    text = text.strip()
    if groups.get("hashes"):
        text = re.sub(r"(^|[ \t]+)#+$", "", text).strip()  # optional closing hashes of an ATX heading
    if groups.get("bold") and not groups.get("close") and text.endswith(groups["bold"]):
        text = text[: -len(groups["bold"])].rstrip()  # **Q1: whole question in bold**
    num = groups.get("num")
    try:
        number = int(num) if num else None
    except ValueError:  # a user group named num that caught something other than digits
        number = None
    styled = bool(groups.get("hashes") or groups.get("bold")) or line.lstrip().startswith(("#", "**"))
    return _Marker(number, text, styled)


_HEADING = re.compile(r"[ ]{0,3}#{1,6}(?:[ \t]|$)")
_THEMATIC_BREAK = re.compile(r"[ ]{0,3}([-*_])(?:[ \t]*\1){2,}[ \t]*$")
_FENCE_OPEN = re.compile(r"[ \t]*(`{3,}|~{3,})")


class _Fence:
    """Tracks fenced code blocks: inside one, marker and heading lines are plain content.

    Fences may be indented (inside list items), so any indentation opens or closes one.
    """

    def __init__(self):
        self.marker: str | None = None
        self.opened_at = 0

    def feed(self, number: int, line: str) -> bool:
        """Return True when `line` belongs to a code block (its opening and closing fence included)."""
        if self.marker is None:
            m = _FENCE_OPEN.match(line)
            if m and not (m.group(1)[0] == "`" and "`" in line[m.end() :]):  # ```x``` is inline code, no fence
                self.marker, self.opened_at = m.group(1), number
                return True
            return False
        stripped = line.strip()
        if stripped and set(stripped) == {self.marker[0]} and len(stripped) >= len(self.marker):
            self.marker = None
        return True


@dataclass
class _AfterBreak:
    """A heading or horizontal rule that ended an answer, and the text lines that follow it.

    Those lines belong to no pair; counting them lets the parser report text cut off by a
    sub-heading inside an answer instead of dropping it silently.
    """

    line: int
    marker: str  # the heading / rule line as written
    kind: str  # "heading" or "horizontal rule"
    text_lines: int = 0


@dataclass
class _Open:
    """The question (and maybe answer) being collected."""

    question: _Marker
    line: int
    question_lines: list[str]
    answer: _Marker | None = None
    answer_lines: list[str] = field(default_factory=list)


class _MarkdownParser:
    def __init__(self, source: str, matcher: _MarkerMatcher, reasoning_markers: str = "think"):
        self.source = source
        self.matcher = matcher
        self.reasoning_markers = reasoning_markers
        self.skip_reasons: dict[str, int] = {}
        self.notes: dict[str, int] = {}
        self.pairs: list[QAPair] = []
        self.skipped: list[dict] = []
        self.styled_questions = 0
        self.open: _Open | None = None
        self.discarding = False  # inside the body of a skipped answer
        self.after_break: _AfterBreak | None = None

    def parse(self, text: str) -> None:
        fence = _Fence()
        for number, line in enumerate(_split_lines(text), start=1):
            if fence.feed(number, line):
                self._content(line)
            else:
                self._line(number, line)
        self._end_break()
        self._close()
        if fence.marker is not None:
            # Markdown reads the rest of the file as code, and so do we; say so, since later pairs vanish.
            self._skip(fence.opened_at, "code fence opened here is never closed; the rest of the file was read as code")

    def _line(self, number: int, line: str) -> None:
        """Handle one line outside code blocks."""
        question = self.matcher.match_question(line)
        if question is not None:
            self._end_break()
            self._close()
            self.styled_questions += question.styled
            self.open = _Open(question, number, [question.text])
            return
        answer = self.matcher.match_answer(line)
        if answer is not None:
            self._end_break()
            self._answer(number, answer)
        elif _HEADING.match(line) or _THEMATIC_BREAK.match(line):
            # A heading or horizontal rule starts something new: it never belongs to the answer above.
            # Text under it, up to the next marker, is then in no pair; it is likely the rest of the
            # answer (e.g. "#### Linux" steps), so it is counted and reported. Later headings in that
            # stretch (a "#### macOS" after it) are watched too; a heading that ends no answer (a
            # title above the first question) is not: prose under it is not lost answer text.
            ends_answer = self.open is not None and self.open.answer is not None
            if ends_answer or self.after_break is not None:
                self._end_break()
                kind = "heading" if _HEADING.match(line) else "horizontal rule"
                self.after_break = _AfterBreak(number, line.strip(), kind)
            self._close()
        else:
            self._content(line)

    def _answer(self, number: int, answer: _Marker) -> None:
        current = self.open
        if current is None or current.answer is not None:
            self._close()
            self._skip(number, "answer without a question before it")
            self.discarding = True
            return
        if answer.num is not None and current.question.num is not None and answer.num != current.question.num:
            self._skip(
                number,
                f"answer number {answer.num} does not match question number {current.question.num} (line {current.line})",
                "answer numbered unlike its question",
            )
            self.discarding = True
            return
        current.answer = answer
        current.answer_lines = [answer.text]
        self.discarding = False

    def _content(self, line: str) -> None:
        if self.after_break is not None:
            self.after_break.text_lines += bool(line.strip())
            return
        if self.discarding or self.open is None:
            return  # prose outside any pair, or the body of a skipped answer
        target = self.open.answer_lines if self.open.answer is not None else self.open.question_lines
        target.append(line)

    def _close(self) -> None:
        current, self.open, self.discarding = self.open, None, False
        if current is None:
            return
        question = _trim_block(current.question_lines)
        if current.answer is None:
            self._skip(current.line, "question without answer")
        elif not question:
            self._skip(current.line, "empty question")
        else:
            answer = _trim_block(current.answer_lines)
            if not answer:
                self._skip(current.line, "empty answer")
            else:
                try:
                    reasoning, answer = reasoning_and_answer(answer, self.reasoning_markers, self.notes)
                except BrokenThink as exc:
                    self._skip(current.line, str(exc), "broken reasoning block")
                    return
                if not answer:
                    self._skip(current.line, "empty answer after its think block")
                else:
                    self.pairs.append(QAPair(question, answer, self.source, current.line, reasoning=reasoning))

    def _end_break(self) -> None:
        """Report the text lines after the last answer-ending heading/rule, if there were any."""
        found, self.after_break = self.after_break, None
        if found is not None and found.text_lines:
            self._skip(
                found.line,
                f"text after {found.kind} {found.marker!r} is outside any Q/A pair (a {found.kind} ends an answer): "
                f"{found.text_lines} line(s) not used",
                "text outside any Q/A pair",
            )

    def _skip(self, line: int, reason: str, kind: str | None = None) -> None:
        self.skipped.append({"line": line, "reason": reason})
        _count(self.skip_reasons, kind or reason)


def _trim_block(lines: list[str]) -> str:
    """Drop blank lines around a block; keep its inner lines (indentation, markdown) as written."""
    start, end = 0, len(lines)
    while start < end and not lines[start].strip():
        start += 1
    while end > start and not lines[end - 1].strip():
        end -= 1
    return "\n".join(lines[start:end]).rstrip()


def parse_markdown(
    text: str, source: str, fmt: str = "auto", markers: Markers = Markers(), reasoning_markers: str = "think"
) -> tuple[list[QAPair], FileReport]:
    """Parse one markdown text. `fmt` "auto" reports header_qa when questions are headings or bold."""
    _check_format(fmt, allowed=("auto", *MARKDOWN_FORMATS))
    matcher = _MarkerMatcher(markers)
    parser = _MarkdownParser(source, matcher, reasoning_markers)
    parser.parse(text)
    if fmt == "auto":
        fmt = "header_qa" if parser.styled_questions else "simple_qa"
    return parser.pairs, _file_report(
        source, fmt, parser.pairs, parser.skipped, skip_reasons=parser.skip_reasons, notes=parser.notes
    )


# --------------------------------------------------------------------------------------------------
# JSON Lines / JSON records

# Chat roles as the records spell them -> the roles chat templates know. ShareGPT: human/gpt, and observation for
# a tool's answer (LLaMA-Factory's spelling); OpenAI's legacy `function` role is a tool's answer too.
CHAT_ROLES = {
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "system": "system",
    "tool": "tool",
    "observation": "tool",
    "function": "tool",
}
# ShareGPT's assistant turn that calls a function (LLaMA-Factory, glaive): its value is the call as JSON,
# {"name", "arguments"} or a list of them.
FUNCTION_CALL_ROLE = "function_call"
# The formats autotune trains (supervised fine-tuning), and those of other training modes it recognises to refuse.
SFT_KINDS = ("chat", "sharegpt", "alpaca", "qa", "prompt-completion")
OTHER_MODES = {
    "dpo": "preference (DPO) records (chosen/rejected)",
    "kto": "KTO records (answers labelled desirable or not)",
}
# The skip reason's kind for a record of another mode, as `data inspect` counts it.
OTHER_MODE_SKIPS = {"dpo": "preference record (DPO)", "kto": "KTO record"}
# Keys that hold images, video or audio: Qwen3 is a text model, so such a record is skipped.
MEDIA_KEYS = ("images", "image", "videos", "video", "audios", "audio")
MEDIA_PART_TYPES = ("image", "image_url", "video", "video_url", "audio", "input_audio")
# Keys of a turn that the chat template reads besides role and content: passed to it as they are.
TEMPLATE_TURN_KEYS = ("name", "tool_call_id")
# A tool reply already wrapped in the tags Qwen's template wraps it in (Hermes data): the tags are removed.
_TOOL_RESPONSE = re.compile(r"\A\s*<tool_response>\s*(?P<body>.*?)\s*</tool_response>\s*\Z", re.DOTALL)


class _BadRecord(Exception):
    """A record that yields no sample; the message is the skip reason, `kind` the reason's kind (counted)."""

    def __init__(self, reason: str, kind: str = "invalid record"):
        super().__init__(reason)
        self.kind = kind


class _Fields:
    """A record or a turn whose keys are read through get(): the keys never read are reported, not dropped unseen."""

    def __init__(self, data: dict):
        self.data = data
        self.read: set[str] = set()

    def get(self, key: str, default: Any = None) -> Any:
        self.read.add(key)
        value = self.data.get(key)
        return default if value is None else value

    def has(self, *keys: str) -> bool:
        """Whether every one of `keys` holds a value (a table row holds None in the columns a record lacks)."""
        return all(self.data.get(k) is not None for k in keys)

    def unused(self) -> list[str]:
        return [str(k) for k, v in self.data.items() if k not in self.read and v not in (None, "", [], {})]


@dataclass
class _Sample:
    """What a record makes, before it becomes a QAPair."""

    question: str
    answer: dict  # the answer turn
    system: str | None = None
    history: tuple = ()
    after: tuple = ()
    tools: tuple = ()


class _RecordReader:
    """Reads one record into a sample: its format, its turns, and notes on what was done with it."""

    def __init__(self, markers: str = "think"):
        self.markers = markers
        self.kind: str | None = None  # the record's format, once recognised
        self.notes: dict[str, int] = {}
        self.fields: list[tuple[str, _Fields]] = []  # (where, fields) of the record and each of its turns

    def wrap(self, data: dict, where: str = "") -> _Fields:
        fields = _Fields(data)
        self.fields.append((where, fields))
        return fields

    def note_unused(self) -> None:
        for where, read in self.fields:
            for key in read.unused():
                _count(self.notes, f"{where}key {key!r} not used")

    # ---- text

    def text(self, value: Any, what: str) -> str:
        text, parts = self.content(value, what)
        if parts is not None and not all(trained for _, trained in parts):
            raise _BadRecord(
                f"{what} has parts marked train: false, which only assistant turns can have", "train flags"
            )
        return text

    def content(self, value: Any, what: str) -> tuple[str, list | None]:
        """(text, parts) of a turn's content: a string, or content parts (OpenAI's {"type": "text", "text"},
        LLaMA-Factory's {"type": "text", "value"}, axolotl's with "train": false); `parts` is [(text, trained)]
        where a part carries a train flag, else None. A part holding an image, video or audio skips the record."""
        if value is None:  # e.g. an assistant turn that only calls tools
            return "", None
        if isinstance(value, str):
            return value, None
        if isinstance(value, dict):
            value = [value]
        if not isinstance(value, list):
            raise _BadRecord(
                f"{what} must be a string or a list of content parts, got {type(value).__name__}", "invalid record"
            )
        parts = []
        flagged = False
        for i, part in enumerate(value, 1):
            if not isinstance(part, dict):
                raise _BadRecord(f"{what} part {i} is a {type(part).__name__}, not an object", "invalid record")
            kind = part.get("type", "text")
            if kind in MEDIA_PART_TYPES:
                raise _BadRecord(f"{what} holds a {kind} part: Qwen3 is a text model", "images, video or audio")
            text = part.get("text", part.get("value"))
            if kind != "text" or not isinstance(text, str):
                raise _BadRecord(
                    f"{what} part {i} is no text part (type {kind!r}; a text part is "
                    '{"type": "text", "text": ...} or LLaMA-Factory\'s {"type": "text", "value": ...})',
                    "invalid record",
                )
            train = part.get("train", part.get("training"))
            if train is not None and not isinstance(train, bool):
                raise _BadRecord(f"{what} part {i} has train {train!r}; it must be true or false", "train flags")
            flagged |= train is not None
            parts.append((text, train is not False))
            unused = sorted(set(part) - {"type", "text", "value", "train", "training"})
            for key in unused:
                _count(self.notes, f"content part key {key!r} not used")
        return "".join(t for t, _ in parts), (parts if flagged else None)

    # ---- records

    def sample(self, record: Any) -> tuple[str, _Sample]:
        """(the record's format, its sample); _BadRecord says why there is none (a kind of SFT_KINDS or
        OTHER_MODES is still counted then: see _Records.add)."""
        if not isinstance(record, dict):
            raise _BadRecord(f"record is a {type(record).__name__}, not an object", "invalid record")
        fields = self.wrap(record)
        kind = _kind_of(fields)
        if kind is None:
            keys = ", ".join(sorted(str(k) for k, v in record.items() if v is not None)[:8]) or "none"
            raise _BadRecord(
                f"unknown record shape (keys: {keys}); expected 'messages', 'conversations', 'instruction'+'output', "
                "'question'+'answer' or 'prompt'+'completion'",
                "unknown record shape",
            )
        self.kind = kind
        if kind in OTHER_MODES:
            raise _BadRecord(
                f"a {OTHER_MODE_SKIPS[kind]}: another training mode than supervised fine-tuning (train refuses it)",
                OTHER_MODE_SKIPS[kind],
            )
        media = [k for k in MEDIA_KEYS if fields.get(k)]
        if media:
            raise _BadRecord(f"the record has {', '.join(media)}: Qwen3 is a text model", "images, video or audio")
        tools = self.tools(fields.get("tools"))
        reader = {
            "chat": lambda: self.chat(fields, "messages", "role", "content"),
            "sharegpt": lambda: self.chat(fields, "conversations", "from", "value"),
            "alpaca": lambda: self.alpaca(fields),
            "qa": lambda: self.single(fields, "question", "answer"),
            "prompt-completion": lambda: self.prompt_completion(fields),
        }[kind]
        sample = reader()
        sample.tools = tools
        self.note_unused()
        return kind, sample

    def tools(self, value: Any) -> tuple:
        """A record's tool list: a list of tool schemas, or (LLaMA-Factory) that list as a JSON string."""
        if value in (None, "", []):
            return ()
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError as e:
                raise _BadRecord(f"'tools' is a string but not JSON ({_json_error(e)})", "invalid tools") from None
        if isinstance(value, dict):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
            raise _BadRecord("'tools' must be a list of tool schemas (objects)", "invalid tools")
        return tuple(value)

    def chat(self, fields: _Fields, key: str, role_key: str, content_key: str) -> _Sample:
        """One sample per conversation: its last assistant turn with something to train is the answer, the last user
        turn before it the question; the turns before the question are the history, those between it and the answer
        (tool calls and replies, earlier assistant turns) `after`; every assistant turn among them is trained too.
        A leading system turn (or the record's 'system') is the system prompt; a later one stays where it is, as
        Qwen3's template renders it there. Turns after the answer have nothing to learn from: noted, not used."""
        messages = fields.get(key)
        if not isinstance(messages, list):
            raise _BadRecord(f"'{key}' must be a list of turns", "invalid record")
        turns = [self.turn(message, i, role_key, content_key) for i, message in enumerate(messages, 1)]
        system = self.text(fields.get("system"), "system") if fields.get("system") else None
        if system is None and turns and turns[0]["role"] == "system":
            system = turns.pop(0)["content"]
        answer_at = next((k for k in range(len(turns) - 1, -1, -1) if is_trained_turn(turns[k])), None)
        question_at = None
        if answer_at is not None:
            question_at = next(
                (q for q in range(answer_at - 1, -1, -1) if turns[q]["role"] == "user" and turns[q]["content"].strip()),
                None,
            )
        if answer_at is None or question_at is None:
            raise _BadRecord(
                "chat record has no non-empty user turn followed by an assistant turn to train (turns marked "
                "train: false are context)",
                "no answer",
            )
        if answer_at + 1 < len(turns):
            _count(self.notes, "turns after the last answer not used (nothing follows them to learn)")
        return _Sample(
            turns[question_at]["content"].strip(),
            turns[answer_at],
            system,
            tuple(turns[:question_at]),
            tuple(turns[question_at + 1 : answer_at]),
        )

    def turn(self, message: Any, i: int, role_key: str, content_key: str) -> dict:
        """A turn as {"role", "content"}, with what its role adds (see QAPair)."""
        if not isinstance(message, dict) or not isinstance(message.get(role_key), str):
            raise _BadRecord(f"turn {i} is not an object with a '{role_key}'", "invalid record")
        fields = self.wrap(message, "turn ")
        spelled = fields.get(role_key)
        if spelled == FUNCTION_CALL_ROLE:
            calls = self.function_call_value(fields.get(content_key), i)
            return {"role": "assistant", "content": "", "tool_calls": calls}
        role = CHAT_ROLES.get(spelled)
        if role is None:
            raise _BadRecord(
                f"turn {i} has {role_key} {spelled!r}; expected one of {', '.join(CHAT_ROLES)}, or ShareGPT's "
                f"{FUNCTION_CALL_ROLE} (a tool call). Fix: spell the role as one of these, or drop the turn",
                "unknown role",
            )
        text, parts = self.content(fields.get(content_key), f"turn {i} {content_key}")
        turn: dict[str, Any] = {"role": role, "content": text}
        if role == "assistant":
            return self.assistant(fields, turn, parts, i)
        if parts is not None and not all(trained for _, trained in parts):
            raise _BadRecord(
                f"turn {i} ({role}) has parts marked train: false; only assistant turns are trained, so the flag "
                "means nothing there",
                "train flags",
            )
        if role == "tool":
            match = _TOOL_RESPONSE.match(text)
            if match:  # Hermes writes the tags Qwen's template adds: keep one pair
                turn["content"] = match["body"]
                _count(self.notes, "tool reply's own <tool_response> tags removed (the template adds them)")
        for key in TEMPLATE_TURN_KEYS:
            if fields.get(key) is not None:
                turn[key] = fields.get(key)
        return turn

    def assistant(self, fields: _Fields, turn: dict, parts: list | None, i: int) -> dict:
        train = _turn_train_flag(fields, i)
        if train is False:
            turn["train"] = False
        calls = self.tool_calls(fields, i)
        if calls:
            turn["tool_calls"] = calls
        reasoning = self.text(fields.get("reasoning_content"), f"turn {i} reasoning_content").strip() or None
        if parts is not None:
            # Per-part flags: the trace comes from reasoning_content only, the parts are trained as written.
            turn["parts"] = [[text, trained] for text, trained in parts if text]
        elif reasoning is None:
            reasoning, turn["content"] = reasoning_and_answer(turn["content"], self.markers, self.notes)
        if reasoning is not None:
            turn["reasoning_content"] = reasoning
        return turn

    def tool_calls(self, fields: _Fields, i: int) -> list[dict]:
        """OpenAI's tool_calls ([{"type": "function", "function": {"name", "arguments"}}]) or its legacy
        function_call ({"name", "arguments"}), in the first shape; the chat template renders them."""
        calls = fields.get("tool_calls")
        legacy = fields.get("function_call")
        if legacy is not None:
            calls = [*(calls or []), legacy]
        if calls is None:
            return []
        if not isinstance(calls, list):
            raise _BadRecord(f"turn {i} tool_calls must be a list", "invalid tool call")
        return [_tool_call(call, f"turn {i} tool call {n}") for n, call in enumerate(calls, 1)]

    def function_call_value(self, value: Any, i: int) -> list[dict]:
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError as e:
                raise _BadRecord(
                    f"turn {i} is a {FUNCTION_CALL_ROLE} whose value is not JSON ({_json_error(e)}); it must be "
                    '{"name": ..., "arguments": {...}} or a list of them',
                    "invalid tool call",
                ) from None
        calls = value if isinstance(value, list) else [value]
        return [_tool_call(call, f"turn {i} ({FUNCTION_CALL_ROLE}) call {n}") for n, call in enumerate(calls, 1)]

    def alpaca(self, fields: _Fields) -> _Sample:
        question = self.text(fields.get("instruction"), "instruction").strip()
        extra = self.text(fields.get("input", ""), "input").strip()
        if extra:
            question = f"{question}\n\n{extra}" if question else extra
        history: list[dict] = []
        for turn in fields.get("history") or []:  # LLaMA-Factory style: [[question, answer], ...]
            if not (isinstance(turn, (list, tuple)) and len(turn) == 2):
                raise _BadRecord("'history' must be a list of [question, answer] pairs", "invalid record")
            reasoning, answer = reasoning_and_answer(self.text(turn[1], "history"), self.markers, self.notes)
            assistant = {"role": "assistant", "content": answer}
            if reasoning is not None:
                assistant["reasoning_content"] = reasoning
            history += [{"role": "user", "content": self.text(turn[0], "history")}, assistant]
        return self.checked(fields, question, self.text(fields.get("output"), "output"), tuple(history))

    def single(self, fields: _Fields, question_key: str, answer_key: str) -> _Sample:
        question = self.text(fields.get(question_key), question_key).strip()
        return self.checked(fields, question, self.text(fields.get(answer_key), answer_key), ())

    def prompt_completion(self, fields: _Fields) -> _Sample:
        """TRL's prompt-completion shape: two strings, or two lists of turns (the conversation split where the
        trained part starts)."""
        prompt, completion = fields.get("prompt"), fields.get("completion")
        if isinstance(prompt, list) and isinstance(completion, list):
            return self.chat(self.wrap({"messages": prompt + completion}), "messages", "role", "content")
        return self.single(fields, "prompt", "completion")

    def checked(self, fields: _Fields, question: str, answer: str, history: tuple) -> _Sample:
        system = self.text(fields.get("system"), "system") if fields.get("system") else None
        reasoning = self.text(fields.get("reasoning_content"), "reasoning_content").strip() or None
        if reasoning is None:
            reasoning, answer = reasoning_and_answer(answer, self.markers, self.notes)
        answer = answer.strip()
        if not question:
            raise _BadRecord("empty question", "empty question or answer")
        if not answer:
            raise _BadRecord("empty answer", "empty question or answer")
        turn: dict[str, Any] = {"role": "assistant", "content": answer}
        if reasoning is not None:
            turn["reasoning_content"] = reasoning
        return _Sample(question, turn, system, history)


def _kind_of(fields: _Fields) -> str | None:
    """The format a record is in (SFT_KINDS or OTHER_MODES), None for none. Preference and KTO records are told by
    their own keys first: they also carry the keys of an SFT format (a DPO record's conversations, a KTO record's
    prompt and completion)."""
    if fields.has("chosen", "rejected"):
        return "dpo"  # TRL's prompt/chosen/rejected, LLaMA-Factory's ranking format (instruction or conversations)
    if fields.has("instruction") and isinstance(fields.data.get("output"), list):
        return "dpo"  # LLaMA-Factory's older ranking format: output [chosen, rejected]
    if isinstance(fields.data.get("label"), bool) or fields.has("kto_tag"):
        return "kto"  # TRL's prompt/completion/label, LLaMA-Factory's kto_tag
    for kind, keys in (
        ("chat", ("messages",)),
        ("sharegpt", ("conversations",)),
        ("alpaca", ("instruction", "output")),
        ("qa", ("question", "answer")),
        ("prompt-completion", ("prompt", "completion")),
    ):
        if fields.has(*keys):
            return kind
    return None


def _turn_train_flag(fields: _Fields, i: int) -> bool | None:
    """A turn's own train flag: axolotl's "training" / "train" (true/false), ShareGPT's "weight" (0 or 1)."""
    for key in ("train", "training"):
        value = fields.get(key)
        if value is not None:
            if not isinstance(value, bool):
                raise _BadRecord(f"turn {i} has {key} {value!r}; it must be true or false", "train flags")
            return value
    weight = fields.get("weight")
    if weight is not None:
        if weight not in (0, 1) or isinstance(weight, bool):
            raise _BadRecord(f"turn {i} has weight {weight!r}; it must be 0 (not trained) or 1", "train flags")
        return weight == 1
    return None


def _tool_call(call: Any, what: str) -> dict:
    """A tool call as {"type": "function", "function": {"name", "arguments"}} (arguments as given: an object, or
    the JSON string OpenAI writes, which Qwen's template renders as it is)."""
    if not isinstance(call, dict):
        raise _BadRecord(f"{what} is a {type(call).__name__}, not an object", "invalid tool call")
    function = call.get("function", call)
    if not isinstance(function, dict) or not isinstance(function.get("name"), str) or "arguments" not in function:
        raise _BadRecord(
            f'{what} needs a "name" and "arguments" (OpenAI: {{"type": "function", "function": {{"name": ..., '
            '"arguments": ...}}})',
            "invalid tool call",
        )
    out: dict[str, Any] = {
        "type": "function",
        "function": {"name": function["name"], "arguments": function["arguments"]},
    }
    if call.get("id") is not None:
        out["id"] = call["id"]
    return out


class _Records:
    """Collects the samples, skips, record formats and notes of one file."""

    def __init__(self, source: str, markers: str = "think"):
        self.source = source
        self.markers = markers
        self.pairs: list[QAPair] = []
        self.skipped: list[dict] = []
        self.kinds: dict[str, int] = {}
        self.skip_reasons: dict[str, int] = {}
        self.notes: dict[str, int] = {}

    def add(self, record: Any, line: int) -> None:
        reader = _RecordReader(self.markers)
        try:
            kind, sample = reader.sample(record)
            pair = _pair(sample, self.source, line)
        except (_BadRecord, BrokenThink) as e:
            if reader.kind is not None:
                _count(self.kinds, reader.kind)
            self.skip(line, str(e), getattr(e, "kind", "broken reasoning block"))
            return
        _count(self.kinds, kind)
        for note in reader.notes:  # records, not turns: "key 'lang' not used" once for a record whose turns all have it
            _count(self.notes, note)
        self.pairs.append(pair)

    def skip(self, line: int, reason: str, kind: str | None = None) -> None:
        self.skipped.append({"line": line, "reason": reason})
        _count(self.skip_reasons, kind or reason)

    def result(self, fmt: str) -> tuple[list[QAPair], FileReport]:
        return self.pairs, _file_report(
            self.source, fmt, self.pairs, self.skipped, self.kinds, self.skip_reasons, self.notes
        )


def _pair(sample: _Sample, source: str, line: int) -> QAPair:
    answer = sample.answer
    if answer.get("train") is False:  # pragma: no cover - the answer is chosen among trained turns
        raise _BadRecord("the answer is marked train: false")
    parts = tuple((text, trained) for text, trained in answer.get("parts") or ())
    text = answer["content"].strip() if not parts else answer["content"]
    return QAPair(
        sample.question,
        text,
        source,
        line,
        sample.system,
        sample.history,
        answer.get("reasoning_content"),
        after=sample.after,
        tools=sample.tools,
        answer_calls=tuple(answer.get("tool_calls") or ()),
        answer_parts=parts,
    )


def _loads(text: str) -> Any:
    """json.loads that reports every failure as ValueError (deep nesting raises RecursionError)."""
    try:
        return json.loads(text)
    except RecursionError as e:
        raise ValueError("nested too deeply") from e


def parse_jsonl(text: str, source: str, reasoning_markers: str = "think") -> tuple[list[QAPair], FileReport]:
    records = _Records(source, reasoning_markers)
    for number, line in enumerate(_split_lines(text), start=1):
        if not line.strip():
            continue
        try:
            record = _loads(line)
        except ValueError as e:
            records.skip(number, f"invalid JSON: {_json_error(e)}", "invalid JSON")
            continue
        records.add(record, number)
    return records.result("jsonl")


def parse_json(text: str, source: str, reasoning_markers: str = "think") -> tuple[list[QAPair], FileReport]:
    records = _Records(source, reasoning_markers)
    try:
        data = _loads(text.lstrip("\ufeff")) if text.strip() else []
    except ValueError as e:
        records.skip(getattr(e, "lineno", 1), f"invalid JSON: {_json_error(e)}", "invalid JSON")
        return records.result("json")
    found = _json_records(data)
    if found is None:
        records.skip(1, 'top-level JSON must be a list of records or {"data": [...]}')
    else:
        for index, record in enumerate(found):
            records.add(record, index + 1)
    return records.result("json")


def _json_records(data: Any) -> list | None:
    if isinstance(data, list):
        return data
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        return data["data"]
    if isinstance(data, dict) and _kind_of(_Fields(data)) is not None:
        return [data]  # a file holding a single record
    return None


def _json_error(e: ValueError) -> str:
    return e.msg if isinstance(e, json.JSONDecodeError) else str(e)


# --------------------------------------------------------------------------------------------------
# Directory


# Wraps the list of files about to be read (a progress bar, in the CLI); yields them back one at a time.
FileProgress = Callable[[list[str]], Iterable[str]]


def check_data_dir(data_dir: str | os.PathLike) -> Path:
    """data_dir as a folder that exists (a UserError saying how to fix it otherwise): what parse_data_dir reads first,
    and `autotune validate` checks without reading a file."""
    root = Path(data_dir)
    if not root.exists():
        raise UserError(
            f"data_dir {str(data_dir)!r} does not exist. Fix: set data_dir to the folder holding your QA files (e.g. data/raw)."
        )
    if not root.is_dir():
        raise UserError(
            f"data_dir {str(data_dir)!r} is a file, not a folder. Fix: set data_dir to the folder that contains it."
        )
    return root


def parse_data_dir(
    data_dir: str | os.PathLike,
    data_format: str = "auto",
    markers: Markers = Markers(),
    progress: FileProgress | None = None,
    encoding: str | None = None,
    reasoning_markers: str = "think",
    cache_dir: str | os.PathLike | None = None,
) -> DataReport:
    """Parse every data file under `data_dir` (recursively, in sorted order) into one report. `reasoning_markers`
    is the config's: other reasoning markers mapped into the think block ("think") or left as text. `cache_dir`:
    autotune's tokenized cache (data_cache_dir), never read as data where it lies inside data_dir."""
    _check_format(data_format, allowed=DATA_FORMATS)
    root = check_data_dir(data_dir)
    _MarkerMatcher(markers)  # validate the markers once, before any file is read

    report = DataReport(files=[], pairs=[])
    cache = os.path.realpath(cache_dir) if cache_dir is not None else None
    if cache is not None and Path(cache).is_relative_to(os.path.realpath(root)) and os.path.isdir(cache):
        report.warnings.append(
            f"data_cache_dir {str(cache_dir)!r} lies inside data_dir: its files are autotune's tokenized cache, not "
            "read as data (set data_cache_dir outside data_dir to keep them apart)"
        )
    files = _data_files(root, EXTENSIONS[data_format], skip=cache)
    for relative in progress(files) if progress else files:
        shown = _display(data_dir, relative)
        pairs, file_report = _parse_file(root / relative, relative, data_format, markers, encoding, reasoning_markers)
        report.files.append(file_report)
        report.pairs.extend(pairs)
        report.warnings.extend(_file_warnings(shown, file_report))
    if not report.pairs:
        refuse_other_modes(report, f"data_dir {str(data_dir)!r}")
        raise UserError(_no_pairs_message(data_dir, data_format, report, markers))
    report.warnings.extend(_duplicate_warnings(report.pairs))
    return report


def refuse_other_modes(report: DataReport, where: str) -> None:
    """A UserError when the data holds records of another training mode (DPO preference pairs, KTO labels): an SFT
    run would train their answers as if all were good, or train half of them. `data inspect` shows them, counted;
    train, solve and `data stats` stop here with one message naming every such file."""
    found = [
        f"{f.path}: {n} {OTHER_MODES[kind]}" for f in report.files for kind, n in f.kinds.items() if kind in OTHER_MODES
    ]
    if found:
        raise UserError(
            f"{where} holds data of another training mode, which autotune (supervised LoRA fine-tuning) cannot train: "
            + "; ".join(found)
            + ". Fix: move these files out of the data folder, or convert them to SFT records (a DPO record's prompt "
            "and its chosen answer as a chat; a KTO record's prompt and completion where its label is true); "
            "`autotune data inspect` counts every record by format."
        )


def _check_format(fmt: str, allowed: Iterable[str]) -> None:
    allowed = tuple(allowed)
    if fmt not in allowed:
        raise UserError(f"data_format: unknown value {fmt!r}. Fix: use one of {', '.join(allowed)}.")


def _data_files(root: Path, extensions: tuple[str, ...], skip: str | None = None) -> list[str]:
    """Relative posix paths of data files, sorted; hidden entries, README files, the metadata that `datasets`
    saves beside its arrow files and the folder `skip` (a real path) are skipped. Symlinked folders are followed (a
    data folder is often assembled from links), each real folder once: a link back into the tree is not a loop."""
    found = []
    seen = {os.path.realpath(root), *((skip,) if skip else ())}
    for folder, dirs, files in os.walk(root, followlinks=True):
        keep = []
        for name in sorted(d for d in dirs if not d.startswith(".")):
            real = os.path.realpath(os.path.join(folder, name))
            if real not in seen:
                seen.add(real)
                keep.append(name)
        dirs[:] = keep
        saved_dataset = any(name.endswith(".arrow") for name in files)
        for name in files:
            path = Path(name)
            if name.startswith(".") or path.stem.lower() == "readme" or path.suffix.lower() not in extensions:
                continue
            if saved_dataset and name in DATASETS_METADATA:
                continue
            found.append((Path(folder) / name).relative_to(root).as_posix())
    return sorted(found)


def _format_of(path: Path, data_format: str) -> str:
    if data_format != "auto":
        return data_format
    suffix = path.suffix.lower()
    return next((fmt for fmt in (*TABLE_FORMATS, "jsonl", "json") if suffix in EXTENSIONS[fmt]), "auto")


def _parse_file(
    path: Path,
    relative: str,
    data_format: str,
    markers: Markers,
    encoding: str | None = None,
    reasoning_markers: str = "think",
) -> tuple[list[QAPair], FileReport]:
    fmt = _format_of(path, data_format)
    if fmt in TABLE_FORMATS:
        return parse_table(path, relative, fmt, reasoning_markers)
    decoded = read_text(path, encoding)
    if fmt == "jsonl":
        pairs, report = parse_jsonl(decoded.text, relative, reasoning_markers)
    elif fmt == "json":
        pairs, report = parse_json(decoded.text, relative, reasoning_markers)
    else:
        pairs, report = parse_markdown(decoded.text, relative, fmt, markers, reasoning_markers)
    report.encoding, report.encoding_guessed = decoded.encoding, decoded.guessed
    return pairs, report


# --------------------------------------------------------------------------------------------------
# Tables and hub datasets, through the `datasets` library (imported only when one is read)


def _table_rows(path: Path, fmt: str) -> Iterable[dict]:
    import datasets

    options: dict[str, Any] = {}
    if fmt == "csv":
        # Every column as text: type inference would turn an answer "007" into the integer 7, and an empty cell
        # or "NA" into a missing value.
        import csv

        with open(path, newline="", encoding="utf-8-sig") as f:
            header = next(csv.reader(f), [])
        options = dict(
            features=datasets.Features({name: datasets.Value("string") for name in header}),
            keep_default_na=False,
            na_filter=False,
        )
    # Streaming reads the file in batches, without converting it into the datasets cache first.
    return datasets.load_dataset(fmt, data_files=str(path), split="train", streaming=True, **options)


def parse_table(
    path: str | os.PathLike, source: str, fmt: str, reasoning_markers: str = "think"
) -> tuple[list[QAPair], FileReport]:
    """A parquet, arrow or CSV file: one record per row, in the shapes JSON records take (a CSV has flat columns:
    question/answer or instruction/input/output). A file that cannot be read is reported as skipped."""
    records = _Records(source, reasoning_markers)
    try:
        for index, row in enumerate(_table_rows(Path(path), fmt)):
            records.add(row, index + 1)
    except Exception as exc:  # noqa: BLE001 - pyarrow, pandas and datasets each raise their own types
        records.skip(1, f"cannot read it as {fmt}: {_first_line(exc)}", f"unreadable {fmt} file")
    pairs, report = records.result(fmt)
    report.encoding = "utf-8" if fmt == "csv" else "binary"
    return pairs, report


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:300]}" if text else type(exc).__name__


@contextlib.contextmanager
def _datasets_offline(offline: bool):
    """The datasets library (and huggingface_hub under it) in offline mode for a moment: both read the switch from
    their config modules at call time (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE are read at import, too late here)."""
    if not offline:
        yield
        return
    import datasets.config
    import huggingface_hub.constants

    saved = datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE = saved


def parse_hub_dataset(name: str, split: str = "train", reasoning_markers: str = "think") -> DataReport:
    """A dataset from the Hugging Face hub (or the local cache of it), one sample per row."""
    import datasets

    from autotune import hub

    # The hub asked once (hub.py): unreachable, the datasets library reads its local cache only, at once, instead of
    # retrying every request for half a minute before it says the same.
    unreachable = hub.local_only()[0]
    try:
        with _datasets_offline(unreachable):
            rows = datasets.load_dataset(name, split=split)
    except Exception as exc:  # noqa: BLE001 - offline, not found, bad split, gated: each a different type
        reason = _first_line(exc)
        local, why = hub.local_only()
        if os.environ.get("HF_DATASETS_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
            local, why = True, "HF_DATASETS_OFFLINE is set"
        if local:
            fix = (
                f"{why}, so only the local cache is read and it does not hold this dataset. Fix: load it once "
                "online (it is cached then), or save it as parquet/jsonl files in a folder and set data_dir to it "
                "(and dataset_name to null)."
            )
        else:
            fix = (
                "Fix: check the id and the split (dataset_split), and that the hub is reachable; offline, save the "
                "dataset as parquet/jsonl files in a folder and set data_dir to it (and dataset_name to null)."
            )
        raise UserError(f"dataset_name {name!r} (split {split!r}): cannot load it ({reason}). {fix}") from None
    source = f"{name}[{split}]"
    records = _Records(source, reasoning_markers)
    for index, row in enumerate(rows):
        records.add(row, index + 1)
    pairs, file_report = records.result("hub")
    file_report.encoding = "binary"
    report = DataReport(files=[file_report], pairs=pairs, warnings=_file_warnings(source, file_report))
    if not pairs:
        refuse_other_modes(report, f"dataset_name {name!r}")
        columns = ", ".join(rows.column_names) if hasattr(rows, "column_names") else "?"
        raise UserError(
            f"dataset_name {name!r} (split {split!r}): no usable rows (columns: {columns}); rows need 'messages', "
            "'conversations', 'instruction'+'output', 'question'+'answer' or 'prompt'+'completion'. Fix: pick a "
            "dataset in one of those shapes, or convert it to JSONL in data_dir."
        )
    report.warnings.extend(_duplicate_warnings(pairs))
    return report


def _display(data_dir: str | os.PathLike, relative: str) -> str:
    return (Path(data_dir) / relative).as_posix()


def _file_warnings(shown: str, report: FileReport) -> list[str]:
    warnings = []
    if report.encoding_guessed:
        warnings.append(
            f"{shown}: not UTF-8; read as {report.encoding.upper()} (Chinese GBK), a guess from its content: check "
            "`autotune data inspect`, and re-save it as UTF-8 to be sure"
        )
    if report.pairs == 0:
        warnings.append(f"{shown}: no QA pairs found (format {report.format})")
    if report.skipped:
        first = report.skipped[0]
        more = f" (and {len(report.skipped) - 1} more)" if len(report.skipped) > 1 else ""
        warnings.append(
            f"{shown}: skipped {len(report.skipped)} item(s); line {first['line']}: {first['reason']}{more}"
        )
    return warnings


def _duplicate_warnings(pairs: list[QAPair]) -> list[str]:
    # Repeated questions matter: split_pairs keeps them on one side, and a model trained on conflicting
    # answers to one question learns neither well.
    seen: dict[str, QAPair] = {}
    duplicates = []
    for pair in pairs:
        first = seen.setdefault(pair.question, pair)
        if first is not pair:
            duplicates.append((first, pair))
    if not duplicates:
        return []
    first, again = duplicates[0]
    return [
        f"{len(duplicates)} question(s) appear more than once, e.g. {first.source}:{first.line} and {again.source}:{again.line}"
    ]


def _no_pairs_message(data_dir, data_format: str, report: DataReport, markers: Markers) -> str:
    patterns = ", ".join(f"*{ext}" for ext in EXTENSIONS[data_format])
    if not report.files:
        found = f"no {patterns} files (README.md is skipped)"
    else:
        found = f"{len(report.files)} file(s) with no usable pairs: " + "; ".join(w for w in report.warnings[:3])
    q, a = markers.example()
    return (
        f"no QA pairs found in data_dir {str(data_dir)!r} (data_format {data_format!r}; looked for {patterns} files): {found}. "
        f"Markdown pairs look like '{q}' (or '### {q}') followed by '{a}'; JSONL/JSON records and table rows need "
        "'messages', 'conversations', 'instruction'+'output', 'question'+'answer' or 'prompt'+'completion'. "
        "Fix: point data_dir at a folder with *.md files of Q1:/A1: pairs (e.g. data/raw), "
        "or set data_format / question_prefix / answer_prefix / separator to match your files."
    )


# --------------------------------------------------------------------------------------------------
# Train/eval split


def _sort_key(pair: QAPair) -> tuple:
    return (pair.source, pair.line, len(pair.history), pair.question, pair.answer)


def _groups(pairs: list[QAPair]) -> list[list[QAPair]]:
    """Pairs that must land on the same side: turns of one chat record, and repeats of one question.

    Otherwise eval would score questions the model was trained on.
    """
    parent = list(range(len(pairs)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first_of: dict[tuple, int] = {}
    for i, pair in enumerate(pairs):
        for key in (("record", pair.source, pair.line), ("question", pair.question.strip())):
            j = first_of.setdefault(key, i)
            parent[find(i)] = find(j)
    grouped: dict[int, list[QAPair]] = {}
    for i, pair in enumerate(pairs):
        grouped.setdefault(find(i), []).append(pair)
    return list(grouped.values())  # in order of each group's first (sorted) pair


def split_pairs(pairs: Iterable[QAPair], eval_ratio: float = 0.1, seed: int = 42) -> tuple[list[QAPair], list[QAPair]]:
    """Deterministic (train, eval) split, independent of the order the pairs come in.

    With >= 2 pairs and eval_ratio > 0 there is at least one eval pair and at least one train pair.
    Pairs of one chat record or with the same question stay together when that is possible.
    Both lists come back in (source, line) order.
    """
    if not isinstance(eval_ratio, (int, float)) or not 0 <= eval_ratio < 1:
        raise UserError(
            f"eval_ratio: must be a number in [0, 1), got {eval_ratio!r}. Fix: use e.g. 0.1 (10% held out) or 0 for no eval split."
        )
    ordered = sorted(pairs, key=_sort_key)
    if eval_ratio == 0 or len(ordered) < 2:
        return ordered, []
    target = min(len(ordered) - 1, max(1, round(len(ordered) * eval_ratio)))
    groups = _groups(ordered)
    if len(groups) < 2:
        groups = [[pair] for pair in ordered]  # one big group cannot be split while keeping it whole
    random.Random(seed).shuffle(groups)
    eval_set: list[QAPair] = []
    for group in groups:  # greedy: whole groups, never past the target
        if len(eval_set) + len(group) <= target:
            eval_set.extend(group)
        if len(eval_set) == target:
            break
    if not eval_set:  # every group is bigger than the target: hold out the smallest one
        eval_set = min(groups, key=len)
    chosen = {id(pair) for pair in eval_set}
    train = [pair for pair in ordered if id(pair) not in chosen]
    return train, sorted(eval_set, key=_sort_key)


def parse_data(cfg, progress: FileProgress | None = None) -> DataReport:
    """A config's data (autotune.config.Config in practice): its hub dataset when dataset_name is set, else
    data_dir parsed with its data_format and markers."""
    markers = getattr(cfg, "reasoning_markers", "think")
    if getattr(cfg, "dataset_name", None):
        return parse_hub_dataset(cfg.dataset_name, cfg.dataset_split, markers)
    return parse_data_dir(
        cfg.data_dir,
        cfg.data_format,
        Markers.of(cfg),
        progress,
        cfg.data_encoding,
        markers,
        cache_dir=getattr(cfg, "data_cache_dir", None),
    )
