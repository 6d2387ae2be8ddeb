"""Masks are thresholded before comparison; Dice, HD95 and lesion statistics against hand counts."""

import numpy as np
import pytest
from scipy import ndimage

from voxgen.errors import VoxgenError
from voxgen.evaluation.masks import binarize, dice, hd95, lesion_stats, lesions


def _box(shape, lo, hi, inside=1.0, outside=-1.0):
    m = np.full(shape, outside, dtype=np.float32)
    m[tuple(slice(a, b) for a, b in zip(lo, hi))] = inside
    return m


def test_threshold_is_zero_in_model_space_and_half_for_probabilities():
    soft = np.array([-1.0, -0.2, 0.0, 0.1, 0.9])
    assert binarize(soft).tolist() == [False, False, False, True, True]
    probabilities = (soft + 1) / 2
    assert binarize(probabilities, "probability").tolist() == binarize(soft).tolist()
    with pytest.raises(VoxgenError, match="mask space must be one of model, probability"):
        binarize(soft, "sigmoid")


def test_soft_masks_are_thresholded_not_compared_as_values():
    target = _box((12, 12, 12), (2, 2, 2), (8, 8, 8))
    # A soft prediction: the same box at 0.4 (inside) on a background of -0.6; as values it would
    # differ everywhere, thresholded it is the target.
    soft = np.where(target > 0, 0.4, -0.6)
    assert dice(soft, target)[0] == pytest.approx(1.0)
    assert hd95(soft, target)[0] == 0.0


def test_dice_of_overlapping_boxes_is_the_hand_count():
    a = _box((10, 10, 10), (0, 0, 0), (4, 4, 4))  # 64 voxels
    b = _box((10, 10, 10), (2, 0, 0), (6, 4, 4))  # 64 voxels, 32 shared
    values = dice(np.stack([a, a, -np.ones_like(a)]), np.stack([b, a, -np.ones_like(a)]))
    assert values.tolist() == pytest.approx([2 * 32 / 128, 1.0, 1.0])  # both empty: they agree
    assert dice(a, -np.ones_like(a))[0] == 0.0


def test_hd95_of_single_voxels_is_their_distance_in_mm():
    a = _box((12, 12, 12), (2, 2, 2), (3, 3, 3))
    b = _box((12, 12, 12), (5, 6, 2), (6, 7, 3))  # offset (3, 4, 0) voxels
    assert hd95(a, b)[0] == pytest.approx(5.0, abs=1e-5)
    assert hd95(a, b, spacing=(2.0, 1.0, 1.0))[0] == pytest.approx(np.sqrt(36 + 16), abs=1e-5)


def _reference_hd95(a, b, spacing):
    """Boundary voxels (mask minus its face-connected erosion, zero outside), Euclidean distance
    transforms with the spacing, the larger of the two directed 95th percentiles."""

    def boundary(m):
        padded = np.pad(m, 1)
        return (padded & ~ndimage.binary_erosion(padded))[1:-1, 1:-1, 1:-1]

    ea, eb = boundary(a), boundary(b)
    to_b = ndimage.distance_transform_edt(~eb, sampling=spacing)[ea]
    to_a = ndimage.distance_transform_edt(~ea, sampling=spacing)[eb]
    return max(np.percentile(to_b, 95), np.percentile(to_a, 95))


def test_hd95_matches_a_distance_transform_reference_with_anisotropic_spacing():
    rng = np.random.default_rng(0)
    grid = np.indices((20, 22, 18)).astype(float)
    a = ((grid[0] - 9) ** 2 / 36 + (grid[1] - 10) ** 2 / 49 + (grid[2] - 8) ** 2 / 25) < 1
    b = ((grid[0] - 11) ** 2 / 25 + (grid[1] - 12) ** 2 / 36 + (grid[2] - 9) ** 2 / 36) < 1
    b[rng.random(b.shape) < 0.01] = True  # a few stray voxels move the tail
    spacing = (3.0, 0.9, 1.2)
    expected = _reference_hd95(a, b, spacing)
    ours = hd95(np.where(a, 1.0, -1.0), np.where(b, 1.0, -1.0), spacing=spacing)[0]
    assert ours == pytest.approx(expected, rel=1e-4)
    assert expected > 3.0


def test_hd95_of_empty_masks():
    empty = -np.ones((8, 8, 8), dtype=np.float32)
    box = _box((8, 8, 8), (2, 2, 2), (4, 4, 4))
    assert hd95(np.stack([empty, box, empty]), np.stack([empty, empty, box])).tolist() == [0.0, np.inf, np.inf]
    with pytest.raises(VoxgenError, match="spacing must be three positive sizes"):
        hd95(box, box, spacing=(1.0, 0.0, 1.0))


def test_lesions_are_26_connected_components_with_sizes_in_mm3():
    m = -np.ones((10, 10, 10), dtype=np.float32)
    m[1:3, 1:3, 1:3] = 1  # 8 voxels
    m[3, 3, 3] = 1  # touches the first only at a corner: the same lesion (9 voxels)
    m[6:9, 6:8, 6] = 1  # 6 voxels
    m[0, 9, 0] = 1  # 1 voxel
    found = lesions(m, spacing=(2.0, 1.0, 0.5))
    assert found.count == 3
    assert found.voxels.tolist() == [9, 6, 1]
    assert found.mm3.tolist() == [9.0, 6.0, 1.0]  # voxel volume 1 mm^3
    stats = lesion_stats(np.stack([m, -np.ones_like(m)]), spacing=(1.0, 1.0, 2.0))
    assert stats.counts.tolist() == [3.0, 0.0]
    assert stats.mean_count == 1.5
    assert stats.median_size_mm3 == 12.0  # sizes 18, 12, 2 mm^3
