"""The sampling loop: diffusers sampler steps around a `Denoiser` and a `Guidance`.

The one reverse-process loop of drivesim: the image LDM, the video LDMs (context frames through `pre_step`) and
the upsampler all sample through `sample`. `callback` observes each step (k-diffusion's `callback`).
"""

from __future__ import annotations

from collections.abc import Callable
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
    pre_step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
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
        pre_step: `(x_t, t) -> x_t` applied before each network call, t (b,) int64: e.g. the video models
            replace their context frames by the clean context noised to t (LVDM's replacement conditioning).
        callback: called after each step with {"i", "t", "x" (x after the step), "model_output"}; for progress
            bars and inspecting trajectories, not for changing them.
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
    for i, t in enumerate(timesteps):
        t_batch = repeat(t.to(device=device, dtype=torch.int64), " -> b", b=shape[0])
        if pre_step is not None:
            x = pre_step(x, t_batch)
        out = guidance(denoiser.predict, x, t_batch, cond)
        x = stepper.step(out, t, x, generator=generator)
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "model_output": out})
    return x
