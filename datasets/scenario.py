"""Scenarios: the conditioning of a video over time (day/night, crowdedness, per-frame box tracks).

A scenario is what a rollout is conditioned on and, because every generated frame's boxes come from it, the
labels of the generated video. It is a clip annotation without a video: the same `Box` type, the same pixel
frame (`width` x `height`, image frame: x right, y down, xyxy) and the same validation (`parse_frame_boxes`:
`parse_box` per box, a track id once per frame).

JSON (`format: "drivesim-scenario"`, documented in the README section "Scenarios")::

    {"format": "drivesim-scenario", "format_version": 1,
     "fps": 10.0, "width": 256, "height": 128, "night": 0, "crowdedness": 3, "source": "...",
     "num_frames": 2,                                   # optional; must equal len(frames) when given
     "frames": [{"index": 0, "boxes": [{"track_id": "7", "class": "car", "x1": 10, "y1": 60, "x2": 70,
                                        "y2": 100}]},
                {"index": 1, "boxes": []}]}

Every frame from 0 to num_frames - 1 must be listed, in order (`index` is optional but checked when present, so
a file with a frame missing is an error, not a silently shorter scenario). Track ids are unique within a frame.
Boxes that overlap the image but stick out are clipped (noted in `Scenario.notes`); NaN/inf, non-positive area,
fully outside the image, or an unknown class are errors naming the file and the field.

One module because it is the scenario format's single definition: reader, writer and the time transforms
(resample, extend, window) that keep its invariants.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from drivesim.bbox_conditioning.boxes import PackedBoxes, pack_boxes
from drivesim.bbox_conditioning.classes import CLASS_TO_ID
from drivesim.datasets.clips import Box, ClipAnnotation, parse_frame_boxes, read_json, write_json_atomic

from drivesim.errors import ConfigError, DataError
from drivesim.rollout import MAX_FRAMES as _MAX_ROLLOUT_FRAMES
from drivesim.rollout import MAX_MINUTES as _MAX_ROLLOUT_MINUTES
from drivesim.types import Conditioning

FORMAT = "drivesim-scenario"
FORMAT_VERSION = 1
EXTEND_MODES = ("loop", "chain")
RESAMPLE_METHODS = ("linear", "nearest")
# a scenario may run past the rollout it conditions (its last prediction clip); beyond this its frame lists alone
# would not fit in memory
MAX_FRAMES = 2 * _MAX_ROLLOUT_FRAMES
MAX_MINUTES = 2 * _MAX_ROLLOUT_MINUTES  # `scenario from-clip --minutes`, checked before any clip is read


@dataclass
class Scenario:
    """Conditioning over time. `frames[k]` is the box list of frame k (pixels of a `width` x `height` frame).

    Attributes:
        fps: frames per second (> 0).
        width, height: pixel frame of the boxes (> 0).
        night: 1 = night, 0 = day.
        crowdedness: number of vehicles (clip-level count, as in the clip format).
        frames: per-frame boxes; track ids unique within a frame.
        source: free text (where the scenario came from).
        notes: non-fatal findings while loading (boxes clipped to the image).
    """

    fps: float
    width: int
    height: int
    night: int
    crowdedness: int
    frames: list[list[Box]]
    source: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def num_frames(self) -> int:
        return len(self.frames)

    @property
    def duration_s(self) -> float:
        """Seconds covered: each frame lasts 1 / fps."""
        return self.num_frames / self.fps

    @classmethod
    def from_clip(cls, annotation: ClipAnnotation) -> Scenario:
        """The scenario of a real (or generated) clip: its labels, frame rate and pixel frame. Every box of a
        scenario is asked for, so a generated clip's `conditioned` marks are not carried over."""
        return cls(fps=float(annotation.fps), width=annotation.width, height=annotation.height,
                   night=annotation.night, crowdedness=annotation.crowdedness,
                   frames=[[b if b.conditioned else replace(b, conditioned=True) for b in boxes]
                           for boxes in annotation.frames],
                   source=f"clip {annotation.clip_id} ({annotation.source})")

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "fps": self.fps,
            "width": self.width,
            "height": self.height,
            "night": self.night,
            "crowdedness": self.crowdedness,
            "source": self.source,
            "num_frames": self.num_frames,
            "frames": [{"index": k, "boxes": [b.to_json() for b in boxes]} for k, boxes in enumerate(self.frames)],
        }

    def track_ids(self) -> list[str]:
        """Every track id, in order of first appearance."""
        return list(track_id_map(self))


