"""The one adapter between drivesim and diffusers' noise schedulers.

Training noise uses the alpha_bar table of `diffusers.DDPMScheduler` (SPEC: 1000 steps, linear variance-preserving
schedule; the closed forms below are applied here so timesteps may be given per frame, which diffusers'
`add_noise` cannot broadcast);
sampling steps come from `diffusers.DDIMScheduler` (eta = 0) or `diffusers.DPMSolverMultistepScheduler`
(DPM-Solver++, 2nd order). drivesim code never reimplements a schedule or a solver step: it calls this module.

Notation (DDPM / Salimans & Ho 2022): alpha_bar_t = prod_{s<=t} (1 - beta_s);
x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps;  v_t = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x_0.

Note on names: LDM's own code calls `linear` what diffusers calls `scaled_linear` (linear in sqrt(beta)). Our
config's `beta_schedule` is passed to diffusers unchanged, so `linear` here is linear in beta.
"""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
from einops import rearrange

from drivesim.configs import DiffusionConfig
from drivesim.errors import ConfigError

PREDICTION_TYPES = ("epsilon", "v_prediction")
SAMPLERS = ("ddim", "dpmpp")


def check_diffusion_config(config: DiffusionConfig, source: str = "config") -> None:
    """Raise `ConfigError` (naming `source` and the field) if `config` asks for something unsupported."""
    if config.prediction_type not in PREDICTION_TYPES:
        raise ConfigError(f"{source}: diffusion.prediction_type: {config.prediction_type!r} not in {PREDICTION_TYPES}")
    if config.sampler not in SAMPLERS:
        raise ConfigError(f"{source}: diffusion.sampler: {config.sampler!r} not in {SAMPLERS}")
    if config.num_train_timesteps < 2:
        raise ConfigError(f"{source}: diffusion.num_train_timesteps: must be >= 2, got {config.num_train_timesteps}")
    if config.beta_schedule not in ("linear", "scaled_linear", "squaredcos_cap_v2"):
        raise ConfigError(f"{source}: diffusion.beta_schedule: unknown schedule {config.beta_schedule!r}")


def _schedule_kwargs(config: DiffusionConfig) -> dict:
    return dict(
        num_train_timesteps=config.num_train_timesteps,
        beta_start=config.beta_start,
        beta_end=config.beta_end,
        beta_schedule=config.beta_schedule,
        prediction_type=config.prediction_type,
    )


class NoiseSchedule:
    """Forward process q(x_t | x_0) of a `DiffusionConfig`, backed by `diffusers.DDPMScheduler`.

    Holds no parameters and no device state; every method moves what it needs to its inputs' device.
    """

    def __init__(self, config: DiffusionConfig):
        check_diffusion_config(config)
        self.config = config
        self._ddpm = DDPMScheduler(**_schedule_kwargs(config), clip_sample=False)

    @property
    def num_train_timesteps(self) -> int:
        return self.config.num_train_timesteps

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        """(T,) float32 alpha_bar_t for t = 0 .. T-1 (CPU)."""
        return self._ddpm.alphas_cumprod

    def sample_timesteps(self, batch_size: int, device: torch.device | str,
                         generator: torch.Generator | None = None) -> torch.Tensor:
        """(batch_size,) int64 timesteps drawn uniformly from {0, .., T-1} (DDPM training)."""
        return torch.randint(0, self.num_train_timesteps, (batch_size,), generator=generator,
                             device="cpu").to(device)

    def coefficients(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t)) broadcastable against `like`.

        Args:
            t: int64 timesteps in [0, T), shape (b,) (one per sample) or (b, t) (one per frame, e.g. LVDM's
                perturbed context frames); its shape must be a prefix of `like.shape`.
            like: the tensor the coefficients multiply (dtype and device are taken from it).
        Returns:
            two tensors of shape t.shape + (1,) * (like.ndim - t.ndim), dtype of `like`.
        """
        if tuple(like.shape[: t.ndim]) != tuple(t.shape):
            raise ValueError(f"timesteps of shape {tuple(t.shape)} do not prefix data of shape {tuple(like.shape)}")
        ab = self.alphas_cumprod.to(like.device)[t.long().to(like.device)]
        ab = rearrange(ab, "... -> ..." + " 1" * (like.ndim - t.ndim))
        return ab.sqrt().to(like.dtype), (1 - ab).sqrt().to(like.dtype)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise (DDPM eq. 4; alpha_bar from diffusers).

        Args:
            x0, noise: (b, ...) float, e.g. (b, t, c, h, w).
            t: (b,) or (b, t) int64 timesteps in [0, T) (see `coefficients`).
        Returns:
            like `x0`.
        """
        a, s = self.coefficients(t, x0)
        return a * x0 + s * noise

    def velocity(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """v = sqrt(alpha_bar_t) noise - sqrt(1 - alpha_bar_t) x0 (Salimans & Ho 2022); shapes as `add_noise`."""
        a, s = self.coefficients(t, x0)
        return a * noise - s * x0

    def make_sampler(self, sampler: str | None = None) -> Sampler:
        """A fresh (stateful) reverse-process stepper for this schedule: "ddim" or "dpmpp" (default: config's).

        Raises:
            ConfigError: unknown sampler name.
        """
        return Sampler(self.config, sampler or self.config.sampler)


class Sampler:
    """Reverse-process stepper wrapping a diffusers scheduler; make a new one for each sampling run.

    Both samplers use `timestep_spacing="trailing"` so the first step starts at t = T-1 (pure noise; the
    "leading" default skips the noisiest timesteps) and end on the clean sample (DDIM `set_alpha_to_one`,
    DPM-Solver++ `final_sigmas_type="zero"`). Latents are never clipped.
    """

    def __init__(self, config: DiffusionConfig, name: str):
        if name not in SAMPLERS:
            raise ConfigError(f"sampler: unknown sampler {name!r} (known: {', '.join(SAMPLERS)})")
        self.name = name
        kw = _schedule_kwargs(config)
        if name == "ddim":
            self._scheduler = DDIMScheduler(**kw, clip_sample=False, set_alpha_to_one=True,
                                            timestep_spacing="trailing")
        else:
            self._scheduler = DPMSolverMultistepScheduler(**kw, algorithm_type="dpmsolver++", solver_order=2,
                                                          timestep_spacing="trailing", final_sigmas_type="zero")

    @property
    def init_noise_sigma(self) -> float:
        return float(self._scheduler.init_noise_sigma)

    def set_timesteps(self, steps: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """Prepare `steps` reverse steps and return their timesteps, (steps,) int64, descending.

        Raises:
            ConfigError: `steps` < 1 or > the number of training timesteps.
        """
        if not 1 <= steps <= self._scheduler.config.num_train_timesteps:
            raise ConfigError(f"sampler: steps: must be in [1, {self._scheduler.config.num_train_timesteps}], "
                              f"got {steps}")
        self._scheduler.set_timesteps(steps, device=device)
        return self._scheduler.timesteps

    def step(self, model_output: torch.Tensor, t: torch.Tensor | int, x_t: torch.Tensor,
             generator: torch.Generator | None = None) -> torch.Tensor:
        """One reverse step x_t -> x_{t_prev}; `model_output` is in the config's parameterisation (eps or v)."""
        if self.name == "ddim":
            out = self._scheduler.step(model_output, int(t), x_t, eta=0.0, generator=generator)
        else:
            out = self._scheduler.step(model_output, t, x_t, generator=generator)
        return out.prev_sample
