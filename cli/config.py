"""`drivesim config show PRESET`: print a preset fully resolved (as key = value lines or as YAML); `drivesim config plan
PRESET`: its training plan (parameters, FLOPs, memory per GPU, GPU-hours per stage)."""

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


def _count(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n:,}"


def _num(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f}" if n >= 2**30 / 10 else f"{n / 2**30:.3f}"


@app.command("plan")
def plan(
    preset: str = typer.Argument("paper-512x1024", help="Preset name: tiny, cpu-small, paper-512x1024."),
    mfu: float = typer.Option(0.4, "--mfu", help="Model FLOP utilisation the GPU-hours assume."),
    peak_tflops: float = typer.Option(312.0, "--peak-tflops", help="The GPU's dense bf16 peak, TFLOP/s (A100: 312)."),
    gpus: int = typer.Option(8, "--gpus", help="GPUs FSDP shards weights, gradients and optimizer state over "
                                                "(GPU-hours use each stage's paper GPU count)."),
    gpu_memory: float = typer.Option(80.0, "--gpu-memory", help="GPU memory in GiB; totals above it print red."),
    stages: list[str] = typer.Option(None, "--stage", help="Plan only this stage (repeatable; default all six)."),
    json_out: Path = typer.Option(None, "--json", help="Also write the whole plan (every byte count, every phase) "
                                                       "as JSON to this file."),
) -> None:
    """Before renting GPUs: per stage, parameters, FLOPs per training sample, memory per GPU (bf16; DDP and FSDP;
    gradient checkpointing off / on) and GPU-hours at the preset's training scale.

    Nothing is estimated by hand: each stage's training step (forward + backward of its loss) is traced on fake
    tensors (no memory, ~1 minute on one CPU thread for the paper preset), FLOPs counted by torch's FlopCounterMode,
    activations measured as the peak bytes of the live tensors. docs/measurements.md explains every column.

    Examples:

      drivesim config plan

      drivesim config plan paper-512x1024 --mfu 0.35 --peak-tflops 989 --gpus 16 --json plan.json
    """
    from rich.console import Console
    from rich.table import Table

    from drivesim.pipeline.plan import STAGE_NAMES, make_plan, write_plan_json

    err = Console(stderr=True, highlight=False)
    result = make_plan(preset, mfu=mfu, peak_tflops=peak_tflops, fsdp_gpus=gpus, gpu_memory_gib=gpu_memory,
                       stages=tuple(stages) if stages else STAGE_NAMES,
                       progress=lambda s, sp: err.print(f"[dim]{s}: traced in {sp.trace_seconds:.1f} s[/dim]"))
    console = Console(highlight=False)
    compute = Table(title=f"{preset}: compute (bf16; GPU-hours at MFU {mfu:g} of {peak_tflops:g} TFLOP/s)")
    for col in ("stage", "trainable", "frozen", "batch/GPU x GPUs", "steps", "GFLOP/sample ckpt off / on",
                "GPU-hours ckpt off / on"):
        compute.add_column(col, justify="left" if col == "stage" else "right")
    for s in result.stages:
        f, h = s.flops_per_sample, s.gpu_hours
        both = s.checkpointing_applies
        compute.add_row(
            s.stage, _count(s.trainable_params), _count(s.frozen_params),
            f"{s.batch_per_gpu} {s.sample_unit} x {s.gpus}", f"{s.steps:,}",
            f"{_num(f['no_ckpt'] / 1e9)} / {_num(f['ckpt'] / 1e9)}" if both else _num(f["no_ckpt"] / 1e9),
            f"{_num(h['no_ckpt'])} / {_num(h['ckpt'])}" if both else _num(h["no_ckpt"]))
    console.print(compute)
    memory = Table(title=f"{preset}: memory per GPU, GiB (fp32 weights + autocast bf16; DDP, and FSDP full-shard on "
                         f"{gpus} GPUs; ckpt off / on)")
    for col in ("stage", "weights", "grads", "AdamW", "EMA", "DDP buckets", "batch", "activations", "DDP total",
                f"FSDP-{gpus} total"):
        memory.add_column(col, justify="left" if col == "stage" else "right")
    limit = gpu_memory * 2**30

    def total(n: int) -> str:
        text = _gib(n)
        return f"[red]{text}[/red]" if n > limit else text

    for s in result.stages:
        st, act, g = s.static_bytes, s.activation_bytes, s.per_gpu_bytes
        if s.checkpointing_applies:
            acts = f"{_gib(act['no_ckpt'])} / {_gib(act['ckpt'])}"
            ddp = f"{total(g['ddp_no_ckpt']['total'])} / {total(g['ddp_ckpt']['total'])}"
            fsdp = f"{total(g['fsdp_no_ckpt']['total'])} / {total(g['fsdp_ckpt']['total'])}"
        else:
            acts, ddp, fsdp = _gib(act["no_ckpt"]), total(g["ddp_no_ckpt"]["total"]), total(g["fsdp_no_ckpt"]["total"])
        memory.add_row(s.stage, _gib(st["weights"]), _gib(st["gradients"]), _gib(st["adamw_moments"]),
                       _gib(st["ema"]), _gib(st["ddp_buckets"]), _gib(s.batch_bytes), acts, ddp, fsdp)
    console.print(memory)
    on = [s.stage for s in result.stages if s.preset_checkpointing]
    if on:
        console.print(f"{preset} trains {', '.join(on)} with gradient checkpointing on (the `on` numbers).")
    for note in result.notes:
        console.print(f"- {note}", soft_wrap=False)
    console.print(f"planned in {result.seconds:.0f} s")
    if json_out is not None:
        import sys

        write_plan_json(result, json_out, command="drivesim " + " ".join(sys.argv[1:]))
        console.print(f"wrote {json_out}")
