"""`drivesim data ...`: inspect, validate, simulate and preview datasets in the drivesim clip format."""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(help="Inspect, validate, simulate and preview datasets in the drivesim clip format.",
                  no_args_is_help=True)


# ---- info / validate / from-nuscenes (datasets owner) ---------------------------------------------------------


@app.command("info")
def info(
    path: Path = typer.Argument(..., help="Dataset folder (with manifest.json)."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Summarise a dataset: clips, frames, fps, resolution, day/night, boxes per frame, classes (per split)."""
    import json

    from rich.console import Console
    from rich.table import Table

    from drivesim.pipeline.data import dataset_summary

    summary = dataset_summary(path)
    console = Console()
    if as_json:
        typer.echo(json.dumps(summary, indent=1))
        return
    splits = {**summary["splits"], "all": summary["all"]}
    table = Table(title=f"{summary['path']}  ({summary['source'] or 'unknown source'}, format "
                        f"v{summary['format_version']})")
    table.add_column("")
    for name in splits:
        table.add_column(name, justify="right")
    rows = [("clips", "clips"), ("frames", "frames"), ("fps", "fps"), ("resolution (WxH)", "resolutions"),
            ("day clips", "day"), ("night clips", "night"), ("boxes / frame (mean)", "boxes_per_frame_mean"),
            ("boxes / frame (max)", "boxes_per_frame_max"), ("empty frames", "empty_frames"),
            ("vehicles / clip (mean)", "crowdedness_mean")]
    for label, key in rows:
        table.add_row(label, *(", ".join(map(str, s[key])) if isinstance(s[key], list) else str(s[key])
                               for s in splits.values()))
    console.print(table)
    classes = Table(title="boxes per class")
    classes.add_column("class")
    for name in splits:
        classes.add_column(name, justify="right")
    for cls in summary["all"]["classes"]:
        if summary["all"]["classes"][cls]:
            classes.add_row(cls, *(str(s["classes"][cls]) for s in splits.values()))
    console.print(classes)


@app.command("validate")
def validate(
    path: Path = typer.Argument(..., help="Dataset folder (with manifest.json)."),
    all_notes: bool = typer.Option(False, "--notes", help="Print every note (default: a count per file)."),
    no_decode: bool = typer.Option(False, "--no-decode", help="Check the JSON only; do not decode videos."),
) -> None:
    """Check every clip; print one line per problem and exit 1 if there is any.

    Boxes that stick out of the image are clipped by the readers and reported as notes, not failures.
    """
    from collections import Counter

    from rich.console import Console

    from drivesim.pipeline.data import validate_dataset

    console = Console(highlight=False, soft_wrap=True)
    report = validate_dataset(path, decode=not no_decode)
    if all_notes:
        for note in report.notes:
            console.print(f"[yellow]note[/yellow] {note}")
    else:
        for file, n in Counter(note.split(": ", 1)[0] for note in report.notes).items():
            console.print(f"[yellow]note[/yellow] {file}: {n} box(es) clipped to the image (--notes lists them)")
    for problem in report.problems:
        console.print(f"[red]FAIL[/red] {problem}")
    status = "[green]ok[/green]" if report.ok else f"[red]{len(report.problems)} problem(s)[/red]"
    console.print(f"{path}: {report.clips_checked} clip(s) checked, {status}, {len(report.notes)} note(s)")
    if not report.ok:
        raise typer.Exit(code=1)


@app.command("from-nuscenes")
def from_nuscenes(
    dataroot: Path = typer.Option(..., "--dataroot", help="nuScenes root (holds VERSION/*.json, samples/, sweeps/)."),
    version: str = typer.Option("v1.0-mini", "--version", help="Release folder name, e.g. v1.0-trainval."),
    out: Path = typer.Option(..., "--out", help="Output dataset folder (must not exist or be empty)."),
    camera: str = typer.Option("CAM_FRONT", "--camera", help="Camera channel."),
    frames: int = typer.Option(8, "--frames", help="Frames per clip."),
    fps: float = typer.Option(2.0, "--fps", help="Output frame rate (key frames are 2 Hz; use --sweeps above)."),
    size: str = typer.Option("128x256", "--size", help="Output HEIGHTxWIDTH (resize to cover + centre crop)."),
    sweeps: bool = typer.Option(False, "--sweeps", help="Also use the non-key-frame images (~12 Hz)."),
    max_clips: int | None = typer.Option(None, "--max-clips", help="Stop after this many clips."),
) -> None:
    """Export nuScenes camera clips with projected 2D boxes to the drivesim clip format."""
    import shlex

    from drivesim.pipeline.data import from_nuscenes, parse_size

    command = ["drivesim", "data", "from-nuscenes", "--dataroot", str(dataroot), "--version", version, "--out",
               str(out), "--camera", camera, "--frames", str(frames), "--fps", str(fps), "--size", size]
    command += ["--sweeps"] * sweeps + (["--max-clips", str(max_clips)] if max_clips is not None else [])
    manifest = from_nuscenes(out, dataroot, version, camera, frames, fps, parse_size(size), sweeps, max_clips,
                            command=shlex.join(command))
    typer.echo(f"{out}: wrote {len(manifest.clips)} clips ({len(manifest.split('train'))} train, "
               f"{len(manifest.split('val'))} val)")


# ---- simulate / preview (MetaDrive sample data) ----------------------------------------------------------------


@app.command("simulate")
def simulate_cmd(
    out: Path = typer.Option(..., "--out", help="Dataset folder to create (must not exist)."),
    clips: int = typer.Option(64, "--clips", help="Number of clips (a quarter go to val)."),
    frames: int = typer.Option(32, "--frames", help="Frames per clip (10 fps)."),
    size: str = typer.Option("128x256", "--size", help="HEIGHTxWIDTH in pixels."),
    seed: int = typer.Option(0, "--seed", help="Base seed (maps and traffic)."),
    workers: int = typer.Option(2, "--workers", help="Simulator processes (one core each)."),
    night_fraction: float = typer.Option(0.5, "--night-fraction", help="Share of night clips in each split."),
    warmup: int = typer.Option(30, "--warmup", help="Simulator steps (0.1 s each) before recording."),
    traffic_density: float = typer.Option(0.3, "--traffic-density", help="MetaDrive traffic density."),
    map_blocks: str = typer.Option("4", "--map", help="Random road blocks per map, or a MetaDrive block string."),
) -> None:
    """Render first-person driving clips with exact boxes in MetaDrive (needs scripts/setup_sim.sh).

    Example: drivesim data simulate --out data/sample --clips 64 --frames 32 --size 128x256 --seed 0
    """
    import shlex

    from rich.console import Console

    from drivesim.pipeline.data import parse_size, simulate

    command = shlex.join(["drivesim", "data", "simulate", "--out", str(out), "--clips", str(clips), "--frames",
                          str(frames), "--size", size, "--seed", str(seed), "--workers", str(workers),
                          "--night-fraction", str(night_fraction), "--warmup", str(warmup),
                          "--traffic-density", str(traffic_density), "--map", map_blocks])
    console = Console(stderr=True)
    with console.status("rendering with MetaDrive") as status:
        simulate(out, clips, frames, parse_size(size), seed, workers, night_fraction, warmup=warmup,
                 traffic_density=traffic_density, map_blocks=map_blocks, command=command,
                 progress=lambda msg: status.update(f"rendering with MetaDrive: {msg}"))
    typer.echo(f"{out}: wrote {clips} clips of {frames} frames")


@app.command("preview")
def preview_cmd(
    path: Path = typer.Argument(..., help="Dataset folder (clip format)."),
    out: Path = typer.Option(..., "--out", help="PNG file to write."),
    clip: list[str] = typer.Option(None, "--clip", help="Clip id(s); default: the first day and first night clip."),
    frame: int = typer.Option(16, "--frame", help="Frame index (clamped to the clip)."),
    scale: int = typer.Option(3, "--scale", help="Upscaling factor of the picture."),
) -> None:
    """Draw a frame of each chosen clip with its boxes (class:track id) into one PNG.

    Example: drivesim data preview data/sample --out preview.png
    """
    from drivesim.pipeline.data import preview

    preview(path, out, clip or None, frame, scale)
    typer.echo(f"{out}: written")


@app.command("filmstrip")
def filmstrip_cmd(
    path: Path = typer.Argument(..., help="Dataset or rollout folder (clip format)."),
    out: Path = typer.Option(..., "--out", help="PNG file to write."),
    at: list[float] = typer.Option(..., "--at", help="Start time of a row in seconds (repeatable)."),
    clip: str = typer.Option(None, "--clip", help="Clip id (default: the folder's first clip)."),
    frames: int = typer.Option(4, "--frames", help="Frames per row."),
    step: int = typer.Option(2, "--step", help="Frames between two frames of a row."),
    scale: int = typer.Option(2, "--scale", help="Upscaling factor of the picture."),
) -> None:
    """One row of frames (boxes drawn) per --at time of one clip: e.g. minutes 0, 5 and 10 of a rollout.

    Example: drivesim data filmstrip runs/rollout --at 0 --at 300 --at 596 --out filmstrip.png
    """
    from drivesim.pipeline.data import filmstrip_clip

    filmstrip_clip(path, out, at, clip, frames, step, scale)
    typer.echo(f"{out}: written")
