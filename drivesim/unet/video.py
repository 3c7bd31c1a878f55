"""Video U-Net: a `SpatialUNet` with temporal layers inserted after its spatial layers (Video LDM, SPEC section 1).

What is inserted (through `SpatialUNet.insert_temporal_layers`, so spatial parameter names never change):
- after every ResBlock (`kind == "res"`): a `TemporalConvBlock` (3D conv residual block, kernel (3, 1, 1)) merged
  with an `AlphaBlender` (`TemporalConfig.conv3d`);
- after every attention group (`kind == "box_attn"`, the last layer of the spatial-attention + gated-box-attention
  pair): a `TemporalAttention` over frames (sinusoidal frame positions, or learned relative biases with
  `relative_positions`; band-masked to `max_attention_distance` frames, which only bites when the U-Net runs
  over more frames than that, i.e. convolutionally in time) merged with an `AlphaBlender`
  (`TemporalConfig.attention`);
- with `context_input=True`, after the input convolution (`kind == "conv_in"`): `ContextMaskInput`, LVDM's
  binary-mask input channel (see below). It is not a temporal layer but rides the same extension point.

The merge is `alpha * spatial + (1 - alpha) * temporal`, alpha = sigmoid(mix factor) (`drivesim.nn.temporal`);
samples flagged `cond.image_only` get alpha = 1 under `learned_with_images`. With every blender forced to 1
(`drivesim.nn.temporal.force_alpha_one`) and no context, the forward pass is the image model's, op for op, so
the output equals the image U-Net's bit for bit (a test checks it).

Context frames (LVDM, He et al. 2022, eq. 8; the design drivesim uses for prediction and interpolation):
- `cond.context_mask` (b, t) marks context frames and `cond.context_latents` (b, t, c, h, w) holds them, already
  perturbed by the model to diffusion level `cond.context_noise_level` (b,) (conditional latent perturbation).
  `forward` writes them into the input, `z_t <- z_t * (1 - m) + z_s * m`, and gives the context frames the time
  embedding of s while the other frames get t (per-frame timesteps, `SpatialUNet.embed` takes (b, t)).
- The mask enters as one extra input channel. Concatenating m to the input of the first 3x3 convolution equals,
  by linearity, `conv_in(z) + conv_m(m)`; `ContextMaskInput` is that `conv_m` (1 -> model_channels, no bias),
  zero-initialised, so the image convolution and its weights stay untouched (frozen, same checkpoint keys) and a
  fresh model is exactly the image model.
- A mask of all zeros (S = 0) is the unconditional model: nothing of `context_latents` reaches the network.

Stage label (interpolation, `num_stages > 0`): a learned embedding of `cond.interpolation_stage` (b,),
zero-initialised, added to the timestep + label embedding of every frame (`StageConditionedUNet`).

Freezing: `from_image_unet` / `VideoUNet(..)` freeze every parameter the image U-Net has unless
`TemporalConfig.train_spatial`; new parameters (temporal layers, blenders, mask conv, stage embedding) train.
"""

from __future__ import annotations

import torch
from einops import rearrange, repeat
from torch import nn

from drivesim.configs import TemporalConfig, UNetConfig
from drivesim.errors import ConfigError
from drivesim.nn.temporal import MERGE_STRATEGIES, AlphaBlender, TemporalAttention, TemporalConvBlock
from drivesim.types import Conditioning
from drivesim.unet.spatial import LayerSpec, SpatialUNet, UNetContext

__all__ = ["ContextMaskInput", "StageConditionedUNet", "TemporalMixer", "VideoUNet", "check_temporal_config"]


def check_temporal_config(config: TemporalConfig, source: str = "config") -> None:
    """Raise `ConfigError` (naming `source` and the field) for an unusable temporal config."""
    if config.merge_strategy not in MERGE_STRATEGIES:
        raise ConfigError(f"{source}: temporal.merge_strategy: {config.merge_strategy!r} not in {MERGE_STRATEGIES}")
    if config.merge_strategy == "fixed":
        if not 0.0 <= config.alpha_init <= 1.0:
            raise ConfigError(f"{source}: temporal.alpha_init: fixed alpha must be in [0, 1], got {config.alpha_init}")
    elif not 0.0 < config.alpha_init < 1.0:
        raise ConfigError(f"{source}: temporal.alpha_init: learned alpha must be in (0, 1) (sigmoid never reaches "
                          f"0 or 1), got {config.alpha_init}")
    if config.max_attention_distance < 1:
        raise ConfigError(f"{source}: temporal.max_attention_distance: must be >= 1, got "
                          f"{config.max_attention_distance}")
    if not (config.attention or config.conv3d):
        raise ConfigError(f"{source}: temporal: attention and conv3d are both off (no temporal layers)")


