"""Boxes per latent frame of a temporally compressing autoencoder (LVDM's 3D autoencoder: one latent frame per 4
video frames): the per-frame box lists of each group of `frames_per_latent` frames reduced to one list.

Reductions (`BOX_REDUCTIONS`):
- "union" (the default, what `drivesim encode` writes unless told otherwise): per track, the smallest box holding
  all of its boxes in the group, with the class of its first box; every track seen in any frame of the group is
  kept, in order of first appearance. A latent frame encodes all four frames, so its condition covers wherever the
  object is in any of them: no object in the latent is left without a box (the middle frame would drop a track
  that enters or leaves inside the group), and a box that is a little loose (the motion over 3 frames, 0.3 s at
  10 fps) misleads a box-conditioned model less than a missing one.
- "middle": the boxes of frame `g * f + f // 2` (of frames g f .. g f + f - 1; for f = 4 the third), the single
  frame nearest the centre of the group (the latent frame's centre is g f + (f - 1) / 2 with the symmetric
  kernels of `drivesim.autoencoder.networks_3d`): tight boxes, but tracks absent from that frame are dropped.

Labels exported for a generated video stay per video frame; this reduction only feeds the latent models.
"""

from __future__ import annotations

from collections.abc import Sequence

from drivesim.bbox_conditioning.boxes import BoxTuple

__all__ = ["BOX_REDUCTIONS", "group_boxes"]

BOX_REDUCTIONS = ("union", "middle")


def group_boxes(frames_boxes: Sequence[Sequence[BoxTuple]], frames_per_latent: int,
                reduction: str = "union") -> list[list[BoxTuple]]:
    """Reduce per-frame boxes to one box list per latent frame.

    Args:
        frames_boxes: one sequence per video frame of `(track_id, class_id, x1, y1, x2, y2)` (pixels, image frame,
            xyxy), as `pack_boxes` takes; its length a multiple of `frames_per_latent`.
        frames_per_latent: video frames per latent frame (f >= 1); latent frame g covers frames [g f, (g + 1) f).
        reduction: one of `BOX_REDUCTIONS` (see the module docstring).

    Returns:
        len(frames_boxes) / f lists of BoxTuples (feed them to `pack_boxes`).

    Raises:
        ValueError: f < 1, a length that is not a multiple of f, or an unknown reduction.
    """
    f = frames_per_latent
    if f < 1 or len(frames_boxes) % f:
        raise ValueError(f"{len(frames_boxes)} frames do not split into groups of frames_per_latent={f}")
    if reduction not in BOX_REDUCTIONS:
        raise ValueError(f"box reduction {reduction!r} not in {BOX_REDUCTIONS}")
    groups = [frames_boxes[g:g + f] for g in range(0, len(frames_boxes), f)]
    if reduction == "middle":
        return [list(group[f // 2]) for group in groups]
    out = []
    for group in groups:
        union: dict[int, list] = {}  # track id -> [track, class, x1, y1, x2, y2], in order of first appearance
        for frame in group:
            for track, cls, x1, y1, x2, y2 in frame:
                if track not in union:
                    union[track] = [track, cls, x1, y1, x2, y2]
                else:
                    u = union[track]
                    u[2:] = [min(u[2], x1), min(u[3], y1), max(u[4], x2), max(u[5], y2)]
        out.append([tuple(u) for u in union.values()])
    return out
