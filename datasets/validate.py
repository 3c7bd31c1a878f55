"""Checking and summarising a clip-format dataset (`drivesim data validate`, `drivesim data info`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from drivesim.datasets.clips import check_video_agrees, read_annotation, read_manifest
from drivesim.datasets.video import read_video

from drivesim.atomic import atomic_path, write_bytes_atomic, write_json_atomic  # noqa: F401  (re-exported)
from drivesim.errors import DataError


def dataset_summary(root: str | Path) -> dict[str, Any]:
    """Statistics of a dataset from its manifest and annotations (videos are not decoded).

    Returns:
        {"path", "format_version", "source", "splits": {split: stats}, "all": stats}, where stats has "clips",
        "frames", "fps" (sorted distinct), "resolutions" (sorted distinct "WxH"), "day", "night",
        "boxes_per_frame_mean", "boxes_per_frame_max", "empty_frames", "crowdedness_mean", "classes"
        ({name: box count}, every known class listed).

    Raises:
        DataError: invalid manifest or annotation (the first one found).
    """
    from drivesim.bbox_conditioning.classes import CLASS_NAMES

    manifest = read_manifest(root)

    def empty() -> dict[str, Any]:
        return {"clips": 0, "frames": 0, "fps": set(), "resolutions": set(), "day": 0, "night": 0, "boxes": 0,
                "boxes_per_frame_max": 0, "empty_frames": 0, "crowdedness": 0, "classes": dict.fromkeys(CLASS_NAMES, 0)}

    stats: dict[str, dict[str, Any]] = {"all": empty()}
    for entry in manifest.clips:
        ann = read_annotation(entry.annotation)
        for s in (stats.setdefault(entry.split, empty()), stats["all"]):
            s["clips"] += 1
            s["frames"] += ann.num_frames
            s["fps"].add(ann.fps)
            s["resolutions"].add(f"{ann.width}x{ann.height}")
            s["night" if ann.night else "day"] += 1
            s["crowdedness"] += ann.crowdedness
            for boxes in ann.frames:
                s["boxes"] += len(boxes)
                s["boxes_per_frame_max"] = max(s["boxes_per_frame_max"], len(boxes))
                s["empty_frames"] += not boxes
                for b in boxes:
                    s["classes"][b.cls] += 1

    def finish(s: dict[str, Any]) -> dict[str, Any]:
        frames = max(s["frames"], 1)
        return {"clips": s["clips"], "frames": s["frames"], "fps": sorted(s["fps"]),
                "resolutions": sorted(s["resolutions"]), "day": s["day"], "night": s["night"],
                "boxes_per_frame_mean": round(s["boxes"] / frames, 3), "boxes_per_frame_max": s["boxes_per_frame_max"],
                "empty_frames": s["empty_frames"], "crowdedness_mean": round(s["crowdedness"] / max(s["clips"], 1), 3),
                "classes": s["classes"]}

    return {"path": str(manifest.root), "format_version": manifest.meta.get("format_version"),
            "source": manifest.meta.get("source", ""),
            "splits": {k: finish(v) for k, v in stats.items() if k != "all"}, "all": finish(stats["all"])}


@dataclass
class ValidationReport:
    """Result of `validate_dataset`: `problems` fail validation; `notes` (e.g. clipped boxes) do not."""

    clips_checked: int = 0
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def validate_dataset(root: str | Path, decode: bool = True) -> ValidationReport:
    """Check every clip of a dataset: manifest, annotation fields and boxes, video decoding, frame count/size.

    Boxes that overlap the image but stick out are clipped by readers: they are reported as notes, not problems,
    because training sees a valid box either way (renderers and projections routinely emit them). Every other
    finding is a problem; all boxes of a file are checked, not just the first bad one.

    Args:
        decode: also decode every video (slow on big datasets; False checks the JSON only).

    Returns:
        a ValidationReport; problem/note lines each name the file and the field.
    """
    report = ValidationReport()
    try:
        manifest = read_manifest(root)
    except DataError as e:
        report.problems.append(str(e))
        return report
    for entry in manifest.clips:
        report.clips_checked += 1
        box_problems: list[str] = []
        try:
            ann = read_annotation(entry.annotation, problems=box_problems)
        except DataError as e:
            report.problems.append(str(e))
            ann = None
        report.problems.extend(box_problems)
        if ann is not None:
            report.notes.extend(ann.notes)
            if ann.clip_id != entry.clip_id:
                report.problems.append(f"{entry.annotation}: id: {ann.clip_id!r} but the manifest lists "
                                       f"{entry.clip_id!r}")
        if not decode:
            if not entry.video.is_file():
                report.problems.append(f"{entry.video}: video: file not found")
            continue
        try:
            frames = read_video(entry.video)
            if ann is not None:
                check_video_agrees(entry, ann, frames)
        except DataError as e:
            report.problems.append(str(e))
    return report
