"""Size-bin vectors of tumour masks: the conditioning of masks on tumour sizes (brain metastases).

A mask is summarised by how many tumours it holds in each of 7 size bins. The bins are
aligned with the response criteria for brain metastases, RANO-BM (Lin et al., Lancet Oncology
2015), which call a lesion measurable from a longest diameter of 10 mm: 10 mm is a bin edge,
three bins split the small, non-measurable lesions a generator must also produce, and sizes
from 30 mm up share one overflow bin. RANO-BM measures the longest diameter in an axial
slice; the 3D Feret diameter used here is never smaller than it.

    bin    0       1       2        3         4         5         6
    mm   [0, 3)  [3, 6)  [6, 10)  [10, 15)  [15, 20)  [20, 30)  [30, inf)

Definitions, in the order they are applied:

- **Tumour voxels.** A voxel is tumour when its value is greater than `threshold` (default 0);
  a boolean mask is used as it is. A threshold of 0 separates every encoding voxgen meets: masks
  on disk ({0, 1} or integer labels), masks in model space ({-1, 1}, -1 background) and
  generated masks, which are soft values in [-1, 1] whose midpoint is 0. Pass `threshold=0.5`
  for a probability map in [0, 1].
- **One tumour** is one 3D connected component of the tumour voxels, with 26-connectivity:
  two voxels that share a face, an edge or a corner belong to the same tumour. A lesion that
  crosses slices obliquely (or is resampled with nearest neighbours) often meets the next
  slice only at an edge or corner; 6-connectivity would split it into several small tumours.
  So two tumours that touch in any way, in depth included, are one tumour.
- **Its size** is its 3D Feret diameter in mm: the largest distance between the *centres* of
  two of its voxels, with each voxel axis scaled by its spacing. The voxel extent is not
  added, so a one-voxel tumour measures 0 mm and two face-adjacent voxels measure one voxel
  spacing; both always land in bin 0. The diameter is taken over the vertices of the convex
  hull of the component (the farthest pair of a point set is always a pair of hull vertices),
  after dropping voxels that lie midway between two neighbours, which can never be vertices.
  Diameters are rounded to 1e-6 mm, so floating-point noise cannot push a size that lies on an
  edge into the bin below it.
- **Spacing** is (sx, sy, sz) in mm, the lengths of the first three columns of the NIfTI
  affine, which maps (x, y, z) voxel indices to mm. The arrays are voxgen's (D, H, W) = (z, y, x)
  volumes (`voxgen.data.nifti`), so sz applies to axis 0 and sx to axis 2. Column lengths give
  exact distances for any affine made of a rotation and per-axis scales (no shear).
- **Counts** per bin are capped at `MAX_COUNT` (10): eleven tiny tumours read as ten.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError
from scipy.spatial.distance import cdist

from voxgen.errors import ConfigError, DataError

BIN_EDGES_MM = (0, 3, 6, 10, 15, 20, 30)
# One bin per edge: [0, 3), ..., [20, 30), and the overflow bin [30, inf).
NUM_BINS = len(BIN_EDGES_MM)
MAX_COUNT = 10
# Voxels above this value are tumour: the midpoint of model space's {-1, 1}, and "> 0" for
# masks on disk ({0, 1} or labels).
DEFAULT_THRESHOLD = 0.0
# Diameters are rounded to this many decimals of a mm before binning.
DIAMETER_DECIMALS = 6
# 26-connectivity: face, edge and corner neighbours (see the module docstring).
CONNECTIVITY = np.ones((3, 3, 3), dtype=bool)
# Below this many candidate points, all pairs are compared directly instead of building a hull.
BRUTE_FORCE_POINTS = 64
# Rows of the distance matrix computed at a time, to bound memory for very large tumours.
DISTANCE_CHUNK = 2048


def voxel_spacing(affine) -> tuple[float, float, float]:
    """(sx, sy, sz) in mm: the lengths of the first three columns of a 4x4 (or 3x3) affine."""
    matrix = np.asarray(affine, dtype=np.float64)
    if matrix.shape not in ((4, 4), (3, 3)):
        raise DataError(f"affine has shape {tuple(matrix.shape)}; expected a 4x4 (or 3x3) matrix")
    return _checked_spacing(np.linalg.norm(matrix[:3, :3], axis=0), "affine column lengths")


def _checked_spacing(spacing, what: str = "spacing") -> tuple[float, float, float]:
    """Spacing as 3 positive finite floats, or DataError."""
    try:
        values = np.asarray(spacing, dtype=np.float64)
    except (TypeError, ValueError):
        raise DataError(f"{what} {spacing!r} is not 3 numbers (sx, sy, sz) in mm") from None
    if values.shape != (3,):
        raise DataError(f"{what} has shape {values.shape}; expected 3 numbers (sx, sy, sz) in mm")
    if not (np.isfinite(values).all() and (values > 0).all()):
        raise DataError(f"{what} {tuple(float(v) for v in values)} must be 3 positive finite numbers in mm")
    return float(values[0]), float(values[1]), float(values[2])


def _tumour_voxels(mask, threshold: float) -> np.ndarray:
    """The boolean (D, H, W) array of tumour voxels, or DataError."""
    array = np.asarray(mask)
    if array.ndim != 3:
        raise DataError(f"mask has shape {tuple(array.shape)}; expected a 3D (D, H, W) volume")
    if array.dtype == bool:
        return array
    if not (np.issubdtype(array.dtype, np.number) and not np.iscomplexobj(array)):
        raise DataError(f"mask has dtype {array.dtype}; expected a boolean or real-valued volume")
    try:
        finite = math.isfinite(threshold)
    except TypeError:
        finite = False
    if not finite:
        raise DataError(f"mask threshold {threshold!r} is not a finite number")
    if np.issubdtype(array.dtype, np.floating):
        bad = int(np.count_nonzero(~np.isfinite(array)))
        if bad:
            raise DataError(f"mask has {bad} non-finite voxels (NaN or inf)")
    return array > threshold


def _candidate_points(component: np.ndarray) -> np.ndarray:
    """Indices of the voxels of a component that can be hull vertices: (n, 3) int.

    A voxel whose two neighbours along some axis are both in the component is their midpoint,
    so it is not an extreme point of the set and cannot be a vertex of its convex hull.
    """
    padded = np.pad(component, 1)
    inner = (slice(1, -1),) * 3
    midpoint = np.zeros(component.shape, dtype=bool)
    for axis in range(3):
        before = list(inner)
        after = list(inner)
        before[axis] = slice(0, -2)
        after[axis] = slice(2, None)
        midpoint |= padded[tuple(before)] & padded[tuple(after)]
    return np.argwhere(component & ~midpoint)


def _max_distance(points: np.ndarray) -> float:
    """The largest pairwise distance of (n, 3) points, in chunks of rows."""
    best = 0.0
    for start in range(0, len(points), DISTANCE_CHUNK):
        best = max(best, float(cdist(points[start : start + DISTANCE_CHUNK], points).max()))
    return best


def _extreme_points(points: np.ndarray) -> np.ndarray:
    """The points that can be a farthest pair: hull vertices, with fallbacks for flat sets.

    Qhull refuses sets that are coplanar (a one-slice tumour) or collinear; those are reduced
    to their 2D hull in their own plane, or to the two ends of their line.
    """
    try:
        return points[ConvexHull(points).vertices]
    except QhullError:
        pass
    centred = points - points.mean(axis=0)
    _, singular, axes = np.linalg.svd(centred, full_matrices=False)
    if singular[1] <= 1e-9 * singular[0]:  # collinear: the two ends along the line
        along = centred @ axes[0]
        return points[[int(along.argmin()), int(along.argmax())]]
    try:
        return points[ConvexHull(centred @ axes[:2].T).vertices]
    except QhullError:  # numerically degenerate in 2D too: every point is a candidate
        return points


def _feret_diameter(component: np.ndarray, axis_spacing: np.ndarray) -> float:
    """The voxel-centre Feret diameter, in mm, of one component (a cropped boolean array)."""
    points = _candidate_points(component) * axis_spacing
    if len(points) < 2:
        return 0.0
    if len(points) > BRUTE_FORCE_POINTS:
        points = _extreme_points(points)
    return _max_distance(points)


def tumour_diameters(mask, spacing, *, threshold: float = DEFAULT_THRESHOLD) -> list[float]:
    """Feret diameters in mm of the tumours of a (D, H, W) mask, largest first.

    `spacing` is (sx, sy, sz) in mm, in the affine's (x, y, z) order (see `voxel_spacing`);
    voxels above `threshold` are tumour (a boolean mask is used as is).
    """
    tumour = _tumour_voxels(mask, threshold)
    sx, sy, sz = _checked_spacing(spacing)
    axis_spacing = np.array([sz, sy, sx])  # array axes are (D, H, W) = (z, y, x)
    labels, _ = ndimage.label(tumour, structure=CONNECTIVITY)
    diameters = []
    for index, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is not None:
            diameter = _feret_diameter(labels[box] == index, axis_spacing)
            diameters.append(round(diameter, DIAMETER_DECIMALS))
    return sorted(diameters, reverse=True)


def bin_counts(diameters: Sequence[float]) -> np.ndarray:
    """Tumours per size bin: int64 array of shape (7,), each count capped at MAX_COUNT."""
    values = np.asarray(diameters, dtype=np.float64).reshape(-1)
    if not (np.isfinite(values).all() and (values >= 0).all()):
        raise DataError("tumour diameters must be finite and non-negative mm")
    # digitize against the inner edges: d < 3 -> 0, 3 <= d < 6 -> 1, ..., d >= 30 -> 6.
    bins = np.digitize(values, np.asarray(BIN_EDGES_MM[1:], dtype=np.float64), right=False)
    counts = np.bincount(bins, minlength=NUM_BINS).astype(np.int64)
    return np.minimum(counts, MAX_COUNT)


def size_bin_vector(mask, affine_or_spacing, *, threshold: float = DEFAULT_THRESHOLD) -> np.ndarray:
    """The (7,) capped tumour counts per size bin of a (D, H, W) mask.

    `affine_or_spacing` is the mask's 4x4 NIfTI affine, or its spacing (sx, sy, sz) in mm.
    """
    shape = np.shape(affine_or_spacing)
    spacing = voxel_spacing(affine_or_spacing) if shape in ((4, 4), (3, 3)) else affine_or_spacing
    return bin_counts(tumour_diameters(mask, spacing, threshold=threshold))


def _count_rows(vectors, name: str) -> np.ndarray:
    """Count vectors as an (N, 7) int64 array, or ConfigError. A single (7,) vector is one row."""
    try:
        values = np.asarray(vectors, dtype=np.float64)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} size-bin vectors are not numeric") from None
    if values.ndim == 1:
        values = values[None]
    if values.ndim != 2 or values.shape[1] != NUM_BINS:
        raise ConfigError(f"{name} size-bin vectors have shape {values.shape}; expected (N, {NUM_BINS}), one count per bin")
    if values.shape[0] == 0:
        raise ConfigError(f"{name} size-bin vectors are empty; expected at least one row")
    if not np.isfinite(values).all() or (values != np.round(values)).any():
        raise ConfigError(f"{name} size-bin vectors must hold whole numbers")
    if (values < 0).any() or (values > MAX_COUNT).any():
        raise ConfigError(f"{name} size-bin counts must lie in [0, {MAX_COUNT}]")
    return values.astype(np.int64)


def bin_adherence(requested, measured) -> dict:
    """How well generated masks follow their requested size bins.

    `requested` and `measured` are (N, 7) counts (a single (7,) vector is one row), row i the
    request of sample i and the counts measured on the mask generated for it. Returns
    `exact_fraction` (the fraction of rows whose 7 counts all match), `mean_abs_error_per_bin`
    (7 floats: the mean over rows of |requested - measured|) and `rows` (N).
    """
    wanted = _count_rows(requested, "requested")
    found = _count_rows(measured, "measured")
    if wanted.shape != found.shape:
        raise ConfigError(f"requested size-bin vectors have {len(wanted)} rows but measured ones have {len(found)}")
    return {
        "exact_fraction": float((wanted == found).all(axis=1).mean()),
        "mean_abs_error_per_bin": [float(v) for v in np.abs(wanted - found).mean(axis=0)],
        "rows": int(len(wanted)),
    }


# The key under which a data set's items carry their mask's size-bin vector (`WithSizeBins`).
SIZE_BINS = "size_bins"


class WithSizeBins(torch.utils.data.Dataset):
    """A volume data set whose items also hold `SIZE_BINS`: the (7,) int64 counts of their `mask`.

    The counts are measured on the mask as the model sees it (the data set's grid, with the
    spacing of its reference affine, `VolumeDataset.affine`), so a generated mask, which has
    that grid, is measured the same way as the masks the model learnt from. Counted once per
    item and kept.
    """

    def __init__(self, dataset, mask: str):
        self.dataset, self.mask = dataset, mask
        self.spacing = voxel_spacing(dataset.affine)
        self._counts: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        item = self.dataset[index]
        if index not in self._counts:
            volume = item[self.mask][0].numpy()  # (D, H, W), {-1, 1}: tumour above 0
            self._counts[index] = torch.from_numpy(size_bin_vector(volume, self.spacing))
        return item | {SIZE_BINS: self._counts[index]}