class TemporalMixer(nn.Module):
    """One temporal layer and its alpha merge, called after a spatial layer as `mixer(h, emb, ctx)`.

    Args:
        layer: `TemporalConvBlock` or `TemporalAttention` (`layer(h, num_frames)`, `(b t) c h w` in and out).
        blender: the `AlphaBlender` merging the spatial input with the layer's output.
    """

    def __init__(self, layer: nn.Module, blender: AlphaBlender):
        super().__init__()
        self.layer = layer
        self.blender = blender

    def forward(self, h: torch.Tensor, emb: torch.Tensor, ctx: UNetContext) -> torch.Tensor:
        """h: ((b t), c, h, w) -> same; `ctx.cond.image_only` (b,) forces alpha = 1 per sample."""
        if self.blender.force_one:  # alpha exactly 1: the temporal path cannot matter, skip its compute
            return h
        return self.blender(h, self.layer(h, ctx.num_frames), ctx.cond.image_only)


class ContextMaskInput(nn.Module):
    """LVDM's binary-mask input channel, as a zero-initialised 3x3 conv added to the input conv's output.

    `conv_in([z, m]) = conv_in(z) + conv_m(m)` (the first conv is linear in its input channels), so this is
    exactly "concatenate the mask as an extra input channel" with the image conv's weights left as they are.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(1, channels, 3, padding=1, bias=False)
        nn.init.zeros_(self.conv.weight)

    def forward(self, h: torch.Tensor, emb: torch.Tensor, ctx: UNetContext) -> torch.Tensor:
        """h: ((b t), c, h, w) output of the input conv; reads `ctx.cond.context_mask` (b, t) bool or None."""
        mask = ctx.cond.context_mask
        if mask is None:
            return h
        m = rearrange(mask.to(h.dtype), "b t -> (b t) 1 1 1").expand(-1, 1, *h.shape[-2:])
        return h + self.conv(m)


class StageConditionedUNet(SpatialUNet):
    """`SpatialUNet` whose embedding also carries a learned stage label (interpolation: which x4 stage it serves).

    The embedding table is zero-initialised, so a fresh model is the image model; `cond.interpolation_stage` None adds
    nothing. Parameter names of the spatial U-Net are unchanged; the table is `stage_embedding.weight`.
    """

    def __init__(self, config: UNetConfig, num_stages: int):
        super().__init__(config)
        self.stage_embedding = nn.Embedding(num_stages, self.emb_dim)
        nn.init.zeros_(self.stage_embedding.weight)

    def embed(self, timesteps: torch.Tensor, cond: Conditioning, num_frames: int) -> torch.Tensor:
        """As `SpatialUNet.embed`, plus the embedding of `cond.interpolation_stage` (b,) int64 on every frame."""
        emb = super().embed(timesteps, cond, num_frames)
        if cond.interpolation_stage is None:
            return emb
        return emb + repeat(self.stage_embedding(cond.interpolation_stage.long()), "b e -> (b t) e", t=num_frames)


class VideoUNet(nn.Module):
    """Spatial U-Net + temporal layers (+ optional LVDM context input and stage label); see the module docstring.

    Args:
        unet_config: the spatial U-Net's config (that of the image LDM whose weights it takes).
        temporal_config: which temporal layers, merge strategy, attention distance, `train_spatial`.
        context_input: add the context-frame machinery (mask channel, context replacement, per-frame time).
        num_stages: > 0 adds a stage-label embedding with that many stages (interpolation: 2).
        spatial: optional pre-built `SpatialUNet` (subclass) to use instead of building one from `unet_config`
            (the upsampler's adds a noise-level embedding); `new_prefixes` names its parameters that the image
            U-Net lacks (always trainable).

    Attributes:
        spatial: the `SpatialUNet` (with the temporal layers inside its blocks' `temporal` dicts).

    Raises:
        ConfigError: bad temporal config (field named).
    """

    def __init__(self, unet_config: UNetConfig, temporal_config: TemporalConfig, context_input: bool = False,
                 num_stages: int = 0, spatial: SpatialUNet | None = None, new_prefixes: tuple[str, ...] = ()):
        super().__init__()
        check_temporal_config(temporal_config)
        self.unet_config = unet_config
        self.temporal_config = temporal_config
        self.context_input = context_input
        self.num_stages = num_stages
        if spatial is None:  # `spatial`: a SpatialUNet subclass instance with extra embeddings (the upsampler's)
            spatial = StageConditionedUNet(unet_config, num_stages) if num_stages else SpatialUNet(unet_config)
        self.spatial = spatial
        # names the image U-Net also has: frozen unless train_spatial (the stage table is new, hence trainable;
        # so are parameters under `new_prefixes` of a given `spatial`)
        new = ("stage_embedding.", *new_prefixes)
        self.spatial_parameter_names = frozenset(
            f"spatial.{n}" for n, _ in self.spatial.named_parameters() if not n.startswith(new))
        self.num_temporal_layers = self.spatial.insert_temporal_layers(self._make_layer)
        self.set_train_spatial(temporal_config.train_spatial)

    def _make_layer(self, spec: LayerSpec) -> nn.Module | None:
        cfg, ucfg = self.temporal_config, self.unet_config
        if spec.kind == "conv_in":
            return ContextMaskInput(spec.channels) if self.context_input else None
        if spec.kind == "res" and cfg.conv3d:
            layer = TemporalConvBlock(spec.channels, dropout=ucfg.dropout)
        elif spec.kind == "box_attn" and cfg.attention:
            layer = TemporalAttention(spec.channels, ucfg.num_head_channels, max_distance=cfg.max_attention_distance,
                                      relative_positions=cfg.relative_positions)
        else:
            return None
        return TemporalMixer(layer, AlphaBlender(cfg.merge_strategy, cfg.alpha_init))

    # -- weights ---------------------------------------------------------------------------------------------
    @classmethod
    def from_image_unet(cls, unet: SpatialUNet, temporal_config: TemporalConfig, context_input: bool = False,
                        num_stages: int = 0) -> VideoUNet:
        """A video U-Net holding a copy of `unet`'s trained weights (spatial layers frozen unless
        `temporal_config.train_spatial`), on `unet`'s device and dtype. `unet` itself is not modified.

        Raises:
            RuntimeError: the image state does not fit (a programming error: it has keys the video U-Net lacks).
        """
        ref = next(unet.parameters())
        video = cls(unet.config, temporal_config, context_input, num_stages).to(device=ref.device, dtype=ref.dtype)
        video.load_spatial_state(unet.state_dict())
        return video

    def load_spatial_state(self, state: dict[str, torch.Tensor]) -> None:
        """Copy an image U-Net's `state_dict` (keys as `SpatialUNet`'s) into the spatial layers.

        Raises:
            RuntimeError: `state` has keys the spatial U-Net lacks, or lacks some of its parameters.
        """
        result = self.spatial.load_state_dict(state, strict=False)
        missing = [k for k in result.missing_keys if f"spatial.{k}" in self.spatial_parameter_names]
        if missing or result.unexpected_keys:
            raise RuntimeError(f"image U-Net state does not fit: missing {missing[:3]}, unexpected "
                               f"{result.unexpected_keys[:3]}")

    def set_train_spatial(self, train: bool) -> None:
        """Freeze (False) or unfreeze (True) the image U-Net's parameters; new parameters always train."""
        for name, p in self.named_parameters():
            p.requires_grad_(train or name not in self.spatial_parameter_names)

    def temporal_parameters(self) -> list[nn.Parameter]:
        """Parameters the image U-Net does not have (temporal layers, blenders, mask conv, stage table)."""
        return [p for n, p in self.named_parameters() if n not in self.spatial_parameter_names]

    # -- forward ---------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """Network output (epsilon or v; the network does not know which) for noisy video latents.

        Args:
            x: (b, t, c, h, w) noisy latents at level `timesteps`.
            timesteps: (b,) or (b, t) int64 diffusion timesteps.
            cond: `Conditioning` for b videos of t frames. Used here: boxes/labels (every frame), `image_only`
                (b,) bool, and with `context_input`: `context_mask` (b, t) bool, `context_latents`
                (b, t, c, h, w) already perturbed to `context_noise_level` (b,) int64 (None: level 0, clean),
                `interpolation_stage` (b,) int64 with `num_stages`.
        Returns:
            (b, t, out_channels, h, w), dtype of `x`.
        Raises:
            ValueError: context given without `context_input`, or context tensors of the wrong shape.
        """
        if cond.context_mask is not None:
            if not self.context_input:
                raise ValueError("cond.context_mask given to a VideoUNet built without context_input")
            x, timesteps = self._write_context(x, timesteps, cond)
        return self.spatial(x, timesteps, cond)

    @staticmethod
    def _write_context(x: torch.Tensor, timesteps: torch.Tensor,
                       cond: Conditioning) -> tuple[torch.Tensor, torch.Tensor]:
        b, t = x.shape[:2]
        mask = cond.context_mask.bool()
        if mask.shape != (b, t):
            raise ValueError(f"cond.context_mask has shape {tuple(mask.shape)}, latents have (b, t) = {(b, t)}")
        if cond.context_latents is None:
            # S = 0 (the unconditional model): nothing to write. Checking the mask reads it back from the device, so
            # only the CPU path checks (no host sync per U-Net call on an accelerator)
            if mask.device.type == "cpu" and bool(mask.any()):
                raise ValueError("cond.context_latents is None but cond.context_mask marks context frames")
            return x, timesteps
        if cond.context_latents.shape != x.shape:
            raise ValueError(f"cond.context_latents has shape {tuple(cond.context_latents.shape)}, expected "
                             f"{tuple(x.shape)}")
        x = torch.where(rearrange(mask, "b t -> b t 1 1 1"), cond.context_latents.to(x.dtype), x)
        level = cond.context_noise_level
        if level is None:
            level = torch.zeros(b, dtype=torch.int64, device=x.device)
        if timesteps.ndim == 1:
            timesteps = repeat(timesteps, "b -> b t", t=t)
        timesteps = torch.where(mask, rearrange(level.to(timesteps), "b -> b 1"), timesteps)
        return x, timesteps
