"""Temporal layers of Video LDM (SPEC section 1, "Temporal layers") shared by the video decoder and the video U-Nets.

Layout contract: spatial layers see a video as a batch of images `(b t) c h w`; every temporal block here takes
that layout plus `num_frames` (= t, explicit, never guessed) and returns the same layout. Internally a block
works on `b c t h w` (3D convolutions, kernel (3, 1, 1)) or `(b h w) t c` (attention over frames).

After a temporal block the two paths are merged by `AlphaBlender`:
`out = alpha * z_spatial + (1 - alpha) * z_temporal` (Blattmann et al. 2023, eq. after Fig. 4; sgm / diffusers
`AlphaBlender`). Where alpha is exactly 1 (fixed 1.0, image-only samples, `force_alpha_one`) the blender returns
the spatial tensor itself, so the image model is reproduced bit for bit.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn

from drivesim.nn.blocks import GroupNorm32, timestep_embedding, zero_module

__all__ = ["AlphaBlender", "TemporalConvBlock", "TemporalAttention", "force_alpha_one", "MERGE_STRATEGIES"]

MERGE_STRATEGIES = ("fixed", "learned", "learned_with_images")


class AlphaBlender(nn.Module):
    """Merge spatial and temporal paths: `alpha * x_spatial + (1 - alpha) * x_temporal`.

    Strategies:
    - `fixed`: alpha = `alpha_init`, not trained (a buffer, so it is checkpointed).
    - `learned`: alpha = sigmoid(mix_factor), mix_factor a parameter initialised to logit(alpha_init).
    - `learned_with_images`: as `learned`, but alpha = 1 for samples flagged image-only, so images and videos
      train together (sgm `AlphaBlender`).

    How `learned` starts: the temporal blocks here zero-initialise their last layer, so at initialisation
    `x_temporal == x_spatial` and the output equals the image model for ANY alpha. alpha_init therefore only
    sets the learning dynamics: the temporal branch's gradient is scaled by (1 - alpha) and mix_factor's by
    alpha (1 - alpha), both vanishing as alpha -> 1. We recommend alpha_init = 0.5 (maximal gradient on both;
    sgm/SVD start the same logit at 0.5, alpha ~0.62). alpha_init must be in (0, 1) for learned strategies:
    sigmoid never reaches exactly 1 for a finite input, and a saturated start would not learn. To run the
    network as the image model use `force_alpha_one` (or `fixed` with 1.0), which is exact.

    Args:
        strategy: one of `MERGE_STRATEGIES`.
        alpha_init: initial alpha in [0, 1] (fixed) or (0, 1) (learned strategies).

    Raises:
        ValueError: unknown strategy or alpha_init out of range (a programming/config error).
    """

    def __init__(self, strategy: str = "learned", alpha_init: float = 0.5) -> None:
        super().__init__()
        if strategy not in MERGE_STRATEGIES:
            raise ValueError(f"merge strategy {strategy!r} not in {MERGE_STRATEGIES}")
        self.strategy = strategy
        self.force_one = False
        if strategy == "fixed":
            if not 0.0 <= alpha_init <= 1.0:
                raise ValueError(f"fixed alpha {alpha_init} outside [0, 1]")
            self.register_buffer("mix_factor", torch.tensor(float(alpha_init)))
        else:
            if not 0.0 < alpha_init < 1.0:
                raise ValueError(
                    f"learned alpha_init {alpha_init} must be in (0, 1) (sigmoid never reaches 0 or 1; "
                    "temporal blocks are zero-initialised so any alpha starts as the image model; use 0.5, "
                    "and force_alpha_one() to switch temporal layers off exactly)"
                )
            self.mix_factor = nn.Parameter(torch.tensor(math.log(alpha_init / (1.0 - alpha_init))))

    def alpha(self) -> torch.Tensor:
        """The scalar alpha (0-dim float32 tensor) for video samples."""
        if self.strategy == "fixed":
            return self.mix_factor
        return torch.sigmoid(self.mix_factor)

    def _exactly_one(self) -> bool:
        return self.force_one or (self.strategy == "fixed" and float(self.mix_factor) == 1.0)

    def forward(
        self,
        x_spatial: torch.Tensor,
        x_temporal: torch.Tensor,
        image_only_indicator: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Blend the two paths.

        Args:
            x_spatial, x_temporal: `((b t), ...)` tensors of the same shape and dtype.
            image_only_indicator: (b,) or (b, t) bool, True where a sample is a single image (alpha = 1; only
                honoured by `learned_with_images`, as in sgm), or None (all videos).

        Returns:
            Same shape as the inputs; exactly `x_spatial` (the same tensor object) where alpha is exactly 1 for
            the whole batch, and elementwise exactly `x_spatial` for image-only samples.
        """
        if self._exactly_one():
            return x_spatial
        alpha = self.alpha().to(x_spatial.dtype)
        out = alpha * x_spatial + (1.0 - alpha) * x_temporal
        if self.strategy == "learned_with_images" and image_only_indicator is not None:
            flags = image_only_indicator.to(torch.bool)
            if bool(flags.all()):
                return x_spatial
            if flags.ndim == 1:
                frames = x_spatial.shape[0] // flags.shape[0]
                flags = repeat(flags, "b -> (b t)", t=frames)
            else:
                flags = rearrange(flags, "b t -> (b t)")
            # torch.where, not alpha = 1 arithmetic: 1 * x + 0 * y differs from x for y = inf/nan and for -0.0
            shape = (flags.shape[0],) + (1,) * (x_spatial.ndim - 1)
            out = torch.where(flags.view(shape), x_spatial, out)
        return out


