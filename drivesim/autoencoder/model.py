"""KL-f8 image autoencoder (SPEC section 1, step 1): the model, its training loss and its latent scale factor.

- `AutoencoderKL` ("autoencoder_kl"): the LDM "KL-f8" design (Rombach et al. 2022, `ldm/models/autoencoder.py`,
  `ldm/modules/diffusionmodules/model.py`): ResNet blocks, a mid block with self-attention, channel multipliers
  from the config, 3 downsamplings, 4 latent channels, a diagonal Gaussian posterior. It owns the latent
  `scale_factor` (1 / std of latents, computed from data by `compute_scale_factor`).
- `VideoAutoencoder` ("video_autoencoder"): same encoder (frozen) and a `VideoDecoder` = the image decoder with
  a `TemporalConvBlock` + `AlphaBlender` after each of its ResNet blocks (Blattmann et al. 2023, Sec. 3.3 / 4.1
  "temporal decoder fine-tuning"; sgm `VideoDecoder`), trained against a 3D-conv patch video discriminator.
- `VideoAutoencoder3D` ("video_autoencoder_3d", `drivesim.autoencoder.autoencoder_3d`): LVDM's 3D autoencoder
  (He et al. 2022, Sec. 3.1), a subclass that reuses this loss, GAN arrangement, scale factor and chunked decoding.

All supply `loss(batch) -> (loss, logs)` for the shared training loop and `param_groups(train_cfg)`; the GAN is
arranged so that ONE optimizer step over all parameters is the LDM two-optimizer recipe (see `loss`).

Layouts: frames `(b, t, 3, H, W)` float in [-1, 1]; latents `(b, t / frames_per_latent, 4, H/8, W/8)`
(frames_per_latent 1 here, 4 for the 3D autoencoder; raw = what the encoder gives; scaled = raw * scale_factor, what
the diffusion models see).
"""


from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from typing import Any, ClassVar

import torch
from einops import rearrange
from torch import nn
from torch.func import functional_call

from drivesim.autoencoder.networks import (
    Decoder,
    DiagonalGaussian,
    Encoder,
    VideoDecoder,
    check_config,
    check_frames,
    chunk_windows,
    crossfade_weights,
)
from drivesim.bbox_conditioning.layout import union_coverage
from drivesim.configs import AutoencoderConfig, TrainConfig
from drivesim.discriminators import NLayerDiscriminator, VideoDiscriminator3D, hinge_d_loss
from drivesim.errors import ConfigError, DataError
from drivesim.registry import register_model

__all__ = ["AutoencoderKL", "compute_scale_factor", "encoder_id"]


def encoder_id(config: dict[str, Any], weights_digest: str) -> str:
    """Identity of an encoder: sha256 hex of its canonical config JSON (sorted keys) + its weights digest (what a
    latent cache records and the latent models trained on it carry as `encoder_id`).

    Args:
        config: the autoencoder's config as a plain dict (e.g. the fields of `AutoencoderKL.encoder_fingerprint`).
        weights_digest: a digest of its weights (e.g. the sha256 of model.safetensors).
    """
    import hashlib
    import json

    blob = json.dumps(config, sort_keys=True, separators=(",", ":")) + "\n" + weights_digest
    return hashlib.sha256(blob.encode()).hexdigest()


