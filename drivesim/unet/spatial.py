"""Spatial U-Net on latents (ADM / LDM style) with timestep, day/night, crowdedness and box conditioning.

Architecture (guided-diffusion `UNetModel`, LDM widths):
- embedding: sinusoidal timestep embedding -> MLP (width 4 * model_channels), plus a learned day/night
  embedding and a learned bucketed-crowdedness embedding, each with a learned null row used when the label is
  dropped (classifier-free guidance).
- encoder levels of `num_res_blocks` x [ResBlock with adaptive group norm (scale-shift from the embedding),
  then, at downsampling factors in `attention_resolutions`, SpatialSelfAttention (SDPA) and GatedSelfAttention
  with the box tokens], separated by stride-2 convolutions; a middle block ResBlock-Attn-BoxAttn-ResBlock;
  a mirrored decoder with skip connections; GroupNorm-SiLU-zero-conv out.
- boxes: `BoxTokenizer` (Fourier xyxy + class embedding -> MLP, learned null token) -> `(b t) m d` tokens,
  one token set per frame (per-frame box tracks condition every frame).

Video layout: `forward` takes `(b, t, c, h, w)` and folds frames into the batch `(b t) c h w`; the image model
treats every frame independently.

Extension point for temporal layers
----------------------------------------------
The U-Net is a list of `UNetBlock`s (`input_blocks`, `middle_block`, `output_blocks`). A block runs its
spatial layers in order, each called as `layer(h, emb, ctx)` with `h` `(b t) c h w`, `emb` `(b t) e` and
`ctx` a `UNetContext` (num_frames, box tokens, the `Conditioning`). Every spatial layer has a `LayerSpec`
(kind, channels, downsampling factor, part). `SpatialUNet.insert_temporal_layers(factory)` calls
`factory(spec)` for every spatial layer and stores a non-None result in the block's `temporal` ModuleDict under
the layer's index; the block then runs it right after that layer, as `temporal(h, emb, ctx)`, and uses its
return value (the temporal module does its own alpha merge). Spatial parameter names never change
(`input_blocks.1.layers.0.conv1.weight`), so an image checkpoint loads into a video U-Net with
`load_state_dict(strict=False)` whose only missing keys are `*.temporal.*`; and with no temporal layers (or
temporal layers that return `h` itself when alpha = 1) the forward pass is the image model's, op for op.

Presets (`drivesim.configs`): tiny (16 channels, tests), cpu-small (64 channels, 128x256 frames on 2 CPU cores),
paper-512x1024 (320 channels, mult (1, 2, 4, 4), 2 res blocks, attention at ds 1/2/4, 768-d box tokens):
829,557,988 parameters (measured with `count_parameters`; box tokenizer, gated attention, layout encoder included).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn
from torch.utils.checkpoint import checkpoint

from drivesim.bbox_conditioning.classes import CROWDEDNESS_BUCKET_EDGES
from drivesim.bbox_conditioning.gated_attention import GatedSelfAttention
from drivesim.bbox_conditioning.layout import LayoutEncoder, layout_channels, layout_map
from drivesim.bbox_conditioning.tokens import BoxTokenizer
from drivesim.configs import UNetConfig
from drivesim.errors import ConfigError
from drivesim.nn.blocks import Downsample, GroupNorm32, ResBlock, SpatialSelfAttention, Upsample, timestep_embedding
from drivesim.types import Conditioning

LAYER_KINDS = ("conv_in", "res", "attn", "box_attn", "down", "up")


@dataclass(frozen=True)
class LayerSpec:
    """Where a spatial layer sits: what a temporal-layer factory needs to build its partner.

    kind: one of `LAYER_KINDS`; channels: output channels; ds: downsampling factor of its output relative to
    the U-Net input (1, 2, 4, ...); part: "input", "middle" or "output"; block: index of its block in that part.
    """

    kind: str
    channels: int
    ds: int
    part: str
    block: int


@dataclass
class UNetContext:
    """What a layer may read besides `h` and `emb`.

    num_frames: t of the folded `(b t)` batch; box_tokens: `(b t, m, d)` or None; cond: the `Conditioning`
    (e.g. `image_only`, context for temporal layers).
    """

    num_frames: int
    box_tokens: torch.Tensor | None
    cond: Conditioning


# Spatial layers: shared blocks given the uniform `(h, emb, ctx)` call; subclasses keep parameter names.
class _ConvIn(nn.Conv2d):
    def forward(self, h, emb, ctx):  # noqa: D102
        return super().forward(h)


class _Res(ResBlock):
    def forward(self, h, emb, ctx):  # noqa: D102
        return super().forward(h, emb)


class _Attn(SpatialSelfAttention):
    def forward(self, h, emb, ctx):  # noqa: D102
        return super().forward(h)


class _Down(Downsample):
    def forward(self, h, emb, ctx):  # noqa: D102
        return super().forward(h)


class _Up(Upsample):
    def forward(self, h, emb, ctx):  # noqa: D102
        return super().forward(h)


class _BoxAttn(GatedSelfAttention):
    """Gated box attention on a feature map: `(N, c, h, w)` pixels are the visual tokens."""

    def forward(self, h, emb, ctx):  # noqa: D102
        height, width = h.shape[-2:]
        tokens = rearrange(h, "n c h w -> n (h w) c")
        tokens = super().forward(tokens, ctx.box_tokens)
        return rearrange(tokens, "n (h w) c -> n c h w", h=height, w=width)


class UNetBlock(nn.Module):
    """A sequence of spatial layers, each optionally followed by a temporal layer (see module docstring)."""

    def __init__(self, layers: list[tuple[nn.Module, LayerSpec]]):
        super().__init__()
        self.layers = nn.ModuleList([m for m, _ in layers])
        self.specs = [s for _, s in layers]
        self.temporal = nn.ModuleDict()

    def forward(self, h: torch.Tensor, emb: torch.Tensor, ctx: UNetContext) -> torch.Tensor:
        """h: (b t, c, h, w); emb: (b t, e) -> (b t, c', h', w')."""
        for i, layer in enumerate(self.layers):
            h = layer(h, emb, ctx)
            key = str(i)
            if key in self.temporal:
                h = self.temporal[key](h, emb, ctx)
        return h


def count_parameters(module: nn.Module) -> int:
    """Number of parameters of `module` (trainable or not)."""
    return sum(p.numel() for p in module.parameters())


class SpatialUNet(nn.Module):
    """Box- and label-conditioned spatial U-Net; see the module docstring for the architecture and the extension
    point for temporal layers.

    Args:
        config: `UNetConfig`.

    Raises:
        ConfigError: inconsistent config (crowdedness buckets, head width) naming the field.
    """

    def __init__(self, config: UNetConfig):
        super().__init__()
        _check_config(config)
        self.config = config
        self.gradient_checkpointing = config.gradient_checkpointing
        mc, emb_dim = config.model_channels, 4 * config.model_channels
        self.emb_dim = emb_dim
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        # row 2 / the last row are the learned nulls of dropped labels
        self.night_embedding = nn.Embedding(3, emb_dim)
        self.crowdedness_embedding = nn.Embedding(config.num_crowdedness_buckets + 1, emb_dim)
        self.register_buffer("crowdedness_edges", torch.tensor(CROWDEDNESS_BUCKET_EDGES, dtype=torch.int64),
                             persistent=False)
        bc = config.boxes
        self.box_tokenizer = BoxTokenizer(bc.num_classes, bc.token_dim, bc.fourier_freqs, bc.max_boxes)

        def res(cin, cout, ds, part, block):
            return _Res(cin, cout, emb_dim, config.dropout, use_scale_shift_norm=True), LayerSpec(
                "res", cout, ds, part, block)

        def attn(ch, ds, part, block):
            heads = ch // config.num_head_channels
            return [(_Attn(ch, config.num_head_channels), LayerSpec("attn", ch, ds, part, block)),
                    (_BoxAttn(ch, bc.token_dim, heads, gate_init=bc.gate_init),
                     LayerSpec("box_attn", ch, ds, part, block))]

        self.input_blocks = nn.ModuleList([UNetBlock([(_ConvIn(config.in_channels, mc, 3, padding=1),
                                                       LayerSpec("conv_in", mc, 1, "input", 0))])])
        skip_channels = [mc]
        ch, ds = mc, 1
        for level, mult in enumerate(config.channel_mult):
            for _ in range(config.num_res_blocks):
                i = len(self.input_blocks)
                layers = [res(ch, mult * mc, ds, "input", i)]
                ch = mult * mc
                if ds in config.attention_resolutions:
                    layers += attn(ch, ds, "input", i)
                self.input_blocks.append(UNetBlock(layers))
                skip_channels.append(ch)
            if level != len(config.channel_mult) - 1:
                i = len(self.input_blocks)
                ds *= 2
                self.input_blocks.append(UNetBlock([(_Down(ch), LayerSpec("down", ch, ds, "input", i))]))
                skip_channels.append(ch)

        self.middle_block = UNetBlock([res(ch, ch, ds, "middle", 0), *attn(ch, ds, "middle", 0),
                                       res(ch, ch, ds, "middle", 0)])

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(config.channel_mult))):
            for r in range(config.num_res_blocks + 1):
                i = len(self.output_blocks)
                layers = [res(ch + skip_channels.pop(), mult * mc, ds, "output", i)]
                ch = mult * mc
                if ds in config.attention_resolutions:
                    layers += attn(ch, ds, "output", i)
                if level and r == config.num_res_blocks:
                    ds //= 2
                    layers.append((_Up(ch), LayerSpec("up", ch, ds, "output", i)))
                self.output_blocks.append(UNetBlock(layers))

        # layout path: one feature map per encoder level, added after the input conv and after each downsampling
        self.layout_inject: dict[int, int] = {}  # input block index -> layout feature index
        if config.layout.enabled:
            widths = []
            for i, block in enumerate(self.input_blocks):
                if block.specs[-1].kind in ("conv_in", "down"):
                    self.layout_inject[i] = len(widths)
                    widths.append(block.specs[-1].channels)
            self.layout_encoder = LayoutEncoder(layout_channels(bc.num_classes), config.layout.hidden, widths,
                                                config.layout.grid_factor)

        self.out_norm = GroupNorm32(ch)
        self.out_conv = nn.Conv2d(ch, config.out_channels, 3, padding=1)
        nn.init.zeros_(self.out_conv.weight)
        nn.init.zeros_(self.out_conv.bias)

    # -- extension point -------------------------------------------------------------------------------------
    def blocks(self) -> Iterator[UNetBlock]:
        """Every block in forward order: input blocks, middle block, output blocks."""
        yield from self.input_blocks
        yield self.middle_block
        yield from self.output_blocks

    def insert_temporal_layers(self, factory: Callable[[LayerSpec], nn.Module | None]) -> int:
        """Insert `factory(spec)` after every spatial layer for which it returns a module.

        The module is called as `module(h, emb, ctx)` right after its spatial layer and must return `h`'s shape.
        Returns the number of layers inserted. Raises ValueError if a block already has a temporal layer there.
        """
        count = 0
        for block in self.blocks():
            for i, spec in enumerate(block.specs):
                module = factory(spec)
                if module is None:
                    continue
                if str(i) in block.temporal:
                    raise ValueError(f"temporal layer already inserted after {spec}")
                block.temporal[str(i)] = module
                count += 1
        return count

    # -- conditioning ----------------------------------------------------------------------------------------
    def embed(self, timesteps: torch.Tensor, cond: Conditioning, num_frames: int) -> torch.Tensor:
        """Timestep + day/night + crowdedness embedding, one row per frame.

        Args:
            timesteps: (b,) or (b, t) diffusion timesteps (per-frame timesteps serve LVDM's context frames).
            cond: labels `night` (b,) in {0, 1}, `crowdedness` (b,) vehicle counts; `drop_night` /
                `drop_crowdedness` (b,) bool select the learned nulls.
            num_frames: t.
        Returns:
            (b t, 4 * model_channels) float32.
        """
        if timesteps.ndim == 1:
            timesteps = repeat(timesteps, "b -> (b t)", t=num_frames)
        else:
            timesteps = rearrange(timesteps, "b t -> (b t)")
        emb = self.time_embed(timestep_embedding(timesteps, self.config.model_channels))
        night = cond.night.long()
        if cond.drop_night is not None:
            night = torch.where(cond.drop_night.bool(), torch.full_like(night, 2), night)
        bucket = torch.bucketize(cond.crowdedness.long(), self.crowdedness_edges, right=True)
        if cond.drop_crowdedness is not None:
            null = torch.full_like(bucket, self.config.num_crowdedness_buckets)
            bucket = torch.where(cond.drop_crowdedness.bool(), null, bucket)
        labels = self.night_embedding(night) + self.crowdedness_embedding(bucket)
        return emb + repeat(labels, "b e -> (b t) e", t=num_frames)

    def box_tokens(self, cond: Conditioning) -> torch.Tensor:
        """(b t, m, token_dim) box tokens; boxes of samples with `drop_boxes` become null tokens."""
        mask = cond.box_mask.bool()
        if cond.drop_boxes is not None:
            mask = mask & ~rearrange(cond.drop_boxes.bool(), "b -> b 1 1")
        return self.box_tokenizer(cond.boxes, cond.classes, mask)

    def layout_features(self, cond: Conditioning, height: int, width: int) -> list[torch.Tensor] | None:
        """Layout-encoder features for latents of `height` x `width`: [((b t), c_k, height / 2^k, width / 2^k)], or
        None without a layout path. Boxes of samples with `drop_boxes` leave no mark (the null layout)."""
        if not self.layout_inject:
            return None
        mask = cond.box_mask.bool()
        if cond.drop_boxes is not None:
            mask = mask & ~rearrange(cond.drop_boxes.bool(), "b -> b 1 1")
        g = self.config.layout.grid_factor
        layout = layout_map(cond.boxes, cond.classes, mask, height * g, width * g, self.config.boxes.num_classes)
        dtype = next(self.layout_encoder.parameters()).dtype
        return self.layout_encoder(rearrange(layout, "b t c h w -> (b t) c h w").to(dtype))

    # -- forward ---------------------------------------------------------------------------------------------
    def _run(self, block: UNetBlock, h: torch.Tensor, emb: torch.Tensor, ctx: UNetContext) -> torch.Tensor:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, h, emb, ctx, use_reentrant=False)
        return block(h, emb, ctx)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """Predict epsilon or v (the network does not know which) for noisy latents.

        Args:
            x: (b, t, in_channels, h, w) noisy latents; h and w divisible by 2^(len(channel_mult) - 1).
            timesteps: (b,) or (b, t) int64 diffusion timesteps.
            cond: `Conditioning` for b videos of t frames (boxes (b, t, n, 4) normalised xyxy, etc.).
        Returns:
            (b, t, out_channels, h, w), dtype of `x`.
        Raises:
            ValueError: h or w not divisible by the total downsampling, or cond's b / t disagree with x.
        """
        b, t, _, height, width = x.shape
        factor = 2 ** (len(self.config.channel_mult) - 1)
        if height % factor or width % factor:
            raise ValueError(f"latent size {height}x{width} must be divisible by {factor}")
        if cond.boxes.shape[:2] != (b, t):
            raise ValueError(f"cond.boxes has (b, t) = {tuple(cond.boxes.shape[:2])}, latents have {(b, t)}")
        emb = self.embed(timesteps, cond, t).to(x.dtype)
        ctx = UNetContext(num_frames=t, box_tokens=self.box_tokens(cond), cond=cond)
        layout = self.layout_features(cond, height, width)
        h = rearrange(x, "b t c h w -> (b t) c h w")
        skips = []
        for i, block in enumerate(self.input_blocks):
            h = self._run(block, h, emb, ctx)
            if layout is not None and i in self.layout_inject:
                h = h + layout[self.layout_inject[i]].to(h.dtype)
            skips.append(h)
        h = self._run(self.middle_block, h, emb, ctx)
        for block in self.output_blocks:
            h = self._run(block, torch.cat([h, skips.pop()], dim=1), emb, ctx)
        h = self.out_conv(F.silu(self.out_norm(h)))
        return rearrange(h, "(b t) c h w -> b t c h w", b=b, t=t)


def _check_config(config: UNetConfig, source: str = "config") -> None:
    buckets = len(CROWDEDNESS_BUCKET_EDGES) + 1
    if config.num_crowdedness_buckets != buckets:
        raise ConfigError(f"{source}: unet.num_crowdedness_buckets: must be {buckets} (classes.CROWDEDNESS_"
                          f"BUCKET_EDGES), got {config.num_crowdedness_buckets}")
    widths = {m * config.model_channels for m in config.channel_mult}
    bad = sorted(w for w in widths if w % config.num_head_channels)
    if bad:
        raise ConfigError(f"{source}: unet.num_head_channels: {config.num_head_channels} does not divide "
                          f"channel width {bad[0]}")
    if config.boxes.num_classes < 1 or config.boxes.max_boxes < 0:
        raise ConfigError(f"{source}: unet.boxes: num_classes must be >= 1 and max_boxes >= 0")
