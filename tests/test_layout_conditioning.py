"""The layout path: layout maps, the zero-initialised layout encoder (a fresh model is the model without it), local
placement once trained weights exist, dropping with the boxes, and the joint all-null guidance dropout."""

from __future__ import annotations

import dataclasses

import torch
from drivesim.bbox_conditioning.layout import LayoutEncoder, layout_channels, layout_map

from drivesim.configs import LayoutConfig, get_preset
from drivesim.diffusion import drop_conditions
from drivesim.types import Conditioning
from drivesim.unet import SpatialUNet

TINY = get_preset("tiny").image_ldm.unet
LAYOUT = dataclasses.replace(TINY, layout=LayoutConfig(enabled=True, grid_factor=2, hidden=16))


def _cond(boxes, classes=None, b=1, t=1):
    n = boxes.shape[-2]
    return Conditioning(boxes=boxes.reshape(b, t, n, 4), classes=(classes if classes is not None else
                                                                  torch.zeros(b, t, n, dtype=torch.long)),
                        box_mask=torch.ones(b, t, n, dtype=torch.bool), night=torch.zeros(b, dtype=torch.long),
                        crowdedness=torch.zeros(b, dtype=torch.long))


def test_layout_map_channels_and_values():
    boxes = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 0.75, 1.0]])
    lay = layout_map(boxes, torch.tensor([0, 3]), torch.tensor([True, True]), 4, 4, num_classes=5)
    assert lay.shape == (layout_channels(5), 4, 4) == (7, 4, 4)
    assert lay[0, :2, :2].eq(1).all() and lay[0].sum() == 4  # class 0 covers the top-left quarter
    assert lay[3, 2:, 2].eq(1).all() and lay[3].sum() == 2  # class 3: one column of two cells
    assert lay[1].sum() == 0
    # in-box position: cell centres of the first box at u = -0.5, 0.5 (x) and v = -0.5, 0.5 (y)
    torch.testing.assert_close(lay[5, 0, :2], torch.tensor([-0.5, 0.5]))
    torch.testing.assert_close(lay[6, :2, 0], torch.tensor([-0.5, 0.5]))
    assert lay[5:, 0, 3].abs().sum() == 0  # outside every box
    # a box half a cell wide leaves half a cell of coverage
    half = layout_map(torch.tensor([[0.0, 0.0, 0.125, 0.25]]), torch.tensor([1]), torch.tensor([True]), 4, 4, 5)
    assert half[1, 0, 0] == 0.5 and half[1].sum() == 0.5


def test_fresh_layout_model_is_the_model_without_layout():
    torch.manual_seed(0)
    with_layout = SpatialUNet(LAYOUT).eval()
    plain = SpatialUNet(TINY).eval()
    missing, unexpected = plain.load_state_dict(with_layout.state_dict(), strict=False)
    assert not missing and unexpected and all(k.startswith("layout_encoder.") for k in unexpected)
    with torch.no_grad():
        with_layout.out_conv.weight.normal_(0, 0.1)
        plain.out_conv.weight.copy_(with_layout.out_conv.weight)
    x = torch.randn(1, 1, 4, 4, 8)
    cond = _cond(torch.tensor([[0.1, 0.2, 0.4, 0.9]]))
    t = torch.tensor([300])
    assert torch.equal(with_layout(x, t, cond), plain(x, t, cond))  # same shapes, + exact zeros


def _trained_like(seed=0) -> SpatialUNet:
    torch.manual_seed(seed)
    unet = SpatialUNet(LAYOUT).eval()
    with torch.no_grad():
        unet.out_conv.weight.normal_(0, 0.1)
        for name, p in unet.named_parameters():
            if name.startswith("layout_encoder.outs") and name.endswith("weight"):
                p.normal_(0, 0.5)
    return unet


def test_layout_moves_output_where_the_box_moves_and_drops_with_the_boxes():
    unet = _trained_like()
    x = torch.randn(1, 1, 4, 4, 8)
    t = torch.tensor([500])
    left = _cond(torch.tensor([[0.0, 0.0, 0.25, 0.5]]))
    right = _cond(torch.tensor([[0.75, 0.5, 1.0, 1.0]]))
    empty = _cond(torch.zeros(0, 4))
    with torch.no_grad():
        base = unet(x, t, empty)
        d_left = (unet(x, t, left) - base).abs().sum(dim=(0, 1, 2))  # (h, w)
        d_right = (unet(x, t, right) - base).abs().sum(dim=(0, 1, 2))
        # the change is larger near the box than on the far side of the frame
        assert d_left[:2, :2].mean() > d_left[2:, 6:].mean()
        assert d_right[2:, 6:].mean() > d_right[:2, :2].mean()
        # drop_boxes removes the layout (and the tokens): equal to a frame without boxes up to GEMM rounding
        dropped = unet(x, t, left.replace(drop_boxes=torch.tensor([True])))
        torch.testing.assert_close(dropped, base, atol=1e-5, rtol=1e-5)


def test_layout_encoder_shapes():
    enc = LayoutEncoder(7, 8, [16, 32, 32], grid_factor=4)
    feats = enc(torch.randn(2, 7, 32, 64))
    assert [tuple(f.shape) for f in feats] == [(2, 16, 8, 16), (2, 32, 4, 8), (2, 32, 2, 4)]
    assert all(f.abs().sum() == 0 for f in feats)  # zero-initialised outputs


def test_drop_conditions_trains_the_all_null_branch():
    cond = _cond(torch.rand(64, 1, 1, 4).sort(-1).values, b=64)
    independent = drop_conditions(cond, TINY, torch.Generator().manual_seed(0))
    both = (independent.drop_night & independent.drop_crowdedness & independent.drop_boxes).float().mean()
    joint = drop_conditions(cond, dataclasses.replace(TINY, drop_all_p=0.5), torch.Generator().manual_seed(0))
    all_null = (joint.drop_night & joint.drop_crowdedness & joint.drop_boxes).float().mean()
    assert both < 0.05 and all_null > 0.3
    # without a joint drop the draws are those of a (3, b) uniform tensor (old runs reproduce)
    u = torch.rand(3, 64, generator=torch.Generator().manual_seed(0))
    assert torch.equal(independent.drop_boxes, u[2] < TINY.boxes.drop_boxes_p)
