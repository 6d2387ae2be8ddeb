"""Every kind of bad data raises DataError with a one-line message naming the file."""

from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest

from voxgen.data import MASK_MODALITIES, MODALITIES, VolumeDataset, check_folder, list_cases, load_volume, save_volume
from voxgen.data.dataset import ImageIndex
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
    moved[0, 3] += 2.0**-12  # 0.00024 mm, exact in float32
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


def test_check_folder_checks_only_the_requested_modalities(data_copy):
    (case_dir(data_copy) / "flair.nii.gz").write_bytes(b"\x1f\x8b\x08\x00broken")
    assert check_folder(data_copy, ("bravo", "seg")) == []
    assert [p.split(": ")[0] for p in check_folder(data_copy)] == [str(case_dir(data_copy) / "flair.nii.gz")]
    # The dataset of a mode that does not need flair reads the case.
    assert load_first(data_copy, modalities=("bravo", "seg"))["bravo"].shape == (1, *SHAPE)


@pytest.mark.parametrize(
    "content, looks_like",
    [
        (b"\xff\xd8\xff\xe0" + bytes(600), "a JPEG image"),
        (bytes(128) + b"DICM" + bytes(600), "a DICOM file"),
        (b"PK\x03\x04" + bytes(600), "a zip archive"),
        (bytes(range(200, 256)) * 12, "unknown content starting with bytes c8 c9 ca cb cc cd ce cf"),
    ],
)
def test_files_that_are_not_gzip_say_what_they_look_like(tmp_path, content, looks_like):
    path = tmp_path / "bravo.nii.gz"
    path.write_bytes(content)
    message = expect_error("bravo.nii.gz", load_volume, path)
    assert message == f"{path}: not gzip-compressed (it looks like {looks_like}); expected a .nii.gz NIfTI file"


def test_uncompressed_nifti_reads_as_nii_but_not_as_nii_gz(tmp_path):
    plain = save_volume(tmp_path / "x.nii", np.arange(24, dtype=np.float32).reshape(2, 3, 4), np.eye(4))
    assert load_volume(plain)[0].shape == (2, 3, 4)
    renamed = tmp_path / "x.nii.gz"
    renamed.write_bytes(plain.read_bytes())
    assert "it looks like an uncompressed NIfTI image" in expect_error("x.nii.gz", load_volume, renamed)


def test_a_case_in_every_split_is_reported_per_pair_and_per_dataset(data_copy):
    import shutil

    case = case_dir(data_copy, "train")
    for split in ("val", "test"):
        shutil.copytree(case, data_copy / split / case.name)
    leaks = [p for p in check_folder(data_copy) if "leaks data" in p]
    assert [p.split(": ")[0] for p in leaks] == [str(data_copy / s / case.name) for s in ("val", "test")]
    # Each split's dataset refuses it: val and test share it with train.
    for split in ("train", "val", "test"):
        expect_error(case.name, VolumeDataset, data_copy, split, MODS, SHAPE)


def test_case_files_put_directly_in_a_split_get_a_hint(data_copy):
    import shutil

    case = case_dir(data_copy, "val")
    for path in case.iterdir():
        shutil.move(str(path), data_copy / "val" / path.name)
    case.rmdir()
    message = expect_error("val", VolumeDataset, data_copy, "val", MODS, SHAPE)
    assert message.endswith(
        "has no case folders (5 NIfTI files lie directly in it: put each case's files in a folder of its own)"
    )


def test_voxel_size_check_leaves_written_samples_readable(tmp_path):
    """load_volume reads coarse grids voxgen writes itself; only data folders judge voxel sizes."""
    from voxgen.data.nifti import voxel_size_problem

    coarse = np.diag([25.0, 25.0, 25.0, 1.0])
    path = save_volume(tmp_path / "sample.nii.gz", np.random.default_rng(0).random((4, 4, 4)), coarse)
    assert load_volume(path)[0].shape == (4, 4, 4)
    assert "25 x 25 x 25 mm" in voxel_size_problem(coarse)
    assert voxel_size_problem(np.diag([0.05, 1.0, 20.0, 1.0])) is None


