"""Scenarios (conditioning over time: day/night, crowdedness, box tracks): what `drivesim scenario ...` runs.

Readers and transforms live in `drivesim.datasets.scenario`; this module builds a scenario from clips (resampled,
extended to minutes) and re-exports the readers a user needs.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from drivesim.datasets import scenario as sc
from drivesim.datasets.clips import read_annotation, read_manifest
from drivesim.datasets.scenario import Scenario, load_scenario, summary, track_id_map
from drivesim.errors import ConfigError, DataError
from drivesim.pipeline.outputs import check_output

__all__ = ["Scenario", "load_scenario", "resolve_clips", "scenario_from_clip", "summary", "track_id_map"]


def resolve_clips(source: str) -> tuple[list, int]:
    """Annotations named by `CLIP_JSON`, `DATASET` or `DATASET:clip_id`, and the index of the chosen one.

    A dataset gives all its clips in manifest order (used by `--extend chain`); the chosen clip is its first
    clip, or `clip_id`.
    """
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


def scenario_from_clip(source: str, out: Path, *, fps: float | None = None, minutes: float | None = None,
                       extend_mode: str | None = None, overwrite: bool = False,
                       log: Callable[[str], None] = print) -> Scenario:
    """Write the scenario of a real or generated clip to `out`, optionally resampled and extended.

    Args:
        source: a clip's annotation JSON, a clip-format dataset folder (its first clip) or "DATASET:CLIP_ID".
        fps: resample to this frame rate (linear interpolation of each track's boxes).
        minutes / extend_mode: make it this long by "loop" (replay the clip) or "chain" (the clip, then the
            dataset's next clips in manifest order, cycling; clips whose fps/size/day-night differ are skipped).
        overwrite: replace an existing `out` (never the source).

    Returns:
        The scenario written.

    Raises:
        ConfigError: a bad fps/minutes/mode, minutes above `MAX_MINUTES` (before any clip is read) or frames above
            `MAX_FRAMES`, an output over the source; DataError: unreadable clips.
    """
    if fps is not None and not fps > 0:
        raise ConfigError(f"--fps: must be positive, got {fps}")
    if (minutes is None) != (extend_mode is None):
        raise ConfigError("--minutes/--extend: give both (e.g. --minutes 10 --extend loop) or neither")
    if extend_mode is not None and extend_mode not in sc.EXTEND_MODES:
        raise ConfigError(f"--extend: expected one of {', '.join(sc.EXTEND_MODES)}, got {extend_mode!r}")
    if minutes is not None and not minutes > 0:
        raise ConfigError(f"--minutes: must be positive, got {minutes}")
    if minutes is not None and minutes > sc.MAX_MINUTES:  # up front: 1e9 ran out of memory building the frames
        from drivesim.rollout.config import as_typed

        raise ConfigError(f"--minutes: {as_typed(minutes)} exceeds the limit of {as_typed(sc.MAX_MINUTES)} "
                          "(minutes per scenario: twice the longest rollout)")
    out = Path(out)
    src = Path(source) if Path(source).exists() else Path(source.rpartition(":")[0] or source)
    check_output(out, {"SOURCE": src}, overwrite)
    annotations, chosen = resolve_clips(source)
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
            log(f"chain: skipped {len(scenarios) - len(usable)} clip(s) whose fps/size/day-night differ "
                "from the first clip's")
    else:
        scenario = scenarios[0]
    sc.save_scenario(scenario, out)
    return scenario
