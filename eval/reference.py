"""The FVD reference fixture and self-test: our I3D + Frechet distance against the TF FVD reference value.

Fixture: fake = `np.random.RandomState(1).rand(128, 16, 224, 224, 3).astype(float32)`, real = the same with
`RandomState(2)`. The TF reference value 10.13808537 comes from universome/fvd-comparison
(`compare_metrics.py`), which hands these float32 values in [0, 1] *directly* to the TF reference's
`create_id3_embedding` (tf.hub I3D, whose input range is [-1, 1]) and `calculate_fvd` (TF-GAN), without the
reference's `preprocess`. So the network input is the [0, 1] values themselves, not `2 * x - 1`.
Scaling the fixture to 255 * x pixel values and preprocessing maps it to [-1, 1] and gives FVD 24.3335
instead (measured): a different experiment, not a reproduction.

Here the fixture goes through our full pipeline as pixel values `127.5 * (x + 1)`, which `preprocess`
(`2 p / 255 - 1`) maps back to x up to float32 rounding (~1e-7).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np
import torch
from drivesim.eval.features import Progress, i3d_embeddings, progress_reporter
from drivesim.eval.metrics import fvd

REFERENCE_FVD = 10.13808537
REFERENCE_NUM_VIDEOS = 128
FAKE_SEED, REAL_SEED = 1, 2
FIXTURE_SHAPE = (16, 224, 224, 3)  # frames, height, width, channels of every clip


def fixture_chunks(
    seed: int, num_videos: int, chunk: int = 8, clip_shape: tuple[int, ...] = FIXTURE_SHAPE
) -> Iterator[np.ndarray]:
    """The first `num_videos` clips of `RandomState(seed).rand(128, 16, 224, 224, 3).astype(float32)`,
    `chunk` clips at a time (`clip_shape` replaces `(16, 224, 224, 3)`, for tests).

    `rand` fills its output from one stream in C order, so drawing `(chunk, 16, 224, 224, 3)` repeatedly
    yields exactly the values of the single 128-clip draw (tested) with bounded memory.

    Yields:
        `(<= chunk, *clip_shape)` float32 in [0, 1]: the I3D *network input* of the reference experiment.
    """
    rng = np.random.RandomState(seed)
    for start in range(0, num_videos, chunk):
        n = min(chunk, num_videos - start)
        yield rng.rand(n, *clip_shape).astype(np.float32)


def network_input_as_pixels(x: np.ndarray) -> np.ndarray:
    """Pixel values (float32, [0, 255] for x in [-1, 1]) that `i3d.preprocess` maps back to network input x."""
    return (x + np.float32(1.0)) * np.float32(127.5)


def fixture_embeddings(
    seed: int,
    num_videos: int,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    progress: Progress = False,
) -> np.ndarray:
    """I3D embeddings `(num_videos, 400)` float64 of the fixture clips drawn from `RandomState(seed)`."""
    report = progress_reporter(progress, f"I3D on fixture clips (seed {seed})")
    feats = []
    for clips in fixture_chunks(seed, num_videos, chunk=batch_size):
        feats.append(i3d_embeddings(network_input_as_pixels(clips), batch_size=batch_size, device=device))
        report(sum(f.shape[0] for f in feats), num_videos)
    return np.concatenate(feats)


def fvd_selftest(
    num_videos: int = REFERENCE_NUM_VIDEOS,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    progress: Progress = False,
) -> dict:
    """FVD between the fake (seed 1) and real (seed 2) fixture sets of `num_videos` clips each.

    Returns:
        {"fvd", "num_videos", "reference" (10.13808537, or None unless num_videos == 128),
         "difference" (fvd - reference or None), "seconds"}.
    """
    start = time.perf_counter()
    fake = fixture_embeddings(FAKE_SEED, num_videos, batch_size, device, progress)
    real = fixture_embeddings(REAL_SEED, num_videos, batch_size, device, progress)
    value = fvd(real, fake)
    reference = REFERENCE_FVD if num_videos == REFERENCE_NUM_VIDEOS else None
    return {
        "fvd": value,
        "num_videos": num_videos,
        "reference": reference,
        "difference": None if reference is None else value - reference,
        "seconds": time.perf_counter() - start,
    }
