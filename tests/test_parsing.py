"""Tests for autotune.data.parsing: markdown/JSONL/JSON QA files -> pairs, and the train/eval split."""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO
from hypothesis import given, settings
from hypothesis import strategies as st

from autotune.data.parsing import (
    DataReport,
    Decoded,
    FileReport,
    Markers,
    QAPair,
    parse_data_dir,
    parse_json,
    parse_jsonl,
    parse_markdown,
    read_text,
    split_pairs,
)
from autotune.errors import UserError

SAMPLE_DIR = REPO / "data" / "raw"
SHARED_QA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "qa-markdown"


def md(text: str, fmt: str = "auto", **markers) -> tuple[list[QAPair], FileReport]:
    return parse_markdown(text, "t.md", fmt, Markers(**markers))


def qa(text: str, **options) -> list[tuple[str, str]]:
    return [(p.question, p.answer) for p in md(text, **options)[0]]


def reasons(report: FileReport) -> list[tuple[int, str]]:
    return [(s["line"], s["reason"]) for s in report.skipped]


def no_heading_lines(answer: str) -> bool:
    return not any(line.lstrip().startswith("#") for line in answer.splitlines())


# --- markdown formats ----------------------------------------------------------------------------


def test_simple_qa():
    pairs, report = md("Q1: What is LoRA?\nA1: A low-rank adapter.\n\nQ2: And QLoRA?\nA2: LoRA on 4-bit weights.\n")
    assert [(p.question, p.answer, p.line) for p in pairs] == [
        ("What is LoRA?", "A low-rank adapter.", 1),
        ("And QLoRA?", "LoRA on 4-bit weights.", 4),
    ]
    assert report == FileReport("t.md", "simple_qa", 2, [], turns=2)
    assert all(p.source == "t.md" and p.system is None and p.history == () for p in pairs)


def test_header_qa():
    pairs, report = md("# Title\n\n## Part\n\n### Q1: What is LoRA?\nA1: An adapter.\n")
    assert [(p.question, p.answer, p.line) for p in pairs] == [("What is LoRA?", "An adapter.", 5)]
    assert report.format == "header_qa"


@pytest.mark.parametrize("level", range(1, 7))
def test_header_qa_any_heading_level(level):
    assert qa("#" * level + " Q1: Question?\nA1: Answer.\n") == [("Question?", "Answer.")]


def test_header_qa_closing_hashes_dropped():
    assert qa("## Q1: Question? ##\nA1: Answer.\n") == [("Question?", "Answer.")]


@pytest.mark.parametrize("line", ["**Q1:** Question?", "**Q1**: Question?", "**Q1: Question?**", "__Q1:__ Question?"])
def test_bold_question_marker(line):
    pairs, report = md(line + "\nA1: Answer.\n")
    assert [(p.question, p.answer) for p in pairs] == [("Question?", "Answer.")]
    assert report.format == "header_qa"


def test_forced_format_is_reported_and_still_reads_both_styles():
    pairs, report = md("### Q1: Question?\nA1: Answer.\nQ2: Two?\nA2: Yes.\n", fmt="simple_qa")
    assert len(pairs) == 2 and report.format == "simple_qa"


def test_unknown_markdown_format_is_user_error():
    with pytest.raises(UserError, match="data_format"):
        md("Q1: a\nA1: b\n", fmt="faq")


# --- robustness ----------------------------------------------------------------------------------


def test_multi_line_and_multi_paragraph_answer():
    text = "Q1: Why?\nA1: First line\nsecond line.\n\nSecond paragraph.\n\n\nQ2: Next?\nA2: Ok.\n"
    assert qa(text)[0] == ("Why?", "First line\nsecond line.\n\nSecond paragraph.")


def test_answer_may_start_on_next_line():
    assert qa("Q1: Why?\nA1:\n\n  Because.\nMore.\n") == [("Why?", "  Because.\nMore.")]


def test_multi_line_question():
    assert qa("### Q1: How do I\nset the rank?\nA1: With r.\n") == [("How do I\nset the rank?", "With r.")]


def test_lists_and_markdown_kept_verbatim():
    answer = "Steps:\n\n- set `lora_r` to **16**\n- keep __init__ and *snake_case_names*\n  1. nested    item\n\n> quoted_text"
    assert qa(f"Q1: How?\nA1: {answer}\n") == [("How?", answer)]


