"""Video LDMs of the driving stack: the key-frame prediction model and the x4 interpolation model.

Both are a `VideoUNet` (the image LDM's spatial U-Net, frozen, + temporal layers) around a `Denoiser`, trained on
clips of scaled latents with some frames given as context (SPEC sections 1 and 2).

Context design: LVDM's (He et al. 2022, sec. 3.3, eq. 8), not Video LDM's masked-concat through a learned
downsampling. The context latents are written into the U-Net input in place of the noisy latents of their
frames, and a binary mask enters as one extra input channel (a zero-initialised conv on the mask added to the
first conv's output, which is the same thing by linearity; see `drivesim.unet.video`). Why: no new encoder
path, the frozen spatial layers see context frames as ordinary (slightly noisy) latents, and a fresh model is
exactly the image model.

- Conditional latent perturbation (LVDM): in training the context latents are diffused to a level
  s ~ U{0..`context_noise_max`} per clip (fresh noise) and their frames get the time embedding of s while the
  frames to generate get that of t; sampling uses the fixed `context_noise_sample` (one noise draw per call).
- The loss is the Denoiser's MSE (epsilon or v) on the frames to generate only (weight 0 on context frames).
- Prediction: S ~ U(`context_frames`) = {0, 1, 2} context frames at the start of each clip; S = 0 (all-zero
  mask) is the unconditional model that guidance contrasts with.
- Interpolation: windows of 4k + 1 frames (5 by default: key, 3 new, key); key frames every 4th frame given
  with p = 1 - `interpolation_uncond_p` (0.9, LVDM), else none. One model serves both x4 stages, told which by
  `cond.interpolation_stage` (0: T -> 4T, 1: 4T -> 16T), an embedding added to the time embedding.
- Labels and boxes condition every frame; day/night, crowdedness and the box set are dropped per clip with
  the U-Net config's probabilities (classifier-free guidance), as in the image LDM.

Sampling (`sample`): all frames start from noise. Before every network call the context frames of the sampler
state are replaced by the context diffused to the current level t with one fixed noise draw (replacement, so
the unconditional branch sees a state consistent with its S = 0 training: every frame at level t); the
conditional branch then gets the context at the fixed level s with its own time embedding (the network
overwrites those frames). The returned context frames are the given clean latents. Guidance goes through
`drivesim.diffusion.Guidance`: context guidance `f(z) + s (f(z; c_S) - f(z))` (Video LDM), which with
s = 1 + w is LVDM's unconditional guidance `(1 + w) eps_c - w eps_u` (default w = 0.1), where the weakened
condition is the all-zero mask; plus classifier-free guidance on labels/boxes (`diffusion.guidance_scale`).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
from einops import rearrange
from torch import nn

from drivesim.bbox_conditioning.latent_frames import BOX_REDUCTIONS
from drivesim.configs import VideoLDMConfig
from drivesim.diffusion import Denoiser, Guidance, GuidanceTerm, drop_conditions
from drivesim.diffusion import sample as run_sampler
from drivesim.diffusion.schedule import check_diffusion_config
from drivesim.errors import ConfigError, DataError
from drivesim.registry import register_model
from drivesim.types import Conditioning
from drivesim.unet.video import VideoUNet

__all__ = ["InterpolationLDM", "PredictionLDM", "VideoLDM", "drop_context", "INTERPOLATION_FACTOR"]

BATCH_KEYS = ("latents", "boxes", "classes", "box_mask", "night", "crowdedness")
INTERPOLATION_FACTOR = 4
"""Each interpolation stage multiplies the frame rate by 4 (Video LDM: 1.875 -> 7.5 -> 30 fps)."""
NUM_STAGES = 2


def drop_context(cond: Conditioning) -> Conditioning:
    """The condition with no context frame (all-zero mask): the unconditional branch of context guidance."""
    if cond.context_mask is None:
        return cond
    return cond.replace(context_mask=torch.zeros_like(cond.context_mask, dtype=torch.bool))


class VideoLDM(nn.Module):
    """Shared machinery of the prediction and interpolation models (context frames, perturbation, guidance).

    Args:
        config: `VideoLDMConfig`; `config.task` must match the class.

    Attributes:
        unet: the `VideoUNet` (checkpoint keys start with `unet.spatial.`).
        denoiser: `Denoiser` around `unet` (parameterisation and loss; not a submodule).

    Raises:
        ConfigError: inconsistent config (field named).
    """

    task_name: ClassVar[str] = ""
    num_stages: ClassVar[int] = 0

    def __init__(self, config: VideoLDMConfig):
        super().__init__()
        check_video_config(config)
        if config.task != self.task_name:
            raise ConfigError(f"config: task: {type(self).__name__} needs task {self.task_name!r}, got "
                              f"{config.task!r}")
        self.config = config
        self.unet = VideoUNet(config.unet, config.temporal, context_input=True, num_stages=self.num_stages)
        self.denoiser = Denoiser(self.unet, config.diffusion)

    @classmethod
    def from_image_ldm(cls, image_ldm: nn.Module, config: VideoLDMConfig) -> VideoLDM:
        """The video model with `image_ldm`'s trained U-Net weights copied in (frozen unless
        `config.temporal.train_spatial`), on the image model's device.

        Raises:
            ConfigError: the image LDM's U-Net config or noise schedule / parameterisation differs from `config`'s
                (message names the field).
        """
        icfg = image_ldm.config
        if icfg.unet != config.unet:
            diff = next(f.name for f in dataclasses.fields(config.unet)
                        if getattr(icfg.unet, f.name) != getattr(config.unet, f.name))
            raise ConfigError(f"config: {config.task}.unet.{diff}: differs from the image LDM's "
                              f"({getattr(config.unet, diff)!r} vs {getattr(icfg.unet, diff)!r})")
        for name in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type"):
            if getattr(icfg.diffusion, name) != getattr(config.diffusion, name):
                raise ConfigError(f"config: {config.task}.diffusion.{name}: differs from the image LDM's "
                                  f"({getattr(config.diffusion, name)!r} vs {getattr(icfg.diffusion, name)!r})")
        model = cls(config).to(next(image_ldm.parameters()).device)
        model.unet.load_spatial_state(image_ldm.unet.state_dict())
        return model

    # -- data ------------------------------------------------------------------------------------------------
    def clip_from_batch(self, batch: dict) -> tuple[torch.Tensor, Conditioning]:
        """Latents and condition of a batch of clips.

        Args:
            batch: "latents" (b, t, c, h, w) scaled latents, "boxes" (b, t, n, 4) normalised xyxy, "classes"
                (b, t, n) int64, "box_mask" (b, t, n) bool, "night" (b,), "crowdedness" (b,) (+ "interpolation_stage"
                (b,) for the interpolation model).
        Raises:
            DataError: a key is missing or shapes disagree with the config (message names the field).
        """
        if "latents" not in batch:
            raise DataError(f"batch: latents: missing ({self.task_name} needs {', '.join(BATCH_KEYS)})")
        x0 = batch["latents"].float()
        if x0.ndim != 5 or x0.shape[2] != self.config.unet.in_channels:
            raise DataError(f"batch: latents: expected (b, t, {self.config.unet.in_channels}, h, w), got "
                            f"{tuple(x0.shape)}")
        return x0, Conditioning.from_batch({k: v for k, v in batch.items() if k != "interpolation_stage"})

    def draw_context_mask(self, b: int, t: int, device: torch.device) -> torch.Tensor:
        """(b, t) bool training mask of context frames (model-specific)."""
        raise NotImplementedError

    def training_condition(self, batch: dict, cond: Conditioning) -> Conditioning:
        """Hook for model-specific condition fields (the interpolation stage label)."""
        return cond

    def perturb_context(self, x0: torch.Tensor, mask: torch.Tensor, level: torch.Tensor,
                        noise: torch.Tensor | None = None,
                        generator: torch.Generator | None = None) -> torch.Tensor:
        """LVDM conditional latent perturbation: context latents diffused to `level`, zeros on other frames.

        Args:
            x0: (b, t, c, h, w) clean scaled latents (only the masked frames are read).
            mask: (b, t) bool context frames.
            level: (b,) int64 diffusion timesteps s.
            noise: like `x0`, or None to draw it (with `generator`, on CPU, then moved).
        Returns:
            (b, t, c, h, w) = m * (sqrt(ab_s) x0 + sqrt(1 - ab_s) noise).
        """
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(x0)
        z_s = self.denoiser.schedule.add_noise(x0, noise, level)
        return z_s * rearrange(mask, "b t -> b t 1 1 1").to(z_s.dtype)

    def drop_for_guidance(self, cond: Conditioning) -> Conditioning:
        """Drop each clip's day/night, crowdedness and box set for classifier-free guidance (`drop_conditions`)."""
        return drop_conditions(cond, self.config.unet)

    # -- training --------------------------------------------------------------------------------------------
    def loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        """Diffusion loss of a batch of clips with random context frames (see the module docstring).

        Returns:
            (scalar loss, logs) with logs "context_frames" (mean per clip), "unconditional" (fraction of clips
            with no context), "context_noise_level" (mean s).
        Raises:
            DataError: see `clip_from_batch`.
        """
        x0, cond = self.clip_from_batch(batch)
        b, t = x0.shape[:2]
        mask = self.draw_context_mask(b, t, x0.device)
        level = torch.randint(0, self.config.context_noise_max + 1, (b,)).to(x0.device)
        cond = cond.replace(context_latents=self.perturb_context(x0, mask, level), context_mask=mask,
                            context_noise_level=level)
        cond = self.drop_for_guidance(self.training_condition(batch, cond))
        weight = rearrange((~mask).to(x0.dtype), "b t -> b t 1 1 1")
        loss = self.denoiser.loss(x0, cond, weight=weight)
        logs = {"context_frames": float(mask.sum(1).float().mean()),
                "unconditional": float((~mask.any(1)).float().mean()),
                "context_noise_level": float(level.float().mean())}
        return loss, logs

    # -- sampling --------------------------------------------------------------------------------------------
    def guidance(self, guidance_scale: float | None = None, context_guidance: float | None = None) -> Guidance:
        """Guidance terms: labels/boxes CFG (default `diffusion.guidance_scale`) and context guidance
        s = `context_guidance` (default `config.context_guidance`; s = 1 + w of LVDM's unconditional guidance).
        Terms with scale 1 are skipped (no extra network call)."""
        d = self.config.diffusion
        labels = d.guidance_scale if guidance_scale is None else guidance_scale
        context = self.config.context_guidance if context_guidance is None else context_guidance
        return Guidance([GuidanceTerm.classifier_free(labels), GuidanceTerm(drop_context, context, "context")])

    @torch.no_grad()
    def sample(self, cond: Conditioning, latent_size: tuple[int, int], context_latents: torch.Tensor | None = None,
               context_mask: torch.Tensor | None = None, steps: int | None = None, sampler: str | None = None,
               guidance_scale: float | None = None, context_guidance: float | None = None,
               context_noise_level: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Generate scaled latents for every frame of `cond`, the context frames kept as given.

        Args:
            cond: `Conditioning` for b videos of t frames (boxes of every frame; `interpolation_stage` for the
                interpolation model).
            latent_size: (h, w) of the latents (pixels / 8).
            context_latents: (b, t, c, h, w) clean scaled latents, read on the context frames only; or None.
            context_mask: (b, t) bool context frames; None or all False: unconditional generation.
            steps, sampler: default to the config's `diffusion` block.
            guidance_scale: labels/boxes CFG scale (default `diffusion.guidance_scale`).
            context_guidance: context guidance scale s (default `config.context_guidance`; LVDM w = s - 1).
            context_noise_level: fixed perturbation level s of the context (default `config.context_noise_sample`).
            generator: CPU generator for the initial noise and the context perturbation noise.
        Returns:
            (b, t, out_channels, h, w) float32 scaled latents on the model's device; the context frames equal
            `context_latents` there.
        Raises:
            ValueError: context tensors whose shapes disagree with `cond`.
        """
        d = self.config.diffusion
        device = next(self.parameters()).device
        b, t = cond.batch_size, cond.num_frames
        shape = (b, t, self.config.unet.out_channels, *latent_size)
        cond = cond.to(device)
        x = torch.randn(shape, generator=generator, dtype=torch.float32)  # on the CPU: the same on every device
        if context_mask is None:
            context_mask = torch.zeros(b, t, dtype=torch.bool)
        mask = context_mask.to(device=device, dtype=torch.bool)
        if mask.shape != (b, t):
            raise ValueError(f"context_mask has shape {tuple(mask.shape)}, cond has (b, t) = {(b, t)}")
        has_context = bool(mask.any())
        if has_context:
            if context_latents is None or tuple(context_latents.shape) != shape:
                got = None if context_latents is None else tuple(context_latents.shape)
                raise ValueError(f"context_latents has shape {got}, expected {shape}")
            ctx = context_latents.to(device=device, dtype=torch.float32)
            ctx_noise = torch.randn(shape, generator=generator, dtype=torch.float32).to(device)
            s = self.config.context_noise_sample if context_noise_level is None else context_noise_level
            level = torch.full((b,), int(s), dtype=torch.int64, device=device)
            cond = cond.replace(context_latents=self.perturb_context(ctx, mask, level, noise=ctx_noise),
                                context_mask=mask, context_noise_level=level)
        else:
            cond = cond.replace(context_latents=None, context_mask=mask, context_noise_level=None)
        m5 = rearrange(mask, "b t -> b t 1 1 1")
        # without context frames the context-dropped call is the conditional call itself: skip it
        guidance = self.guidance(guidance_scale, context_guidance if has_context else 1.0)

        def replace_context(x_t: torch.Tensor, t_batch: torch.Tensor) -> torch.Tensor:
            return torch.where(m5, self.denoiser.schedule.add_noise(ctx, ctx_noise, t_batch), x_t)

        x = run_sampler(self.denoiser, shape, cond, sampler=sampler or d.sampler, steps=steps or d.num_inference_steps,
                        guidance=guidance, x_T=x, device=device, pre_step=replace_context if has_context else None)
        if has_context:
            x = torch.where(m5, ctx, x)
        return x


def check_video_config(config: VideoLDMConfig, source: str = "config") -> None:
    """Raise `ConfigError` (naming `source` and the field) for an unusable video LDM config."""
    from drivesim.unet.video import check_temporal_config

    check_temporal_config(config.temporal, source)
    check_diffusion_config(config.diffusion, source)
    if config.task not in ("prediction", "interpolation"):
        raise ConfigError(f"{source}: task: {config.task!r} not in ('prediction', 'interpolation')")
    if config.num_frames < 2:
        raise ConfigError(f"{source}: num_frames: must be >= 2, got {config.num_frames}")
    if config.frame_stride < 1:
        raise ConfigError(f"{source}: frame_stride: must be >= 1, got {config.frame_stride}")
    if not 0 <= config.context_noise_max < config.diffusion.num_train_timesteps:
        raise ConfigError(f"{source}: context_noise_max: must be in [0, {config.diffusion.num_train_timesteps}), "
                          f"got {config.context_noise_max}")
    if not 0 <= config.context_noise_sample < config.diffusion.num_train_timesteps:
        raise ConfigError(f"{source}: context_noise_sample: must be in [0, "
                          f"{config.diffusion.num_train_timesteps}), got {config.context_noise_sample}")
    if not config.context_frames or any(not 0 <= s < config.num_frames for s in config.context_frames):
        raise ConfigError(f"{source}: context_frames: each must be in [0, num_frames={config.num_frames}), got "
                          f"{config.context_frames}")
    if not 0.0 <= config.interpolation_uncond_p <= 1.0:
        raise ConfigError(f"{source}: interpolation_uncond_p: must be in [0, 1], got {config.interpolation_uncond_p}")
    if config.box_reduction is not None and config.box_reduction not in BOX_REDUCTIONS:
        raise ConfigError(f"{source}: box_reduction: {config.box_reduction!r} not in {BOX_REDUCTIONS} (or None)")
    if config.task == "interpolation" and (config.num_frames - 1) % INTERPOLATION_FACTOR:
        raise ConfigError(f"{source}: num_frames: interpolation windows have 4k + 1 frames (key frames every "
                          f"{INTERPOLATION_FACTOR}), got {config.num_frames}")


@register_model("prediction_ldm", VideoLDMConfig)
class PredictionLDM(VideoLDM):
    """Key-frame prediction model: S context frames at the start of a clip, S ~ U(`config.context_frames`)."""

    task_name = "prediction"

    def draw_context_mask(self, b: int, t: int, device: torch.device) -> torch.Tensor:
        """(b, t) bool: the first S frames of each clip, S drawn uniformly from `config.context_frames`."""
        choices = torch.tensor(self.config.context_frames, dtype=torch.int64)
        num = choices[torch.randint(0, len(choices), (b,))]
        return (rearrange(torch.arange(t), "t -> 1 t") < rearrange(num, "b -> b 1")).to(device)

    @torch.no_grad()
    def predict(self, cond: Conditioning, context: torch.Tensor, **kwargs) -> torch.Tensor:
        """Continue a clip from its first S frames.

        Args:
            cond: `Conditioning` for the whole clip of t frames (boxes of every frame).
            context: (b, S, c, h, w) clean scaled latents of the first S frames (S < t; S = 0: unconditional).
            kwargs: as `sample` (steps, sampler, guidance_scale, context_guidance, context_noise_level, generator).
        Returns:
            (b, t, c, h, w) scaled latents whose first S frames are `context`.
        """
        b, t, num = cond.batch_size, cond.num_frames, context.shape[1]
        if context.ndim != 5 or context.shape[0] != b or num >= t:
            raise ValueError(f"context has shape {tuple(context.shape)}; expected (b={b}, S<{t}, c, h, w)")
        full = torch.zeros((b, t, *context.shape[2:]), dtype=torch.float32)
        full[:, :num] = context.float().cpu()
        mask = torch.zeros(b, t, dtype=torch.bool)
        mask[:, :num] = True
        return self.sample(cond, tuple(context.shape[-2:]), context_latents=full, context_mask=mask, **kwargs)


@register_model("interpolation_ldm", VideoLDMConfig)
class InterpolationLDM(VideoLDM):
    """x4 temporal interpolation model: key frames every 4th frame of a 4k + 1 window, stage label 0 or 1."""

    task_name = "interpolation"
    num_stages = NUM_STAGES

    @staticmethod
    def key_frame_mask(t: int) -> torch.Tensor:
        """(t,) bool: True on frames 0, 4, 8, ... (t = 4k + 1)."""
        return torch.arange(t) % INTERPOLATION_FACTOR == 0

    def draw_context_mask(self, b: int, t: int, device: torch.device) -> torch.Tensor:
        """(b, t) bool: key frames with p = 1 - `interpolation_uncond_p`, else no context (LVDM: 90 / 10)."""
        keep = torch.rand(b) >= self.config.interpolation_uncond_p
        return (rearrange(self.key_frame_mask(t), "t -> 1 t") & rearrange(keep, "b -> b 1")).to(device)

    def training_condition(self, batch: dict, cond: Conditioning) -> Conditioning:
        """Adds the stage label from batch["interpolation_stage"] (b,) int64 in {0, 1}."""
        if "interpolation_stage" not in batch:
            raise DataError("batch: interpolation_stage: missing (the interpolation model needs the x4 stage label per "
                            "window; "
                            "use drivesim.datasets.keyframes.InterpolationWindows)")
        stage = batch["interpolation_stage"].long().to(cond.boxes.device)
        if bool(((stage < 0) | (stage >= NUM_STAGES)).any()):
            raise DataError(f"batch: interpolation_stage: values must be in [0, {NUM_STAGES}), got {stage.tolist()}")
        return cond.replace(interpolation_stage=stage)

    @torch.no_grad()
    def interpolate(self, cond: Conditioning, keys: torch.Tensor, stage: int, **kwargs) -> torch.Tensor:
        """Fill 3 frames between each pair of consecutive key frames.

        Args:
            cond: `Conditioning` for the 4k + 1 output frames (boxes of every frame, key frames included).
            keys: (b, k + 1, c, h, w) clean scaled latents of the key frames.
            stage: 0 (T -> 4T) or 1 (4T -> 16T).
            kwargs: as `sample`.
        Returns:
            (b, 4k + 1, c, h, w) scaled latents; frames 0, 4, 8, ... are `keys`.
        """
        b, t, num = cond.batch_size, cond.num_frames, keys.shape[1]
        if keys.ndim != 5 or keys.shape[0] != b or t != INTERPOLATION_FACTOR * (num - 1) + 1:
            raise ValueError(f"keys has shape {tuple(keys.shape)}; cond has {t} frames, expected "
                             f"{INTERPOLATION_FACTOR} * (keys - 1) + 1")
        if stage not in range(NUM_STAGES):
            raise ValueError(f"stage must be 0 or 1, got {stage}")
        mask = self.key_frame_mask(t)
        full = torch.zeros((b, t, *keys.shape[2:]), dtype=torch.float32)
        full[:, mask] = keys.float().cpu()
        cond = cond.replace(interpolation_stage=torch.full((b,), stage, dtype=torch.int64, device=cond.boxes.device))
        return self.sample(cond, tuple(keys.shape[-2:]), context_latents=full,
                           context_mask=repeat_mask(mask, b), **kwargs)


def repeat_mask(mask: torch.Tensor, b: int) -> torch.Tensor:
    """(t,) bool -> (b, t) bool."""
    return rearrange(mask, "t -> 1 t").expand(b, -1).clone()
