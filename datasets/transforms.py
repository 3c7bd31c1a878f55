"""Frame/box transforms that keep boxes consistent with the pixels: resize, cover-crop, horizontal flip.

Frames on disk are (t, h, w, 3) uint8 RGB; model tensors are (t, 3, h, w) float in [-1, 1]. Pixel boxes are
xyxy in the image frame (x right, y down, origin at the top-left corner of the top-left pixel); normalised boxes
are the same divided by (w, h, w, h), so a plain resize leaves normalised boxes unchanged.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
from drivesim.bbox_conditioning.boxes import hflip_boxes
from einops import rearrange


def _interp(src_hw: tuple[int, int], dst_hw: tuple[int, int]) -> int:
    # INTER_AREA is the anti-aliased choice for shrinking; when enlarging OpenCV's INTER_AREA degrades to
    # nearest-neighbour, so bilinear is used there instead.
    return cv2.INTER_AREA if dst_hw[0] <= src_hw[0] and dst_hw[1] <= src_hw[1] else cv2.INTER_LINEAR


def resize_frames(frames: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize every frame to `size` = (h, w) with OpenCV (INTER_AREA when shrinking, bilinear when enlarging).

    Args:
        frames: (t, h, w, 3) or (h, w, 3) uint8 RGB.

    Returns:
        (t, H, W, 3) or (H, W, 3) uint8 (the input itself when the size already matches).
    """
    h, w = frames.shape[-3:-1]
    dst_h, dst_w = size
    if (h, w) == (dst_h, dst_w):
        return frames
    flag = _interp((h, w), (dst_h, dst_w))
    if frames.ndim == 3:
        return cv2.resize(frames, (dst_w, dst_h), interpolation=flag)
    return np.stack([cv2.resize(f, (dst_w, dst_h), interpolation=flag) for f in frames])


def resize_boxes_px(boxes: np.ndarray, src_size: tuple[int, int], dst_size: tuple[int, int]) -> np.ndarray:
    """Scale pixel xyxy boxes (..., 4) from a `src_size` = (h, w) image to a `dst_size` = (h, w) image."""
    sy, sx = dst_size[0] / src_size[0], dst_size[1] / src_size[1]
    return np.asarray(boxes, np.float64) * np.array([sx, sy, sx, sy])


def cover_crop_params(src_size: tuple[int, int], dst_size: tuple[int, int]) -> tuple[float, float, float]:
    """Scale and offset of an aspect-preserving resize that covers `dst_size`, then a centred crop.

    Returns:
        (scale, x0, y0): a source pixel coordinate p maps to `p * scale - (x0, y0)` in the output.
    """
    (sh, sw), (dh, dw) = src_size, dst_size
    scale = max(dh / sh, dw / sw)
    return scale, (sw * scale - dw) / 2, (sh * scale - dh) / 2


def cover_crop_image(image: np.ndarray, dst_size: tuple[int, int]) -> np.ndarray:
    """Resize (h, w, 3) uint8 preserving aspect so it covers `dst_size` = (h, w), then centre-crop to it."""
    scale, x0, y0 = cover_crop_params(image.shape[:2], dst_size)
    rh, rw = max(dst_size[0], round(image.shape[0] * scale)), max(dst_size[1], round(image.shape[1] * scale))
    resized = resize_frames(image, (rh, rw))
    top, left = (rh - dst_size[0]) // 2, (rw - dst_size[1]) // 2
    return resized[top:top + dst_size[0], left:left + dst_size[1]]


def cover_crop_boxes(boxes: np.ndarray, src_size: tuple[int, int], dst_size: tuple[int, int]) -> np.ndarray:
    """Map pixel xyxy boxes (..., 4) through `cover_crop_image` (not clipped: the caller clips/drops)."""
    scale, x0, y0 = cover_crop_params(src_size, dst_size)
    return np.asarray(boxes, np.float64) * scale - np.array([x0, y0, x0, y0])


def frames_to_tensor(frames: np.ndarray) -> torch.Tensor:
    """(t, h, w, 3) uint8 RGB -> (t, 3, h, w) float32 in [-1, 1]."""
    # Done in numpy: the channel-first copy on uint8, then one fused float pass. Small elementwise torch ops pay
    # intra-op thread sync that dominated the data loader (~25 ms vs ~1.5 ms per 8x128x256 window on 2 busy cores).
    chw = np.ascontiguousarray(rearrange(np.asarray(frames), "t h w c -> t c h w"))
    return torch.from_numpy(chw.astype(np.float32) / np.float32(127.5) - np.float32(1.0))


def tensor_to_frames(x: torch.Tensor) -> np.ndarray:
    """(t, 3, h, w) float in [-1, 1] -> (t, h, w, 3) uint8 RGB (rounded, clamped)."""
    x = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return rearrange(x, "t c h w -> t h w c").cpu().numpy()


def hflip(frames: torch.Tensor, boxes: torch.Tensor, mask: torch.Tensor | None = None):
    """Mirror frames and their boxes together about the vertical image axis.

    Args:
        frames: (..., c, h, w) tensor (pixels or latents); the last axis (w) is reversed.
        boxes: (..., n, 4) normalised xyxy; mapped to (1 - x2, y1, 1 - x1, y2).
        mask: (..., n) bool; padding slots are left untouched.

    Returns:
        (frames, boxes) mirrored. A box covers the mirrored pixels: pixel column j moves to w - 1 - j and the
        box's column interval [x1 w, x2 w) moves to [w - x2 w, w - x1 w).
    """
    return torch.flip(frames, dims=(-1,)), hflip_boxes(boxes, mask)


class RandomHFlip:
    """Flip a sample dict ("frames", "boxes", "box_mask") with probability `p`, using `generator` if given."""

    def __init__(self, p: float = 0.5):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be in [0, 1], got {p}")
        self.p = p

    def __call__(self, sample: dict, generator: torch.Generator | None = None) -> dict:
        if self.p == 0.0 or torch.rand((), generator=generator).item() >= self.p:
            return sample
        out = dict(sample)
        out["frames"], out["boxes"] = hflip(sample["frames"], sample["boxes"], sample["box_mask"])
        return out
