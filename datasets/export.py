"""Perception export: clip-format folders (real clips or generated rollouts) -> images + COCO / YOLO labels.

Output layout (`OUT` is created whole or not at all: everything is written into a temp folder next to it that is
renamed to `OUT` at the end, and removed on any failure)::

    OUT/
      images/<clip>_<frame:06d>.png|jpg      COCO: RGB frames (every K-th frame of every clip)
      annotations.json                        COCO (format "coco"); each image records its split
      images/<split>/<clip>_<frame:06d>.*     YOLO: frames by split (train, val; "all" for folders without one)
      labels/<split>/<clip>_<frame:06d>.txt   YOLO (format "yolo"): one line "class cx cy w h" per box
      classes.txt, data.yaml                  YOLO class names (0-based ids = CLASS_NAMES order); data.yaml points
                                              train/val at images/train and images/val (YOLO tools' layout)
      export.json                             what was exported from where (clips, frames, boxes, command)

COCO: `images` carry id, width, height, file_name (relative to OUT), clip, frame, split; `annotations` carry
id, image_id, category_id (1-based: CLASS_NAMES index + 1, 0 being reserved by COCO tools for background),
bbox [x, y, w, h] in pixels (top-left corner, image frame), area (w * h), iscrowd, and the box's track id both
as `track_id` (as in the video-COCO variants TAO / YouTube-VIS) and in `attributes` (with `conditioned`). YOLO:
class = CLASS_NAMES index, cx cy w h normalised by the image width/height, 6 decimals.

Boxes of generated frames that did not condition the frame (`"conditioned": false` in a rollout's annotation: the
frame had more boxes than the model's max_boxes and the smallest were dropped) may or may not be visible: COCO
exports them as ignore regions (iscrowd 1), YOLO leaves them out; export.json counts them.

Input: a folder with `manifest.json` (its clips, with their splits) or, for rollouts written without a manifest,
every `<id>.json` annotation that has a `<id>.mp4` next to it (split "all").
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from drivesim.bbox_conditioning.classes import CLASS_NAMES, CLASS_TO_ID, VEHICLE_CLASSES
from drivesim.datasets.clips import Box, ClipAnnotation, iter_video_frames, read_annotation, read_manifest

from drivesim.errors import ConfigError, DataError, WriteError

FORMATS = ("coco", "yolo")
IMAGE_FORMATS = ("png", "jpg")


@dataclass(frozen=True)
class ExportClip:
    clip_id: str
    video: Path
    annotation: Path
    split: str


def find_clips(root: str | Path) -> list[ExportClip]:
    """The clips of a clip-format folder: its manifest's, or every `<id>.json` with a `<id>.mp4` beside it.

    Raises:
        DataError: folder missing, invalid manifest, or no clip at all.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: dataset: folder not found")
    if (root / "manifest.json").exists():
        return [ExportClip(e.clip_id, e.video, e.annotation, e.split) for e in read_manifest(root).clips]
    clips = [ExportClip(p.stem, p.with_suffix(".mp4"), p, "all") for p in sorted(root.glob("*.json"))
             if p.with_suffix(".mp4").is_file()]
    if not clips:
        raise DataError(f"{root}: clips: no manifest.json and no <id>.json + <id>.mp4 pair (empty dataset)")
    return clips


def write_image(path: Path, image: np.ndarray) -> None:
    """Write (h, w, 3) uint8 RGB as PNG or JPEG (by suffix) with OpenCV. Raises OSError when the write fails."""
    import cv2

    ok, buf = cv2.imencode(path.suffix, np.ascontiguousarray(image[..., ::-1]))  # OpenCV wants BGR
    if not ok:
        raise OSError(f"cv2 cannot encode {path.suffix}")
    path.write_bytes(buf.tobytes())


def write_text(path: Path, text: str) -> None:
    path.write_text(text)


def coco_box(box: Box) -> list[float]:
    """Pixel xyxy -> COCO [x, y, w, h] (top-left corner, pixels)."""
    return [box.x1, box.y1, box.x2 - box.x1, box.y2 - box.y1]


def yolo_line(box: Box, width: int, height: int) -> str:
    """`class cx cy w h` with the centre and size normalised by the image size (YOLO txt label line)."""
    cx, cy = (box.x1 + box.x2) / 2 / width, (box.y1 + box.y2) / 2 / height
    w, h = (box.x2 - box.x1) / width, (box.y2 - box.y1) / height
    return f"{CLASS_TO_ID[box.cls]} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}"