def test_fenced_code_block_kept_verbatim():
    code = "```python\n# a comment, not a heading\ndef f(x_y):\n    gradient_accumulation_steps = 4  # `tick` *star*\n\n    return x_y\n```"
    pairs = qa(f"Q1: Show me.\nA1: Like this:\n\n{code}\n\nDone.\n\nQ2: Next?\nA2: Ok.\n")
    assert pairs[0] == ("Show me.", f"Like this:\n\n{code}\n\nDone.")
    assert len(pairs) == 2


def test_markers_inside_fenced_code_are_not_boundaries():
    text = "Q1: Format?\nA1: Write:\n~~~\nQ2: inner question\nA2: inner answer\n## not a heading\n---\n~~~\nQ3: Real?\nA3: Yes.\n"
    pairs, report = md(text)
    assert [p.question for p in pairs] == ["Format?", "Real?"]
    assert "Q2: inner question\nA2: inner answer\n## not a heading\n---" in pairs[0].answer
    assert report.skipped == []


def test_indented_fence_inside_list_item():
    text = "Q1: Steps?\nA1: 1. Run:\n\n       ```\n       # comment\n       Q5: x\n       ```\n\n2. Done.\n"
    assert qa(text) == [("Steps?", "1. Run:\n\n       ```\n       # comment\n       Q5: x\n       ```\n\n2. Done.")]


def test_unclosed_fence_is_reported():
    pairs, report = md("Q1: a?\nA1: b\n```\ncode\nQ2: c?\nA2: d\n")
    assert len(pairs) == 1 and "Q2: c?" in pairs[0].answer
    assert reasons(report) == [(3, "code fence opened here is never closed; the rest of the file was read as code")]


@pytest.mark.parametrize("level", range(1, 7))
def test_heading_between_pairs_never_leaks(level):
    heading = "#" * level + " Next section"
    pairs = qa(f"Q1: a?\nA1: answer one\n\n{heading}\n\nSome intro prose.\n\nQ2: b?\nA2: answer two\n")
    assert pairs == [("a?", "answer one"), ("b?", "answer two")]


def test_heading_directly_under_answer_never_leaks():
    pairs = qa("### Q1: a?\nA1: one\n## Part 2\n### Q2: b?\nA2: two\n#### Trailing heading\ntrailing prose\n")
    assert pairs == [("a?", "one"), ("b?", "two")]


def test_text_after_sub_heading_in_answer_is_reported():
    text = "Q1: Install?\nA1: Steps:\n\n#### Linux\nRun apt\nthen reboot\n\n#### macOS\n\nRun brew\n\nQ2: b?\nA2: two\n"
    pairs, report = md(text)
    assert [(p.question, p.answer) for p in pairs] == [("Install?", "Steps:"), ("b?", "two")]
    assert reasons(report) == [
        (4, "text after heading '#### Linux' is outside any Q/A pair (a heading ends an answer): 2 line(s) not used"),
        (8, "text after heading '#### macOS' is outside any Q/A pair (a heading ends an answer): 1 line(s) not used"),
    ]


def test_text_after_heading_reported_up_to_any_marker_or_end_of_file():
    # Fenced lines count as text; an answer marker ends the stretch (and is skipped on its own).
    _, report = md("Q1: a?\nA1: one\n## Part\n```\ncode\n```\nA2: orphan\n")
    assert reasons(report) == [
        (3, "text after heading '## Part' is outside any Q/A pair (a heading ends an answer): 3 line(s) not used"),
        (7, "answer without a question before it"),
    ]
    _, report = md("Q1: a?\nA1: one\n\n---\nmore\n")
    assert reasons(report) == [
        (
            4,
            "text after horizontal rule '---' is outside any Q/A pair (a horizontal rule ends an answer): 1 line(s) not used",
        )
    ]


@pytest.mark.parametrize(
    "text",
    [
        "# Title\n\nIntro prose.\n\n## Section\n\nQ1: a?\nA1: one\n\n## Next\n\n\nQ2: b?\nA2: two\n\n## Empty end\n\n",
        "### Q1: a?\nA1: one\n## Part 2\n#### Sub\n### Q2: b?\nA2: two\n---\n\n",
        "Q1: a?\nA1: one\n```\n## in code\nafter\n```\nQ2: b?\nA2: two\n",
    ],
)
def test_headings_without_lost_text_are_not_reported(text):
    pairs, report = md(text)
    assert len(pairs) == 2 and report.skipped == []


