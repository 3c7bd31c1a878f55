"""The drivesim clip format: one folder per dataset, one mp4 + one JSON annotation per clip, a manifest.

Layout::

    DATASET/
      manifest.json          {"format": "drivesim-clips", "format_version": 1, "source": ..., "command": ...,
                              "seed": ..., "clips": [{"id", "video", "annotation", "split"}]}
      <id>.mp4               H.264 (yuv420p), plays in browsers; RGB frames of `width` x `height`
      <id>.json              {"format_version": 1, "id", "fps", "width", "height", "num_frames", "night" (0/1),
                              "crowdedness" (vehicles in the clip), "source",
                              "frames": [{"index": k, "boxes": [{"track_id", "class", "x1", "y1", "x2", "y2"}]}]}

Boxes are in pixels of that video, image frame (x right, y down, origin at the top-left corner of the top-left
pixel), xyxy with x1 < x2, y1 < y2. Readers validate everything: a box that overlaps the image but sticks out is
clipped to it (and reported in `ClipAnnotation.notes`); a box that is NaN/inf, has non-positive area or lies fully
outside the image is an error naming the file and field.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from drivesim.bbox_conditioning.classes import CLASS_TO_ID

from drivesim.errors import DataError

FORMAT = "drivesim-clips"
FORMAT_VERSION = 1
SPLITS = ("train", "val")


@dataclass(frozen=True)
class Box:
    """One 2D box in pixels of its video (image frame, xyxy)."""

    track_id: str
    cls: str
    x1: float
    y1: float
    x2: float
    y2: float

    def to_json(self) -> dict[str, Any]:
        return {"track_id": self.track_id, "class": self.cls, "x1": self.x1, "y1": self.y1, "x2": self.x2,
                "y2": self.y2}


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
# video i/o (PyAV)
# --------------------------------------------------------------------------------------------------------------


def write_video(path: str | Path, frames: np.ndarray, fps: float, crf: int = 20) -> None:
    """Write RGB frames as an H.264 (yuv420p) mp4 that browsers play.

    Args:
        path: output file (written to a temp name in the same folder, then renamed).
        frames: (t, h, w, 3) uint8 RGB; h and w must be even (yuv420p).
        fps: frames per second.
        crf: x264 constant rate factor (lower = better quality, bigger file).

    Raises:
        ValueError: wrong dtype/shape or odd size.
    """
    import av

    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be (t, h, w, 3) uint8, got {frames.shape} {frames.dtype}")
    t, h, w, _ = frames.shape
    if h % 2 or w % 2:
        raise ValueError(f"H.264 yuv420p needs even frame sizes, got {w}x{h}")
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.mp4")
    try:
        with av.open(str(tmp), mode="w") as container:
            from fractions import Fraction

            stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1000))
            stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
            stream.options = {"crf": str(crf), "preset": "medium"}
            for frame in frames:
                for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_video(path: str | Path) -> np.ndarray:
    """Decode a video file to RGB frames.

    Returns:
        (t, h, w, 3) uint8 RGB.

    Raises:
        DataError: the file is missing, unreadable, truncated or has no video frames (names the file).
    """
    import av

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: video: file not found")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise DataError(f"{path}: video: no video stream")
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    except DataError:
        raise
    except Exception as e:  # PyAV raises several error types for corrupt/truncated files
        raise DataError(f"{path}: video: cannot decode ({type(e).__name__}: {e})") from None
    if not frames:
        raise DataError(f"{path}: video: no decodable frames (empty or truncated file)")
    return np.stack(frames)


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
        raise DataError(f"{path}: {where}{key}: expected {getattr(types, '__name__', types)}, got {value!r}")
    return value


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
    note = None
    if (cx1, cy1, cx2, cy2) != (x1, y1, x2, y2):
        note = f"{path}: {where}: clipped to the image ({x1}, {y1}, {x2}, {y2}) -> ({cx1}, {cy1}, {cx2}, {cy2})"
    return Box(str(track_id), cls, cx1, cy1, cx2, cy2), note


def annotation_from_json(data: Any, path: Path) -> ClipAnnotation:
    """Validate a parsed annotation JSON (see module docstring). Raises DataError naming `path` and the field."""
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
        boxes = []
        for j, rb in enumerate(raw_boxes):
            box, note = parse_box(rb, width, height, path, f"frames[{k}].boxes[{j}]")
            boxes.append(box)
            if note:
                notes.append(note)
        frames.append(boxes)
    clip_id = data.get("id", path.stem)
    return ClipAnnotation(str(clip_id), fps, width, height, night, crowdedness, source, frames, notes)


def read_annotation(path: str | Path) -> ClipAnnotation:
    """Read and validate one clip annotation JSON. Raises DataError naming the file and field."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: annotation: file not found")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: annotation: not valid JSON ({e})") from None
    return annotation_from_json(data, path)


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Write JSON to `path` via a temp file + rename, so readers never see half a file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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


def write_manifest(dataset_dir: str | Path, clips: list[tuple[str, str]], **meta: Any) -> Path:
    """Write `manifest.json` listing `(clip_id, split)` pairs; `meta` (source, command, seed...) is recorded."""
    root = Path(dataset_dir)
    for _clip_id, split in clips:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    data = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        **meta,
        "clips": [{"id": c, "video": f"{c}.mp4", "annotation": f"{c}.json", "split": s} for c, s in clips],
    }
    write_json_atomic(root / "manifest.json", data)
    return root / "manifest.json"


def read_manifest(dataset_dir: str | Path) -> Manifest:
    """Read and validate `DATASET/manifest.json` (paths resolved; files are not opened here).

    Raises:
        DataError: missing/invalid manifest, unknown split, duplicate id, empty dataset.
    """
    root = Path(dataset_dir)
    path = root / "manifest.json"
    if not root.is_dir():
        raise DataError(f"{root}: dataset: folder not found")
    if not path.is_file():
        raise DataError(f"{path}: manifest: file not found")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: manifest: not valid JSON ({e})") from None
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
        cid = _require(raw, "id", str, path, f"clips[{i}].")
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
    t, h, w, _ = frames.shape
    if (h, w) != (ann.height, ann.width):
        raise DataError(f"{entry.video}: resolution: video is {w}x{h} but {entry.annotation.name} says "
                        f"{ann.width}x{ann.height}")
    if t != ann.num_frames:
        raise DataError(f"{entry.video}: num_frames: video has {t} frames but {entry.annotation.name} has "
                        f"{ann.num_frames} (truncated video?)")
    return frames, ann


def copy_dataset(src: str | Path, dst: str | Path) -> None:
    """Copy a dataset folder (used by tests and exports); `dst` must not exist."""
    shutil.copytree(src, dst)
