"""Evaluation protocols: which frames go into FVD / FID / KVD, how they are sampled, and what a result records.

Protocol (every result record repeats it under "protocol"):

- Windows: a clip of T frames gives the non-overlapping windows starting at 0, 16, 32, ... (`num_frames` = 16),
  i.e. floor(T / 16) windows; a tail shorter than 16 frames is dropped. Clips shorter than 16 frames give no
  window and are skipped (listed in the record). I3D can run on 9 frames, but FVD_16 means 16-frame clips, and
  mixing lengths would change the statistic, so shorter clips are never padded or looped.
- Resize: none here. Frames go to the extractors at their native resolution as uint8 RGB; the extractors
  resize them exactly as the references do (I3D: TF1 bilinear to 224x224, values to [-1, 1]; InceptionV3-FID:
  bilinear to 299x299 with align_corners=False, values to [-1, 1]). The native resolution of each side is
  recorded; all clips of one side must share it.
- Sampling: the windows of a source are listed in manifest order (clip, then start frame). With `n` given,
  each run draws `n` windows without replacement with `numpy.random.default_rng([seed, run])`; without `n`,
  all windows are used (a single run, as n = min(available real, available fake)).
- FVD_16: Frechet distance of the I3D embeddings (400 logits averaged over time) of the real and fake windows.
- FID: Frechet distance of the InceptionV3 pool3 features of every frame of those same windows (n x 16 frames
  per side), so FID and FVD see exactly the same pixels.
- KVD: `kernel_distance` (cubic polynomial kernel, unbiased MMD^2, 100 subsets of size min(1000, n)) of the
  same I3D embeddings; its within-run subset std is recorded next to the across-run std.
- Repeats: when `n` is smaller than what both sides have, `num_runs` independent draws are evaluated and each
  metric is reported as mean and std (ddof=1) over runs; with one run the std is null. Features are computed
  once per distinct window and shared by the runs.

Sources (`real_dir`, `fake_dir`, rollouts) are clip-format folders (a `manifest.json`, optionally restricted
to one split), plain folders of `.mp4` files (e.g. rollouts written without a manifest), or a single video
file.

FVD over time: see `fvd_over_time`.

Results are JSON-able dicts: {"schema": "drivesim-eval-result", "schema_version": 1, "kind": "videos" |
"fvd_over_time", ...}; `validate_result` checks one.
"""

from __future__ import annotations

import datetime as _dt
import functools
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from drivesim.datasets.clips import (
    ClipAnnotation,
    ClipEntry,
    load_clip,
    read_annotation,
    read_manifest,
    read_video,
    write_clip,
    write_manifest,
)

import drivesim
from drivesim.errors import ConfigError, DataError

RESULT_SCHEMA = "drivesim-eval-result"
RESULT_SCHEMA_VERSION = 1
NUM_FRAMES = 16
KVD_NUM_SUBSETS = 100
KVD_MAX_SUBSET_SIZE = 1000
I3D_BATCH = 4  # clips per I3D forward: (4, 16, 224, 224, 3) keeps peak memory under ~1 GiB on CPU
INCEPTION_BATCH = 32  # frames per InceptionV3 forward


# --------------------------------------------------------------------------------------------------------------
# sources and windows
# --------------------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------------------
# feature extractors (injectable, so the protocol is testable without weights)
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Extractors:
    """The feature functions a protocol uses and what to record about them.

    `video`: (n, t, h, w, 3) uint8 -> (n, d) float (I3D embeddings); `frame`: (n, h, w, 3) uint8 -> (n, d')
    (InceptionV3 pool3). `info` goes into the result's protocol. `default_extractors()` gives the real ones.
    """

    video: Callable[[np.ndarray], np.ndarray]
    frame: Callable[[np.ndarray], np.ndarray]
    info: dict[str, Any]


