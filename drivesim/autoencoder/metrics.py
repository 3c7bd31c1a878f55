"""Reconstruction metrics for the autoencoder report: PSNR, SSIM (Gaussian window) and temporal flicker.

All take videos `(b, t, c, h, w)` float in [0, 1] (map [-1, 1] frames with (x + 1) / 2) on any device and return
per-frame values `(b, t)` (flicker: per frame pair, `(b, t - 1)`) in float64 on the CPU, so callers can average
however they like.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange

__all__ = ["psnr", "ssim", "flicker", "gaussian_window"]


def _f64(x: torch.Tensor) -> torch.Tensor:
    """float64 on the CPU: the metrics accumulate in float64, which some accelerators lack (Apple MPS)."""
    return x.detach().float().cpu().double()


def psnr(rec: torch.Tensor, ref: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio per frame, dB: 10 log10(range^2 / MSE) over (c, h, w). (b, t) float64.

    Identical frames give +inf.
    """
    mse = (_f64(rec) - _f64(ref)).pow(2).mean(dim=(-3, -2, -1))
    return 10.0 * torch.log10(data_range**2 / mse)


def gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Normalised 1-D Gaussian (size,) float64, centred."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(rec: torch.Tensor, ref: torch.Tensor, data_range: float = 1.0, window: int = 11, sigma: float = 1.5,
         k1: float = 0.01, k2: float = 0.03) -> torch.Tensor:
    """Structural similarity per frame (Wang et al. 2004): 11x11 Gaussian window (sigma 1.5), K1 = 0.01,
    K2 = 0.03, statistics over the valid region (no padding), SSIM map averaged over pixels and channels
    (channels treated independently, as skimage with `channel_axis`). (b, t) float64.

    Raises:
        ValueError: frames smaller than the window.
    """
    b, t, c, h, w = ref.shape
    if h < window or w < window:
        raise ValueError(f"frames {h}x{w} smaller than the SSIM window {window}")
    x = rearrange(_f64(rec), "b t c h w -> (b t c) 1 h w")
    y = rearrange(_f64(ref), "b t c h w -> (b t c) 1 h w")
    g = gaussian_window(window, sigma).to(x.device)
    gv, gh = rearrange(g, "k -> 1 1 k 1"), rearrange(g, "k -> 1 1 1 k")

    def blur(z: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.conv2d(z, gv), gh)

    mu_x, mu_y = blur(x), blur(y)
    sxx = blur(x * x) - mu_x**2
    syy = blur(y * y) - mu_y**2
    sxy = blur(x * y) - mu_x * mu_y
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    smap = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2))
    per = smap.mean(dim=(-3, -2, -1))
    return rearrange(per, "(b t c) -> b t c", b=b, t=t).mean(-1)


def flicker(rec: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Temporal flicker: mean |(rec[t+1] - rec[t]) - (ref[t+1] - ref[t])| over (c, h, w), per frame pair.

    0 when the reconstruction changes from frame to frame exactly as the original does (a constant per-frame
    error does not count; an error that changes between frames does). (b, t - 1) float64.
    """
    d_rec = _f64(rec).diff(dim=1)
    d_ref = _f64(ref).diff(dim=1)
    return (d_rec - d_ref).abs().mean(dim=(-3, -2, -1))

