"""Multi-minute rollouts: hierarchical generation (key frames -> x4 -> x4), streamed to disk, resumable.

Pipeline (Video LDM sec. 3 / LVDM sec. 3.3; SPEC "Rollout"):

1. key frame 0 from the box- and label-conditioned image LDM;
2. key-frame clips of `keyframe_clip_length` frames by the prediction model, the first from 1 context frame
   (key frame 0), every later one from the last 2 key frames, with LVDM's conditional latent perturbation (the
   context diffused to `context_noise_level`) and context guidance s (= LVDM's unconditional guidance
   (1 + w) eps_c - w eps_u with w = s - 1) plus label/box classifier-free guidance;
3. the interpolation model fills 3 frames between consecutive frames, once per x4 stage: key frames are
   `R = prediction.frame_stride / interpolation.frame_stride` output frames apart, so there are log4(R) stages
   (R = 16: stages 0 then 1, Video LDM's 1.875 -> 7.5 -> 30 fps; R = 4: only the fine stage 1, which is what the
   10 fps sample data trains: key frames at 2.5 fps -> 10 fps);
4. the video decoder decodes the output-rate latents in overlapping chunks (the decode windows of
   `AutoencoderKL.decode` over the whole video, cross-faded the same way, so a streamed decode equals the
   one-shot chunked decode);
5. optionally the x4 pixel upsampler, in chunks of `upsample_chunk_frames` decoded frames.

The boxes of every output frame come from the conditioning source (the scenario resampled to the output frame
rate), so they are the labels of the generated video. This module takes the conditioning as a callable and
never reads scenario files itself (`drivesim.pipeline.rollout` does, with `drivesim.datasets.scenario`).

Streaming and memory: work proceeds in units (unit 0: the image-LDM frame; unit u >= 1: one prediction clip and
everything it makes final: its interpolation windows, the decode windows whose latents are complete, the
upsampler chunks). After each unit the new key latents and output-rate latents are written to
`latents/keys_<u>.npy` / `latents/frames_<u>.npy`, the newly final frames to `segments/seg_<u>.mp4` (a closed,
playable mp4 per unit, written by the caller's `segment_writer`), and then the state (a new
`state-<n>.safetensors`, then `state.json` naming it, each temp file + rename: one atomic commit). The working
set is the context window, the key frames not yet interpolated, the latents of the current decode window and the
cross-fade partial sums: it does not grow with the rollout length. The final mp4 is assembled from the segments
at the end (`drivesim.pipeline.rollout`).

Resume: every unit draws its noise from its own generator seeded with (seed, unit index) (`unit_generator`),
and the state holds everything later units read, so a rollout killed at any point and resumed produces the same
latents and frames as an uninterrupted run (same seed, same config, same checkpoints: the state records a hash
of all three and refuses a mismatch).

Checkpoint folder layout (`load_models`): D/autoencoder (video autoencoder; an image autoencoder also works),
D/image_ldm, D/prediction, D/interpolation, optional D/upsampler; each an exported model folder (or a training
run folder) loadable by `drivesim.load`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from einops import rearrange
from torch import nn

from drivesim.configs import to_dict
from drivesim.errors import CheckpointError, ConfigError, WriteError
from drivesim.types import Conditioning

__all__ = ["RolloutConfig", "RolloutModels", "RolloutPlan", "Rollout", "load_models", "init_checkpoint_dir",
           "unit_generator", "shard", "check_rollout_config", "check_rollout_length", "MODEL_DIRS", "STATE_VERSION",
           "MAX_MINUTES", "MAX_FRAMES"]

MODEL_DIRS = {"autoencoder": ("video_autoencoder", "autoencoder_kl"), "image_ldm": ("image_ldm",),
              "prediction": ("prediction_ldm",), "interpolation": ("interpolation_ldm",),
              "upsampler": ("video_upsampler",)}
"""Sub-folder of the checkpoint dir -> accepted model classes."""
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
        raise ConfigError(f"--minutes: {_number(minutes)} exceeds the limit of {_number(MAX_MINUTES)} (minutes of "
                          "video per rollout)")
    if frames is not None and frames > MAX_FRAMES:
        raise ConfigError(f"--frames: {frames} exceeds the limit of {MAX_FRAMES} (frames per rollout: "
                          f"{_number(MAX_MINUTES)} minutes at 60 fps)")


def _number(x: float) -> str:
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


# --------------------------------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------------------------------


@dataclass
class RolloutModels:
    """The models of a rollout (all in eval mode) and where they came from."""

    autoencoder: nn.Module
    image_ldm: nn.Module
    prediction: nn.Module
    interpolation: nn.Module
    upsampler: nn.Module | None = None
    fingerprint: str = ""  # sha256 over the checkpoints' config.json + weights size (resume refuses others)


def _fingerprint(folder: Path) -> str:
    h = hashlib.sha256()
    for name in ("config.json", "model.safetensors"):
        f = folder / name
        if f.is_file():
            h.update(name.encode())
            h.update(f.read_bytes() if name.endswith(".json") else str(f.stat().st_size).encode())
    return h.hexdigest()


def _check_encoder(models: dict[str, nn.Module], name: str, folder: Path) -> None:
    """Refuse a latent model trained on another autoencoder's latents than the stack's autoencoder produces."""
    recorded = getattr(models[name].config, "encoder_id", None) if name != "autoencoder" else None
    if recorded is None or "autoencoder" not in models:
        return
    from drivesim.autoencoder.model import encoder_id

    ae_id = encoder_id(*models["autoencoder"].encoder_fingerprint())
    if recorded != ae_id:
        raise CheckpointError(f"{folder}: encoder_id: {name} was trained on latents of another autoencoder than "
                              f"{folder.parent / 'autoencoder'} ({recorded[:12]}... vs {ae_id[:12]}...)")


def load_models(ckpt_dir: str | Path, upsample: bool = False, device: str | torch.device = "cpu") -> RolloutModels:
    """Load D/autoencoder, D/image_ldm, D/prediction, D/interpolation (+ D/upsampler when `upsample`).

    Raises:
        CheckpointError: a folder is missing or holds another model class, or a latent model was trained on
            another autoencoder's latents (its recorded `encoder_id`) (message names the folder).
    """
    from drivesim.training.checkpoint import latest_checkpoint, load_model

    root = Path(ckpt_dir)
    if not root.is_dir():
        raise CheckpointError(f"{root}: checkpoint dir: folder not found")
    names = [n for n in MODEL_DIRS if n != "upsampler" or upsample]
    models: dict[str, nn.Module] = {}
    h = hashlib.sha256()
    for name in names:
        folder = root / name
        if not folder.is_dir():
            hint = " (needed by --upsample)" if name == "upsampler" else ""
            raise CheckpointError(f"{folder}: {name}: checkpoint folder not found{hint}; the layout is "
                                  f"{root}/{{{','.join(MODEL_DIRS)}}}")
        model = None
        for cls in MODEL_DIRS[name]:
            try:
                model = load_model(folder, cls, device=device)
                break
            except CheckpointError as e:
                if "model_class" not in str(e) or cls == MODEL_DIRS[name][-1]:
                    raise
        models[name] = model
        real = folder if (folder / "config.json").is_file() else latest_checkpoint(folder / "checkpoints") or folder
        _check_encoder(models, name, folder)
        h.update(name.encode())
        h.update(_fingerprint(real).encode())
    return RolloutModels(fingerprint=h.hexdigest(), **models)


def stack_fps(models: RolloutModels) -> float | None:
    """Output frame rate the stack was trained for: the interpolation model's `data_fps / frame_stride`; None when
    its checkpoint does not record `data_fps`.

    Raises:
        ConfigError: the prediction and interpolation models were trained on clips of different frame rates.
    """
    interp, pred = models.interpolation.config, models.prediction.config
    if interp.data_fps is None:
        return None
    if pred.data_fps is not None and abs(pred.data_fps - interp.data_fps) > 1e-6 * interp.data_fps:
        raise ConfigError(f"stack: data_fps: the prediction model was trained on {pred.data_fps:g} fps clips, the "
                          f"interpolation model on {interp.data_fps:g} fps clips")
    return interp.data_fps / interp.frame_stride


def resolve_fps(cfg: RolloutConfig, models: RolloutModels, source: str = "rollout config") -> RolloutConfig:
    """`cfg` with its output fps fixed by the stack (`stack_fps`): filled in when None, checked when given.

    Raises:
        ConfigError: `cfg.fps` contradicts the fps the stack was trained for (a rollout on the wrong timeline writes
            video and boxes 3x too slow or fast, silently), or neither says an fps.
    """
    fps = stack_fps(models)
    if cfg.fps is None:
        if fps is None:
            raise ConfigError(f"{source}: fps: the stack's checkpoints do not record the frame rate they were trained "
                              "at; give it with --set fps=N (training-data fps / interpolation.frame_stride)")
        return dataclasses.replace(cfg, fps=fps)
    if fps is not None and abs(cfg.fps - fps) > 1e-6 * fps:
        interp = models.interpolation.config
        raise ConfigError(f"{source}: fps: {cfg.fps:g} contradicts the stack, trained for {fps:g} fps (clips of "
                          f"{interp.data_fps:g} fps, interpolation frame_stride {interp.frame_stride}); drop the "
                          "setting to follow the stack")
    return cfg


def init_checkpoint_dir(out: str | Path, preset_name: str = "tiny", seed: int = 0, upsampler: bool = True,
                        output_std: float = 0.02, data_fps: float | None = 10.0) -> Path:
    """Write a checkpoint dir of RANDOMLY INITIALISED models of a preset (mechanics tests and benchmarks only:
    the frames are noise-like, the timing and memory are those of the real models).

    The zero-initialised output convolutions are re-drawn with std `output_std` so every network's output
    depends on its input (a zero output would make all frames independent of the context). The video models
    record `data_fps` as training fps (None: not recorded, as in older checkpoints).
    """
    from drivesim.autoencoder import VideoAutoencoder
    from drivesim.configs import get_preset
    from drivesim.models.image_ldm import ImageLDM
    from drivesim.models.upsampler import Upsampler
    from drivesim.models.video_ldm import InterpolationLDM, PredictionLDM
    from drivesim.training.checkpoint import save_model

    preset = get_preset(preset_name)
    torch.manual_seed(seed)
    out = Path(out)
    image = ImageLDM(preset.image_ldm)
    nn.init.normal_(image.unet.out_conv.weight, std=output_std)
    models: dict[str, nn.Module] = {
        "autoencoder": VideoAutoencoder(dataclasses.replace(preset.autoencoder, video_decoder=True)),
        "image_ldm": image,
        "prediction": PredictionLDM.from_image_ldm(image, dataclasses.replace(preset.prediction, data_fps=data_fps)),
        "interpolation": InterpolationLDM.from_image_ldm(image, dataclasses.replace(preset.interpolation,
                                                                                    data_fps=data_fps)),
    }
    if upsampler:
        up = Upsampler(preset.upsampler)
        nn.init.normal_(up.unet.spatial.out_conv.weight, std=output_std)
        models["upsampler"] = up
    for name, model in models.items():
        save_model(model, out / name)
    return out


# --------------------------------------------------------------------------------------------------------------
# plan
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RolloutPlan:
    """Frame arithmetic of one rollout.

    Attributes:
        num_frames: output frames written (N).
        key_spacing: R, output frames between consecutive key frames.
        stages: interpolation stage labels applied in order (e.g. (0, 1) for R = 16, (1,) for R = 4).
        window_keys: key frames per interpolation window, m + 1 (window of 4m + 1 frames).
        num_keys: key frames generated (K), with (K - 1) a multiple of m and (K - 1) R + 1 >= N.
        clip_length: prediction clip length L; context_first / context_later: S of the first / later clips.
        decode_windows: [(start, stop)] decoder chunks over the N output frames.
        latent_size: (h, w) of the latents; resolution: (h, w) of decoded frames.
    """

    num_frames: int
    key_spacing: int
    stages: tuple[int, ...]
    window_keys: int
    num_keys: int
    clip_length: int
    context_first: int
    context_later: int
    decode_windows: tuple[tuple[int, int], ...]
    latent_size: tuple[int, int]
    resolution: tuple[int, int]

    @property
    def num_units(self) -> int:
        """Unit 0 (image LDM) + one unit per prediction clip."""
        done, units = 1, 1
        while done < self.num_keys:
            done += self.clip_length - (self.context_first if units == 1 else self.context_later)
            units += 1
        return units

    @property
    def cond_frames(self) -> int:
        """Output frames the conditioning must cover: the last prediction clip may run past the last key frame
        (its extra key frames are dropped, but they are conditioned on the scenario's continuation)."""
        return (self.num_keys - 1 + self.clip_length) * self.key_spacing + 1

    def key_positions(self, start: int, count: int) -> list[int]:
        """Output-frame indices of key frames start .. start + count - 1."""
        return [k * self.key_spacing for k in range(start, start + count)]


def make_plan(models: RolloutModels, cfg: RolloutConfig, num_frames: int, resolution: tuple[int, int]) -> RolloutPlan:
    """The frame arithmetic for `num_frames` output frames (see `RolloutPlan`).

    Raises:
        ConfigError: strides that do not compose into x4 stages, a clip/window length the models cannot take, or
            more than MAX_FRAMES frames.
    """
    from drivesim.autoencoder.networks import chunk_windows

    if num_frames < 1:
        raise ConfigError(f"rollout: num_frames: must be >= 1, got {num_frames}")
    if num_frames > MAX_FRAMES:  # e.g. MAX_MINUTES at an fps above 60
        raise ConfigError(f"rollout: num_frames: {num_frames} exceeds the limit of {MAX_FRAMES} (frames per rollout)")
    pcfg, icfg = models.prediction.config, models.interpolation.config
    if pcfg.frame_stride % icfg.frame_stride:
        raise ConfigError(f"prediction.frame_stride {pcfg.frame_stride} is not a multiple of interpolation."
                          f"frame_stride {icfg.frame_stride}")
    spacing = pcfg.frame_stride // icfg.frame_stride
    num_stages = round(math.log(spacing, FACTOR)) if spacing > 1 else 0
    if FACTOR ** num_stages != spacing or num_stages > 2:
        raise ConfigError(f"prediction.frame_stride / interpolation.frame_stride = {spacing}: must be 1, 4 or 16 "
                          f"(0, 1 or 2 x4 interpolation stages)")
    stages = (0, 1)[2 - num_stages:]
    m = (icfg.num_frames - 1) // FACTOR
    keys = 1 if num_frames == 1 else math.ceil((num_frames - 1) / spacing) + 1
    keys = 1 + math.ceil((keys - 1) / m) * m if keys > 1 else 1
    length = cfg.keyframe_clip_length or pcfg.num_frames
    first, later = cfg.context_frames
    if length <= max(first, later):
        raise ConfigError(f"rollout: keyframe_clip_length: {length} must exceed the context frames "
                          f"{cfg.context_frames}")
    ae = models.autoencoder.config
    chunk = cfg.decode_chunk_frames or ae.decode_chunk_frames
    overlap = min(ae.decode_chunk_overlap if cfg.decode_chunk_overlap is None else cfg.decode_chunk_overlap,
                  chunk - 1)
    h, w = resolution
    return RolloutPlan(num_frames=num_frames, key_spacing=spacing, stages=stages, window_keys=m + 1, num_keys=keys,
                       clip_length=length, context_first=first, context_later=later,
                       decode_windows=tuple(chunk_windows(num_frames, chunk, overlap)), latent_size=(h // 8, w // 8),
                       resolution=(h, w))


def unit_generator(seed: int, unit: int) -> torch.Generator:
    """The CPU generator of work unit `unit`: seeded from (seed, unit) so a unit's noise never depends on how
    the rollout got there (resume is exact)."""
    state = np.random.SeedSequence([int(seed), int(unit)]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def process_device(device: str, env: dict[str, str] | None = None) -> str:
    """The device of this process under a multi-process launch (`accelerate launch`, `torchrun` set LOCAL_RANK): an
    accelerator named without an index ("cuda") becomes "cuda:<LOCAL_RANK>", so each process takes its own GPU;
    "cpu" and an explicit index ("cuda:1") are kept as given."""
    local = (os.environ if env is None else env).get("LOCAL_RANK")
    if local is None or device == "cpu" or ":" in device:
        return device
    return f"{device}:{int(local)}"


def shard(items: list, rank: int, world_size: int) -> list:
    """Rank-strided share of `items`: rank r gets items r, r + W, r + 2W, ... (every item exactly once)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} not in [0, world_size={world_size})")
    return list(items[rank::world_size])


def _crossfade(windows: tuple[tuple[int, int], ...], i: int) -> torch.Tensor:
    from drivesim.autoencoder.networks import crossfade_weights

    s, e = windows[i]
    return crossfade_weights(s, e, i == 0, i == len(windows) - 1, windows[i - 1][1] if i > 0 else s,
                              windows[i + 1][0] if i + 1 < len(windows) else e)


def to_uint8(frames: torch.Tensor) -> np.ndarray:
    """(t, 3, h, w) float in [-1, 1] -> (t, h, w, 3) uint8 (rounded, clipped)."""
    x = ((frames.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return rearrange(x, "t c h w -> t h w c").cpu().numpy()


# --------------------------------------------------------------------------------------------------------------
# the rollout
# --------------------------------------------------------------------------------------------------------------

CondFn = Callable[[list[int]], Conditioning]
"""Conditioning of output frames at the given indices: boxes (1, len, n, 4) etc., b = 1."""
SegmentWriter = Callable[[Path, np.ndarray, float], None]
"""(path, frames (t, h, w, 3) uint8, fps) -> writes a closed, playable mp4 atomically."""


def _atomic_write(path: Path, tmp: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)`, then rename it to `path`. A failed write (full or read-only disk) removes `tmp` and raises one
    WriteError naming `path`; the state committed before stays the one a resume reads."""
    from safetensors import SafetensorError

    try:
        write(tmp)
        os.replace(tmp, path)
    except (OSError, SafetensorError) as e:
        tmp.unlink(missing_ok=True)
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).removeprefix(
            "Error while serializing: ")
        raise WriteError(f"{path}: write: {reason}; nothing was written") from None
    except BaseException:  # Ctrl-C, SIGTERM (a KeyboardInterrupt in the CLI), any other failure
        tmp.unlink(missing_ok=True)
        raise


def _atomic_json(path: Path, data: Any) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1)
            f.flush()
            os.fsync(f.fileno())

    _atomic_write(path, path.with_name(f".{path.name}.tmp"), write)


def _atomic_npy(path: Path, array: np.ndarray) -> None:
    _atomic_write(path, path.with_name(f".{path.stem}.tmp.npy"), lambda tmp: np.save(tmp, array))


class Rollout:
    """One streamed, resumable rollout into `out_dir` (see the module docstring).

    Args:
        models: `RolloutModels`.
        cfg: `RolloutConfig`.
        cond_fn: output-frame indices -> `Conditioning` (b = 1) of those frames.
        num_frames: output frames N.
        out_dir: folder for latents/, segments/, state.json, state-<n>.safetensors.
        seed: rollout seed.
        segment_writer: writes one segment mp4 (e.g. `drivesim.datasets.clips.write_video`).
        resolution: (h, w) of the decoded frames (before upsampling).
        progress: optional callback (units done, units total, frames written).
    """

    def __init__(self, models: RolloutModels, cfg: RolloutConfig, cond_fn: CondFn, num_frames: int,
                 out_dir: str | Path, seed: int, segment_writer: SegmentWriter, resolution: tuple[int, int],
                 progress: Callable[[int, int, int], None] | None = None):
        check_rollout_config(cfg)
        if cfg.upsample and models.upsampler is None:
            raise ConfigError("rollout config: upsample: true needs an upsampler checkpoint (D/upsampler)")
        self.models, self.cfg, self.cond_fn, self.seed = models, cfg, cond_fn, int(seed)
        self.plan = make_plan(models, cfg, num_frames, resolution)
        self.out = Path(out_dir)
        self.segment_writer = segment_writer
        self.progress = progress
        self.config_hash = hashlib.sha256(json.dumps(
            {"config": to_dict(cfg), "seed": self.seed, "num_frames": num_frames, "resolution": list(resolution),
             "models": models.fingerprint, "state_version": STATE_VERSION}, sort_keys=True).encode()).hexdigest()
        self.stats = {"units_run": 0, "seconds": 0.0}
        self._reset()

    # -- state -----------------------------------------------------------------------------------------------
    def _reset(self) -> None:
        z = torch.zeros((0, 4, *self.plan.latent_size))
        self.unit = 0  # next unit to run
        self.keys = z.clone()  # key latents [keys_base, keys_base + len)
        self.keys_base = 0
        self.keys_done = 0  # key frames generated
        self.interp_key = 0  # first key frame of the next interpolation group
        self.latents = z.clone()  # output-rate latents [lat_base, lat_base + len)
        self.lat_base = 0
        self.lat_done = 0  # output-rate latents produced
        self.window = 0  # next decode window
        self.partial = None  # cross-fade partial sums of frames [final, window end)
        self.partial_w = torch.zeros(0, dtype=torch.float64)
        self.final = 0  # decoded frames final (emitted)
        self.up_pending = None  # decoded frames waiting for a full upsampler chunk
        self.frames_written = 0
        self.segments: list[str] = []
        self.state_seq = 0  # number of the last state written (its tensors file is state-<seq>.safetensors)

    @property
    def state_path(self) -> Path:
        return self.out / "state.json"

    def _save_state(self) -> None:
        from safetensors.torch import save_file

        tensors = {"keys": self.keys.contiguous(), "latents": self.latents.contiguous(),
                   "partial_w": self.partial_w.contiguous()}
        if self.partial is not None:
            tensors["partial"] = self.partial.contiguous()
        if self.up_pending is not None:
            tensors["up_pending"] = self.up_pending.contiguous()
        # the state is one unit: a new tensors file under a new name, then state.json naming it (one atomic rename),
        # then the old tensors file goes. A kill between the two writes leaves state.json naming the previous,
        # still present tensors file: the resume repeats one unit (overwriting one file in place made that gap a
        # state no resume could read)
        self.state_seq += 1
        name = f"state-{self.state_seq:06d}.safetensors"
        _atomic_write(self.out / name, self.out / f".{name}.tmp", lambda tmp: save_file(tensors, str(tmp)))
        meta = {"state_version": STATE_VERSION, "config_hash": self.config_hash, "seed": self.seed,
                "rng": "torch.Generator per unit, seeded from numpy SeedSequence([seed, unit])",
                "unit": self.unit, "num_units": self.plan.num_units, "keys_base": self.keys_base,
                "keys_done": self.keys_done, "interp_key": self.interp_key, "lat_base": self.lat_base,
                "lat_done": self.lat_done, "window": self.window, "final": self.final,
                "frames_written": self.frames_written, "segments": self.segments,
                "tensors_file": name, "state_seq": self.state_seq,
                "tensors_sha256": hashlib.sha256((self.out / name).read_bytes()).hexdigest(),
                "complete": self.done}
        _atomic_json(self.state_path, meta)
        for stale in self.out.glob("state*.safetensors"):
            if stale.name != name:
                stale.unlink()

    def _load_state(self) -> None:
        from safetensors.torch import load_file

        try:
            meta = json.loads(self.state_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{self.state_path}: state: unreadable ({e})") from None
        if meta.get("config_hash") != self.config_hash:
            raise ConfigError(f"{self.state_path}: config_hash: the rollout was started with another config, "
                              "seed, length or checkpoints; resume with the same ones (or use a new --out)")
        blob = self.out / str(meta.get("tensors_file", "state.safetensors"))
        if blob.parent != self.out or not blob.is_file():
            raise CheckpointError(f"{self.state_path}: tensors_file: {blob.name} is missing")
        if hashlib.sha256(blob.read_bytes()).hexdigest() != meta.get("tensors_sha256"):
            raise CheckpointError(f"{blob}: tensors_sha256: does not match state.json")
        self.state_seq = int(meta.get("state_seq", 0))
        t = load_file(str(blob))
        self.keys, self.latents, self.partial_w = t["keys"], t["latents"], t["partial_w"]
        self.partial, self.up_pending = t.get("partial"), t.get("up_pending")
        for k in ("unit", "keys_base", "keys_done", "interp_key", "lat_base", "lat_done", "window", "final",
                  "frames_written", "segments"):
            setattr(self, k, meta[k])

    @property
    def done(self) -> bool:
        return self.final >= self.plan.num_frames and self.up_pending is None

    # -- work ------------------------------------------------------------------------------------------------
    def _sample_kwargs(self, gen: torch.Generator) -> dict:
        c = self.cfg
        return dict(steps=c.steps, sampler=c.sampler, guidance_scale=c.label_guidance,
                    context_guidance=c.context_guidance, context_noise_level=c.context_noise_level, generator=gen)

    def _add_keys(self, new: torch.Tensor) -> None:
        new = new[: self.plan.num_keys - self.keys_done]  # the last clip may run past the last key frame
        self.keys = torch.cat([self.keys, new.cpu()])
        self.keys_done += new.shape[0]

    def _key(self, k: int) -> torch.Tensor:
        return self.keys[k - self.keys_base]

    def _predict_keys(self, gen: torch.Generator) -> None:
        plan, m = self.plan, self.models
        if self.unit == 0:
            cond = self.cond_fn([0])
            z = m.image_ldm.sample(cond, plan.latent_size, steps=self.cfg.steps, sampler=self.cfg.sampler,
                                   guidance_scale=self.cfg.label_guidance, generator=gen)
            self._add_keys(z[0].float())
            return
        s = min(plan.context_first if self.unit == 1 else plan.context_later, self.keys_done)
        start = self.keys_done - s
        cond = self.cond_fn(plan.key_positions(start, plan.clip_length))
        context = torch.stack([self._key(k) for k in range(start, self.keys_done)])[None]
        z = m.prediction.predict(cond, context, **self._sample_kwargs(gen))
        self._add_keys(z[0, s:].float())

    def _interpolate(self, gen: torch.Generator) -> None:
        """Interpolate every complete group of window_keys key frames; append output-rate latents."""
        plan = self.plan
        mk = plan.window_keys - 1
        if plan.num_keys == 1:
            if self.keys_done and self.lat_done == 0:
                self._append_latents(self._key(0)[None])
            return
        while self.interp_key + mk < self.keys_done:
            a = self.interp_key
            frames = torch.stack([self._key(k) for k in range(a, a + mk + 1)])
            spacing = plan.key_spacing
            for stage in plan.stages:
                spacing //= FACTOR
                out = []
                for g in range(0, frames.shape[0] - 1, mk):  # windows of mk + 1 frames, sharing end frames
                    base = a * plan.key_spacing + g * spacing * FACTOR
                    idx = [base + j * spacing for j in range(FACTOR * mk + 1)]
                    z = self.models.interpolation.interpolate(self.cond_fn(idx), frames[g:g + mk + 1][None], stage,
                                                              **self._sample_kwargs(gen))[0].float().cpu()
                    out.append(z if not out else z[1:])
                frames = torch.cat(out)
            last = self.interp_key + mk == plan.num_keys - 1
            self._append_latents(frames if last else frames[:-1])
            self.interp_key += mk
        # key frames before interp_key are no longer needed (the last one of a group starts the next group)
        keep_from = min(self.interp_key, max(0, self.keys_done - plan.context_later))
        self.keys = self.keys[keep_from - self.keys_base:]
        self.keys_base = keep_from

    def _append_latents(self, z: torch.Tensor) -> None:
        z = z[: self.plan.num_frames - self.lat_done]
        self.latents = torch.cat([self.latents, z])
        self.lat_done += z.shape[0]
        self._new_latents.append(z)

    def _decode(self) -> torch.Tensor | None:
        """Decode every window whose latents are complete; return the newly final frames (t, 3, h, w)."""
        plan, ae = self.plan, self.models.autoencoder
        windows = plan.decode_windows
        out = []
        while self.window < len(windows) and windows[self.window][1] <= self.lat_done:
            s, e = windows[self.window]
            lat = self.latents[s - self.lat_base:e - self.lat_base][None].to(next(ae.parameters()).device)
            rec = ae.decode_scaled(lat, num_frames=e - s)[0].float().cpu()
            w = _crossfade(windows, self.window)
            # partial sums cover [final, ...); extend to this window's end
            if self.partial is None:
                self.partial = torch.zeros((0, *rec.shape[1:]))
            need = e - self.final - self.partial.shape[0]
            if need > 0:
                self.partial = torch.cat([self.partial, torch.zeros((need, *rec.shape[1:]))])
                self.partial_w = torch.cat([self.partial_w, torch.zeros(need, dtype=torch.float64)])
            lo = s - self.final
            self.partial[lo:lo + (e - s)] += rec * rearrange(w.float(), "t -> t 1 1 1")
            self.partial_w[lo:lo + (e - s)] += w
            self.window += 1
            upto = windows[self.window][0] if self.window < len(windows) else plan.num_frames
            n = upto - self.final
            if n > 0:
                done = self.partial[:n] / rearrange(self.partial_w[:n].float(), "t -> t 1 1 1")
                out.append(done)
                self.partial, self.partial_w = self.partial[n:], self.partial_w[n:]
                self.final = upto
            # latents before the next window's start are decoded for good
            drop = min(upto, self.lat_done) - self.lat_base
            if drop > 0:
                self.latents = self.latents[drop:]
                self.lat_base += drop
        return torch.cat(out) if out else None

    def _upsample(self, frames: torch.Tensor | None, gen: torch.Generator) -> torch.Tensor | None:
        if not self.cfg.upsample:
            return frames
        up = self.models.upsampler
        chunk = self.cfg.upsample_chunk_frames or up.config.chunk_frames
        pending = frames if self.up_pending is None else (
            self.up_pending if frames is None else torch.cat([self.up_pending, frames]))
        if pending is None:
            return None
        last = self.final >= self.plan.num_frames
        n = pending.shape[0] if last else (pending.shape[0] // chunk) * chunk
        self.up_pending = pending[n:] if n < pending.shape[0] else None
        if n == 0:
            return None
        return up.upsample(pending[:n][None], noise_level=self.cfg.upsample_noise_level, steps=self.cfg.steps,
                           sampler=self.cfg.sampler, chunk_frames=chunk, generator=gen)[0].float().cpu()

    def _run_unit(self) -> None:
        u = self.unit
        gen = unit_generator(self.seed, u)
        self._new_latents: list[torch.Tensor] = []
        keys_before = self.keys_done
        if self.keys_done < self.plan.num_keys:
            self._predict_keys(gen)
        new_keys = self.keys[keys_before - self.keys_base:]
        self._interpolate(gen)
        frames = self._upsample(self._decode(), gen)
        lat_dir, seg_dir = self.out / "latents", self.out / "segments"
        if new_keys.shape[0]:
            _atomic_npy(lat_dir / f"keys_{u:06d}.npy", new_keys.numpy())
        if self._new_latents:
            _atomic_npy(lat_dir / f"frames_{u:06d}.npy", torch.cat(self._new_latents).numpy())
        if frames is not None and frames.shape[0]:
            name = f"seg_{u:06d}.mp4"
            self.segment_writer(seg_dir / name, to_uint8(frames), self.cfg.fps)
            self.segments.append(name)
            self.frames_written += frames.shape[0]
        self.unit += 1
        self._save_state()

    def run(self, resume: bool = False, max_units: int | None = None) -> dict:
        """Run (or continue) the rollout until every frame is written (or `max_units` units ran).

        Returns:
            summary dict: frames_written, segments, units, seconds, resumed_from (unit), complete.
        Raises:
            ConfigError: `out_dir` holds a rollout state but `resume` is False, or the state is of another config.
        """
        resumed_from = 0
        if self.state_path.is_file():  # before any folder is made: a refused resume leaves `out_dir` as it was
            if not resume:
                raise ConfigError(f"{self.state_path}: state: a rollout was already started here; pass --resume to "
                                  "continue it, or choose another --out")
            self._load_state()
            resumed_from = self.unit
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "latents").mkdir(exist_ok=True)
        (self.out / "segments").mkdir(exist_ok=True)
        # files of units after the saved state were written by a killed run: they are regenerated
        for folder in ("latents", "segments"):
            for f in (self.out / folder).iterdir():
                stem = f.stem.split("_")[-1].split(".")[0]
                if f.name.startswith(".") or (stem.isdigit() and int(stem) >= self.unit):
                    f.unlink()
        t0 = time.perf_counter()
        ran = 0
        while not self.done and (max_units is None or ran < max_units):
            self._run_unit()
            ran += 1
            if self.progress:
                self.progress(self.unit, self.plan.num_units, self.frames_written)
        self.stats = {"units_run": ran, "seconds": time.perf_counter() - t0}
        return {"frames_written": self.frames_written, "segments": len(self.segments), "units": self.unit,
                "num_units": self.plan.num_units, "seconds": self.stats["seconds"], "resumed_from": resumed_from,
                "complete": self.done}
