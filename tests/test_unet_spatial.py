"""Spatial U-Net: shapes, box/label conditioning properties, frame folding, temporal extension point."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from drivesim.bbox_conditioning.classes import crowdedness_bucket
from torch import nn

from drivesim.configs import get_preset
from drivesim.errors import ConfigError
from drivesim.types import Conditioning
from drivesim.unet import SpatialUNet, count_parameters

TINY = get_preset("tiny").image_ldm.unet
PAPER_PARAMS = 829_557_988  # 828,031,972 before the layout encoder (1,526,016 parameters)


def _unet(open_gates: bool = True, seed: int = 0) -> SpatialUNet:
    torch.manual_seed(seed)
    unet = SpatialUNet(TINY).eval()
    with torch.no_grad():
        unet.out_conv.weight.normal_(0, 0.1)  # zero-init out conv would make every output 0
        for name, p in unet.named_parameters():
            # zero-initialised residual branches make blocks identities; give them weights so tests can fail
            if name.endswith(("conv2.weight", "proj_out.weight")):
                p.normal_(0, 0.05)
            if open_gates and name.endswith(("gate_attn", "gate_ff")):
                p.fill_(1.0)
    return unet


def _cond(b=2, t=2, n=3, seed=0) -> Conditioning:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(b, t, n, 2, generator=g) * 0.6
    wh = torch.rand(b, t, n, 2, generator=g) * 0.3 + 0.05
    return Conditioning(
        boxes=torch.cat([xy, xy + wh], dim=-1), classes=torch.randint(0, 11, (b, t, n), generator=g),
        box_mask=torch.ones(b, t, n, dtype=torch.bool), night=torch.arange(b) % 2,
        crowdedness=torch.arange(b) * 4,
    )


def _x(b=2, t=2, seed=1):
    return torch.randn(b, t, 4, 4, 8, generator=torch.Generator().manual_seed(seed))


def test_shapes_tiny_and_timestep_layouts():
    unet = _unet()
    x, cond = _x(), _cond()
    out = unet(x, torch.tensor([3, 500]), cond)
    assert out.shape == x.shape and out.dtype == torch.float32
    # (b,) timesteps equal the same timesteps given per frame
    out2 = unet(x, torch.tensor([[3, 3], [500, 500]]), cond)
    assert torch.equal(out, out2)
    with pytest.raises(ValueError, match="divisible"):
        unet(torch.randn(2, 2, 4, 5, 8), torch.tensor([1, 2]), cond)


def test_fresh_unet_output_is_zero_and_gates_closed():
    unet = SpatialUNet(TINY)
    out = unet(_x(), torch.tensor([1, 2]), _cond())
    assert torch.count_nonzero(out) == 0  # zero-initialised out conv (ADM)
    gates = [p for n, p in unet.named_parameters() if n.endswith(("gate_attn", "gate_ff"))]
    assert gates and all(float(g.detach()) == 0.0 for g in gates)


def test_gate_zero_output_independent_of_boxes():
    unet = _unet(open_gates=False)
    x, t = _x(), torch.tensor([10, 900])
    a = unet(x, t, _cond(seed=0))
    b = unet(x, t, _cond(seed=0).replace(boxes=torch.rand(2, 2, 3, 4), classes=torch.randint(0, 11, (2, 2, 3))))
    assert torch.equal(a, b)
    # the same change matters once the gates are open (so the check above can fail)
    unet = _unet(open_gates=True)
    a = unet(x, t, _cond(seed=0))
    b = unet(x, t, _cond(seed=0).replace(boxes=torch.rand(2, 2, 3, 4), classes=torch.randint(0, 11, (2, 2, 3))))
    assert not torch.allclose(a, b, atol=1e-4)


def test_permuting_boxes_does_not_change_output():
    unet = _unet()
    cond = _cond(n=4)
    perm = torch.tensor([2, 0, 3, 1])
    permuted = cond.replace(boxes=cond.boxes[:, :, perm], classes=cond.classes[:, :, perm],
                            box_mask=cond.box_mask[:, :, perm])
    x, t = _x(), torch.tensor([10, 900])
    torch.testing.assert_close(unet(x, t, permuted), unet(x, t, cond), atol=1e-5, rtol=1e-5)


def test_padded_slot_equals_absent_box():
    unet = _unet()
    cond = _cond(n=3)
    padded = cond.replace(box_mask=cond.box_mask.clone())
    padded.box_mask[:, :, 2] = False
    padded.boxes[:, :, 2] = torch.tensor([0.9, 0.9, 0.1, 0.1])  # garbage in the padded slot
    absent = cond.replace(boxes=cond.boxes[:, :, :2], classes=cond.classes[:, :, :2],
                          box_mask=cond.box_mask[:, :, :2])
    x, t = _x(), torch.tensor([10, 900])
    # 3 vs 2 box slots: the same maths on other GEMM shapes, so equal up to kernel rounding (not bitwise on every CPU)
    torch.testing.assert_close(unet(x, t, padded), unet(x, t, absent), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(unet(x, t, padded), unet(x, t, cond), atol=1e-4)


def test_dropped_boxes_equal_no_boxes_and_labels_use_nulls():
    unet = _unet()
    cond = _cond()
    x, t = _x(), torch.tensor([10, 900])
    dropped = unet(x, t, cond.replace(drop_boxes=torch.tensor([True, False])))
    none = unet(x, t, cond.replace(box_mask=torch.zeros_like(cond.box_mask)))
    full = unet(x, t, cond)
    assert torch.equal(dropped[0], none[0]) and torch.equal(dropped[1], full[1])
    # a dropped night label is neither day nor night
    null_night = unet(x, t, cond.replace(drop_night=torch.tensor([True, True])))
    for night in (0, 1):
        other = unet(x, t, cond.replace(night=torch.full((2,), night)))
        assert not torch.allclose(null_night, other, atol=1e-5)
    null_crowd = unet(x, t, cond.replace(drop_crowdedness=torch.tensor([True, True])))
    assert not torch.allclose(null_crowd, full, atol=1e-5)


def test_crowdedness_buckets_match_classes_module():
    unet = SpatialUNet(TINY)
    counts = torch.arange(0, 16)
    got = torch.bucketize(counts, unet.crowdedness_edges, right=True)
    assert got.tolist() == [crowdedness_bucket(int(c)) for c in counts]


def test_frames_fold_into_batch_independently():
    unet = _unet()
    x, cond, t = _x(b=2, t=3), _cond(b=2, t=3), torch.tensor([10, 900])
    out = unet(x, t, cond)
    for f in range(3):
        single = cond.replace(boxes=cond.boxes[:, f:f + 1], classes=cond.classes[:, f:f + 1],
                              box_mask=cond.box_mask[:, f:f + 1])
        torch.testing.assert_close(unet(x[:, f:f + 1], t, single), out[:, f:f + 1], atol=1e-5, rtol=1e-5)


class _Identity(nn.Module):
    def forward(self, h, emb, ctx):
        return h


class _AddFrameMean(nn.Module):
    """A toy temporal layer: mixes information across frames."""

    def __init__(self, channels):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(0.5))

    def forward(self, h, emb, ctx):
        from einops import rearrange, reduce, repeat

        v = rearrange(h, "(b t) c h w -> b t c h w", t=ctx.num_frames)
        mean = repeat(reduce(v, "b t c h w -> b c h w", "mean"), "b c h w -> (b t) c h w", t=ctx.num_frames)
        return h + self.scale * mean


def test_temporal_extension_point():
    image = _unet()
    x, cond, t = _x(), _cond(), torch.tensor([10, 900])
    ref = image(x, t, cond)
    video = _unet()
    n = video.insert_temporal_layers(lambda spec: _Identity() if spec.kind in ("res", "attn") else None)
    assert n > 0
    assert torch.equal(video(x, t, cond), ref)  # temporal layers returning h reproduce the image model exactly
    mixing = _unet()
    mixing.insert_temporal_layers(lambda spec: _AddFrameMean(spec.channels) if spec.kind == "res" else None)
    assert not torch.allclose(mixing(x, t, cond), ref, atol=1e-4)
    # spatial parameter names are unchanged: an image checkpoint loads with only temporal keys missing
    fresh = SpatialUNet(TINY)
    fresh.insert_temporal_layers(lambda spec: _AddFrameMean(spec.channels) if spec.kind == "res" else None)
    result = fresh.load_state_dict(image.state_dict(), strict=False)
    assert not result.unexpected_keys
    assert result.missing_keys and all(".temporal." in k for k in result.missing_keys)


def test_gradient_checkpointing_matches():
    x, cond, t = _x(), _cond(), torch.tensor([10, 900])
    grads = []
    for flag in (False, True):
        unet = _unet().train()
        unet.gradient_checkpointing = flag
        unet(x, t, cond).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in unet.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)


def test_preset_param_counts():
    with torch.device("meta"):
        paper = SpatialUNet(get_preset("paper-512x1024").image_ldm.unet)
    assert count_parameters(paper) == PAPER_PARAMS
    # 6,515,858 before the layout encoder
    assert count_parameters(SpatialUNet(get_preset("cpu-small").image_ldm.unet)) == 6_761_618


def test_bad_config_raises():
    with pytest.raises(ConfigError, match="num_crowdedness_buckets"):
        SpatialUNet(dataclasses.replace(TINY, num_crowdedness_buckets=3))
    with pytest.raises(ConfigError, match="num_head_channels"):
        SpatialUNet(dataclasses.replace(TINY, num_head_channels=24))
