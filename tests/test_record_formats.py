"""Every key of every record read or reported: records of other training modes (DPO, KTO) and with images are
counted by format and skip reason and refused by train; consecutive assistant turns, later system turns, per-part
and per-turn train flags, and the other reasoning-trace markers are each used as their format defines, shown by
decoding the labels."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers.cli import run_cli

from autotune.config import build_config
from autotune.context import RunContext
from autotune.data.encoding import cache_key, encode_pairs, labelled_spans
from autotune.data.parsing import parse_data_dir, parse_jsonl, parse_markdown
from autotune.data.prepare import data_length_stats, prepare_data
from autotune.errors import UserError
from autotune.tokenizer import OFFLINE_QWEN3, load_tokenizer

pytestmark = pytest.mark.filterwarnings("ignore:Could not find a config file:UserWarning")

CHAT = {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]}
ALPACA = {"instruction": "Add 2 and 2.", "input": "", "output": "4"}
DPO = {"prompt": "Pick one.", "chosen": "The good one.", "rejected": "The bad one."}
# LLaMA-Factory's ranking formats: ShareGPT with chosen/rejected turns, and the older alpaca with output [good, bad].
DPO_SHAREGPT = {
    "conversations": [{"from": "human", "value": "Pick one."}],
    "chosen": {"from": "gpt", "value": "Good."},
    "rejected": {"from": "gpt", "value": "Bad."},
}
DPO_RANKING = {"instruction": "Pick one.", "input": "", "output": ["Good.", "Bad."]}
KTO = {"prompt": "Is it safe?", "completion": "Yes, always.", "label": False}
KTO_TAG = {**CHAT, "kto_tag": True}
IMAGE = {
    "messages": [{"role": "user", "content": "<image>What is it?"}, {"role": "assistant", "content": "A cat."}],
    "images": ["cat.png"],
}
IMAGE_PART = {
    "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}, {"type": "text", "text": "?"}]},
        {"role": "assistant", "content": "A cat."},
    ]
}


def write_jsonl(path: Path, records) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def parse(*records, markers="think"):
    return parse_jsonl("".join(json.dumps(r) + "\n" for r in records), "r.jsonl", markers)


@pytest.fixture(scope="module")
def tok(autotune_cache):
    return load_tokenizer(OFFLINE_QWEN3)


def encode(tok, pair, max_length=1024):
    (row,), report = encode_pairs(tok, [pair], max_length)
    return row, report


def labelled(tok, row) -> list[str]:
    return [tok.decode(row["input_ids"][a:b]) for a, b in labelled_spans(row["labels"])]


def mixed_folder(root: Path) -> Path:
    write_jsonl(root / "chat.jsonl", [CHAT, CHAT | {"id": 7}])
    write_jsonl(root / "alpaca.jsonl", [ALPACA])
    write_jsonl(root / "prefs.jsonl", [DPO, DPO_SHAREGPT, DPO_RANKING])
    write_jsonl(root / "kto.jsonl", [KTO, KTO_TAG])
    write_jsonl(root / "vision.jsonl", [IMAGE, IMAGE_PART])
    return root


def config(tmp_path: Path, data_dir: Path, **values):
    return build_config(
        {
            "model_name": "tiny-qwen3",
            "tokenizer_name": "qwen3-offline",
            "data_dir": str(data_dir),
            "data_cache_dir": str(tmp_path / "cache"),
            "eval_ratio": 0.0,
            **values,
        }
    )


# ------------------------------------------------------------------------------------ formats and skips


def test_mixed_folder_is_counted_by_format_and_skip_reason(tmp_path, capsys):
    d = mixed_folder(tmp_path / "d")
    report = parse_data_dir(d)
    assert report.totals("kinds") == {"chat": 4, "alpaca": 1, "dpo": 3, "kto": 2}
    assert report.totals("skip_reasons") == {
        "preference record (DPO)": 3,
        "KTO record": 2,
        "images, video or audio": 2,
    }
    assert report.totals("notes") == {"key 'id' not used": 1}
    assert [(p.source, p.question) for p in report.pairs] == [
        ("alpaca.jsonl", "Add 2 and 2."),
        ("chat.jsonl", "Hi?"),
        ("chat.jsonl", "Hi?"),
    ]

    code, out, err = run_cli(capsys, "data", "inspect", str(d))
    assert code == 0, err
    assert "records by format: alpaca 1, chat 4, dpo 3, kto 2" in out
    assert "skipped: KTO record 2, images, video or audio 2, preference record (DPO) 3" in out
    assert "train refuses this data: 3 preference (DPO) records (chosen/rejected), 2 KTO records" in out
    assert "note: key 'id' not used (1 records)" in out
    assert out.strip().endswith("3 samples (3 assistant turns, 0 with a reasoning trace) in 5 files")
    code, out, _ = run_cli(capsys, "data", "inspect", str(d), "--json")
    totals = json.loads(out)["totals"]
    assert totals["skip_reasons"]["preference record (DPO)"] == 3 and totals["kinds"]["kto"] == 2


def test_train_refuses_preference_and_kto_files_with_one_error(tmp_path, autotune_cache):
    d = mixed_folder(tmp_path / "d")
    ctx = RunContext(config(tmp_path, d))
    for prepare in (lambda: prepare_data(ctx, echo=lambda m: None), lambda: data_length_stats(ctx)):
        with pytest.raises(UserError) as caught:
            prepare()
        message = str(caught.value)
        assert message.startswith(f"data_dir {str(d)!r} holds data of another training mode")
        assert "prefs.jsonl: 3 preference (DPO) records (chosen/rejected)" in message
        assert "kto.jsonl: 2 KTO records" in message
        assert "vision.jsonl" not in message and "Fix: move these files out of the data folder" in message


def test_train_prints_the_counts_of_what_it_read(tmp_path, autotune_cache):
    d = tmp_path / "d"
    write_jsonl(d / "chat.jsonl", [CHAT, IMAGE, CHAT | {"source": "web"}])
    said: list[str] = []
    prepare_data(RunContext(config(tmp_path, d)), echo=said.append)
    assert "data: records by format: chat 3" in said
    assert "data: skipped: images, video or audio 1" in said
    assert "data: notes: key 'source' not used 1" in said


def test_a_folder_of_preference_data_only_is_refused_as_such(tmp_path):
    d = tmp_path / "d"
    write_jsonl(d / "prefs.jsonl", [DPO])
    with pytest.raises(UserError, match=r"prefs\.jsonl: 1 preference"):
        parse_data_dir(d)


@pytest.mark.parametrize(
    ("message", "kind", "reason"),
    [
        ({"role": "robot", "content": "x"}, "unknown role", "turn 2 has role 'robot'; expected one of user, human"),
        ({"from": "x"}, "invalid record", "turn 2 is not an object with a 'role'"),
        (
            {"role": "user", "content": 3},
            "invalid record",
            "turn 2 content must be a string or a list of content parts",
        ),
    ],
)
def test_turns_that_cannot_be_read_skip_the_record_with_a_counted_reason(message, kind, reason):
    record = {"messages": [{"role": "user", "content": "q"}, message, {"role": "assistant", "content": "a"}]}
    pairs, report = parse(record)
    assert pairs == [] and report.skip_reasons == {kind: 1} and report.skipped[0]["reason"].startswith(reason)


def test_llama_factory_content_parts_are_read():
    record = {
        "messages": [
            {"role": "user", "content": [{"type": "text", "value": "Hi "}, {"type": "text", "value": "there?"}]},
            {"role": "assistant", "content": [{"type": "text", "value": "Hello."}]},
        ]
    }
    (pair,), report = parse(record)
    assert (pair.question, pair.answer, report.skipped) == ("Hi there?", "Hello.", [])


def test_trailing_turns_and_unknown_turn_keys_are_noted():
    record = {
        "messages": [
            {"role": "user", "content": "q", "lang": "en"},
            {"role": "assistant", "content": "a"},
            {"role": "user", "content": "unanswered"},
        ]
    }
    (pair,), report = parse(record)
    assert pair.answer == "a"
    assert report.notes == {
        "turns after the last answer not used (nothing follows them to learn)": 1,
        "turn key 'lang' not used": 1,
    }


def test_prompt_completion_records_are_sft():
    (plain, chat), report = parse(
        {"prompt": "Capital of France?", "completion": "Paris."},
        {
            "prompt": [{"role": "user", "content": "Capital of Peru?"}],
            "completion": [{"role": "assistant", "content": "Lima."}],
        },
    )
    assert [(p.question, p.answer) for p in (plain, chat)] == [
        ("Capital of France?", "Paris."),
        ("Capital of Peru?", "Lima."),
    ]
    assert report.kinds == {"prompt-completion": 2}


# ------------------------------------------------------------------------------------ every assistant turn


def test_consecutive_assistant_turns_are_both_trained(tok):
    record = {
        "messages": [
            {"role": "user", "content": "Tell me two facts."},
            {"role": "assistant", "content": "Water boils at 100 °C."},
            {"role": "assistant", "content": "Ice melts at 0 °C."},
        ]
    }
    (pair,), _ = parse(record)
    assert pair.turns == 2
    row, report = encode(tok, pair)
    assert labelled(tok, row) == ["Water boils at 100 °C.<|im_end|>", "Ice melts at 0 °C.<|im_end|>"]
    assert report.turns == 2
    assert tok.decode(row["input_ids"]) == tok.apply_chat_template(record["messages"], tokenize=False).removesuffix(
        "\n"
    )


def test_a_later_system_turn_stays_where_it_is(tok):
    record = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi?"},
            {"role": "assistant", "content": "Hello."},
            {"role": "system", "content": "Now answer in French."},
            {"role": "user", "content": "Bye?"},
            {"role": "assistant", "content": "Au revoir."},
        ]
    }
    (pair,), _ = parse(record)
    assert pair.system == "Be brief."  # the leading one is the system prompt; the later one is a turn, in place
    row, _ = encode(tok, pair)
    assert labelled(tok, row) == ["Hello.<|im_end|>", "Au revoir.<|im_end|>"]
    assert tok.decode(row["input_ids"]) == tok.apply_chat_template(record["messages"], tokenize=False).removesuffix(
        "\n"
    )


def test_parts_marked_train_false_are_context_not_labels(tok):
    record = {
        "messages": [
            {"role": "user", "content": "Quote the rule, then apply it."},
            {
                "role": "assistant",
                "content": [
                    {"type": "text", "text": "The rule says: keep left. ", "train": False},
                    {"type": "text", "text": "So I keep left."},
                ],
            },
        ]
    }
    (pair,), report = parse(record)
    assert report.skipped == [] and pair.answer == "The rule says: keep left. So I keep left."
    row, _ = encode(tok, pair)
    assert labelled(tok, row) == ["So I keep left.<|im_end|>"]
    assert "The rule says: keep left. So I keep left.<|im_end|>" in tok.decode(row["input_ids"])


def test_a_train_flag_changes_the_cache_key(tok):
    parts = [{"type": "text", "text": "Rule. "}, {"type": "text", "text": "Answer."}]
    flagged = [dict(parts[0], train=False), parts[1]]
    keys = set()
    for content in (parts, flagged):
        (pair,), _ = parse({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": content}]})
        keys.add(cache_key(tok, [pair], 256, system_prompt=None, thinking_model=False, overflow="truncate"))
    assert len(keys) == 2  # same text, other labels: a cache of the one is no cache of the other


def test_turns_marked_not_trained_are_context(tok):
    record = {
        "messages": [
            {"role": "user", "content": "1?"},
            {"role": "assistant", "content": "one", "training": False},
            {"role": "user", "content": "2?"},
            {"role": "assistant", "content": "two", "weight": 1},
            {"role": "user", "content": "3?"},
            {"role": "assistant", "content": "three", "weight": 0},
        ]
    }
    (pair,), report = parse(record)
    # The last turn is not trained, so nothing follows the answer "two" to learn.
    assert (pair.answer, pair.turns) == ("two", 1)
    assert report.notes == {"turns after the last answer not used (nothing follows them to learn)": 1}
    row, _ = encode(tok, pair)
    assert labelled(tok, row) == ["two<|im_end|>"] and "one<|im_end|>" in tok.decode(row["input_ids"])


def test_truncation_inside_an_untrained_part_drops_that_turn_whole(tok):
    record = {
        "messages": [
            {"role": "user", "content": "a?"},
            {"role": "assistant", "content": "First answer."},
            {"role": "user", "content": "b?"},
            {
                "role": "assistant",
                "content": [{"type": "text", "text": "context " * 40, "train": False}, {"type": "text", "text": "end"}],
            },
        ]
    }
    (pair,), _ = parse(record)
    full, _ = encode(tok, pair)
    first_end = labelled_spans(full["labels"])[0][1]
    (cut,), report = encode_pairs(tok, [pair], first_end + 20)
    assert report.truncated == 1 and cut["input_ids"] == full["input_ids"][:first_end]
    assert labelled(tok, cut) == ["First answer.<|im_end|>"]


def test_a_train_flag_on_a_user_part_skips_the_record():
    record = {
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "q", "train": False}]},
            {"role": "assistant", "content": "a"},
        ]
    }
    pairs, report = parse(record)
    assert pairs == [] and report.skip_reasons == {"train flags": 1}


# ------------------------------------------------------------------------------------ reasoning markers

STRATOS = (
    "<|begin_of_thought|>\n\n2 and 2 make 4.\n\n<|end_of_thought|>\n\n"
    "<|begin_of_solution|>\n\nThe sum is 4.\n\n<|end_of_solution|>"
)
GRPO = "<reasoning>\n2 and 2 make 4.\n</reasoning>\nThe sum is 4."


@pytest.mark.parametrize("answer", [STRATOS, GRPO])
def test_reasoning_markers_are_mapped_into_the_think_block(tok, answer):
    (pair,), report = parse({"instruction": "Add 2 and 2.", "output": answer})
    assert (pair.reasoning, pair.answer) == ("2 and 2 make 4.", "The sum is 4.")
    marker = "<|begin_of_thought|>" if answer is STRATOS else "<reasoning>"
    assert report.notes == {f"{marker} reasoning mapped into the think block": 1}
    (row,), encoded = encode_pairs(tok, [pair], 1024, thinking_model=True)
    assert labelled(tok, row) == ["<think>\n2 and 2 make 4.\n</think>\n\nThe sum is 4.<|im_end|>"]
    assert encoded.traces_trained == 1


@pytest.mark.parametrize("answer", [STRATOS, GRPO])
def test_reasoning_markers_text_leaves_them_in_the_answer(answer):
    (pair,), report = parse({"instruction": "Add 2 and 2.", "output": answer}, markers="text")
    assert (pair.reasoning, pair.answer) == (None, answer)
    assert list(report.notes) == [
        f"{'<|begin_of_thought|>' if answer is STRATOS else '<reasoning>'} reasoning left as answer text "
        "(reasoning_markers: text)"
    ]


def test_reasoning_markers_in_markdown_and_an_unclosed_one():
    pairs, report = parse_markdown(f"Q1: Add 2 and 2.\nA1: {GRPO}\n\nQ2: x?\nA2: <reasoning>never closed\n", "m.md")
    assert [(p.reasoning, p.answer) for p in pairs] == [("2 and 2 make 4.", "The sum is 4.")]
    assert report.skip_reasons == {"broken reasoning block": 1}


def test_reasoning_markers_key_reaches_the_data_commands(tmp_path, capsys):
    d = tmp_path / "d"
    write_jsonl(d / "r.jsonl", [{"instruction": "Add 2 and 2.", "output": GRPO}])
    code, out, _ = run_cli(capsys, "data", "inspect", str(d), "--set", "reasoning_markers=text")
    assert code == 0 and "<reasoning> reasoning left as answer text (reasoning_markers: text) (1 records)" in out
    assert out.strip().endswith("1 samples (1 assistant turns, 0 with a reasoning trace) in 1 files")
    code, out, _ = run_cli(capsys, "data", "inspect", str(d))
    assert code == 0 and out.strip().endswith("1 samples (1 assistant turns, 1 with a reasoning trace) in 1 files")