def default_extractors(device: str = "cpu", batch_size: int | None = None) -> Extractors:
    """I3D (Kinetics-400) and InceptionV3-FID from the weight cache.

    Args:
        device: torch device of both networks ("cuda", "cuda:1", "mps", ...): features on another device equal the
            CPU ones up to float rounding (tested to 1e-4).
        batch_size: clips per I3D forward pass and 8x that many frames per InceptionV3 pass (default 4 and 32,
            which keep CPU memory under ~1 GiB; a GPU takes far more). Features do not depend on it (to 1e-4).

    Raises:
        WeightsError: weights absent (the message names `drivesim eval weights`) or failing their sha256.
    """
    from drivesim.eval import features
    from drivesim.eval.weights import SPECS, require_weights, weights_sha256

    require_weights("i3d")
    require_weights("inception")
    i3d, inc = SPECS["i3d"], SPECS["inception"]
    info = {
        "video": {
            "network": "Inception-I3D, Kinetics-400 (tf.hub deepmind/i3d-kinetics-400/1), batch-norm eps 1e-3",
            "embedding": "400 logits averaged over time, before softmax",
            "input": "TF1 bilinear resize to 224x224, values mapped to [-1, 1]",
            "weights_package": f"{i3d.package}=={i3d.version}",
            "weights_file": i3d.member,
            "weights_sha256": weights_sha256("i3d"),
        },
        "frame": {
            "network": "InceptionV3, FID variant (pytorch-fid compatible)",
            "embedding": "2048-d pool3 features",
            "input": "bilinear resize to 299x299 (align_corners=False), values mapped to [-1, 1]",
            "weights_package": f"{inc.package}=={inc.version}",
            "weights_file": inc.member,
            "weights_sha256": weights_sha256("inception"),
            "provenance_caveat": "that these are the 2015-12-05 TF Inception weights of the original FID is the "
                                 "package author's claim; it has not been independently verified",
        },
    }
    video_batch = batch_size or I3D_BATCH
    frame_batch = 8 * batch_size if batch_size else INCEPTION_BATCH
    info["video"].update(device=str(device), batch_size=video_batch)
    info["frame"].update(device=str(device), batch_size=frame_batch)
    return Extractors(functools.partial(features.i3d_embeddings, device=device, batch_size=video_batch),
                      functools.partial(features.inception_features, device=device, batch_size=frame_batch), info)


class _FeatureCache:
    """Features per window key, computed once (runs overlap) in bounded batches."""

    def __init__(self, refs: Sequence[VideoRef], extractors: Extractors, want_frames: bool = True):
        self.refs, self.ex, self.want_frames = list(refs), extractors, want_frames
        self.video: dict[str, np.ndarray] = {}
        self.frame: dict[str, np.ndarray] = {}  # (num_frames, d') per window

    def ensure(self, windows: Sequence[Window]) -> None:
        todo = [w for w in dict.fromkeys(windows) if w.key not in self.video]
        vb = int(self.ex.info.get("video", {}).get("batch_size", I3D_BATCH))
        fb = int(self.ex.info.get("frame", {}).get("batch_size", INCEPTION_BATCH))
        for i in range(0, len(todo), vb * 8):  # decode 8 forward passes' worth of windows at a time, bounded memory
            chunk = todo[i:i + vb * 8]
            clips = load_windows(self.refs, chunk)
            emb = np.concatenate([np.asarray(self.ex.video(clips[j:j + vb]), np.float64)
                                  for j in range(0, len(chunk), vb)])
            for w, e in zip(chunk, emb, strict=True):
                self.video[w.key] = e
            if self.want_frames:
                t = clips.shape[1]
                flat = clips.reshape(-1, *clips.shape[2:])  # (n t) h w c, frames in window order
                feats = np.concatenate([np.asarray(self.ex.frame(flat[j:j + fb]), np.float64)
                                        for j in range(0, len(flat), fb)])
                for k, w in enumerate(chunk):
                    self.frame[w.key] = feats[k * t:(k + 1) * t]

    def video_features(self, windows: Sequence[Window]) -> np.ndarray:
        self.ensure(windows)
        return np.stack([self.video[w.key] for w in windows])

    def frame_features(self, windows: Sequence[Window]) -> np.ndarray:
        self.ensure(windows)
        return np.concatenate([self.frame[w.key] for w in windows])


def _summary(values: list[float]) -> dict[str, Any]:
    arr = np.asarray(values, np.float64)
    return {"mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if len(arr) > 1 else None,
            "runs": [float(v) for v in arr]}


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def _resolution(refs: Sequence[VideoRef], window: Window) -> list[int]:
    """[height, width] of the source (from the window's video)."""
    ref = next(r for r in refs if r.video_id == window.video_id)
    if ref.annotation is not None:
        ann = read_annotation(ref.annotation)
        return [ann.height, ann.width]
    h, w = read_video(ref.video).shape[1:3]
    return [int(h), int(w)]


