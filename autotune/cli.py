"""The `autotune` command line. Thin: parse flags, call a stage, print its answer.

Every UserError becomes one message on stderr and exit code 2, never a traceback.
Heavy imports (torch, transformers) happen inside the commands that need them.
"""

from __future__ import annotations

import json
import math
import sys

import click

import autotune.quiet  # noqa: F401  (one bitsandbytes hint silenced before any command imports it: quiet.py)
from autotune import __version__
from autotune.config import (
    DEFAULT_MAX_TRIALS,
    EXPORT_DTYPES,
    MAX_RANK_CANDIDATES,
    OBJECTIVES,
    STRATEGIES,
)
from autotune.errors import UserError
from autotune.peers import TOOL_NAMES
from autotune.run_files import INFERENCE_REPORT_MD, PROFILE
from autotune.techniques import SWITCHES
from autotune.units import DEFAULT_MARGIN, Budget, GiB


class FiniteRange(click.FloatRange):
    """Every float flag's type: click's range lets nan through (every comparison with it is false) and inf
    where there is no upper bound; a budget, a margin or a time limit is a finite number."""

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


def _echo_json(doc) -> None:
    click.echo(json.dumps(doc, indent=2, ensure_ascii=False, default=str))


def _load(config_path, sets, **flags):
    from autotune.profile import layered_config

    return layered_config(config_path, sets, flags=flags)[0]


def gpus_option(help_text: str):
    return click.option("--gpus", type=click.IntRange(min=1), default=1, show_default=True, help=help_text)


strategy_option = click.option(
    "--strategy",
    type=click.Choice(STRATEGIES),
    help="How the ranks share the model: ddp (each holds it whole), fsdp (sharded; GPUs only), auto "
    "(ddp where the model fits one card). Default: the config's distributed_strategy.",
)

