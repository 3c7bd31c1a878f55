"""Frozen dataclass configs for every drivesim model and for training, and the preset registry.

Presets (see `../shared/SPEC.md`):
- `tiny`: seconds per run, for tests and the CI smoke run of `drivesim demo`.
- `cpu-small`: minutes on a 2-core CPU at 128x256 (latent 4x16x32).
- `paper-512x1024`: the paper's driving stack (128x256 key frames, x4 upsampler to 512x1024).

Every preset has an `autoencoder_3d` block (LVDM's 3D autoencoder) and a `latent_space` field choosing which
autoencoder's latents the stack works on ("kl-f8" in all three; `--set latent_space=3d` for LVDM's base model).

YAML exists only as a dump/load of these dataclasses (`to_dict` / `from_dict`): unknown keys are rejected by
name, so a typo fails at load time, not deep inside training.

Each model's config block is owned by the module that implements the model; the model stores its config as
`.config` and a checkpoint's `config.json` holds `to_dict(config)`.

One module because every config dataclass and every preset are read together: it is where a user sees everything a
preset fixes.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from drivesim.errors import ConfigError

FORMAT_VERSION = 1
"""Schema version written into every checkpoint's and cache's config; bump when a field changes meaning."""

T = TypeVar("T")


# --------------------------------------------------------------------------------------------------------------
# Model configs
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AutoencoderConfig:
    """KL-f8 autoencoder (LDM "KL-f8"): 3 downsamplings, `latent_channels` = 4."""

    in_channels: int = 3
    latent_channels: int = 4
    base_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    dropout: float = 0.0
    # 1 / std of latents over a sample of the training set; computed from data, never typed by hand.
    scale_factor: float = 1.0
    # loss (LDM recipe)
    rec_loss: str = "l1"
    # extra weight of the reconstruction error inside the frame's boxes: loss += box_weight * (mean error over box
    # pixels, each weighted by its fractional box coverage). Boxes are ~0.3% of a driving frame's pixels, so a plain
    # mean lets a young autoencoder trade every car for sky and road (0: LDM's loss)
    box_weight: float = 0.0
    # fine-tune the decoder only: the encoder is frozen and the decoder learns from the posterior MEANS (what
    # `drivesim encode` caches, so what the latent models learn and generate). The latent space, the encoder's
    # fingerprint and every latent model trained on it stay valid (the recipe of Stable Diffusion's ft-MSE VAE
    # decoders and of Video LDM's decoder fine-tuning, Blattmann et al. 2023 Sec. 3.3)
    decoder_only: bool = False
    kl_weight: float = 1e-6
    disc_start: int = 50001
    disc_weight: float = 0.5
    disc_channels: int = 64
    disc_layers: int = 3
    lpips_weights: str | None = None
    lpips_weight: float = 1.0
    # video decoder (SPEC step 4): temporal 3D-conv blocks with alpha mixing in the decoder only
    video_decoder: bool = False
    temporal_merge: str = "learned"
    # learned alpha must start inside (0, 1); temporal blocks are zero-initialised, so any alpha starts as the
    # image decoder (see drivesim.nn.temporal.AlphaBlender); 0.5 gives both paths full gradient
    temporal_alpha_init: float = 0.5
    video_train_spatial: bool = False  # also fine-tune the decoder's spatial layers (encoder always frozen)
    # latents the video decoder is fine-tuned on: "mean" (posterior mean: what `drivesim encode` caches by default,
    # so what the diffusion models learn and generate) or "sample" (one posterior draw per frame, LDM's recipe,
    # which matches a cache written with `drivesim encode --sample`). A decoder fine-tuned on samples learns to
    # average out the draws' frame-independent noise, which mean latents do not have (measured: docs/measurements.md).
    video_latents: str = "mean"
    # weight of the temporal-difference loss mean |(rec[t+1] - rec[t]) - (x[t+1] - x[t])| in the video decoder's
    # fine-tuning (0: off, the paper's recipe of reconstruction + video discriminator only)
    video_temporal_weight: float = 0.0
    decode_chunk_frames: int = 8
    decode_chunk_overlap: int = 2


@dataclass(frozen=True)
class Autoencoder3DConfig:
    """LVDM's 3D video autoencoder (He et al. 2022, Sec. 3.1; SPEC section 2): 3D convolutions with repeat padding
    compress (t, H, W) by (frames_per_latent, 8, 8) into `latent_channels` = 4 (`VideoAutoencoder3D`).

    Its own block rather than a `kind` switch in `AutoencoderConfig`: the two share the loss fields but not the
    architecture (no attention, no video decoder, no alpha blending; a temporal downsampling per level), so a switch
    would leave half of either config meaningless. Field names shared with `AutoencoderConfig` mean the same.
    """

    in_channels: int = 3
    latent_channels: int = 4
    base_channels: int = 64
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 1
    # one entry per downsampling (len(channel_mult) - 1): True halves time there too. LVDM / TATS halve it at the first
    # levels, (4, 8, 8) in all, which is also where it saves the most compute (the full-resolution levels see t/2)
    temporal_downsample: tuple[bool, ...] = (True, True, False)
    dropout: float = 0.0
    # 1 / std of latents over a sample of the training clips; computed from data, never typed by hand.
    scale_factor: float = 1.0
    # loss: as AutoencoderConfig (LVDM's official config: L1 + LPIPS + GAN, kl_weight 0, disc_start 50001, weight 0.5)
    rec_loss: str = "l1"
    box_weight: float = 0.0
    decoder_only: bool = False
    kl_weight: float = 1e-6
    disc_start: int = 50001
    disc_weight: float = 0.5
    disc_channels: int = 64
    disc_layers: int = 3
    lpips_weights: str | None = None
    lpips_weight: float = 1.0
    video_temporal_weight: float = 0.0
    # decoding in overlapping chunks of LATENT frames (each decodes to frames_per_latent video frames), cross-faded
    # over the overlap; training clips default to one chunk: 4 latent frames = 16 video frames, LVDM's clip length
    decode_chunk_frames: int = 4
    decode_chunk_overlap: int = 1

    @property
    def frames_per_latent(self) -> int:
        """Video frames one latent frame stands for: 2 ** (number of temporal downsamplings)."""
        return 2 ** sum(bool(d) for d in self.temporal_downsample)


@dataclass(frozen=True)
class BoxConditioningConfig:
    """Per-frame box tokens (GLIGEN): Fourier features of xyxy + class embedding -> MLP, gated self-attention."""

    max_boxes: int = 16
    num_classes: int = 11
    fourier_freqs: int = 8
    token_dim: int = 256
    # classifier-free guidance dropout (SPEC "Conditioning in the driving model"; p = 0.1 is 2°)
    drop_boxes_p: float = 0.1
    # initial value of the gated attention's tanh gates. GLIGEN's 0 makes a layer inserted into a PRETRAINED model the
    # identity; a model trained from scratch with boxes does not need that, and at minutes of CPU training the gates
    # (scalars under AdamW) stay near 0 so the boxes are ignored (measured: 861 steps, |gate| < 5e-4)
    gate_init: float = 0.0


@dataclass(frozen=True)
class LayoutConfig:
    """The spatially aligned box path (T2I-Adapter style): boxes rasterised as layout maps (per-class fractional
    coverage + in-box position, `drivesim.bbox_conditioning.layout.layout_map`) on a grid `grid_factor` times
    finer than the latent, encoded by small convs and added after the input conv and each downsampling of the
    U-Net encoder through zero-initialised 1x1 convs (a fresh model is the model without it). Dropped with the
    box tokens (`boxes.drop_boxes_p`) for classifier-free guidance."""

    enabled: bool = False
    grid_factor: int = 2
    hidden: int = 64


@dataclass(frozen=True)
class UNetConfig:
    """Spatial ADM/LDM U-Net on latents; the video models wrap it."""

    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 64
    channel_mult: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 1
    attention_resolutions: tuple[int, ...] = (2,)
    num_head_channels: int = 32
    dropout: float = 0.0
    num_crowdedness_buckets: int = 5
    drop_night_p: float = 0.1
    drop_crowdedness_p: float = 0.1
    # probability of dropping day/night, crowdedness and boxes TOGETHER (on top of the independent drops), so the
    # all-null condition that label/box guidance contrasts against is trained (0.1^3 = 0.1% of samples otherwise)
    drop_all_p: float = 0.0
    boxes: BoxConditioningConfig = field(default_factory=BoxConditioningConfig)
    layout: LayoutConfig = field(default_factory=LayoutConfig)
    gradient_checkpointing: bool = False


@dataclass(frozen=True)
class TemporalConfig:
    """Temporal layers inserted into the spatial U-Net (SPEC section 1, "Temporal layers")."""

    merge_strategy: str = "learned_with_images"  # fixed | learned | learned_with_images
    # learned: alpha = sigmoid(mix); the temporal blocks are zero-initialised, so any alpha starts as the image
    # model; 0.5 gives both paths gradient (1.0 is only valid for `fixed`; `force_alpha_one` switches them off)
    alpha_init: float = 0.5
    attention: bool = True
    conv3d: bool = True
    relative_positions: bool = False
    max_attention_distance: int = 8
    train_spatial: bool = False


@dataclass(frozen=True)
class DiffusionConfig:
    """Noise schedule and parameterisation (SPEC: 1000 steps, linear VP; v-prediction for driving)."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "linear"
    prediction_type: str = "v_prediction"
    sampler: str = "ddim"
    num_inference_steps: int = 50
    guidance_scale: float = 1.0


