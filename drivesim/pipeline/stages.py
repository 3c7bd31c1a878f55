"""Stage registry for `drivesim train STAGE`: each stage maps to a builder of (model, dataset, collate_fn).

A builder is `build(preset: Preset, data_path: Path, **opts) -> (model, dataset, collate_fn | None)`:
- `preset` is fully resolved (`--preset`/`--config`, then `--set`, then the flag overrides); the builder reads its
  model block (e.g. `preset.autoencoder`) and must build the model from it so the checkpoint's config matches;
- `data_path` is the `--data` argument (a clip-format folder or a latent cache, as the stage needs);
- `opts` are the `--opt key=value` strings, checked against `StageSpec.options` before the call.
The global torch RNG is seeded with the stage's `train.seed` before `build` runs, so initial weights reproduce.

Model owners register their stage here with `@register_stage("name", help=..., options={...})`; a stage named in
`STAGE_NAMES` but not registered yet fails with a clear error.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from drivesim.errors import ConfigError

STAGE_NAMES = ("autoencoder", "video_decoder", "image_ldm", "prediction", "interpolation", "upsampler")
"""The paper's training stages, in training order (SPEC "Order of training")."""

EXTRA_STAGES = ("autoencoder_3d",)
"""Stages outside the Video LDM order: LVDM's 3D autoencoder (the `latent_space: 3d` alternative to the first two)."""


@dataclass(frozen=True)
class StageSpec:
    """One trainable stage.

    Attributes:
        name: stage name; also the key of the stage's `TrainConfig` in `Preset.train`.
        build: `(preset, data_path, **opts) -> (model, dataset, collate_fn or None)`.
        help: one line shown by `drivesim train --help`.
        options: allowed `--opt` names -> their help (e.g. {"autoencoder": "exported autoencoder checkpoint"}).
    """

    name: str
    build: Callable[..., tuple[Any, Any, Callable | None]]
    help: str = ""
    options: dict[str, str] = field(default_factory=dict)


STAGES: dict[str, StageSpec] = {}


def register_stage(name: str, help: str = "", options: dict[str, str] | None = None) -> Callable:
    """Decorator registering a builder function as stage `name`."""

    def wrap(fn: Callable) -> Callable:
        if name in STAGES and STAGES[name].build is not fn:
            raise ValueError(f"stage {name!r} registered twice")
        STAGES[name] = StageSpec(name=name, build=fn, help=help, options=dict(options or {}))
        return fn

    return wrap


def get_stage(name: str) -> StageSpec:
    """The registered stage `name`.

    Raises:
        ConfigError: unknown stage, or a known stage whose model is not available in this build yet.
    """
    if name in STAGES:
        return STAGES[name]
    if name in STAGE_NAMES:
        ready = ", ".join(s for s in STAGE_NAMES if s in STAGES) or "none"
        raise ConfigError(f"stage: {name!r} has no training builder registered yet in drivesim.pipeline.stages "
                          f"(available: {ready})")
    raise ConfigError(f"stage: unknown stage {name!r} (stages: {', '.join(STAGE_NAMES + EXTRA_STAGES)})")


def parse_opts(spec: StageSpec, pairs: list[str]) -> dict[str, str]:
    """`["key=value", ...]` -> dict, checked against `spec.options`.

    Raises:
        ConfigError: a pair without '=' or an option the stage does not take (named).
    """
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--opt: {pair!r}: expected key=value")
        if key not in spec.options:
            known = ", ".join(spec.options) or "none"
            raise ConfigError(f"--opt: {key}: unknown option for stage {spec.name} (options: {known})")
        out[key] = value
    return out


# ---- autoencoder, video_decoder ---------------------------------------------------------------------


def _positive_int(name: str, text: str) -> int:
    try:
        value = int(text)
        if value < 1:
            raise ValueError
    except ValueError:
        raise ConfigError(f"--opt: {name}: expected a positive integer, got {text!r}") from None
    return value


def _probability(name: str, text: str) -> float:
    try:
        p = float(text)
        if not 0.0 <= p <= 1.0:
            raise ValueError
    except ValueError:
        raise ConfigError(f"--opt: {name}: expected a probability in [0, 1], got {text!r}") from None
    return p


@register_stage("autoencoder", help="KL-f8 image autoencoder on frames of a clip-format dataset (L1 + KL + "
                "patch GAN after autoencoder.disc_start).",
                options={"hflip": "probability of mirroring a sample (default 0.5)"})
def build_autoencoder(preset, data_path, hflip: str = "0.5"):
    """`AutoencoderKL(preset.autoencoder)` + single train frames (t = 1) resized to `preset.resolution`."""
    from drivesim.autoencoder import AutoencoderKL
    from drivesim.datasets.torch_data import FrameDataset

    p = _probability("hflip", hflip)
    dataset = FrameDataset(data_path, "train", size=tuple(preset.resolution), hflip_p=p)
    return AutoencoderKL(preset.autoencoder), dataset, None


@register_stage("autoencoder_3d", help="LVDM 3D video autoencoder (t/4, h/8, w/8; repeat padding) on clips of a "
                "clip-format dataset (L1 + KL + 3D video discriminator after autoencoder_3d.disc_start).",
                options={"frames": "frames per training clip, a multiple of 4 (default 4 x "
                                   "autoencoder_3d.decode_chunk_frames)",
                         "hflip": "probability of mirroring a sample (default 0.5)"})
def build_autoencoder_3d(preset, data_path, frames: str | None = None, hflip: str = "0.5"):
    """`VideoAutoencoder3D(preset.autoencoder_3d)` + `ClipDataset` clips of `frames` consecutive frames resized to
    `preset.resolution` (default: one decode chunk, 16 frames with the presets' 4 latent frames)."""
    from drivesim.autoencoder import VideoAutoencoder3D
    from drivesim.datasets.torch_data import ClipDataset

    model = VideoAutoencoder3D(preset.autoencoder_3d)
    f = model.frames_per_latent
    num_frames = _positive_int("frames", frames) if frames else model.config.decode_chunk_frames * f
    if num_frames % f:
        raise ConfigError(f"--opt: frames: {num_frames} is not a multiple of {f} (one latent frame per {f} frames)")
    dataset = ClipDataset(data_path, "train", num_frames=num_frames, size=tuple(preset.resolution),
                          hflip_p=_probability("hflip", hflip))
    return model, dataset, None


_VIDEO_DECODER_FIELDS = ("temporal_merge", "temporal_alpha_init", "video_train_spatial", "video_latents",
                         "video_temporal_weight", "decode_chunk_frames", "decode_chunk_overlap", "disc_start",
                         "disc_weight", "disc_channels", "disc_layers", "rec_loss", "lpips_weights", "lpips_weight",
                         "dropout")


@register_stage("video_decoder", help="Video fine-tuning of the decoder (temporal layers, 3D-conv video "
                "discriminator; encoder frozen) from a trained image autoencoder (--opt autoencoder=PATH).",
                options={"autoencoder": "trained image autoencoder: exported model folder or run folder "
                                        "(required)",
                         "frames": "frames per training clip (default autoencoder.decode_chunk_frames)"})
def build_video_decoder(preset, data_path, autoencoder: str | None = None, frames: str | None = None):
    """`VideoAutoencoder.from_image(autoencoder)`: architecture, weights and scale factor from the checkpoint;
    the temporal/loss fields listed in `_VIDEO_DECODER_FIELDS` from `preset.autoencoder`; clips of `frames`
    frames resized to `preset.resolution`."""
    from drivesim.autoencoder import VideoAutoencoder
    from drivesim.datasets.torch_data import ClipDataset
    from drivesim.training.checkpoint import load_model

    if not autoencoder:
        raise ConfigError("--opt: autoencoder: required for the video_decoder stage (the trained image "
                          "autoencoder, e.g. --opt autoencoder=runs/ae/model)")
    cfg = preset.autoencoder
    image_ae = load_model(autoencoder, expected_class="autoencoder_kl")
    model = VideoAutoencoder.from_image(image_ae, **{k: getattr(cfg, k) for k in _VIDEO_DECODER_FIELDS})
    num_frames = _positive_int("frames", frames) if frames else model.config.decode_chunk_frames
    dataset = ClipDataset(data_path, "train", num_frames=num_frames, size=tuple(preset.resolution), hflip_p=0.5)
    return model, dataset, None


# ---- image_ldm --------------------------------------------------------------------------------------


def _tensor_collate(samples: list[dict]) -> dict:
    """Default collate of the tensor fields only (drops "clip_id" / "start", which the models do not read)."""
    import torch
    from torch.utils.data import default_collate

    return default_collate([{k: v for k, v in s.items() if isinstance(v, torch.Tensor)} for s in samples])


@register_stage("image_ldm", help="Box- and day/night-conditioned image LDM on single frames of a latent cache "
                "(--data CACHE.h5 from `drivesim encode`).",
                options={"frames": "frames per cached window folded into the batch as images (default 1)"})
def build_image_ldm(preset, data_path, frames: str = "1"):
    """Image LDM (`preset.image_ldm`) + `LatentClipDataset(data_path, "train")` windows of `frames` frames."""
    from drivesim.datasets.latent_cache import LatentClipDataset
    from drivesim.models.image_ldm import ImageLDM

    num_frames = _positive_int("frames", frames)
    dataset = LatentClipDataset(data_path, split="train", num_frames=num_frames, frame_stride=1)
    cfg = dataclasses.replace(preset.image_ldm, encoder_id=_cache_encoder_id(data_path, preset, "image_ldm"))
    return ImageLDM(cfg), dataset, _tensor_collate


LATENT_3D_STAGES = ("prediction",)
"""Latent stages implemented on `latent_space: 3d` (LVDM's base model, He et al. 2022 Sec. 3.2-3.3); the image LDM and
interpolation stages train on kl-f8 latents only."""


def _cache_encoder_id(data_path, preset=None, stage: str = "") -> str:
    """The encoder identity a latent cache was written with (recorded into the models trained on it).

    With `preset`: also checks that the cache holds latents of the preset's `latent_space`, and that `stage` is
    implemented on that latent space (`LATENT_3D_STAGES` for "3d").

    Raises:
        ConfigError: the cache's frames per latent frame differ from the preset's latent space, or the latent space
            is "3d" and `stage` is not one of `LATENT_3D_STAGES`.
    """
    from drivesim.datasets.latent_cache import LatentCache

    cache = LatentCache(data_path)
    try:
        if preset is not None:
            if cache.frames_per_latent != preset.frames_per_latent:
                raise ConfigError(f"{data_path}: frames_per_latent: the cache's latent frames stand for "
                                  f"{cache.frames_per_latent} video frame(s) each, the preset's latent_space "
                                  f"{preset.latent_space!r} has {preset.frames_per_latent}")
            if preset.latent_space != "kl-f8" and stage not in LATENT_3D_STAGES:
                raise ConfigError(f"latent_space: {preset.latent_space!r}: the {stage} stage trains on kl-f8 latents "
                                  f"only; on 3D-autoencoder latents the implemented stages are "
                                  f"{', '.join(LATENT_3D_STAGES)} (LVDM's base model; no interpolation: one latent "
                                  f"frame already stands for {preset.frames_per_latent} video frames)")
        return cache.encoder_id
    finally:
        cache.close()


def _cache_box_reduction(data_path) -> str:
    """How the cache reduced each group of video frames' boxes to one latent frame's ("none" for per-frame latents;
    `drivesim.bbox_conditioning.latent_frames`)."""
    from drivesim.datasets.latent_cache import LatentCache

    cache = LatentCache(data_path)
    try:
        return cache.box_reduction
    finally:
        cache.close()


# ---- prediction / interpolation ---------------------------------------------------------------------

_VIDEO_OPTIONS = {"image_ldm": "trained image LDM whose spatial U-Net is copied in and frozen: exported model "
                               "folder or run folder (required on kl-f8 latents; optional on latent_space 3d, where "
                               "without it the whole U-Net trains from scratch)"}


def _cache_fps(data_path, split: str = "train") -> float:
    """The frame rate of the training clips of a latent cache (recorded into the video models' `data_fps`).

    Raises:
        ConfigError: clips of several frame rates (a video model learns one timeline).
    """
    from drivesim.datasets.latent_cache import LatentCache

    cache = LatentCache(data_path)
    try:
        rates = sorted({float(cache.meta[c]["fps"]) for c in cache.clip_ids(split)})
    finally:
        cache.close()
    if len(rates) != 1:
        raise ConfigError(f"{data_path}: fps: the {split} clips have frame rates {rates}; a video model trains on one "
                          "(resample the clips)")
    return rates[0]


def _video_ldm_from_image(cls, config, image_ldm: str | None, stage: str):
    from drivesim.training.checkpoint import load_model

    if not image_ldm:
        raise ConfigError(f"--opt: image_ldm: required for the {stage} stage (the trained image LDM, e.g. "
                          f"--opt image_ldm=runs/ldm/model-ema)")
    image = load_model(image_ldm, "image_ldm")
    if image.config.encoder_id is not None and config.encoder_id is not None and \
            image.config.encoder_id != config.encoder_id:
        raise ConfigError(f"{image_ldm}: encoder_id: the image LDM was trained on latents of another autoencoder "
                          f"than the cache's ({image.config.encoder_id[:12]}... vs {config.encoder_id[:12]}...)")
    return cls.from_image_ldm(image, config)


@register_stage("prediction", help="Key-frame prediction video LDM (temporal layers on the frozen image LDM; "
                "0-2 context frames, LVDM context perturbation) on windows of a latent cache at "
                "prediction.frame_stride. On latent_space 3d: LVDM's base model on 3D-autoencoder latents, the whole "
                "U-Net trained from scratch unless --opt image_ldm is given.", options=_VIDEO_OPTIONS)
def build_prediction(preset, data_path, image_ldm: str | None = None):
    """`PredictionLDM.from_image_ldm` + `LatentClipDataset` windows of `prediction.num_frames` frames every
    `prediction.frame_stride` source frames.

    On `latent_space: "3d"` (LVDM's base model, He et al. 2022 Sec. 3.2-3.3): a latent frame of the 3D autoencoder
    stands for 4 video frames and is no image, so there is no image LDM to freeze. Without `image_ldm` the model is a
    fresh `PredictionLDM(preset.prediction)` whose spatial U-Net (`prediction.unet`, the same block as
    `image_ldm.unet` in every preset) trains together with the temporal layers (`temporal.train_spatial` set True in
    the model's config), as LVDM trains its 3D U-Net from scratch. Windows are of `prediction.num_frames` LATENT
    frames, and the model records the cache's `box_reduction` (how each latent frame's boxes were made), which the
    rollout reduces a scenario's per-video-frame boxes with. Boxes and day/night come from the cache as they are.

    Raises:
        ConfigError: a cache of another latent space than the preset's; on kl-f8 latents a missing `image_ldm`; on
            3D latents `prediction.frame_stride` != 1 (the rollout on 3D latents has no interpolation stage to fill
            the latent frames a stride would skip).
    """
    from drivesim.datasets.latent_cache import LatentClipDataset
    from drivesim.models.video_ldm import PredictionLDM

    cfg = dataclasses.replace(preset.prediction, data_fps=_cache_fps(data_path),
                              encoder_id=_cache_encoder_id(data_path, preset, "prediction"))
    if preset.latent_space == "kl-f8":
        model = _video_ldm_from_image(PredictionLDM, cfg, image_ldm, "prediction")
    else:
        if cfg.frame_stride != 1:
            raise ConfigError(f"prediction.frame_stride: {cfg.frame_stride}: on latent_space {preset.latent_space!r} "
                              "the prediction model predicts consecutive latent frames (each already stands for "
                              f"{preset.frames_per_latent} video frames, and no interpolation stage fills a stride); "
                              "set --set prediction.frame_stride=1")
        cfg = dataclasses.replace(cfg, box_reduction=_cache_box_reduction(data_path))
        if image_ldm:
            model = _video_ldm_from_image(PredictionLDM, cfg, image_ldm, "prediction")
        else:
            cfg = dataclasses.replace(cfg, temporal=dataclasses.replace(cfg.temporal, train_spatial=True))
            model = PredictionLDM(cfg)
    dataset = LatentClipDataset(data_path, split="train", num_frames=cfg.num_frames, frame_stride=cfg.frame_stride)
    return model, dataset, _tensor_collate


@register_stage("interpolation", help="x4 temporal interpolation video LDM serving both stages (label 0: "
                "stride 4 * interpolation.frame_stride, 1: stride interpolation.frame_stride) on a latent cache.",
                options=_VIDEO_OPTIONS)
def build_interpolation(preset, data_path, image_ldm: str | None = None):
    """`InterpolationLDM.from_image_ldm` + `InterpolationWindows` (both stages, with their stage label)."""
    from drivesim.datasets.keyframes import InterpolationWindows
    from drivesim.models.video_ldm import InterpolationLDM

    cfg = dataclasses.replace(preset.interpolation, data_fps=_cache_fps(data_path),
                              encoder_id=_cache_encoder_id(data_path, preset, "interpolation"))
    model = _video_ldm_from_image(InterpolationLDM, cfg, image_ldm, "interpolation")
    dataset = InterpolationWindows(data_path, split="train", num_frames=cfg.num_frames, frame_stride=cfg.frame_stride)
    return model, dataset, _tensor_collate


# ---- upsampler ---------------------------------------------------------------------------------------


@register_stage("upsampler", help="x4 pixel-space video upsampler (noise-augmented low-res conditioning, temporal "
                "layers) on random patches of clips of a clip-format dataset.",
                options={"frames": "frames per training clip (default upsampler.chunk_frames)",
                         "size": "HxW the high-resolution frames are resized to (default: the videos' own size)"})
def build_upsampler(preset, data_path, frames: str | None = None, size: str | None = None):
    """`Upsampler(preset.upsampler)` + `ClipDataset` clips of `frames` frames (hflip 0.5); the model crops random
    `upsampler.patch_size` patches and makes the low resolution by area downsampling."""
    from drivesim.datasets.torch_data import ClipDataset
    from drivesim.models.upsampler import Upsampler

    cfg = preset.upsampler
    num_frames = _positive_int("frames", frames) if frames else cfg.chunk_frames
    hw = None
    if size:
        try:
            hw = tuple(int(v) for v in size.lower().split("x"))
            if len(hw) != 2 or min(hw) < 1:
                raise ValueError
        except ValueError:
            raise ConfigError(f"--opt: size: expected HxW, e.g. 512x1024, got {size!r}") from None
    dataset = ClipDataset(data_path, "train", num_frames=num_frames, size=hw, hflip_p=0.5)
    return Upsampler(cfg), dataset, _tensor_collate
