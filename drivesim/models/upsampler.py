"""Pixel-space x4 video upsampler (SPEC section 1, step 5; Video LDM sec. 3.4 / Imagen-style noise augmentation).

A `VideoUNet` (spatial U-Net + temporal layers) on RGB frames, denoising the high-resolution
video x (b, t, 3, H, W) given the low-resolution video:

- conditioning: the low-resolution video y = area-downsample_x4(x) is noise-augmented to a level g,
  c = a_g y + s_g eps (the DDPM forward process of the same schedule: a_g = sqrt(alpha_bar_g),
  s_g = sqrt(1 - alpha_bar_g)), upsampled back to H x W (bilinear) and concatenated to the noisy input as 3
  extra channels (`unet.in_channels` = 6);
- the noise level g enters as a sinusoidal embedding -> MLP added to the timestep embedding of every frame
  (`NoiseLevelUNet`; the MLP's last layer is zero-initialised). In training g ~ U{0..`max_noise_level`}; at
  sampling a fixed g (`upsample(noise_level=...)`; Video LDM / Imagen use a small fixed level);
- boxes and day/night/crowdedness are not used (their learned nulls are fed), so any video can be upsampled;
- training crops random `patch_size` x `patch_size` patches (the same crop for every frame of a clip: the
  temporal layers must see a consistent patch), sampling runs on whole frames (the network is convolutional)
  in chunks of `chunk_frames` frames (the paper: 8).

`Upsampler.loss(batch)` takes batch["frames"] high-resolution (b, t, 3, H, W) in [-1, 1]; the low resolution is
made by area downsampling x `scale`. `Upsampler.upsample(video_lowres)` returns (b, t, 3, scale h, scale w).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn

from drivesim.configs import UpsamplerConfig
from drivesim.diffusion import Denoiser
from drivesim.diffusion import sample as run_sampler
from drivesim.diffusion.schedule import check_diffusion_config
from drivesim.errors import ConfigError, DataError
from drivesim.nn.blocks import timestep_embedding
from drivesim.registry import register_model
from drivesim.types import Conditioning
from drivesim.unet.spatial import SpatialUNet
from drivesim.unet.video import VideoUNet

__all__ = ["NoiseLevelUNet", "Upsampler", "check_upsampler_config"]


class NoiseLevelUNet(SpatialUNet):
    """`SpatialUNet` whose embedding also carries the noise-augmentation level g of the conditioning video.

    g travels as `cond.noise_aug_level` (b,) int64 (the level the low-resolution video was diffused to).
    Embedding: sinusoidal(g) -> Linear-SiLU-Linear (last layer zero-init, so a
    fresh model ignores g), added to every frame's timestep embedding.
    """

    def __init__(self, config):
        super().__init__(config)
        mc = config.model_channels
        self.noise_level_embed = nn.Sequential(nn.Linear(mc, self.emb_dim), nn.SiLU(),
                                               nn.Linear(self.emb_dim, self.emb_dim))
        nn.init.zeros_(self.noise_level_embed[2].weight)
        nn.init.zeros_(self.noise_level_embed[2].bias)

    def embed(self, timesteps: torch.Tensor, cond: Conditioning, num_frames: int) -> torch.Tensor:
        """As `SpatialUNet.embed` + embedding of `cond.noise_aug_level` (b,) (None: nothing added)."""
        emb = super().embed(timesteps, cond, num_frames)
        if cond.noise_aug_level is None:
            return emb
        g = timestep_embedding(cond.noise_aug_level.to(emb.device), self.config.model_channels)
        return emb + repeat(self.noise_level_embed(g.to(emb.dtype)), "b e -> (b t) e", t=num_frames)


def check_upsampler_config(config: UpsamplerConfig, source: str = "config") -> None:
    """Raise `ConfigError` (naming `source` and the field) for an unusable upsampler config."""
    check_diffusion_config(config.diffusion, source)
    if config.scale < 1:
        raise ConfigError(f"{source}: upsampler.scale: must be >= 1, got {config.scale}")
    if config.unet.in_channels != 6 or config.unet.out_channels != 3:
        raise ConfigError(f"{source}: upsampler.unet.in_channels: the upsampler needs in_channels 6 (noisy RGB + "
                          f"low-res RGB) and out_channels 3, got {config.unet.in_channels}/{config.unet.out_channels}")
    factor = 2 ** (len(config.unet.channel_mult) - 1)
    # the U-Net runs on the high-resolution patch (noisy target + upsampled low-res input), so the patch must be
    # divisible by its downsampling; the low-res crop is patch / scale pixels (SPEC step 5: 80 x 80 at x4, U-Net /8)
    multiple = math.lcm(config.scale, factor)
    if config.patch_size % multiple or config.patch_size < multiple:
        raise ConfigError(f"{source}: upsampler.patch_size: must be a positive multiple of lcm(scale, U-Net "
                          f"downsampling) = {multiple}, got {config.patch_size}")
    if config.chunk_frames < 1:
        raise ConfigError(f"{source}: upsampler.chunk_frames: must be >= 1, got {config.chunk_frames}")
    if not 0 <= config.max_noise_level < config.diffusion.num_train_timesteps:
        raise ConfigError(f"{source}: upsampler.max_noise_level: must be in [0, "
                          f"{config.diffusion.num_train_timesteps}), got {config.max_noise_level}")


def area_downsample(frames: torch.Tensor, scale: int) -> torch.Tensor:
    """(b, t, c, H, W) -> (b, t, c, H/scale, W/scale) by averaging scale x scale blocks (area resampling)."""
    b = frames.shape[0]
    x = F.avg_pool2d(rearrange(frames, "b t c h w -> (b t) c h w"), scale)
    return rearrange(x, "(b t) c h w -> b t c h w", b=b)


def _upsample_bilinear(frames: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    b = frames.shape[0]
    x = F.interpolate(rearrange(frames, "b t c h w -> (b t) c h w"), size=size, mode="bilinear",
                      align_corners=False)
    return rearrange(x, "(b t) c h w -> b t c h w", b=b)


@register_model("video_upsampler", UpsamplerConfig)
class Upsampler(nn.Module):
    """x4 pixel-space video diffusion upsampler; see the module docstring.

    Args:
        config: `UpsamplerConfig`.

    Attributes:
        unet: `VideoUNet` around a `NoiseLevelUNet` (all parameters train: there is no image upsampler to freeze
            here; `temporal.train_spatial` is ignored).
        denoiser: `Denoiser` around the 6-channel network (noisy frames + upsampled noisy low-res video).

    Raises:
        ConfigError: inconsistent config (field named).
    """

    def __init__(self, config: UpsamplerConfig):
        super().__init__()
        check_upsampler_config(config)
        self.config = config
        self.unet = VideoUNet(config.unet, config.temporal, spatial=NoiseLevelUNet(config.unet),
                              new_prefixes=("noise_level_embed.",))
        self.unet.set_train_spatial(True)
        self.denoiser = Denoiser(self._network, config.diffusion)

    def _network(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        return self.unet(torch.cat([x, cond.lowres.to(x.dtype)], dim=2), t, cond)

    def condition(self, lowres: torch.Tensor, size: tuple[int, int], level: torch.Tensor,
                  noise: torch.Tensor | None = None, generator: torch.Generator | None = None) -> Conditioning:
        """The condition of a low-resolution video: noise-augmented to `level`, upsampled to `size`.

        Args:
            lowres: (b, t, 3, h, w) in [-1, 1].
            size: (H, W) of the output.
            level: (b,) int64 noise-augmentation levels g.
            noise: like `lowres` (None: drawn on CPU with `generator`).
        Returns:
            `Conditioning` with lowres (b, t, 3, H, W) = bilinear_up(a_g y + s_g eps), noise_aug_level = g, null
            boxes/labels.
        """
        if noise is None:
            noise = torch.randn(lowres.shape, generator=generator, dtype=torch.float32).to(lowres)
        c = self.denoiser.schedule.add_noise(lowres.float(), noise, level)
        b, t = lowres.shape[:2]
        cond = Conditioning.null(b, t, max(1, self.config.unet.boxes.max_boxes), lowres.device)
        return cond.replace(lowres=_upsample_bilinear(c, size), noise_aug_level=level)

    def loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        """Diffusion loss on a random `patch_size` patch of every clip.

        Args:
            batch: "frames" (b, t, 3, H, W) float in [-1, 1], H and W >= patch_size and multiples of `scale`.
        Returns:
            (scalar loss, logs {"noise_level": mean g}).
        Raises:
            DataError: missing key, wrong shape, or frames smaller than the patch (field named).
        """
        if "frames" not in batch:
            raise DataError("batch: frames: missing (the upsampler trains on high-resolution frames)")
        x = batch["frames"].float()
        p, s = self.config.patch_size, self.config.scale
        if x.ndim != 5 or x.shape[2] != 3:
            raise DataError(f"batch: frames: expected (b, t, 3, H, W), got {tuple(x.shape)}")
        height, width = x.shape[-2:]
        if height < p or width < p:
            raise DataError(f"batch: frames: {height}x{width} is smaller than upsampler.patch_size {p}")
        b = x.shape[0]
        # one crop per clip, shared by its frames, on the scale grid so the area downsampling is aligned; Python
        # ints, so the crop's size never depends on tensor values (a FakeTensorMode trace, drivesim.pipeline.plan)
        top = (torch.randint(0, (height - p) // s + 1, (b,)) * s).tolist()
        left = (torch.randint(0, (width - p) // s + 1, (b,)) * s).tolist()
        x = torch.stack([x[i, :, :, top[i]:top[i] + p, left[i]:left[i] + p] for i in range(b)])
        level = torch.randint(0, self.config.max_noise_level + 1, (b,)).to(x.device)
        cond = self.condition(area_downsample(x, s), (p, p), level)
        loss = self.denoiser.loss(x, cond)
        return loss, {"noise_level": float(level.float().mean())}

    @torch.no_grad()
    def upsample(self, video_lowres: torch.Tensor, noise_level: int = 50, steps: int | None = None,
                 sampler: str | None = None, chunk_frames: int | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Upsample a low-resolution video x `scale` in space, in chunks of `chunk_frames` frames.

        Args:
            video_lowres: (b, t, 3, h, w) float in [-1, 1]; h, w such that scale*h, scale*w fit the U-Net.
            noise_level: fixed noise-augmentation level g of the conditioning (0 <= g <= max_noise_level
                recommended: the range it was trained on).
            steps, sampler: default to the config's `diffusion` block.
            chunk_frames: frames per chunk (default `config.chunk_frames`; the last chunk may be shorter).
            generator: CPU generator for all noise (initial noise and the augmentation noise).
        Returns:
            (b, t, 3, scale h, scale w) float32 on the model's device, nominally in [-1, 1] (not clipped).
        Raises:
            DataError: not a (b, t, 3, h, w) video. ConfigError: noise_level outside the schedule.
        """
        if video_lowres.ndim != 5 or video_lowres.shape[2] != 3:
            raise DataError(f"video_lowres: expected (b, t, 3, h, w), got {tuple(video_lowres.shape)}")
        if not 0 <= noise_level < self.config.diffusion.num_train_timesteps:
            raise ConfigError(f"upsample: noise_level: must be in [0, {self.config.diffusion.num_train_timesteps}), "
                              f"got {noise_level}")
        d = self.config.diffusion
        device = next(self.parameters()).device
        b, t, _, h, w = video_lowres.shape
        size = (h * self.config.scale, w * self.config.scale)
        chunk = chunk_frames or self.config.chunk_frames
        level = torch.full((b,), int(noise_level), dtype=torch.int64, device=device)
        out = []
        for start in range(0, t, chunk):
            low = video_lowres[:, start:start + chunk].to(device=device, dtype=torch.float32)
            cond = self.condition(low, size, level, generator=generator)
            shape = (b, low.shape[1], 3, *size)
            x_T = torch.randn(shape, generator=generator, dtype=torch.float32)
            out.append(run_sampler(self.denoiser, shape, cond, sampler=sampler or d.sampler,
                                   steps=steps or d.num_inference_steps, x_T=x_T, device=device))
        return torch.cat(out, dim=1)