@pytest.mark.parametrize("rule", ["---", "***", "___", "- - -", "-----------"])
def test_horizontal_rule_between_pairs_never_leaks(rule):
    assert qa(f"Q1: a?\nA1: one\n\n{rule}\n\nQ2: b?\nA2: two\n{rule}\n") == [("a?", "one"), ("b?", "two")]


def test_hash_without_space_is_text_not_heading():
    assert qa("Q1: Tag?\nA1: Use\n#hashtag and #5 in text.\n") == [("Tag?", "Use\n#hashtag and #5 in text.")]


def test_crlf_line_endings(tmp_path):
    path = tmp_path / "crlf.md"
    path.write_bytes(b"### Q1: Windows?\r\nA1: Line one\r\nline two\r\n\r\n### Q2: Again?\r\nA2: Yes.\r\n")
    pairs, _ = md(read_text(path).text)
    assert [(p.question, p.answer) for p in pairs] == [("Windows?", "Line one\nline two"), ("Again?", "Yes.")]
    assert not any("\r" in p.question + p.answer for p in pairs)


def test_utf8_bom(tmp_path):
    path = tmp_path / "bom.md"
    path.write_bytes(b"\xef\xbb\xbf" + "Q1: 什么是LoRA？\nA1: 低秩适配。\n".encode())
    decoded = read_text(path)
    assert decoded.text.startswith("Q1:") and (decoded.encoding, decoded.guessed) == ("utf-8-sig", False)
    assert qa(decoded.text) == [("什么是LoRA？", "低秩适配。")]


def test_bom_in_text_passed_directly():
    assert qa("\ufeffQ1: a?\nA1: b\n") == [("a?", "b")]


def test_gbk_encoded_file_is_read_as_a_guess_and_said_so(tmp_path):
    path = tmp_path / "gbk.md"
    path.write_bytes("### Q1：什么是微调？\nA1：在小数据集上继续训练预训练模型。\n".encode("gbk"))
    decoded = read_text(path)
    assert (decoded.encoding, decoded.guessed) == ("gb18030", True)
    assert qa(decoded.text) == [("什么是微调？", "在小数据集上继续训练预训练模型。")]
    report = parse_data_dir(tmp_path)
    assert report.files[0].encoding_guessed and report.files[0].to_json()["encoding"] == "gb18030"
    assert any("gbk.md: not UTF-8; read as GB18030" in w for w in report.warnings)


def test_utf8_file_is_not_a_guess(tmp_path):
    path = tmp_path / "u.md"
    path.write_text("Q1: été?\nA1: oui\n", encoding="utf-8")
    assert read_text(path) == Decoded("Q1: été?\nA1: oui\n", "utf-8", False)
    assert not any("not UTF-8" in w for w in parse_data_dir(tmp_path).warnings)


@pytest.mark.parametrize(
    "text",
    [
        "Q1: Qu'est-ce que l'été?\nA1: La saison la plus chaude.\n",  # é followed by ASCII
        "Q1: Où est le café?\nA1: À côté de la gare, près du théâtre.\n",  # accents that pair up as GBK bytes
        "Q1: Was heißt Größe?\nA1: Die Maße eines Körpers.\n",
    ],
)
def test_latin1_file_is_an_error_with_its_line_never_mojibake(tmp_path, text):
    path = tmp_path / "latin1.md"
    path.write_bytes(("Q0: plain?\nA0: ascii\n\n" + text).encode("latin-1"))
    with pytest.raises(UserError) as err:
        read_text(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}:4: not UTF-8") and "Latin-1" in msg and "re-save the file as UTF-8" in msg


def test_undecodable_file_names_it(tmp_path):
    path = tmp_path / "binary.md"
    path.write_bytes(b"Q1: a\n\xff\xff\xff\x80\n")
    with pytest.raises(UserError, match=r"binary\.md:2: not UTF-8"):
        read_text(path)


def test_full_width_colon_always_accepted():
    assert qa("Q1：问题？\nA1：答案。\n") == [("问题？", "答案。")]
    assert qa("Q1 = a?\nA1 = b\n", separator="=") == [("a?", "b")]
    assert qa("Q1：a?\nA1：b\n", separator="=") == [("a?", "b")]


def test_gaps_in_numbering_are_fine():
    pairs, report = md("Q1: a?\nA1: 1\nQ2: b?\nA2: 2\nQ5: c?\nA5: 5\n")
    assert [p.answer for p in pairs] == ["1", "2", "5"] and report.skipped == []


