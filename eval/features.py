"""Batched feature extraction: I3D embeddings of videos (FVD, KVD) and Inception pool3 features of frames
(FID, KID). Models are loaded once per process and device."""

from __future__ import annotations

import sys
from collections.abc import Callable

import numpy as np
import torch
from drivesim.eval import i3d as i3d_module
from drivesim.eval import inception as inception_module

Progress = bool | Callable[[int, int], None]

_MODELS: dict[tuple[str, str], torch.nn.Module] = {}


def _model(kind: str, device: str | torch.device) -> torch.nn.Module:
    key = (kind, str(torch.device(device)))
    if key not in _MODELS:
        load = i3d_module.load_i3d if kind == "i3d" else inception_module.load_inception
        _MODELS[key] = load(device)
    return _MODELS[key]


def progress_reporter(progress: Progress, label: str) -> Callable[[int, int], None]:
    """`(done, total)` callback: the given callable, a stderr counter for True, a no-op for False."""
    if callable(progress):
        return progress
    if not progress:
        return lambda done, total: None

    def report(done: int, total: int) -> None:
        end = "\n" if done >= total else ""
        print(f"\r{label}: {done}/{total}", end=end, file=sys.stderr, flush=True)

    return report


def _check_pixels(array: np.ndarray, label: str) -> None:
    if array.dtype == np.uint8:
        return
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"{label} must be uint8 or float pixel values in [0, 255], got dtype {array.dtype}")


def i3d_embeddings(
    videos: np.ndarray,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    progress: Progress = False,
    model: torch.nn.Module | None = None,
) -> np.ndarray:
    """I3D (Kinetics-400) logits averaged over time, the FVD embedding of the TF reference.

    Args:
        videos: `(n, t, h, w, 3)` RGB, uint8, or float with pixel values in [0, 255]; t >= 9 (16 for
            standard FVD). Any array indexable along n (e.g. a memmap) works; batches are converted lazily.
        batch_size: clips per forward pass.
        device: torch device for the network.
        progress: True prints a counter to stderr; a callable gets `(done, total)`.
        model: an `I3D` to use instead of the cached `load_i3d(device)`.
    Returns:
        `(n, 400)` float64.
    Raises:
        ValueError: bad shape or dtype, fewer than 9 frames.
        WeightsError: weights not fetched (run `drivesim eval weights`).
    """
    if videos.ndim != 5 or videos.shape[-1] != 3:
        raise ValueError(f"videos must be (n, t, h, w, 3), got shape {tuple(videos.shape)}")
    _check_pixels(videos, "videos")
    if videos.shape[1] < i3d_module.I3D_MIN_FRAMES:
        raise ValueError(f"I3D needs at least {i3d_module.I3D_MIN_FRAMES} frames per video, got {videos.shape[1]}")
    net = model if model is not None else _model("i3d", device)
    report = progress_reporter(progress, "I3D clips")
    n = videos.shape[0]
    out = np.empty((n, i3d_module.I3D_NUM_CLASSES), dtype=np.float64)
    with torch.inference_mode():
        for start in range(0, n, batch_size):
            batch = torch.from_numpy(np.ascontiguousarray(videos[start : start + batch_size])).to(device)
            logits = net(i3d_module.preprocess(batch))
            out[start : start + batch.shape[0]] = logits.double().cpu().numpy()
            report(min(start + batch_size, n), n)
    return out


def inception_features(
    frames: np.ndarray,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    progress: Progress = False,
    model: torch.nn.Module | None = None,
) -> np.ndarray:
    """InceptionV3 (FID variant) 2048-d pool3 features, pytorch-fid preprocessing.

    Args:
        frames: `(n, h, w, 3)` RGB, uint8, or float with pixel values in [0, 255].
        batch_size: frames per forward pass.
        device: torch device for the network.
        progress: True prints a counter to stderr; a callable gets `(done, total)`.
        model: an `InceptionV3FID` to use instead of the cached `load_inception(device)`.
    Returns:
        `(n, 2048)` float64.
    Raises:
        ValueError: bad shape or dtype.
        WeightsError: weights not fetched (run `drivesim eval weights`).
    """
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be (n, h, w, 3), got shape {tuple(frames.shape)}")
    _check_pixels(frames, "frames")
    net = model if model is not None else _model("inception", device)
    report = progress_reporter(progress, "Inception frames")
    n = frames.shape[0]
    out = np.empty((n, inception_module.INCEPTION_FEATURE_DIM), dtype=np.float64)
    with torch.inference_mode():
        for start in range(0, n, batch_size):
            batch = torch.from_numpy(np.ascontiguousarray(frames[start : start + batch_size])).to(device)
            feats = net(inception_module.preprocess(batch))
            out[start : start + batch.shape[0]] = feats.double().cpu().numpy()
            report(min(start + batch_size, n), n)
    return out
