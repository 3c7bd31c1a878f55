"""Sampling loop: diffusers sampler steps around a `Denoiser` and a `Guidance`."""

from __future__ import annotations

from typing import Any

import torch
from einops import repeat

from drivesim.diffusion.denoiser import Denoiser
from drivesim.diffusion.guidance import Guidance


@torch.no_grad()
def sample(
    denoiser: Denoiser,
    shape: tuple[int, ...],
    cond: Any,
    sampler: str = "ddim",
    steps: int = 50,
    guidance: Guidance | None = None,
    generator: torch.Generator | None = None,
    x_T: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Draw samples x_0 of `shape` (e.g. (b, t, 4, h, w) scaled latents) by the reverse process.

    Args:
        denoiser: wraps the network and its parameterisation.
        shape: output shape; the first axis is the batch of `cond`.
        cond: condition passed to the network (e.g. `Conditioning`), guided by `guidance`.
        sampler: "ddim" (eta = 0, deterministic given x_T) or "dpmpp" (DPM-Solver++ 2M).
        steps: number of network evaluations per guidance branch.
        guidance: guidance terms; None = plain conditional model.
        generator: CPU generator for the initial noise (reproducible across devices); noise is drawn on CPU
            and moved to `device`.
        x_T: optional initial noise of `shape` (overrides the generator).
    Returns:
        (shape) tensor of `dtype` on `device`.

    Raises:
        ConfigError: unknown sampler or invalid `steps`.
    """
    stepper = denoiser.schedule.make_sampler(sampler)
    timesteps = stepper.set_timesteps(steps, device=device)
    if x_T is None:
        x_T = torch.randn(shape, generator=generator, dtype=torch.float32, device="cpu")
    x = x_T.to(device=device, dtype=dtype) * stepper.init_noise_sigma
    guidance = guidance or Guidance()
    for t in timesteps:
        t_batch = repeat(t.to(device=device, dtype=torch.int64), " -> b", b=shape[0])
        out = guidance(denoiser.predict, x, t_batch, cond)
        x = stepper.step(out, t, x, generator=generator)
    return x
