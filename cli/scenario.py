"""`drivesim scenario ...`: build scenarios from clips, validate and summarise scenario JSON files."""

from __future__ import annotations

import json
from pathlib import Path

import typer

app = typer.Typer(help="Build, validate and inspect scenarios (conditioning over time: day/night, crowdedness, "
                       "box tracks).", no_args_is_help=True)


@app.command("from-clip")
def from_clip(
    source: str = typer.Argument(..., help="A clip's annotation JSON, a clip-format dataset folder (first clip) or "
                                           "DATASET:CLIP_ID."),
    out: Path = typer.Option(..., "--out", "-o", help="Scenario JSON to write (atomically)."),
    fps: float | None = typer.Option(None, "--fps", help="Resample to this frame rate (linear interpolation of "
                                                         "each track's boxes)."),
    minutes: float | None = typer.Option(None, "--minutes", help="Make the scenario this long (needs --extend)."),
    extend_mode: str | None = typer.Option(None, "--extend", help="loop: replay the clip; chain: the clip, then "
                                                                 "the dataset's next clips in manifest order "
                                                                 "(cycling)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing OUT."),
) -> None:
    """Take the scenario (day/night, crowdedness, box tracks) of a real or generated clip; optionally resample it
    and extend it to several minutes."""
    from drivesim.pipeline.scenario import scenario_from_clip, track_id_map

    scenario = scenario_from_clip(source, out, fps=fps, minutes=minutes, extend_mode=extend_mode,
                                  overwrite=overwrite, log=typer.echo)
    typer.echo(f"wrote {out}: {scenario.num_frames} frames at {scenario.fps:g} fps ({scenario.duration_s:.1f} s), "
               f"{len(track_id_map(scenario))} tracks, {scenario.width}x{scenario.height}, "
               f"{'night' if scenario.night else 'day'}")


@app.command("validate")
def validate(path: Path = typer.Argument(..., help="Scenario JSON.")) -> None:
    """Check a scenario JSON (schema: docs/clip-format.md, "Scenarios"); the first problem is an error naming the
    field."""
    from drivesim.pipeline.scenario import load_scenario

    scenario = load_scenario(path)
    typer.echo(f"{path}: ok ({scenario.num_frames} frames, {len(scenario.notes)} box(es) clipped to the image)")


@app.command("info")
def info(
    path: Path = typer.Argument(..., help="Scenario JSON."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Summarise a scenario: frames, fps, duration, tracks, boxes per frame, classes."""
    from drivesim.pipeline.scenario import load_scenario, summary

    stats = summary(load_scenario(path))
    if as_json:
        typer.echo(json.dumps(stats, indent=1))
        return
    for key, value in stats.items():
        typer.echo(f"{key:22s} {value}")
