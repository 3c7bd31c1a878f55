"""`drivesim config show PRESET`: print a preset fully resolved (as key = value lines or as YAML)."""

from __future__ import annotations

from pathlib import Path

import typer

from drivesim.errors import ConfigError
from drivesim.pipeline.presets import preset_dict

app = typer.Typer(help="Show presets and configs.", no_args_is_help=True)


def _flatten(data, prefix: str = "") -> list[tuple[str, object]]:
    if isinstance(data, dict):
        rows: list[tuple[str, object]] = []
        for k, v in data.items():
            rows.extend(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return rows
    return [(prefix, data)]


def select_section(data: dict, section: str | None, source: str) -> object:
    """The sub-tree at dotted `section` of a config dict (all of it for None).

    Raises:
        ConfigError: the section does not exist (named, with the keys available at that level).
    """
    if not section:
        return data
    node = data
    parts = section.split(".")
    for i, part in enumerate(parts):
        if not isinstance(node, dict) or part not in node:
            known = ", ".join(node) if isinstance(node, dict) else "none (a value)"
            raise ConfigError(f"{source}: --section {'.'.join(parts[: i + 1])}: no such section (keys: {known})")
        node = node[part]
    return node


@app.command("show")
def show(
    preset: str = typer.Argument(None, help="Preset name: tiny, cpu-small, paper-512x1024."),
    section: str = typer.Option(None, "--section", "-s",
                                help="Dotted section only, e.g. autoencoder, prediction.unet, train.image_ldm."),
    yaml_out: bool = typer.Option(False, "--yaml", help="Print YAML (loadable with `drivesim train --config`)."),
    file: Path = typer.Option(None, "--file", "-f", help="Show a YAML config file instead of a preset."),
) -> None:
    """Print PRESET resolved: every model block and every stage's training config.

    Examples:

      drivesim config show tiny

      drivesim config show cpu-small --section train.prediction

      drivesim config show paper-512x1024 --yaml > my.yaml   # edit, then: drivesim train ... --config my.yaml
    """
    import yaml

    if (preset is None) == (file is None):
        raise ConfigError("config show: give a PRESET name or --file, not both / neither")
    node = select_section(preset_dict(preset, file), section, str(file) if file is not None else f"preset {preset}")
    if yaml_out:
        typer.echo(yaml.safe_dump(node, sort_keys=False, default_flow_style=None), nl=False)
        return
    if not isinstance(node, dict):
        typer.echo(f"{section} = {node!r}")
        return
    for key, value in _flatten(node, section or ""):
        typer.echo(f"{key} = {value!r}")
