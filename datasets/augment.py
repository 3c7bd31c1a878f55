"""Augmentations of a scenario's box tracks for synthetic data (`drivesim generate`): day <-> night, horizontal
flip, dropped tracks, jittered tracks, a later start.

Each one changes the scenario itself, and a generated clip's labels are its scenario, so every change reaches the
labels, never only the video. The random ones (drop, jitter) draw from their own generator, seeded from the clip's
seed and the augmentation's name, so a clip's augmentations depend only on its seed (not on which other
augmentations are switched on, nor on the process or the order clips are made in).

Coordinates: pixels of the scenario's `width` x `height` frame, image frame (x right, y down), xyxy.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
from drivesim.bbox_conditioning.classes import VEHICLE_CLASSES
from drivesim.datasets.clips import Box
from drivesim.datasets.scenario import Scenario, track_id_map, window

from drivesim.errors import ConfigError

# the generators of the random augmentations: SeedSequence([seed, tag]); a tag never changes (reproducibility)
_TAGS = {"drop_boxes": 1, "jitter_boxes": 2}


@dataclass(frozen=True)
class Augmentations:
    """What `augment` does to a scenario, in this order.

    Attributes:
        time_shift: start K frames later (frames of the scenario's own rate): frames [K, n) are kept.
        hflip: mirror every box horizontally, x -> width - x ([x1, y1, x2, y2] -> [W - x2, y1, W - x1, y2]).
        drop_boxes: drop each track (all its boxes) with this probability; crowdedness loses the dropped vehicles.
        jitter_boxes: shift each track by one integer offset (dx, dy), each uniform in [-PX, PX] pixels; boxes are
            clipped to the image, a box pushed wholly outside it leaves that frame.
        flip_daynight: day <-> night.
    """

    time_shift: int = 0
    hflip: bool = False
    drop_boxes: float = 0.0
    jitter_boxes: int = 0
    flip_daynight: bool = False

    def check(self) -> None:
        """Raise `ConfigError` naming the flag of an unusable value."""
        if isinstance(self.time_shift, bool) or not isinstance(self.time_shift, int) or self.time_shift < 0:
            raise ConfigError(f"--time-shift: must be an integer >= 0 (frames), got {self.time_shift!r}")
        if not (math.isfinite(self.drop_boxes) and 0.0 <= self.drop_boxes < 1.0):
            raise ConfigError(f"--drop-boxes: must be a probability in [0, 1), got {self.drop_boxes!r}")
        if isinstance(self.jitter_boxes, bool) or not isinstance(self.jitter_boxes, int) or self.jitter_boxes < 0:
            raise ConfigError(f"--jitter-boxes: must be an integer >= 0 (pixels), got {self.jitter_boxes!r}")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def hflip(scenario: Scenario) -> Scenario:
    """Every box mirrored about the vertical centre line: [x1, y1, x2, y2] -> [W - x2, y1, W - x1, y2]."""
    w = scenario.width
    frames = [[replace(b, x1=w - b.x2, x2=w - b.x1) for b in boxes] for boxes in scenario.frames]
    return replace(scenario, frames=frames, notes=[])


def drop_tracks(scenario: Scenario, track_ids: set[str]) -> Scenario:
    """Without the boxes of `track_ids`; crowdedness (a vehicle count) loses the dropped vehicle tracks (>= 0)."""
    classes = {b.track_id: b.cls for boxes in scenario.frames for b in boxes}
    vehicles = sum(classes[t] in VEHICLE_CLASSES for t in track_ids if t in classes)
    frames = [[b for b in boxes if b.track_id not in track_ids] for boxes in scenario.frames]
    return replace(scenario, frames=frames, crowdedness=max(0, scenario.crowdedness - vehicles), notes=[])


def shift_tracks(scenario: Scenario, offsets: dict[str, tuple[int, int]]) -> tuple[Scenario, int]:
    """Each track's boxes moved by its (dx, dy) pixels (tracks not in `offsets` stay), clipped to the image.

    Returns:
        (scenario, boxes removed): a box moved wholly outside the image (no positive area left) leaves its frame.
    """
    w, h = float(scenario.width), float(scenario.height)
    removed = 0
    frames: list[list[Box]] = []
    for boxes in scenario.frames:
        out = []
        for b in boxes:
            dx, dy = offsets.get(b.track_id, (0, 0))
            x1, y1 = max(b.x1 + dx, 0.0), max(b.y1 + dy, 0.0)
            x2, y2 = min(b.x2 + dx, w), min(b.y2 + dy, h)
            if x2 <= x1 or y2 <= y1:
                removed += 1
                continue
            out.append(replace(b, x1=x1, y1=y1, x2=x2, y2=y2))
        frames.append(out)
    return replace(scenario, frames=frames, notes=[]), removed


def augment(scenario: Scenario, aug: Augmentations, seed: int) -> tuple[Scenario, dict[str, Any]]:
    """`scenario` with `aug` applied (order: time shift, hflip, drop, jitter, day/night), seeded by `seed`.

    Returns:
        (scenario, record): the record says what was applied, only the augmentations switched on:
        {"time_shift": {"frames"}, "hflip": {"width"}, "drop_boxes": {"p", "dropped_tracks", "crowdedness":
        [before, after]}, "jitter_boxes": {"px", "offsets": {track_id: [dx, dy]}, "boxes_removed"},
        "flip_daynight": {"night": [before, after]}}.

    Raises:
        ConfigError: an invalid `aug`, or a time shift that leaves no frame.
    """
    aug.check()
    record: dict[str, Any] = {}
    s = scenario
    if aug.time_shift:
        if aug.time_shift >= s.num_frames:
            raise ConfigError(f"--time-shift: {aug.time_shift} frames leaves nothing of a {s.num_frames}-frame "
                              f"source ({s.source})")
        s = window(s, aug.time_shift, s.num_frames - aug.time_shift)
        record["time_shift"] = {"frames": aug.time_shift}
    if aug.hflip:
        s = hflip(s)
        record["hflip"] = {"width": s.width}
    ids = list(track_id_map(s))  # order of first appearance: the draws are tied to tracks, not to set order
    if aug.drop_boxes > 0:
        u = _rng(seed, "drop_boxes").random(len(ids))
        dropped = [t for t, v in zip(ids, u, strict=True) if v < aug.drop_boxes]
        before = s.crowdedness
        s = drop_tracks(s, set(dropped))
        record["drop_boxes"] = {"p": aug.drop_boxes, "dropped_tracks": dropped, "crowdedness": [before, s.crowdedness]}
        ids = [t for t in ids if t not in set(dropped)]
    if aug.jitter_boxes > 0:
        d = _rng(seed, "jitter_boxes").integers(-aug.jitter_boxes, aug.jitter_boxes + 1, size=(len(ids), 2))
        offsets = {t: (int(dx), int(dy)) for t, (dx, dy) in zip(ids, d, strict=True)}
        s, removed = shift_tracks(s, offsets)
        record["jitter_boxes"] = {"px": aug.jitter_boxes, "offsets": {t: list(v) for t, v in offsets.items()},
                                  "boxes_removed": removed}
    if aug.flip_daynight:
        record["flip_daynight"] = {"night": [s.night, 1 - s.night]}
        s = replace(s, night=1 - s.night)
    if record:
        s = replace(s, source=f"{scenario.source} augmented: {', '.join(record)}")
    return s, record


def _rng(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), _TAGS[name]]))