def test_unnumbered_markers():
    assert qa("Q: a?\nA: b\n") == [("a?", "b")]


def test_answer_with_wrong_number_is_skipped():
    pairs, report = md("Q1: a?\nA2: wrong one\nQ2: b?\nA2: right\n")
    assert [(p.question, p.answer) for p in pairs] == [("b?", "right")]
    assert reasons(report) == [
        (2, "answer number 2 does not match question number 1 (line 1)"),
        (1, "question without answer"),
    ]


def test_matching_answer_after_wrong_one_still_pairs():
    pairs, report = md("Q4: a?\nA5: stray\nbody of stray\nA4: right\n")
    assert [(p.question, p.answer) for p in pairs] == [("a?", "right")]
    assert len(report.skipped) == 1


def test_question_without_answer_is_skipped():
    pairs, report = md("Q1: lonely?\n\nQ2: b?\nA2: two\nQ3: also lonely?\n")
    assert [p.question for p in pairs] == ["b?"]
    assert reasons(report) == [(1, "question without answer"), (5, "question without answer")]


def test_answer_without_question_is_skipped():
    pairs, report = md("A1: orphan\nQ2: b?\nA2: two\nA2: second answer\n")
    assert [(p.question, p.answer) for p in pairs] == [("b?", "two")]
    assert [s["line"] for s in report.skipped] == [1, 4]


def test_empty_answer_is_skipped():
    pairs, report = md("Q1: a?\nA1:\n\nQ2: b?\nA2: two\n")
    assert len(pairs) == 1 and reasons(report) == [(1, "empty answer")]


@pytest.mark.parametrize(
    "line", ["FAQ3: not a marker", "See FAQ3: nope", "QA3: no", "Question 3: no", "Quick: no", "    Q3: indented code"]
)
def test_marker_must_be_whole_word_at_line_start(line):
    pairs = qa(f"Q1: a?\nA1: one\n{line}\nA3: three\n")
    assert pairs == [("a?", f"one\n{line}")]


def test_custom_prefixes_and_separator():
    assert qa("问题1：a?\n答案1：b\n", question_prefix="问题", answer_prefix="答案") == [("a?", "b")]
    assert qa("Question 1 - a?\nAnswer 1 - b\n", question_prefix="Question", answer_prefix="Answer", separator="-") == [
        ("a?", "b")
    ]


def test_custom_patterns_with_named_groups():
    text = "<q n=1>What?</q>\n<a n=1>That.\nmore\n"
    options = dict(question_pattern=r"<q n=(?P<num>\d+)>(?P<text>.*)</q>", answer_pattern=r"<a n=(?P<num>\d+)>")
    assert qa(text, **options) == [("What?", "That.\nmore")]


def test_custom_pattern_without_groups_uses_rest_of_line():
    assert qa(">> a?\n<< b\n", question_pattern=r">>\s*", answer_pattern=r"<<\s*") == [("a?", "b")]


@pytest.mark.parametrize("key", ["question_pattern", "answer_pattern"])
def test_invalid_custom_pattern_names_key(key):
    with pytest.raises(UserError, match=rf"{key}: invalid regular expression '\(unclosed'"):
        md("Q1: a\nA1: b\n", **{key: "(unclosed"})


def test_pattern_matching_empty_line_is_rejected():
    with pytest.raises(UserError, match=r"question_pattern.*empty line"):
        md("x", question_pattern=r"Q?")


def test_same_question_and_answer_prefix_is_rejected():
    with pytest.raises(UserError, match="question_prefix and answer_prefix"):
        md("x", question_prefix="Q", answer_prefix="Q")


# --- JSONL / JSON ---------------------------------------------------------------------------------


def test_jsonl_chat_records():
    records = [
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi?"},
                {"role": "assistant", "content": "Hello."},
            ]
        },
        {
            "messages": [
                {"role": "user", "content": "1+1?"},
                {"role": "assistant", "content": "2"},
                {"role": "user", "content": "Times 3?"},
                {"role": "assistant", "content": "6"},
            ]
        },
    ]
    pairs, report = parse_jsonl("\n".join(json.dumps(r) for r in records) + "\n", "chat.jsonl")
    # One sample per conversation: its last answer, with the earlier turns as history (trained on too).
    assert [(p.question, p.answer, p.line, p.system) for p in pairs] == [
        ("Hi?", "Hello.", 1, "Be brief."),
        ("Times 3?", "6", 2, None),
    ]
    assert pairs[1].history == ({"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"})
    assert [p.turns for p in pairs] == [1, 2]
    assert report == FileReport("chat.jsonl", "jsonl", 2, [], kinds={"chat": 2}, turns=3)