def coco_categories() -> list[dict[str, Any]]:
    def supercategory(name: str) -> str:
        if name in VEHICLE_CLASSES or name == "bicycle":
            return "vehicle"
        return "person" if name == "pedestrian" else "object"

    return [{"id": i + 1, "name": n, "supercategory": supercategory(n)} for i, n in enumerate(CLASS_NAMES)]


def _frames_of(clip: ExportClip, ann: ClipAnnotation) -> Iterator[tuple[int, np.ndarray]]:
    """(index, frame) of every decoded frame, checking size and count against the annotation."""
    count = 0
    for k, frame in enumerate(iter_video_frames(clip.video)):
        if frame.shape[:2] != (ann.height, ann.width):
            raise DataError(f"{clip.video}: resolution: video is {frame.shape[1]}x{frame.shape[0]} but "
                            f"{clip.annotation.name} says {ann.width}x{ann.height}")
        if k >= ann.num_frames:
            raise DataError(f"{clip.video}: num_frames: video has more frames than the {ann.num_frames} of "
                            f"{clip.annotation.name}")
        count += 1
        yield k, frame
    if count != ann.num_frames:
        raise DataError(f"{clip.video}: num_frames: video has {count} frames but {clip.annotation.name} has "
                        f"{ann.num_frames} (truncated video?)")


