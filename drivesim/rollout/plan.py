"""Rollout plan arithmetic: key-frame spacing, interpolation stages, units, decode windows; per-unit generators,
sharding over processes, the device of a process."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import torch
from einops import rearrange

from drivesim.errors import ConfigError
from drivesim.rollout.config import FACTOR, MAX_FRAMES, RolloutConfig
from drivesim.rollout.stack import RolloutModels


@dataclass(frozen=True)
class RolloutPlan:
    """Frame arithmetic of one rollout.

    On 3D-autoencoder latents (`frames_per_latent` f > 1, LVDM's base model) "key frames" are the latent frames,
    consecutive (R = 1 latent frame, no interpolation stages, windows of 2 keys that the runner passes through as
    they are), unit 0 is the first prediction clip, unconditional (`context_first` 0: there is no image LDM), and the
    decode windows and the conditioning indices count latent frames; latent frame j decodes to video frames
    f j .. f j + f - 1, of which the first N are written.

    Attributes:
        num_frames: output (video) frames written (N).
        key_spacing: R, output-rate latent frames between consecutive key frames (= output frames for kl-f8).
        stages: interpolation stage labels applied in order (e.g. (0, 1) for R = 16, (1,) for R = 4).
        window_keys: key frames per interpolation window, m + 1 (window of 4m + 1 frames).
        num_keys: key frames generated (K), with (K - 1) a multiple of m and (K - 1) R + 1 >= N (3D: K = ceil(N / f)).
        clip_length: prediction clip length L; context_first / context_later: S of the first / later clips.
        decode_windows: [(start, stop)] decoder chunks over the `num_latents` output-rate latent frames.
        latent_size: (h, w) of the latents; resolution: (h, w) of decoded frames.
        frames_per_latent: f, video frames per latent frame (1: kl-f8; 4: LVDM's 3D autoencoder).
        image_key: unit 0 is the image LDM's key frame 0 (False on 3D latents: unit 0 is the first prediction clip).
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
    frames_per_latent: int = 1
    image_key: bool = True

    @property
    def first_clip_unit(self) -> int:
        """The unit of the first prediction clip (the one with `context_first` context frames)."""
        return 1 if self.image_key else 0

    @property
    def num_latents(self) -> int:
        """Output-rate latent frames decoded: ceil(N / f) (N for kl-f8)."""
        return -(-self.num_frames // self.frames_per_latent)

    @property
    def num_units(self) -> int:
        """Unit 0 (image LDM, unless on 3D latents) + one unit per prediction clip."""
        done = units = self.first_clip_unit
        while done < self.num_keys:
            done += self.clip_length - (self.context_first if units == self.first_clip_unit else self.context_later)
            units += 1
        return units

    @property
    def cond_frames(self) -> int:
        """Output (video) frames the conditioning must cover: the last prediction clip may run past the last key
        frame (its extra key frames are dropped, but they are conditioned on the scenario's continuation); on 3D
        latents whole groups of f frames."""
        return ((self.num_keys - 1 + self.clip_length) * self.key_spacing + 1) * self.frames_per_latent

    def key_positions(self, start: int, count: int) -> list[int]:
        """Output-frame indices of key frames start .. start + count - 1."""
        return [k * self.key_spacing for k in range(start, start + count)]


def make_plan(models: RolloutModels, cfg: RolloutConfig, num_frames: int, resolution: tuple[int, int]) -> RolloutPlan:
    """The frame arithmetic for `num_frames` output frames (see `RolloutPlan`).

    Raises:
        ConfigError: strides that do not compose into x4 stages, a clip/window length the models cannot take, or
            more than MAX_FRAMES frames; on 3D latents a prediction frame_stride other than 1.
    """
    from drivesim.autoencoder.networks import chunk_windows

    if num_frames < 1:
        raise ConfigError(f"rollout: num_frames: must be >= 1, got {num_frames}")
    if num_frames > MAX_FRAMES:  # e.g. MAX_MINUTES at an fps above 60
        raise ConfigError(f"rollout: num_frames: {num_frames} exceeds the limit of {MAX_FRAMES} (frames per rollout)")
    pcfg = models.prediction.config
    f = int(getattr(models.autoencoder, "frames_per_latent", 1))
    first, later = cfg.context_frames
    if f > 1:  # LVDM's base model: consecutive latent frames, the first clip unconditional, no interpolation
        if pcfg.frame_stride != 1:
            raise ConfigError(f"prediction.frame_stride: {pcfg.frame_stride}: on 3D latents the prediction model must "
                              "predict consecutive latent frames (1); no interpolation stage fills a stride")
        spacing, stages, m, first = 1, (), 1, 0
        keys = math.ceil(num_frames / f)
    else:
        icfg = models.interpolation.config
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
                       decode_windows=tuple(chunk_windows(keys if f > 1 else num_frames, chunk, overlap)),
                       latent_size=(h // 8, w // 8), resolution=(h, w), frames_per_latent=f, image_key=f == 1)


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


def crossfade_window(windows: tuple[tuple[int, int], ...], i: int, frames_per_latent: int = 1) -> torch.Tensor:
    """(f (e - s),) float64 blend weights of the video frames decode window i = [s, e) (latent frames) decodes to,
    as `AutoencoderKL.decode` blends its chunks (ramps over the video frames of the overlapping latent frames)."""
    from drivesim.autoencoder.networks import crossfade_weights

    f = frames_per_latent
    s, e = windows[i]
    return crossfade_weights(f * s, f * e, i == 0, i == len(windows) - 1, f * windows[i - 1][1] if i > 0 else f * s,
                              f * windows[i + 1][0] if i + 1 < len(windows) else f * e)


def to_uint8(frames: torch.Tensor) -> np.ndarray:
    """(t, 3, h, w) float in [-1, 1] -> (t, h, w, 3) uint8 (rounded, clipped)."""
    x = ((frames.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return rearrange(x, "t c h w -> t h w c").cpu().numpy()
