"""Patch discriminators for autoencoder training: image PatchGAN (2D) and the Video LDM video discriminator (3D).

Both return a grid of logits, one per receptive-field patch (Isola et al. 2017 PatchGAN, "NLayerDiscriminator" as
used by taming-transformers / LDM), trained with the hinge loss `hinge_d_loss`.

Deviation from LDM, on purpose: GroupNorm instead of BatchNorm. The autoencoder computes the generator's
adversarial term and the discriminator's hinge term in one backward pass (`AutoencoderKL.loss`); BatchNorm would
couple real and fake batches through batch statistics and mutate running buffers in the generator pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from drivesim.nn.blocks import GroupNorm32

__all__ = ["NLayerDiscriminator", "VideoDiscriminator3D", "hinge_d_loss"]


def _init_weights(module: nn.Module) -> None:
    # DCGAN / pix2pix init, as in taming-transformers `weights_init`
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Conv3d)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.GroupNorm):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


class NLayerDiscriminator(nn.Module):
    """Image PatchGAN: conv(4, stride 2) + LeakyReLU, `n_layers - 1` more stride-2 convs with doubling width (up to
    8x), one stride-1 conv, and a 1-channel stride-1 output conv.

    Args:
        in_channels: 3 for RGB.
        channels: width of the first layer (`ndf`).
        n_layers: number of stride-2 downsamplings (3 in LDM: 70x70 receptive field).

    Input (N, in_channels, H, W) in [-1, 1]; output (N, 1, H', W') logits.
    """

    def __init__(self, in_channels: int = 3, channels: int = 64, n_layers: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1
            layers += [nn.Conv2d(channels * prev, channels * mult, 4, stride, 1, bias=False),
                       GroupNorm32(channels * mult, eps=1e-5), nn.LeakyReLU(0.2)]
        layers.append(nn.Conv2d(channels * mult, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


class VideoDiscriminator3D(nn.Module):
    """Patch-wise video discriminator made of 3D convolutions (Video LDM decoder fine-tuning, SPEC step 4).

    The PatchGAN above with 3D kernels (3, 4, 4): stride (1, 2, 2) so time is never subsampled (clips are short),
    padding (1, 1, 1); every logit sees a space-time patch and can therefore penalise flicker.

    Input (b, c, t, H, W) in [-1, 1]; output (b, 1, t, H', W') logits.
    """

    def __init__(self, in_channels: int = 3, channels: int = 64, n_layers: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv3d(in_channels, channels, (3, 4, 4), (1, 2, 2), (1, 1, 1)),
                                   nn.LeakyReLU(0.2)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = (1, 2, 2) if n < n_layers else (1, 1, 1)
            layers += [nn.Conv3d(channels * prev, channels * mult, (3, 4, 4), stride, (1, 1, 1), bias=False),
                       GroupNorm32(channels * mult, eps=1e-5), nn.LeakyReLU(0.2)]
        layers.append(nn.Conv3d(channels * mult, 1, (3, 4, 4), 1, (1, 1, 1)))
        self.main = nn.Sequential(*layers)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss `0.5 * (mean(relu(1 - D(x))) + mean(relu(1 + D(x_rec))))` (taming / LDM)."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())
