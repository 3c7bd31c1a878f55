"""PSNR / SSIM / flicker of the autoencoder report, against independent computations (scipy, closed forms)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from drivesim.autoencoder.metrics import flicker, psnr, ssim


def _scipy_ssim(x: np.ndarray, y: np.ndarray) -> float:
    """Wang et al. with scipy's Gaussian filter (radius 5 = the 11-tap window), valid region only, per channel."""
    out = []
    for ch in range(x.shape[0]):
        a, b = x[ch].astype(np.float64), y[ch].astype(np.float64)

        def f(z):
            return gaussian_filter(z, 1.5, truncate=5 / 1.5, mode="constant")[5:-5, 5:-5]

        mx, my = f(a), f(b)
        sxx, syy, sxy = f(a * a) - mx**2, f(b * b) - my**2, f(a * b) - mx * my
        c1, c2 = 0.01**2, 0.03**2
        m = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx**2 + my**2 + c1) * (sxx + syy + c2))
        out.append(m.mean())
    return float(np.mean(out))


def test_ssim_matches_scipy_reference():
    g = torch.Generator().manual_seed(0)
    ref = torch.rand(2, 3, 3, 24, 32, generator=g)
    rec = (ref + 0.1 * torch.randn(ref.shape, generator=g)).clamp(0, 1)
    got = ssim(rec, ref)
    assert got.shape == (2, 3)
    for bi in range(2):
        for ti in range(3):
            assert got[bi, ti].item() == pytest.approx(_scipy_ssim(rec[bi, ti].numpy(), ref[bi, ti].numpy()),
                                                       abs=1e-9)
    assert torch.allclose(ssim(ref, ref), torch.ones(2, 3, dtype=torch.float64))
    assert (got < 0.99).all()
    with pytest.raises(ValueError):
        ssim(ref[..., :8, :8], ref[..., :8, :8])


def test_psnr_closed_form():
    ref = torch.zeros(1, 2, 3, 8, 8)
    rec = ref + 0.1
    assert psnr(rec, ref)[0, 0].item() == pytest.approx(20.0, abs=1e-6)  # 10 log10(1 / 0.01)
    assert math.isinf(psnr(ref, ref)[0, 0].item())


def test_flicker_ignores_constant_error_counts_changing_error():
    g = torch.Generator().manual_seed(1)
    ref = torch.rand(1, 4, 3, 8, 8, generator=g)
    assert flicker(ref + 0.2, ref).abs().max() < 1e-6  # float32 rounding of the offset only
    signs = torch.tensor([1.0, -1.0, 1.0, -1.0]).view(1, 4, 1, 1, 1)
    alternating = ref + 0.05 * signs  # error jumps by 0.1 every frame
    torch.testing.assert_close(flicker(alternating, ref), torch.full((1, 3), 0.1, dtype=torch.float64))
