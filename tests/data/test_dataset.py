"""VolumeDataset: shapes, value ranges, resampling, reference affine, caching; layout."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from voxgen.data import MODALITIES, VolumeDataset, list_cases, load_volume, resized_affine, scale_image
from voxgen.data.layout import split_counts
from voxgen.errors import ConfigError

from .conftest import SHAPE

IMAGES = ("bravo", "t1_pre", "t1_gd", "flair")


def test_items_have_model_space_shapes_and_ranges(small_phantoms):
    data = VolumeDataset(small_phantoms, "train", MODALITIES, SHAPE)
    assert len(data) == 1 and data.cases[0].id == "phantom_000"
    item = data[0]
    assert set(item) == {*MODALITIES, "case"} and item["case"] == "phantom_000"
    for modality in MODALITIES:
        tensor = item[modality]
        assert tensor.dtype == torch.float32 and tensor.shape == (1, *SHAPE)
    for modality in IMAGES:
        assert item[modality].min() == -1.0 and item[modality].max() == 1.0
    assert set(item["seg"].unique().tolist()) == {-1.0, 1.0}


def test_image_scaling_formula():
    volume = np.random.default_rng(0).gamma(2.0, size=(20, 20, 20)).astype(np.float32)
    lo, hi = volume.min(), np.percentile(volume, 99.5)
    expected = 2 * np.clip((volume - lo) / (hi - lo), 0, 1) - 1
    assert np.allclose(scale_image(volume), expected, atol=1e-6)
    # The brightest 0.5 % are clipped to 1: one outlier does not squeeze the rest.
    spiked = volume.copy()
    spiked[0, 0, 0] = 1e4
    assert np.allclose(scale_image(spiked)[1:], scale_image(volume)[1:], atol=1e-2)
    assert np.all(scale_image(np.full((2, 2, 2), 3.0, np.float32)) == -1.0)


def test_mask_matches_file(small_phantoms):
    data = VolumeDataset(small_phantoms, "train", ("seg",), SHAPE)
    seg, _ = load_volume(data.cases[0].path("seg"))
    assert torch.equal(data[0]["seg"][0], torch.from_numpy(np.where(seg > 0.5, 1.0, -1.0).astype(np.float32)))


def test_resampling_to_another_shape(small_phantoms):
    shape = (12, 30, 9)
    data = VolumeDataset(small_phantoms, "val", ("t1_gd", "seg"), shape)
    item = data[0]
    assert item["t1_gd"].shape == (1, *shape) and item["seg"].shape == (1, *shape)
    assert item["t1_gd"].min() >= -1.0 and item["t1_gd"].max() <= 1.0
    assert set(item["seg"].unique().tolist()) <= {-1.0, 1.0}
    volume, affine = load_volume(data.cases[0].path("t1_gd"))
    assert volume.shape == SHAPE
    assert np.allclose(data.affine, resized_affine(affine, SHAPE, shape))
    # Same field of view: the first and last voxel centres move inwards/outwards by
    # half the change of voxel size, and the centre stays.
    centre = lambda a, s: a @ np.array([(s[2] - 1) / 2, (s[1] - 1) / 2, (s[0] - 1) / 2, 1.0])  # noqa: E731
    assert np.allclose(centre(data.affine, shape), centre(affine, SHAPE))


def test_resampled_mask_stays_aligned_with_image(small_phantoms):
    """After resampling, lesion voxels of the mask still sit on the bright t1_gd lesion."""
    native = VolumeDataset(small_phantoms, "train", ("t1_gd", "seg"), SHAPE)[0]
    if not (native["seg"] > 0).any():
        pytest.skip("no lesion in this phantom")
    item = VolumeDataset(small_phantoms, "train", ("t1_gd", "seg"), (32, 40, 32))[0]
    lesion = item["seg"] > 0
    assert item["t1_gd"][lesion].mean() > item["t1_gd"][~lesion].mean() + 0.5


def test_affine_is_first_case_first_modality(small_phantoms):
    data = VolumeDataset(small_phantoms, "test", ("flair", "bravo"), SHAPE)
    _, affine = load_volume(data.cases[0].path("flair"))
    assert np.array_equal(data.affine, affine)


def test_cache_keeps_processed_tensors(small_phantoms):
    cached = VolumeDataset(small_phantoms, "train", ("bravo",), SHAPE, cache=True)
    assert cached[0]["bravo"] is cached[0]["bravo"]
    uncached = VolumeDataset(small_phantoms, "train", ("bravo",), SHAPE, cache=False)
    first, second = uncached[0]["bravo"], uncached[0]["bravo"]
    assert first is not second and torch.equal(first, second)
    assert torch.equal(first, cached[0]["bravo"])


def test_dataloader_batches_are_bcdhw(small_phantoms):
    data = VolumeDataset(small_phantoms, "train", ("bravo", "seg"), SHAPE)
    batch = next(iter(torch.utils.data.DataLoader(data, batch_size=1)))
    assert batch["bravo"].shape == (1, 1, *SHAPE) and batch["case"] == ["phantom_000"]


def test_list_cases_sorted_and_ignores_hidden(data_copy):
    (data_copy / "train" / "b_case").mkdir()
    (data_copy / "train" / "a_case").mkdir()
    (data_copy / "train" / ".hidden").mkdir()
    (data_copy / "train" / "notes.txt").write_text("not a case")
    ids = [case.id for case in list_cases(data_copy, "train", ())]
    assert ids == ["a_case", "b_case", "phantom_000"]
    case = list_cases(data_copy, "train", ())[2]
    assert case.split == "train" and case.path("seg") == data_copy / "train" / "phantom_000" / "seg.nii.gz"


def test_split_counts():
    assert split_counts(24) == {"train": 16, "val": 4, "test": 4}
    assert split_counts(12) == {"train": 8, "val": 2, "test": 2}
    assert split_counts(3) == {"train": 1, "val": 1, "test": 1}
    assert split_counts(5, (3, 2, 0)) == {"train": 3, "val": 2, "test": 0}
    assert split_counts(4, {"train": 4}) == {"train": 4, "val": 0, "test": 0}
    with pytest.raises(ConfigError):
        split_counts(2)
    with pytest.raises(ConfigError):
        split_counts(5, (1, 1, 1))
