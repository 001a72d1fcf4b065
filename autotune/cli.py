"""The `autotune` command line. Thin: parse flags, call a stage, print its answer.

Every UserError becomes one message on stderr and exit code 2, never a traceback.
Heavy imports (torch, transformers) happen inside the commands that need them.
"""

from __future__ import annotations

import json
import sys

import click

from autotune import __version__
from autotune.errors import UserError


def _echo_json(doc) -> None:
    click.echo(json.dumps(doc, indent=2, ensure_ascii=False, default=str))


def _load(config_path, sets):
    from autotune.config import load_config, parse_set

    return load_config(config_path, parse_set(sets))


set_option = click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
                          help="Override a config key (repeatable), typed by the schema: --set batch_size=2")


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
    from autotune.hardware import probe as run_probe, render_table, save_probe

    doc = run_probe(output_dir)
    if save:
        save_probe(doc, save)
    click.echo(json.dumps(doc, indent=2) if as_json else render_table(doc))


# --------------------------------------------------------------------------------- validate

@cli.command()
@click.argument("config", type=click.Path(dir_okay=False), required=False)
@set_option
@click.option("--json", "as_json", is_flag=True, help="Print the fully resolved config as JSON.")
@click.option("--hardware", is_flag=True, help="Also check it against this machine (the guide's --validate-hardware-only).")
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


def main(argv=None) -> None:
    try:
        cli.main(args=argv, prog_name="autotune", standalone_mode=False)
    except UserError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