def _source_record(path: str | Path, split: str | None, refs: Sequence[VideoRef], windows: Sequence[Window],
                   short: Sequence[str]) -> dict[str, Any]:
    return {"path": str(Path(path).resolve()), "split": split, "videos": len(refs), "windows_available": len(windows),
            "skipped_short": list(short), "resolution_hw": _resolution(refs, windows[0])}


# --------------------------------------------------------------------------------------------------------------
# protocols
# --------------------------------------------------------------------------------------------------------------


def evaluate_videos(real_dir: str | Path, fake_dir: str | Path, num_frames: int = NUM_FRAMES, n: int | None = None,
                    num_runs: int = 5, seed: int = 0, split: str | None = None, fake_split: str | None = None,
                    extractors: Extractors | None = None,
                    feature_caches: dict | None = None, device: str = "cpu",
                    batch_size: int | None = None) -> dict[str, Any]:
    """FVD_16, FID on frames and KVD between two sources (protocol in the module docstring).

    Args:
        real_dir, fake_dir: sources (see `list_videos`).
        num_frames: window length (16).
        n: windows per side per run; None uses min(available real, available fake) windows in one run (each side
            draws that many; a side with more windows is subsampled with `seed`).
        num_runs: independent draws when `n` is given and smaller than both sides; forced to 1 otherwise.
        seed: base seed; run r draws with `default_rng([seed, r])` on the real side and `[seed + 1, r]` on the
            fake side (so a source compared with itself does not get identical draws unless it is all windows).
        split, fake_split: clip-format split of the real / fake source (None: all clips).
        extractors: feature functions; None loads I3D and InceptionV3-FID (`default_extractors`).
        feature_caches: a dict to keep per-source features in across calls (keyed by resolved path and split),
            so comparing one real set with several fakes extracts the real features once. Use one dict per
            `extractors`.
        device, batch_size: of the default extractors (see `default_extractors`; ignored with `extractors`).

    Returns:
        A result record (dict, JSON-able): schema, kind "videos", metrics {"fvd", "fid", "kvd"} each with
        mean/std/runs (KVD also "subset_std" per run), "real"/"fake" source records, and "protocol".

    Raises:
        DataError: bad sources. ConfigError: bad n / num_runs. WeightsError: evaluator weights absent.
    """
    from drivesim.eval.metrics import fid, fvd, kernel_distance

    if num_runs < 1:
        raise ConfigError(f"num_runs: must be >= 1, got {num_runs}")
    ex = extractors if extractors is not None else default_extractors(device, batch_size)
    real_refs, fake_refs = list_videos(real_dir, split), list_videos(fake_dir, fake_split)
    real_w, real_short = list_windows(real_refs, num_frames)
    fake_w, fake_short = list_windows(fake_refs, num_frames)
    for src, w, short in ((real_dir, real_w, real_short), (fake_dir, fake_w, fake_short)):
        if len(w) < 2:
            raise DataError(f"{src}: num_frames: {len(w)} windows of {num_frames} frames (need >= 2; "
                            f"{len(short)} videos shorter than {num_frames} frames skipped)")
    n_eff = min(len(real_w), len(fake_w)) if n is None else n
    runs = num_runs if n_eff < min(len(real_w), len(fake_w)) else 1
    caches = feature_caches if feature_caches is not None else {}
    real_key, fake_key = (str(Path(real_dir).resolve()), split), (str(Path(fake_dir).resolve()), fake_split)
    real_cache = caches.setdefault(real_key, _FeatureCache(real_refs, ex))
    fake_cache = caches.setdefault(fake_key, _FeatureCache(fake_refs, ex))
    fvds, fids, kvds, kvd_std = [], [], [], []
    for r in range(runs):
        rw = draw_windows(real_w, None if n_eff == len(real_w) else n_eff, seed, r)
        fw = draw_windows(fake_w, None if n_eff == len(fake_w) else n_eff, seed + 1, r)
        rv, fv = real_cache.video_features(rw), fake_cache.video_features(fw)
        fvds.append(float(fvd(rv, fv)))
        fids.append(float(fid(real_cache.frame_features(rw), fake_cache.frame_features(fw))))
        m, s = kernel_distance(rv, fv, num_subsets=KVD_NUM_SUBSETS, max_subset_size=KVD_MAX_SUBSET_SIZE,
                               seed=seed + r)
        kvds.append(float(m))
        kvd_std.append(float(s))
    kvd = _summary(kvds)
    kvd["subset_std"] = kvd_std
    return {
        "schema": RESULT_SCHEMA,
        "schema_version": RESULT_SCHEMA_VERSION,
        "kind": "videos",
        "metrics": {"fvd": _summary(fvds), "fid": _summary(fids), "kvd": kvd},
        "real": _source_record(real_dir, split, real_refs, real_w, real_short),
        "fake": _source_record(fake_dir, fake_split, fake_refs, fake_w, fake_short),
        "protocol": _protocol(num_frames, n_eff, runs, seed, ex, {
            "fid_frames": f"every frame of the sampled windows ({n_eff * num_frames} per side per run)",
            "kvd": {"kernel": "(x.y/d + 1)^3", "estimator": "unbiased MMD^2", "num_subsets": KVD_NUM_SUBSETS,
                    "max_subset_size": KVD_MAX_SUBSET_SIZE, "features": "I3D embeddings"},
            "sampling": "n windows per side drawn without replacement with numpy default_rng([seed, run]) (real) "
                        "and default_rng([seed + 1, run]) (fake); all windows in order when a side has exactly n",
        }),
    }


