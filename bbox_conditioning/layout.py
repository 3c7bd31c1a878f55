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
from drivesim.bbox_conditioning.classes import check_class_ids


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


def layout_channels(num_classes: int) -> int:
    """Channels of `layout_map`: one coverage map per class, then the in-box position (u, v)."""
    return num_classes + 2


def layout_map(boxes: torch.Tensor, classes: torch.Tensor, mask: torch.Tensor, height: int, width: int,
               num_classes: int) -> torch.Tensor:
    """A spatially aligned picture of a frame's boxes (the layout the U-Net's layout encoder reads).

    Channels (see `layout_channels`):
    - 0 .. num_classes-1: per class, the largest fractional coverage of each cell by a box of that class (where
      and what);
    - num_classes, num_classes+1: where in its box the cell lies, u = 2 (x - x1) / (x2 - x1) - 1 and the same for
      y, in [-1, 1] at the cell centre, times the coverage; from the box covering the cell most (its edges and
      centre, so the network can draw a boundary even when two boxes touch).

    Args:
        boxes: (..., n, 4) float normalised xyxy (image frame); classes: (..., n) int64 ids in [0, num_classes);
        mask: (..., n) bool (padding and dropped boxes False: they leave no mark).
        height, width: grid size in cells.

    Returns:
        (..., num_classes + 2, height, width) float32.

    Raises:
        ValueError: a class id of a real box outside [0, num_classes).
    """
    boxes = boxes.float()
    valid = mask.bool()
    cls = torch.where(valid, classes, torch.zeros_like(classes))
    check_class_ids(cls, num_classes)
    lead = boxes.shape[:-2]
    if boxes.shape[-2] == 0:
        return boxes.new_zeros((*lead, num_classes + 2, height, width))
    cov = box_coverage(torch.nan_to_num(boxes), valid, height, width)  # (..., n, h, w)
    onehot = torch.nn.functional.one_hot(cls, num_classes).to(cov.dtype)  # (..., n, K)
    per_class = (cov.unsqueeze(-3) * onehot[..., None, None]).amax(dim=-4)  # (..., K, h, w)
    best = cov.argmax(dim=-3, keepdim=True)  # (..., 1, h, w) the box covering each cell most
    top = cov.gather(-3, best).squeeze(-3)
    xs = (torch.arange(width, device=boxes.device, dtype=cov.dtype) + 0.5) / width
    ys = (torch.arange(height, device=boxes.device, dtype=cov.dtype) + 0.5) / height
    b = torch.nan_to_num(boxes)
    span_x = (b[..., 2] - b[..., 0]).clamp_min(1e-6)
    span_y = (b[..., 3] - b[..., 1]).clamp_min(1e-6)
    u = 2 * (xs - b[..., 0, None]) / span_x[..., None] - 1  # (..., n, w)
    v = 2 * (ys - b[..., 1, None]) / span_y[..., None] - 1  # (..., n, h)
    u = u[..., None, :].expand(*u.shape[:-1], height, width).gather(-3, best).squeeze(-3)
    v = v[..., :, None].expand(*v.shape[:-1], height, width).gather(-3, best).squeeze(-3)
    pos = torch.stack([u.clamp(-1, 1) * top, v.clamp(-1, 1) * top], dim=-3)
    return torch.cat([per_class, pos], dim=-3)


class LayoutEncoder(torch.nn.Module):
    """Layout maps -> one feature map per U-Net resolution, each through a zero-initialised 1x1 conv (T2I-Adapter,
    Mou et al. 2023; ControlNet's zero convolutions), so a fresh encoder adds exactly 0 and the U-Net it feeds is
    the model without layout.

    The layout grid is `grid_factor` times finer than the U-Net input (the latent): stride-2 convs bring it to the
    latent resolution (ds 1), then one more stride-2 conv per further U-Net level.

    Args:
        in_channels: `layout_channels(num_classes)`.
        hidden: width of the encoder's convs.
        out_channels: U-Net channels at ds 1, 2, 4, ... (one output per entry).
        grid_factor: layout cells per latent cell along each axis (a power of 2).
    """

    def __init__(self, in_channels: int, hidden: int, out_channels: list[int], grid_factor: int = 2) -> None:
        super().__init__()
        nn = torch.nn
        if grid_factor < 1 or grid_factor & (grid_factor - 1):
            raise ValueError(f"grid_factor must be a power of 2, got {grid_factor}")
        self.grid_factor = grid_factor
        stem = [nn.Conv2d(in_channels, hidden, 3, padding=1), nn.SiLU()]
        for _ in range(grid_factor.bit_length() - 1):
            stem += [nn.Conv2d(hidden, hidden, 3, stride=2, padding=1), nn.SiLU()]
        stem += [nn.Conv2d(hidden, hidden, 3, padding=1), nn.SiLU()]
        self.stem = nn.Sequential(*stem)
        self.downs = nn.ModuleList(
            [nn.Sequential(nn.Conv2d(hidden, hidden, 3, stride=2, padding=1), nn.SiLU(),
                           nn.Conv2d(hidden, hidden, 3, padding=1), nn.SiLU()) for _ in out_channels[1:]])
        self.outs = nn.ModuleList([nn.Conv2d(hidden, c, 1) for c in out_channels])
        for conv in self.outs:
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)

    def forward(self, layout: torch.Tensor) -> list[torch.Tensor]:
        """layout (N, in_channels, grid_factor * h, grid_factor * w) -> [(N, out_channels[k], h / 2^k, w / 2^k)]."""
        f = self.stem(layout)
        feats = [self.outs[0](f)]
        for down, out in zip(self.downs, self.outs[1:], strict=True):
            f = down(f)
            feats.append(out(f))
        return feats
