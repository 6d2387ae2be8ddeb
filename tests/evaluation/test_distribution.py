"""FID against closed forms, KID and MMD against plain-loop estimators."""

import math

import numpy as np
import pytest

from voxgen.errors import VoxgenError
from voxgen.evaluation.distribution import (
    fid,
    frechet_distance,
    gaussian_stats,
    kid,
    median_bandwidth,
    mmd,
    mmd2_unbiased,
    polynomial_kernel,
)


def _spd(d, rng):
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def _with_moments(mean, cov, n, rng):
    """n samples whose sample mean and covariance (ddof=1) are exactly `mean` and `cov`."""
    z = rng.normal(size=(n, len(mean)))
    z -= z.mean(axis=0)
    z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T  # sample covariance = I
    return z @ np.linalg.cholesky(cov).T + mean


def test_frechet_distance_of_diagonal_gaussians_is_the_closed_form():
    rng = np.random.default_rng(0)
    mu_a, mu_b = rng.normal(size=6), rng.normal(size=6)
    var_a, var_b = rng.uniform(0.2, 3, 6), rng.uniform(0.2, 3, 6)
    closed = np.sum((mu_a - mu_b) ** 2) + np.sum((np.sqrt(var_a) - np.sqrt(var_b)) ** 2)
    assert frechet_distance(mu_a, np.diag(var_a), mu_b, np.diag(var_b)) == pytest.approx(closed, abs=1e-9)
    # One dimension: (m1 - m2)^2 + (s1 - s2)^2.
    assert frechet_distance([1.0], [[4.0]], [-2.0], [[9.0]]) == pytest.approx(9.0 + 1.0, abs=1e-12)


def test_frechet_distance_matrix_sqrt_path_matches_the_symmetric_form():
    # Non-commuting covariances: Tr (A B)^(1/2) = Tr (A^(1/2) B A^(1/2))^(1/2), via eigh only.
    rng = np.random.default_rng(1)
    d = 12
    a, b = _spd(d, rng), _spd(d, rng)
    mu_a, mu_b = rng.normal(size=d), rng.normal(size=d)
    w, v = np.linalg.eigh(a)
    root_a = v @ np.diag(np.sqrt(w)) @ v.T
    cross = np.sum(np.sqrt(np.clip(np.linalg.eigvalsh(root_a @ b @ root_a), 0, None)))
    closed = np.sum((mu_a - mu_b) ** 2) + np.trace(a) + np.trace(b) - 2 * cross
    assert not np.allclose(a @ b, b @ a)
    assert frechet_distance(mu_a, a, mu_b, b) == pytest.approx(closed, abs=1e-3)
    assert frechet_distance(mu_a, a, mu_b, b) == pytest.approx(closed, rel=1e-9)


def test_fid_of_two_gaussian_feature_sets_is_their_frechet_distance():
    rng = np.random.default_rng(2)
    d = 8
    mean_a, mean_b = rng.normal(size=d), rng.normal(size=d) + 0.5
    cov_a, cov_b = _spd(d, rng), _spd(d, rng)
    x, y = _with_moments(mean_a, cov_a, 500, rng), _with_moments(mean_b, cov_b, 300, rng)
    assert np.allclose(gaussian_stats(x)[1], cov_a)
    w, v = np.linalg.eigh(cov_a)
    root = v @ np.diag(np.sqrt(w)) @ v.T
    closed = (
        np.sum((mean_a - mean_b) ** 2)
        + np.trace(cov_a)
        + np.trace(cov_b)
        - 2 * np.sum(np.sqrt(np.linalg.eigvalsh(root @ cov_b @ root)))
    )
    assert fid(x, y) == pytest.approx(closed, abs=1e-3)
    assert closed > 1.0


def test_fid_of_large_gaussian_samples_approaches_the_closed_form():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(200_000, 2)) * [1.0, 2.0]
    y = rng.normal(size=(200_000, 2)) * [2.0, 2.0] + [1.0, 0.0]
    closed = 1.0 + (1 - 2) ** 2 + 0.0  # |dmu|^2 + sum (sqrt(a) - sqrt(b))^2
    assert fid(x, y) == pytest.approx(closed, abs=0.03)


