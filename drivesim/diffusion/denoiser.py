"""`Denoiser`: wraps any network, owns the parameterisation and the training loss (k-diffusion `Denoiser`).

A network is any callable `network(x_t, t, cond) -> output` with `x_t` of shape (b, t, c, h, w) and `t` (b,)
int64 diffusion timesteps; it never sees the schedule. The Denoiser decides what that output means
(epsilon or v, `DiffusionConfig.prediction_type`) and what it is trained against.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from drivesim.configs import DiffusionConfig
from drivesim.diffusion.schedule import NoiseSchedule


class Denoiser:
    """Parameterisation + loss around `network` (not an `nn.Module`: the model that owns the network registers it,
    so a checkpoint's keys are the network's own).

    Args:
        network: callable `(x_t (b, t, c, h, w), t (b,) or (b, t) int64, cond) -> (b, t, c, h, w)`.
        config: schedule and parameterisation.
    """

    def __init__(self, network: Any, config: DiffusionConfig):
        self.network = network
        self.config = config
        self.schedule = NoiseSchedule(config)

    @property
    def prediction_type(self) -> str:
        return self.config.prediction_type

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Regression target of the network: `noise` (epsilon) or v = sqrt(ab_t) noise - sqrt(1 - ab_t) x0."""
        if self.prediction_type == "epsilon":
            return noise
        return self.schedule.velocity(x0, noise, t)

    def loss(self, x0: torch.Tensor, cond: Any, t: torch.Tensor | None = None, noise: torch.Tensor | None = None,
             weight: torch.Tensor | None = None) -> torch.Tensor:
        """Simple DDPM loss: mean squared error between network output and target (Ho et al. 2020, L_simple).

        Args:
            x0: (b, t, c, h, w) clean (scaled) latents.
            cond: passed through to the network untouched.
            t: (b,) or (b, t) int64 timesteps; drawn uniformly from {0..T-1} per sample when None.
            noise: like `x0`; standard normal when None.
            weight: optional (b, t, c, h, w) or broadcastable elementwise weight (e.g. 0 on context frames).
        Returns:
            scalar float loss (mean over all weighted elements).
        """
        if t is None:
            t = self.schedule.sample_timesteps(x0.shape[0], x0.device)
        if noise is None:
            noise = torch.randn_like(x0)
        x_t = self.schedule.add_noise(x0, noise, t)
        out = self.network(x_t, t, cond)
        target = self.target(x0, noise, t)
        if weight is None:
            return F.mse_loss(out.float(), target.float())
        sq = (out.float() - target.float()).square() * weight
        return sq.sum() / torch.broadcast_to(weight, sq.shape).sum().clamp_min(1)

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        """Network output (epsilon or v, per config) for noisy `x_t` (b, t, c, h, w) at timesteps `t` (b,)."""
        return self.network(x_t, t, cond)

    def to_x0_eps(self, x_t: torch.Tensor, t: torch.Tensor, output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Convert a network output to (x0_hat, eps_hat) with the closed forms of the parameterisation.

        epsilon: x0 = (x_t - sqrt(1-ab) eps) / sqrt(ab);  v: x0 = sqrt(ab) x_t - sqrt(1-ab) v,
        eps = sqrt(1-ab) x_t + sqrt(ab) v.
        """
        a, s = self.schedule.coefficients(t, x_t)
        if self.prediction_type == "epsilon":
            eps = output
            x0 = (x_t - s * eps) / a
        else:
            x0 = a * x_t - s * output
            eps = s * x_t + a * output
        return x0, eps
