"""`drivesim scenario ...`: build scenarios from clips, validate and summarise scenario JSON files."""

from __future__ import annotations

import json
from pathlib import Path

import typer

app = typer.Typer(help="Build, validate and inspect scenarios (conditioning over time: day/night, crowdedness, "
                       "box tracks).", no_args_is_help=True)


def _resolve_clips(source: str) -> tuple[list, int]:
    """Annotations named by `CLIP_JSON`, `DATASET` or `DATASET:clip_id`, and the index of the chosen one.

    A dataset gives all its clips in manifest order (used by `--extend chain`); the chosen clip is its first
    clip, or `clip_id`.
    """
    from drivesim.datasets.clips import read_annotation, read_manifest

    from drivesim.errors import DataError

    path, clip_id = Path(source), None
    if not path.exists() and ":" in source:
        head, _, clip_id = source.rpartition(":")
        path = Path(head)
    if path.is_file():
        if clip_id is not None:
            raise DataError(f"{path}: clip_id: ':{clip_id}' selects a clip of a dataset folder, not of a file")
        return [read_annotation(path)], 0
    manifest = read_manifest(path)  # raises "folder not found" / "manifest: file not found"
    ids = [e.clip_id for e in manifest.clips]
    if clip_id is not None and clip_id not in ids:
        raise DataError(f"{manifest.root / 'manifest.json'}: clips: no clip with id {clip_id!r}")
    chosen = ids.index(clip_id) if clip_id is not None else 0
    return [read_annotation(e.annotation) for e in manifest.clips], chosen


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
    from drivesim.datasets import scenario as sc

    from drivesim.errors import ConfigError

    if fps is not None and not fps > 0:
        raise ConfigError(f"--fps: must be positive, got {fps}")
    if (minutes is None) != (extend_mode is None):
        raise ConfigError("--minutes/--extend: give both (e.g. --minutes 10 --extend loop) or neither")
    if extend_mode is not None and extend_mode not in sc.EXTEND_MODES:
        raise ConfigError(f"--extend: expected one of {', '.join(sc.EXTEND_MODES)}, got {extend_mode!r}")
    if minutes is not None and not minutes > 0:
        raise ConfigError(f"--minutes: must be positive, got {minutes}")
    from drivesim.cli.outputs import check_output

    src = Path(source) if Path(source).exists() else Path(source.rpartition(":")[0] or source)
    check_output(out, {"SOURCE": src}, overwrite)
    annotations, chosen = _resolve_clips(source)
    order = annotations[chosen:] + annotations[:chosen]
    scenarios = [sc.Scenario.from_clip(a) for a in (order if extend_mode == "chain" else order[:1])]
    if fps is not None:
        scenarios = [sc.resample(s, fps) for s in scenarios]
    if extend_mode is not None:
        first = scenarios[0]
        usable = [s for s in scenarios if (s.fps, s.width, s.height, s.night) == (first.fps, first.width,
                                                                                  first.height, first.night)]
        num_frames = max(1, round(minutes * 60 * first.fps))
        scenario = sc.extend(usable if extend_mode == "chain" else first, num_frames, extend_mode)
        if extend_mode == "chain" and len(usable) < len(scenarios):
            typer.echo(f"chain: skipped {len(scenarios) - len(usable)} clip(s) whose fps/size/day-night differ "
                       "from the first clip's")
    else:
        scenario = scenarios[0]
    sc.save_scenario(scenario, out)
    typer.echo(f"wrote {out}: {scenario.num_frames} frames at {scenario.fps:g} fps ({scenario.duration_s:.1f} s), "
               f"{len(sc.track_id_map(scenario))} tracks, {scenario.width}x{scenario.height}, "
               f"{'night' if scenario.night else 'day'}")


@app.command("validate")
def validate(path: Path = typer.Argument(..., help="Scenario JSON.")) -> None:
    """Check a scenario JSON (schema in the README, "Scenarios"); the first problem is an error naming the field."""
    from drivesim.datasets.scenario import load_scenario

    scenario = load_scenario(path)
    typer.echo(f"{path}: ok ({scenario.num_frames} frames, {len(scenario.notes)} box(es) clipped to the image)")


@app.command("info")
def info(
    path: Path = typer.Argument(..., help="Scenario JSON."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Summarise a scenario: frames, fps, duration, tracks, boxes per frame, classes."""
    from drivesim.datasets.scenario import load_scenario, summary

    stats = summary(load_scenario(path))
    if as_json:
        typer.echo(json.dumps(stats, indent=1))
        return
    for key, value in stats.items():
        typer.echo(f"{key:22s} {value}")
