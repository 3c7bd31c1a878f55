"""torch Datasets over a clip-format folder: windows of frames with their boxes and labels.

Windows: a sample is `num_frames` frames taken every `frame_stride` frames, `frames[start + k * frame_stride]`
for k = 0..num_frames-1. Every start position 0 <= start <= T - 1 - (num_frames - 1) * frame_stride of every
clip (in manifest order) is one sample, so consecutive indices are overlapping windows of the same clip; clips
shorter than the window span contribute nothing (a warning-free skip; `len(ds) == 0` raises DataError).

Decoding: annotations are read and validated when the dataset is built (small JSON, and a bad file should fail
before training starts); each clip's video is decoded on first use, resized once, and kept as uint8 in an LRU
cache of `cache_clips` clips per process (the 128x256 sample is ~3 MB per clip), so training never re-decodes
a clip it has seen unless the cache is smaller than the dataset.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from drivesim.bbox_conditioning.boxes import PackedBoxes
from drivesim.datasets.clips import (
    ClipAnnotation,
    ClipEntry,
    load_clip,
    pack_annotation,
    read_annotation,
    read_manifest,
)
from drivesim.datasets.transforms import RandomHFlip, frames_to_tensor, resize_frames
from torch.utils.data import Dataset

from drivesim.errors import DataError


def enumerate_windows(num_clip_frames: list[int], num_frames: int, frame_stride: int) -> list[tuple[int, int]]:
    """All (clip index, start) pairs whose window `start + k * frame_stride`, k < num_frames, fits in the clip."""
    if num_frames < 1 or frame_stride < 1:
        raise ValueError(f"num_frames and frame_stride must be >= 1, got {num_frames}, {frame_stride}")
    span = (num_frames - 1) * frame_stride + 1
    return [(i, s) for i, n in enumerate(num_clip_frames) for s in range(n - span + 1)]


class ClipDataset(Dataset):
    """Windows of `num_frames` frames (every `frame_stride`-th frame) from a clip-format dataset.

    Args:
        root: dataset folder (with manifest.json).
        split: "train" or "val"; None takes every clip of the dataset.
        num_frames: frames per sample (1 gives single frames for image training, see `FrameDataset`).
        frame_stride: step between the sampled frames, in source frames.
        size: (h, w) to resize frames to (OpenCV INTER_AREA when shrinking), or None to keep the video size.
            Boxes are normalised, so a resize leaves them unchanged.
        max_boxes: box slots per frame; extra boxes are dropped smallest-first (`pack_boxes`).
        hflip_p: probability of mirroring a sample (frames and boxes together); 0 disables augmentation.
        cache_clips: decoded clips kept in memory per process (LRU); None keeps all.

    Each item is a dict:
        "frames" (t, 3, h, w) float32 in [-1, 1]; "boxes" (t, n, 4) float32 normalised xyxy; "classes" (t, n) int64;
        "box_mask" (t, n) bool; "track_ids" (t, n) int64 (-1 padding; stable within a clip); "night" () int64;
        "crowdedness" () int64 (vehicles in the clip); "clip_id" str; "start" int (first source frame).
        The default collate stacks these to the batch layout of `drivesim.types.Conditioning.from_batch`.

    Raises:
        DataError: bad manifest/annotation (at construction), bad video (on first access), empty selection.
    """

    def __init__(self, root: str | Path, split: str | None = "train", num_frames: int = 8, frame_stride: int = 1,
                 size: tuple[int, int] | None = None, max_boxes: int = 16, hflip_p: float = 0.0,
                 cache_clips: int | None = 128):
        self.root = Path(root)
        manifest = read_manifest(self.root)
        self.entries: list[ClipEntry] = manifest.clips if split is None else manifest.split(split)
        if not self.entries:
            raise DataError(f"{self.root / 'manifest.json'}: clips: no clips in split {split!r}")
        self.split, self.num_frames, self.frame_stride = split, num_frames, frame_stride
        self.size = tuple(size) if size is not None else None
        self.max_boxes = max_boxes
        self.annotations: list[ClipAnnotation] = [read_annotation(e.annotation) for e in self.entries]
        self.packed: list[PackedBoxes] = [pack_annotation(a, max_boxes) for a in self.annotations]
        self.windows = enumerate_windows([a.num_frames for a in self.annotations], num_frames, frame_stride)
        if not self.windows:
            raise DataError(f"{self.root / 'manifest.json'}: clips: no clip in split {split!r} has "
                            f"{(num_frames - 1) * frame_stride + 1} frames (num_frames={num_frames}, "
                            f"frame_stride={frame_stride})")
        self.flip = RandomHFlip(hflip_p)
        self.cache_clips = cache_clips
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()

    def __len__(self) -> int:
        return len(self.windows)

    def clip_frames(self, clip: int) -> np.ndarray:
        """Decoded (and resized) frames of clip `clip`: (T, h, w, 3) uint8, from the LRU cache when present."""
        if clip in self._cache:
            self._cache.move_to_end(clip)
            return self._cache[clip]
        frames, _ = load_clip(self.entries[clip])
        if self.size is not None:
            frames = resize_frames(frames, self.size)
        self._cache[clip] = frames
        if self.cache_clips is not None:
            while len(self._cache) > self.cache_clips:
                self._cache.popitem(last=False)
        return frames

    def _labels(self, clip: int, idx: np.ndarray) -> dict:
        p, ann = self.packed[clip], self.annotations[clip]
        return {
            "boxes": torch.from_numpy(p.boxes[idx]),
            "classes": torch.from_numpy(p.classes[idx]),
            "box_mask": torch.from_numpy(p.box_mask[idx]),
            "track_ids": torch.from_numpy(p.track_ids[idx]),
            "night": torch.tensor(ann.night, dtype=torch.int64),
            "crowdedness": torch.tensor(ann.crowdedness, dtype=torch.int64),
            "clip_id": ann.clip_id,
        }

    def __getitem__(self, index: int) -> dict:
        clip, start = self.windows[index]
        idx = start + self.frame_stride * np.arange(self.num_frames)
        sample = {"frames": frames_to_tensor(self.clip_frames(clip)[idx]), **self._labels(clip, idx), "start": start}
        return self.flip(sample)


class FrameDataset(ClipDataset):
    """Single frames for image training: a `ClipDataset` with num_frames = 1 (every frame of every clip).

    Items keep the time axis (t = 1): "frames" (1, 3, h, w), "boxes" (1, n, 4), ... so image and video batches
    share one layout; image models fold it with `rearrange(x, "b t c h w -> (b t) c h w")`.
    """

    def __init__(self, root: str | Path, split: str | None = "train", size: tuple[int, int] | None = None,
                 max_boxes: int = 16, hflip_p: float = 0.0, cache_clips: int | None = 128):
        super().__init__(root, split, num_frames=1, frame_stride=1, size=size, max_boxes=max_boxes,
                         hflip_p=hflip_p, cache_clips=cache_clips)