def test_chat_turns_after_the_last_answer_are_dropped_and_empty_assistant_turns_are_context():
    record = {
        "messages": [
            {"role": "user", "content": "a?"},
            {"role": "assistant", "content": None},
            {"role": "user", "content": "b?"},
            {"role": "assistant", "content": "B"},
            {"role": "user", "content": "unanswered"},
        ]
    }
    (pair,), _ = parse_jsonl(json.dumps(record), "c.jsonl")
    assert (pair.question, pair.answer, pair.turns) == ("b?", "B", 1)
    assert pair.history == ({"role": "user", "content": "a?"}, {"role": "assistant", "content": ""})


@pytest.mark.parametrize(
    ("turn", "reason"),
    [
        ({"role": "robot", "content": "x"}, "turn 2 has role 'robot'; expected one of user, human"),
        ({"role": "assistant", "content": "", "tool_calls": [{"name": "f"}]}, 'turn 2 tool call 1 needs a "name" and'),
        ({"content": "x"}, "turn 2 is not an object with a 'role'"),
    ],
)
def test_chat_turns_autotune_cannot_render_are_skipped_with_a_reason(turn, reason):
    record = {"messages": [{"role": "user", "content": "q"}, turn, {"role": "assistant", "content": "a"}]}
    pairs, report = parse_jsonl(json.dumps(record), "c.jsonl")
    assert pairs == [] and report.skipped[0]["reason"].startswith(reason)


def test_jsonl_alpaca_and_question_answer_records():
    lines = [
        json.dumps({"instruction": "Translate.", "input": "bonjour", "output": "hello"}),
        json.dumps({"instruction": "Say hi.", "input": "", "output": "hi"}),
        json.dumps({"question": "Q?", "answer": "A."}),
    ]
    pairs, _ = parse_jsonl("\n".join(lines), "a.jsonl")
    assert [(p.question, p.answer) for p in pairs] == [
        ("Translate.\n\nbonjour", "hello"),
        ("Say hi.", "hi"),
        ("Q?", "A."),
    ]


def test_jsonl_sharegpt_and_alpaca_history():
    lines = [
        json.dumps(
            {
                "conversations": [
                    {"from": "system", "value": "S"},
                    {"from": "human", "value": "hi"},
                    {"from": "gpt", "value": "yo"},
                    {"from": "human", "value": "look it up"},
                    {"from": "gpt", "value": "one moment"},
                    {"from": "observation", "value": "42"},
                    {"from": "human", "value": "so?"},
                    {"from": "gpt", "value": "42."},
                ]
            }
        ),
        json.dumps({"instruction": "and now?", "output": "done", "system": "S2", "history": [["before?", "yes"]]}),
    ]
    pairs, report = parse_jsonl("\n".join(lines), "s.jsonl")
    assert [(p.question, p.answer, p.system) for p in pairs] == [("so?", "42.", "S"), ("and now?", "done", "S2")]
    assert [t["role"] for t in pairs[0].history] == ["user", "assistant", "user", "assistant", "tool"]
    assert pairs[0].turns == 3
    assert pairs[1].history == ({"role": "user", "content": "before?"}, {"role": "assistant", "content": "yes"})
    assert report.skipped == [] and report.kinds == {"sharegpt": 1, "alpaca": 1} and report.turns == 5


def test_jsonl_malformed_line_and_unknown_shape_are_skipped():
    text = json.dumps({"question": "a", "answer": "b"}) + "\n{not json\n\n" + json.dumps({"foo": 1}) + "\n[1, 2]\n"
    pairs, report = parse_jsonl(text, "bad.jsonl")
    assert len(pairs) == 1
    assert [s["line"] for s in report.skipped] == [2, 4, 5]
    assert report.skipped[0]["reason"].startswith("invalid JSON")
    assert "unknown record shape (keys: foo)" in report.skipped[1]["reason"]
    assert "'conversations'" in report.skipped[1]["reason"]


def test_jsonl_chat_without_answer_is_skipped():
    pairs, report = parse_jsonl(json.dumps({"messages": [{"role": "user", "content": "alone"}]}), "c.jsonl")
    assert pairs == [] and "no non-empty user turn followed by an assistant turn" in report.skipped[0]["reason"]


