"""The `autotune` command line. Thin: parse flags, call a stage, print its answer.

Every UserError becomes one message on stderr and exit code 2, never a traceback.
Heavy imports (torch, transformers) happen inside the commands that need them.
"""

from __future__ import annotations

import json
import sys

import click

from autotune import __version__
from autotune.config import MAX_RANK_CANDIDATES, OBJECTIVES
from autotune.errors import UserError
from autotune.units import DEFAULT_MARGIN, Budget, GiB


def _echo_json(doc) -> None:
    click.echo(json.dumps(doc, indent=2, ensure_ascii=False, default=str))


def _load(config_path, sets, **flags):
    from autotune.profile import layered_config

    return layered_config(config_path, sets, flags=flags)[0]


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


@cli.command()
@click.argument("config", type=click.Path(dir_okay=False), required=False)
@set_option
@click.option("--json", "as_json", is_flag=True, help="Print the fully resolved config as JSON.")
@click.option(
    "--hardware", is_flag=True, help="Also check it against this machine (the guide's --validate-hardware-only)."
)
def validate(config, sets, as_json, hardware):
    """Check CONFIG (default: the built-in defaults) and print it fully resolved; exit 2 on errors."""
    cfg = _load(config, sets)
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


@data.command("inspect")
@click.argument("data_dir", required=False)
@click.option("--config", type=click.Path(dir_okay=False), help="Take data_format, prefixes and patterns from here.")
@set_option
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="files (path, format, pairs, skipped) and pairs (question, answer, source, line).",
)
def data_inspect(data_dir, config, sets, as_json):
    """Per file: the format found, the pairs, and each skipped item with its reason."""
    from autotune.data.parsing import parse_data

    cfg = _data_config(config, sets, data_dir)
    report = parse_data(cfg)
    if as_json:
        _echo_json(report.to_json())
        return
    for f in report.files:
        encoding = f.encoding + (" (guessed)" if f.encoding_guessed else "")
        click.echo(f"{f.path:40} {f.format:10} {encoding:20} {f.pairs:5} pairs  {len(f.skipped)} skipped")
        for item in f.skipped:
            click.echo(f"    line {item['line']}: {item['reason']}")
    for w in report.warnings:
        click.echo(f"warning: {w}", err=True)
    click.echo(f"{len(report.pairs)} pairs in {len(report.files)} files")


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
    stats = data_length_stats(ctx)
    if as_json:
        _echo_json(stats)
        return
    click.echo(f"{stats['count']} samples, tokens with {ctx.spec.name}'s chat template")
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
def train(config_path, profile_path, sets, resume):
    """Fine-tune with LoRA/QLoRA on the HF Trainer: TensorBoard, JSONL log, checkpoints, resume."""
    from autotune.profile import layered_config, load_profile
    from autotune.trainer import train as run_training

    profile = load_profile(profile_path) if profile_path else None
    cfg, warnings = layered_config(config_path, sets, profile=profile)
    for warning in warnings:
        click.echo(f"warning: {warning}", err=True)
    summary = run_training(cfg, profile=profile, resume=resume, echo=lambda m: click.echo(m, err=True))
    final = summary.get("final", {})
    loss = (
        f"loss {final['first_loss']:.4f} -> {final['last_loss']:.4f}"
        if final.get("first_loss") is not None
        else f"mean training loss {final.get('train_loss')}"
    )
    click.echo(
        f"\ntraining {summary['status']} in {summary['seconds']:.0f}s: {final.get('global_step')} steps, "
        f"{loss}, eval loss {final.get('eval_loss')}"
    )
    click.echo(f"adapter, tokenizer and run summary: {summary['output_dir']}")
    if "inference_report" in summary:
        click.echo(f"inference report: {summary['inference_report']['markdown']}")


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
@click.option(
    "--max-memory-gb", type=click.FloatRange(min=0.01), help="Budget (default: config, else probed free memory)."
)
@click.option(
    "--output",
    type=click.Path(dir_okay=False),
    help="Profile path (default: profiles/solved/<gpu>__<model>__<budget>.json).",
)
@click.option("--objective", type=click.Choice(OBJECTIVES), default="throughput", show_default=True)
@click.option(
    "--margin",
    type=click.FloatRange(0, 0.5),
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
@click.option("--max-trials", type=click.IntRange(min=2))
@click.option("--time-budget", type=click.FloatRange(min=1), help="Seconds; stop searching and keep the best so far.")
@click.option(
    "--checkpointing",
    type=click.Choice(["auto", "on", "off"]),
    default="auto",
    show_default=True,
    help="Gradient checkpointing: auto measures with and without it (throughput) and keeps the faster.",
)
@click.option(
    "--real-weights", is_flag=True, help="Trial on the real weights (downloads/loads them) instead of random init."
)
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
    plot,
    as_json,
):
    """Choose micro-batch, accumulation, sequence length and LoRA rank by measured training steps."""
    from autotune.memory import ensure_expandable_segments

    ensure_expandable_segments()  # before anything touches CUDA
    from autotune.config import explicit_keys
    from autotune.context import RunContext
    from autotune.profile import layered_config
    from autotune.solver import SolveRequest
    from autotune.solver import run as run_solve

    flags = {"model_name": model_name, "data_dir": data_dir, "lora_r": rank}
    if checkpointing != "auto":
        flags["gradient_checkpointing"] = checkpointing == "on"
    cfg, _ = layered_config(config_path, sets, flags=flags)
    explicit = explicit_keys(config_path, sets)
    req = SolveRequest(
        ctx=RunContext(cfg),
        objective=objective,
        seq=seq,
        ranks=_rank_list(ranks, rank, objective),
        max_seq=max_seq,
        max_trials=max_trials,
        time_budget_s=time_budget,
        try_without_checkpointing=checkpointing == "auto" and objective == "throughput",
    )
    profile, path = run_solve(
        req,
        max_memory_gb=max_memory_gb,
        budget_explicit="max_memory_gb" in explicit,
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
    )
    click.echo(f"why: {profile['reason']}")
    click.echo(f"{len(profile['trials'])} trials in {profile['solve_seconds']:.0f}s; profile: {path}")
    click.echo(f"next: autotune train --profile {path}")


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
@click.option(
    "--max-memory-gb", type=click.FloatRange(min=0.01), help="Budget to compare with (default: the config's)."
)
@click.option("--seq", type=click.IntRange(min=1), help="Sequence length (default: the config's max_sequence_length).")
@click.option("--batch", type=click.IntRange(min=1), help="Micro-batch (default: the config's batch_size).")
@click.option("--rank", type=click.IntRange(min=1), help="LoRA rank (default: the config's lora_r).")
@click.option("--margin", type=click.FloatRange(0, 0.5), default=DEFAULT_MARGIN, show_default=True)
@click.option(
    "--device",
    type=click.Choice(["cuda", "cpu"]),
    default="cuda",
    show_default=True,
    help="cuda adds the CUDA context; cpu predicts what the CPU memory tracker measures.",
)
@click.option("--json", "as_json", is_flag=True)
def estimate(model_name, config_path, sets, max_memory_gb, seq, batch, rank, margin, device, as_json):
    """Predict a training step's peak memory without a GPU, by component, and the largest shapes that fit."""
    from autotune.context import RunContext
    from autotune.estimate import report

    cfg = _load(config_path, sets, model_name=model_name)
    budget_gb = max_memory_gb if max_memory_gb is not None else cfg.max_memory_gb
    budget = Budget.from_gib(budget_gb, margin) if budget_gb is not None else None
    seq, batch, rank = seq or cfg.max_sequence_length, batch or cfg.batch_size, rank or cfg.lora_r
    est, doc = report(RunContext(cfg), batch=batch, seq=seq, rank=rank, device=device, budget=budget)
    if as_json:
        _echo_json(doc)
        return
    click.echo(
        f"{doc['model']}, {cfg.quantization}, batch {batch} x seq {seq}, r={rank}, "
        f"checkpointing {'on' if cfg.gradient_checkpointing else 'off'}, {cfg.optimizer} ({device})"
    )
    for name, gb in doc["components_gb"].items():
        click.echo(f"  {name:18} {gb:9.3f} GiB")
    click.echo(f"  {'peak':18} {doc['peak_gb']:9.3f} GiB (at the {est.phase.replace('_', ' ')})")
    if budget is not None:
        verdict = "fits" if doc["fits"] else "does NOT fit"
        click.echo(
            f"{verdict} {budget.describe()}; predicted to fit: batch "
            f"{doc['largest_batch_at_seq']} at seq {seq}, seq {doc['largest_seq_at_batch']} at batch {batch}"
        )
    click.echo("a prediction: `autotune solve` measures real steps", err=True)


# ------------------------------------------------------------------------------------- demo

DEMO_CONFIG = "configs/demo"


@cli.command()
@click.option(
    "--max-memory-gb",
    type=click.FloatRange(min=0.01),
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

    from autotune.config import preset_path

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
    profile = str(Path(output_dir) / "profile.json")
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
    )
    click.echo("\n== 3/3 autotune train --profile", err=True)
    ctx.invoke(train, config_path=config, profile_path=profile, sets=sets)
    report = Path(output_dir) / "inference_report.md"
    if report.is_file():
        click.echo("\n" + report.read_text(encoding="utf-8"))


def main(argv=None) -> None:
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
