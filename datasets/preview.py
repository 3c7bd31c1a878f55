"""Pictures of clips with their boxes drawn (`drivesim data preview`)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from drivesim.datasets.clips import (
    ClipAnnotation,
    iter_video_frames,
    load_clip,
    read_annotation,
    read_manifest,
    write_bytes_atomic,
)

from drivesim.errors import DataError

# BGR-free: colours are RGB, frames are RGB until written
_CLASS_COLOURS = {"car": (255, 64, 64), "truck": (64, 160, 255), "van": (255, 200, 0)}


def draw_boxes(frame: np.ndarray, boxes, scale: int = 1) -> np.ndarray:
    """Return an upscaled copy of `frame` ((h, w, 3) uint8 RGB) with `boxes` (clip-format Box list) drawn."""
    h, w, _ = frame.shape
    img = cv2.resize(frame, (w * scale, h * scale), interpolation=cv2.INTER_NEAREST)
    for b in boxes:
        colour = _CLASS_COLOURS.get(b.cls, (0, 255, 0))
        p1 = (int(round(b.x1 * scale)), int(round(b.y1 * scale)))
        p2 = (int(round(b.x2 * scale)) - 1, int(round(b.y2 * scale)) - 1)
        cv2.rectangle(img, p1, p2, colour, 1)
        cv2.putText(img, f"{b.cls}:{b.track_id}", (p1[0], max(p1[1] - 2, 8)), cv2.FONT_HERSHEY_SIMPLEX,
                    0.3, colour, 1, cv2.LINE_AA)
    return img


def preview(dataset: str | Path, out: str | Path, clip_ids: list[str] | None = None, frame: int = 16,
            scale: int = 3) -> Path:
    """Write a PNG stacking frame `frame` of each clip (default: the first day and the first night clip).

    Raises:
        DataError: unknown clip id, or any clip-format error of the clips drawn.
        WriteError: the PNG cannot be written (nothing is left behind).
    """
    manifest = read_manifest(dataset)
    by_id = {c.clip_id: c for c in manifest.clips}
    if clip_ids:
        missing = [c for c in clip_ids if c not in by_id]
        if missing:
            raise DataError(f"{manifest.root / 'manifest.json'}: --clip: unknown clip id {missing[0]!r}")
        entries = [by_id[c] for c in clip_ids]
    else:
        entries, seen = [], set()
        for c in manifest.clips:
            night = read_annotation(c.annotation).night
            if night not in seen:
                seen.add(night)
                entries.append(c)
            if len(seen) == 2:
                break
    rows = []
    for entry in entries:
        frames, ann = load_clip(entry)
        k = min(max(frame, 0), ann.num_frames - 1)
        img = draw_boxes(frames[k], ann.frames[k], scale)
        label = f"{ann.clip_id} frame {k} {'night' if ann.night else 'day'} ({len(ann.frames[k])} boxes)"
        cv2.putText(img, label, (4, 12), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1, cv2.LINE_AA)
        rows.append(img)
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 2), (0, width - r.shape[1]), (0, 0))) for r in rows]
    return _write_png(out, np.concatenate(rows))


def filmstrip(video: str | Path, annotation: ClipAnnotation, times_s: list[float], out: str | Path,
              frames_per_row: int = 4, step: int = 2, scale: int = 2) -> Path:
    """Write a PNG with one row per time in `times_s`: `frames_per_row` frames `step` apart starting at that time,
    each with the annotation's boxes of that frame drawn (e.g. minutes 0, 5 and 10 of a long rollout).

    The video is decoded once, sequentially (PyAV), keeping only the frames drawn, so memory does not depend on
    its length.

    Args:
        video: mp4 of the clip; annotation: its clip-format annotation (fps, boxes in the video's pixels).
        times_s: start times in seconds; a time past the end is clamped to the last full row.

    Raises:
        DataError: unreadable video (or one whose frame size changes), a time < 0 (names the file / option).
        WriteError: the PNG cannot be written (nothing is left behind).
    """
    if any(t < 0 for t in times_s):
        raise DataError(f"{out}: --at: times must be >= 0, got {times_s}")
    last = annotation.num_frames - 1
    starts = [min(int(round(t * annotation.fps)), max(last - (frames_per_row - 1) * step, 0)) for t in times_s]
    rows_k = [[min(s + j * step, last) for j in range(frames_per_row)] for s in starts]  # frame index per tile
    wanted = {k for row in rows_k for k in row}
    picked: dict[int, np.ndarray] = {}
    for k, frame in enumerate(iter_video_frames(video)):
        if k in wanted:
            picked[k] = frame
        if k >= max(wanted):
            break
    rows = []
    for row_k in rows_k:
        tiles = []
        for k in row_k:
            if k not in picked:
                raise DataError(f"{video}: video: has no frame {k} (annotation has {annotation.num_frames})")
            img = draw_boxes(picked[k], annotation.frames[k], scale)
            cv2.putText(img, f"{k / annotation.fps:.1f} s", (4, 12), cv2.FONT_HERSHEY_SIMPLEX, 0.4,
                        (255, 255, 255), 1, cv2.LINE_AA)
            tiles += [img, np.full((img.shape[0], 2, 3), 255, np.uint8)]
        rows += [np.concatenate(tiles[:-1], axis=1), np.full((2, sum(x.shape[1] for x in tiles[:-1]), 3), 255,
                                                              np.uint8)]
    return _write_png(out, np.concatenate(rows[:-1]))


def _write_png(out: str | Path, image: np.ndarray) -> Path:
    """(h, w, 3) uint8 RGB -> an image at `out` (PNG, or the format its suffix names), atomically (cv2.imwrite
    left half a file on a full disk)."""
    out = Path(out)
    ok, buf = cv2.imencode(out.suffix or ".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    if not ok:
        raise DataError(f"{out}: --out: could not encode the image")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(out, buf.tobytes())
    return out


__all__ = ["ClipAnnotation", "draw_boxes", "filmstrip", "preview"]
