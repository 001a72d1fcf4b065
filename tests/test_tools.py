"""Qwen3 tool calling trained as Qwen3 renders it: a record's `tools` in the template's tools section, tool calls
(OpenAI `tool_calls`, Qwen's `<tool_call>` text, ShareGPT's `function_call`) and every assistant turn after the
tool replies labelled, the replies themselves context. Records are written to the published formats: Qwen's own
(function-calling docs: messages with `<tool_call>` text and `tool` turns), glaive's as LLaMA-Factory converts it
(glaive_toolcall: ShareGPT with human / function_call / observation / gpt and a `tools` JSON string), Hermes'
(NousResearch hermes-function-calling-v1: ShareGPT with the tools in the system text, `<tool_call>` and
`<tool_response>` text) and OpenAI's (`tool_calls` with JSON-string arguments)."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
from helpers.chat_templates import QWEN3_TOOLS_TEMPLATE, with_template

from autotune.data.encoding import cache_key, encode_pairs, labelled_spans, render_prompt
from autotune.data.parsing import parse_jsonl
from autotune.errors import UserError
from autotune.tokenizer import OFFLINE_QWEN3, load_tokenizer

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather of a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
CALL_TEXT = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'

QWEN_NATIVE = {
    "messages": [
        {"role": "system", "content": "You are a weather bot."},
        {"role": "user", "content": "How warm is Paris?"},
        {"role": "assistant", "content": CALL_TEXT},
        {"role": "tool", "content": '{"celsius": 21}'},
        {"role": "assistant", "content": "It is 21 °C in Paris."},
    ],
    "tools": [WEATHER],
}
# glaive_toolcall_en as LLaMA-Factory ships it: the tools as a JSON string, the call as a function_call turn.
GLAIVE = {
    "conversations": [
        {"from": "human", "value": "How warm is Rome?"},
        {"from": "function_call", "value": '{"name": "get_weather", "arguments": {"city": "Rome"}}'},
        {"from": "observation", "value": '{"celsius": 25}'},
        {"from": "gpt", "value": "It is 25 °C in Rome."},
    ],
    "tools": json.dumps([WEATHER["function"]]),
}
# hermes-function-calling-v1: the tools in the system text, the reply already in <tool_response> tags.
HERMES = {
    "conversations": [
        {"from": "system", "value": "You are a function calling AI model. <tools> [...] </tools>"},
        {"from": "human", "value": "How warm is Oslo?"},
        {"from": "gpt", "value": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'},
        {"from": "tool", "value": '<tool_response>\n{"celsius": 3}\n</tool_response>'},
        {"from": "gpt", "value": "It is 3 °C in Oslo."},
    ]
}
OPENAI = {
    "messages": [
        {"role": "user", "content": "Weather in Lima and Quito?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Lima"}'}},
                {"id": "c2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Quito"}'}},
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": '{"celsius": 19}'},
        {"role": "tool", "tool_call_id": "c2", "content": '{"celsius": 14}'},
        {"role": "assistant", "content": "Lima 19 °C, Quito 14 °C."},
    ],
    "tools": [WEATHER],
}


@pytest.fixture(scope="module")
def tok(autotune_cache):
    return with_template(load_tokenizer(OFFLINE_QWEN3), QWEN3_TOOLS_TEMPLATE)


def parse(*records):
    return parse_jsonl("".join(json.dumps(r) + "\n" for r in records), "tools.jsonl")


def encode(tok, pair, thinking_model=True):
    (row,), report = encode_pairs(tok, [pair], 4096, thinking_model=thinking_model)
    return row, report


def expected_row(tok, before: list[dict], tools, turns: list[str], between: str, thinking_model: bool) -> str:
    """A two-turn tool flow's row as the model meets it: the template's own prompt for the first turn (its tools
    section, the system and user turns, the generation prompt), the call, the tool replies as the template writes
    them after a call, the generation prompt again, the final answer. In thinking mode each turn follows the empty
    think block, as Qwen3 answers without thinking."""
    extra = {"enable_thinking": False} if thinking_model else {}
    prompt = tok.apply_chat_template(before, tools=tools, tokenize=False, add_generation_prompt=True, **extra)
    think = "<think>\n\n</think>\n\n" if thinking_model else ""
    return prompt + turns[0] + between + "<|im_start|>assistant\n" + think + turns[1]


def labelled(tok, row) -> list[str]:
    return [tok.decode(row["input_ids"][a:b]) for a, b in labelled_spans(row["labels"])]


def unlabelled(tok, row) -> str:
    return tok.decode([t for t, label in zip(row["input_ids"], row["labels"]) if label == -100])


@pytest.mark.parametrize("thinking_model", [True, False])
def test_qwen_native_tool_flow_trains_the_call_and_the_final_answer(tok, thinking_model):
    (pair,), report = parse(QWEN_NATIVE)
    assert (pair.question, pair.answer, pair.turns, report.skipped) == (
        "How warm is Paris?",
        QWEN_NATIVE["messages"][4]["content"],
        2,
        [],
    )
    row, encoded = encode(tok, pair, thinking_model)
    # Exactly the two assistant turns are labelled, each with its end of turn; the tool reply is context.
    assert labelled(tok, row) == [CALL_TEXT + "<|im_end|>", "It is 21 °C in Paris.<|im_end|>"]
    assert encoded.turns == 2
    context = unlabelled(tok, row)
    assert '<tool_response>\n{"celsius": 21}\n</tool_response>' in context
    assert '"name": "get_weather"' in context.split("<|im_start|>user")[0]  # the tools section, in the system turn
    between = '\n<|im_start|>user\n<tool_response>\n{"celsius": 21}\n</tool_response><|im_end|>\n'
    before = QWEN_NATIVE["messages"][:2]
    assert tok.decode(row["input_ids"]) == expected_row(
        tok, before, [WEATHER], labelled(tok, row), between, thinking_model
    )


def test_openai_tool_calls_are_labelled_as_the_template_renders_them(tok):
    (pair,), report = parse(OPENAI)
    assert report.skipped == [] and pair.turns == 2
    row, _ = encode(tok, pair, thinking_model=False)
    calls = (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Lima"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Quito"}}\n</tool_call>'
    )
    assert labelled(tok, row) == [calls + "<|im_end|>", "Lima 19 °C, Quito 14 °C.<|im_end|>"]
    # Both replies in one user turn, as Qwen3 groups consecutive tool turns.
    assert '<|im_start|>user\n<tool_response>\n{"celsius": 19}\n</tool_response>\n<tool_response>\n' in unlabelled(
        tok, row
    )
    between = (
        '\n<|im_start|>user\n<tool_response>\n{"celsius": 19}\n</tool_response>\n<tool_response>\n{"celsius": 14}\n'
        "</tool_response><|im_end|>\n"
    )
    assert tok.decode(row["input_ids"]) == expected_row(
        tok, OPENAI["messages"][:1], [WEATHER], labelled(tok, row), between, False
    )


def test_a_tool_call_with_a_trace_is_trained_inside_its_think_block(tok):
    messages = json.loads(json.dumps(OPENAI["messages"]))
    messages[1]["reasoning_content"] = "I need both cities' weather."
    (pair,), _ = parse({"messages": messages, "tools": [WEATHER]})
    row, report = encode(tok, pair, thinking_model=True)
    first, last = labelled(tok, row)
    assert first.startswith("<think>\nI need both cities' weather.\n</think>\n\n<tool_call>\n")
    assert first.endswith('{"city": "Quito"}}\n</tool_call><|im_end|>') and last == "Lima 19 °C, Quito 14 °C.<|im_end|>"
    assert (report.traces_trained, report.turns) == (1, 2)


def test_glaive_function_call_and_observation_turns(tok):
    (pair,), report = parse(GLAIVE)
    assert report.skipped == [] and report.kinds == {"sharegpt": 1}
    assert pair.tools == (WEATHER["function"],)  # the JSON string read as the list it holds
    row, _ = encode(tok, pair, thinking_model=False)
    assert labelled(tok, row) == [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call><|im_end|>',
        "It is 25 °C in Rome.<|im_end|>",
    ]
    between = '\n<|im_start|>user\n<tool_response>\n{"celsius": 25}\n</tool_response><|im_end|>\n'
    before = [{"role": "user", "content": "How warm is Rome?"}]
    expected = expected_row(tok, before, [WEATHER["function"]], labelled(tok, row), between, False)
    assert tok.decode(row["input_ids"]) == expected


def test_hermes_tool_reply_is_wrapped_once(tok):
    (pair,), report = parse(HERMES)
    assert report.notes == {"tool reply's own <tool_response> tags removed (the template adds them)": 1}
    row, _ = encode(tok, pair, thinking_model=False)
    text = tok.decode(row["input_ids"])
    assert text.count("<tool_response>") == 1 and '<tool_response>\n{"celsius": 3}\n</tool_response>' in text
    assert labelled(tok, row) == [HERMES["conversations"][2]["value"] + "<|im_end|>", "It is 3 °C in Oslo.<|im_end|>"]


def test_inference_prompt_carries_the_tools_and_the_flow_before_the_answer(tok):
    (pair,), _ = parse(QWEN_NATIVE)
    prompt = render_prompt(tok, pair)
    expected = tok.apply_chat_template(
        QWEN_NATIVE["messages"][:4], tools=[WEATHER], tokenize=False, add_generation_prompt=True
    )
    assert prompt == expected


def test_template_without_tools_is_refused_not_silently_untrained(autotune_cache):
    plain = load_tokenizer(OFFLINE_QWEN3)  # its compact template has no tools
    (with_tools,), _ = parse(QWEN_NATIVE)
    with pytest.raises(UserError, match="does not render a tools section"):
        encode_pairs(plain, [with_tools], 4096)
    (calls,), _ = parse({"messages": OPENAI["messages"]})
    with pytest.raises(UserError, match="does not render an assistant turn's tool_calls"):
        encode_pairs(plain, [calls], 4096)


def test_tools_and_calls_change_the_cache_key(tok):
    (pair,), _ = parse(OPENAI)
    (other_tools,), _ = parse({**OPENAI, "tools": [WEATHER["function"]]})
    changed = json.loads(json.dumps(OPENAI))
    changed["messages"][1]["tool_calls"][0]["function"]["arguments"] = '{"city": "Cusco"}'
    (other_call,), _ = parse(changed)
    keys = {
        cache_key(tok, [p], 512, system_prompt=None, thinking_model=True, overflow="truncate")
        for p in (pair, other_tools, other_call)
    }
    assert len(keys) == 3


@pytest.mark.parametrize(
    ("turn", "kind"),
    [
        ({"from": "function_call", "value": "get_weather(city='Rome')"}, "invalid tool call"),
        ({"from": "function_call", "value": '{"arguments": {}}'}, "invalid tool call"),
    ],
)
def test_malformed_function_calls_are_skipped_with_a_reason(turn, kind):
    record = {"conversations": [GLAIVE["conversations"][0], turn, *GLAIVE["conversations"][2:]]}
    pairs, report = parse(record)
    assert pairs == [] and report.skip_reasons == {kind: 1}
    assert report.skipped[0]["reason"].startswith("turn 2")
