"""Size-bin vectors of tumour masks (voxgen.data.tumour_bins) on synthetic masks of known size.

A digital ball centred on a voxel centre, holding the voxels whose centres lie within R mm of
it, has a voxel-centre Feret diameter of exactly 2R when R is a whole number of voxels along
one axis: no two of its voxels are more than 2R apart (triangle inequality through the
centre), and the two voxels R away along that axis are exactly 2R apart.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial.distance import pdist

from voxgen.data import tumour_bins
from voxgen.data.tumour_bins import (
    BIN_EDGES_MM,
    MAX_COUNT,
    bin_adherence,
    bin_counts,
    size_bin_vector,
    tumour_diameters,
    voxel_spacing,
)
from voxgen.errors import ConfigError, DataError

FINE = 0.25  # mm: diameters 2R = 2 * k * 0.25 reach every half millimetre


def ball(radius_mm: float, spacing=(FINE, FINE, FINE), margin: int = 1) -> np.ndarray:
    """A (D, H, W) boolean ball of `radius_mm` centred on the middle voxel; spacing is (sx, sy, sz)."""
    sx, sy, sz = spacing
    half = [int(np.floor(radius_mm / s + 1e-9)) + margin for s in (sz, sy, sx)]
    d, h, w = np.ogrid[-half[0] : half[0] + 1, -half[1] : half[1] + 1, -half[2] : half[2] + 1]
    return (d * sz) ** 2 + (h * sy) ** 2 + (w * sx) ** 2 <= radius_mm**2 + 1e-9


def bin_of(diameter: float) -> int:
    return int(np.flatnonzero(bin_counts([diameter]))[0])


# --- sizes at every bin edge -----------------------------------------------------------------


@pytest.mark.parametrize("edge", BIN_EDGES_MM[1:])
@pytest.mark.parametrize("offset", [-0.5, 0.5])
def test_a_sphere_half_a_millimetre_from_each_edge_lands_on_its_side(edge, offset):
    diameter = edge + offset
    mask = ball(diameter / 2)
    assert tumour_diameters(mask, (FINE, FINE, FINE)) == [pytest.approx(diameter, abs=1e-9)]
    expected = np.zeros(7, dtype=np.int64)
    expected[BIN_EDGES_MM.index(edge) - (1 if offset < 0 else 0)] = 1
    np.testing.assert_array_equal(size_bin_vector(mask, (FINE, FINE, FINE)), expected)


def test_a_sphere_exactly_on_an_edge_goes_to_the_upper_bin():
    # 10 mm = 2 * 20 voxels * 0.25 mm: bins are [a, b), so 10 mm is in [10, 15).
    assert tumour_diameters(ball(5.0), (FINE,) * 3) == [10.0]
    assert size_bin_vector(ball(5.0), (FINE,) * 3).tolist() == [0, 0, 0, 1, 0, 0, 0]


def test_bin_counts_puts_each_size_in_its_half_open_bin():
    sizes = [0, 2.999, 3, 5.999, 6, 9.999, 10, 14.999, 15, 19.999, 20, 29.999, 30, 250]
    counts = bin_counts(sizes)
    assert counts.dtype == np.int64 and counts.shape == (7,)
    assert counts.tolist() == [2, 2, 2, 2, 2, 2, 2]
    assert bin_counts([]).tolist() == [0] * 7


# --- spacing and axis order ------------------------------------------------------------------


def test_an_ellipsoid_in_voxels_that_is_a_sphere_in_mm_measures_its_mm_diameter():
    # (sx, sy, sz) = (0.5, 0.5, 2.0): axis 0 of the (D, H, W) array is z, 2 mm per voxel.
    spacing = (0.5, 0.5, 2.0)
    mask = ball(8.0, spacing)
    assert mask.shape == (9 + 2, 33 + 2, 33 + 2)  # 4 voxels either side in depth, 16 in-plane
    assert tumour_diameters(mask, spacing) == [16.0]
    assert size_bin_vector(mask, spacing).tolist() == [0, 0, 0, 0, 1, 0, 0]
    # The spacing in the wrong (array) order would stretch the 33 in-plane voxels to 64 mm.
    assert tumour_diameters(mask, spacing[::-1]) == [64.0]


def test_the_affine_gives_the_same_vector_as_its_spacing():
    spacing = (0.5, 0.5, 2.0)
    mask = ball(8.0, spacing)
    affine = np.diag([*spacing, 1.0])
    assert voxel_spacing(affine) == spacing
    assert size_bin_vector(mask, affine).tolist() == size_bin_vector(mask, spacing).tolist()


def test_voxel_spacing_is_the_column_lengths_of_a_rotated_affine():
    angle = np.deg2rad(30)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([0.9, 1.1, 3.0])
    affine[:3, 3] = [-90, 120, -60]
    assert voxel_spacing(affine) == pytest.approx((0.9, 1.1, 3.0))


def test_a_single_voxel_or_two_touching_voxels_are_bin_zero():
    mask = np.zeros((5, 5, 5), dtype=bool)
    mask[2, 2, 2] = True
    assert tumour_diameters(mask, (1.0, 1.0, 1.0)) == [0.0]
    assert size_bin_vector(mask, (5.0, 5.0, 5.0)).tolist() == [1, 0, 0, 0, 0, 0, 0]
    mask[3, 2, 2] = True  # a neighbour in depth: one z spacing apart, centre to centre
    assert tumour_diameters(mask, (1.0, 1.0, 2.5)) == [2.5]
    assert size_bin_vector(mask, (1.0, 1.0, 2.5)).tolist() == [1, 0, 0, 0, 0, 0, 0]


# --- connectivity ----------------------------------------------------------------------------


def test_two_blobs_sharing_a_face_across_slices_are_one_tumour():
    mask = np.zeros((10, 12, 12), dtype=bool)
    mask[1:5, 2:6, 2:6] = True  # slices 1-4
    mask[5:9, 4:8, 4:8] = True  # slices 5-8, overlapping in-plane: touches slice 4 across a face
    diameters = tumour_diameters(mask, (1.0, 1.0, 1.0))
    assert diameters == [pytest.approx(np.sqrt(7**2 + 5**2 + 5**2))]  # corner (1,2,2) to (8,7,7)


def test_two_blobs_touching_only_at_a_corner_across_slices_are_one_tumour():
    # 26-connectivity: voxels (3,3,3) and (4,4,4) share only a corner, in consecutive slices.
    mask = np.zeros((10, 10, 10), dtype=bool)
    mask[1:4, 1:4, 1:4] = True
    mask[4:7, 4:7, 4:7] = True
    spacing = (1.0, 1.0, 2.0)
    assert tumour_diameters(mask, spacing) == [pytest.approx(np.sqrt((5 * 2.0) ** 2 + 5**2 + 5**2))]
    assert size_bin_vector(mask, spacing).sum() == 1


def test_two_blobs_one_slice_apart_are_two_tumours():
    mask = np.zeros((12, 10, 10), dtype=bool)
    mask[1:4, 1:4, 1:4] = True
    mask[5:8, 1:4, 1:4] = True  # slice 4 is background between them
    assert tumour_diameters(mask, (1.0, 1.0, 1.0)) == [pytest.approx(np.sqrt(8 + 4))] * 2
    assert size_bin_vector(mask, (1.0, 1.0, 1.0)).tolist() == [0, 2, 0, 0, 0, 0, 0]


def test_separate_spheres_are_counted_in_their_own_bins_largest_first():
    mask = np.zeros((40, 60, 40), dtype=bool)
    big, small = ball(7.0, (0.5,) * 3), ball(2.0, (0.5,) * 3)  # 14 mm and 4 mm
    mask[2 : 2 + big.shape[0], 2 : 2 + big.shape[1], 2 : 2 + big.shape[2]] = big
    mask[5 : 5 + small.shape[0], 40 : 40 + small.shape[1], 5 : 5 + small.shape[2]] = small
    assert tumour_diameters(mask, (0.5,) * 3) == [14.0, 4.0]
    assert size_bin_vector(mask, (0.5,) * 3).tolist() == [0, 1, 0, 1, 0, 0, 0]


# --- cap, empty, thresholds ------------------------------------------------------------------


def test_counts_are_capped_at_ten_per_bin():
    mask = np.zeros((8, 8, 40), dtype=bool)
    mask[1, 1, 0:40:3] = True  # 14 single voxels, none touching
    mask[4:7, 4:7, 4:7] = True  # one 2*sqrt(3) ~ 3.5 mm tumour, in bin 1
    assert len(tumour_diameters(mask, (1.0, 1.0, 1.0))) == 15
    assert MAX_COUNT == 10
    assert size_bin_vector(mask, (1.0, 1.0, 1.0)).tolist() == [10, 1, 0, 0, 0, 0, 0]


def test_an_empty_mask_has_no_tumours():
    assert tumour_diameters(np.zeros((6, 7, 8), dtype=bool), (1.0, 1.0, 1.0)) == []
    assert size_bin_vector(np.zeros((6, 7, 8)), np.eye(4)).tolist() == [0] * 7
    assert size_bin_vector(-np.ones((6, 7, 8), dtype=np.float32), np.eye(4)).tolist() == [0] * 7


def test_masks_on_disk_and_in_model_space_give_the_same_vector():
    tumour = ball(3.0, (0.5,) * 3)  # 6 mm
    on_disk = tumour.astype(np.uint8)  # {0, 1}
    model_space = np.where(tumour, 1.0, -1.0).astype(np.float32)  # {-1, 1}
    expected = [0, 0, 1, 0, 0, 0, 0]
    assert size_bin_vector(on_disk, (0.5,) * 3).tolist() == expected
    assert size_bin_vector(model_space, (0.5,) * 3).tolist() == expected
    # A soft generated mask: tumour slightly above 0, background slightly below.
    soft = np.where(tumour, 0.1, -0.2).astype(np.float32)
    assert size_bin_vector(soft, (0.5,) * 3).tolist() == expected


def test_a_probability_map_needs_its_own_threshold():
    probabilities = np.where(ball(3.0, (0.5,) * 3), 0.9, 0.2)
    assert size_bin_vector(probabilities, (0.5,) * 3, threshold=0.5).tolist() == [0, 0, 1, 0, 0, 0, 0]
    # At the default threshold the whole (box-shaped) volume is one tumour.
    assert len(tumour_diameters(probabilities, (0.5,) * 3)) == 1
    assert tumour_diameters(probabilities, (0.5,) * 3)[0] > 6.0


# --- the Feret diameter itself ---------------------------------------------------------------


@pytest.fixture(params=["default", "always-hull"])
def hull_everywhere(request, monkeypatch):
    """Run a test as is, and again with every component of 2 points or more going through the hull."""
    if request.param == "always-hull":
        monkeypatch.setattr(tumour_bins, "BRUTE_FORCE_POINTS", 1)


def test_flat_and_thin_tumours_use_the_fallbacks(hull_everywhere):
    spacing = (0.5, 0.5, 3.0)
    disk = np.zeros((3, 101, 101), dtype=bool)
    disk[1] = ball(25.0, (0.5, 0.5, 0.5), margin=0)[50]  # one slice: coplanar voxel centres
    assert tumour_diameters(disk, spacing) == [50.0]
    line = np.zeros((3, 3, 200), dtype=bool)
    line[1, 1, 10:190] = True  # collinear: 180 voxels along x
    assert tumour_diameters(line, spacing) == [179 * 0.5]
    diagonal = np.zeros((100, 3, 100), dtype=bool)
    diagonal[np.arange(100), 1, np.arange(100)] = True  # collinear along a diagonal, corner-connected
    assert tumour_diameters(diagonal, spacing) == [pytest.approx(99 * np.hypot(0.5, 3.0))]


def test_the_feret_diameter_matches_all_pairs_on_irregular_tumours(hull_everywhere):
    rng = np.random.default_rng(0)
    mask = rng.random((14, 16, 18)) < 0.3
    spacing = (0.7, 1.3, 2.1)
    labels, count = ndimage.label(mask, structure=np.ones((3, 3, 3)))
    assert count >= 2  # several components, some large enough for the hull
    expected = []
    for index in range(1, count + 1):
        points = np.argwhere(labels == index) * np.array(spacing[::-1])
        expected.append(pdist(points).max() if len(points) > 1 else 0.0)
    assert tumour_diameters(mask, spacing) == pytest.approx(sorted(expected, reverse=True), abs=1e-6)


# --- adherence -------------------------------------------------------------------------------


def test_bin_adherence_on_hand_made_vectors():
    requested = [[1, 0, 0, 0, 0, 0, 0], [0, 2, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 1], [3, 0, 0, 0, 0, 0, 0]]
    measured = [[1, 0, 0, 0, 0, 0, 0], [0, 1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 1, 0], [3, 0, 0, 0, 0, 0, 0]]
    result = bin_adherence(requested, measured)
    assert result["exact_fraction"] == 0.5
    assert result["mean_abs_error_per_bin"] == [0.0, 0.25, 0.0, 0.0, 0.0, 0.25, 0.25]
    assert result["rows"] == 4
    assert bin_adherence(np.array(requested), np.array(requested))["exact_fraction"] == 1.0
    single = bin_adherence([0, 0, 0, 0, 0, 0, 2], [0, 0, 0, 0, 0, 0, 0])
    assert single["exact_fraction"] == 0.0 and single["mean_abs_error_per_bin"] == [0.0] * 6 + [2.0]


def test_bin_adherence_of_measured_vectors():
    spacing = (0.5,) * 3
    measured = np.stack([size_bin_vector(ball(r, spacing), spacing) for r in (1.0, 4.0)])  # 2 mm, 8 mm
    requested = np.array([[1, 0, 0, 0, 0, 0, 0], [0, 0, 0, 1, 0, 0, 0]])
    result = bin_adherence(requested, measured)
    assert result["exact_fraction"] == 0.5
    assert result["mean_abs_error_per_bin"] == [0.0, 0.0, 0.5, 0.5, 0.0, 0.0, 0.0]


# --- bad inputs: one-line errors -------------------------------------------------------------


def _one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert message and "\n" not in message
    return message


@pytest.mark.parametrize("mask", [np.zeros((4, 4)), np.zeros((1, 4, 4, 4)), np.zeros(5)])
def test_a_mask_that_is_not_3d_is_refused(mask):
    with pytest.raises(DataError) as excinfo:
        tumour_diameters(mask, (1.0, 1.0, 1.0))
    assert "expected a 3D" in _one_line(excinfo)


def test_a_mask_with_nan_is_refused():
    mask = np.zeros((4, 4, 4))
    mask[1, 1, 1] = np.nan
    with pytest.raises(DataError) as excinfo:
        size_bin_vector(mask, (1.0, 1.0, 1.0))
    assert "1 non-finite" in _one_line(excinfo)


@pytest.mark.parametrize("spacing", [(1.0, 1.0), (1.0, 0.0, 1.0), (1.0, -1.0, 1.0), (1.0, float("nan"), 1.0), "abc", None])
def test_spacing_that_is_not_three_positive_numbers_is_refused(spacing):
    with pytest.raises(DataError) as excinfo:
        tumour_diameters(np.zeros((4, 4, 4)), spacing)
    assert "spacing" in _one_line(excinfo)


@pytest.mark.parametrize("affine", [np.eye(2), np.zeros((4, 4)), np.diag([1.0, 0.0, 1.0, 1.0])])
def test_a_bad_affine_is_refused(affine):
    with pytest.raises(DataError) as excinfo:
        voxel_spacing(affine)
    assert "affine" in _one_line(excinfo)


def test_negative_diameters_are_refused():
    with pytest.raises(DataError) as excinfo:
        bin_counts([3.0, -1.0])
    _one_line(excinfo)


@pytest.mark.parametrize(
    "requested, measured, words",
    [
        ([[0] * 6], [[0] * 6], "expected (N, 7)"),
        ([[0] * 7], [[0] * 8], "expected (N, 7)"),
        ([[0] * 7], [[0] * 7, [0] * 7], "1 rows but measured ones have 2"),
        (np.zeros((0, 7)), np.zeros((0, 7)), "empty"),
        ([[0.5] + [0] * 6], [[0] * 7], "whole numbers"),
        ([[11] + [0] * 6], [[0] * 7], "[0, 10]"),
        ([[-1] + [0] * 6], [[0] * 7], "[0, 10]"),
    ],
)
def test_bad_vectors_are_refused(requested, measured, words):
    with pytest.raises(ConfigError) as excinfo:
        bin_adherence(requested, measured)
    assert words in _one_line(excinfo)
