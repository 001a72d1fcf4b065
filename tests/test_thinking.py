"""Qwen3 thinking: reasoning traces trained inside the think block, shown by decoding the labels, with the two
kinds of Qwen3 template (the hybrid one of Qwen3-0.6B..32B, and Qwen3-4B-Thinking-2507's forced-think one)."""

from __future__ import annotations

import copy
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

from autotune.data.encoding import encode_pairs, labelled_spans, load_or_encode, render_prompt
from autotune.data.parsing import QAPair, parse_jsonl, split_reasoning
from autotune.tokenizer import OFFLINE_QWEN3, load_tokenizer

# Qwen3's chat template, without the tool-calling parts: the system turn, `last_query_index` (an assistant turn
# after the last user query renders its think block, one before it does not), reasoning from `reasoning_content`
# or a `</think>` in the content, and `enable_thinking=false` writing the empty think block.
_BODY = (
    "{%- if messages[0].role == 'system' %}{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}"
    "{%- for message in messages[::-1] %}{%- set index = (messages|length - 1) - loop.index0 %}"
    "{%- if ns.multi_step_tool and message.role == 'user' %}"
    "{%- set ns.multi_step_tool = false %}{%- set ns.last_query_index = index %}{%- endif %}{%- endfor %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' %}"
    "{%- set content = message.content %}{%- set reasoning_content = '' %}"
    "{%- if message.reasoning_content is string %}{%- set reasoning_content = message.reasoning_content %}"
    "{%- elif '</think>' in content %}"
    "{%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}{%- endif %}"
    "{%- if loop.index0 > ns.last_query_index and (loop.last or reasoning_content) %}"
    "{{- '<|im_start|>assistant\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n'"
    " + content.lstrip('\\n') }}"
    "{%- else %}{{- '<|im_start|>assistant\\n' + content }}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endif %}{%- endfor %}"
)
HYBRID_TEMPLATE = (
    _BODY + "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}{%- endif %}"
)
# Qwen3-4B-Thinking-2507: the same turns, and a generation prompt that always opens the think block.
THINKING_2507_TEMPLATE = (
    _BODY + "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n<think>\\n' }}{%- endif %}"
)
INSTRUCT_2507_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
TEMPLATES = {"hybrid": HYBRID_TEMPLATE, "thinking-2507": THINKING_2507_TEMPLATE}


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer(OFFLINE_QWEN3, cache_dir=tmp_path_factory.mktemp("tok"))


def with_template(tok, template):
    other = copy.copy(tok)
    other.chat_template = template
    return other


def encode(tok, pair, **options):
    (row,), report = encode_pairs(tok, [pair], 1024, thinking_model=True, **options)
    return row, report


def labelled(tok, row) -> list[str]:
    return [tok.decode(row["input_ids"][a:b]) for a, b in labelled_spans(row["labels"])]


def unlabelled(tok, row) -> str:
    return tok.decode([t for t, label in zip(row["input_ids"], row["labels"]) if label == -100])


def rendered(tok, messages) -> str:
    """The template's own rendering of a finished conversation, without the "\\n" after the last <|im_end|>."""
    return tok.apply_chat_template(messages, tokenize=False).removesuffix("\n")


PAIR = QAPair("What is 6 x 7?", "42.", "t.jsonl", 1, reasoning="6 x 7: six sevens.\n\nThat is 42.")


# ---------------------------------------------------------------------------------------------- encoding


@pytest.mark.parametrize("kind", TEMPLATES)
def test_trace_is_trained_inside_the_think_block(tok, kind):
    t = with_template(tok, TEMPLATES[kind])
    row, report = encode(t, PAIR)
    (answer,) = labelled(t, row)
    if kind == "hybrid":  # the model opens the think block itself, so <think> is labelled too
        assert answer == "<think>\n6 x 7: six sevens.\n\nThat is 42.\n</think>\n\n42.<|im_end|>"
        assert unlabelled(t, row).endswith("<|im_start|>assistant\n")
    else:  # the template opened it in the prompt: the labels start with the trace
        assert answer == "6 x 7: six sevens.\n\nThat is 42.\n</think>\n\n42.<|im_end|>"
        assert unlabelled(t, row).endswith("<|im_start|>assistant\n<think>\n")
    # What is trained is exactly the template's own rendering of the answer with its reasoning_content.
    messages = [
        {"role": "user", "content": PAIR.question},
        {"role": "assistant", "content": PAIR.answer, "reasoning_content": PAIR.reasoning},
    ]
    assert t.decode(row["input_ids"]) == rendered(t, messages)
    assert (report.traces_trained, report.traces_dropped) == (1, 0)


@pytest.mark.parametrize("kind", TEMPLATES)
def test_sample_without_trace_keeps_the_empty_think_block(tok, kind):
    t = with_template(tok, TEMPLATES[kind])
    plain = QAPair(PAIR.question, PAIR.answer, "t.jsonl", 1)
    row, report = encode(t, plain)
    assert labelled(t, row) == ["42.<|im_end|>"]
    assert unlabelled(t, row).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert row["input_ids"][: row["prompt_tokens"]] == t(render_prompt(t, plain, thinking_model=True))["input_ids"]
    assert (report.traces_trained, report.traces_dropped) == (0, 0)


@pytest.mark.parametrize("kind", TEMPLATES)
def test_drop_trains_the_empty_think_block_instead(tok, kind):
    t = with_template(tok, TEMPLATES[kind])
    row, report = encode(t, PAIR, reasoning="drop")
    assert labelled(t, row) == ["42.<|im_end|>"]
    assert "six sevens" not in t.decode(row["input_ids"])
    assert unlabelled(t, row).endswith("<think>\n\n</think>\n\n")
    assert (report.traces_trained, report.traces_dropped) == (0, 1)


