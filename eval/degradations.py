"""Degraded copies of real clips (blur, frame shuffle, re-encode): sanity checks that the metrics move the way
they should (`benchmarks/eval_degradations.py`)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from drivesim.datasets.clips import (
    ClipAnnotation,
    load_clip,
    read_manifest,
    write_clip,
    write_manifest,
)

from drivesim.errors import ConfigError, DataError

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
