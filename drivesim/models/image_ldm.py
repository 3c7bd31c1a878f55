"""Box- and label-conditioned image LDM (SPEC section 1, step 1): `SpatialUNet` + `Denoiser`.

Trained on single frames of the latent cache: a batch of clips `(b, t, 4, h, w)` is folded into `b t`
independent images, each with its own diffusion timestep, its own boxes and its clip's labels. For
classifier-free guidance the day/night label, the crowdedness label and the whole box set of each image are
replaced by their learned nulls independently with the config's probabilities (p = 0.1, SPEC 2°).
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from drivesim.configs import ImageLDMConfig
from drivesim.diffusion import Denoiser, Guidance, drop_conditions
from drivesim.diffusion import sample as run_sampler
from drivesim.errors import DataError
from drivesim.registry import register_model
from drivesim.types import Conditioning
from drivesim.unet import SpatialUNet

BATCH_KEYS = ("latents", "boxes", "classes", "box_mask", "night", "crowdedness")


@register_model("image_ldm", ImageLDMConfig)
class ImageLDM(nn.Module):
    """Image LDM on scaled latents (the autoencoder's `scale_factor` is applied by the latent cache).

    Attributes:
        unet: the `SpatialUNet` (the only parameters; checkpoint keys start with `unet.`).
        denoiser: `Denoiser` around `unet` (parameterisation and loss; not a submodule).
    """

    def __init__(self, config: ImageLDMConfig):
        super().__init__()
        self.config = config
        self.unet = SpatialUNet(config.unet)
        self.denoiser = Denoiser(self.unet, config.diffusion)

    @staticmethod
    def images_from_batch(batch: dict) -> tuple[torch.Tensor, Conditioning]:
        """Fold a batch of clips into single-frame samples.

        Args:
            batch: "latents" (b, t, c, h, w) float scaled latents, "boxes" (b, t, n, 4), "classes" (b, t, n),
                "box_mask" (b, t, n), "night" (b,), "crowdedness" (b,).
        Returns:
            latents (b t, 1, c, h, w) and the matching `Conditioning` (one frame per sample).
        Raises:
            DataError: a key is missing or latents are not 5-D (message names the field).
        """
        if "latents" not in batch:
            raise DataError(f"batch: latents: missing (image_ldm needs {', '.join(BATCH_KEYS)})")
        latents = batch["latents"]
        if latents.ndim != 5:
            raise DataError(f"batch: latents: expected (b, t, c, h, w), got shape {tuple(latents.shape)}")
        x0 = rearrange(latents.float(), "b t c h w -> (b t) 1 c h w")
        return x0, Conditioning.from_batch(batch).frames_as_images()

    def drop_for_guidance(self, cond: Conditioning, generator: torch.Generator | None = None) -> Conditioning:
        """Drop each sample's day/night, crowdedness and box set for classifier-free guidance (`drop_conditions`)."""
        return drop_conditions(cond, self.config.unet, generator)

    def loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        """Diffusion loss (MSE on epsilon or v) of a batch from `LatentClipDataset` (see `images_from_batch`).

        Returns:
            (scalar loss, logs) with logs {"boxes_dropped": fraction of images whose box set was dropped}.
        """
        x0, cond = self.images_from_batch(batch)
        if x0.shape[2] != self.config.unet.in_channels:
            raise DataError(f"batch: latents: {x0.shape[2]} channels, model expects {self.config.unet.in_channels}")
        cond = self.drop_for_guidance(cond)
        loss = self.denoiser.loss(x0, cond)
        return loss, {"boxes_dropped": float(cond.drop_boxes.float().mean())}

    @torch.no_grad()
    def sample(self, cond: Conditioning, latent_size: tuple[int, int], steps: int | None = None,
               sampler: str | None = None, guidance_scale: float | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Generate scaled latents for every frame of `cond` (frames are independent images).

        Args:
            cond: `Conditioning` for b videos of t frames (boxes (b, t, n, 4) normalised xyxy, image frame).
            latent_size: (h, w) of the latents (pixels / 8).
            steps, sampler, guidance_scale: default to the config's `diffusion` block.
            generator: CPU generator for the initial noise.
        Returns:
            (b, t, out_channels, h, w) float32 scaled latents on the model's device (divide by the autoencoder's
            `scale_factor` before decoding).
        """
        d = self.config.diffusion
        device = next(self.parameters()).device
        shape = (cond.batch_size, cond.num_frames, self.config.unet.out_channels, *latent_size)
        return run_sampler(self.denoiser, shape, cond.to(device), sampler=sampler or d.sampler,
                           steps=steps or d.num_inference_steps,
                           guidance=Guidance.from_config(d, scale=guidance_scale), generator=generator,
                           device=device)