set_option = click.option(
    "--set",
    "sets",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override a config key (repeatable), typed by the schema: --set batch_size=2",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="autotune")
def cli():
    """Fit Qwen3 LoRA/QLoRA fine-tuning to your GPU: probe -> solve -> train."""


# ------------------------------------------------------------------------------------ probe


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print one versioned JSON document (keys: gpus, host).")
@click.option("--save", type=click.Path(dir_okay=False), help="Also write the JSON document here (atomically).")
@click.option("--output-dir", default=".", show_default=True, help="Where free disk space is measured.")
def probe(as_json, save, output_dir):
    """Report every GPU (NVML) and the host: memory, driver, CUDA, bf16, CPU, RAM, disk, versions."""
    from autotune.hardware import probe as run_probe
    from autotune.hardware import render_table, save_probe

    doc = run_probe(output_dir)
    if save:
        save_probe(doc, save)
    click.echo(json.dumps(doc, indent=2) if as_json else render_table(doc))


# --------------------------------------------------------------------------------- validate


def _refuse_what_train_refuses(cfg, where: str | None, *, machine: bool = True) -> None:
    """The refusals of a run's config that need neither a model nor torch (preflight.check_run_config, the Trainer's
    names without loading transformers): validate says them, and train in one process says them before it imports
    anything heavy (a refusal in a third of a second, not after 12 s of imports). `machine`: also what this machine
    cannot run (FSDP without a GPU)."""
    from autotune.config import trainer_name_problems
    from autotune.distributed import check_fsdp, world
    from autotune.hardware import probe_gpus
    from autotune.preflight import check_run_config

    if world().size > 1:
        return  # a rank of several: the runner refuses in its order, its strategy's refusals first
    check_run_config(cfg)
    if machine and cfg.distributed_strategy == "fsdp" and not probe_gpus()[0]:
        # No GPU that NVML sees: the runner's device would be the CPU, which it refuses. (validate: with --hardware,
        # as it checks the config against this machine only then.)
        check_fsdp(cfg, "cpu")
    problems = trainer_name_problems(cfg)
    if problems:
        raise UserError("\n".join(f"{where or 'config'}: {problem}" for problem in problems))


def _refuse_unreachable_downloads(cfg) -> None:
    """The model weights and tokenizer a run would fetch from the hub: with the hub unreachable (one attempt of at
    most 3 s) and no copy in the local cache, refused now, as the runner would after its imports and the data."""
    from autotune import hub
    from autotune.context import RunContext
    from autotune.tokenizer import from_the_hub

    ctx = RunContext(cfg)
    if cfg.init == "pretrained" and ctx.spec.hub_id and not ctx.spec.local_path:
        hub.require_reachable("model", ctx.spec.hub_id)
    if from_the_hub(ctx.tokenizer_name):
        hub.require_reachable("tokenizer", ctx.tokenizer_name, "tokenizer_config.json")


@cli.command()
@click.argument("config", type=click.Path(dir_okay=False), required=False)
@set_option
@click.option("--json", "as_json", is_flag=True, help="Print the fully resolved config as JSON.")
@click.option(
    "--hardware", is_flag=True, help="Also check it against this machine (the guide's --validate-hardware-only)."
)
def validate(config, sets, as_json, hardware):
    """Check CONFIG (default: the built-in defaults) and print it fully resolved; exit 2 on errors. A TRL,
    LLaMA-Factory or axolotl key in the file is read as autotune's, with a note naming it."""
    from autotune.config import load_config, parse_set

    notes: list[str] = []
    try:
        cfg = load_config(config, parse_set(sets), notes=notes)
    finally:
        for note in notes:
            click.echo(f"note: {note}", err=True)
    _refuse_what_train_refuses(cfg, config, machine=hardware)
    findings = []
    if hardware:
        from autotune.hardware import probe as run_probe
        from autotune.preflight import check_hardware

        findings = check_hardware(cfg, run_probe(cfg.output_dir))
    if as_json:
        _echo_json({"config": cfg.to_dict(), "hardware": [f.__dict__ for f in findings] if hardware else None})
    else:
        click.echo(f"config OK: {config or '(defaults)'}")
        for key, value in cfg.to_dict().items():
            click.echo(f"  {key:30} {json.dumps(value, ensure_ascii=False)}")
        for f in findings:
            click.echo(f"{f.level.upper():8} {f.message}")
    errors = [f for f in findings if f.level == "error"]
    if errors:
        raise UserError(f"{len(errors)} hardware problem(s): " + "; ".join(f.message for f in errors))


# ---------------------------------------------------------------------------------- convert


@cli.command()
@click.argument("peer_config", type=click.Path(dir_okay=False))
@click.option(
    "--out",
    type=click.Path(dir_okay=False),
    help="Write the autotune config here, atomically: YAML for a .yaml/.yml name, else JSON (default: print JSON).",
)
@click.option(
    "--from",
    "tool",
    type=click.Choice(sorted(TOOL_NAMES)),
    help="The tool that wrote PEER_CONFIG (default: told by its keys).",
)
@click.option("--overwrite", is_flag=True, help="Replace --out when it exists.")
def convert(peer_config, out, tool, overwrite):
    """Turn a TRL, LLaMA-Factory or axolotl SFT config into an autotune config: its keys in autotune's names, the
    tool's own defaults for what the file leaves unset, and a list of what could not be carried over."""
    from pathlib import Path

    from autotune.config import config_text, convert_peer_file
    from autotune.fsutil import atomic_write_text

    if out is not None and Path(out).exists() and not overwrite:
        raise UserError(f"--out {out}: the file exists; give another name, or --overwrite to replace it")
    conversion = convert_peer_file(peer_config, TOOL_NAMES[tool] if tool else None)
    for note in conversion.notes:
        click.echo(f"note: {note}", err=True)
    for item in conversion.left_out:
        click.echo(f"left out: {item}", err=True)
    values = {"description": f"converted by `autotune convert` from {conversion.tool}'s {Path(peer_config).name}"}
    text = config_text(values | conversion.values, out)
    if out is None:
        click.echo(text, nl=False)
        return
    atomic_write_text(out, text)
    click.echo(
        f"{out}: the autotune config of {conversion.tool}'s {peer_config} ({len(conversion.left_out)} key(s) left "
        f"out, above); check it with `autotune validate {out}`",
        err=True,
    )


# --------------------------------------------------------------------------------- profiles


@cli.group()
def profiles():
    """The presets in profiles/: hardware tiers, model presets, strategies, LoRA task presets."""


@profiles.command("list")
@click.option("--json", "as_json", is_flag=True)
def profiles_list(as_json):
    """List presets (use a name as base_config in your config)."""
    from autotune.config import list_presets

    items = list_presets()
    if as_json:
        _echo_json(items)
        return
    for item in items:
        click.echo(f"{item['name']:36} {item['description']}")


@profiles.command("show")
@click.argument("name")
def profiles_show(name):
    """Show one preset's values, e.g. `autotune profiles show hardware/16gb`."""
    from autotune.config import preset_path, read_json

    path = preset_path(name.removesuffix(".json"))
    if path is None:
        raise UserError(f"no preset named {name!r}: run `autotune profiles list`")
    click.echo(f"# {path}")
    _echo_json(read_json(path))


# ------------------------------------------------------------------------------------- data


@cli.group()
def data():
    """Look at what the parser and the tokenizer make of a data folder."""


def _data_config(config, sets, data_dir):
    return _load(config, sets, data_dir=data_dir)


# A folder with at least this many data files gets a progress bar over them (a few files go by too fast to need one).
PROGRESS_MIN_FILES = 20


def _file_progress(label: str):
    """Wraps a list of data files in a progress bar on stderr when there are many of them."""

    def wrap(files: list[str]):
        if len(files) < PROGRESS_MIN_FILES:
            yield from files
            return
        with click.progressbar(files, label=f"{label} {len(files)} files", file=sys.stderr) as bar:
            yield from bar

    return wrap


@data.command("inspect")
@click.argument("data_dir", required=False)
@click.option("--config", type=click.Path(dir_okay=False), help="Take data_format, prefixes and patterns from here.")
@set_option
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="files (path, format, samples as pairs, assistant turns, traces, record kinds, skipped, skip_reasons, "
    "notes), the samples (question, answer, reasoning, history, after, tools, source, line) and the totals.",
)
def data_inspect(data_dir, config, sets, as_json):
    """Per file (or hub dataset): the format found, the samples, the assistant turns they train and how many carry
    a reasoning trace, the record formats (chat, sharegpt, alpaca, qa, prompt-completion; dpo and kto, which train
    refuses), each skipped item with its reason, and notes on what was left out of records used (keys not read,
    turns after the last answer, reasoning markers mapped); then the counts over all files."""
    from autotune.data.parsing import OTHER_MODES, parse_data

    cfg = _data_config(config, sets, data_dir)
    report = parse_data(cfg, progress=_file_progress("reading"))
    if as_json:
        _echo_json(report.to_json())
        return
    for f in report.files:
        encoding = f.encoding + (" (guessed)" if f.encoding_guessed else "")
        kinds = ", ".join(f"{kind} {n}" for kind, n in f.kinds.items())
        click.echo(
            f"{f.path:40} {f.format:10} {encoding:20} {f.pairs:5} samples {f.turns:5} turns {f.traces:5} traces  "
            f"{len(f.skipped)} skipped" + (f"  ({kinds})" if kinds else "")
        )
        for item in f.skipped:
            click.echo(f"    line {item['line']}: {item['reason']}")
        for note, n in sorted(f.notes.items()):
            click.echo(f"    note: {note} ({n} records)")
    for w in report.warnings:
        click.echo(f"warning: {w}", err=True)
    for line in report.summary():
        click.echo(line)
    counts = report.totals("kinds")
    refused = [f"{counts[kind]} {what}" for kind, what in OTHER_MODES.items() if counts.get(kind)]
    if refused:
        shown = ", ".join(refused)
        click.echo(f"train refuses this data: {shown} (autotune trains supervised fine-tuning only)")
    turns, traces = sum(p.turns for p in report.pairs), sum(p.traces for p in report.pairs)
    click.echo(
        f"{len(report.pairs)} samples ({turns} assistant turns, {traces} with a reasoning trace) "
        f"in {len(report.files)} files"
    )


