"""Frame transforms keep boxes on the same pixels: resize, cover-crop, horizontal flip."""

import numpy as np
import torch
from drivesim.datasets.transforms import (
    RandomHFlip,
    cover_crop_boxes,
    cover_crop_image,
    frames_to_tensor,
    hflip,
    resize_boxes_px,
    resize_frames,
    tensor_to_frames,
)


def _frame_with_box(h, w, box):
    img = np.zeros((h, w, 3), np.uint8)
    x1, y1, x2, y2 = box
    img[y1:y2, x1:x2] = 255
    return img


def test_resize_keeps_box_on_the_object():
    img = _frame_with_box(64, 128, (32, 16, 64, 48))
    small = resize_frames(img[None], (32, 64))[0]
    assert small.shape == (32, 64, 3)
    x1, y1, x2, y2 = resize_boxes_px(np.array([32, 16, 64, 48]), (64, 128), (32, 64))
    np.testing.assert_allclose([x1, y1, x2, y2], [16, 8, 32, 24])
    inside = small[int(y1):int(y2), int(x1):int(x2)]
    assert (inside == 255).all()  # INTER_AREA on a 2x2-aligned object: exactly the object
    outside = small.copy()
    outside[int(y1):int(y2), int(x1):int(x2)] = 0
    assert (outside == 0).all()


def test_cover_crop_maps_boxes_with_the_pixels():
    img = _frame_with_box(90, 160, (40, 30, 100, 70))  # 16:9 -> 1:2 needs a vertical crop
    out = cover_crop_image(img, (32, 64))
    assert out.shape == (32, 64, 3)
    x1, y1, x2, y2 = cover_crop_boxes(np.array([40, 30, 100, 70]), (90, 160), (32, 64))
    # scale 0.4 -> 64x36, crop 2 rows: (16, 10, 40, 26)
    np.testing.assert_allclose([x1, y1, x2, y2], [16, 10, 40, 26])
    mask = out[..., 0] > 127
    ys, xs = np.nonzero(mask)
    assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (16, 10, 40, 26)


def test_hflip_mirrors_image_and_box_covers_same_pixels():
    img = _frame_with_box(32, 64, (5, 4, 20, 12))
    frames = frames_to_tensor(img[None])  # (1, 3, 32, 64)
    boxes = torch.tensor([[[5 / 64, 4 / 32, 20 / 64, 12 / 32]]])
    mask = torch.tensor([[True]])
    ff, fb = hflip(frames, boxes, mask)
    out = tensor_to_frames(ff)[0]
    np.testing.assert_array_equal(out, img[:, ::-1])
    x1, y1, x2, y2 = (fb[0, 0] * torch.tensor([64, 32, 64, 32])).round().int().tolist()
    assert (x1, y1, x2, y2) == (64 - 20, 4, 64 - 5, 12)
    ys, xs = np.nonzero(out[..., 0] > 127)
    assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x1, y1, x2, y2)


def test_random_hflip_probability_extremes():
    sample = {"frames": torch.arange(8.0).reshape(1, 1, 1, 8), "boxes": torch.tensor([[[0.0, 0.0, 0.25, 1.0]]]),
              "box_mask": torch.tensor([[True]])}
    same = RandomHFlip(0.0)(sample)
    assert same["frames"] is sample["frames"]
    flipped = RandomHFlip(1.0)(sample)
    assert flipped["frames"][0, 0, 0].tolist() == list(range(7, -1, -1))
    assert flipped["boxes"][0, 0].tolist() == [0.75, 0.0, 1.0, 1.0]