# --------------------------------------------------------------------------------------------------------------
# reading / writing
# --------------------------------------------------------------------------------------------------------------


def _number(data: dict, key: str, path: Path, integer: bool = False) -> Any:
    if key not in data:
        raise DataError(f"{path}: {key}: missing")
    v = data[key]
    ok = (int,) if integer else (int, float)
    if isinstance(v, bool) or not isinstance(v, ok):
        raise DataError(f"{path}: {key}: expected {'an integer' if integer else 'a number'}, got {v!r}")
    return v


def scenario_from_json(data: Any, path: str | Path) -> Scenario:
    """Validate a parsed scenario JSON (schema in the module docstring).

    Raises:
        DataError: one line naming `path` and the first invalid field.
    """
    path = Path(path)
    if not isinstance(data, dict):
        raise DataError(f"{path}: <root>: expected an object")
    if data.get("format") != FORMAT:
        raise DataError(f"{path}: format: expected {FORMAT!r}, got {data.get('format')!r}")
    version = _number(data, "format_version", path, integer=True)
    if not 1 <= version <= FORMAT_VERSION:
        raise DataError(f"{path}: format_version: {version} is not supported (this drivesim reads "
                        f"1..{FORMAT_VERSION})")
    fps = float(_number(data, "fps", path))
    if not (math.isfinite(fps) and fps > 0):
        raise DataError(f"{path}: fps: must be a positive finite number, got {data['fps']!r}")
    width = _number(data, "width", path, integer=True)
    height = _number(data, "height", path, integer=True)
    for key, v in (("width", width), ("height", height)):
        if v <= 0:
            raise DataError(f"{path}: {key}: must be a positive number of pixels, got {v}")
    night = _number(data, "night", path, integer=True)
    if night not in (0, 1):
        raise DataError(f"{path}: night: must be 0 or 1, got {night}")
    crowdedness = _number(data, "crowdedness", path, integer=True)
    if crowdedness < 0:
        raise DataError(f"{path}: crowdedness: must be >= 0, got {crowdedness}")
    source = data.get("source", "")
    if not isinstance(source, str):
        raise DataError(f"{path}: source: expected a string, got {source!r}")
    if "frames" not in data:
        raise DataError(f"{path}: frames: missing")
    raw_frames = data["frames"]
    if not isinstance(raw_frames, list):
        raise DataError(f"{path}: frames: expected a list, got {type(raw_frames).__name__}")
    if not raw_frames:
        raise DataError(f"{path}: frames: empty (a scenario needs at least one frame)")
    if "num_frames" in data:
        n = data["num_frames"]
        if isinstance(n, bool) or not isinstance(n, int) or n != len(raw_frames):
            raise DataError(f"{path}: num_frames: says {n!r} but frames has {len(raw_frames)} entries "
                            "(missing frames?)")
    frames: list[list[Box]] = []
    notes: list[str] = []
    for k, raw in enumerate(raw_frames):
        if not isinstance(raw, dict):
            raise DataError(f"{path}: frames[{k}]: expected an object")
        index = raw.get("index", k)
        if index != k or isinstance(index, bool):
            raise DataError(f"{path}: frames[{k}].index: expected {k}, got {index!r} (frames must be listed "
                            "0, 1, 2, ... without gaps)")
        if "boxes" not in raw:
            raise DataError(f"{path}: frames[{k}].boxes: missing")
        raw_boxes = raw["boxes"]
        if not isinstance(raw_boxes, list):
            raise DataError(f"{path}: frames[{k}].boxes: expected a list")
        boxes, frame_notes = parse_frame_boxes(raw_boxes, width, height, path, k)
        notes += frame_notes
        frames.append(boxes)
    return Scenario(fps, width, height, night, crowdedness, frames, source, notes)