@dataclass(frozen=True)
class ImageLDMConfig:
    unet: UNetConfig = field(default_factory=UNetConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    # identity of the autoencoder whose latents trained the model (`latent_cache.encoder_id`, recorded by the
    # training stage from the cache); a stack whose autoencoder has another identity is refused. None: not recorded
    encoder_id: str | None = None


@dataclass(frozen=True)
class VideoLDMConfig:
    """Key-frame prediction or interpolation model = spatial U-Net + temporal layers."""

    task: str = "prediction"  # prediction | interpolation (what the video model does; not a training stage)
    num_frames: int = 8
    unet: UNetConfig = field(default_factory=UNetConfig)
    temporal: TemporalConfig = field(default_factory=TemporalConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    # LVDM conditional latent perturbation: s ~ U{0..s_max} in training, fixed s at sampling
    context_noise_max: int = 250
    context_noise_sample: int = 100
    # source frames between consecutive frames of a window: prediction = between key frames; interpolation =
    # between output frames of the fine stage (label 1, 4T -> 16T); the coarse stage (label 0) uses 4x this
    frame_stride: int = 4
    context_frames: tuple[int, ...] = (0, 1, 2)  # prediction: S drawn uniformly from these (0 = unconditional)
    interpolation_uncond_p: float = 0.1  # interpolation: clips trained without key frames (LVDM: 10%)
    # context guidance f(z) + s (f(z; c) - f(z)) at sampling; s = 1 + w of LVDM's unconditional guidance (w = 0.1)
    context_guidance: float = 1.1
    # frame rate of the clips the model was trained on (recorded from the latent cache by the training stage; None in
    # checkpoints from before it was recorded). With frame_stride it fixes the model's timeline: a rollout's output
    # fps is data_fps / interpolation.frame_stride
    data_fps: float | None = None
    # identity of the autoencoder whose latents trained the model (as ImageLDMConfig.encoder_id)
    encoder_id: str | None = None
    # on 3D-autoencoder latents: how the training cache reduced each latent frame's video frames' boxes to one list
    # ("union" | "middle", `drivesim.bbox_conditioning.latent_frames`; recorded from the cache by the training stage),
    # so a rollout conditions the model on boxes made the same way. None: per-frame latents, or not recorded
    box_reduction: str | None = None


@dataclass(frozen=True)
class UpsamplerConfig:
    """Pixel-space x4 video upsampler (SPEC step 5)."""

    scale: int = 4
    patch_size: int = 80
    chunk_frames: int = 8
    max_noise_level: int = 250
    unet: UNetConfig = field(default_factory=lambda: UNetConfig(in_channels=6, out_channels=3))
    temporal: TemporalConfig = field(default_factory=TemporalConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)


# --------------------------------------------------------------------------------------------------------------
# Training config
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainConfig:
    """One training run through the shared accelerate loop."""

    max_steps: int = 1000
    max_minutes: float | None = None
    batch_size: int = 8
    grad_accum_steps: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 100
    lr_schedule: str = "constant"  # constant | cosine (after warmup)
    grad_clip: float = 1.0
    mixed_precision: str = "no"  # no | bf16 | fp16
    ema_decay: float = 0.999
    checkpoint_every: int = 500
    log_every: int = 10
    seed: int = 0
    max_bad_steps: int = 10
    num_workers: int = 0
    tracker: str | None = "tensorboard"  # tensorboard | None (logs under out_dir/logs)
    keep_checkpoints: int = 3  # newest complete training checkpoints kept; 0 keeps all
    # fine-tuning: a fresh run starts from these weights (an exported or shipped checkpoint folder of the same
    # model class and shapes) instead of the seeded initialisation; the optimizer and schedule start fresh
    init_from: str | None = None


# --------------------------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------------------------


LATENT_SPACES = ("kl-f8", "3d")


@dataclass(frozen=True)
class Preset:
    """Everything one named preset fixes: every model's config and each stage's training config."""

    name: str
    resolution: tuple[int, int]  # (h, w) of key frames in pixels
    autoencoder: AutoencoderConfig
    image_ldm: ImageLDMConfig
    prediction: VideoLDMConfig
    interpolation: VideoLDMConfig
    upsampler: UpsamplerConfig
    train: dict[str, TrainConfig]  # stage name -> training config
    # the stack's latent space: "kl-f8" (the image autoencoder, one latent per frame; Video LDM) or "3d" (LVDM's 3D
    # autoencoder `autoencoder_3d`, one latent frame per frames_per_latent video frames). The latent stages check
    # that a cache holds latents of this space. On "3d" only the prediction stage exists (LVDM's base model: the whole
    # U-Net trained from scratch, no image LDM, prediction.frame_stride 1) and the rollout is 3D autoencoder +
    # prediction model; the image_ldm and interpolation stages are kl-f8 only
    latent_space: str = "kl-f8"
    autoencoder_3d: Autoencoder3DConfig = field(default_factory=Autoencoder3DConfig)

    def __post_init__(self) -> None:
        if self.latent_space not in LATENT_SPACES:
            raise ConfigError(f"latent_space: {self.latent_space!r} not in {LATENT_SPACES}")

    @property
    def frames_per_latent(self) -> int:
        """Video frames one latent frame of the stack's latent space stands for (1 for kl-f8)."""
        return self.autoencoder_3d.frames_per_latent if self.latent_space == "3d" else 1


def _tiny() -> Preset:
    unet = UNetConfig(
        model_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(2,),
        num_head_channels=16, boxes=BoxConditioningConfig(max_boxes=8, token_dim=32, fourier_freqs=4),
    )
    quick = TrainConfig(max_steps=4, batch_size=2, warmup_steps=1, checkpoint_every=2, log_every=1, tracker=None)
    return Preset(
        name="tiny",
        resolution=(32, 64),
        autoencoder=AutoencoderConfig(base_channels=16, channel_mult=(1, 1, 2, 2), num_res_blocks=1, disc_start=2,
                                      disc_channels=8, disc_layers=2),
        image_ldm=ImageLDMConfig(unet=unet, diffusion=DiffusionConfig(num_inference_steps=4)),
        prediction=VideoLDMConfig(task="prediction", num_frames=4, unet=unet,
                                  diffusion=DiffusionConfig(num_inference_steps=4)),
        interpolation=VideoLDMConfig(task="interpolation", num_frames=5, unet=unet, frame_stride=1,
                                     diffusion=DiffusionConfig(num_inference_steps=4)),
        upsampler=UpsamplerConfig(patch_size=16, chunk_frames=4,
                                  unet=dataclasses.replace(unet, in_channels=6, out_channels=3)),
        train={s: quick for s in ("autoencoder", "video_decoder", "image_ldm", "prediction", "interpolation",
                                  "upsampler", "autoencoder_3d")},
        # training clips of 2 latent frames = 8 video frames
        autoencoder_3d=Autoencoder3DConfig(base_channels=8, channel_mult=(1, 1, 2, 2), num_res_blocks=1, disc_start=2,
                                           disc_channels=8, disc_layers=2, decode_chunk_frames=2),
    )


def _cpu_small() -> Preset:
    # layout path on (boxes placed by a spatially aligned map, not only by tokens) and the all-null condition trained
    unet = UNetConfig(
        model_channels=64, channel_mult=(1, 2, 2), num_res_blocks=1, attention_resolutions=(2, 4),
        num_head_channels=32, boxes=BoxConditioningConfig(max_boxes=16, token_dim=128, fourier_freqs=8),
        layout=LayoutConfig(enabled=True, grid_factor=2, hidden=64), drop_all_p=0.1,
    )
    base = TrainConfig(max_steps=2000, max_minutes=5.0, batch_size=8, warmup_steps=50, checkpoint_every=250,
                       lr=2e-4, ema_decay=0.995)
    return Preset(
        name="cpu-small",
        resolution=(128, 256),
        # 16-32-64-64 channels: ~1/3 the full-resolution convolution cost of 32-64-64-128, so a 10-minute CPU
        # run takes ~3x the steps (the latent space, 4 x h/8 x w/8, is the same)
        # video decoder: the video discriminator starts after 1000 steps, which CPU minutes never reach; the
        # temporal-difference loss gives the temporal layers a direct signal (40 min: flicker -7%, README)
        # box_weight 1: the error inside boxes counts as much as the whole frame's (boxes are ~1% of the pixels)
        autoencoder=AutoencoderConfig(base_channels=16, channel_mult=(1, 2, 4, 4), num_res_blocks=1, box_weight=1.0,
                                      disc_start=1000, disc_channels=32, disc_layers=3, video_temporal_weight=1.0),
        image_ldm=ImageLDMConfig(unet=unet, diffusion=DiffusionConfig(num_inference_steps=25)),
        prediction=VideoLDMConfig(task="prediction", num_frames=6, unet=unet,
                                  diffusion=DiffusionConfig(num_inference_steps=25)),
        interpolation=VideoLDMConfig(task="interpolation", num_frames=5, unet=unet, frame_stride=1,
                                     diffusion=DiffusionConfig(num_inference_steps=25)),
        # the pixel-space upsampler takes no boxes
        upsampler=UpsamplerConfig(patch_size=64, unet=dataclasses.replace(unet, in_channels=6, out_channels=3,
                                                                          layout=LayoutConfig())),
        # the video decoder trains on whole 128x256 clips at full resolution: batch 8 peaks at 9.0 GiB and 43 s/step
        # on one CPU thread, batch 2 at 2.8 GiB and ~6 s/step (measured); lr 1e-3 for its zero-initialised temporal
        # layers (the recipe measured in the README)
        train={s: base for s in ("autoencoder", "image_ldm", "prediction", "interpolation", "upsampler")}
        | {"video_decoder": dataclasses.replace(base, batch_size=2, lr=1e-3),
           "autoencoder_3d": dataclasses.replace(base, batch_size=1)},
        # the KL-f8 autoencoder's widths and box weight, and the video decoder's temporal-difference loss, so the two
        # latent spaces are compared at the same recipe; one 16-frame clip per step
        autoencoder_3d=Autoencoder3DConfig(base_channels=16, channel_mult=(1, 2, 4, 4), num_res_blocks=1,
                                           box_weight=1.0, disc_start=1000, disc_channels=32, disc_layers=3,
                                           video_temporal_weight=1.0),
    )


def _paper() -> Preset:
    # LDM widths for the 128x256 key-frame backbone (latent 4x16x32); training scale from SPEC (2°).
    unet = UNetConfig(
        model_channels=320, channel_mult=(1, 2, 4, 4), num_res_blocks=2, attention_resolutions=(1, 2, 4),
        num_head_channels=64, boxes=BoxConditioningConfig(max_boxes=32, token_dim=768, fourier_freqs=8),
        layout=LayoutConfig(enabled=True, grid_factor=2, hidden=128), drop_all_p=0.1, gradient_checkpointing=True,
    )
    keyframe = TrainConfig(max_steps=73_000, batch_size=40, lr=1e-4, warmup_steps=1000, mixed_precision="bf16",
                           checkpoint_every=2000, ema_decay=0.9999)
    return Preset(
        name="paper-512x1024",
        resolution=(128, 256),
        autoencoder=AutoencoderConfig(base_channels=128, channel_mult=(1, 2, 4, 4), num_res_blocks=2),
        image_ldm=ImageLDMConfig(unet=unet),
        prediction=VideoLDMConfig(task="prediction", num_frames=8, unet=unet, frame_stride=16),  # 1.875 fps of 30
        interpolation=VideoLDMConfig(task="interpolation", num_frames=5, unet=unet, frame_stride=1),
        upsampler=UpsamplerConfig(
            patch_size=80, unet=UNetConfig(in_channels=6, out_channels=3, model_channels=128,
                                           channel_mult=(1, 2, 4, 4), num_res_blocks=2,
                                           attention_resolutions=(), gradient_checkpointing=True),
        ),
        train={
            "autoencoder": dataclasses.replace(keyframe, max_steps=100_000, batch_size=8, lr=4.5e-6),
            "video_decoder": dataclasses.replace(keyframe, max_steps=20_000, batch_size=4, lr=4.5e-6),
            "image_ldm": keyframe,
            "prediction": keyframe,
            "interpolation": keyframe,
            "upsampler": dataclasses.replace(keyframe, max_steps=84_000, batch_size=4, lr=1e-5),
            # LVDM's official video AE lr (3.6e-5); 16-frame clips
            "autoencoder_3d": dataclasses.replace(keyframe, max_steps=100_000, batch_size=2, lr=3.6e-5),
        },
        # about LVDM's widths (TATS encoder: 32, then 64-128-256 per level), time halved at the first two levels
        autoencoder_3d=Autoencoder3DConfig(base_channels=64, channel_mult=(1, 2, 4, 4), num_res_blocks=1),
    )


PRESETS: dict[str, typing.Callable[[], Preset]] = {
    "tiny": _tiny,
    "cpu-small": _cpu_small,
    "paper-512x1024": _paper,
}


def get_preset(name: str) -> Preset:
    """Return the preset called `name`.

    Raises:
        ConfigError: unknown preset (the message lists the known ones).
    """
    try:
        return PRESETS[name]()
    except KeyError:
        raise ConfigError(f"preset: unknown preset {name!r} (known: {', '.join(PRESETS)})") from None


# --------------------------------------------------------------------------------------------------------------
# dict / YAML round trip with strict keys
# --------------------------------------------------------------------------------------------------------------


def to_dict(cfg: Any) -> Any:
    """Dataclass (nested) -> plain JSON/YAML-able dict; tuples become lists."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    return cfg


RENAMED_FIELDS: dict[str, dict[str, str]] = {"VideoLDMConfig": {"stage": "task"}}
"""Config fields renamed since files were written (class name -> old name -> new name); readers accept the old."""


def from_dict(cls: type[T], data: Any, source: str = "config", _path: str = "") -> T:
    """Build dataclass `cls` from a plain dict, checking every key and value type.

    Args:
        cls: the dataclass to build.
        data: the mapping (e.g. parsed JSON/YAML).
        source: file name (or other origin) used in error messages.

    Raises:
        ConfigError: unknown key, missing mapping, or a value of the wrong type; the message names `source`
            and the dotted field path.
    """
    where = _path or "<root>"
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {where}: expected a mapping, got {type(data).__name__}")
    for old, new in RENAMED_FIELDS.get(cls.__name__, {}).items():
        if old in data and new not in data:  # written by an earlier version: same value, new name
            data = {(new if k == old else k): v for k, v in data.items()}
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{source}: {_join(_path, unknown[0])}: unknown key for {cls.__name__}")
    kwargs = {k: _convert(hints[k], v, source, _join(_path, k)) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field is missing
        raise ConfigError(f"{source}: {where}: {e}") from None


_FLOAT_RE = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _convert(tp: Any, value: Any, source: str, path: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, source, path)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, source, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{source}: {path}: invalid value {value!r}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: {path}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, source, f"{path}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f"{source}: {path}: expected {len(args)} values, got {len(value)}")
        return tuple(_convert(a, v, source, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=True)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {path}: expected a mapping, got {value!r}")
        return {k: _convert(args[1], v, source, _join(path, str(k))) for k, v in value.items()}
    if tp is float:
        if isinstance(value, str) and _FLOAT_RE.fullmatch(value.strip()):
            return float(value)  # YAML 1.1 reads `1e-4` (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: {path}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: {path}: expected an integer, got {value!r}")
        return value
    if tp in (str, bool):
        if not isinstance(value, tp):
            raise ConfigError(f"{source}: {path}: expected {tp.__name__}, got {value!r}")
        return value
    return value


def dump_yaml(cfg: Any, path: str | Path) -> Path:
    """Write dataclass `cfg` (e.g. a `Preset` or `TrainConfig`) as YAML to `path`, atomically (temp + rename)."""
    import yaml

    from drivesim.atomic import write_bytes_atomic

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None).encode())
    return path


def load_yaml(cls: type[T], path: str | Path) -> T:
    """Read a YAML dump of dataclass `cls` strictly (unknown keys and wrong types rejected by name).

    Raises:
        ConfigError: missing file, invalid YAML, unknown key, wrong type (message names the file and the field).
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: missing file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else "parse error"
        raise ConfigError(f"{path}: invalid YAML ({where}: {getattr(e, 'problem', e)})") from None
    return from_dict(cls, data, source=str(path))


def override(cfg: T, key: str, raw: str, source: str = "--set") -> T:
    """A copy of dataclass `cfg` with the dotted field `key` set to `raw` parsed as a YAML scalar/list.

    Example: `override(preset, "train.prediction.lr", "2e-4")`, `override(preset, "resolution", "[64, 128]")`.

    Raises:
        ConfigError: unknown key (named), or a value of the wrong type.
    """
    import yaml

    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        raise ConfigError(f"{source}: {key}: cannot parse value {raw!r}") from None
    data = to_dict(cfg)
    node = data
    parts = key.split(".")
    for i, part in enumerate(parts):
        if not isinstance(node, dict) or part not in node:
            raise ConfigError(f"{source}: {'.'.join(parts[: i + 1])}: unknown key for {type(cfg).__name__}")
        if i == len(parts) - 1:
            if isinstance(node[part], str) and isinstance(value, bool):
                value = raw  # YAML 1.1 reads no/yes/on/off as booleans: a text field keeps the word
            node[part] = value
        else:
            node = node[part]
    return from_dict(type(cfg), data, source=source)
