"""LVDM's 3D video autoencoder (He et al. 2022, Sec. 3.1; SPEC section 2) as a second latent space.

`VideoAutoencoder3D` ("video_autoencoder_3d") compresses a clip `(b, t, 3, H, W)` to latents
`(b, t / 4, 4, H/8, W/8)` with a diagonal Gaussian posterior: latent frame j stands for video frames 4j .. 4j+3.
Every 3D convolution is repeat-padded (`drivesim.autoencoder.networks_3d`), so the autoencoder is temporally
shift-equivariant. It subclasses `AutoencoderKL` to reuse, not copy, what the two latent spaces share: the loss
(L1 + KL + box/temporal terms + LPIPS where weights exist + the adversarial term after `disc_start`, in the one-backward
GAN arrangement), the optimizer groups, the scale factor (`compute_scale_factor`, `set_scale_factor`,
`encode_scaled` / `decode_scaled`) and chunked decoding with cross-fades (`decode`, here in chunks of latent frames).
The discriminator is the 3D-conv patch video discriminator of the Video LDM decoder (`VideoDiscriminator3D`); LVDM's
official code uses LDM's per-frame PatchGAN, a 3D one also judges how frames follow each other.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from einops import rearrange

from drivesim.autoencoder.model import AutoencoderKL
from drivesim.autoencoder.networks import DOWNSAMPLE_FACTOR, DiagonalGaussian, check_frames
from drivesim.autoencoder.networks_3d import Decoder3D, Encoder3D
from drivesim.configs import Autoencoder3DConfig
from drivesim.discriminators import VideoDiscriminator3D
from drivesim.errors import ConfigError, DataError
from drivesim.registry import register_model

__all__ = ["VideoAutoencoder3D", "check_config_3d", "check_clip_length"]


def check_config_3d(cfg: Autoencoder3DConfig) -> None:
    """Raises ConfigError (naming the `autoencoder_3d.` field) for a config the 3D autoencoder cannot build."""
    levels = len(cfg.channel_mult)
    if 2 ** (levels - 1) != DOWNSAMPLE_FACTOR:
        raise ConfigError(f"autoencoder_3d.channel_mult: {levels} levels give a spatial downsampling factor "
                          f"{2 ** (levels - 1)}; the 3D autoencoder needs {DOWNSAMPLE_FACTOR} (4 levels)")
    if len(cfg.temporal_downsample) != levels - 1:
        raise ConfigError(f"autoencoder_3d.temporal_downsample: {len(cfg.temporal_downsample)} entries, one per "
                          f"downsampling ({levels - 1}) needed")
    if cfg.frames_per_latent < 2:
        raise ConfigError("autoencoder_3d.temporal_downsample: no temporal downsampling (use the kl-f8 autoencoder "
                          "for one latent per frame)")
    if min(cfg.base_channels, cfg.num_res_blocks, cfg.latent_channels, cfg.in_channels, *cfg.channel_mult) < 1:
        raise ConfigError("autoencoder_3d: base_channels, channel_mult, num_res_blocks, latent_channels and "
                          "in_channels must be >= 1")
    if cfg.rec_loss not in ("l1", "l2"):
        raise ConfigError(f"autoencoder_3d.rec_loss: {cfg.rec_loss!r} not in ('l1', 'l2')")
    for name in ("box_weight", "video_temporal_weight", "kl_weight"):
        if not getattr(cfg, name) >= 0:
            raise ConfigError(f"autoencoder_3d.{name}: {getattr(cfg, name)} must be >= 0")
    if cfg.decode_chunk_frames < 1 or not 0 <= cfg.decode_chunk_overlap < cfg.decode_chunk_frames:
        raise ConfigError("autoencoder_3d.decode_chunk_overlap: need 0 <= overlap < decode_chunk_frames (got "
                          f"{cfg.decode_chunk_overlap}, {cfg.decode_chunk_frames})")


def check_clip_length(frames: torch.Tensor, frames_per_latent: int, name: str = "frames") -> None:
    """Raises DataError unless frames (b, t, ...) has t a positive multiple of `frames_per_latent`."""
    t = frames.shape[1]
    if t < 1 or t % frames_per_latent:
        raise DataError(f"{name}: {t} frames; the 3D autoencoder takes a positive multiple of {frames_per_latent} "
                        f"(one latent frame per {frames_per_latent}), got shape {tuple(frames.shape)}")


@register_model("video_autoencoder_3d", Autoencoder3DConfig)
class VideoAutoencoder3D(AutoencoderKL):
    """LVDM's 3D autoencoder with the KL-f8 autoencoder's training loss (see the module docstring).

    Args:
        config: `Autoencoder3DConfig` (`preset.autoencoder_3d`).

    Attributes:
        config: the config; `config.scale_factor` is the latent scale (set by `set_scale_factor`).
        frames_per_latent: video frames per latent frame (4 for (4, 8, 8) compression).
        global_step: int64 buffer counting training `loss()` calls (decides when the discriminator switches on).
    """

    has_video_decoder: ClassVar[bool] = True  # decodes a clip jointly: the temporal-difference loss applies

    def __init__(self, config: Autoencoder3DConfig) -> None:
        torch.nn.Module.__init__(self)  # not AutoencoderKL.__init__: other networks, other config checks
        check_config_3d(config)
        self.config = config
        self.encoder = Encoder3D(config)
        self.decoder = Decoder3D(config)
        self._init_training_parts(VideoDiscriminator3D)

    @property
    def frames_per_latent(self) -> int:
        return self.config.frames_per_latent

    # ---------------------------------------------------------------------------------------------- encode
    def encode(self, frames: torch.Tensor) -> DiagonalGaussian:
        """Posterior over raw latents.

        Args:
            frames: (b, t, 3, H, W) float in [-1, 1]; t a positive multiple of frames_per_latent (4), H, W
                multiples of 8.

        Returns:
            DiagonalGaussian with mean/logvar (b, t / 4, latent_channels, H/8, W/8); latent frame j stands for
            video frames 4j .. 4j+3.

        Raises:
            DataError: see `check_frames`; t not a positive multiple of 4 (`check_clip_length`).
        """
        check_frames(frames, self.config.in_channels)
        check_clip_length(frames, self.frames_per_latent)
        moments = self.encoder(rearrange(frames, "b t c h w -> b c t h w"))
        mean, logvar = moments.chunk(2, dim=1)
        return DiagonalGaussian(mean, logvar).map(lambda x: rearrange(x, "b c t h w -> b t c h w"))

    # ---------------------------------------------------------------------------------------------- decode
    # `decode(latents, num_frames)` and `decode_scaled` are AutoencoderKL's: (b, t, 4, h, w) raw latents ->
    # (b, 4t, 3, 8h, 8w) frames, in overlapping chunks of `num_frames` LATENT frames (default
    # config.decode_chunk_frames) cross-faded over config.decode_chunk_overlap latent frames.
    def _decode_frames(self, latents: torch.Tensor, image_only: torch.Tensor | None = None) -> torch.Tensor:
        """(b, t, latent_channels, h, w) raw latents -> (b, t * frames_per_latent, 3, 8h, 8w), in one go."""
        if image_only is not None:
            raise ValueError("image_only: the 3D autoencoder decodes clips only (no image mode)")
        rec = self.decoder(rearrange(latents, "b t c h w -> b c t h w"))
        return rearrange(rec, "b c t h w -> b t c h w")

    # ---------------------------------------------------------------------------------------------- identity
    def encoder_fingerprint(self) -> tuple[dict[str, Any], str]:
        """As `AutoencoderKL.encoder_fingerprint`, with the temporal compression in the config fields."""
        fields, digest = super().encoder_fingerprint()
        fields |= {"model_class": self.model_class_name, "temporal_downsample": list(self.config.temporal_downsample),
                   "frames_per_latent": self.frames_per_latent}
        return fields, digest

    # ---------------------------------------------------------------------------------------------- training
    def _disc_input(self, frames: torch.Tensor) -> torch.Tensor:
        return rearrange(frames, "b t c h w -> b c t h w")
