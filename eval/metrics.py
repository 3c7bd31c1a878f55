"""FVD / FID / KID / KVD as pure numpy/scipy functions of feature matrices.

- Frechet distance (Heusel et al. 2017, eq. in Sec. 3; FVD: Unterthiner et al. 2018):
  `|mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))` with covariances over N - 1 (as TF-GAN's
  `frechet_classifier_distance_from_activations`, which the TF FVD reference calls, and pytorch-fid's
  `np.cov`). Dividing by N instead gives 10.0628 instead of 10.1381 on the FVD reference fixture.
- Kernel distance (KID: Binkowski et al. 2018; KVD: the same on I3D features): unbiased MMD^2 with the
  cubic polynomial kernel `k(x, y) = (x.y / d + 1)^3`, averaged over random subsets.
"""

from __future__ import annotations

import warnings

import numpy as np
import scipy.linalg


def _as_features(x: np.ndarray, label: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"{label} must be (n, d) features, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{label} contains NaN or inf")
    return x


def feature_statistics(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (normalised by N - 1) of features.

    Args:
        x: `(n, d)` features, n >= 2, any float dtype (computed in float64).
    Returns:
        mu `(d,)` float64, sigma `(d, d)` float64.
    Raises:
        ValueError: not 2-D, fewer than 2 rows, or non-finite values.
    """
    x = _as_features(x, "features")
    if x.shape[0] < 2:
        raise ValueError(f"need at least 2 feature vectors for a covariance, got {x.shape[0]}")
    return x.mean(axis=0), np.cov(x, rowvar=False, ddof=1).reshape(x.shape[1], x.shape[1])


def _sqrtm(a: np.ndarray) -> tuple[np.ndarray, bool]:
    """`scipy.linalg.sqrtm(a)` and whether scipy reported `a` singular (it warns, and the root may be off)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        root = scipy.linalg.sqrtm(a)
    singular = any("singular" in str(w.message).lower() for w in caught)
    return root, singular


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """Frechet distance between the Gaussians N(mu1, sigma1) and N(mu2, sigma2).

    `d^2 = |mu1 - mu2|^2 + Tr(sigma1) + Tr(sigma2) - 2 Tr((sigma1 sigma2)^(1/2))`.
    The matrix square root is `scipy.linalg.sqrtm`; if the product is singular (scipy says so, or the root
    is not finite) eps * I is added to both covariances and the root recomputed (pytorch-fid's rule). The
    root of a product of PSD matrices has real eigenvalues, so a small imaginary part is rounding noise and
    dropped; a large one means the inputs are not covariances.

    Args:
        mu1, mu2: `(d,)` means. sigma1, sigma2: `(d, d)` covariances.
        eps: diagonal offset used only when the product is singular.
    Returns:
        the distance (squared units of the features), float.
    Raises:
        ValueError: shape mismatch, or an imaginary part with |max diag| > 1e-3.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(
            f"shape mismatch: mu1 {mu1.shape}, mu2 {mu2.shape}, sigma1 {sigma1.shape}, sigma2 {sigma2.shape}"
        )
    diff = mu1 - mu2
    covmean, singular = _sqrtm(sigma1 @ sigma2)
    if singular or not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean, _ = _sqrtm((sigma1 + offset) @ (sigma2 + offset))
        if not np.isfinite(covmean).all():
            raise ValueError("sqrtm(sigma1 @ sigma2) is not finite even with eps * I added")
    if np.iscomplexobj(covmean):
        max_imag = np.max(np.abs(np.diagonal(covmean).imag))
        if max_imag > 1e-3:
            raise ValueError(f"sqrtm(sigma1 @ sigma2) has an imaginary component {max_imag:.3g}")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def frechet_distance_from_features(real: np.ndarray, fake: np.ndarray) -> float:
    """Frechet distance between the Gaussian fits (N - 1 covariance) of two `(n, d)` feature sets."""
    real, fake = _as_features(real, "real features"), _as_features(fake, "fake features")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature dims differ: real {real.shape[1]}, fake {fake.shape[1]}")
    return frechet_distance(*feature_statistics(real), *feature_statistics(fake))


def fvd(real_feats: np.ndarray, fake_feats: np.ndarray) -> float:
    """Frechet Video Distance from I3D logits `(n, 400)` of real and generated clips (TF FVD reference)."""
    return frechet_distance_from_features(real_feats, fake_feats)


def fid(real_feats: np.ndarray, fake_feats: np.ndarray) -> float:
    """Frechet Inception Distance from InceptionV3 pool3 features `(n, 2048)` of real and generated frames."""
    return frechet_distance_from_features(real_feats, fake_feats)


def polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Cubic polynomial kernel `k(x, y) = (x.y / d + 1)^3`; `(n, d), (m, d) -> (n, m)` float64."""
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 with the cubic polynomial kernel (Binkowski et al. 2018, eq. 3): the within-set kernel
    means exclude the diagonal (i == j) terms, the cross term uses all pairs."""
    m, n = x.shape[0], y.shape[0]
    if m < 2 or n < 2:
        raise ValueError(f"need at least 2 samples per set, got {m} and {n}")
    k_xx, k_yy, k_xy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    within_x = (k_xx.sum() - np.trace(k_xx)) / (m * (m - 1))
    within_y = (k_yy.sum() - np.trace(k_yy)) / (n * (n - 1))
    return float(within_x + within_y - 2.0 * k_xy.mean())


def kernel_distance(
    x: np.ndarray, y: np.ndarray, num_subsets: int = 100, max_subset_size: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """KID / KVD: unbiased MMD^2 (cubic polynomial kernel) averaged over random subsets.

    Each of `num_subsets` draws takes `min(max_subset_size, len(x), len(y))` rows without replacement from
    each set (a `numpy.random.default_rng(seed)` stream, so results are reproducible).

    Args:
        x, y: `(n, d)` and `(m, d)` features (real and generated).
    Returns:
        (mean, std) of the subset estimates; std is the population std over subsets (0 for one subset).
    Raises:
        ValueError: bad shapes, fewer than 2 rows, non-finite values, num_subsets < 1.
    """
    x, y = _as_features(x, "x"), _as_features(y, "y")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"feature dims differ: {x.shape[1]} vs {y.shape[1]}")
    if num_subsets < 1:
        raise ValueError(f"num_subsets must be >= 1, got {num_subsets}")
    size = min(max_subset_size, x.shape[0], y.shape[0])
    rng = np.random.default_rng(seed)
    estimates = np.empty(num_subsets)
    for i in range(num_subsets):
        xs = x[rng.choice(x.shape[0], size, replace=False)]
        ys = y[rng.choice(y.shape[0], size, replace=False)]
        estimates[i] = mmd2_unbiased(xs, ys)
    return float(estimates.mean()), float(estimates.std())
