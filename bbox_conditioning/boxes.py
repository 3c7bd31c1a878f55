"""Box tensors: per-frame box lists in pixels -> padded, normalised tensors, and their geometry.

A leaf module (numpy + torch only). Conventions (shared across drivesim):

- boxes: (t, n, 4) float32, normalised xyxy in [0, 1] of the image frame (x right, y down, origin at the
  top-left corner of the top-left pixel), so `x = x_px / width`, `y = y_px / height`;
- classes: (t, n) int64 index into `drivesim.bbox_conditioning.classes.CLASS_NAMES`;
- mask: (t, n) bool, True where a slot holds a real box; padding slots are all-zero boxes, class 0,
  track id -1.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch

BoxTuple = tuple[int, int, float, float, float, float]
"""(track_id, class_id, x1, y1, x2, y2) with coordinates in pixels, image frame, xyxy."""


class PackedBoxes(NamedTuple):
    """Padded box arrays of one clip (numpy; `torch.from_numpy` each field for tensors).

    boxes (t, n, 4) float32 normalised xyxy; classes (t, n) int64; box_mask (t, n) bool; track_ids (t, n) int64
    (-1 in padding slots). The field names are the batch keys every model reads (`Conditioning.from_batch`).
    """

    boxes: np.ndarray
    classes: np.ndarray
    box_mask: np.ndarray
    track_ids: np.ndarray

    def as_batch(self, start: int = 0, stop: int | None = None) -> dict:
        """Frames [start, stop) as a batch of one clip: {"boxes" (1, t, n, 4), "classes" (1, t, n), "box_mask"
        (1, t, n), "track_ids" (1, t, n)} torch tensors (sharing memory with the arrays)."""
        return {k: torch.from_numpy(getattr(self, k)[start:stop])[None] for k in self._fields}


def pack_boxes(frames_boxes: Sequence[Sequence[BoxTuple]], width: int, height: int, max_boxes: int) -> PackedBoxes:
    """Pack per-frame box lists into fixed-size normalised arrays.

    Args:
        frames_boxes: one sequence per frame of `(track_id, class_id, x1, y1, x2, y2)`; ints for the ids,
            coordinates in pixels of a `width` x `height` image (image frame, xyxy).
        width, height: image size in pixels (> 0), used to normalise.
        max_boxes: number of slots `n` per frame (>= 1).

    Returns:
        PackedBoxes with shapes (t, n, 4) / (t, n) / (t, n) / (t, n). Normalised coordinates are clamped to
        [0, 1]. Slots are filled in decreasing box area; when a frame has more than `max_boxes` boxes only
        the `max_boxes` largest (by pixel area, ties keep the input order) are kept, because large, near
        objects dominate what the frame looks like and small far ones are what a model can afford to drop.

    Raises:
        ValueError: non-positive size or `max_boxes`.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if max_boxes < 1:
        raise ValueError(f"max_boxes must be >= 1, got {max_boxes}")
    t = len(frames_boxes)
    boxes = np.zeros((t, max_boxes, 4), np.float32)
    classes = np.zeros((t, max_boxes), np.int64)
    mask = np.zeros((t, max_boxes), bool)
    track_ids = np.full((t, max_boxes), -1, np.int64)
    scale = np.array([width, height, width, height], np.float64)
    for k, frame in enumerate(frames_boxes):
        if not len(frame):
            continue
        arr = np.asarray([b[2:6] for b in frame], np.float64).reshape(-1, 4)
        area = (arr[:, 2] - arr[:, 0]) * (arr[:, 3] - arr[:, 1])
        order = np.argsort(-area, kind="stable")[:max_boxes]
        m = len(order)
        boxes[k, :m] = np.clip(arr[order] / scale, 0.0, 1.0)
        classes[k, :m] = [frame[i][1] for i in order]
        track_ids[k, :m] = [frame[i][0] for i in order]
        mask[k, :m] = True
    return PackedBoxes(boxes, classes, mask, track_ids)


def hflip_boxes(boxes: torch.Tensor | np.ndarray, mask: torch.Tensor | np.ndarray | None = None):
    """Mirror normalised xyxy boxes about the vertical image axis (x -> 1 - x).

    Args:
        boxes: (..., 4) normalised xyxy (torch or numpy).
        mask: optional (...) bool; padding slots (False) are left untouched (all zeros stay zeros).

    Returns:
        same type/shape/dtype: `(1 - x2, y1, 1 - x1, y2)`, so x1 < x2 still holds.
    """
    if isinstance(boxes, torch.Tensor):
        out = torch.stack([1 - boxes[..., 2], boxes[..., 1], 1 - boxes[..., 0], boxes[..., 3]], dim=-1)
        if mask is not None:
            out = torch.where(torch.as_tensor(mask)[..., None], out, boxes)
        return out
    boxes = np.asarray(boxes)
    out = np.stack([1 - boxes[..., 2], boxes[..., 1], 1 - boxes[..., 0], boxes[..., 3]], axis=-1).astype(boxes.dtype)
    if mask is not None:
        out = np.where(np.asarray(mask)[..., None], out, boxes)
    return out


def boxes_to_pixels(boxes: torch.Tensor | np.ndarray, width: int, height: int):
    """Normalised xyxy (..., 4) -> pixel xyxy of a `width` x `height` image (same type)."""
    scale = [width, height, width, height]
    if isinstance(boxes, torch.Tensor):
        return boxes * boxes.new_tensor(scale)
    return np.asarray(boxes) * np.asarray(scale, dtype=np.asarray(boxes).dtype)
