"""Every kind of bad data raises DataError with a one-line message naming the file."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from voxgen.data import MODALITIES, VolumeDataset, check_folder, list_cases, load_volume, save_volume
from voxgen.errors import DataError, VoxgenError

from .conftest import SHAPE

MODS = ("bravo", "flair", "seg")


def case_dir(root, split="train"):
    return list_cases(root, split, MODS)[0].folder


def load_first(root, split="train", modalities=MODS):
    return VolumeDataset(root, split, modalities, SHAPE)[0]


def expect_error(match: str, fn, *args):
    with pytest.raises(DataError) as info:
        fn(*args)
    message = str(info.value)
    assert match in message, message
    assert "\n" not in message
    assert isinstance(info.value, VoxgenError)
    return message


def test_missing_root(tmp_path):
    expect_error("nowhere", VolumeDataset, tmp_path / "nowhere", "train", MODS, SHAPE)


def test_missing_split(data_copy):
    import shutil

    shutil.rmtree(data_copy / "val")
    message = expect_error(str(data_copy / "val"), VolumeDataset, data_copy, "val", MODS, SHAPE)
    assert "val" in message


def test_empty_split(data_copy):
    import shutil

    shutil.rmtree(case_dir(data_copy, "val"))
    (data_copy / "val" / ".DS_Store").write_text("hidden files are not cases")
    expect_error(str(data_copy / "val"), VolumeDataset, data_copy, "val", MODS, SHAPE)


def test_missing_modality(data_copy):
    (case_dir(data_copy) / "flair.nii.gz").unlink()
    expect_error("flair.nii.gz", VolumeDataset, data_copy, "train", MODS, SHAPE)


def test_missing_file():
    expect_error("absent.nii.gz", load_volume, "/nonexistent/absent.nii.gz")


def test_corrupt_gz_random_bytes(data_copy):
    path = case_dir(data_copy) / "bravo.nii.gz"
    path.write_bytes(np.random.default_rng(0).bytes(3000))
    expect_error("bravo.nii.gz", load_volume, path)
    expect_error("bravo.nii.gz", load_first, data_copy)


def test_truncated_gz(data_copy):
    path = case_dir(data_copy) / "flair.nii.gz"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    expect_error("flair.nii.gz", load_volume, path)
    expect_error("flair.nii.gz", load_first, data_copy)


def test_plain_text_named_nifti(tmp_path):
    path = tmp_path / "notes.nii"
    path.write_text("this is not an image\n" * 40)
    expect_error("notes.nii", load_volume, path)


def test_two_dimensional_image(tmp_path):
    path = tmp_path / "slice.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 9), np.float32), np.eye(4)), str(path))
    message = expect_error("slice.nii.gz", load_volume, path)
    assert "has 2 dimensions" in message and "expected 3" in message


def test_four_dimensional_image_with_two_volumes(data_copy):
    path = case_dir(data_copy) / "bravo.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 9, 10, 2), np.float32), np.eye(4)), str(path))
    message = expect_error("bravo.nii.gz", load_first, data_copy)
    assert "has 4 dimensions" in message


def test_mismatched_shapes_within_a_case(data_copy):
    folder = case_dir(data_copy)
    volume, affine = load_volume(folder / "flair.nii.gz")
    save_volume(folder / "flair.nii.gz", volume[:-2], affine)
    message = expect_error("flair.nii.gz", load_first, data_copy)
    assert "bravo.nii.gz" in message and "shape" in message


def test_mismatched_affines_within_a_case(data_copy):
    folder = case_dir(data_copy)
    volume, affine = load_volume(folder / "flair.nii.gz")
    moved = affine.copy()
    moved[0, 3] += 2.0
    save_volume(folder / "flair.nii.gz", volume, moved)
    message = expect_error("flair.nii.gz", load_first, data_copy)
    assert "bravo.nii.gz" in message and "affine" in message


def test_affine_within_tolerance_is_accepted(data_copy):
    folder = case_dir(data_copy)
    volume, affine = load_volume(folder / "flair.nii.gz")
    moved = affine.copy()
    moved[0, 3] += 2.0 ** -12  # 0.00024 mm, exact in float32
    save_volume(folder / "flair.nii.gz", volume, moved)
    assert load_first(data_copy)["flair"].shape == (1, *SHAPE)


def test_nan_voxels(data_copy):
    folder = case_dir(data_copy)
    volume, affine = load_volume(folder / "bravo.nii.gz")
    volume[3, 4, 5] = np.nan
    volume[1, 1, 1] = np.inf
    save_volume(folder / "bravo.nii.gz", volume, affine)
    message = expect_error("bravo.nii.gz", load_first, data_copy)
    assert "2 NaN or Inf" in message


def test_non_invertible_affine(tmp_path):
    path = tmp_path / "flat.nii.gz"
    img = nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4))
    # Only the sform can hold a singular matrix (the qform is a rotation); nibabel reads the sform.
    img.set_qform(None, code=0)
    img.set_sform(np.diag([1.0, 1.0, 0.0, 1.0]), code=1)
    nib.save(img, str(path))
    message = expect_error("flat.nii.gz", load_volume, path)
    assert "affine" in message


def test_non_binary_mask(data_copy):
    folder = case_dir(data_copy)
    volume, affine = load_volume(folder / "seg.nii.gz")
    volume[2, 2, 2] = 2.0
    save_volume(folder / "seg.nii.gz", volume, affine)
    message = expect_error("seg.nii.gz", load_first, data_copy)
    assert "not binary" in message


def test_check_folder_reports_every_problem_at_once(data_copy):
    assert check_folder(data_copy) == []
    train = case_dir(data_copy, "train")
    val = case_dir(data_copy, "val")
    (train / "t1_pre.nii.gz").unlink()
    (train / "bravo.nii.gz").write_bytes(b"\x00" * 100)
    volume, affine = load_volume(val / "seg.nii.gz")
    save_volume(val / "seg.nii.gz", volume * 3.0, affine, dtype=np.uint8)
    volume, affine = load_volume(val / "flair.nii.gz")
    save_volume(val / "flair.nii.gz", volume[:, :-1], affine)
    (data_copy / "test" / list_cases(data_copy, "test", MODS)[0].id / "t1_gd.nii.gz").unlink()

    problems = check_folder(data_copy)
    assert len(problems) == 5, problems
    expected = [
        train / "t1_pre.nii.gz",
        train / "bravo.nii.gz",
        val / "seg.nii.gz",
        val / "flair.nii.gz",
        "t1_gd.nii.gz",
    ]
    for needle in expected:
        assert sum(str(needle) in line for line in problems) == 1, (needle, problems)
    assert all("\n" not in line for line in problems)


def test_check_folder_missing_root_and_splits(tmp_path):
    assert check_folder(tmp_path / "absent") == [f"{tmp_path / 'absent'}: data folder not found"]
    (tmp_path / "train").mkdir()
    problems = check_folder(tmp_path, MODALITIES)
    assert len(problems) == 3  # train empty, val and test missing
    assert any("train" in p and "no case folders" in p for p in problems)
