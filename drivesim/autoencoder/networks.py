"""The KL-f8 autoencoder's networks: encoder, (video) decoder, the diagonal Gaussian posterior, input checks and
the overlapping chunks a long video is decoded in (shared by `AutoencoderKL.decode` and the streamed rollout).

Design: the LDM "KL-f8" networks (Rombach et al. 2022, `ldm/modules/diffusionmodules/model.py`); the video decoder
adds a `TemporalConvBlock` + `AlphaBlender` after each ResNet block (Blattmann et al. 2023, Sec. 3.3; sgm
`VideoDecoder`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from drivesim.configs import AutoencoderConfig
from drivesim.errors import ConfigError, DataError
from drivesim.nn.blocks import Downsample, GroupNorm32, ResBlock, SpatialSelfAttention, Upsample
from drivesim.nn.temporal import MERGE_STRATEGIES, AlphaBlender, TemporalConvBlock

__all__ = ["DOWNSAMPLE_FACTOR", "Decoder", "DiagonalGaussian", "Encoder", "VideoDecoder", "check_frames",
           "check_config", "chunk_windows", "crossfade_weights"]


DOWNSAMPLE_FACTOR = 8
_VALUE_TOL = 1e-5  # float slack for inputs computed as x / 127.5 - 1


def check_frames(frames: torch.Tensor, in_channels: int = 3, name: str = "frames") -> None:
    """Validate a video batch for the autoencoder.

    Args:
        frames: (b, t, c, H, W) float in [-1, 1], H and W multiples of 8.

    Raises:
        DataError: wrong rank or channel count, size not a multiple of 8, non-finite values, or values outside
            [-1, 1] (never silently clipped: uint8 frames must be mapped with x / 127.5 - 1).
    """
    if frames.ndim != 5:
        raise DataError(f"{name}: expected (b, t, c, h, w), got shape {tuple(frames.shape)}")
    if not frames.is_floating_point():
        raise DataError(f"{name}: expected a float tensor in [-1, 1], got {frames.dtype} (map uint8 with "
                        "x / 127.5 - 1)")
    c, h, w = frames.shape[-3:]
    if c != in_channels:
        raise DataError(f"{name}: {c} channels, the autoencoder takes {in_channels} (RGB, channel axis 2)")
    if h % DOWNSAMPLE_FACTOR or w % DOWNSAMPLE_FACTOR:
        raise DataError(f"{name}: frame size {h}x{w} is not a multiple of {DOWNSAMPLE_FACTOR}")
    if frames.numel():
        lo, hi = torch.aminmax(frames.detach())
        if not (math.isfinite(lo.item()) and math.isfinite(hi.item())):
            raise DataError(f"{name}: contains NaN or inf")
        if lo.item() < -1 - _VALUE_TOL or hi.item() > 1 + _VALUE_TOL:
            raise DataError(f"{name}: values outside [-1, 1] (min {lo.item():.4g}, max {hi.item():.4g}); the "
                            "autoencoder does not clip (map uint8 with x / 127.5 - 1)")


class DiagonalGaussian:
    """Diagonal Gaussian posterior q(z | x) (LDM `DiagonalGaussianDistribution`).

    Attributes:
        mean, logvar: (..., c, h, w) tensors; logvar clamped to [-30, 20] as in LDM.
    """

    def __init__(self, mean: torch.Tensor, logvar: torch.Tensor) -> None:
        self.mean = mean
        self.logvar = logvar.clamp(-30.0, 20.0)

    @property
    def std(self) -> torch.Tensor:
        return torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """A reparameterised sample `mean + std * eps` (differentiable in mean and logvar)."""
        eps = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * eps

    def mode(self) -> torch.Tensor:
        return self.mean

    def latents(self, sample: bool, generator: torch.Generator | None = None) -> torch.Tensor:
        """`sample(generator)` when `sample`, else `mode()`: the one switch between posterior draws and means."""
        return self.sample(generator) if sample else self.mode()

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) summed over the last three (c, h, w) axes: shape = leading axes, e.g. (b, t)."""
        return 0.5 * torch.sum(self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar, dim=(-3, -2, -1))

    def map(self, fn) -> DiagonalGaussian:
        """Apply a reshape `fn` to mean and logvar (e.g. unfold `(b t)`)."""
        return DiagonalGaussian(fn(self.mean), fn(self.logvar))


