"""Data the way the ecosystem ships it: parquet, arrow and CSV through `datasets`, hub dataset ids, ShareGPT, and
multi-turn chats trained on every assistant turn; `data inspect` / `data stats` over all of it; and end-to-end
training of the tiny Qwen3 on each."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers.cli import run_cli
from helpers.runs import train_tiny

from autotune.config import build_config
from autotune.context import RunContext
from autotune.data.encoding import IGNORE_INDEX, labelled_spans
from autotune.data.parsing import parse_data, parse_data_dir, parse_hub_dataset
from autotune.data.prepare import prepare_data
from autotune.errors import UserError

pytestmark = pytest.mark.filterwarnings("ignore:Could not find a config file:UserWarning")

SHAREGPT = [
    {
        "conversations": [
            {"from": "system", "value": "You name boxes."},
            {"from": "human", "value": f"What is the code word for box {i}?"},
            {"from": "gpt", "value": f"Box {i} is {word}."},
        ]
    }
    for i, word in enumerate(["amber", "birch", "cedar", "delta", "ember", "fjord"], 1)
]
MULTI_TURN = [
    {
        "messages": [
            {"role": "user", "content": f"Open box {i}."},
            {"role": "assistant", "content": f"Box {i} is open."},
            {"role": "user", "content": "What is inside?"},
            {"role": "assistant", "content": f"A {word} leaf."},
            {"role": "user", "content": "Close it."},
            {"role": "assistant", "content": "Closed."},
        ]
    }
    for i, word in enumerate(["red", "green", "blue", "gold", "grey", "pink"], 1)
]


def write_jsonl(path: Path, records) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def write_parquet(path: Path, records) -> Path:
    import datasets

    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_list(records).to_parquet(str(path))
    return path


# ------------------------------------------------------------------------------------------ tables


def test_parquet_sharegpt_rows(tmp_path):
    write_parquet(tmp_path / "d" / "chat.parquet", SHAREGPT)
    report = parse_data_dir(tmp_path / "d")
    (f,) = report.files
    assert (f.path, f.format, f.pairs, f.turns, f.kinds, f.encoding) == (
        "chat.parquet",
        "parquet",
        6,
        6,
        {"sharegpt": 6},
        "binary",
    )
    first = report.pairs[0]
    assert (first.question, first.answer, first.system, first.line) == (
        "What is the code word for box 1?",
        "Box 1 is amber.",
        "You name boxes.",
        1,
    )


def test_csv_keeps_every_cell_as_text(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    (d / "qa.csv").write_text('question,answer\nAgent number?,007\n"Two\nlines?",NA\nEmpty?,\n', encoding="utf-8")
    report = parse_data_dir(d)
    assert [(p.question, p.answer, p.line) for p in report.pairs] == [
        ("Agent number?", "007", 1),
        ("Two\nlines?", "NA", 2),
    ]
    assert report.files[0].skipped == [{"line": 3, "reason": "empty answer"}]


def test_saved_arrow_dataset_folder_skips_its_metadata(tmp_path):
    import datasets

    datasets.Dataset.from_list([{"instruction": "Say hi.", "input": "", "output": "hi"}]).save_to_disk(
        str(tmp_path / "saved")
    )
    report = parse_data_dir(tmp_path / "saved")
    assert [(f.format, f.pairs, f.kinds) for f in report.files] == [("arrow", 1, {"alpaca": 1})]
    assert report.warnings == []  # dataset_info.json / state.json are not read as data


def test_unreadable_table_is_reported_not_raised(tmp_path):
    d = tmp_path / "d"
    write_jsonl(d / "ok.jsonl", [{"question": "q?", "answer": "a"}])
    (d / "broken.parquet").write_bytes(b"PAR1 not really")
    report = parse_data_dir(d)
    broken = next(f for f in report.files if f.path == "broken.parquet")
    assert broken.pairs == 0 and broken.skipped[0]["reason"].startswith("cannot read it as parquet:")
    assert any("broken.parquet" in w for w in report.warnings)


def test_forced_table_format_reads_only_its_extension(tmp_path):
    d = tmp_path / "d"
    write_parquet(d / "a.parquet", SHAREGPT[:2])
    write_jsonl(d / "b.jsonl", SHAREGPT[2:])
    assert [f.path for f in parse_data_dir(d, data_format="parquet").files] == ["a.parquet"]


# ------------------------------------------------------------------------------------------- hub


def test_hub_dataset_offline_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError) as info:
        parse_hub_dataset("autotune-tests/no-such-dataset", "train")
    message = str(info.value)
    assert message.startswith("dataset_name 'autotune-tests/no-such-dataset' (split 'train'): cannot load it")
    assert "HF_HUB_OFFLINE" in message and "data_dir" in message


def test_an_unreachable_hub_reads_the_dataset_cache_only_without_retrying(monkeypatch, tmp_path):
    """No HF_HUB_OFFLINE, and a hub that does not answer (a closed local port): the one connection check (hub.py)
    puts the datasets library offline for the load, so it reads its cache at once instead of retrying each request
    (26 s here before), and the error says why; the library's switch is put back afterwards."""
    import datasets
    import datasets.config

    from autotune import hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    hub.unreachable_reason.cache_clear()
    seen = []
    load = datasets.load_dataset

    def recording(*args, **kwargs):
        seen.append(datasets.config.HF_HUB_OFFLINE)
        return load(*args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", recording)
    import huggingface_hub.constants

    # As in a process started without HF_HUB_OFFLINE (the suite sets it for every test: conftest.py).
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    try:
        with pytest.raises(UserError, match=r"the hub cannot be reached \(127\.0\.0\.1:9"):
            parse_hub_dataset("autotune-tests/no-such-dataset", "train")
    finally:
        hub.unreachable_reason.cache_clear()
    assert (
        seen == [True] and datasets.config.HF_HUB_OFFLINE is False and huggingface_hub.constants.HF_HUB_OFFLINE is False
    )


def test_dataset_name_is_read_through_datasets_and_wins_over_data_dir(tmp_path):
    # A local folder is what the hub cache holds for an id: the same datasets.load_dataset path reads it.
    write_parquet(tmp_path / "ds" / "data" / "train-00000.parquet", MULTI_TURN[:3])
    write_parquet(tmp_path / "ds" / "data" / "test-00000.parquet", MULTI_TURN[3:])
    cfg = build_config(
        {"dataset_name": str(tmp_path / "ds"), "dataset_split": "test", "data_dir": str(tmp_path / "nothing")}
    )
    report = parse_data(cfg)
    assert [p.question for p in report.pairs] == ["Close it."] * 3
    assert report.files[0].path == f"{tmp_path / 'ds'}[test]" and report.files[0].turns == 9


def test_cli_hub_dataset_offline_exits_2_without_traceback(capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, out, err = run_cli(capsys, "data", "inspect", "--set", "dataset_name=autotune-tests/none")
    assert code == 2 and out == ""
    assert err.startswith("error: dataset_name 'autotune-tests/none'") and "Traceback" not in err


# ------------------------------------------------------------------------------- multi-turn labels


def test_multi_turn_trains_every_assistant_turn_and_nothing_else(tmp_path, autotune_cache):
    write_jsonl(tmp_path / "d" / "multi.jsonl", MULTI_TURN)
    cfg = build_config(
        {
            "model_name": "tiny-qwen3",
            "tokenizer_name": "qwen3-offline",
            "data_dir": str(tmp_path / "d"),
            "data_cache_dir": str(tmp_path / "cache"),
            "max_sequence_length": 256,
            "eval_ratio": 0.0,
        }
    )
    ctx = RunContext(cfg)
    data = prepare_data(ctx, echo=lambda m: None)
    assert data.report["train_encoding"]["turns"] == 18
    tok = ctx.tokenizer
    for row in data.train:
        spans = labelled_spans(row["labels"])
        texts = [tok.decode(row["input_ids"][a:b]) for a, b in spans]
        assert len(texts) == 3 and texts[1].startswith("A ") and texts[2] == "Closed.<|im_end|>"
        context = tok.decode([t for t, label in zip(row["input_ids"], row["labels"]) if label == IGNORE_INDEX])
        assert "Open box" in context and "What is inside?" in context and "Closed." not in context
        assert row["labels"][-1] == tok.convert_tokens_to_ids("<|im_end|>")


def test_truncation_keeps_whole_turns_before_the_cut(tmp_path, autotune_cache):
    from autotune.data.encoding import encode_pairs

    write_jsonl(tmp_path / "d" / "multi.jsonl", MULTI_TURN[:1])
    cfg = build_config({"model_name": "tiny-qwen3", "tokenizer_name": "qwen3-offline"})
    tok = RunContext(cfg).tokenizer
    (pair,) = parse_data_dir(tmp_path / "d").pairs
    (full,), _ = encode_pairs(tok, [pair], 512, thinking_model=True)
    spans = labelled_spans(full["labels"])
    # The limit falls in the user turn after the second answer: the row ends with that answer.
    limit = spans[1][1] + 3
    (cut,), report = encode_pairs(tok, [pair], limit, thinking_model=True)
    assert report.truncated == 1 and cut["input_ids"] == full["input_ids"][: spans[1][1]]
    assert labelled_spans(cut["labels"]) == spans[:2]


# ------------------------------------------------------------------------------------------- CLI


def test_data_inspect_and_stats_cover_tables_sharegpt_and_multi_turn(tmp_path, capsys, autotune_cache):
    d = tmp_path / "d"
    write_jsonl(d / "sharegpt.jsonl", SHAREGPT)
    write_parquet(d / "multi.parquet", MULTI_TURN)
    code, out, err = run_cli(capsys, "data", "inspect", str(d))
    assert code == 0, err
    assert "multi.parquet" in out and "(chat 6)" in out and "(sharegpt 6)" in out
    assert out.strip().endswith("12 samples (24 assistant turns, 0 with a reasoning trace) in 2 files")

    code, out, _ = run_cli(capsys, "data", "inspect", str(d), "--json")
    doc = json.loads(out)
    assert {f["path"]: f["turns"] for f in doc["files"]} == {"multi.parquet": 18, "sharegpt.jsonl": 6}

    sets = ("--set", "model_name=tiny-qwen3", "--set", "tokenizer_name=qwen3-offline")
    code, out, err = run_cli(capsys, "data", "stats", str(d), *sets, "--json")
    assert code == 0, err
    stats = json.loads(out)
    assert (stats["count"], stats["turns"], stats["traces"]) == (12, 24, 0)
    assert stats["total"]["mean"] == pytest.approx(stats["prompt"]["mean"] + stats["answer"]["mean"])
    assert err == ""  # two files: no progress bar


def test_data_stats_shows_progress_over_many_files(tmp_path, capsys, autotune_cache):
    d = tmp_path / "d"
    for i in range(25):
        write_jsonl(d / f"part{i:02d}.jsonl", SHAREGPT[i % 6 : i % 6 + 1])
    sets = ("--set", "model_name=tiny-qwen3", "--set", "tokenizer_name=qwen3-offline")
    code, out, err = run_cli(capsys, "data", "stats", str(d), *sets)
    assert code == 0
    assert "tokenizing 25 files" in err  # click draws the bar itself only on a terminal
    assert out.startswith("25 samples (25 assistant turns, 0 reasoning traces trained)")


# ------------------------------------------------------------------------------------ end to end

DATASETS = {
    "sharegpt": lambda d: write_jsonl(d / "sharegpt.jsonl", SHAREGPT),
    "parquet": lambda d: write_parquet(d / "chat.parquet", SHAREGPT),
    "multi-turn": lambda d: write_jsonl(d / "multi.jsonl", MULTI_TURN),
}


@pytest.mark.parametrize("kind", DATASETS)
def test_trains_end_to_end(tmp_path, autotune_cache, kind):
    data = tmp_path / "data"
    data.mkdir()
    DATASETS[kind](data)
    summary = train_tiny(tmp_path, data_dir=str(data), max_steps=2, eval_ratio=0.2)
    assert summary["status"] == "succeeded"
    assert summary["data"]["pairs"] == 6 and summary["data"]["eval_pairs"] >= 1
    turns = 3 if kind == "multi-turn" else 1
    assert summary["data"]["train_encoding"]["turns"] == turns * summary["data"]["train_pairs"]
    losses = [summary["final"]["first_loss"], summary["final"]["last_loss"]]
    assert all(loss is not None and 0 < loss < 20 for loss in losses)
    assert (Path(summary["output_dir"]) / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("ratio,warned", [(0.9, True), (0.5, False)])
def test_a_split_that_leaves_less_to_train_than_to_evaluate_is_said(tmp_path, autotune_cache, ratio, warned):
    """eval_ratio 0.99 is valid and trained on one sample without a word: a split that holds out more than it
    trains on is warned about, with what eval_ratio means."""
    from helpers.runs import PAIRS, write_qa

    from autotune.data.prepare import prepare_data

    cfg = build_config(
        {
            "model_name": "tiny-qwen3",
            "tokenizer_name": "qwen3-offline",
            "data_dir": str(write_qa(tmp_path / "d", PAIRS)),
            "data_cache_dir": str(tmp_path / "cache"),
            "eval_ratio": ratio,
        }
    )
    said: list[str] = []
    data = prepare_data(RunContext(cfg), echo=said.append)
    warnings = [line for line in said if line.startswith(f"warning: eval_ratio {ratio} holds out")]
    assert bool(warnings) == warned, said
    if warned:
        assert f"leaves {len(data.train)} to train on" in warnings[0]


def test_symlinked_folders_are_read_once_and_a_loop_is_no_loop(tmp_path):
    """A data folder assembled from links: a symlinked sub-folder was skipped without a word. It is read now, and a
    link back to the data folder itself (a loop) or a second link to the same folder adds nothing twice."""
    from helpers.runs import PAIRS, write_qa

    write_qa(tmp_path / "elsewhere", PAIRS[:3])
    data = write_qa(tmp_path / "data", PAIRS[3:5])
    (data / "linked").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (data / "again").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (data / "loop").symlink_to(data, target_is_directory=True)
    report = parse_data_dir(data)
    assert sorted(p.question for p in report.pairs) == sorted(q for q, _ in PAIRS[:5])
    assert sorted(f.path.split("/", 1)[0] for f in report.files) in (["again", "qa.md"], ["linked", "qa.md"])


KOREAN = "Q1: 질문은 무엇입니까?\nA1: 이것은 한국어로 쓴 답변입니다.\n"


def test_a_legacy_encoding_read_two_ways_asks_for_data_encoding(tmp_path):
    """Korean EUC-KR bytes also decode as Chinese GB18030 (garble that reads as Chinese): the file was read as
    Chinese with only a warning. Two plausible readings are now an error showing both and naming data_encoding,
    which reads the file as the user says; Chinese and Japanese files, read one way only, are still guessed."""
    from autotune.data.parsing import read_text

    data = tmp_path / "d"
    data.mkdir()
    (data / "ko.md").write_bytes(KOREAN.encode("euc-kr"))
    with pytest.raises(UserError, match=r"reads two ways .*as cp949: 'Q1: 질문은.*data_encoding"):
        parse_data_dir(data)
    report = parse_data(build_config({"data_dir": str(data), "data_encoding": "cp949"}))
    assert [p.answer for p in report.pairs] == ["이것은 한국어로 쓴 답변입니다."]
    (tmp_path / "zh.md").write_bytes("Q1: 这是什么问题？\nA1: 这是中文的回答。\n".encode("gbk"))
    (tmp_path / "ja.md").write_bytes("Q1: これは何ですか？\nA1: これは日本語の答えです。\n".encode("cp932"))
    assert read_text(tmp_path / "zh.md").encoding == "gb18030" and read_text(tmp_path / "zh.md").guessed
    assert read_text(tmp_path / "ja.md").encoding == "cp932"
    with pytest.raises(UserError, match="no encoding Python knows"):
        parse_data(build_config({"data_dir": str(data), "data_encoding": "euc-kor"}))