@data.command("stats")
@click.argument("data_dir", required=False)
@click.option("--config", type=click.Path(dir_okay=False))
@set_option
@click.option("--json", "as_json", is_flag=True)
def data_stats(data_dir, config, sets, as_json):
    """Token lengths (p50/p90/p95/p99/max) of prompts and answers with the model's chat template."""
    from autotune.context import RunContext
    from autotune.data.prepare import data_length_stats

    ctx = RunContext(_data_config(config, sets, data_dir))
    stats = data_length_stats(ctx, progress=_file_progress("tokenizing"))
    if as_json:
        _echo_json(stats)
        return
    click.echo(
        f"{stats['count']} samples ({stats['turns']} assistant turns, {stats['traces']} reasoning traces "
        f"{'trained' if ctx.cfg.reasoning_traces == 'train' else 'dropped'}), tokens with {ctx.spec.name}'s chat "
        "template; answer: every labelled assistant turn"
    )
    click.echo(f"{'':8}" + "".join(f"{k:>8}" for k in ("p50", "p90", "p95", "p99", "max", "mean")))
    for part in ("prompt", "answer", "total"):
        click.echo(
            f"{part:8}"
            + "".join(f"{stats[part][k]:>8}" for k in ("p50", "p90", "p95", "p99", "max"))
            + f"{stats[part]['mean']:>8.1f}"
        )


# ------------------------------------------------------------------------------------ train


