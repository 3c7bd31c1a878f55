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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from drivesim.datasets.clips import (
    read_annotation,
    read_video,
)
from drivesim.eval.degradations import DEGRADATIONS, degrade_dataset, degrade_frames  # noqa: F401
from drivesim.eval.results import (  # noqa: F401
    RESULT_SCHEMA,
    RESULT_SCHEMA_VERSION,
    read_result,
    validate_result,
    write_result,
)
from drivesim.eval.windows import (  # noqa: F401
    NUM_FRAMES,
    ClipSample,
    VideoRef,
    Window,
    draw_windows,
    list_videos,
    list_windows,
    load_windows,
    sample_clips,
)

import drivesim
from drivesim.errors import ConfigError, DataError

KVD_NUM_SUBSETS = 100
KVD_MAX_SUBSET_SIZE = 1000
I3D_BATCH = 4  # clips per I3D forward: (4, 16, 224, 224, 3) keeps peak memory under ~1 GiB on CPU
INCEPTION_BATCH = 32  # frames per InceptionV3 forward


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
