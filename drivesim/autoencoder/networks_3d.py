"""The networks of LVDM's 3D video autoencoder: repeat-padded 3D convolutions, per-frame group norm, 3D ResNet
blocks, space-time down/upsampling, the encoder and the decoder.

Design: LVDM (He et al. 2022, Sec. 3.1; `lvdm/models/modules/aemodules3d.py`, from TATS, Ge et al. 2022): every 3D
convolution pads by repeating the edge values ("repeat padding", `F.pad(mode="replicate")`) instead of zeros, so a
static scene gives the same features at every frame, the first and last ones included: nothing marks where a clip
starts, and the autoencoder is temporally shift-equivariant (for shifts by multiples of its temporal stride).

Deliberate deviations from the TATS/LVDM code:
- group norm statistics are taken per frame (over c/G, h, w of each frame), not over the whole clip. Statistics
  over time would make every latent depend on every frame of the clip (and on the clip's length), which breaks the
  shift-equivariance repeat padding is there for; per frame, the encoder and decoder are local in time.
- the layout follows our KL-f8 networks (`drivesim.autoencoder.networks`): `num_res_blocks` ResNet blocks per
  level, a downsampling between levels, `num_res_blocks + 1` blocks per level in the decoder, GN-SiLU-conv at both
  ends, 1x1x1 quant / post-quant convs; upsampling is nearest neighbour + a 3x3x3 conv (as the KL-f8 decoder)
  rather than TATS's transposed convolutions, which checkerboard. No attention (LVDM's 3D autoencoder has none).

Internal layout: `(b, c, t, h, w)` (what `nn.Conv3d` takes); the model converts at its public boundary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from drivesim.configs import Autoencoder3DConfig
from drivesim.nn.blocks import GroupNorm32

__all__ = ["Decoder3D", "Downsample3D", "Encoder3D", "FrameGroupNorm", "PadConv3d", "ResBlock3D", "Upsample3D"]

PADDING_MODES = ("replicate", "zeros")


def _triple(v: int | tuple[int, int, int]) -> tuple[int, int, int]:
    return (v, v, v) if isinstance(v, int) else tuple(v)


class PadConv3d(nn.Module):
    """A 3D convolution with "same" padding done by `F.pad` before an unpadded `nn.Conv3d` (TATS `SamePadConv3d`).

    Each dimension is padded by `kernel - stride` in all, the odd one on the left, so an input whose (t, h, w) are
    multiples of the stride comes out divided by it exactly.

    Args:
        in_ch, out_ch: channels.
        kernel, stride: per (t, h, w), or one int for all three.
        padding_mode: "replicate" (repeat padding: LVDM, what every model here uses) or "zeros" (only to show
            what repeat padding changes; see tests/test_autoencoder_3d.py).

    forward: (b, in_ch, t, h, w) -> (b, out_ch, t / s_t, h / s_h, w / s_w).
    """

    def __init__(self, in_ch: int, out_ch: int, kernel: int | tuple[int, int, int] = 3,
                 stride: int | tuple[int, int, int] = 1, padding_mode: str = "replicate") -> None:
        super().__init__()
        if padding_mode not in PADDING_MODES:
            raise ValueError(f"padding_mode {padding_mode!r} not in {PADDING_MODES}")
        k, s = _triple(kernel), _triple(stride)
        pad: list[int] = []
        for kk, ss in reversed(list(zip(k, s, strict=True))):  # F.pad lists the last dimension (w) first
            total = kk - ss
            pad += [total // 2 + total % 2, total // 2]
        self.pad = tuple(pad)
        self.padding_mode = padding_mode
        self.conv = nn.Conv3d(in_ch, out_ch, k, s)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding_mode == "replicate":
            x = F.pad(x, self.pad, mode="replicate")
        else:
            x = F.pad(x, self.pad)
        return self.conv(x)


class FrameGroupNorm(nn.Module):
    """`GroupNorm32` with statistics per frame: over (c/G, h, w) of each (b, t), never across frames.

    (b, c, t, h, w) -> same shape and dtype.
    """

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.norm = GroupNorm32(ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[2]
        y = self.norm(rearrange(x, "b c t h w -> (b t) c h w"))
        return rearrange(y, "(b t) c h w -> b c t h w", t=t)


class ResBlock3D(nn.Module):
    """LDM ResNet block in 3D: FrameGN-SiLU-conv3x3x3, FrameGN-SiLU-dropout-conv3x3x3, plus a skip (1x1x1 conv if
    the channels change). Every conv is repeat-padded (unless `padding_mode="zeros"`).

    forward: (b, in_ch, t, h, w) -> (b, out_ch, t, h, w).
    """

    def __init__(self, in_ch: int, out_ch: int, dropout: float = 0.0, padding_mode: str = "replicate") -> None:
        super().__init__()
        self.norm1 = FrameGroupNorm(in_ch)
        self.conv1 = PadConv3d(in_ch, out_ch, 3, padding_mode=padding_mode)
        self.norm2 = FrameGroupNorm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = PadConv3d(out_ch, out_ch, 3, padding_mode=padding_mode)
        self.skip = nn.Identity() if in_ch == out_ch else nn.Conv3d(in_ch, out_ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class Downsample3D(nn.Module):
    """Halve h and w, and t when `temporal`: a repeat-padded conv with stride 2 and kernel 4 in the halved
    dimensions (TATS), kernel 3 in time otherwise.

    (b, c, t, h, w) -> (b, c, t / 2 or t, h / 2, w / 2); t (when halved), h and w must be even.
    """

    def __init__(self, ch: int, temporal: bool) -> None:
        super().__init__()
        st = 2 if temporal else 1
        self.conv = PadConv3d(ch, ch, (st + 2, 4, 4), (st, 2, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample3D(nn.Module):
    """Double h and w, and t when `temporal`: nearest-neighbour upsampling, then a repeat-padded 3x3x3 conv.

    (b, c, t, h, w) -> (b, c, 2t or t, 2h, 2w).
    """

    def __init__(self, ch: int, temporal: bool) -> None:
        super().__init__()
        self.scale = (2.0 if temporal else 1.0, 2.0, 2.0)
        self.conv = PadConv3d(ch, ch, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=self.scale, mode="nearest"))


class Encoder3D(nn.Module):
    """conv_in, per level `num_res_blocks` `ResBlock3D`s (+ a `Downsample3D` except after the last level; time
    halved where `temporal_downsample` says), FrameGN-SiLU-conv_out to 2 * latent_channels, then the 1x1x1
    `quant_conv`.

    (b, 3, t, H, W) -> (b, 2 * latent_channels, t / frames_per_latent, H/8, W/8): [mean, logvar] moments.
    """

    def __init__(self, cfg: Autoencoder3DConfig) -> None:
        super().__init__()
        ch = cfg.base_channels
        self.conv_in = PadConv3d(cfg.in_channels, ch, 3)
        self.down = nn.ModuleList()
        block_in = ch
        for i, mult in enumerate(cfg.channel_mult):
            level = nn.Module()
            level.blocks = nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                level.blocks.append(ResBlock3D(block_in, ch * mult, dropout=cfg.dropout))
                block_in = ch * mult
            last = i == len(cfg.channel_mult) - 1
            level.downsample = nn.Identity() if last else Downsample3D(block_in, cfg.temporal_downsample[i])
            self.down.append(level)
        self.norm_out = FrameGroupNorm(block_in)
        self.conv_out = PadConv3d(block_in, 2 * cfg.latent_channels, 3)
        self.quant_conv = nn.Conv3d(2 * cfg.latent_channels, 2 * cfg.latent_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for block in level.blocks:
                h = block(h)
            h = level.downsample(h)
        return self.quant_conv(self.conv_out(F.silu(self.norm_out(h))))


class Decoder3D(nn.Module):
    """1x1x1 `post_quant_conv`, conv_in, per level (deepest first) `num_res_blocks + 1` `ResBlock3D`s (+ an
    `Upsample3D` except after the last; time doubled where the encoder halved it), FrameGN-SiLU-conv_out to RGB.

    (b, latent_channels, t, h, w) raw latents -> (b, 3, t * frames_per_latent, 8h, 8w), unbounded (ideally in
    [-1, 1]). Latent frame j decodes to video frames [j f, (j + 1) f), f = frames_per_latent.
    """

    def __init__(self, cfg: Autoencoder3DConfig) -> None:
        super().__init__()
        ch = cfg.base_channels
        block_in = ch * cfg.channel_mult[-1]
        self.post_quant_conv = nn.Conv3d(cfg.latent_channels, cfg.latent_channels, 1)
        self.conv_in = PadConv3d(cfg.latent_channels, block_in, 3)
        self.up = nn.ModuleList()
        for i in reversed(range(len(cfg.channel_mult))):
            level = nn.Module()
            level.blocks = nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):
                level.blocks.append(ResBlock3D(block_in, ch * cfg.channel_mult[i], dropout=cfg.dropout))
                block_in = ch * cfg.channel_mult[i]
            # undoes the encoder's downsampling from level i - 1 to level i
            level.upsample = Upsample3D(block_in, cfg.temporal_downsample[i - 1]) if i > 0 else nn.Identity()
            self.up.append(level)
        self.norm_out = FrameGroupNorm(block_in)
        self.conv_out = PadConv3d(block_in, cfg.in_channels, 3)

    def last_layer_weight(self) -> nn.Parameter:
        """Weight the LDM adaptive GAN weight differentiates against (conv_out, as LVDM's `get_last_layer`)."""
        return self.conv_out.conv.weight

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(self.post_quant_conv(z))
        for level in self.up:
            for block in level.blocks:
                h = block(h)
            h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))
