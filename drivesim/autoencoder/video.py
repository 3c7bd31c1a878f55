"""The video autoencoder (SPEC section 1, step 4): the image autoencoder's frozen encoder and its decoder with
temporal layers, fine-tuned on clips against a 3D-conv patch discriminator (Blattmann et al. 2023, Sec. 3.3 / 4.1
"temporal decoder fine-tuning"; sgm `VideoDecoder`)."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
from einops import rearrange

from drivesim.autoencoder.model import AutoencoderKL
from drivesim.autoencoder.networks import DiagonalGaussian
from drivesim.configs import AutoencoderConfig
from drivesim.errors import CheckpointError, ConfigError
from drivesim.registry import register_model

__all__ = ["VideoAutoencoder"]


@register_model("video_autoencoder", AutoencoderConfig)
class VideoAutoencoder(AutoencoderKL):
    """KL-f8 autoencoder whose decoder has temporal layers (Video LDM decoder fine-tuning, SPEC step 4).

    The encoder is frozen (`requires_grad=False`) so latents stay those the diffusion models were trained on;
    the decoder's spatial layers are frozen unless `config.video_train_spatial`; the temporal layers train.
    The loss is rec + [video_temporal_weight * temporal difference] + d_weight * g_adv + d_hinge against
    `VideoDiscriminator3D` (no KL: the encoder is frozen), on the posterior mean or a posterior sample of the frozen
    encoder (`config.video_latents`; mean by default, what the latent cache stores).
    With every alpha = 1 (`drivesim.nn.temporal.force_alpha_one(model)`) the decoder IS the image decoder,
    bit for bit.
    """

    has_video_decoder: ClassVar[bool] = True

    def __init__(self, config: AutoencoderConfig) -> None:
        if not config.video_decoder:
            raise ConfigError("autoencoder.video_decoder: the video_autoencoder model class needs true")
        super().__init__(config)
        self.encoder.requires_grad_(False)
        if not config.video_train_spatial:
            for p in self.decoder.spatial_parameters():
                p.requires_grad_(False)

    def train(self, mode: bool = True) -> VideoAutoencoder:
        super().train(mode)
        self.encoder.eval()  # frozen: dropout off, so latents are those of the image autoencoder
        return self

    @classmethod
    def from_image(cls, image_ae: AutoencoderKL, **overrides: Any) -> VideoAutoencoder:
        """Build the video autoencoder from a trained image autoencoder (load a checkpoint with
        `drivesim.load(path)` first; the model layer never reads checkpoint files).

        Encoder and decoder weights (and scale_factor) are copied; the temporal layers start as identity (zero
        init) and the video discriminator is new. `overrides` replace AutoencoderConfig fields (e.g.
        `temporal_merge`, `video_train_spatial`, `disc_start`).

        Raises:
            CheckpointError: `image_ae` is not an image autoencoder, or its latent channels disagree with an
                explicit `latent_channels` override.
        """
        source = "image autoencoder"
        if not isinstance(image_ae, AutoencoderKL) or isinstance(image_ae, VideoAutoencoder):
            raise CheckpointError(f"{source}: model_class: already a video autoencoder")
        want = overrides.get("latent_channels", image_ae.config.latent_channels)
        if want != image_ae.config.latent_channels:
            raise CheckpointError(f"{source}: config.latent_channels: {image_ae.config.latent_channels}, the video "
                                  f"decoder wants {want}")
        cfg = dataclasses.replace(image_ae.config, video_decoder=True, **overrides)
        video = cls(cfg)
        state = {k: v for k, v in image_ae.state_dict().items()
                 if k.startswith(("encoder.", "decoder."))}
        missing, unexpected = video.load_state_dict(state, strict=False)
        bad = [k for k in missing if not (k.startswith("discriminator.") or "temporal" in k or k == "global_step")]
        if bad or unexpected:
            raise CheckpointError(f"{source}: {(bad or unexpected)[0]}: does not fit the video autoencoder")
        return video

    def attach_to(self, image_ae: AutoencoderKL, source: str = "video decoder") -> VideoAutoencoder:
        """Check that this video decoder decodes the latents of `image_ae` (same latent channels, same encoder
        weights, same scale factor) and return self.

        Raises:
            CheckpointError: latent channels, encoder weights or scale factor disagree (latents from `image_ae`
                would be decoded wrongly).
        """
        if self.config.latent_channels != image_ae.config.latent_channels:
            raise CheckpointError(f"{source}: config.latent_channels: {self.config.latent_channels}, the encoder "
                                  f"gives {image_ae.config.latent_channels}")
        mine, theirs = self.encoder.state_dict(), image_ae.encoder.state_dict()
        for k, v in theirs.items():
            if k not in mine or mine[k].shape != v.shape or not torch.equal(mine[k].cpu(), v.cpu()):
                raise CheckpointError(f"{source}: encoder.{k}: differs from the image autoencoder's encoder "
                                      "(fine-tuned from another autoencoder)")
        if self.config.scale_factor != image_ae.config.scale_factor:
            raise CheckpointError(f"{source}: config.scale_factor: {self.config.scale_factor}, the image "
                                  f"autoencoder has {image_ae.config.scale_factor}")
        return self

    def _reconstruct_for_loss(self, x: torch.Tensor) -> tuple[torch.Tensor, DiagonalGaussian | None]:
        """Decode the frozen encoder's posterior mean or sample (`config.video_latents`)."""
        with torch.no_grad():
            z = self.encode(x).latents(sample=self.config.video_latents == "sample")
        return self._decode_frames(z), None

    def _disc_input(self, frames: torch.Tensor) -> torch.Tensor:
        return rearrange(frames, "b t c h w -> b c t h w")