def check_config(cfg: AutoencoderConfig) -> None:
    if 2 ** (len(cfg.channel_mult) - 1) != DOWNSAMPLE_FACTOR:
        raise ConfigError(f"autoencoder.channel_mult: {len(cfg.channel_mult)} levels give a downsampling factor "
                          f"{2 ** (len(cfg.channel_mult) - 1)}; KL-f8 needs 4 levels")
    if cfg.rec_loss not in ("l1", "l2"):
        raise ConfigError(f"autoencoder.rec_loss: {cfg.rec_loss!r} not in ('l1', 'l2')")
    if cfg.temporal_merge not in MERGE_STRATEGIES:
        raise ConfigError(f"autoencoder.temporal_merge: {cfg.temporal_merge!r} not in {MERGE_STRATEGIES}")
    if not cfg.box_weight >= 0:
        raise ConfigError(f"autoencoder.box_weight: {cfg.box_weight} must be >= 0")
    if not cfg.video_temporal_weight >= 0:
        raise ConfigError(f"autoencoder.video_temporal_weight: {cfg.video_temporal_weight} must be >= 0")
    if cfg.video_latents not in ("mean", "sample"):
        raise ConfigError(f"autoencoder.video_latents: {cfg.video_latents!r} not in ('mean', 'sample')")
    if cfg.decode_chunk_frames < 1 or not 0 <= cfg.decode_chunk_overlap < cfg.decode_chunk_frames:
        raise ConfigError("autoencoder.decode_chunk_overlap: need 0 <= overlap < decode_chunk_frames (got "
                          f"{cfg.decode_chunk_overlap}, {cfg.decode_chunk_frames})")


class Encoder(nn.Module):
    """LDM encoder: conv_in, per level `num_res_blocks` ResBlocks (+ stride-2 conv except the last level), mid
    (ResBlock, single-head attention, ResBlock), GN-SiLU-conv_out to 2 * latent_channels, then the 1x1
    `quant_conv` (LDM keeps it outside the encoder; here it is the encoder's last layer).

    (N, 3, H, W) -> (N, 2 * latent_channels, H/8, W/8): [mean, logvar] moments.
    """

    def __init__(self, cfg: AutoencoderConfig) -> None:
        super().__init__()
        ch = cfg.base_channels
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        block_in = ch
        for i, mult in enumerate(cfg.channel_mult):
            level = nn.Module()
            level.blocks = nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                level.blocks.append(ResBlock(block_in, ch * mult, dropout=cfg.dropout))
                block_in = ch * mult
            level.downsample = Downsample(block_in) if i < len(cfg.channel_mult) - 1 else nn.Identity()
            self.down.append(level)
        self.mid_block_1 = ResBlock(block_in, block_in, dropout=cfg.dropout)
        self.mid_attn = SpatialSelfAttention(block_in, -1, zero_init=False)
        self.mid_block_2 = ResBlock(block_in, block_in, dropout=cfg.dropout)
        self.norm_out = GroupNorm32(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * cfg.latent_channels, 3, padding=1)
        self.quant_conv = nn.Conv2d(2 * cfg.latent_channels, 2 * cfg.latent_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for block in level.blocks:
                h = block(h)
            h = level.downsample(h)
        h = self.mid_block_2(self.mid_attn(self.mid_block_1(h)))
        return self.quant_conv(self.conv_out(F.silu(self.norm_out(h))))


class _TemporalMix(nn.Module):
    """A temporal 3D-conv block and the alpha blend that merges it back into the spatial path."""

    def __init__(self, ch: int, cfg: AutoencoderConfig) -> None:
        super().__init__()
        self.block = TemporalConvBlock(ch, dropout=cfg.dropout)
        self.blender = AlphaBlender(cfg.temporal_merge, cfg.temporal_alpha_init)

    def forward(self, h: torch.Tensor, num_frames: int, image_only: torch.Tensor | None) -> torch.Tensor:
        if self.blender._exactly_one():  # the temporal branch would be discarded: skip computing it
            return h
        return self.blender(h, self.block(h, num_frames), image_only)


class Decoder(nn.Module):
    """LDM decoder: 1x1 `post_quant_conv`, conv_in, mid (ResBlock, attention, ResBlock), per level (deepest first)
    `num_res_blocks + 1` ResBlocks (+ nearest x2 upsampling except the last), GN-SiLU-conv_out to RGB.

    With `temporal=True` (`VideoDecoder`) a `_TemporalMix` follows every ResBlock; the spatial modules keep the
    image decoder's parameter names, so an image decoder's state dict loads into it unchanged.

    forward: z (N, latent_channels, h, w) with N = (b t) -> (N, 3, 8h, 8w).
    """

    def __init__(self, cfg: AutoencoderConfig, temporal: bool = False) -> None:
        super().__init__()
        self.temporal = temporal
        ch = cfg.base_channels
        block_in = ch * cfg.channel_mult[-1]
        self.post_quant_conv = nn.Conv2d(cfg.latent_channels, cfg.latent_channels, 1)
        self.conv_in = nn.Conv2d(cfg.latent_channels, block_in, 3, padding=1)
        self.mid_block_1 = ResBlock(block_in, block_in, dropout=cfg.dropout)
        self.mid_attn = SpatialSelfAttention(block_in, -1, zero_init=False)
        self.mid_block_2 = ResBlock(block_in, block_in, dropout=cfg.dropout)
        if temporal:
            self.mid_temporal = nn.ModuleList([_TemporalMix(block_in, cfg), _TemporalMix(block_in, cfg)])
        self.up = nn.ModuleList()
        for i in reversed(range(len(cfg.channel_mult))):
            level = nn.Module()
            level.blocks = nn.ModuleList()
            if temporal:
                level.temporal = nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):
                level.blocks.append(ResBlock(block_in, ch * cfg.channel_mult[i], dropout=cfg.dropout))
                block_in = ch * cfg.channel_mult[i]
                if temporal:
                    level.temporal.append(_TemporalMix(block_in, cfg))
            level.upsample = Upsample(block_in) if i > 0 else nn.Identity()
            self.up.append(level)
        self.norm_out = GroupNorm32(block_in)
        self.conv_out = nn.Conv2d(block_in, 3, 3, padding=1)

    def spatial_parameters(self) -> Iterable[nn.Parameter]:
        """Parameters of the image decoder (everything but the temporal mixes)."""
        return (p for n, p in self.named_parameters() if "temporal" not in n)

    def temporal_parameters(self) -> Iterable[nn.Parameter]:
        return (p for n, p in self.named_parameters() if "temporal" in n)

    def last_layer_weight(self) -> nn.Parameter:
        """Weight the LDM adaptive GAN weight differentiates against: conv_out, or, when the spatial layers are
        frozen (video fine-tuning), the last temporal block's output conv."""
        if self.conv_out.weight.requires_grad or not self.temporal:
            return self.conv_out.weight
        return self.up[-1].temporal[-1].block.conv2.weight

    def forward(
        self, z: torch.Tensor, num_frames: int | None = None, image_only: torch.Tensor | None = None
    ) -> torch.Tensor:
        """z: ((b t), c, h, w) raw latents; num_frames = t (required by the temporal decoder); image_only: (b,)
        bool or None (see `AlphaBlender`). Returns ((b t), 3, 8h, 8w), unbounded (ideally in [-1, 1])."""
        if self.temporal and num_frames is None:
            raise ValueError("the video decoder needs num_frames")
        h = self.conv_in(self.post_quant_conv(z))
        h = self.mid_block_1(h)
        if self.temporal:
            h = self.mid_temporal[0](h, num_frames, image_only)
        h = self.mid_block_2(self.mid_attn(h))
        if self.temporal:
            h = self.mid_temporal[1](h, num_frames, image_only)
        for level in self.up:
            for j, block in enumerate(level.blocks):
                h = block(h)
                if self.temporal:
                    h = level.temporal[j](h, num_frames, image_only)
            h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VideoDecoder(Decoder):
    """The image decoder with temporal 3D-conv blocks + alpha blending after each ResNet block (see `Decoder`)."""

    def __init__(self, cfg: AutoencoderConfig) -> None:
        super().__init__(cfg, temporal=True)


