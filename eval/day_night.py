"""Day/night fidelity: does a generated clip look like the label that conditioned it?

A simple classifier fit on REAL frames (scikit-learn logistic regression on colour statistics of the frame: per
channel mean and standard deviation, and the mean of each channel over the top and bottom halves, on [0, 1] pixels)
labels each generated frame; a clip's label is the majority over its frames. Day/night fidelity is the share of
generated clips whose recovered label equals the conditioning one. The classifier's own accuracy on real val clips
is reported beside it (the ceiling).

The classifier is stored as JSON (coefficients, intercept, feature names): nothing is unpickled.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FEATURES = ("mean_r", "mean_g", "mean_b", "std_r", "std_g", "std_b", "top_r", "top_g", "top_b", "bottom_r",
            "bottom_g", "bottom_b")


def frame_features(frames: np.ndarray) -> np.ndarray:
    """(N, h, w, 3) uint8 RGB -> (N, 12) float64 colour statistics on [0, 1] pixels (`FEATURES`)."""
    x = np.asarray(frames, dtype=np.float64) / 255.0
    half = x.shape[1] // 2
    return np.concatenate([x.mean(axis=(1, 2)), x.std(axis=(1, 2)), x[:, :half].mean(axis=(1, 2)),
                           x[:, half:].mean(axis=(1, 2))], axis=1)


@dataclass(frozen=True)
class DayNightClassifier:
    """Logistic regression on `frame_features`: p(night) = sigmoid(features @ coef + intercept)."""

    coef: np.ndarray
    intercept: float

    @classmethod
    def fit(cls, frames: np.ndarray, night: np.ndarray, seed: int = 0) -> DayNightClassifier:
        """Fit on real frames (N, h, w, 3) uint8 and their labels (N,) in {0, 1} (standardised features, C = 1).

        Raises:
            ValueError: only one label present.
        """
        from sklearn.linear_model import LogisticRegression

        night = np.asarray(night).astype(int)
        if len(set(night.tolist())) < 2:
            raise ValueError("day/night classifier: the frames hold only one label")
        x = frame_features(frames)
        mu, sd = x.mean(0), x.std(0) + 1e-8
        model = LogisticRegression(random_state=seed, max_iter=1000).fit((x - mu) / sd, night)
        coef = model.coef_[0] / sd  # fold the standardisation into the weights
        return cls(coef=coef, intercept=float(model.intercept_[0] - (mu * coef).sum()))

    def predict(self, frames: np.ndarray) -> np.ndarray:
        """(N,) int64 labels (1 = night) of (N, h, w, 3) uint8 frames."""
        return (frame_features(frames) @ self.coef + self.intercept > 0).astype(np.int64)

    def clip_labels(self, frames: np.ndarray, clip_of: np.ndarray) -> np.ndarray:
        """Majority label per clip (ties count as night): (num_clips,) int64, clips indexed by `clip_of` (N,)."""
        pred = self.predict(frames)
        clips = int(np.max(clip_of)) + 1
        votes = np.bincount(clip_of, weights=pred, minlength=clips)
        counts = np.bincount(clip_of, minlength=clips)
        return (votes * 2 >= counts).astype(np.int64)

    def save(self, path: str | Path) -> None:
        """Write the classifier as JSON atomically. Raises WriteError naming the file."""
        from drivesim.datasets.clips import write_json_atomic

        write_json_atomic(path, {"kind": "day_night_classifier", "features": list(FEATURES),
                                 "coef": self.coef.tolist(), "intercept": self.intercept})

    @classmethod
    def load(cls, path: str | Path) -> DayNightClassifier:
        """Raises DataError naming the file on a bad or foreign JSON."""
        from drivesim.errors import DataError

        try:
            data = json.loads(Path(path).read_text())
            if data.get("kind") != "day_night_classifier" or data.get("features") != list(FEATURES):
                raise ValueError
            return cls(np.asarray(data["coef"], np.float64), float(data["intercept"]))
        except (OSError, ValueError, KeyError, TypeError):
            raise DataError(f"{path}: not a drivesim day/night classifier JSON") from None
