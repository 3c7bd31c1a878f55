"""Frechet distance and KID/KVD against closed forms and naive implementations (no weights needed)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
from drivesim.eval.metrics import (
    feature_statistics,
    fid,
    frechet_distance,
    fvd,
    kernel_distance,
    mmd2_unbiased,
    polynomial_kernel,
)


def _random_spd(rng: np.random.Generator, d: int) -> np.ndarray:
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def _trace_sqrt_product_symmetric(s1: np.ndarray, s2: np.ndarray) -> float:
    """Tr((s1 s2)^(1/2)) the TF-GAN way, independent of scipy.linalg.sqrtm: Tr(sqrt(A s2 A)), A = sqrt(s1),
    both roots from a symmetric eigendecomposition."""

    def sym_sqrt(m: np.ndarray) -> np.ndarray:
        w, v = np.linalg.eigh((m + m.T) / 2)
        return (v * np.sqrt(np.clip(w, 0, None))) @ v.T

    a = sym_sqrt(s1)
    return float(np.trace(sym_sqrt(a @ s2 @ a)))


def test_feature_statistics_uses_n_minus_1():
    x = np.array([[0.0, 1.0], [2.0, 3.0], [4.0, 8.0]])
    mu, sigma = feature_statistics(x)
    centred = x - x.mean(axis=0)
    np.testing.assert_allclose(mu, [2.0, 4.0])
    np.testing.assert_allclose(sigma, centred.T @ centred / 2)
    assert sigma[0, 0] == pytest.approx(4.0)  # var of (0, 2, 4) with N - 1


def test_equal_covariances_leave_only_the_mean_term():
    rng = np.random.default_rng(0)
    sigma = _random_spd(rng, 6)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    assert frechet_distance(mu1, sigma, mu2, sigma) == pytest.approx(np.sum((mu1 - mu2) ** 2), rel=1e-9, abs=1e-9)
    assert frechet_distance(mu1, sigma, mu1, sigma) == pytest.approx(0.0, abs=1e-9)


def test_diagonal_covariances_closed_form():
    rng = np.random.default_rng(1)
    a, b = rng.uniform(0.1, 3.0, size=5), rng.uniform(0.1, 3.0, size=5)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)


def test_one_dimensional_case():
    # (m1 - m2)^2 + (s1 - s2)^2 for N(m1, s1^2), N(m2, s2^2)
    assert frechet_distance(np.array([1.0]), np.array([[4.0]]), np.array([-2.0]), np.array([[9.0]])) == pytest.approx(
        9.0 + 1.0
    )


def test_symmetry_and_agreement_with_symmetric_root():
    rng = np.random.default_rng(2)
    s1, s2 = _random_spd(rng, 8), _random_spd(rng, 8)
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    d12, d21 = frechet_distance(mu1, s1, mu2, s2), frechet_distance(mu2, s2, mu1, s1)
    assert d12 == pytest.approx(d21, rel=1e-9)
    independent = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2) - 2 * _trace_sqrt_product_symmetric(s1, s2)
    assert d12 == pytest.approx(independent, rel=1e-9)
    assert d12 > 0


def test_rotation_invariance():
    rng = np.random.default_rng(3)
    s1, s2 = _random_spd(rng, 7), _random_spd(rng, 7)
    mu1, mu2 = rng.normal(size=7), rng.normal(size=7)
    q = scipy.stats.special_ortho_group.rvs(7, random_state=4)
    rotated = frechet_distance(q @ mu1, q @ s1 @ q.T, q @ mu2, q @ s2 @ q.T)
    assert rotated == pytest.approx(frechet_distance(mu1, s1, mu2, s2), rel=1e-9)


def test_rank_deficient_features():
    # 12 samples in 40 dims: both covariances have rank 11, the product is singular
    rng = np.random.default_rng(5)
    x = rng.normal(size=(12, 40))
    shift = rng.normal(size=40)
    # identical covariance, shifted mean: the distance is |shift|^2 (eps * I retry costs 2 * d * eps at most)
    assert fvd(x, x + shift) == pytest.approx(np.sum(shift**2), abs=1e-3)
    assert fvd(x, x) == pytest.approx(0.0, abs=1e-3)
    # two different rank-deficient sets: agrees with the symmetric-root computation
    y = rng.normal(size=(12, 40)) * 1.5 + 0.3
    (mu1, s1), (mu2, s2) = feature_statistics(x), feature_statistics(y)
    independent = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2) - 2 * _trace_sqrt_product_symmetric(s1, s2)
    value = fid(x, y)
    assert np.isfinite(value)
    assert value == pytest.approx(independent, rel=1e-3)


def test_not_covariances_raise():
    # sigma2 with a negative eigenvalue: sqrt of the product is genuinely complex
    with pytest.raises(ValueError, match="imaginary"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.diag([-1.0, 1.0]))
    with pytest.raises(ValueError, match="shape"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match="NaN"):
        fvd(np.full((3, 2), np.nan), np.zeros((3, 2)))


def _mmd2_naive(x: np.ndarray, y: np.ndarray) -> float:
    """Binkowski et al. 2018 eq. (3), written as explicit loops."""
    d = x.shape[1]
    k = lambda a, b: (float(np.dot(a, b)) / d + 1.0) ** 3
    m, n = len(x), len(y)
    kxx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    kyy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    kxy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return kxx + kyy - 2 * kxy


def test_mmd_matches_naive_double_loop():
    rng = np.random.default_rng(6)
    x, y = rng.normal(size=(7, 5)), rng.normal(size=(9, 5)) + 0.5
    assert mmd2_unbiased(x, y) == pytest.approx(_mmd2_naive(x, y), rel=1e-12)
    assert polynomial_kernel(x[:1], y[:1])[0, 0] == pytest.approx((x[0] @ y[0] / 5 + 1) ** 3)


def test_kernel_distance_full_subsets_equal_the_full_estimate():
    # subsets of the full size are permutations, and the unbiased MMD is permutation invariant
    rng = np.random.default_rng(7)
    x, y = rng.normal(size=(10, 4)), rng.normal(size=(10, 4)) * 2
    mean, std = kernel_distance(x, y, num_subsets=5, max_subset_size=50)
    assert mean == pytest.approx(_mmd2_naive(x, y), rel=1e-10)
    assert std == pytest.approx(0.0, abs=1e-10)


def test_kernel_distance_same_distribution_near_zero_shifted_positive():
    rng = np.random.default_rng(8)
    x, y = rng.normal(size=(400, 16)), rng.normal(size=(400, 16))
    same_mean, same_std = kernel_distance(x, y, num_subsets=20, max_subset_size=200, seed=0)
    shifted_mean, _ = kernel_distance(x, y + 1.0, num_subsets=20, max_subset_size=200, seed=0)
    assert abs(same_mean) < 0.02
    assert shifted_mean > 1.0
    assert same_std > 0  # random subsets of 200 out of 400 differ
    # reproducible with the seed, different with another
    assert kernel_distance(x, y, 20, 200, seed=0) == (same_mean, same_std)
    assert kernel_distance(x, y, 20, 200, seed=1) != (same_mean, same_std)