def chunk_windows(num_frames: int, chunk: int, overlap: int) -> list[tuple[int, int]]:
    """Start/stop frame indices of overlapping decode chunks covering `num_frames` frames.

    Chunks have length `chunk` (the last one is shifted back to end at `num_frames`, so every chunk has the
    length the temporal layers were trained on) and consecutive starts are `chunk - overlap` apart.
    """
    if num_frames <= chunk:
        return [(0, num_frames)]
    stride = chunk - overlap
    starts = list(range(0, num_frames - chunk, stride)) + [num_frames - chunk]
    return [(s, s + chunk) for s in starts]


def crossfade_weights(start: int, stop: int, first: bool, last: bool, prev_stop: int, next_start: int
                       ) -> torch.Tensor:
    """Per-frame blend weights of one chunk: linear ramps over the frames it shares with its neighbours."""
    n = stop - start
    w = torch.ones(n, dtype=torch.float64)
    if not first and prev_stop > start:  # shared with the previous chunk: ramp up
        k = prev_stop - start
        w[:k] = torch.arange(1, k + 1, dtype=torch.float64) / (k + 1)
    if not last and next_start < stop:  # shared with the next chunk: ramp down
        k = stop - next_start
        w[n - k:] = torch.minimum(w[n - k:], torch.arange(k, 0, -1, dtype=torch.float64) / (k + 1))
    return w