@cli.command()
@click.option(
    "--config", "config_path", type=click.Path(dir_okay=False), help="Config JSON (default: built-in defaults)."
)
@click.option(
    "--profile",
    "profile_path",
    type=click.Path(dir_okay=False),
    help="A solved profile; its choice wins over the config.",
)
@set_option
@click.option("--resume", is_flag=True, help="Go on from the latest checkpoint in output_dir/checkpoints.")
@click.option(
    "--overwrite", is_flag=True, help="Replace the run output_dir holds (its checkpoints, adapter and summary)."
)
@click.option(
    "--nproc",
    type=click.IntRange(min=1),
    help="Train on N processes (GPUs) of this machine: runs this command under torchrun (--standalone, "
    "--max-restarts = max_oom_retries). Several machines: run torchrun yourself (README).",
)
@strategy_option
def train(config_path, profile_path, sets, resume, overwrite, nproc, strategy):
    """Fine-tune with LoRA/QLoRA on the HF Trainer: TensorBoard, JSONL log, checkpoints, resume."""
    from autotune.profile import layered_config, load_profile
    from autotune.run_files import check_start_flags

    check_start_flags(resume, overwrite)  # before the profile and config are read: the flags alone say it

    notes: list[str] = []
    profile = load_profile(profile_path, notes) if profile_path else None
    cfg, warnings = layered_config(config_path, sets, profile=profile, flags={"distributed_strategy": strategy})
    warnings = notes + warnings
    if nproc is not None:
        _launch(nproc, cfg, profile)  # does not return: this process becomes torchrun (its checks come first)
    _refuse_what_train_refuses(cfg, config_path)
    from autotune.checkpoint import check_start
    from autotune.distributed import oom_decisions, world

    if world().is_main:  # torchrun's other ranks run the same command: one copy of each message
        for warning in warnings:
            click.echo(f"warning: {warning}", err=True)
    if world().size == 1:  # (several ranks: the runner refuses in its order, holding the folder)
        check_start(cfg, resume, overwrite)
        _refuse_unreachable_downloads(cfg)

    if world().restart and not oom_decisions(cfg.output_dir):
        # torchrun restarts the whole group whatever failed; only an OOM's restart has something new to try.
        raise UserError(
            "an earlier attempt of this torchrun launch failed for another reason than memory (its error is above): "
            "not trying again. Fix it and run the command again, with --resume to go on from the last checkpoint"
        )
    from autotune.runner import train as run_training

    summary = run_training(
        cfg, profile=profile, resume=resume, overwrite=overwrite, echo=lambda m: click.echo(m, err=True)
    )
    if not world().is_main:
        if summary["status"] == "interrupted":
            sys.exit(130)
        return
    if summary.get("already_finished"):  # said by the runner's note: nothing trained, nothing written
        return
    final = summary.get("final", {})
    if summary["status"] == "interrupted":
        _interrupted(summary, config_path, profile_path, sets)
    if final.get("losses_logged", 2) > 1 and final.get("first_loss") is not None:
        loss = f"loss {final['first_loss']:.4f} -> {final['last_loss']:.4f}"
    elif final.get("first_loss") is not None:
        loss = f"loss {final['first_loss']:.4f} (one logged step)"
    else:
        loss = f"mean training loss {final.get('train_loss')}"
    click.echo(
        f"\ntraining {summary['status']} in {summary['seconds']:.0f}s: {final.get('global_step')} steps, "
        f"{loss}, eval loss {final.get('eval_loss')}"
    )
    click.echo(f"adapter, tokenizer and run summary: {summary['output_dir']}")
    if "inference_report" in summary:
        click.echo(f"inference report: {summary['inference_report']['markdown']}")