@contextlib.contextmanager
def force_alpha_one(module: nn.Module) -> Iterator[nn.Module]:
    """Context manager: every `AlphaBlender` inside `module` returns its spatial input (alpha exactly 1).

    Used by tests (alpha = 1 reproduces the image model bit for bit) and by ablations. Restores the previous
    state on exit, also on exceptions.
    """
    blenders = [m for m in module.modules() if isinstance(m, AlphaBlender)]
    previous = [b.force_one for b in blenders]
    for b in blenders:
        b.force_one = True
    try:
        yield module
    finally:
        for b, p in zip(blenders, previous, strict=True):
            b.force_one = p


class TemporalConvBlock(nn.Module):
    """Residual block of 3D convolutions with kernel (3, 1, 1): mixes each pixel's features across neighbouring
    frames only (Video LDM temporal conv layers; sgm `VideoResBlock`'s time stack).

    GN-SiLU-Conv3d, GN-SiLU-dropout-Conv3d(zero-init) on `b c t h w`; frames outside the clip are zero-padded.
    The last conv is zero-initialised so the block starts as the identity. The Conv3d modules hold the weights
    (checkpoint keys and shapes are those of Conv3d); forward runs them as (k, 1) Conv2d over `b c t (h w)`.

    Args:
        ch: channels (in = out).
        dropout: dropout before the last conv.
        kernel_t: temporal kernel size (odd; 3 in the paper).
    """

    def __init__(self, ch: int, dropout: float = 0.0, kernel_t: int = 3) -> None:
        super().__init__()
        if kernel_t % 2 != 1:
            raise ValueError(f"temporal kernel size must be odd, got {kernel_t}")
        pad = (kernel_t // 2, 0, 0)
        self.norm1 = GroupNorm32(ch)
        self.conv1 = nn.Conv3d(ch, ch, (kernel_t, 1, 1), padding=pad)
        self.norm2 = GroupNorm32(ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_module(nn.Conv3d(ch, ch, (kernel_t, 1, 1), padding=pad))

    @staticmethod
    def _conv_t(conv: nn.Conv3d, v: torch.Tensor) -> torch.Tensor:
        # A (k, 1, 1) Conv3d over (b, c, t, h, w) is a (k, 1) Conv2d over (b, c, t, h*w) with the same weights.
        # On CPU with one thread PyTorch runs Conv3d through its slow im2col path (about 2x the time of the
        # oneDNN Conv2d); with more threads both use oneDNN and the outputs agree bit for bit.
        return F.conv2d(v, conv.weight.squeeze(-1), conv.bias, padding=(conv.padding[0], 0))

    def forward(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        """x: ((b t), c, h, w) with t = num_frames -> ((b t), c, h, w)."""
        height = x.shape[-2]
        v = rearrange(x, "(b t) c h w -> b c t (h w)", t=num_frames)
        h = self._conv_t(self.conv1, F.silu(self.norm1(v)))
        h = self._conv_t(self.conv2, self.dropout(F.silu(self.norm2(h))))
        return x + rearrange(h, "b c t (h w) -> (b t) c h w", h=height)


class TemporalAttention(nn.Module):
    """Self-attention over the frames of each spatial location, residual (Video LDM temporal attention).

    Tokens are `(b h w) t c`; a sinusoidal encoding of the frame index is added to the normalised features
    before the q/k/v projection (absolute positions), or, with `relative_positions=True`, a learned per-head
    bias indexed by the clipped frame distance j - i is added to the attention logits instead (the paper's
    text-to-video model). With `max_distance` set, frame i attends only to frames j with |i - j| <= max_distance
    (band mask; the paper masks to 8 frames when run convolutionally in time).
    The output projection is zero-initialised, so the block starts as the identity.

    Args:
        ch: channels.
        num_head_channels: channels per head (-1: one head).
        max_distance: band-mask half width in frames, or None for full attention.
        relative_positions: use learned relative position biases instead of absolute sinusoidal encodings.
        max_relative_distance: distances beyond this share one bias bucket (relative positions only).
    """

    def __init__(
        self,
        ch: int,
        num_head_channels: int = -1,
        max_distance: int | None = None,
        relative_positions: bool = False,
        max_relative_distance: int = 32,
    ) -> None:
        super().__init__()
        if num_head_channels == -1:
            self.num_heads = 1
        else:
            if ch % num_head_channels:
                raise ValueError(f"channels {ch} not divisible by num_head_channels {num_head_channels}")
            self.num_heads = ch // num_head_channels
        self.ch = ch
        self.max_distance = max_distance
        self.relative_positions = relative_positions
        self.max_relative_distance = max_relative_distance
        self.norm = GroupNorm32(ch)
        self.qkv = nn.Linear(ch, 3 * ch)
        self.proj_out = zero_module(nn.Linear(ch, ch))
        if relative_positions:
            self.rel_bias = nn.Parameter(torch.zeros(2 * max_relative_distance + 1, self.num_heads))

    def _attn_bias(self, t: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor | None:
        pos = torch.arange(t, device=device)
        rel = rearrange(pos, "j -> 1 j") - rearrange(pos, "i -> i 1")  # j - i, (t, t)
        bias = None
        if self.relative_positions:
            idx = rel.clamp(-self.max_relative_distance, self.max_relative_distance) + self.max_relative_distance
            bias = rearrange(self.rel_bias[idx], "i j heads -> heads i j").to(dtype)
        if self.max_distance is not None:
            band = rel.abs() <= self.max_distance
            if bias is None:
                return band  # bool mask: True = may attend
            bias = bias.masked_fill(~band, float("-inf"))
        return bias

    def forward(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        """x: ((b t), c, h, w) with t = num_frames -> ((b t), c, h, w)."""
        b_t, c, hh, ww = x.shape
        t = num_frames
        v = rearrange(x, "(b t) c h w -> b c t h w", t=t)
        tokens = rearrange(self.norm(v), "b c t h w -> (b h w) t c")
        if not self.relative_positions:
            pos = timestep_embedding(torch.arange(t, device=x.device), c).to(tokens.dtype)
            tokens = tokens + rearrange(pos, "t c -> 1 t c")
        q, k, val = rearrange(self.qkv(tokens), "n t (three heads d) -> three n heads t d", three=3,
                              heads=self.num_heads)
        out = F.scaled_dot_product_attention(q, k, val, attn_mask=self._attn_bias(t, x.device, q.dtype))
        out = self.proj_out(rearrange(out, "n heads t d -> n t (heads d)"))
        out = rearrange(out, "(b h w) t c -> (b t) c h w", h=hh, w=ww)
        return x + out
