"""Evaluation sources and windows: which frames go into FVD / FID / KVD (the protocol in `drivesim.eval.protocols`).

A source is a clip-format folder (a `manifest.json`, optionally restricted to one split), a plain folder of `.mp4`
files or a single video file; a clip of T frames gives the non-overlapping windows starting at 0, 16, 32, ...
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from drivesim.datasets.clips import (
    ClipEntry,
    load_clip,
    read_annotation,
    read_manifest,
    read_video,
)

from drivesim.errors import ConfigError, DataError

NUM_FRAMES = 16


@dataclass(frozen=True)
class VideoRef:
    """One video of a source: its file, its annotation (None for bare mp4s) and an id unique within the source."""

    video_id: str
    video: Path
    annotation: Path | None


@dataclass(frozen=True)
class Window:
    """Frames [start, start + num_frames) of one video."""

    video_id: str
    start: int
    num_frames: int

    @property
    def key(self) -> str:
        return f"{self.video_id}@{self.start}"


@dataclass
class ClipSample:
    """Windows sampled from one source.

    Attributes:
        videos: (n, num_frames, h, w, 3) uint8 RGB, in the order of `windows`.
        windows: which video and start frame each row came from.
        skipped_short: ids of videos with fewer than `num_frames` frames (they give no window).
        available: how many windows the source has in total.
    """

    videos: np.ndarray
    windows: list[Window]
    skipped_short: list[str]
    available: int


def list_videos(source: str | Path, split: str | None = None) -> list[VideoRef]:
    """The videos of a source in a fixed order.

    Args:
        source: a clip-format folder (manifest order), a folder of `.mp4` files (sorted by name; a `<stem>.json`
            next to one is taken as its annotation), or one video file.
        split: with a clip-format folder, keep only that split ("train"/"val"); None keeps all.

    Raises:
        DataError: the source does not exist, has no videos, or `split` selects nothing.
    """
    source = Path(source)
    if source.is_file():
        ann = source.with_suffix(".json")
        return [VideoRef(source.stem, source, ann if ann.is_file() else None)]
    if not source.is_dir():
        raise DataError(f"{source}: source: not a clip-format folder, a folder of .mp4 files or a video file")
    if (source / "manifest.json").is_file():
        manifest = read_manifest(source)
        entries = manifest.clips if split is None else manifest.split(split)
        if not entries:
            raise DataError(f"{source / 'manifest.json'}: clips: no clips in split {split!r}")
        return [VideoRef(e.clip_id, e.video, e.annotation) for e in entries]
    if split is not None:
        raise DataError(f"{source}: split: {split!r} given but the folder has no manifest.json")
    mp4s = sorted(source.glob("*.mp4"))
    if not mp4s:
        raise DataError(f"{source}: source: no manifest.json and no .mp4 files")
    return [VideoRef(p.stem, p, p.with_suffix(".json") if p.with_suffix(".json").is_file() else None) for p in mp4s]


def _num_frames(ref: VideoRef) -> int:
    """Frame count from the annotation when there is one (no decoding), else by decoding."""
    if ref.annotation is not None:
        return read_annotation(ref.annotation).num_frames
    return int(read_video(ref.video).shape[0])


def _decode(ref: VideoRef) -> np.ndarray:
    if ref.annotation is not None:
        frames, _ = load_clip(ClipEntry(ref.video_id, ref.video, ref.annotation, "val"))
        return frames
    return read_video(ref.video)


def list_windows(refs: Sequence[VideoRef], num_frames: int = NUM_FRAMES) -> tuple[list[Window], list[str]]:
    """All non-overlapping `num_frames` windows of `refs` (video order, then start), and the ids skipped as short."""
    windows, short = [], []
    for ref in refs:
        t = _num_frames(ref)
        if t < num_frames:
            short.append(ref.video_id)
        windows.extend(Window(ref.video_id, s, num_frames) for s in range(0, t - num_frames + 1, num_frames))
    return windows, short


def draw_windows(windows: Sequence[Window], n: int | None, seed: int, run: int = 0) -> list[Window]:
    """Draw `n` of `windows` without replacement (all of them, in order, when `n` is None).

    The generator is `numpy.random.default_rng([seed, run])`, so run r of seed s is the same on every machine;
    the drawn windows are returned sorted in source order (the order does not change any metric).

    Raises:
        ConfigError: n < 2 or n larger than len(windows).
    """
    if n is None:
        return list(windows)
    if n < 2:
        raise ConfigError(f"n: need at least 2 clips for a covariance, got {n}")
    if n > len(windows):
        raise ConfigError(f"n: {n} clips requested but the source has only {len(windows)} windows")
    idx = np.sort(np.random.default_rng([seed, run]).choice(len(windows), size=n, replace=False))
    return [windows[i] for i in idx]


def load_windows(refs: Sequence[VideoRef], windows: Sequence[Window]) -> np.ndarray:
    """Decode the frames of `windows` (each video decoded once).

    Returns:
        (len(windows), num_frames, h, w, 3) uint8 RGB.

    Raises:
        DataError: unreadable video, or videos of different resolutions (names both).
    """
    by_id = {r.video_id: r for r in refs}
    needed: dict[str, list[int]] = {}
    for i, w in enumerate(windows):
        needed.setdefault(w.video_id, []).append(i)
    out: np.ndarray | None = None
    first: str = ""
    for vid, rows in needed.items():
        frames = _decode(by_id[vid])
        if out is None:
            out = np.empty((len(windows), windows[0].num_frames, *frames.shape[1:]), np.uint8)
            first = str(by_id[vid].video)
        elif frames.shape[1:] != out.shape[2:]:
            raise DataError(f"{by_id[vid].video}: resolution: {frames.shape[2]}x{frames.shape[1]} differs from "
                            f"{first} ({out.shape[3]}x{out.shape[2]}); one source must have one resolution")
        for i in rows:
            w = windows[i]
            if w.start + w.num_frames > frames.shape[0]:
                raise DataError(f"{by_id[vid].video}: num_frames: window at {w.start} needs {w.num_frames} frames, "
                                f"video has {frames.shape[0]}")
            out[i] = frames[w.start:w.start + w.num_frames]
    if out is None:
        raise DataError("windows: nothing to load")
    return out


def sample_clips(source: str | Path, num_frames: int = NUM_FRAMES, n: int | None = None, seed: int = 0,
                 split: str | None = None, run: int = 0) -> ClipSample:
    """Sample `n` non-overlapping `num_frames`-frame windows from a clip-format folder, a rollout folder or a video.

    Args:
        source: see `list_videos`.
        num_frames: window length (16 for FVD_16).
        n: windows to draw without replacement; None takes every window.
        seed, run: the draw uses `numpy.random.default_rng([seed, run])` (see `draw_windows`).
        split: restrict a clip-format folder to "train" or "val".

    Returns:
        A `ClipSample`; `videos` is (n, num_frames, h, w, 3) uint8 RGB at the source's native resolution.

    Raises:
        DataError: bad source, no window long enough, mixed resolutions. ConfigError: n out of range.
    """
    refs = list_videos(source, split)
    windows, short = list_windows(refs, num_frames)
    if not windows:
        raise DataError(f"{source}: num_frames: no video has {num_frames} frames ({len(short)} shorter ones skipped)")
    chosen = draw_windows(windows, n, seed, run)
    return ClipSample(load_windows(refs, chosen), chosen, short, len(windows))