@register_model("autoencoder_kl", AutoencoderConfig)
class AutoencoderKL(nn.Module):
    """KL-f8 image autoencoder with its training loss (LDM `AutoencoderKL` + `LPIPSWithDiscriminator`).

    Args:
        config: `AutoencoderConfig` with `video_decoder=False` (use `VideoAutoencoder` for the video decoder).

    Attributes:
        config: the config; `config.scale_factor` is the latent scale (set by `set_scale_factor`).
        global_step: int64 buffer counting `loss()` calls in training mode (micro-batches, so gradient
            accumulation counts each); decides when the discriminator switches on, and is checkpointed.

    LPIPS: `config.lpips_weights` may name a LOCAL weights file (`drivesim.autoencoder.lpips`); no LPIPS weights
    can be downloaded here, so every preset runs without it (pure L1/L2 + KL + GAN).
    """

    # True when the decoder decodes the frames of a clip jointly (`VideoAutoencoder`, `VideoAutoencoder3D`): the
    # temporal-difference loss applies
    has_video_decoder: ClassVar[bool] = False
    # video frames one latent frame stands for (4 for `VideoAutoencoder3D`)
    frames_per_latent: int = 1

    def __init__(self, config: AutoencoderConfig) -> None:
        super().__init__()
        check_config(config)
        if config.video_decoder and not self.has_video_decoder:
            raise ConfigError("autoencoder.video_decoder: true needs the video_autoencoder model class "
                              "(VideoAutoencoder.from_image)")
        self.config = config
        self.encoder = Encoder(config)
        self.decoder: Decoder = VideoDecoder(config) if config.video_decoder else Decoder(config)
        self._init_training_parts(VideoDiscriminator3D if config.video_decoder else NLayerDiscriminator)

    def _init_training_parts(self, disc_cls: type[nn.Module]) -> None:
        """The discriminator, the `global_step` buffer and LPIPS, after `config`, `encoder` and `decoder` are set."""
        config = self.config
        self.discriminator = disc_cls(config.in_channels, config.disc_channels, config.disc_layers)
        if config.decoder_only:
            self.encoder.requires_grad_(False)
        self.register_buffer("global_step", torch.zeros((), dtype=torch.int64))
        self._lpips: list[nn.Module] = []  # a list, not a submodule: frozen, never checkpointed with the AE
        if config.lpips_weights:
            from drivesim.autoencoder.lpips import LPIPS

            self._lpips.append(LPIPS(config.lpips_weights).eval())

    # ---------------------------------------------------------------------------------------------- encode
    def encode(self, frames: torch.Tensor) -> DiagonalGaussian:
        """Posterior over raw latents.

        Args:
            frames: (b, t, 3, H, W) float in [-1, 1]; H, W multiples of 8.

        Returns:
            DiagonalGaussian with mean/logvar (b, t, latent_channels, H/8, W/8).

        Raises:
            DataError: see `check_frames`.
        """
        check_frames(frames, self.config.in_channels)
        t = frames.shape[1]
        moments = self.encoder(rearrange(frames, "b t c h w -> (b t) c h w"))
        mean, logvar = moments.chunk(2, dim=1)
        return DiagonalGaussian(mean, logvar).map(lambda x: rearrange(x, "(b t) c h w -> b t c h w", t=t))

    def encode_scaled(self, frames: torch.Tensor, sample: bool = True,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        """Scaled latents `z * scale_factor` (what the diffusion models see), (b, t, c, H/8, W/8).

        sample=True draws from the posterior (LDM trains its diffusion model on samples); False gives the mean.
        """
        return self.encode(frames).latents(sample, generator) * self.config.scale_factor

    # ---------------------------------------------------------------------------------------------- decode
    def _check_latents(self, latents: torch.Tensor) -> None:
        if latents.ndim != 5 or latents.shape[2] != self.config.latent_channels:
            raise DataError(f"latents: expected (b, t, {self.config.latent_channels}, h, w), got shape "
                            f"{tuple(latents.shape)}")

    def decode(self, latents: torch.Tensor, num_frames: int | None = None,
               image_only: torch.Tensor | None = None) -> torch.Tensor:
        """Decode raw latents to frames, in overlapping chunks of frames so memory stays bounded.

        Args:
            latents: (b, t, latent_channels, h, w) RAW latents (divide scaled latents by scale_factor, or use
                `decode_scaled`).
            num_frames: latent frames decoded jointly per chunk (default `config.decode_chunk_frames`; the temporal
                layers see this many frames). Chunks overlap by `config.decode_chunk_overlap` latent frames and are
                linearly cross-faded there (over the video frames those latents decode to), so chunk seams do not
                jump. Pass t (or more) to decode in one go.
            image_only: (b,) bool, True for samples that are single images (video decoder: alpha = 1).

        Returns:
            (b, t * frames_per_latent, 3, 8h, 8w) frames, nominally in [-1, 1] (not clipped).

        Peak memory is that of decoding `b * num_frames` frames plus the output when called under
        `torch.no_grad()` (with autograd on, every chunk's graph is kept; training calls the decoder directly).
        """
        self._check_latents(latents)
        b, t = latents.shape[:2]
        chunk = num_frames or self.config.decode_chunk_frames
        overlap = min(self.config.decode_chunk_overlap, chunk - 1)
        windows = chunk_windows(t, chunk, overlap)
        if len(windows) == 1:
            return self._decode_frames(latents, image_only)
        f = self.frames_per_latent  # latent window [s, e) decodes to video frames [f s, f e)
        out = None
        total = torch.zeros(t * f, dtype=torch.float64)
        for i, (s, e) in enumerate(windows):
            rec = self._decode_frames(latents[:, s:e], image_only)
            w = crossfade_weights(f * s, f * e, i == 0, i == len(windows) - 1,
                                   f * windows[i - 1][1] if i > 0 else f * s,
                                   f * windows[i + 1][0] if i + 1 < len(windows) else f * e)
            if out is None:
                out = rec.new_zeros((b, t * f) + rec.shape[2:])
            # frames covered by one chunk only get weight exactly 1: no rounding away from the unchunked result
            out[:, f * s:f * e] += rec * rearrange(w.to(rec.dtype), "t -> 1 t 1 1 1").to(rec.device)
            total[f * s:f * e] += w
        return out / rearrange(total.to(out.dtype), "t -> 1 t 1 1 1").to(out.device)

    def decode_scaled(self, latents: torch.Tensor, num_frames: int | None = None,
                      image_only: torch.Tensor | None = None) -> torch.Tensor:
        """`decode(latents / scale_factor)` for scaled latents from the diffusion models."""
        return self.decode(latents / self.config.scale_factor, num_frames, image_only)

    def _decode_frames(self, latents: torch.Tensor, image_only: torch.Tensor | None = None) -> torch.Tensor:
        t = latents.shape[1]
        rec = self.decoder(rearrange(latents, "b t c h w -> (b t) c h w"), num_frames=t, image_only=image_only)
        return rearrange(rec, "(b t) c h w -> b t c h w", t=t)

    def forward(self, frames: torch.Tensor, sample: bool = False) -> torch.Tensor:
        """Reconstruct frames (b, t, 3, H, W) through the posterior mean (or a sample), decoded in one go."""
        return self._decode_frames(self.encode(frames).latents(sample))

    # ---------------------------------------------------------------------------------------------- scale
    def set_scale_factor(self, scale_factor: float) -> None:
        """Store a new latent scale factor in the (frozen) config: `config = replace(config, scale_factor=...)`."""
        if not (math.isfinite(scale_factor) and scale_factor > 0):
            raise ConfigError(f"autoencoder.scale_factor: must be a positive finite number, got {scale_factor}")
        self.config = dataclasses.replace(self.config, scale_factor=float(scale_factor))

    def encoder_fingerprint(self) -> tuple[dict[str, Any], str]:
        """What identifies the latents this autoencoder produces: the encoder-relevant config fields and a sha256
        of the encoder's weights (names, shapes, dtypes, bytes). A video autoencoder fine-tuned from this one
        (frozen encoder) has the same fingerprint. Feed both to `drivesim.datasets.latent_cache.encoder_id`."""
        import hashlib

        cfg = self.config
        fields = {k: getattr(cfg, k) for k in ("in_channels", "latent_channels", "base_channels", "channel_mult",
                                               "num_res_blocks", "scale_factor")}
        fields["channel_mult"] = list(fields["channel_mult"])
        digest = hashlib.sha256()
        for name, tensor in sorted(self.encoder.state_dict().items()):
            t = tensor.detach().cpu().contiguous()
            digest.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
            digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        return fields, digest.hexdigest()

    # ---------------------------------------------------------------------------------------------- training
    find_unused_parameters = True  # the discriminator is unused before disc_start (DDP must allow that)

    def param_groups(self, train_cfg: TrainConfig) -> list[dict[str, Any]]:
        """Optimizer parameter groups: the autoencoder's trainable parameters and the discriminator's, separately.

        Both use `train_cfg.lr`; the discriminator gets LDM's Adam betas (0.5, 0.9) and no weight decay. The
        two groups never share a gradient (see `loss`), so one Adam step over both equals LDM's two optimizers
        stepping once each (up to global gradient clipping, which the shared loop applies over both).
        """
        disc = [p for p in self.discriminator.parameters() if p.requires_grad]
        disc_ids = {id(p) for p in disc}
        gen = [p for p in self.parameters() if p.requires_grad and id(p) not in disc_ids]
        return [
            {"name": "autoencoder", "params": gen, "lr": train_cfg.lr, "betas": tuple(train_cfg.betas),
             "weight_decay": train_cfg.weight_decay},
            {"name": "discriminator", "params": disc, "lr": train_cfg.lr, "betas": (0.5, 0.9), "weight_decay": 0.0},
        ]

    def _reconstruct_for_loss(self, x: torch.Tensor) -> tuple[torch.Tensor, DiagonalGaussian | None]:
        if self.config.decoder_only:  # frozen encoder: decode its means, no KL term (it has no gradient)
            with torch.no_grad():
                mean = self.encode(x).mode()
            return self._decode_frames(mean), None
        post = self.encode(x)
        rec = self._decode_frames(post.sample())
        return rec, post

    def _disc_input(self, frames: torch.Tensor) -> torch.Tensor:
        return rearrange(frames, "b t c h w -> (b t) c h w")

    def _disc_frozen(self, inp: torch.Tensor) -> torch.Tensor:
        """The discriminator with detached parameters: the generator's adversarial gradient flows to the input
        only, never into the discriminator (one backward pass serves both players)."""
        params = {k: v.detach() for k, v in self.discriminator.named_parameters()}
        return functional_call(self.discriminator, params, (inp,))

    def _adaptive_weight(self, nll: torch.Tensor, g_loss: torch.Tensor) -> torch.Tensor:
        """LDM: ||grad_last nll|| / (||grad_last g_loss|| + 1e-4), clamped to [0, 1e4], times disc_weight."""
        last = self.decoder.last_layer_weight()
        nll_grad = torch.autograd.grad(nll, last, retain_graph=True)[0]
        g_grad = torch.autograd.grad(g_loss, last, retain_graph=True)[0]
        weight = torch.norm(nll_grad) / (torch.norm(g_grad) + 1e-4)
        return weight.clamp(0.0, 1e4).detach() * self.config.disc_weight

    def loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        """Autoencoder training loss for one batch (engine protocol `loss(batch) -> (loss, logs)`).

        Args:
            batch: {"frames": (b, t, 3, H, W) float in [-1, 1]}; other keys are ignored.

        Returns:
            (scalar loss, logs of floats). loss = rec + [temporal] + KL + [lpips] + d_weight * g_adv + d_hinge
            where
            - rec: mean |x - x_rec| (l1) or mean squared error (l2) per pixel value;
            - rec_box (`box_weight` > 0 and the batch has "boxes" (b, t, n, 4) normalised xyxy and "box_mask"
              (b, t, n)): box_weight times the same error averaged over box pixels, each pixel weighted by its
              fractional coverage by the union of the frame's boxes (`union_coverage`);
            - temporal (video decoders and the 3D autoencoder, `video_temporal_weight` > 0): the weight times
              the mean |(x_rec[t+1] - x_rec[t]) - (x[t+1] - x[t])| per pixel value (the flicker measure of
              `drivesim.autoencoder.metrics.flicker`, on [-1, 1] pixels), part of the nll the adaptive GAN weight
              balances against;
            - KL (not with `decoder_only`): kl_weight * KL(q(z|x) || N(0, I)) summed over latent elements,
              divided by the number of pixel values 3*H*W (times `frames_per_latent`: the pixels one latent frame
              stands for), so kl_weight keeps its LDM meaning (LDM sums both terms per image);
            - after `disc_start` steps: g_adv = -mean D(x_rec) through the discriminator with DETACHED
              parameters (gradient reaches the autoencoder only) weighted by the LDM adaptive weight, and the
              hinge loss on D(x) and D(x_rec.detach()) (gradient reaches the discriminator only).

        Raises:
            DataError: invalid frames (see `check_frames`).
        """
        x = batch["frames"]
        check_frames(x, self.config.in_channels)
        step = int(self.global_step)
        if self.training:
            self.global_step += 1
        rec, post = self._reconstruct_for_loss(x)
        diff = (x - rec).abs() if self.config.rec_loss == "l1" else (x - rec).pow(2)
        rec_loss = diff.mean()
        nll = rec_loss
        logs: dict[str, float] = {"rec": rec_loss.item()}
        if self.config.box_weight > 0 and "boxes" in batch:
            cover = union_coverage(batch["boxes"], batch["box_mask"], x.shape[-2], x.shape[-1])  # (b, t, H, W)
            cover = cover[:, :, None].to(diff.dtype)
            box_rec = (diff * cover).sum() / (cover.sum() * x.shape[2]).clamp_min(1.0)
            nll = nll + self.config.box_weight * box_rec
            logs["rec_box"] = box_rec.item()
        if self.has_video_decoder and self.config.video_temporal_weight > 0 and x.shape[1] > 1:
            temporal = (rec.diff(dim=1) - x.diff(dim=1)).abs().mean()
            nll = nll + self.config.video_temporal_weight * temporal
            logs["temporal"] = temporal.item()
        if self._lpips:
            lp = self._lpips[0].to(x.device)
            p_loss = lp(rearrange(x, "b t c h w -> (b t) c h w"), rearrange(rec, "b t c h w -> (b t) c h w")).mean()
            nll = nll + self.config.lpips_weight * p_loss
            logs["lpips"] = p_loss.item()
        total = nll
        if post is not None:
            pixels = self.frames_per_latent * x.shape[2] * x.shape[3] * x.shape[4]  # pixel values per latent frame
            kl = post.kl().mean() / pixels
            total = total + self.config.kl_weight * kl
            logs["kl"] = kl.item() * pixels
        if step >= self.config.disc_start:
            logits_fake = self._disc_frozen(self._disc_input(rec))
            g_loss = -logits_fake.mean()
            if self.training and torch.is_grad_enabled():
                d_weight = self._adaptive_weight(nll, g_loss)
            else:
                d_weight = torch.zeros((), device=x.device)
            logits_real = self.discriminator(self._disc_input(x.detach()))
            logits_fake_d = self.discriminator(self._disc_input(rec.detach()))
            d_loss = hinge_d_loss(logits_real, logits_fake_d)
            total = total + d_weight * g_loss + d_loss
            logs.update(g_loss=g_loss.item(), d_loss=d_loss.item(), d_weight=float(d_weight),
                        logits_real=logits_real.mean().item(), logits_fake=logits_fake_d.mean().item())
        logs["loss"] = total.item()
        return total, logs


@torch.no_grad()
def compute_scale_factor(model: AutoencoderKL, frames_iter: Iterable[torch.Tensor],
                         max_batches: int | None = None, sample: bool = True) -> float:
    """1 / std of the encoder's latents over a sample of frames (LDM `scale_by_std`; sgm `scale_factor`).

    Args:
        model: the autoencoder (left unchanged; store the result with `model.set_scale_factor`).
        frames_iter: yields (b, t, 3, H, W) float frames in [-1, 1] (e.g. training clips).
        max_batches: stop after this many batches.
        sample: use posterior samples (LDM) rather than means.

    Returns:
        1 / std over all latent elements (float64 accumulation).

    Raises:
        DataError: no frames, or latents with zero spread.
    """
    n, s1, s2 = 0, 0.0, 0.0
    for i, frames in enumerate(frames_iter):
        if max_batches is not None and i >= max_batches:
            break
        # reduced in float64 on the CPU: float64 does not exist on every accelerator (Apple MPS)
        z = model.encode(frames).latents(sample).float().cpu().double()
        n += z.numel()
        s1 += z.sum().item()
        s2 += z.pow(2).sum().item()
    if n < 2:
        raise DataError("scale factor: no frames to compute the latent std from")
    var = (s2 - s1 * s1 / n) / (n - 1)
    if not var > 0:
        raise DataError("scale factor: latents have zero variance")
    return 1.0 / math.sqrt(var)