def test_template_without_thinking_drops_the_trace(tok):
    t = with_template(tok, INSTRUCT_2507_TEMPLATE)
    row, report = encode(t, PAIR)
    assert labelled(t, row) == ["42.<|im_end|>"] and "<think>" not in t.decode(row["input_ids"])
    assert (report.traces_trained, report.traces_dropped) == (0, 1)


@pytest.mark.parametrize("kind", TEMPLATES)
def test_multi_turn_traces_each_in_their_own_think_block(tok, kind):
    t = with_template(tok, TEMPLATES[kind])
    pair = QAPair(
        "And 6 x 8?",
        "48.",
        "t.jsonl",
        1,
        reasoning="One more six: 48.",
        history=(
            {"role": "user", "content": "What is 6 x 7?"},
            {"role": "assistant", "content": "42.", "reasoning_content": "Six sevens."},
            {"role": "user", "content": "Thanks. Hi?"},
            {"role": "assistant", "content": "Hello."},
        ),
    )
    row, report = encode(t, pair)
    opened = "<think>\n" if kind == "hybrid" else ""
    assert labelled(t, row) == [
        f"{opened}Six sevens.\n</think>\n\n42.<|im_end|>",
        "Hello.<|im_end|>",
        f"{opened}One more six: 48.\n</think>\n\n48.<|im_end|>",
    ]
    # The turn without a trace got the empty think block, in the prompt; user turns are never labelled.
    context = unlabelled(t, row)
    assert "<|im_start|>user\nThanks. Hi?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n" in context
    assert "Six sevens" not in context and "What is 6 x 7?" in context
    assert (report.turns, report.traces_trained) == (3, 2)


def test_cache_key_follows_the_reasoning_switch_and_the_trace(tok, tmp_path):
    t = with_template(tok, HYBRID_TEMPLATE)
    first = load_or_encode(t, [PAIR], 256, tmp_path, thinking_model=True)
    assert load_or_encode(t, [PAIR], 256, tmp_path, thinking_model=True)[2]
    dropped = load_or_encode(t, [PAIR], 256, tmp_path, thinking_model=True, reasoning="drop")
    assert not dropped[2] and dropped[0] != first[0]
    other = QAPair(PAIR.question, PAIR.answer, "t.jsonl", 1, reasoning="Different.")
    assert not load_or_encode(t, [other], 256, tmp_path, thinking_model=True)[2]


# ----------------------------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("<think>\nR.\n</think>\n\nA.", ("R.", "A.")),
        ("R only closed.</think>A.", ("R only closed.", "A.")),  # a forced-think model's output
        ("<think>\n\n</think>\n\nA.", (None, "A.")),  # the empty block is no trace
        ("No trace. I <think> so.", (None, "No trace. I <think> so.")),
        ("Say <think>x</think> here.", (None, "Say <think>x</think> here.")),  # not opening the answer
    ],
)
def test_split_reasoning(text, expected):
    assert split_reasoning(text) == expected


def test_parser_reads_traces_from_reasoning_content_and_think_blocks():
    lines = [
        {
            "messages": [
                {"role": "user", "content": "q1"},
                {"role": "assistant", "content": "a1", "reasoning_content": "r1"},
            ]
        },
        {"conversations": [{"from": "human", "value": "q2"}, {"from": "gpt", "value": "<think>r2</think>\n\na2"}]},
        {"instruction": "q3", "output": "<think>\nr3\n</think>\na3"},
        {"question": "q4", "answer": "a4", "reasoning_content": "r4"},
        {
            "messages": [
                {"role": "user", "content": "q5"},
                {"role": "assistant", "content": "<think>h5</think>x5"},
                {"role": "user", "content": "q6"},
                {"role": "assistant", "content": "a6"},
            ]
        },
    ]
    pairs, report = parse_jsonl("\n".join(json.dumps(r) for r in lines), "r.jsonl")
    assert [(p.reasoning, p.answer) for p in pairs] == [
        ("r1", "a1"),
        ("r2", "a2"),
        ("r3", "a3"),
        ("r4", "a4"),
        (None, "a6"),
    ]
    assert pairs[4].history[1] == {"role": "assistant", "content": "x5", "reasoning_content": "h5"}
    assert report.traces == 5 and report.turns == 6


@pytest.mark.parametrize(
    "answer,reason",
    [
        ("<think>weighing it up, and then", "opened and never closed"),
        ("<think>a <think>b</think> c</think>The answer.", "nested or repeated"),
        ("<think>a</think>The answer.<think>again</think>", "nested or repeated"),
    ],
    ids=["unclosed", "nested", "repeated"],
)
def test_a_broken_think_block_is_skipped_with_its_reason(answer, reason):
    """Unclosed or nested think blocks were trained as written (the tags as answer text, or a trace cut at the
    inner </think>): the record is skipped, and `data inspect` counts why. A whole block still reads as before."""
    from autotune.data.parsing import BrokenThink, parse_markdown

    with pytest.raises(BrokenThink, match=reason):
        split_reasoning(answer)
    records = [
        {"question": "Q?", "answer": answer},
        {"question": "Q2?", "answer": "<think>fine</think>Whole."},
    ]
    pairs, report = parse_jsonl("\n".join(json.dumps(r) for r in records), "d.jsonl")
    assert [(p.question, p.reasoning, p.answer) for p in pairs] == [("Q2?", "fine", "Whole.")]
    assert len(report.skipped) == 1 and reason in report.skipped[0]["reason"]
    md_pairs, md_report = parse_markdown(f"Q1: Q?\nA1: {answer}\n\nQ2: Q2?\nA2: Whole.\n", "d.md")
    assert [p.question for p in md_pairs] == ["Q2?"] and reason in md_report.skipped[0]["reason"]