def test_json_list_and_data_wrapper():
    records = [{"question": "a?", "answer": "1"}, {"bogus": True}, {"question": "b?", "answer": "2"}]
    for text in (json.dumps(records), json.dumps({"data": records})):
        pairs, report = parse_json(text, "r.json")
        assert [(p.question, p.line) for p in pairs] == [("a?", 1), ("b?", 3)]
        assert [s["line"] for s in report.skipped] == [2]


def test_json_malformed_file_is_skipped_not_raised():
    pairs, report = parse_json('[{"question": "a",\n  oops]', "broken.json")
    assert pairs == [] and report.skipped[0]["line"] == 2 and "invalid JSON" in report.skipped[0]["reason"]


def test_json_deeply_nested_is_skipped_not_raised():
    pairs, report = parse_json("[" * 100_000, "deep.json")
    assert pairs == [] and report.skipped


# --- directory -----------------------------------------------------------------------------------


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_parse_data_dir_mixed_formats_sorted_and_recursive(tmp_path):
    write(tmp_path / "b.md", "Q1: b?\nA1: b\n")
    write(tmp_path / "a.md", "### Q1: a?\nA1: a\n")
    write(tmp_path / "sub" / "c.jsonl", json.dumps({"question": "c?", "answer": "c"}) + "\n")
    write(tmp_path / "sub" / "d.json", json.dumps([{"instruction": "d?", "output": "d"}]))
    write(tmp_path / "README.md", "Q1: readme?\nA1: must be skipped\n")
    write(tmp_path / "sub" / "readme.MD", "Q1: readme?\nA1: must be skipped\n")
    write(tmp_path / "notes.txt", "Q1: txt?\nA1: ignored\n")
    write(tmp_path / ".hidden" / "e.md", "Q1: hidden?\nA1: ignored\n")
    report = parse_data_dir(tmp_path)
    assert [(f.path, f.format, f.pairs) for f in report.files] == [
        ("a.md", "header_qa", 1),
        ("b.md", "simple_qa", 1),
        ("sub/c.jsonl", "jsonl", 1),
        ("sub/d.json", "json", 1),
    ]
    assert [p.question for p in report.pairs] == ["a?", "b?", "c?", "d?"]
    assert report.warnings == []


def test_forced_format_reads_only_its_extension(tmp_path):
    write(tmp_path / "a.md", "Q1: a?\nA1: a\n")
    write(tmp_path / "c.jsonl", json.dumps({"question": "c?", "answer": "c"}) + "\n")
    assert [p.source for p in parse_data_dir(tmp_path, data_format="jsonl").pairs] == ["c.jsonl"]
    assert [p.source for p in parse_data_dir(tmp_path, data_format="header_qa").pairs] == ["a.md"]


def test_to_json(tmp_path):
    write(tmp_path / "a.md", "Q1: a?\nA1: a\n")
    write(
        tmp_path / "c.jsonl",
        json.dumps(
            {
                "messages": [
                    {"role": "system", "content": "S"},
                    {"role": "user", "content": "u"},
                    {"role": "assistant", "content": "x"},
                ]
            }
        ),
    )
    data = parse_data_dir(tmp_path).to_json()
    assert data["files"][0] == {
        "path": "a.md",
        "format": "simple_qa",
        "pairs": 1,
        "turns": 1,
        "traces": 0,
        "kinds": {},
        "skipped": [],
        "skip_reasons": {},
        "notes": {},
        "encoding": "utf-8",
        "encoding_guessed": False,
    }
    assert data["files"][1]["kinds"] == {"chat": 1}
    assert data["pairs"] == [
        {"question": "a?", "answer": "a", "source": "a.md", "line": 1},
        {"question": "u", "answer": "x", "source": "c.jsonl", "line": 1, "system": "S"},
    ]
    json.dumps(data)  # serialisable as is


def test_file_without_pairs_is_a_warning(tmp_path):
    write(tmp_path / "good.md", "Q1: a?\nA1: a\n")
    write(tmp_path / "x.md", "# Just notes\n\nNo questions here.\n")
    report = parse_data_dir(tmp_path)
    assert len(report.pairs) == 1
    assert f"{tmp_path.as_posix()}/x.md: no QA pairs found (format simple_qa)" in report.warnings


def test_skipped_items_are_a_warning(tmp_path):
    write(tmp_path / "a.md", "Q1: a?\nA1: a\nQ2: lonely?\n")
    (warning,) = parse_data_dir(tmp_path).warnings
    assert "a.md: skipped 1 item(s); line 3: question without answer" in warning


