"""Box tokens and gated self-attention (bbox_conditioning leaf package)."""

from __future__ import annotations

import math

import torch
from drivesim.bbox_conditioning.gated_attention import GatedSelfAttention
from drivesim.bbox_conditioning.tokens import BoxTokenizer, fourier_features


def test_fourier_features_closed_form():
    xyxy = torch.tensor([[0.25, 0.5, 0.75, 1.0]])
    f = fourier_features(xyxy, 3)
    assert f.shape == (1, 4 + 8 * 3)
    torch.testing.assert_close(f[0, :4], xyxy[0])
    # layout: [raw xyxy, then per coordinate: sin at every frequency, cos at every frequency], freqs pi * 2^k
    per_coord = f[0, 4:].view(4, 2, 3)
    sin, cos = per_coord[:, 0], per_coord[:, 1]
    for c in range(4):
        for k in range(3):
            angle = math.pi * 2**k * xyxy[0, c].item()
            assert abs(sin[c, k].item() - math.sin(angle)) < 1e-5
            assert abs(cos[c, k].item() - math.cos(angle)) < 1e-5


def _tokenizer(max_boxes=6):
    torch.manual_seed(0)
    return BoxTokenizer(num_classes=11, token_dim=16, fourier_freqs=4, max_boxes=max_boxes)


def test_tokens_null_padding_and_shape():
    tok = _tokenizer()
    boxes = torch.rand(2, 3, 4, 4)
    classes = torch.randint(0, 11, (2, 3, 4))
    mask = torch.ones(2, 3, 4, dtype=torch.bool)
    mask[0, 1, 2:] = False
    out = tok(boxes, classes, mask)
    assert out.shape == (6, 6, 16)
    # frame (b=0, t=1) is row 1 of the (b t) axis; its slots 2.. and the two padding slots are the null token
    for slot in range(2, 6):
        torch.testing.assert_close(out[1, slot], tok.null_token.detach())
    assert not torch.allclose(out[1, 0], tok.null_token)


def test_invalid_slot_contents_are_ignored():
    tok = _tokenizer()
    boxes = torch.rand(1, 1, 3, 4)
    classes = torch.tensor([[[0, 1, 2]]])
    mask = torch.tensor([[[True, True, False]]])
    a = tok(boxes, classes, mask)
    garbage = boxes.clone()
    garbage[0, 0, 2] = float("nan")
    b = tok(garbage, torch.tensor([[[0, 1, -7]]]), mask)
    assert torch.equal(a, b)
    # an absent box (n = 2) gives the same token set as a padded third slot, up to the last bits: the MLP runs on
    # 2 vs 3 rows, and oneDNN/MKL pick other GEMM kernels by row count on some CPUs (seen: avx512 Xeon)
    c = tok(boxes[:, :, :2], classes[:, :, :2], mask[:, :, :2])
    torch.testing.assert_close(a, c, atol=1e-6, rtol=1e-5)


def test_gated_attention_gate_zero_is_identity_and_permutation_invariant():
    torch.manual_seed(0)
    attn = GatedSelfAttention(dim=32, context_dim=16, num_heads=2)
    x = torch.randn(3, 10, 32)
    tokens = torch.randn(3, 5, 16)
    assert torch.equal(attn(x, tokens), x)
    with torch.no_grad():
        attn.gate_attn.fill_(1.0)
        attn.gate_ff.fill_(0.5)
    y = attn(x, tokens)
    assert not torch.allclose(y, x)
    y2 = attn(x, tokens + 1.0)
    assert not torch.allclose(y, y2)  # the box tokens matter once the gate opens
    perm = torch.tensor([3, 0, 4, 2, 1])
    torch.testing.assert_close(attn(x, tokens[:, perm]), y, atol=1e-5, rtol=1e-5)


def test_gate_init_opens_the_box_path_of_the_unet_from_the_start():
    """`boxes.gate_init` reaches every gated layer of the U-Net: 0 gives the GLIGEN identity, 1 gives tanh(1)."""
    import dataclasses

    from drivesim.configs import get_preset
    from drivesim.unet.spatial import SpatialUNet

    base = get_preset("tiny").image_ldm.unet
    for init in (0.0, 1.0):
        unet = SpatialUNet(dataclasses.replace(base, boxes=dataclasses.replace(base.boxes, gate_init=init)))
        gates = [p for n, p in unet.named_parameters() if n.endswith(("gate_attn", "gate_ff"))]
        assert gates and all(g.item() == init for g in gates)


def _raster(boxes: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(n, 4) normalised xyxy -> (h, w) bool of pixel centres inside any box (the box <-> pixel convention)."""
    ys = (torch.arange(h) + 0.5) / h
    xs = (torch.arange(w) + 0.5) / w
    inside = [(xs >= b[0]) & (xs < b[2]) & (ys[:, None] >= b[1]) & (ys[:, None] < b[3]) for b in boxes]
    return torch.stack(inside).any(0)


def test_hflip_of_latents_and_boxes_is_consistent_with_tokens():
    """The data augmentation mirrors latents and boxes together: the box still covers the same content, and the
    box tokens see the mirrored coordinates (x -> 1 - x, x1/x2 swapped so x1 < x2 stays true)."""
    from drivesim.datasets.transforms import hflip

    h, w = 4, 8
    boxes = torch.tensor([[[0.125, 0.25, 0.5, 0.75], [0.625, 0.0, 0.875, 0.5]]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    content = _raster(boxes[0], h, w).float()[None, None]  # latent "objects" exactly where the boxes are
    flipped, fboxes = hflip(content, boxes, mask)
    assert torch.equal(_raster(fboxes[0], h, w).float(), flipped[0, 0])
    assert bool((fboxes[..., 2] > fboxes[..., 0]).all())
    tok = _tokenizer()
    a = tok(boxes[None], torch.zeros(1, 1, 2, dtype=torch.long), mask[None])
    b = tok(fboxes[None], torch.zeros(1, 1, 2, dtype=torch.long), mask[None])
    assert not torch.allclose(a[:, :2], b[:, :2])  # a mirrored layout is a different condition