# ---- headers that claim more data than the file holds ------------------------------------------


def _header_only(shape, dtype=np.uint8) -> bytes:
    """A single-file NIfTI-1 header (with its extension flag) for `shape`, and no voxels."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    header.set_sform(np.eye(4), code=1)
    return header.binaryblock + bytes(4)


def test_tiny_gzip_claiming_a_huge_volume_is_refused_before_reading(tmp_path):
    path = tmp_path / "huge.nii.gz"
    path.write_bytes(gzip.compress(_header_only((1600, 1600, 1600))))
    message = expect_error("huge.nii.gz", load_volume, path)
    assert message.startswith(f"{path}: header claims a 1600 x 1600 x 1600 uint8 volume (4096000352 bytes), more than ")
    assert f"{path.stat().st_size} bytes of gzip data can hold (at most " in message


def test_gzip_whose_data_ends_early_is_refused_by_its_decompressed_size(tmp_path):
    """Within the deflate bound, but the gzip trailer and then a count show the data is not there."""
    path = tmp_path / "short.nii.gz"
    raw = _header_only((64, 64, 64), np.float32) + np.random.default_rng(0).random(16**3, np.float32).tobytes()
    path.write_bytes(gzip.compress(raw))
    message = expect_error("short.nii.gz", load_volume, path)
    assert message == (
        f"{path}: header claims a 64 x 64 x 64 float32 volume (1048928 bytes), more than the file holds "
        f"({len(raw)} bytes decompressed): the header is wrong or the file is truncated"
    )


def test_plain_nifti_shorter_than_its_header_claims_is_refused(tmp_path):
    path = tmp_path / "short.nii"
    path.write_bytes(_header_only((400, 400, 400)) + bytes(100))
    message = expect_error("short.nii", load_volume, path)
    assert message == (
        f"{path}: header claims a 400 x 400 x 400 uint8 volume (64000352 bytes), more than the file holds "
        "(452 bytes): the header is wrong or the file is truncated"
    )


def test_all_zero_mask_compressed_near_the_deflate_limit_is_accepted(tmp_path):
    """A large empty mask compresses about 1000:1 at gzip level 9: a rule of thumb such as
    '1000:1 at most' would refuse it; the deflate format's own limit, 1032:1, does not."""
    plain = save_volume(tmp_path / "seg.nii", np.zeros((160, 160, 160), np.float32), np.eye(4), dtype=np.uint8)
    path = tmp_path / "seg.nii.gz"
    path.write_bytes(gzip.compress(plain.read_bytes(), compresslevel=9))
    assert plain.stat().st_size / path.stat().st_size > 1000
    volume, _ = load_volume(path)
    assert volume.shape == (160, 160, 160) and not volume.any()


def test_multi_member_and_padded_gzip_files_are_read(tmp_path):
    """Their gzip trailer does not give the whole size; the data is counted instead of refused."""
    plain = save_volume(tmp_path / "x.nii", np.arange(60, dtype=np.float32).reshape(3, 4, 5), np.eye(4))
    raw = plain.read_bytes()
    for name, content in [
        ("members.nii.gz", gzip.compress(raw[:200]) + gzip.compress(raw[200:])),
        ("padded.nii.gz", gzip.compress(raw) + bytes(512)),
    ]:
        (tmp_path / name).write_bytes(content)
        assert np.array_equal(load_volume(tmp_path / name)[0], load_volume(plain)[0]), name


# ---- orientation --------------------------------------------------------------------------------


def test_file_without_sform_or_qform_is_refused(tmp_path):
    path = tmp_path / "bare.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((4, 5, 6), np.float32), None), str(path))
    message = expect_error("bare.nii.gz", load_volume, path)
    assert message.startswith(f"{path}: both sform_code and qform_code are 0 (no orientation): ")