def _launch(nproc: int, cfg, profile: dict | None) -> None:
    """`train --nproc N`: check what can be checked once, here (a bad input is one message, not N), then become
    torchrun running this same command line without --nproc."""
    import os
    import shlex

    import torch

    from autotune.batching import share_of
    from autotune.distributed import RESTARTABLE_ENV, resolve_strategy, torchrun_command, without_option, world
    from autotune.techniques import check_strategy

    if world().launched:
        raise UserError(
            "--nproc inside torchrun (or accelerate launch): the launcher already started the processes; drop --nproc"
        )
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus and nproc > gpus:
        raise UserError(f"--nproc {nproc}: this machine has {gpus} GPU(s) visible to CUDA; use at most {gpus}")
    check_strategy(cfg, resolve_strategy(cfg, profile, "cuda" if gpus else "cpu"), nproc)
    share_of(cfg.effective_batch, nproc)  # every rank takes an equal share of the effective batch
    command = torchrun_command(nproc, without_option(_ARGV, "--nproc"), max_restarts=cfg.max_oom_retries)
    env = " ".join(f"{k}={v}" for k, v in RESTARTABLE_ENV.items())
    click.echo(f"launching: {env} {shlex.join(command)}", err=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os.environ.update(RESTARTABLE_ENV)
    os.execv(command[0], command)


def _interrupted(summary: dict, config_path, profile_path, sets) -> None:
    """Ctrl-C: where the run stopped and the command that goes on from there; exit 130 as a shell expects."""
    import shlex

    step = (summary.get("final") or {}).get("global_step")
    checkpoint = summary.get("resume_from")
    click.echo(f"\ntraining interrupted{f' at step {step}' if step is not None else ''}.", err=True)
    if checkpoint:
        command = ["autotune", "train"]
        command += ["--config", config_path] if config_path else []
        command += ["--profile", profile_path] if profile_path else []
        for item in sets:
            command += ["--set", item]
        click.echo(f"checkpoint: {checkpoint}\nresume with: {shlex.join([*command, '--resume'])}", err=True)
    else:
        click.echo("no checkpoint was saved yet: run the same command again to start over", err=True)
    sys.exit(130)


# ----------------------------------------------------------------------------------- export


def _progressbar(length: int, label: str):
    """A progress bar on stderr (click draws it on a terminal and prints only the label elsewhere)."""
    return click.progressbar(length=length, label=label, file=sys.stderr)


@cli.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--merge", is_flag=True, help="Merge the adapter into the base: a full model (sharded safetensors).")
@click.option(
    "--dtype",
    type=click.Choice(EXPORT_DTYPES),
    default="auto",
    show_default=True,
    help="Weights dtype; auto: the dtype the run trained in (without --merge: the adapter as saved).",
)
@click.option(
    "--out", type=click.Path(file_okay=False), help="Folder to write (default: RUN_DIR/merged or RUN_DIR/adapter)."
)
@click.option("--overwrite", is_flag=True, help="Replace --out when it exists and is not empty.")
def export(run_dir, merge, dtype, out, overwrite):
    """Export a finished run: a clean adapter folder (PEFT, vLLM LoRA), or with --merge a full model
    (transformers, vLLM), merged on the CPU a layer at a time."""
    from pathlib import Path

    from autotune.checkpoint import require_finished
    from autotune.run_files import check_export_destination, default_export_dir, require_run_files

    # A folder that is no finished run, or an --out that cannot take the export, refused before the imports of the
    # export itself (seconds of them); export_run checks the same again.
    run_path = require_run_files(run_dir)
    require_finished(run_path)
    check_export_destination(Path(out) if out else default_export_dir(run_dir, merge), run_path, overwrite)
    from autotune.export import export_run

    result = export_run(run_dir, out, merge=merge, dtype=dtype, overwrite=overwrite, progress=_progressbar)
    for note in result.notes:
        click.echo(f"note: {note}", err=True)
    kind = "merged model" if result.merged else "adapter"
    click.echo(f"{kind} ({result.dtype}) of {result.base}: {result.out}")
    if result.gguf_command:
        click.echo(f"GGUF: from a llama.cpp checkout, run: {result.gguf_command}")


# ------------------------------------------------------------------------------------ solve


def _rank_list(ranks: str | None, rank: int | None, objective: str) -> list[int] | None:
    if ranks:
        try:
            rank_list = sorted({int(r) for r in ranks.split(",") if r.strip()})
        except ValueError:
            rank_list = []
        if not rank_list or any(r < 1 for r in rank_list):
            raise UserError(f"--ranks {ranks!r}: give positive integers separated by commas, e.g. 8,16,32")
        return rank_list
    if rank:
        return [rank]
    return list(MAX_RANK_CANDIDATES) if objective == "max-rank" else None


@cli.command()
@click.option("--model", "model_name", help="Qwen3 model: short name, hub id or local dir (default: the config's).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False))
@set_option
@click.option(
    "--data", "data_dir", help="Data folder whose token lengths size the sequence (default: the config's data_dir)."
)
@click.option("--max-memory-gb", type=FiniteRange(min=0.01), help="Budget (default: config, else probed free memory).")
@click.option(
    "--output",
    type=click.Path(dir_okay=False),
    help="Profile path (default: profiles/solved/<gpu>__<model>__<budget>.json).",
)
@click.option("--objective", type=click.Choice(OBJECTIVES), default="throughput", show_default=True)
@click.option(
    "--margin",
    type=FiniteRange(0, 0.5),
    default=DEFAULT_MARGIN,
    show_default=True,
    help="Safety margin under the budget.",
)
@click.option("--seq", type=click.IntRange(min=8), help="Fix the sequence length instead of covering the data's p99.")
@click.option("--rank", type=click.IntRange(min=1), help="Fix the LoRA rank.")
@click.option("--ranks", help="Rank candidates, comma-separated (max-rank objective), e.g. 8,16,32,64.")
@click.option(
    "--max-seq", type=click.IntRange(min=8), help="Upper bound for --objective max-seq (default: the model's maximum)."
)
@click.option(
    "--max-trials",
    type=click.IntRange(min=2),
    default=DEFAULT_MAX_TRIALS,
    show_default=True,
    help="Stop measuring after this many trials and keep the best so far.",
)
@click.option("--time-budget", type=FiniteRange(min=1), help="Seconds; stop searching and keep the best so far.")
@click.option(
    "--checkpointing",
    type=click.Choice(SWITCHES),
    default="auto",
    show_default=True,
    help="Gradient checkpointing: auto lets the search measure without it where the estimate says that could be "
    "faster. The other techniques follow their config keys (fused_loss, offload_activations, embedding_on_cpu: "
    "auto means measured).",
)
@click.option(
    "--real-weights", is_flag=True, help="Trial on the real weights (downloads/loads them) instead of random init."
)
@gpus_option(
    "Processes (GPUs) the run will train on: each trial is one rank's step, the budget the smallest card's, "
    "accumulation = effective batch / (micro-batch x GPUs)."
)
@strategy_option
@click.option("--plot", is_flag=True, help="Also write a PNG beside the profile.")
@click.option("--json", "as_json", is_flag=True, help="Print the profile as JSON.")
def solve(
    model_name,
    config_path,
    sets,
    data_dir,
    max_memory_gb,
    output,
    objective,
    margin,
    seq,
    rank,
    ranks,
    max_seq,
    max_trials,
    time_budget,
    checkpointing,
    real_weights,
    gpus,
    strategy,
    plot,
    as_json,
):
    """Choose micro-batch, accumulation, sequence length and LoRA rank by measured training steps."""
    from autotune.memory import ensure_expandable_segments

    ensure_expandable_segments()  # before anything touches CUDA
    from autotune.config import explicit_keys, lora_rank_problem
    from autotune.context import RunContext
    from autotune.profile import layered_config
    from autotune.solve import SolveRequest, run_solve

    flags = {"model_name": model_name, "data_dir": data_dir, "lora_r": rank, "distributed_strategy": strategy}
    if checkpointing != "auto":
        flags["gradient_checkpointing"] = checkpointing == "on"
    cfg, notes = layered_config(config_path, sets, flags=flags)
    for note in notes:
        click.echo(f"note: {note}", err=True)
    explicit = explicit_keys(config_path, sets)
    ctx = RunContext(cfg)
    rank_list = _rank_list(ranks, rank, objective)
    for r in rank_list if ranks else ():  # the user's candidates; the defaults are the solver's to prune
        if problem := lora_rank_problem(r, ctx.spec):
            raise UserError(f"--ranks: {problem}")
    req = SolveRequest(
        ctx=ctx,
        objective=objective,
        seq=seq,
        ranks=rank_list,
        max_seq=max_seq,
        max_trials=max_trials,
        time_budget_s=time_budget,
        checkpointing=checkpointing,
        world_size=gpus,
    )
    _freeze_imports()
    profile, path = run_solve(
        req,
        max_memory_gb=max_memory_gb,
        budget_explicit="max_memory_gb" in explicit,
        quantization_explicit="quantization" in explicit,
        margin=margin,
        data_required=bool(data_dir) or "data_dir" in explicit,
        output=output,
        init="pretrained" if real_weights else "random",
        plot=plot,
        echo=lambda m: click.echo(m, err=True),
    )
    if as_json:
        _echo_json(profile)
        return
    c = profile["choice"]
    click.echo(
        f"\nchoice: batch_size {c['batch_size']} x gradient_accumulation_steps {c['gradient_accumulation_steps']} "
        f"(effective {c['effective_batch_size']}), max_sequence_length {c['max_sequence_length']}, "
        f"lora_r {c['lora_r']}, gradient checkpointing {'on' if c['gradient_checkpointing'] else 'off'}; "
        f"peak {profile['measurement']['peak_bytes'] / GiB:.3f} GiB of {profile['constraints']['max_memory_gb']:g}"
        + (" (estimated, not measured)" if profile["measurement"]["source"] == "estimate" else "")
        + (
            f" per rank of {profile['constraints']['world_size']} ({profile['constraints']['strategy'].upper()})"
            if profile["constraints"]["world_size"] > 1
            else ""
        )
    )
    click.echo(f"why: {profile['reason']}")
    if profile["measurement"]["source"] == "estimate":
        click.echo(f"planned from the estimate, no trials; profile: {path}")
    else:
        click.echo(f"{len(profile['trials'])} trials in {profile['solve_seconds']:.0f}s; profile: {path}")
    world = profile["constraints"]["world_size"]
    launch = f" --nproc {world}" if world > 1 else ""
    click.echo(f"next: autotune train --profile {path}{launch}")


@profiles.command("plot")
@click.argument("profile_path", type=click.Path(dir_okay=False))
@click.option("--output", type=click.Path(dir_okay=False), help="PNG path (default: beside the profile).")
def profiles_plot(profile_path, output):
    """Draw a solved profile: measured peak per trial, the budget, the margin and the choice."""
    from autotune.plot import plot_profile
    from autotune.profile import load_profile

    profile = load_profile(profile_path)
    click.echo(plot_profile(profile, output or profile_path.removesuffix(".json") + ".png"))


# --------------------------------------------------------------------------------- estimate


@cli.command()
@click.option("--model", "model_name", help="Qwen3 model (default: the config's).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False))
@set_option
@click.option("--max-memory-gb", type=FiniteRange(min=0.01), help="Budget to compare with (default: the config's).")
@click.option("--seq", type=click.IntRange(min=1), help="Sequence length (default: the config's max_sequence_length).")
@click.option(
    "--batch",
    type=click.IntRange(min=1),
    help="Micro-batch (default: the config's batch_size; with a budget it does not fit, the largest micro-batch "
    "predicted to, gradient accumulation keeping the effective batch, as solve does).",
)
@click.option("--rank", type=click.IntRange(min=1), help="LoRA rank (default: the config's lora_r).")
@click.option("--margin", type=FiniteRange(0, 0.5), default=DEFAULT_MARGIN, show_default=True)
@click.option(
    "--device",
    type=click.Choice(["cuda", "cpu"]),
    default="cuda",
    show_default=True,
    help="cuda adds the CUDA context; cpu predicts what the CPU memory tracker measures.",
)
@gpus_option("Processes (GPUs) the run will have: every figure is then one rank's, its budget the smallest card's.")
@strategy_option
@click.option(
    "--host-ram-gb",
    type=FiniteRange(min=0.01),
    help="Host memory to plan the run's within (default: what this machine has available now).",
)
@click.option("--json", "as_json", is_flag=True)
def estimate(
    model_name, config_path, sets, max_memory_gb, seq, batch, rank, margin, device, gpus, strategy, host_ram_gb, as_json
):
    """Predict a training run's peak memory without a GPU: the step by component, each phase of the run (load,
    step, evaluation, checkpoint), the host memory, and the largest shapes that fit."""
    from autotune.context import RunContext
    from autotune.estimate import GPU_PHASES, answer
    from autotune.hardware import available_ram_bytes

    # The shape's flags go through the config, so the bounds a run is held to hold here too (a sequence within the
    # model's positions, a rank within its width, a micro-batch a step can hold): one set of checks.
    cfg = _load(
        config_path,
        sets,
        model_name=model_name,
        distributed_strategy=strategy,
        max_sequence_length=seq,
        batch_size=batch,
        lora_r=rank,
    )
    budget_gb = max_memory_gb if max_memory_gb is not None else cfg.max_memory_gb
    budget = Budget.from_gib(budget_gb, margin) if budget_gb is not None else None
    host_ram = int(host_ram_gb * GiB) if host_ram_gb is not None else available_ram_bytes()
    # Without --batch, the question solve answers: the config's micro-batch if it fits, else the largest that does.
    est, doc, shape = answer(
        cfg, RunContext(cfg).spec, budget, device=device, gpus=gpus, host_ram_bytes=host_ram, plan_batch=batch is None
    )
    seq, batch, rank, strategy = shape.seq, shape.batch, shape.rank, shape.strategy
    if as_json:
        _echo_json(doc)
        return
    ranks = f"; per rank of {gpus} ({strategy.upper()})" if gpus > 1 else ""
    click.echo(
        f"{doc['model']}, {cfg.quantization}, batch {batch} x seq {seq}, r={rank}, "
        f"checkpointing {'on' if cfg.gradient_checkpointing else 'off'}, {cfg.optimizer} ({device}){ranks}"
    )
    for reason in (doc.get(key) for key in ("strategy_reason", "techniques_reason", "batch_reason")):
        if reason:
            click.echo(f"  {reason}")
    for name, gb in doc["components_gb"].items():
        click.echo(f"  {name:18} {gb:9.3f} GiB")
    click.echo(f"  {'step peak':18} {doc['peak_gb']:9.3f} GiB (at the {est.phase.replace('_', ' ')})")
    run = doc["run"]
    phases = ", ".join(f"{GPU_PHASES[k]} {gb:.3f}" for k, gb in doc["phases_gb"].items())
    click.echo(f"the whole run, GiB: {phases}; its peak at the {GPU_PHASES[run['phase']]}")
    host = ", ".join(f"{k.removeprefix('host.').replace('_', ' ')} {v / GiB:.2f}" for k, v in run["host"].items() if v)
    room = "" if doc.get("host_fits", True) else ": MORE than"
    # The techniques whose rows keep something in host memory in this plan (their `host` terms).
    from autotune.techniques import TECHNIQUES_TABLE

    holders = [t.key for t in TECHNIQUES_TABLE if any(run["host"].get(term) for term in t.host)]
    advice = "; free host memory" + (f" or switch off {' / '.join(holders)}" if holders else "")
    click.echo(
        f"host memory {doc['host_gb']:.2f} GiB ({host}){room or ' of'} {doc['host_ram_gb']:.1f} GiB available"
        + (advice if room else "")
    )
    band = doc.get("error_band")
    if band:
        click.echo(
            f"  expected error {band['low']:+.1%} to {band['high']:+.1%} (out of sample, on {band['trials']} GPU "
            "trials; bench/RESULTS.md)"
        )
    if budget is not None:
        verdict = "fits" if doc["fits"] else "does NOT fit"
        safe = " on the safe side of that error" if band else ""
        # A zero is "nothing of that shape fits": said in words, so "batch 0" never reads as a plan.
        fits_batch, fits_seq = doc["largest_batch_at_seq"], doc["largest_seq_at_batch"]
        at_seq = f"batch {fits_batch} at seq {seq}" if fits_batch else f"no batch at seq {seq}"
        at_batch = f"seq {fits_seq} at batch {batch}" if fits_seq else f"no sequence at batch {batch}"
        click.echo(f"{verdict} {budget.describe()}; predicted to fit{safe}: {at_seq}, {at_batch}")
        if run["phases"]["load"] > budget.usable_bytes:
            click.echo(
                f"  loading the model alone takes {run['phases']['load'] / GiB:.2f} GiB: its weights as loaded, with "
                "what quantizing them holds for a moment (estimate/run.py)"
            )
        lean = doc.get("with_every_technique")
        if lean:
            sets = " ".join(f"--set {k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in lean["set"].items())
            lean_batch, lean_seq = lean["largest_batch_at_seq"], lean["largest_seq_at_batch"]
            verdict = "fits" if lean["fits"] else "does NOT fit"
            click.echo(
                f"with every memory technique this model takes ({sets}): {lean['peak_gb']:.2f} GiB, {verdict}; "
                + (f"batch {lean_batch} at seq {seq}" if lean_batch else f"no batch at seq {seq}")
                + ", "
                + (f"seq {lean_seq} at batch {batch}" if lean_seq else f"no sequence at batch {batch}")
                + ("; `autotune solve` measures which of them pay" if lean_seq or lean_batch else "")
            )
        if doc["fits"] and not fits_batch and not fits_seq:
            click.echo("  within the estimate's expected error of the limit: `autotune solve` measures whether it fits")
        elif not fits_batch and not fits_seq:
            quantize = "" if cfg.quantization == "4bit" else "--set quantization=4bit, "
            click.echo(
                f"  nothing of this shape is predicted to fit: lower --rank, {quantize}shard it with --gpus N "
                "--strategy fsdp, or use a card with more memory"
            )
    click.echo("a prediction: `autotune solve` measures real steps", err=True)


# ------------------------------------------------------------------------------------- demo

DEMO_CONFIG = "configs/demo"


@cli.command()
@click.option(
    "--max-memory-gb",
    type=FiniteRange(min=0.01),
    default=0.4,
    show_default=True,
    help="The simulated card the tiny model is solved for.",
)
@click.option("--output-dir", default="outputs/demo", show_default=True)
@click.pass_context
def demo(ctx, max_memory_gb, output_dir):
    """The whole pipeline offline on the embedded default: probe, solve the tiny model under a
    simulated cap, train it with the solved profile on data/raw, show the inference report."""
    from pathlib import Path

    from autotune.config import preset_path, read_json

    preset = preset_path(DEMO_CONFIG)
    sample_data = Path(__file__).resolve().parent.parent / "data" / "raw"
    if preset is None or not sample_data.is_dir():
        raise UserError(
            "the demo needs profiles/configs/demo.json and data/raw from the autotune source tree: "
            "run it from a clone installed with `pip install -e .` (scripts/bootstrap.sh does)"
        )
    config = str(preset)
    sets = (
        f"output_dir={output_dir}",
        f"log_dir={output_dir}/logs",
        f"data_dir={sample_data}",
        f"structured_logging.log_file={output_dir}/logs/training.jsonl",
    )
    profile = str(Path(output_dir) / PROFILE)
    replace = _demo_may_replace(Path(output_dir))
    click.echo("== 1/3 autotune probe", err=True)
    ctx.invoke(probe)
    click.echo(f"\n== 2/3 autotune solve (tiny-qwen3, simulated {max_memory_gb:g} GiB card)", err=True)
    ctx.invoke(
        solve,
        config_path=config,
        sets=sets,
        max_memory_gb=max_memory_gb,
        output=profile,
        plot=True,
        objective="throughput",
        margin=DEFAULT_MARGIN,
        checkpointing="auto",
        # The demo's own window, not the data's p99: short rows keep its training inside two minutes on a CPU.
        seq=read_json(preset)["max_sequence_length"],
    )
    click.echo("\n== 3/3 autotune train --profile", err=True)
    ctx.invoke(train, config_path=config, profile_path=profile, sets=sets, overwrite=replace)
    report = Path(output_dir) / INFERENCE_REPORT_MD
    if report.is_file():
        click.echo("\n" + report.read_text(encoding="utf-8"))


def _demo_may_replace(output_dir) -> bool:
    """Whether the demo may replace what output_dir holds: nothing, or an earlier demo's run (the tiny random
    model). Any other run there is refused before the demo writes anything (its solve writes profile.json)."""
    from autotune.catalog import TINY
    from autotune.checkpoint import existing_run, read_summary
    from autotune.run_files import CONFIG_FILE

    held = existing_run(output_dir, read_summary(output_dir))
    if held is None:
        return False
    try:
        previous = json.loads((output_dir / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        previous = None
    if isinstance(previous, dict) and previous.get("model_name") == TINY and previous.get("init") == "random":
        return True
    raise UserError(
        f"--output-dir {output_dir} already holds {held}, not a demo's: give the demo another folder (--output-dir)"
    )


# The command line as given (`train --nproc` hands it on to torchrun's processes).
_ARGV: list[str] = []
# Whether this process is the `autotune` program (its console script, `python -m autotune.cli`), not a caller of
# main(argv) such as a test: only then are its objects its own to freeze (_freeze_imports).
_PROGRAM = False


def _freeze_imports() -> None:
    """In the `autotune` program, before solve builds its first model: the training stack imported, then every object
    alive (modules, classes, the config: never garbage) moved out of the cycle collector's sight (gc.freeze). Each
    trial collects before and after itself (memory.free_memory); walking the ~500k objects torch, transformers and
    peft import cost ~0.4 s of CPU a collection, two or three a trial. The models built afterwards are collected as
    before."""
    if not _PROGRAM:
        return
    import gc

    import autotune.trial  # noqa: F401  (transformers, peft, bitsandbytes)

    gc.collect()
    gc.freeze()


def main(argv=None) -> None:
    global _ARGV, _PROGRAM
    _ARGV = list(sys.argv[1:] if argv is None else argv)
    _PROGRAM = argv is None
    try:
        cli.main(args=argv, prog_name="autotune", standalone_mode=False)
    except UserError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except OSError as exc:
        # A path the user gave that cannot be read or written: say which, without a traceback.
        where = f" {exc.filename!r}" if getattr(exc, "filename", None) else ""
        click.echo(f"error: cannot use{where}: {exc.strerror or exc}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
