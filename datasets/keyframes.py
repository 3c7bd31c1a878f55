"""Training windows of the video LDMs from a latent cache, at each stage's frame stride.

- Prediction: `LatentClipDataset(cache, split, num_frames, frame_stride)` as it is (key frames every
  `frame_stride` source frames; 4 on the 10 fps sample = 2.5 fps, so prediction followed by one x4 interpolation
  stage gives back the source rate).
- Interpolation: `InterpolationWindows` below, which serves both x4 stages of the one interpolation model
  (Video LDM: 1.875 -> 7.5 -> 30 fps) with their stage label.
"""

from __future__ import annotations

from pathlib import Path

import torch
from drivesim.datasets.latent_cache import LatentCache, LatentClipDataset
from torch.utils.data import Dataset

from drivesim.errors import DataError

__all__ = ["InterpolationWindows"]

FACTOR = 4


class InterpolationWindows(Dataset):
    """Windows of `num_frames` (= 4k + 1) latents for the x4 interpolation model, both stages in one dataset.

    Stage 1 (4T -> 16T, the fine stage) takes every `frame_stride`-th source frame; stage 0 (T -> 4T) every
    `4 * frame_stride`-th, so its key frames (every 4th window frame) are 16 * `frame_stride` source frames apart.
    On the 32-frame 10 fps sample clips with stride 1: stage 1 windows span 5 frames (28 per clip), stage 0
    windows 17 frames (16 per clip); both sets are concatenated as they come (no re-balancing). A clip too short
    for the stage-0 span yields no stage-0 windows; a split with no stage-0 window at all is refused (the coarse
    stage would stay untrained).

    Args:
        cache: a `LatentCache` or its path (shared by both stages).
        split: "train" or "val".
        num_frames: window length, 4k + 1.
        frame_stride: stride of the fine stage in source frames.

    Items: those of `LatentClipDataset` plus "interpolation_stage" () int64 (0 or 1) and "frame_stride" () int64.

    Raises:
        DataError: num_frames not 4k + 1, or no window of a stage fits any clip of the split (with the clip length
            needed and the longest found).
    """

    def __init__(self, cache: LatentCache | str | Path, split: str = "train", num_frames: int = 5,
                 frame_stride: int = 1):
        if num_frames < FACTOR + 1 or (num_frames - 1) % FACTOR:
            raise DataError(f"interpolation windows: num_frames: must be 4k + 1 (>= 5), got {num_frames}")
        cache = cache if isinstance(cache, LatentCache) else LatentCache(cache)
        self.stages: list[tuple[int, LatentClipDataset]] = []
        for stage, stride in ((0, FACTOR * frame_stride), (1, frame_stride)):
            try:
                self.stages.append((stage, LatentClipDataset(cache, split, num_frames, stride)))
            except DataError:
                if stage == 1:
                    raise
                # the rollout would use an untrained coarse stage: refuse, with the numbers
                span = (num_frames - 1) * stride + 1
                longest = max((len(cache.read_clip(c)["latents"]) for c in cache.clip_ids(split)), default=0)
                raise DataError(f"{cache.path}: clips: interpolation stage 0 (T -> 4T) needs clips of {span} frames "
                                f"((num_frames - 1) x 4 x frame_stride + 1), the longest {split} clip has {longest}; "
                                "use longer clips or a smaller frame_stride") from None
        self.offsets = [0]
        for _, ds in self.stages:
            self.offsets.append(self.offsets[-1] + len(ds))

    def __len__(self) -> int:
        return self.offsets[-1]

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(index)
        k = next(i for i in range(len(self.stages)) if index < self.offsets[i + 1])
        stage, ds = self.stages[k]
        item = ds[index - self.offsets[k]]
        item["interpolation_stage"] = torch.tensor(stage, dtype=torch.int64)
        item["frame_stride"] = torch.tensor(ds.frame_stride, dtype=torch.int64)
        return item
