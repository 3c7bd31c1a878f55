"""Box packing and flip geometry (no data needed)."""

import numpy as np
import pytest
import torch
from drivesim.bbox_conditioning.boxes import boxes_to_pixels, hflip_boxes, pack_boxes


def test_pack_boxes_normalises_pads_and_keeps_largest():
    frames = [
        [(7, 0, 10.0, 20.0, 30.0, 40.0)],  # area 400
        [(1, 2, 0.0, 0.0, 10.0, 10.0),  # area 100
         (2, 3, 50.0, 10.0, 90.0, 50.0),  # area 1600
         (3, 8, 60.0, 60.0, 80.0, 100.0)],  # area 800
        [],
    ]
    p = pack_boxes(frames, width=100, height=200, max_boxes=2)
    assert p.boxes.shape == (3, 2, 4) and p.boxes.dtype == np.float32
    assert p.classes.shape == (3, 2) and p.classes.dtype == np.int64
    assert p.box_mask.dtype == bool and p.track_ids.dtype == np.int64
    np.testing.assert_allclose(p.boxes[0, 0], [0.1, 0.1, 0.3, 0.2])
    assert p.box_mask[0].tolist() == [True, False]
    assert p.track_ids[0].tolist() == [7, -1] and p.boxes[0, 1].tolist() == [0, 0, 0, 0]
    # three boxes, two slots: the two largest by area, in decreasing area
    assert p.track_ids[1].tolist() == [2, 3] and p.classes[1].tolist() == [3, 8]
    np.testing.assert_allclose(p.boxes[1, 0], [0.5, 0.05, 0.9, 0.25])
    assert not p.box_mask[2].any() and (p.track_ids[2] == -1).all()


def test_pack_boxes_clamps_to_unit_square_and_rejects_bad_sizes():
    p = pack_boxes([[(0, 0, -5.0, 0.0, 120.0, 50.0)]], 100, 100, 4)
    np.testing.assert_allclose(p.boxes[0, 0], [0.0, 0.0, 1.0, 0.5])
    with pytest.raises(ValueError):
        pack_boxes([[]], 0, 10, 4)
    with pytest.raises(ValueError):
        pack_boxes([[]], 10, 10, 0)


def test_hflip_boxes_mirrors_and_is_an_involution():
    b = torch.tensor([[0.1, 0.2, 0.4, 0.6], [0.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([True, False])
    f = hflip_boxes(b, mask)
    torch.testing.assert_close(f[0], torch.tensor([0.6, 0.2, 0.9, 0.6]))
    assert f[1].tolist() == [0, 0, 0, 0]  # padding untouched
    torch.testing.assert_close(hflip_boxes(f, mask), b)
    n = hflip_boxes(b.numpy(), mask.numpy())
    np.testing.assert_allclose(n, f.numpy())
    # pixel widths are preserved
    px, fpx = boxes_to_pixels(b[:1], 64, 32), boxes_to_pixels(f[:1], 64, 32)
    torch.testing.assert_close(px[:, 2] - px[:, 0], fpx[:, 2] - fpx[:, 0])