def export_dataset(root: str | Path, out: str | Path, fmt: str, every: int = 1, image_format: str = "png",
                   command: str = "") -> dict[str, Any]:
    """Export every `every`-th frame of every clip of `root` as an image plus labels in `fmt` into `out`.

    Args:
        root: clip-format folder (see `find_clips`).
        out: output folder; must not exist. Created atomically (temp folder + rename).
        fmt: "coco" or "yolo".
        every: keep frames 0, K, 2K, ... of each clip (K >= 1).
        image_format: "png" (lossless) or "jpg".

    Returns:
        summary {"format", "clips", "images", "boxes", "unconditioned_boxes", "out"} (also written to
        OUT/export.json). "boxes" counts object labels; "unconditioned_boxes" {"boxes", "frames", "labels"} counts
        the boxes of generated frames marked `"conditioned": false` (beyond the model's max_boxes, so the frame may
        or may not show them): COCO gets them as ignore regions (iscrowd 1), YOLO, which has no ignore regions,
        leaves them out.

    Raises:
        ConfigError: unknown format/image format, every < 1, `out` exists.
        DataError: invalid input (annotation, video, manifest; names file and field).
        WriteError: a failed write (names the file being written; nothing is left at `out`).
    """
    if fmt not in FORMATS:
        raise ConfigError(f"--format: expected one of {', '.join(FORMATS)}, got {fmt!r}")
    if image_format not in IMAGE_FORMATS:
        raise ConfigError(f"--image-format: expected one of {', '.join(IMAGE_FORMATS)}, got {image_format!r}")
    if every < 1:
        raise ConfigError(f"--every: must be >= 1, got {every}")
    root, out = Path(root), Path(out)
    if out.exists():
        raise ConfigError(f"{out}: --out: already exists (exports never overwrite; choose a new folder)")
    clips = find_clips(root)
    annotations = [read_annotation(c.annotation) for c in clips]  # all labels validated before any pixel work
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    current = tmp
    try:
        (tmp / "images").mkdir()
        if fmt == "yolo":
            (tmp / "labels").mkdir()
            for split in sorted({c.split for c in clips}):
                (tmp / "images" / split).mkdir()
                (tmp / "labels" / split).mkdir()
        images: list[dict[str, Any]] = []
        coco_anns: list[dict[str, Any]] = []
        num_boxes = 0
        ignored = {"boxes": 0, "frames": 0}  # boxes that did not condition their generated frame
        for clip, ann in zip(clips, annotations, strict=True):
            for k, frame in _frames_of(clip, ann):
                if k % every:
                    continue
                name = f"{clip.clip_id}_{k:06d}"
                sub = f"{clip.split}/" if fmt == "yolo" else ""
                current = tmp / "images" / f"{sub}{name}.{image_format}"
                write_image(current, frame)
                image_id = len(images) + 1
                images.append({"id": image_id, "width": ann.width, "height": ann.height,
                               "file_name": f"images/{sub}{name}.{image_format}", "clip": clip.clip_id, "frame": k,
                               "split": clip.split})
                boxes = ann.frames[k]
                unconditioned = sum(not b.conditioned for b in boxes)
                num_boxes += len(boxes) - unconditioned
                ignored["boxes"] += unconditioned
                ignored["frames"] += unconditioned > 0
                if fmt == "yolo":  # YOLO has no ignore regions: an unconditioned box gets no label line
                    current = tmp / "labels" / f"{sub}{name}.txt"
                    write_text(current, "".join(yolo_line(b, ann.width, ann.height) + "\n" for b in boxes
                                                if b.conditioned))
                    continue
                for b in boxes:
                    x, y, w, h = coco_box(b)
                    # COCO's ignore region (iscrowd 1): neither an object to learn nor background; COCO eval,
                    # detectron2, mmdetection and ultralytics' converter all skip it as a training target
                    coco_anns.append({"id": len(coco_anns) + 1, "image_id": image_id,
                                      "category_id": CLASS_TO_ID[b.cls] + 1, "bbox": [x, y, w, h], "area": w * h,
                                      "iscrowd": int(not b.conditioned), "track_id": b.track_id,
                                      "attributes": {"track_id": b.track_id, "clip": clip.clip_id,
                                                     "conditioned": b.conditioned}})
        if fmt == "coco":
            current = tmp / "annotations.json"
            coco = {"info": {"description": f"drivesim export of {root}", "version": "1.0"}, "licenses": [],
                    "images": images, "annotations": coco_anns, "categories": coco_categories()}
            write_text(current, json.dumps(coco))
        else:
            current = tmp / "classes.txt"
            write_text(current, "".join(n + "\n" for n in CLASS_NAMES))
            current = tmp / "data.yaml"
            names = "".join(f"  {i}: {n}\n" for i, n in enumerate(CLASS_NAMES))
            splits = {c.split for c in clips}
            train = "images/train" if "train" in splits else f"images/{sorted(splits)[0]}"
            val = "images/val" if "val" in splits else train
            write_text(current, f"path: .\ntrain: {train}\nval: {val}\nnc: {len(CLASS_NAMES)}\nnames:\n{names}")
        how = ("COCO ignore regions (iscrowd 1, attributes.conditioned false)" if fmt == "coco"
               else "left out of the YOLO labels (YOLO has no ignore regions)")
        summary = {"format": fmt, "source": str(root), "clips": len(clips), "images": len(images),
                   "boxes": num_boxes, "unconditioned_boxes": {**ignored, "labels": how}, "every": every,
                   "image_format": image_format, "command": command}
        current = tmp / "export.json"
        write_text(current, json.dumps(summary, indent=1))
        os.rename(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise WriteError(f"{current}: write: {e.strerror or e} (nothing was written to {out})") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {**summary, "out": str(out)}


def read_coco_boxes(path: str | Path) -> dict[tuple[str, int], list[tuple[str, str, float, float, float, float]]]:
    """Boxes of a COCO export back in pixels: {(clip, frame): [(track_id, class, x1, y1, x2, y2), ...]}."""
    data = json.loads(Path(path).read_text())
    by_image = {im["id"]: (im["clip"], im["frame"]) for im in data["images"]}
    names = {c["id"]: c["name"] for c in data["categories"]}
    out: dict[tuple[str, int], list] = {key: [] for key in by_image.values()}
    for a in data["annotations"]:
        x, y, w, h = a["bbox"]
        out[by_image[a["image_id"]]].append((a["track_id"], names[a["category_id"]], x, y, x + w, y + h))
    return out


def read_yolo_boxes(path: str | Path, width: int, height: int) -> list[tuple[str, float, float, float, float]]:
    """One YOLO label file back in pixels of a `width` x `height` image: [(class, x1, y1, x2, y2), ...]."""
    boxes = []
    for line in Path(path).read_text().splitlines():
        c, cx, cy, w, h = line.split()
        cx, cy, w, h = float(cx) * width, float(cy) * height, float(w) * width, float(h) * height
        boxes.append((CLASS_NAMES[int(c)], cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2))
    return boxes