def test_duplicate_questions_are_a_warning(tmp_path):
    write(tmp_path / "a.md", "Q1: same?\nA1: a\n")
    write(tmp_path / "b.md", "Q1: same?\nA1: a\n")
    assert parse_data_dir(tmp_path).warnings == ["1 question(s) appear more than once, e.g. a.md:1 and b.md:1"]


def test_no_pairs_is_user_error(tmp_path):
    write(tmp_path / "notes.md", "Just prose, FAQ3: nothing.\n")
    with pytest.raises(UserError) as e:
        parse_data_dir(tmp_path)
    message = str(e.value)
    assert str(tmp_path) in message and "*.md" in message and "Q1:" in message and "data_format" in message


def test_empty_dir_is_user_error(tmp_path):
    with pytest.raises(
        UserError, match=r"no \*\.md, \*\.markdown, \*\.jsonl, \*\.json, \*\.parquet, \*\.arrow, \*\.csv files"
    ):
        parse_data_dir(tmp_path)


def test_missing_data_dir_is_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        parse_data_dir(tmp_path / "nope")


def test_the_data_cache_inside_data_dir_is_never_read_as_data(tmp_path):
    """data_cache_dir defaults to data/processed: with data_dir=./data the next run read autotune's own cache files
    back as data ("no QA pairs found" warnings, or worse, records). The cache folder is skipped, and said once."""
    data = tmp_path / "data"
    (data / "processed").mkdir(parents=True)
    (data / "qa.jsonl").write_text(json.dumps({"question": "Q?", "answer": "A."}) + "\n")
    (data / "processed" / "cache.jsonl").write_text(json.dumps({"question": "cached?", "answer": "no."}) + "\n")
    report = parse_data_dir(data, cache_dir=data / "processed")
    assert [p.question for p in report.pairs] == ["Q?"] and [f.path for f in report.files] == ["qa.jsonl"]
    assert any("data_cache_dir" in w and "not read as data" in w for w in report.warnings)
    assert len(parse_data_dir(data).pairs) == 2  # without the cache named, it is a folder like any other


def test_unknown_data_format_is_user_error(tmp_path):
    with pytest.raises(UserError, match="data_format: unknown value 'xlsx'"):
        parse_data_dir(tmp_path, data_format="xlsx")


def test_import_is_cheap():
    code = "import sys, autotune.data.parsing; print('torch' in sys.modules or 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "False"


# --- split ---------------------------------------------------------------------------------------


def make_pairs(n: int, sources: int = 3) -> list[QAPair]:
    return [QAPair(f"q{i}?", f"a{i}", f"f{i % sources}.md", i + 1) for i in range(n)]


def test_split_is_deterministic_and_order_independent():
    pairs = make_pairs(50)
    shuffled = pairs[:]
    random.Random(7).shuffle(shuffled)
    first = split_pairs(pairs, 0.2, seed=1)
    assert split_pairs(pairs, 0.2, seed=1) == first
    assert split_pairs(shuffled, 0.2, seed=1) == first
    train, eval_ = first
    assert len(eval_) == 10 and len(train) == 40
    assert sorted(train + eval_, key=lambda p: p.line) == pairs
    assert split_pairs(pairs, 0.2, seed=2) != first


@pytest.mark.parametrize("n", [2, 3, 5])
def test_split_small_sets_keep_one_eval_and_one_train(n):
    train, eval_ = split_pairs(make_pairs(n), 0.01)
    assert len(eval_) >= 1 and len(train) >= 1 and len(train) + len(eval_) == n


def test_split_zero_ratio_and_single_pair():
    assert split_pairs(make_pairs(10), 0.0)[1] == []
    assert split_pairs(make_pairs(1), 0.5) == (make_pairs(1), [])


def test_split_keeps_repeated_questions_and_chat_turns_together():
    pairs = make_pairs(20)
    pairs += [QAPair("q3?", "a3", "copy.md", 1)]  # same question in another file
    pairs += [
        QAPair("t1", "r1", "chat.jsonl", 1),
        QAPair("t2", "r2", "chat.jsonl", 1, history=({"role": "user", "content": "t1"},)),
    ]
    for seed in range(20):
        train, eval_ = split_pairs(pairs, 0.3, seed=seed)
        for group in ({"q3?"}, {"t1", "t2"}):
            sides = {p.question in group for p in train}, {p.question in group for p in eval_}
            assert not (True in sides[0] and True in sides[1])