def _protocol(num_frames: int, n: int, runs: int, seed: int, ex: Extractors, extra: dict[str, Any]) -> dict:
    return {
        "num_frames": num_frames,
        "windows": f"non-overlapping {num_frames}-frame windows starting at 0, {num_frames}, ...; tails dropped",
        "short_clips": f"videos with fewer than {num_frames} frames are skipped (not padded, not looped)",
        "resize": "none before the extractors (native resolution); I3D resizes to 224x224, InceptionV3 to 299x299",
        "n": n,
        "num_runs": runs,
        "seed": seed,
        "frechet": "|mu1-mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)), covariance with N-1",
        "extractors": ex.info,
        "drivesim_version": drivesim.__version__,
        "date": _now(),
        **extra,
    }


def fvd_over_time(rollouts: str | Path | Sequence[str | Path], real_dir: str | Path, window: int = NUM_FRAMES,
                  pool: int = 1, n_real: int | None = None, seed: int = 0, split: str | None = None,
                  min_videos: int = 2, extractors: Extractors | None = None, device: str = "cpu",
                  batch_size: int | None = None) -> dict[str, Any]:
    """FVD of each non-overlapping `window`-frame time window of long rollouts against real `window`-frame clips.

    Definition (LVDM's per-time-window FVD): time window k covers frames [k * window, (k + 1) * window) of a
    rollout. Its generated distribution is window k of every rollout, pooled with windows k - (pool - 1) // 2
    ... k + pool // 2 (those that exist) when `pool` > 1. The real distribution is `n_real` non-overlapping
    windows sampled from `real_dir` (all of them when None), the same for every k. FVD_k is the Frechet
    distance of their I3D embeddings. A point is computed only when its pooled set has at least `min_videos`
    windows (a covariance needs 2); with R rollouts and pool 1 each point is an FVD over R clips, so R should
    be large (hundreds) for a stable number; one long rollout needs `pool` > 1 (its neighbouring windows then
    stand in for other rollouts, which mixes in some time drift: the record says which was used).

    Args:
        rollouts: one source or a list of sources (see `list_videos`); every video in them is one rollout.
        real_dir: real clips (see `list_videos`), restricted to `split` when given.
        window: window length (16).
        pool: consecutive windows pooled per point (1 = none).
        n_real, seed: real windows drawn with `default_rng([seed, 0])` (all when None).
        min_videos: fewest windows a point needs.
        extractors: feature functions; None loads I3D (and InceptionV3) from the weight cache.

    Returns:
        A result record, kind "fvd_over_time", with "curve": [{"start_frame", "end_frame", "fvd", "num_videos"}]
        and "curve_points": [[start_frame, fvd], ...].

    Raises:
        DataError: bad sources, or no time window with `min_videos` windows. ConfigError: pool or window < 1.
    """
    from drivesim.eval.metrics import fvd

    if pool < 1 or window < 1 or min_videos < 2:
        raise ConfigError(f"pool/window/min_videos: must be >= 1/1/2, got {pool}/{window}/{min_videos}")
    ex = extractors if extractors is not None else default_extractors(device, batch_size)
    sources = [rollouts] if isinstance(rollouts, str | Path) else list(rollouts)
    refs: list[VideoRef] = []
    for s in sources:
        for ref in list_videos(s):
            refs.append(VideoRef(f"{len(refs)}:{ref.video_id}", ref.video, ref.annotation))  # unique across sources
    gen_w, gen_short = list_windows(refs, window)
    if not gen_w:
        raise DataError(f"{sources[0]}: num_frames: no rollout has {window} frames")
    num_windows = max(w.start for w in gen_w) // window + 1
    by_index: dict[int, list[Window]] = {}
    for w in gen_w:
        by_index.setdefault(w.start // window, []).append(w)
    real_refs = list_videos(real_dir, split)
    real_w, real_short = list_windows(real_refs, window)
    if len(real_w) < 2:
        raise DataError(f"{real_dir}: num_frames: {len(real_w)} windows of {window} frames (need >= 2)")
    real_draw = draw_windows(real_w, n_real, seed, 0)
    real_feats = _FeatureCache(real_refs, ex, want_frames=False).video_features(real_draw)
    gen_cache = _FeatureCache(refs, ex, want_frames=False)
    # every window's features up front, in time order: `ensure` decodes a whole video per batch of windows, so
    # filling the cache point by point would decode a long rollout once per window (quadratic in its length)
    gen_cache.ensure(sorted(gen_w, key=lambda w: (w.video_id, w.start)))
    curve = []
    for k in range(num_windows):
        members = [w for j in range(k - (pool - 1) // 2, k + pool // 2 + 1) for w in by_index.get(j, [])]
        if len(members) < min_videos:
            continue
        curve.append({"start_frame": k * window, "end_frame": (k + 1) * window, "num_videos": len(members),
                      "fvd": float(fvd(real_feats, gen_cache.video_features(members)))})
    if not curve:
        raise DataError(f"{sources[0]}: rollouts: no time window has {min_videos} windows; give more rollouts or "
                        f"pool > 1 (have {len(refs)} rollouts, pool {pool})")
    return {
        "schema": RESULT_SCHEMA,
        "schema_version": RESULT_SCHEMA_VERSION,
        "kind": "fvd_over_time",
        "curve": curve,
        "curve_points": [[c["start_frame"], c["fvd"]] for c in curve],
        "rollouts": {"paths": [str(Path(s).resolve()) for s in sources], "videos": len(refs),
                     "skipped_short": gen_short, "resolution_hw": _resolution(refs, gen_w[0])},
        "real": _source_record(real_dir, split, real_refs, real_w, real_short),
        "protocol": _protocol(window, len(real_draw), 1, seed, ex, {
            "definition": "time window k = frames [k*window, (k+1)*window) of every rollout"
                          + (f", pooled with its neighbours over {pool} consecutive windows" if pool > 1 else "")
                          + "; FVD against the same real windows for every k",
            "pool": pool,
            "min_videos": min_videos,
            "sampling": "real windows drawn without replacement with numpy default_rng([seed, 0]); all when n is "
                        "None",
        }),
    }


# --------------------------------------------------------------------------------------------------------------
# result records
# --------------------------------------------------------------------------------------------------------------


def validate_result(record: Any, where: str = "result") -> dict[str, Any]:
    """Check a result record's schema (as read from JSON). Returns it; raises DataError naming the field."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: <root>: expected an object")
    if record.get("schema") != RESULT_SCHEMA:
        raise DataError(f"{where}: schema: expected {RESULT_SCHEMA!r}, got {record.get('schema')!r}")
    version = record.get("schema_version")
    if not isinstance(version, int) or version > RESULT_SCHEMA_VERSION:
        raise DataError(f"{where}: schema_version: {version!r} is not one this drivesim reads "
                        f"(<= {RESULT_SCHEMA_VERSION})")
    kind = record.get("kind")
    if kind == "videos":
        metrics = record.get("metrics")
        if not isinstance(metrics, dict):
            raise DataError(f"{where}: metrics: missing")
        for name in ("fvd", "fid", "kvd"):
            m = metrics.get(name)
            if not isinstance(m, dict) or not isinstance(m.get("mean"), int | float):
                raise DataError(f"{where}: metrics.{name}.mean: missing or not a number")
    elif kind == "fvd_over_time":
        curve = record.get("curve")
        if not isinstance(curve, list) or not curve:
            raise DataError(f"{where}: curve: missing or empty")
        for i, c in enumerate(curve):
            if not isinstance(c, dict) or not isinstance(c.get("start_frame"), int) \
                    or not isinstance(c.get("fvd"), int | float):
                raise DataError(f"{where}: curve[{i}]: needs integer start_frame and numeric fvd")
    else:
        raise DataError(f"{where}: kind: expected 'videos' or 'fvd_over_time', got {kind!r}")
    if not isinstance(record.get("protocol"), dict):
        raise DataError(f"{where}: protocol: missing")
    return record


def write_result(path: str | Path, record: dict[str, Any]) -> None:
    """Write a result record as JSON atomically."""
    from drivesim.datasets.clips import write_json_atomic

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, record)


def read_result(path: str | Path) -> dict[str, Any]:
    """Read and validate a result JSON. Raises DataError naming the file and field."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: result: file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: result: not valid JSON ({e})") from None
    return validate_result(data, str(path))


# --------------------------------------------------------------------------------------------------------------
# degraded copies (sanity checks of the metrics)
# --------------------------------------------------------------------------------------------------------------

DEGRADATIONS = ("blur", "shuffle", "reencode")


def degrade_frames(frames: np.ndarray, kind: str, rng: np.random.Generator, sigma: float = 2.0) -> tuple[
        np.ndarray, np.ndarray]:
    """Degrade one clip.

    Args:
        frames: (t, h, w, 3) uint8 RGB.
        kind: "blur" (Gaussian blur of every frame, std `sigma` pixels, kernel 2*ceil(3 sigma)+1, reflected
            borders), "shuffle" (frames permuted within the clip by `rng`), or "reencode" (unchanged pixels;
            the copy only goes through the codec again, a control for the re-encoding the others also get).
        rng: source of the permutation.

    Returns:
        (degraded frames (t, h, w, 3) uint8, order (t,) int: frame k of the output is frame order[k] of the input).
    """
    import cv2

    t = frames.shape[0]
    if kind == "blur":
        k = 2 * int(np.ceil(3 * sigma)) + 1
        out = np.stack([cv2.GaussianBlur(f, (k, k), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT_101)
                        for f in frames])
        return out, np.arange(t)
    if kind == "shuffle":
        order = rng.permutation(t)
        return frames[order], order
    if kind == "reencode":
        return frames.copy(), np.arange(t)
    raise ConfigError(f"kind: expected one of {', '.join(DEGRADATIONS)}, got {kind!r}")


def degrade_dataset(src: str | Path, dst: str | Path, kind: str = "blur", seed: int = 0, sigma: float = 2.0,
                    split: str | None = None) -> Path:
    """Write a degraded copy of a clip-format dataset (see `degrade_frames`) as a clip-format folder.

    Shuffled clips keep their boxes attached to their frames (the annotation's frames are permuted the same way),
    so the copy stays a valid conditioned dataset. The manifest records the source, kind, sigma and seed. The copy
    is built in a temp folder next to `dst` and renamed, so `dst` is never partial.

    Args:
        src: clip-format folder. dst: output folder; must not exist.
        kind: "blur", "shuffle" or "reencode". seed: permutation seed (clip i uses default_rng([seed, i])).
        split: copy only this split (None: all).

    Returns:
        `dst`.

    Raises:
        DataError: bad source or `dst` exists. ConfigError: unknown kind.
    """
    if kind not in DEGRADATIONS:
        raise ConfigError(f"kind: expected one of {', '.join(DEGRADATIONS)}, got {kind!r}")
    src, dst = Path(src), Path(dst)
    if dst.exists():
        raise DataError(f"{dst}: output: already exists")
    manifest = read_manifest(src)
    entries = manifest.clips if split is None else manifest.split(split)
    if not entries:
        raise DataError(f"{src / 'manifest.json'}: clips: no clips in split {split!r}")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    try:
        for i, entry in enumerate(entries):
            frames, ann = load_clip(entry)
            out, order = degrade_frames(frames, kind, np.random.default_rng([seed, i]), sigma)
            new_ann = ClipAnnotation(ann.clip_id, ann.fps, ann.width, ann.height, ann.night, ann.crowdedness,
                                     f"{ann.source} | degraded: {kind}", [ann.frames[j] for j in order])
            write_clip(tmp, out, new_ann)
        meta = {k: v for k, v in manifest.meta.items() if k not in ("format", "format_version")}
        meta["degraded"] = {"from": str(src.resolve()), "kind": kind, "seed": seed,
                            "sigma": sigma if kind == "blur" else None}
        write_manifest(tmp, [(e.clip_id, e.split) for e in entries], **meta)
        os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst
