"""A run's data, from the config to what the Trainer and the solver consume: parsed pairs, the train/eval
split, encoded rows (cached), and the token-length statistics the solver sizes the sequence from."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from autotune.context import RunContext
from autotune.data.encoding import load_or_encode, sample_lengths, summarize_lengths
from autotune.data.parsing import DataReport, FileProgress, QAPair, parse_data, refuse_other_modes, split_pairs
from autotune.errors import UserError


@dataclass
class PreparedData:
    train: list[dict]
    eval: list[dict] | None
    eval_pairs: list[QAPair]
    report: dict  # what the parser and the encoder did, for the run summary


def prepare_data(ctx: RunContext, echo: Callable[[str], None] = print) -> PreparedData:
    cfg, tokenizer = ctx.cfg, ctx.tokenizer
    parsed = _sft_data(cfg)
    for warning in parsed.warnings:
        echo(f"warning: {warning}")
    for line in parsed.summary():
        echo(f"data: {line}")
    train_pairs, eval_pairs = split_pairs(parsed.pairs, cfg.eval_ratio, cfg.seed)
    if eval_pairs and len(train_pairs) < len(eval_pairs):
        # A valid but lopsided split (eval_ratio 0.99 left one sample to train on): the user meant something else.
        echo(
            f"warning: eval_ratio {cfg.eval_ratio} holds out {len(eval_pairs)} of {len(parsed.pairs)} samples and "
            f"leaves {len(train_pairs)} to train on; eval_ratio is the share held out for evaluation (0.1: 10%)"
        )
    opts: dict[str, Any] = dict(
        system_prompt=cfg.system_prompt,
        thinking_model=ctx.spec.thinking,
        overflow=cfg.overflow,
        reasoning=cfg.reasoning_traces,
    )
    train_rows, train_report, hit = load_or_encode(
        tokenizer, train_pairs, cfg.max_sequence_length, cfg.data_cache_dir, **opts
    )
    eval_rows, eval_report, _ = load_or_encode(
        tokenizer, eval_pairs, cfg.max_sequence_length, cfg.data_cache_dir, **opts
    )
    if not train_rows:
        # Truncation keeps the prompt whole, so under overflow="truncate" only a prompt that alone
        # fills the window drops a sample: suggesting truncate again would send the user in a circle.
        fix = (
            "every prompt alone is longer than the window: raise max_sequence_length or shorten the system prompt"
            if cfg.overflow == "truncate"
            else 'raise max_sequence_length or set overflow="truncate"'
        )
        raise UserError(
            f"no training sample fits max_sequence_length={cfg.max_sequence_length} "
            f"({train_report.dropped} dropped): {fix}"
        )
    if train_report.truncated or train_report.dropped:
        echo(
            f"note: {train_report.truncated} training samples truncated (answer cut, end-of-turn kept), "
            f"{train_report.dropped} dropped as longer than {cfg.max_sequence_length} tokens"
        )
    if train_report.traces_dropped and cfg.reasoning_traces == "train":
        echo(
            f"note: {train_report.traces_dropped} reasoning traces not trained: {ctx.spec.name}'s chat template has "
            "no think block to put them in"
        )
    report = {
        "files": len(parsed.files),
        "pairs": len(parsed.pairs),
        "train_pairs": len(train_pairs),
        "eval_pairs": len(eval_pairs),
        "train_encoding": asdict(train_report),
        "eval_encoding": asdict(eval_report),
        "cache_hit": hit,
    }
    return PreparedData(train_rows, eval_rows or None, eval_pairs, report)


def data_length_stats(ctx: RunContext, progress: FileProgress | None = None) -> dict:
    """Token-length statistics of the run's data with the model's chat template (the solver sizes the
    sequence from them). `progress` wraps the files as they are tokenized (a progress bar, in the CLI)."""
    cfg = ctx.cfg
    parsed = _sft_data(cfg)
    by_file: dict[str, list[QAPair]] = {}
    for pair in parsed.pairs:
        by_file.setdefault(pair.source, []).append(pair)
    lengths = []
    for source in progress(list(by_file)) if progress else by_file:
        lengths += sample_lengths(
            ctx.tokenizer, by_file[source], cfg.system_prompt, ctx.spec.thinking, cfg.reasoning_traces
        )
    stats = summarize_lengths(lengths)
    stats["turns"] = sum(p.turns for p in parsed.pairs)
    stats["traces"] = sum(p.traces for p in parsed.pairs)
    return stats


def _sft_data(cfg) -> DataReport:
    """The config's data, refused (one UserError naming each file) where it holds records of another training mode
    (DPO, KTO): training them as SFT would teach the rejected answers too."""
    parsed = parse_data(cfg)
    where = f"dataset_name {cfg.dataset_name!r}" if cfg.dataset_name else f"data_dir {cfg.data_dir!r}"
    refuse_other_modes(parsed, where)
    return parsed
