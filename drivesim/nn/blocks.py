"""The one module of shared spatial building blocks (LDM autoencoder + ADM/LDM U-Net).

Every block takes and returns `(N, c, h, w)` tensors, where a video is folded as `N = (b t)`: spatial blocks
see a video as a batch of images (SPEC section 1, "Temporal layers"). Temporal blocks live in
`drivesim.nn.temporal`.

Sources: LDM `ldm/modules/diffusionmodules/model.py` (autoencoder ResnetBlock / AttnBlock / Down/Upsample,
no zero-init) and guided-diffusion `unet.py` (ResBlock with adaptive group norm "scale-shift", zero-initialised
last conv of residual branches, `timestep_embedding`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

__all__ = [
    "GroupNorm32",
    "ResBlock",
    "SpatialSelfAttention",
    "Downsample",
    "Upsample",
    "timestep_embedding",
    "zero_module",
]


def zero_module(module: nn.Module) -> nn.Module:
    """Set every parameter of `module` to zero in place and return it (ADM: residual branches start as identity)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class GroupNorm32(nn.GroupNorm):
    """Group norm computed in float32 whatever the input dtype (ADM `GroupNorm32`: bf16/fp16 statistics are too
    coarse), cast back to the input dtype.

    Works on any `(N, c, *)` layout, e.g. `(N, c, h, w)` or `(b, c, t, h, w)`.

    Args:
        num_channels: c.
        num_groups: wanted number of groups (32 as in LDM/ADM); reduced to `gcd(num_groups, num_channels)` so
            the small presets (16 channels) work. The paper preset always gets 32.
        eps: 1e-6 as in the LDM autoencoder (ADM uses 1e-5; the difference is negligible).
    """

    def __init__(self, num_channels: int, num_groups: int = 32, eps: float = 1e-6, affine: bool = True) -> None:
        super().__init__(math.gcd(num_groups, num_channels), num_channels, eps=eps, affine=affine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return super().forward(x)
        return F.group_norm(x.float(), self.num_groups, self.weight.float() if self.weight is not None else None,
                            self.bias.float() if self.bias is not None else None, self.eps).to(x.dtype)


class ResBlock(nn.Module):
    """Residual block: GN-SiLU-conv3x3, [embedding], GN-SiLU-dropout-conv3x3, plus a skip (1x1 conv if c changes).

    - `emb_dim=None`: the plain LDM autoencoder `ResnetBlock` (no embedding; last conv NOT zero-initialised,
      as in LDM's autoencoder).
    - `emb_dim` given: the ADM `ResBlock`: the embedding `(N, emb_dim)` is projected by SiLU-Linear and either
      added to the features (`use_scale_shift_norm=False`) or applied as adaptive group norm
      `norm(h) * (1 + scale) + shift` (`True`, ADM "scale-shift"); the last conv is zero-initialised so the
      block starts as the identity (ADM).

    Args:
        in_ch, out_ch: channels in / out.
        emb_dim: embedding width, or None for no embedding.
        dropout: dropout probability before the last conv.
        use_scale_shift_norm: adaptive group norm (only with an embedding).
        zero_init: override the zero-init of the last conv (default: True iff `emb_dim` is given).
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        emb_dim: int | None = None,
        dropout: float = 0.0,
        use_scale_shift_norm: bool = True,
        zero_init: bool | None = None,
    ) -> None:
        super().__init__()
        self.in_ch, self.out_ch, self.emb_dim = in_ch, out_ch, emb_dim
        self.use_scale_shift_norm = use_scale_shift_norm and emb_dim is not None
        self.norm1 = GroupNorm32(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        if emb_dim is not None:
            self.emb_proj = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, 2 * out_ch if self.use_scale_shift_norm
                                                               else out_ch))
        self.norm2 = GroupNorm32(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        if zero_init if zero_init is not None else emb_dim is not None:
            zero_module(self.conv2)
        self.skip = nn.Identity() if in_ch == out_ch else nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        """x: (N, in_ch, h, w); emb: (N, emb_dim) or None -> (N, out_ch, h, w), same dtype.

        Raises:
            ValueError: an embedding is required (emb_dim set) but missing, or given to a block without one.
        """
        h = self.conv1(F.silu(self.norm1(x)))
        if self.emb_dim is not None:
            if emb is None:
                raise ValueError("ResBlock built with emb_dim needs an embedding")
            e = rearrange(self.emb_proj(emb).to(h.dtype), "n c -> n c 1 1")
            if self.use_scale_shift_norm:
                scale, shift = e.chunk(2, dim=1)
                h = self.norm2(h) * (1 + scale) + shift
            else:
                h = self.norm2(h + e)
        else:
            if emb is not None:
                raise ValueError("ResBlock built without emb_dim got an embedding")
            h = self.norm2(h)
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class SpatialSelfAttention(nn.Module):
    """Multi-head self-attention over the h*w positions of each image, residual (LDM AttnBlock / ADM AttentionBlock).

    Args:
        ch: channels.
        num_head_channels: channels per head; -1 means one head of width `ch` (the LDM autoencoder).
        zero_init: zero-initialise the output projection so the block starts as identity (ADM; default True).
            The LDM autoencoder uses False.
    """

    def __init__(self, ch: int, num_head_channels: int = -1, zero_init: bool = True) -> None:
        super().__init__()
        if num_head_channels == -1:
            self.num_heads = 1
        else:
            if ch % num_head_channels:
                raise ValueError(f"channels {ch} not divisible by num_head_channels {num_head_channels}")
            self.num_heads = ch // num_head_channels
        self.norm = GroupNorm32(ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj_out = nn.Conv2d(ch, ch, 1)
        if zero_init:
            zero_module(self.proj_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, c, h, w) -> (N, c, h, w)."""
        h, w = x.shape[-2:]
        # The 1x1 convs run as linears on (h w) tokens with the same weights (checkpoints unchanged): on CPU the
        # conv layout handed SDPA head-dim-strided q/k/v and made 1x1-conv backward slow, 2-7x the block's time
        # (benchmarks/unet_vs_svd.py); results agree to float rounding.
        tokens = rearrange(self.norm(x), "n c h w -> n (h w) c")
        qkv = F.linear(tokens, self.qkv.weight.flatten(1), self.qkv.bias)
        q, k, v = rearrange(qkv, "n l (three heads d) -> three n heads l d", three=3, heads=self.num_heads)
        out = rearrange(F.scaled_dot_product_attention(q, k, v), "n heads l d -> n l (heads d)")
        out = F.linear(out, self.proj_out.weight.flatten(1), self.proj_out.bias)
        return x + rearrange(out, "n (h w) c -> n c h w", h=h, w=w)


class Downsample(nn.Module):
    """Halve h and w with a stride-2 3x3 conv (padding 1; h, w must be even). (N, c, h, w) -> (N, c, h/2, w/2)."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Double h and w: nearest-neighbour x2 then a 3x3 conv. (N, c, h, w) -> (N, c, 2h, 2w)."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # nearest upsampling has no bf16 kernel on some backends; the conv restores the dtype anyway
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps or positions (ADM `timestep_embedding`).

    Args:
        t: (N,) timesteps / positions, any numeric dtype.
        dim: embedding width (odd widths get one zero column).
        max_period: lowest frequency is 1 / max_period.

    Returns:
        (N, dim) float32: `[cos(t * f_i), sin(t * f_i)]` with `f_i = max_period ** (-i / (dim // 2))`.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = rearrange(t.float(), "n -> n 1") * rearrange(freqs, "f -> 1 f")
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb
