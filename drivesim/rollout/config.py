"""Rollout configuration: `RolloutConfig`, its checks and the length limits."""

from __future__ import annotations

import math
from dataclasses import dataclass

from drivesim.errors import ConfigError

MODEL_DIRS = {"autoencoder": ("video_autoencoder", "autoencoder_kl", "video_autoencoder_3d"),
              "image_ldm": ("image_ldm",), "prediction": ("prediction_ldm",), "interpolation": ("interpolation_ldm",),
              "upsampler": ("video_upsampler",)}
"""Sub-folder of the checkpoint dir -> accepted model classes (with a `video_autoencoder_3d` the stack has no image_ldm
and no interpolation folder: `drivesim.rollout.stack.RolloutModels`)."""
STATE_VERSION = 1
FACTOR = 4  # each interpolation stage multiplies the frame rate by 4
# The longest rollout. Frames stream to disk, but the labels (the scenario resampled and extended, then the output
# annotation) and the plan's decode windows are held whole, a few hundred bytes per frame and box, and the mp4
# grows by tens of kB a frame: an hour at 60 fps (0.2 M frames) is within reach of one machine; `--minutes 1e9`
# ran out of memory after loading the models. Refused before anything loads (`check_rollout_length`).
MAX_MINUTES = 60.0
MAX_FRAMES = 216_000  # MAX_MINUTES at 60 fps


@dataclass(frozen=True)
class RolloutConfig:
    """Everything that decides a rollout's frames besides the models, the conditioning and the seed.

    Recorded in the output (`rollout_config.json`) and hashed into the resume state.

    Attributes:
        fps: output frame rate = training-data fps / interpolation.frame_stride (10 for the 10 fps sample data;
            30 for the paper's 30 fps data). None (default): taken from the stack (`resolve_fps`); a value that
            contradicts the stack's recorded training fps is refused. The scenario is resampled to it.
        resolution: (h, w) of the decoded frames; None: the scenario's pixel frame.
        sampler: "ddim" or "dpmpp" (every diffusion model of the rollout).
        steps: sampler steps per model call; None: each model's `diffusion.num_inference_steps`.
        label_guidance: classifier-free guidance scale on boxes + day/night + crowdedness (1 = off).
        context_guidance: context guidance s of the video models, f(z) + s (f(z; c_S) - f(z)); identical to LVDM's
            unconditional guidance (1 + w) eps_c - w eps_u with w = s - 1 (1 = off; LVDM: w = 0.1).
        context_noise_level: LVDM conditional latent perturbation level of context/key latents at sampling (0 =
            no perturbation; LVDM's script: 100).
        keyframe_clip_length: frames per prediction clip (context included); None: prediction.num_frames.
        context_frames: context frames of the first prediction clip and of every later one (Video LDM: 1, 2).
        decode_chunk_frames / decode_chunk_overlap: video-decoder chunking; None: the autoencoder's config.
        upsample: run the x4 upsampler (needs D/upsampler).
        upsample_chunk_frames: frames per upsampler call; None: upsampler.chunk_frames.
        upsample_noise_level: noise-augmentation level g of the upsampler's conditioning.
        segment_crf: x264 CRF of the per-unit segment mp4s (low: the final mp4 is re-encoded from them).
        crf: x264 CRF of the final mp4.
        keep_segments: keep `segments/` after the final mp4 is written.
    """

    fps: float | None = None
    resolution: tuple[int, int] | None = None
    sampler: str = "ddim"
    steps: int | None = None
    label_guidance: float = 1.0
    context_guidance: float = 1.1
    context_noise_level: int = 100
    keyframe_clip_length: int | None = None
    context_frames: tuple[int, int] = (1, 2)
    decode_chunk_frames: int | None = None
    decode_chunk_overlap: int | None = None
    upsample: bool = False
    upsample_chunk_frames: int | None = None
    upsample_noise_level: int = 50
    segment_crf: int = 10
    crf: int = 20
    keep_segments: bool = False


def check_rollout_length(minutes: float | None = None, frames: int | None = None) -> None:
    """Refuse an absurd rollout length up front (before models load), naming the flag and the limit.

    Raises:
        ConfigError: `minutes` not a number or above MAX_MINUTES, `frames` above MAX_FRAMES.
    """
    if minutes is not None and math.isnan(minutes):
        raise ConfigError("--minutes: must be a number, got nan")
    if minutes is not None and minutes > MAX_MINUTES:
        raise ConfigError(f"--minutes: {as_typed(minutes)} exceeds the limit of {as_typed(MAX_MINUTES)} (minutes of "
                          "video per rollout)")
    if frames is not None and frames > MAX_FRAMES:
        raise ConfigError(f"--frames: {frames} exceeds the limit of {MAX_FRAMES} (frames per rollout: "
                          f"{as_typed(MAX_MINUTES)} minutes at 60 fps)")


def as_typed(x: float) -> str:
    """1e9 -> "1e9", 60.0 -> "60", 2.5 -> "2.5": how a user typed it, not Python's repr."""
    if math.isfinite(x) and x == int(x) and abs(x) < 1e6:
        return str(int(x))
    return f"{x:.6g}".replace("e+0", "e").replace("e+", "e").replace("e-0", "e-")


def check_rollout_config(cfg: RolloutConfig, source: str = "rollout config") -> None:
    """Raise `ConfigError` (naming `source` and the field) for an unusable rollout config."""
    if cfg.fps is not None and not (math.isfinite(cfg.fps) and cfg.fps > 0):
        raise ConfigError(f"{source}: fps: must be a positive number, got {cfg.fps}")
    if cfg.sampler not in ("ddim", "dpmpp"):
        raise ConfigError(f"{source}: sampler: must be 'ddim' or 'dpmpp', got {cfg.sampler!r}")
    if cfg.steps is not None and cfg.steps < 1:
        raise ConfigError(f"{source}: steps: must be >= 1, got {cfg.steps}")
    for name in ("label_guidance", "context_guidance"):
        if not math.isfinite(getattr(cfg, name)):
            raise ConfigError(f"{source}: {name}: must be finite")
    if not 0 <= cfg.context_noise_level < 1000:
        raise ConfigError(f"{source}: context_noise_level: must be in [0, 1000), got {cfg.context_noise_level}")
    first, later = cfg.context_frames
    if not (1 <= first and 1 <= later):
        raise ConfigError(f"{source}: context_frames: both must be >= 1, got {cfg.context_frames}")
    if cfg.keyframe_clip_length is not None and cfg.keyframe_clip_length <= max(first, later):
        raise ConfigError(f"{source}: keyframe_clip_length: must exceed the context frames {cfg.context_frames}, "
                          f"got {cfg.keyframe_clip_length}")
    if cfg.resolution is not None and (len(cfg.resolution) != 2 or any(v % 8 or v < 8 for v in cfg.resolution)):
        raise ConfigError(f"{source}: resolution: (h, w) multiples of 8, got {cfg.resolution}")
    if cfg.decode_chunk_frames is not None and cfg.decode_chunk_frames < 1:
        raise ConfigError(f"{source}: decode_chunk_frames: must be >= 1, got {cfg.decode_chunk_frames}")
    if cfg.decode_chunk_overlap is not None and cfg.decode_chunk_overlap < 0:
        raise ConfigError(f"{source}: decode_chunk_overlap: must be >= 0, got {cfg.decode_chunk_overlap}")
    if cfg.upsample_chunk_frames is not None and cfg.upsample_chunk_frames < 1:
        raise ConfigError(f"{source}: upsample_chunk_frames: must be >= 1, got {cfg.upsample_chunk_frames}")
    for name in ("segment_crf", "crf"):
        if not 0 <= getattr(cfg, name) <= 51:
            raise ConfigError(f"{source}: {name}: x264 CRF must be in [0, 51], got {getattr(cfg, name)}")