def test_split_bad_ratio_is_user_error():
    with pytest.raises(UserError, match="eval_ratio"):
        split_pairs(make_pairs(3), 1.0)


# --- sample data shipped in data/raw --------------------------------------------------------------


def test_sample_data_parses():
    report = parse_data_dir(SAMPLE_DIR)
    assert [(f.path, f.format, f.pairs, f.skipped) for f in report.files] == [
        ("finetuning_basics.md", "simple_qa", 20, []),
        ("gpu_memory.md", "header_qa", 20, []),
    ]
    assert report.warnings == []
    assert all(p.answer and p.question and no_heading_lines(p.answer) for p in report.pairs)
    assert not any(p.answer.strip().startswith("#") for p in report.pairs)
    code = [p for p in report.pairs if "gradient_accumulation_steps" in p.answer and "```" in p.answer]
    assert len(code) >= 2
    train, eval_ = split_pairs(report.pairs, 0.1)
    assert (len(train), len(eval_)) == (36, 4)


# --- the real files of the original guide (not part of this repo) ----------------------------------

SHARED_COUNTS = {"QA1.md": 39, "QA2.md": 85, "ai_ml_qa.md": 15, "general_knowledge_qa.md": 15, "programming_qa.md": 10}


@pytest.mark.skipif(not SHARED_QA.is_dir(), reason="shared qa-markdown data not present")
def test_shared_qa_markdown():
    report = parse_data_dir(SHARED_QA)
    assert {f.path: f.pairs for f in report.files} == SHARED_COUNTS
    assert all(f.skipped == [] for f in report.files)
    assert {f.path: f.format for f in report.files}["ai_ml_qa.md"] == "simple_qa"
    assert len(report.pairs) == sum(SHARED_COUNTS.values())
    for pair in report.pairs:
        assert pair.question and pair.answer
        assert no_heading_lines(pair.answer), (pair.source, pair.line)
        assert not re.match(r"\s*#", pair.question)
    # Inline code spans come through untouched, backslashes included.
    answers = "\n".join(p.answer for p in report.pairs if p.source == "programming_qa.md")
    assert "`python -m venv myenv`" in answers and r"`myenv\Scripts\activate`" in answers
    assert "`[expression for item in iterable if condition]`" in answers
    # QA1.md repeats 39 questions of QA2.md: reported, and kept on one side of the split.
    assert any("39 question(s) appear more than once" in w for w in report.warnings)
    train, eval_ = split_pairs(report.pairs)
    assert not {p.question for p in train} & {p.question for p in eval_}


# --- property: any text parses without raising ------------------------------------------------------

markdownish = st.lists(
    st.one_of(
        st.text(max_size=40),
        st.sampled_from(
            [
                "Q1: q",
                "A1: a",
                "Q2：q",
                "A3:",
                "### Q4: h",
                "**Q5:** b",
                "```",
                "~~~",
                "---",
                "# h",
                "A:",
                "Q:",
                "",
                "\r",
                "\ufeff",
            ]
        ),
    ),
    max_size=30,
).map("\n".join)


@settings(max_examples=300, deadline=None)
@given(markdownish)
def test_markdown_never_raises(text):
    pairs, report = md(text)
    assert report.pairs == len(pairs)
    for pair in pairs:
        assert pair.question.strip() and pair.answer.strip() and pair.line >= 1
    assert all(isinstance(s["line"], int) and s["reason"] for s in report.skipped)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300))
def test_arbitrary_text_never_raises(text):
    for parse in (md, lambda t: parse_jsonl(t, "t.jsonl"), lambda t: parse_json(t, "t.json")):
        pairs, report = parse(text)
        assert isinstance(pairs, list) and isinstance(report, FileReport) and report.pairs == len(pairs)


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_decode_or_user_error(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("bytes") / "f.md"
    path.write_bytes(data)
    try:
        decoded = read_text(path)
    except UserError as e:
        assert "f.md" in str(e)
    else:
        assert "\ufffd" not in decoded.text or "\ufffd".encode() in data  # never a replacement character
        md(decoded.text)


def test_data_report_is_a_plain_dataclass():
    report = DataReport(files=[], pairs=[])
    assert report.warnings == [] and report.to_json() == {
        "files": [],
        "pairs": [],
        "totals": {"kinds": {}, "skip_reasons": {}, "notes": {}},
    }