def test_fid_of_identical_sets_is_zero_even_with_fewer_samples_than_features():
    rng = np.random.default_rng(4)
    for n, d in ((50, 5), (8, 64)):
        x = rng.normal(size=(n, d))
        scale = np.trace(np.cov(x, rowvar=False))
        assert fid(x, x) <= 1e-6 * scale
        assert fid(x, x + 1.0) == pytest.approx(d, rel=1e-6)  # a shift of 1 in every feature


def _loop_mmd2(x, y, k):
    """The unbiased MMD^2 estimator written out as loops."""
    n, m = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(n) for j in range(m)) / (n * m)
    return xx + yy - 2 * xy


def _cubic(d):
    return lambda u, v: (sum(a * b for a, b in zip(u, v)) / d + 1.0) ** 3


def test_kid_with_whole_sets_is_the_unbiased_estimator():
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(12, 4)), rng.normal(size=(12, 4)) + 0.7
    reference = _loop_mmd2(x.tolist(), y.tolist(), _cubic(4))
    result = kid(x, y, subsets=5, subset_size=1000)
    assert result.subset_size == 12
    assert result.mean == pytest.approx(reference, rel=1e-10)
    assert result.std == pytest.approx(0.0, abs=1e-12)  # every subset is the whole set, reordered
    assert reference > 0.05


def test_kid_subsets_are_seeded_draws_without_replacement():
    rng = np.random.default_rng(6)
    x, y = rng.normal(size=(15, 3)), rng.normal(size=(11, 3)) * 1.5
    result = kid(x, y, subsets=4, subset_size=6, seed=9)
    draws = np.random.default_rng(9)
    values = []
    for _ in range(4):
        ix, iy = draws.choice(15, 6, replace=False), draws.choice(11, 6, replace=False)
        values.append(_loop_mmd2(x[ix].tolist(), y[iy].tolist(), _cubic(3)))
    assert result.mean == pytest.approx(np.mean(values), rel=1e-10)
    assert result.std == pytest.approx(np.std(values), rel=1e-8)
    assert kid(x, y, subsets=4, subset_size=6, seed=9) == result


def test_unbiased_mmd_of_unequal_sizes_matches_loops():
    rng = np.random.default_rng(7)
    x, y = rng.normal(size=(9, 5)), rng.normal(size=(6, 5))
    k = polynomial_kernel
    assert mmd2_unbiased(k(x, x), k(y, y), k(x, y)) == pytest.approx(_loop_mmd2(x.tolist(), y.tolist(), _cubic(5)), rel=1e-10)


def test_rbf_mmd_with_the_median_bandwidth_matches_loops():
    rng = np.random.default_rng(8)
    x, y = rng.normal(size=(10, 3)), rng.normal(size=(7, 3)) + 1.0
    pooled = np.concatenate([x, y]).tolist()
    distances = [math.dist(pooled[i], pooled[j]) for i in range(17) for j in range(i + 1, 17)]
    s = float(np.median(distances))
    assert median_bandwidth(x, y) == pytest.approx(s, rel=1e-12)
    rbf = lambda u, v: math.exp(-(math.dist(u, v) ** 2) / (2 * s * s))
    assert mmd(x, y) == pytest.approx(_loop_mmd2(x.tolist(), y.tolist(), rbf), rel=1e-10)
    assert mmd(x, y, bandwidth=2.0) != pytest.approx(mmd(x, y))


def test_distances_grow_with_the_shift_between_sets():
    rng = np.random.default_rng(10)
    base = rng.normal(size=(200, 6))
    same = rng.normal(size=(200, 6))
    far = rng.normal(size=(200, 6)) + 1.0
    assert fid(base, far) > 10 * fid(base, same)
    assert kid(base, far).mean > 10 * abs(kid(base, same).mean)
    assert mmd(base, far) > 10 * abs(mmd(base, same))


def test_bad_feature_sets_are_user_errors():
    with pytest.raises(VoxgenError, match="feature sizes differ"):
        fid(np.zeros((4, 3)), np.zeros((4, 2)))
    with pytest.raises(VoxgenError, match="at least 2 samples"):
        kid(np.zeros((1, 3)), np.zeros((4, 3)))
    with pytest.raises(VoxgenError, match="NaN"):
        mmd(np.full((3, 2), np.nan), np.zeros((3, 2)))
