"""NIfTI round trips, RAS reorientation and resized affines."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from voxgen.data import load_volume, resized_affine, save_volume

# Entries exactly representable in float32: the NIfTI header stores the affine as float32.
AFFINE = np.array(
    [
        [1.5, 0.0, 0.0, -20.25],
        [0.0, 2.0, 0.0, 31.5],
        [0.0, 0.0, 2.5, -7.0],
        [0.0, 0.0, 0.0, 1.0],
    ]
)


def test_round_trip_float_is_exact(tmp_path):
    volume = np.random.default_rng(0).normal(size=(5, 6, 7)).astype(np.float32)  # (D, H, W)
    path = save_volume(tmp_path / "x.nii.gz", volume, AFFINE)
    loaded, affine = load_volume(path)
    assert loaded.dtype == np.float32 and loaded.shape == (5, 6, 7)
    assert np.array_equal(loaded, volume)
    assert affine.dtype == np.float64
    assert np.array_equal(affine, AFFINE)
    # On disk the array is (x, y, z) = (W, H, D).
    assert nib.load(str(path)).shape == (7, 6, 5)


def test_round_trip_mask_is_uint8(tmp_path):
    mask = (np.random.default_rng(1).random((4, 5, 6)) > 0.5).astype(np.float32)
    path = save_volume(tmp_path / "seg.nii.gz", mask, AFFINE, dtype=np.uint8)
    assert nib.load(str(path)).get_data_dtype() == np.uint8
    loaded, affine = load_volume(path)
    assert np.array_equal(loaded, mask) and np.array_equal(affine, AFFINE)


def test_save_leaves_no_temporary_files(tmp_path):
    save_volume(tmp_path / "a.nii.gz", np.zeros((3, 3, 3), np.float32), AFFINE)
    save_volume(tmp_path / "a.nii.gz", np.ones((3, 3, 3), np.float32), AFFINE)  # overwrite
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.nii.gz"]
    assert load_volume(tmp_path / "a.nii.gz")[0].min() == 1.0


def test_las_file_is_reoriented_to_ras(tmp_path):
    xyz = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)  # (x, y, z) on disk
    las = np.diag([-2.0, 1.0, 1.5, 1.0])
    las[:3, 3] = [10.0, -4.0, 3.0]
    path = tmp_path / "las.nii.gz"
    nib.save(nib.Nifti1Image(xyz, las), str(path))
    volume, affine = load_volume(path)
    # x is flipped to run left -> right, then (x, y, z) -> (D, H, W) = (z, y, x).
    assert np.array_equal(volume, xyz[::-1].transpose(2, 1, 0))
    assert nib.aff2axcodes(affine) == ("R", "A", "S")
    # Voxel 0 of the canonical x axis is the old last voxel: world x = 10 - 2 * 3 = 4.
    assert np.allclose(affine[:3, :3], np.diag([2.0, 1.0, 1.5]))
    assert np.allclose(affine[:3, 3], [4.0, -4.0, 3.0])


def test_trailing_singleton_4d_is_accepted(tmp_path):
    xyz = np.random.default_rng(2).random((4, 5, 6, 1)).astype(np.float32)
    path = tmp_path / "four.nii.gz"
    nib.save(nib.Nifti1Image(xyz, AFFINE), str(path))
    volume, _ = load_volume(path)
    assert np.array_equal(volume, xyz[..., 0].transpose(2, 1, 0))


def test_resized_affine_keeps_centre_and_scales_voxels():
    old, new = (10, 12, 8), (5, 24, 6)  # (D, H, W)
    out = resized_affine(AFFINE, old, new)
    centre_old = AFFINE @ np.array([(8 - 1) / 2, (12 - 1) / 2, (10 - 1) / 2, 1.0])
    centre_new = out @ np.array([(6 - 1) / 2, (24 - 1) / 2, (5 - 1) / 2, 1.0])
    assert np.allclose(centre_old, centre_new)
    assert np.allclose(np.diag(out)[:3], np.diag(AFFINE)[:3] * [8 / 6, 12 / 24, 10 / 5])


def test_resized_affine_matches_trilinear_interpolation():
    """A volume holding each voxel's world coordinate, resampled by torch, holds the
    world coordinates of the resized affine (away from the clamped border)."""
    old, new = (9, 11, 13), (6, 17, 7)
    d, h, w = np.meshgrid(*[np.arange(n) for n in old], indexing="ij")
    world = np.einsum("ij,j...->i...", AFFINE[:3], np.stack([w, h, d, np.ones_like(d)]).astype(np.float64))
    resampled = F.interpolate(torch.from_numpy(world)[None], size=new, mode="trilinear", align_corners=False)[0]
    d2, h2, w2 = np.meshgrid(*[np.arange(n) for n in new], indexing="ij")
    expected = np.einsum(
        "ij,j...->i...", resized_affine(AFFINE, old, new)[:3], np.stack([w2, h2, d2, np.ones_like(d2)]).astype(float)
    )
    inner = (slice(None), slice(1, -1), slice(1, -1), slice(1, -1))
    assert np.allclose(resampled.numpy()[inner], expected[inner], atol=1e-6)


def test_save_rejects_wrong_rank(tmp_path):
    from voxgen.errors import DataError

    with pytest.raises(DataError, match="bad.nii.gz"):
        save_volume(tmp_path / "bad.nii.gz", np.zeros((3, 3)), AFFINE)
