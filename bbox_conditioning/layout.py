"""Boxes rasterised onto a pixel or latent grid: exact fractional coverage of each cell by each box.

A leaf module (torch only). A box covering a cell partly gives the covered fraction of the cell's area, so a box of
9 pixels still leaves a mark on an 8x-downsampled latent grid (coverage 9*9/64 of one cell, or spread over up to
four cells) instead of vanishing or snapping to a whole cell.

Coordinates follow `drivesim.bbox_conditioning.boxes`: normalised xyxy of the image frame (x right, y down, origin at
the top-left corner of the top-left pixel). Cell (i, j) of an `height` x `width` grid spans
[j / width, (j + 1) / width] x [i / height, (i + 1) / height].
"""

from __future__ import annotations

import torch


def _axis_coverage(lo: torch.Tensor, hi: torch.Tensor, cells: int) -> torch.Tensor:
    """Fraction of each of `cells` unit intervals covered by [lo, hi] (given in cell units): (..., cells)."""
    edges = torch.arange(cells, device=lo.device, dtype=lo.dtype)
    return (torch.minimum(hi[..., None], edges + 1) - torch.maximum(lo[..., None], edges)).clamp(0.0, 1.0)


def box_coverage(boxes: torch.Tensor, mask: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Per-box fractional coverage of every cell of a `height` x `width` grid.

    Args:
        boxes: (..., n, 4) float, normalised xyxy (image frame); values outside [0, 1] are clipped by the grid.
        mask: (..., n) bool, True for real boxes; padding slots give all-zero maps.
        height, width: grid size in cells (pixels for frames, h/8 x w/8 for KL-f8 latents).

    Returns:
        (..., n, height, width) float of `boxes.dtype` in [0, 1]: the area fraction of cell (i, j) inside box k
        (exact for axis-aligned boxes: the product of the two 1-D overlaps).
    """
    boxes = boxes.float() if not boxes.is_floating_point() else boxes
    cov_x = _axis_coverage(boxes[..., 0] * width, boxes[..., 2] * width, width)  # (..., n, w)
    cov_y = _axis_coverage(boxes[..., 1] * height, boxes[..., 3] * height, height)  # (..., n, h)
    cov = cov_y[..., :, None] * cov_x[..., None, :]
    return cov * mask[..., None, None].to(cov.dtype)


def union_coverage(boxes: torch.Tensor, mask: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Coverage of each cell by any box: the max over boxes of `box_coverage`, (..., height, width) in [0, 1]."""
    if boxes.shape[-2] == 0:
        return boxes.new_zeros((*boxes.shape[:-2], height, width))
    return box_coverage(boxes, mask, height, width).amax(dim=-3)