def load_scenario(path: str | Path) -> Scenario:
    """Read and validate a scenario JSON file.

    Raises:
        DataError: missing file, invalid JSON, or an invalid field (one line naming the file and the field).
    """
    path = Path(path)
    return scenario_from_json(read_json(path, "scenario"), path)


def save_scenario(scenario: Scenario, path: str | Path) -> Path:
    """Write `scenario` as JSON atomically (temp file + rename); the parent folder is created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, scenario.to_json())
    return path


# --------------------------------------------------------------------------------------------------------------
# time operations
# --------------------------------------------------------------------------------------------------------------


def _lerp_box(a: Box, b: Box, w: float) -> Box:
    return Box(a.track_id, a.cls, a.x1 + (b.x1 - a.x1) * w, a.y1 + (b.y1 - a.y1) * w,
               a.x2 + (b.x2 - a.x2) * w, a.y2 + (b.y2 - a.y2) * w)


def resample(scenario: Scenario, fps: float, method: str = "linear") -> Scenario:
    """The scenario at another frame rate, covering the same duration.

    Target frame j is at time j / fps, i.e. at source position s = j * src_fps / fps (in source frames);
    the target has `max(1, floor(num_frames * fps / src_fps + 0.5))` frames. Positions past the last source frame
    (the last source frame's interval) hold on to the last frame.

    - "nearest": frame j is a copy of source frame round(s) (ties round half up).
    - "linear": the set of tracks (and each one's class) is that of the nearest source frame, so tracks appear
      and disappear at the same instants as with "nearest"; a track also present in the other neighbouring
      source frame (floor(s) / ceil(s)) has its box linearly interpolated between the two, one present in only
      one of them keeps that box. Interpolated boxes are convex combinations of valid boxes, so they stay inside
      the image with positive area.

    Raises:
        ValueError: fps not positive/finite, unknown method.
    """
    if not (math.isfinite(fps) and fps > 0):
        raise ValueError(f"fps must be a positive finite number, got {fps}")
    if method not in RESAMPLE_METHODS:
        raise ValueError(f"method must be one of {RESAMPLE_METHODS}, got {method!r}")
    n = scenario.num_frames
    m = max(1, math.floor(n * fps / scenario.fps + 0.5))
    frames: list[list[Box]] = []
    for j in range(m):
        s = min(j * scenario.fps / fps, n - 1)
        lo = math.floor(s)
        hi = min(lo + 1, n - 1)
        frac = s - lo
        nearest = hi if frac >= 0.5 else lo
        if method == "nearest" or hi == lo or frac == 0.0:
            frames.append(list(scenario.frames[nearest]))
            continue
        other = {b.track_id: b for b in scenario.frames[lo if nearest == hi else hi]}
        out = []
        for b in scenario.frames[nearest]:
            o = other.get(b.track_id)
            if o is None:
                out.append(b)
            else:
                a_box, b_box = (o, b) if nearest == hi else (b, o)
                out.append(replace(_lerp_box(a_box, b_box, frac), cls=b.cls))
        frames.append(out)
    return replace(scenario, fps=float(fps), frames=frames, notes=[],
                   source=f"{scenario.source} resampled {scenario.fps:g} -> {fps:g} fps ({method})")


def _id_scheme(segments: Sequence[Scenario]):
    """A function (segment index, track id) -> new track id, unique across segments.

    Integer ids (the clip formats' usual case) are offset by `segment * stride`, stride = 1 + the largest id of
    any segment, so they stay integers; anything else is namespaced as "segment:id".
    """
    ids = {b.track_id for s in segments for boxes in s.frames for b in boxes}
    if all(i.isdigit() for i in ids):
        stride = 1 + max((int(i) for i in ids), default=0)
        return lambda seg, tid: str(int(tid) + seg * stride)
    return lambda seg, tid: f"{seg}:{tid}"


def extend(scenario: Scenario | Sequence[Scenario], num_frames: int, mode: str = "loop") -> Scenario:
    """A scenario of exactly `num_frames` frames, longer than any clip, built from clips' scenarios.

    - "loop": replay one scenario again and again (a hard restart: no cross-fade; the frame after the last one is
      the first one again).
    - "chain": concatenate several scenarios in order, starting again at the first when they run out.

    Each replay/segment gets its own track ids (offset per segment, see `_id_scheme`) so a track id never
    refers to two different objects; the last segment is cut to fit. `night` and the pixel frame must agree
    across segments; crowdedness is the largest segment's (the model's label is a clip-level vehicle count).

    Raises:
        ValueError: num_frames < 1, unknown mode, loop with several scenarios, no scenario, or segments whose
            fps / width / height / night differ (resample first).
        ConfigError: more than MAX_FRAMES frames, refused before the frame lists are built (`scenario from-clip
            --minutes 1e9` ran out of memory).
    """
    segments = [scenario] if isinstance(scenario, Scenario) else list(scenario)
    if mode not in EXTEND_MODES:
        raise ValueError(f"mode must be one of {EXTEND_MODES}, got {mode!r}")
    if not segments:
        raise ValueError("extend: no scenario given")
    if mode == "loop" and len(segments) != 1:
        raise ValueError(f"extend: loop replays one scenario, got {len(segments)} (use mode='chain')")
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    first = segments[0]
    if num_frames > MAX_FRAMES:
        minutes = f"{num_frames / first.fps / 60:.6g}".replace("e+0", "e").replace("e+", "e")
        raise ConfigError(f"scenario: {num_frames} frames ({minutes} minutes at {first.fps:g} fps) exceeds the limit "
                          f"of {MAX_FRAMES} frames (twice the longest rollout)")
    for i, s in enumerate(segments[1:], 1):
        for attr in ("fps", "width", "height", "night"):
            if getattr(s, attr) != getattr(first, attr):
                raise ValueError(f"extend: scenario {i} has {attr}={getattr(s, attr)!r}, scenario 0 has "
                                 f"{getattr(first, attr)!r} (resample / pick matching clips first)")
    new_id = _id_scheme(segments)
    frames: list[list[Box]] = []
    seg = 0
    while len(frames) < num_frames:
        src = segments[seg % len(segments)]
        for boxes in src.frames[: num_frames - len(frames)]:
            frames.append([replace(b, track_id=new_id(seg, b.track_id)) for b in boxes])
        seg += 1
    what = f"looped x{seg}" if mode == "loop" else f"chain of {seg} segment(s) from {len(segments)} scenario(s)"
    return Scenario(first.fps, first.width, first.height, first.night, max(s.crowdedness for s in segments),
                    frames, source=f"{first.source} {what}")


def rescale(scenario: Scenario, width: int, height: int) -> Scenario:
    """The scenario with its boxes moved into a `width` x `height` pixel frame (x scaled by width / scenario.width,
    y by height / scenario.height); the same object when the frame is unchanged.

    A rollout at a resolution other than the scenario's writes the scenario's boxes as the labels of its frames, so
    both must share one pixel frame (the conditioning itself is normalised and does not change).

    Raises:
        ValueError: width or height < 1.
    """
    if width < 1 or height < 1:
        raise ValueError(f"rescale: width/height must be >= 1, got {width}x{height}")
    if (scenario.width, scenario.height) == (width, height):
        return scenario
    sx, sy = width / scenario.width, height / scenario.height
    frames = [[replace(b, x1=b.x1 * sx, y1=b.y1 * sy, x2=b.x2 * sx, y2=b.y2 * sy) for b in boxes]
              for boxes in scenario.frames]
    return replace(scenario, width=width, height=height, frames=frames)


def window(scenario: Scenario, start: int, length: int) -> Scenario:
    """Frames [start, start + length) as a scenario (track ids unchanged).

    Raises:
        ValueError: start < 0, length < 1 or the window runs past the last frame.
    """
    if start < 0 or length < 1 or start + length > scenario.num_frames:
        raise ValueError(f"window [{start}, {start + length}) is not inside the scenario's "
                         f"{scenario.num_frames} frames")
    return replace(scenario, frames=[list(b) for b in scenario.frames[start:start + length]], notes=[])


# --------------------------------------------------------------------------------------------------------------
# tensors
# --------------------------------------------------------------------------------------------------------------


def track_id_map(scenario: Scenario) -> dict[str, int]:
    """int ids 0, 1, 2, ... for the scenario's track ids in order of first appearance (stable for all windows)."""
    ids: dict[str, int] = {}
    for boxes in scenario.frames:
        for b in boxes:
            ids.setdefault(b.track_id, len(ids))
    return ids


def pack(scenario: Scenario, start: int, length: int, max_boxes: int) -> PackedBoxes:
    """Packed boxes of frames [start, start + length) (see `drivesim.bbox_conditioning.boxes.pack_boxes`).

    Returns:
        PackedBoxes: boxes (length, n, 4) float32 normalised xyxy in [0, 1], classes (length, n) int64, mask
        (length, n) bool, track_ids (length, n) int64 from `track_id_map` of the whole scenario (so a track keeps
        its id across windows; -1 padding); n = max_boxes, the largest boxes kept.

    Raises:
        ValueError: window outside the scenario, max_boxes < 1.
    """
    ids = track_id_map(scenario)
    win = window(scenario, start, length)
    frames = [[(ids[b.track_id], CLASS_TO_ID[b.cls], b.x1, b.y1, b.x2, b.y2) for b in boxes] for boxes in win.frames]
    return pack_boxes(frames, scenario.width, scenario.height, max_boxes)


def to_tensors(scenario: Scenario, start: int, length: int, max_boxes: int) -> Conditioning:
    """The conditioning of frames [start, start + length) for a batch of one video.

    Returns:
        Conditioning with boxes (1, length, max_boxes, 4) float32 normalised xyxy (image frame), classes
        (1, length, max_boxes) int64, box_mask (1, length, max_boxes) bool, night (1,) int64, crowdedness (1,)
        int64. Track ids (for labels / tracking) come from `pack` with the same arguments.

    Raises:
        ValueError: window outside the scenario, max_boxes < 1.
    """
    labels = {"night": [scenario.night], "crowdedness": [scenario.crowdedness]}
    return Conditioning.from_batch(pack(scenario, start, length, max_boxes).as_batch() | labels, "scenario")


def summary(scenario: Scenario) -> dict[str, Any]:
    """Statistics for `drivesim scenario info`."""
    counts = np.array([len(b) for b in scenario.frames])
    classes: dict[str, int] = {}
    for boxes in scenario.frames:
        for b in boxes:
            classes[b.cls] = classes.get(b.cls, 0) + 1
    return {"fps": scenario.fps, "width": scenario.width, "height": scenario.height,
            "num_frames": scenario.num_frames, "duration_s": round(scenario.duration_s, 3),
            "night": scenario.night, "crowdedness": scenario.crowdedness, "tracks": len(track_id_map(scenario)),
            "boxes_per_frame_mean": round(float(counts.mean()), 3), "boxes_per_frame_max": int(counts.max()),
            "empty_frames": int((counts == 0).sum()), "classes": dict(sorted(classes.items())),
            "source": scenario.source}
