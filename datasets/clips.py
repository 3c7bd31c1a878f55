"""The drivesim clip format: one folder per dataset, one mp4 + one JSON annotation per clip, a manifest.

Layout::

    DATASET/
      manifest.json          {"format": "drivesim-clips", "format_version": 1, "source": ..., "command": ...,
                              "seed": ..., "clips": [{"id", "video", "annotation", "split"}]}
      <id>.mp4               H.264 (yuv420p), plays in browsers; RGB frames of `width` x `height`
      <id>.json              {"format_version": 1, "id", "fps", "width", "height", "num_frames", "night" (0/1),
                              "crowdedness" (vehicles in the clip), "source",
                              "frames": [{"index": k, "boxes": [{"track_id", "class", "x1", "y1", "x2", "y2"}]}]}
                             a box of generated video may add "conditioned": false (see `Box`)

Boxes are in pixels of that video, image frame (x right, y down, origin at the top-left corner of the top-left
pixel), xyxy with x1 < x2, y1 < y2. Readers validate everything: a box that overlaps the image but sticks out is
clipped to it (and reported in `ClipAnnotation.notes`); a box that is NaN/inf, has non-positive area or lies fully
outside the image is an error naming the file and field.

One module because it is the format's single definition: the data model, the parsers and the writers that must
round-trip with them.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from drivesim.bbox_conditioning.boxes import BoxTuple, PackedBoxes, pack_boxes
from drivesim.bbox_conditioning.classes import CLASS_TO_ID
from drivesim.datasets.video import iter_video_frames, read_video, write_video  # noqa: F401  (re-exported)

from drivesim.atomic import atomic_path, write_bytes_atomic, write_json_atomic  # noqa: F401  (re-exported)
from drivesim.errors import DataError

FORMAT = "drivesim-clips"
FORMAT_VERSION = 1
SPLITS = ("train", "val")


@dataclass(frozen=True)
class Box:
    """One 2D box in pixels of its video (image frame, xyxy).

    `conditioned` is False only in the labels of generated video, for a box the model was not conditioned on (a
    frame with more boxes than the model's `max_boxes` slots is conditioned on the largest ones): the frame may or
    may not show that object, so exports make it an ignore region, never an object label.
    """

    track_id: str
    cls: str
    x1: float
    y1: float
    x2: float
    y2: float
    conditioned: bool = True

    def to_json(self) -> dict[str, Any]:
        out = {"track_id": self.track_id, "class": self.cls, "x1": self.x1, "y1": self.y1, "x2": self.x2,
               "y2": self.y2}
        if not self.conditioned:  # written only when False: real clips and scenarios never carry it
            out["conditioned"] = False
        return out


@dataclass
class ClipAnnotation:
    """A clip's labels. `frames[k]` is the list of boxes of frame k."""

    clip_id: str
    fps: float
    width: int
    height: int
    night: int
    crowdedness: int
    source: str
    frames: list[list[Box]]
    notes: list[str] = field(default_factory=list)  # non-fatal findings (e.g. boxes clipped to the image)

    @property
    def num_frames(self) -> int:
        return len(self.frames)

    def to_json(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "id": self.clip_id,
            "fps": self.fps,
            "width": self.width,
            "height": self.height,
            "num_frames": self.num_frames,
            "night": self.night,
            "crowdedness": self.crowdedness,
            "source": self.source,
            "frames": [{"index": k, "boxes": [b.to_json() for b in boxes]} for k, boxes in enumerate(self.frames)],
        }


@dataclass(frozen=True)
class ClipEntry:
    """One manifest row, with absolute paths."""

    clip_id: str
    video: Path
    annotation: Path
    split: str


@dataclass
class Manifest:
    root: Path
    clips: list[ClipEntry]
    meta: dict[str, Any]

    def split(self, name: str) -> list[ClipEntry]:
        return [c for c in self.clips if c.split == name]


# --------------------------------------------------------------------------------------------------------------
# annotations
# --------------------------------------------------------------------------------------------------------------


def _require(data: dict, key: str, types: type | tuple[type, ...], path: Path, where: str = "") -> Any:
    if key not in data:
        raise DataError(f"{path}: {where}{key}: missing")
    value = data[key]
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise DataError(f"{path}: {where}{key}: expected a number, got {value!r}")
    if not isinstance(value, types):
        raise DataError(f"{path}: {where}{key}: expected {_type_words(types)}, got {value!r}")
    return value


_TYPE_WORDS = {int: "an integer", float: "a number", str: "a string", list: "a list", dict: "an object",
               bool: "true or false"}


def _type_words(types: type | tuple[type, ...]) -> str:
    """What a user reads instead of Python's type reprs: (int, float) -> "a number", str -> "a string"."""
    kinds = types if isinstance(types, tuple) else (types,)
    if set(kinds) <= {int, float}:
        return "a number" if float in kinds else "an integer"
    return " or ".join(_TYPE_WORDS.get(k, k.__name__) for k in kinds)


def parse_box(raw: Any, width: int, height: int, path: Path, where: str) -> tuple[Box, str | None]:
    """Validate one box dict; clip it to the image if it sticks out.

    Returns:
        (box, note): note says what was clipped, or None.

    Raises:
        DataError: missing field, unknown class, NaN/inf coordinate, non-positive area, or a box that lies
            entirely outside the `width` x `height` image.
    """
    if not isinstance(raw, dict):
        raise DataError(f"{path}: {where}: expected an object, got {raw!r}")
    track_id = raw.get("track_id")
    if track_id is None or not isinstance(track_id, (str, int)) or isinstance(track_id, bool):
        raise DataError(f"{path}: {where}.track_id: missing or not a string/integer")
    cls = _require(raw, "class", str, path, f"{where}.")
    if cls not in CLASS_TO_ID:
        raise DataError(f"{path}: {where}.class: unknown class {cls!r} (known: {', '.join(CLASS_TO_ID)})")
    coords = []
    for k in ("x1", "y1", "x2", "y2"):
        v = _require(raw, k, (int, float), path, f"{where}.")
        if not math.isfinite(v):
            raise DataError(f"{path}: {where}.{k}: not finite ({v})")
        coords.append(float(v))
    x1, y1, x2, y2 = coords
    if x2 <= x1 or y2 <= y1:
        raise DataError(f"{path}: {where}: non-positive area (x1={x1}, y1={y1}, x2={x2}, y2={y2})")
    cx1, cy1, cx2, cy2 = max(x1, 0.0), max(y1, 0.0), min(x2, float(width)), min(y2, float(height))
    if cx2 <= cx1 or cy2 <= cy1:
        raise DataError(f"{path}: {where}: box lies outside the {width}x{height} image ({x1}, {y1}, {x2}, {y2})")
    conditioned = raw.get("conditioned", True)
    if not isinstance(conditioned, bool):
        raise DataError(f"{path}: {where}.conditioned: expected true or false, got {conditioned!r}")
    note = None
    if (cx1, cy1, cx2, cy2) != (x1, y1, x2, y2):
        note = f"{path}: {where}: clipped to the image ({x1}, {y1}, {x2}, {y2}) -> ({cx1}, {cy1}, {cx2}, {cy2})"
    return Box(str(track_id), cls, cx1, cy1, cx2, cy2, conditioned), note


def parse_frame_boxes(raw_boxes: list, width: int, height: int, path: Path, k: int,
                      problems: list[str] | None = None, where: str | None = None) -> tuple[list[Box], list[str]]:
    """The boxes of frame `k` (clip annotations, scenarios and sample-image's boxes.json share this one rule
    set): each validated by `parse_box`, and a track id at most once per frame (a track id names one object).
    `where` is the field path errors name (default `frames[k].boxes`).

    Returns:
        (boxes, notes of boxes clipped to the image).

    Raises:
        DataError: the first bad box (naming `path` and `frames[k].boxes[j]`), unless `problems` is given: then
            each bad box's error line is appended there and the box dropped.
    """
    boxes: list[Box] = []
    notes: list[str] = []
    seen: set[str] = set()
    for j, rb in enumerate(raw_boxes):
        field = f"{where or f'frames[{k}].boxes'}[{j}]"
        try:
            box, note = parse_box(rb, width, height, path, field)
            if box.track_id in seen:
                raise DataError(f"{path}: {field}.track_id: duplicate track id {box.track_id!r} in this frame")
        except DataError as e:
            if problems is None:
                raise
            problems.append(str(e))
            continue
        seen.add(box.track_id)
        boxes.append(box)
        if note:
            notes.append(note)
    return boxes, notes


def annotation_from_json(data: Any, path: Path, problems: list[str] | None = None) -> ClipAnnotation:
    """Validate a parsed annotation JSON (see module docstring). Raises DataError naming `path` and the field.

    Args:
        problems: when given, invalid boxes do not raise: each one's error line is appended here and the box is
            dropped, so `drivesim data validate` can report every bad box of a file. Errors in clip-level fields
            still raise.
    """
    if not isinstance(data, dict):
        raise DataError(f"{path}: <root>: expected an object")
    version = _require(data, "format_version", int, path)
    if version > FORMAT_VERSION:
        raise DataError(f"{path}: format_version: {version} is newer than this drivesim ({FORMAT_VERSION})")
    fps = float(_require(data, "fps", (int, float), path))
    if not (math.isfinite(fps) and fps > 0):
        raise DataError(f"{path}: fps: must be a positive number, got {fps}")
    width = _require(data, "width", int, path)
    height = _require(data, "height", int, path)
    if width <= 0 or height <= 0:
        raise DataError(f"{path}: width/height: must be positive, got {width}x{height}")
    night = _require(data, "night", int, path)
    if night not in (0, 1):
        raise DataError(f"{path}: night: must be 0 or 1, got {night}")
    crowdedness = _require(data, "crowdedness", int, path)
    if crowdedness < 0:
        raise DataError(f"{path}: crowdedness: must be >= 0, got {crowdedness}")
    source = _require(data, "source", str, path)
    raw_frames = _require(data, "frames", list, path)
    if not raw_frames:
        raise DataError(f"{path}: frames: empty")
    num_frames = data.get("num_frames", len(raw_frames))
    if num_frames != len(raw_frames):
        raise DataError(f"{path}: num_frames: says {num_frames} but frames has {len(raw_frames)} entries")
    frames: list[list[Box]] = []
    notes: list[str] = []
    for k, raw in enumerate(raw_frames):
        if not isinstance(raw, dict):
            raise DataError(f"{path}: frames[{k}]: expected an object")
        index = raw.get("index", k)
        if index != k:
            raise DataError(f"{path}: frames[{k}].index: expected {k}, got {index!r}")
        raw_boxes = _require(raw, "boxes", list, path, f"frames[{k}].")
        boxes, frame_notes = parse_frame_boxes(raw_boxes, width, height, path, k, problems)
        notes += frame_notes
        frames.append(boxes)
    clip_id = check_clip_id(data.get("id", path.stem), path, "id")
    return ClipAnnotation(clip_id, fps, width, height, night, crowdedness, source, frames, notes)


def read_json(path: str | Path, what: str) -> Any:
    """Parse a JSON file that the user handed us.

    Args:
        what: the field name used in errors ("annotation", "manifest", "scenario", ...).

    Raises:
        DataError: `"{path}: {what}: file not found"` or `"{path}: {what}: not valid JSON (...)"`.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: {what}: file not found")
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: {what}: not valid JSON ({e})") from None


def read_annotation(path: str | Path, problems: list[str] | None = None) -> ClipAnnotation:
    """Read and validate one clip annotation JSON. Raises DataError naming the file and field.

    `problems`: see `annotation_from_json` (collect bad boxes instead of raising on the first).
    """
    path = Path(path)
    return annotation_from_json(read_json(path, "annotation"), path, problems)


def write_clip(dataset_dir: str | Path, frames: np.ndarray, annotation: ClipAnnotation) -> tuple[Path, Path]:
    """Write one clip (`<id>.mp4` + `<id>.json`) into `dataset_dir`.

    Args:
        frames: (t, h, w, 3) uint8 RGB, t == annotation.num_frames, (h, w) == (annotation.height, annotation.width).

    Returns:
        (video path, annotation path).

    Raises:
        ValueError: frames disagree with the annotation.
    """
    t, h, w, _ = frames.shape
    if (t, h, w) != (annotation.num_frames, annotation.height, annotation.width):
        raise ValueError(f"frames {t}x{h}x{w} disagree with annotation {annotation.num_frames}x"
                         f"{annotation.height}x{annotation.width}")
    root = Path(dataset_dir)
    root.mkdir(parents=True, exist_ok=True)
    video = root / f"{annotation.clip_id}.mp4"
    ann = root / f"{annotation.clip_id}.json"
    write_video(video, frames, annotation.fps)
    write_json_atomic(ann, annotation.to_json())
    return video, ann


def write_manifest(dataset_dir: str | Path, clips: list[tuple[str, str]], clip_meta: dict[str, dict] | None = None,
                   **meta: Any) -> Path:
    """Write `manifest.json` listing `(clip_id, split)` pairs; `meta` (source, command, seed...) is recorded, and
    `clip_meta[clip_id]` (e.g. a generated clip's source and seed) is added to that clip's row (readers ignore it).
    """
    root = Path(dataset_dir)
    for _clip_id, split in clips:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    extra = clip_meta or {}
    data = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        **meta,
        "clips": [_manifest_row(c, s, extra.get(c, {})) for c, s in clips],
    }
    write_json_atomic(root / "manifest.json", data)
    return root / "manifest.json"


def _manifest_row(clip_id: str, split: str, extra: dict) -> dict[str, Any]:
    row = {"id": clip_id, "video": f"{clip_id}.mp4", "annotation": f"{clip_id}.json", "split": split}
    return row | {k: v for k, v in extra.items() if k not in row}  # extras never redirect a clip's files


CLIP_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
"""A clip id becomes a file name (export, encode, rollout, generate): letters, digits, '.', '_', '-', at most 128
characters, not starting with '.', so no id can name a path outside the output folder."""


def check_clip_id(clip_id: Any, path: Path, field: str) -> str:
    """Return `clip_id` if it is a safe file-name stem (`CLIP_ID_RE`).

    Raises:
        DataError: anything else (path separators, "..", empty, too long), naming `path` and `field`.
    """
    if not isinstance(clip_id, str) or not CLIP_ID_RE.fullmatch(clip_id):
        raise DataError(f"{path}: {field}: clip id {clip_id!r} is not a safe file name (letters, digits, '.', '_', "
                        "'-'; no path separators; not starting with '.')")
    return clip_id


def read_manifest(dataset_dir: str | Path) -> Manifest:
    """Read and validate `DATASET/manifest.json` (paths resolved; files are not opened here).

    Raises:
        DataError: missing/invalid manifest, unknown split, duplicate or unsafe id (`check_clip_id`), empty dataset.
    """
    root = Path(dataset_dir)
    path = root / "manifest.json"
    if not root.is_dir():
        raise DataError(f"{root}: dataset: folder not found")
    data = read_json(path, "manifest")
    if not isinstance(data, dict):
        raise DataError(f"{path}: <root>: expected an object")
    if data.get("format") != FORMAT:
        raise DataError(f"{path}: format: expected {FORMAT!r}, got {data.get('format')!r}")
    version = _require(data, "format_version", int, path)
    if version > FORMAT_VERSION:
        raise DataError(f"{path}: format_version: {version} is newer than this drivesim ({FORMAT_VERSION})")
    raw_clips = _require(data, "clips", list, path)
    if not raw_clips:
        raise DataError(f"{path}: clips: empty dataset")
    clips, seen = [], set()
    for i, raw in enumerate(raw_clips):
        if not isinstance(raw, dict):
            raise DataError(f"{path}: clips[{i}]: expected an object")
        cid = check_clip_id(_require(raw, "id", str, path, f"clips[{i}]."), path, f"clips[{i}].id")
        if cid in seen:
            raise DataError(f"{path}: clips[{i}].id: duplicate id {cid!r}")
        seen.add(cid)
        split = _require(raw, "split", str, path, f"clips[{i}].")
        if split not in SPLITS:
            raise DataError(f"{path}: clips[{i}].split: must be one of {SPLITS}, got {split!r}")
        video = root / _require(raw, "video", str, path, f"clips[{i}].")
        ann = root / _require(raw, "annotation", str, path, f"clips[{i}].")
        clips.append(ClipEntry(cid, video, ann, split))
    meta = {k: v for k, v in data.items() if k != "clips"}
    return Manifest(root, clips, meta)


def load_clip(entry: ClipEntry) -> tuple[np.ndarray, ClipAnnotation]:
    """Decode a clip's video and read its annotation, checking that they agree.

    Returns:
        frames (t, h, w, 3) uint8 RGB and the validated annotation.

    Raises:
        DataError: unreadable/truncated video, or frame count / size disagreeing with the annotation.
    """
    ann = read_annotation(entry.annotation)
    frames = read_video(entry.video)
    check_video_agrees(entry, ann, frames)
    return frames, ann


def check_video_agrees(entry: ClipEntry, ann: ClipAnnotation, frames: np.ndarray) -> None:
    """Raise DataError (naming the video and the field) if decoded frames disagree with the annotation."""
    t, h, w, _ = frames.shape
    if (h, w) != (ann.height, ann.width):
        raise DataError(f"{entry.video}: resolution: video is {w}x{h} but {entry.annotation.name} says "
                        f"{ann.width}x{ann.height}")
    if t != ann.num_frames:
        raise DataError(f"{entry.video}: num_frames: video has {t} frames but {entry.annotation.name} has "
                        f"{ann.num_frames} (truncated video?)")


def copy_dataset(src: str | Path, dst: str | Path) -> None:
    """Copy a dataset folder (used by tests and exports); `dst` must not exist."""
    shutil.copytree(src, dst)


def track_id_map(annotation: ClipAnnotation) -> dict[str, int]:
    """Stable int64 track ids for a clip: each string track id gets 0, 1, 2, ... in order of first appearance.

    Ids are only meaningful within one clip (the models use them to tell tracks apart, never across clips).
    """
    ids: dict[str, int] = {}
    for boxes in annotation.frames:
        for b in boxes:
            ids.setdefault(b.track_id, len(ids))
    return ids


def pack_annotation(annotation: ClipAnnotation, max_boxes: int) -> PackedBoxes:
    """All frames' boxes of a clip as padded arrays (see `drivesim.bbox_conditioning.boxes.pack_boxes`).

    Returns:
        PackedBoxes: boxes (T, n, 4) float32 normalised xyxy, classes (T, n) int64, mask (T, n) bool,
        track_ids (T, n) int64 from `track_id_map` (-1 padding); n = max_boxes, largest boxes kept.
    """
    return pack_boxes(box_tuples(annotation), annotation.width, annotation.height, max_boxes)


def box_tuples(annotation: ClipAnnotation) -> list[list[BoxTuple]]:
    """Per frame, every box as `(track id from track_id_map, class id, x1, y1, x2, y2)` in pixels (what
    `pack_boxes` and `drivesim.bbox_conditioning.latent_frames.group_boxes` take)."""
    ids = track_id_map(annotation)
    return [[(ids[b.track_id], CLASS_TO_ID[b.cls], b.x1, b.y1, b.x2, b.y2) for b in boxes]
            for boxes in annotation.frames]


def write_synthetic_dataset(root: str | Path, clips: int = 2, frames: int = 4, size: tuple[int, int] = (32, 64),
                            fps: float = 10.0, seed: int = 0, splits: tuple[str, ...] | None = None) -> Manifest:
    """A tiny valid dataset for tests: each clip is a grey road with one or two moving coloured rectangles, and
    each rectangle is annotated with exactly the pixels it covers (so box/pixel consistency can be checked).

    Args:
        root: folder to create/fill.
        clips: number of clips; splits default to alternating train/val (clip 0 train).
        frames: frames per clip. size: (h, w), both even.

    Returns:
        the manifest as read back.
    """
    rng = np.random.default_rng(seed)
    h, w = size
    rows = []
    for c in range(clips):
        video = np.full((frames, h, w, 3), 90, np.uint8)
        video[:, h // 2:] = 60  # "road" below the horizon
        per_frame: list[list[Box]] = [[] for _ in range(frames)]
        num_objects = 1 + c % 2
        for o in range(num_objects):
            bw, bh = int(rng.integers(w // 8, w // 4)), int(rng.integers(h // 6, h // 3))
            x0, y0 = int(rng.integers(0, w - bw - frames)), int(rng.integers(0, h - bh))
            colour = rng.integers(150, 256, 3).astype(np.uint8)
            cls = ("car", "truck", "pedestrian")[(c + o) % 3]
            for k in range(frames):
                x = x0 + k  # one pixel to the right per frame
                video[k, y0:y0 + bh, x:x + bw] = colour
                per_frame[k].append(Box(str(10 + o), cls, float(x), float(y0), float(x + bw), float(y0 + bh)))
        clip_id = f"clip_{c:04d}"
        split = splits[c] if splits is not None else ("train", "val")[c % 2]
        vehicles = sum(1 for o in range(num_objects) if ("car", "truck", "pedestrian")[(c + o) % 3] != "pedestrian")
        ann = ClipAnnotation(clip_id, fps, w, h, night=c % 2, crowdedness=vehicles, source="synthetic test",
                             frames=per_frame)
        write_clip(root, video, ann)
        rows.append((clip_id, split))
    write_manifest(root, rows, source="synthetic test", command="write_synthetic_dataset", seed=seed)
    return read_manifest(root)
