"""Distances between two sets of feature vectors (n, F) and (m, F): FID, KID and RBF MMD.

The features come from an extractor (voxgen.evaluation.features); these functions only see
arrays. Everything is computed in float64.

- FID (Heusel et al. 2017): the Fréchet distance between Gaussians fitted to the two sets,
  ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)), covariances with ddof = 1.
- KID (Bińkowski et al. 2018): the unbiased estimator of MMD^2 with the cubic polynomial kernel
  k(x, y) = (x.y / F + 1)^3, averaged over random subsets (see `kid`).
- MMD: the unbiased estimator of MMD^2 (Gretton et al. 2012) with a Gaussian (RBF) kernel
  k(x, y) = exp(-||x - y||^2 / (2 s^2)); the bandwidth s is the median heuristic: the median of
  the Euclidean distances between all distinct pairs of the pooled sets.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import linalg

from voxgen.errors import VoxgenError

# Bińkowski et al. 2018 and the reference implementations (clean-fid, torch-fidelity) use
# 100 subsets of 1000 samples; smaller sets use all the samples of the smaller set per subset.
KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000


def _features(x, name: str, min_rows: int = 2) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise VoxgenError(f"{name}: features must be (samples, features), got shape {x.shape}")
    if len(x) < min_rows:
        raise VoxgenError(f"{name}: needs at least {min_rows} samples per set, got {len(x)}")
    if not np.all(np.isfinite(x)):
        raise VoxgenError(f"{name}: features contain NaN or infinite values")
    return x


def _pair(a, b, name: str) -> tuple[np.ndarray, np.ndarray]:
    a, b = _features(a, name), _features(b, name)
    if a.shape[1] != b.shape[1]:
        raise VoxgenError(f"{name}: feature sizes differ ({a.shape[1]} and {b.shape[1]})")
    return a, b


def gaussian_stats(x) -> tuple[np.ndarray, np.ndarray]:
    """(mean (F,), covariance (F, F)) of features (n, F), covariance with ddof = 1 as FID uses."""
    x = _features(x, "FID")
    return x.mean(axis=0), np.atleast_2d(np.cov(x, rowvar=False))


def frechet_distance(mu_a, cov_a, mu_b, cov_b) -> float:
    """Squared Fréchet (2-Wasserstein) distance between N(mu_a, cov_a) and N(mu_b, cov_b).

    Tr((S_a S_b)^(1/2)) comes from scipy's matrix square root of the product. When the product is
    singular to working precision (fewer samples than features) the square root can fail; then a
    1e-6 ridge is added to both covariances, as in the reference FID code (pytorch-fid).
    """
    mu_a, mu_b = np.atleast_1d(np.asarray(mu_a, np.float64)), np.atleast_1d(np.asarray(mu_b, np.float64))
    cov_a, cov_b = np.atleast_2d(np.asarray(cov_a, np.float64)), np.atleast_2d(np.asarray(cov_b, np.float64))
    if not (mu_a.shape == mu_b.shape and cov_a.shape == cov_b.shape == (len(mu_a), len(mu_a))):
        raise VoxgenError(f"FID: means {mu_a.shape}, {mu_b.shape} and covariances {cov_a.shape}, {cov_b.shape} disagree")
    covmean = linalg.sqrtm(cov_a @ cov_b)
    if not np.all(np.isfinite(covmean)):
        ridge = 1e-6 * np.eye(len(mu_a))
        covmean = linalg.sqrtm((cov_a + ridge) @ (cov_b + ridge))
    # Rounding can leave a tiny imaginary part on a matrix whose square root is real.
    covmean = np.real(covmean)
    diff = mu_a - mu_b
    value = diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2.0 * np.trace(covmean)
    # A distance; rounding of identical sets can go a hair below zero.
    return float(max(value, 0.0))


def fid(a, b) -> float:
    """FID between feature sets a (n, F) and b (m, F)."""
    a, b = _pair(a, b, "FID")
    return frechet_distance(*gaussian_stats(a), *gaussian_stats(b))


def polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(n, m) cubic polynomial kernel (x.y / F + 1)^3 of KID."""
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def rbf_kernel(x: np.ndarray, y: np.ndarray, bandwidth: float) -> np.ndarray:
    """(n, m) exp(-||x - y||^2 / (2 bandwidth^2))."""
    sq = (x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2.0 * x @ y.T
    return np.exp(-np.maximum(sq, 0.0) / (2.0 * bandwidth**2))


def mmd2_unbiased(k_aa: np.ndarray, k_bb: np.ndarray, k_ab: np.ndarray) -> float:
    """Unbiased MMD^2 from kernel matrices: the means of k_aa and k_bb without their diagonals
    minus twice the mean of k_ab (Gretton et al. 2012, eq. 3)."""
    n, m = len(k_aa), len(k_bb)
    within_a = (k_aa.sum() - np.trace(k_aa)) / (n * (n - 1))
    within_b = (k_bb.sum() - np.trace(k_bb)) / (m * (m - 1))
    return float(within_a + within_b - 2.0 * k_ab.mean())


@dataclass(frozen=True)
class KID:
    mean: float
    std: float
    subsets: int
    subset_size: int


def kid(a, b, subsets: int = KID_SUBSETS, subset_size: int = KID_SUBSET_SIZE, seed: int = 0) -> KID:
    """KID between feature sets a (n, F) and b (m, F).

    Each of `subsets` rounds draws min(subset_size, n, m) rows of each set without replacement
    (numpy Generator seeded with `seed`, so the value is reproducible) and computes the unbiased
    MMD^2 with the cubic polynomial kernel; KID is the mean over rounds, `std` their spread.
    """
    a, b = _pair(a, b, "KID")
    size = min(int(subset_size), len(a), len(b))
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(int(subsets)):
        x = a[rng.choice(len(a), size, replace=False)]
        y = b[rng.choice(len(b), size, replace=False)]
        values.append(mmd2_unbiased(polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)))
    return KID(float(np.mean(values)), float(np.std(values)), int(subsets), size)


def median_bandwidth(a: np.ndarray, b: np.ndarray) -> float:
    """Median heuristic: the median Euclidean distance between distinct rows of the pooled sets."""
    pooled = np.concatenate([a, b])
    sq = (pooled * pooled).sum(1)[:, None] + (pooled * pooled).sum(1)[None, :] - 2.0 * pooled @ pooled.T
    upper = np.sqrt(np.maximum(sq[np.triu_indices(len(pooled), k=1)], 0.0))
    bandwidth = float(np.median(upper))
    # All rows equal: any bandwidth gives MMD 0; 1 avoids dividing by zero.
    return bandwidth if bandwidth > 0 else 1.0


def mmd(a, b, bandwidth: float | None = None) -> float:
    """Unbiased MMD^2 with the RBF kernel; `bandwidth` None = the median heuristic."""
    a, b = _pair(a, b, "MMD")
    s = median_bandwidth(a, b) if bandwidth is None else float(bandwidth)
    return mmd2_unbiased(rbf_kernel(a, a, s), rbf_kernel(b, b, s), rbf_kernel(a, b, s))
