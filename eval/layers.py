"""Small frozen layers shared by the evaluators (I3D, InceptionV3): inference only, weights converted from
reference checkpoints."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FrozenBatchNorm(nn.Module):
    """Inference batch norm without a scale (gamma): `(x - mean) / sqrt(var + eps) + bias` per channel.

    Both reference networks were trained with Sonnet/TF batch norm that has no gamma (`scale=False`) and
    eps = 1e-3; torch's default eps 1e-5 shifts the I3D logits by ~1e-2, so eps is explicit here.

    Args:
        num_channels: size of dim 1 of the input.
        eps: added to the variance.

    Input/output: `(b, c, ...)` float32, any number of trailing dims.
    """

    def __init__(self, num_channels: int, eps: float = 1e-3):
        super().__init__()
        self.eps = eps
        self.register_buffer("bias", torch.zeros(num_channels))
        self.register_buffer("running_mean", torch.zeros(num_channels))
        self.register_buffer("running_var", torch.ones(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(
            x, self.running_mean, self.running_var, None, self.bias, training=False, momentum=0.0, eps=self.eps
        )