def test_either_orientation_code_alone_is_enough(tmp_path):
    data = np.random.default_rng(0).random((4, 5, 6), np.float32)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    for sform_code, qform_code in [(0, 1), (2, 0)]:
        img = nib.Nifti1Image(data, affine)
        img.set_sform(affine, code=sform_code)
        img.set_qform(affine, code=qform_code)
        path = tmp_path / f"s{sform_code}q{qform_code}.nii.gz"
        nib.save(img, str(path))
        assert np.allclose(load_volume(path)[1], affine), path


def test_voxgen_writers_set_an_orientation(small_phantoms, tmp_path):
    path = save_volume(tmp_path / "x.nii.gz", np.ones((2, 3, 4), np.float32), np.eye(4))
    for written in [path, *sorted(small_phantoms.glob("*/*/*.nii.gz"))]:
        header = nib.load(str(written)).header
        assert header["sform_code"] > 0 and header["qform_code"] > 0, written


# ---- the same image in two splits ---------------------------------------------------------------


def test_a_case_copied_into_val_under_another_name_is_a_leak(data_copy):
    import shutil

    case = case_dir(data_copy, "train")
    copy = data_copy / "val" / "renamed"
    shutil.copytree(case, copy)
    leaks = [p for p in check_folder(data_copy) if "leaks data" in p]
    # One line per file, except an empty mask: masks without lesions coincide in any data set.
    read = [m for m in MODALITIES if m not in MASK_MODALITIES or load_volume(case / f"{m}.nii.gz")[0].any()]
    assert leaks == [
        f"{copy / f'{m}.nii.gz'}: same voxels as {case / f'{m}.nii.gz'} in split 'train': "
        "the same image in two splits leaks data between them"
        for m in read
    ]
    # Training reads train, then val, into one index: the val copy stops it with the first of those lines.
    images = ImageIndex()
    VolumeDataset(data_copy, "train", MODS, SHAPE, images=images)[0]
    val = VolumeDataset(data_copy, "val", MODS, SHAPE, images=images)
    with pytest.raises(DataError) as info:
        [val[i] for i in range(len(val))]
    assert str(info.value) in leaks


def test_a_resaved_copy_with_the_same_voxels_is_a_leak(data_copy):
    """Compared by voxels, not file bytes: a copy written again (another orientation on disk) is found."""
    train = case_dir(data_copy, "train") / "flair.nii.gz"
    img = nib.load(str(train))
    target = case_dir(data_copy, "test") / "flair.nii.gz"
    # x stored right -> left: the first voxel on disk is the last one of the original.
    affine = img.affine @ np.diag([-1.0, 1.0, 1.0, 1.0])
    affine[:3, 3] = img.affine[:3, 3] + img.affine[:3, 0] * (img.shape[0] - 1)
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[::-1], affine), str(target))
    assert target.read_bytes() != train.read_bytes()
    assert check_folder(data_copy) == [
        f"{target}: same voxels as {train} in split 'train': the same image in two splits leaks data between them"
    ]


def test_empty_masks_in_two_splits_are_not_a_leak(data_copy):
    for split in ("train", "val"):
        path = case_dir(data_copy, split) / "seg.nii.gz"
        volume, affine = load_volume(path)
        save_volume(path, np.zeros_like(volume), affine, dtype=np.uint8)
    assert check_folder(data_copy) == []


def test_the_same_image_twice_in_one_split_is_a_warning(data_copy, capsys):
    import shutil

    from voxgen.cli import main

    case = case_dir(data_copy, "train")
    shutil.copy(case / "bravo.nii.gz", case / "t1_pre.nii.gz")
    line = f"{case / 't1_pre.nii.gz'}: same voxels as {case / 'bravo.nii.gz'} in the same split: a duplicate counts twice"
    warnings = []
    assert check_folder(data_copy, warn=warnings.append) == []
    assert warnings == [line]
    # The command prints it and still passes; the data sets read the case.
    assert main(["data", "check", str(data_copy)]) == 0
    assert capsys.readouterr().out.splitlines() == [f"warning: {line}", f"{data_copy}: no problems found"]
    assert load_first(data_copy, modalities=("bravo", "t1_pre"))["t1_pre"].shape == (1, *SHAPE)
