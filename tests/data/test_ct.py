"""CT pairs: HU windows, the low-dose simulation, the pair folder and its check, fixed intensity scaling."""

from __future__ import annotations

import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy import ndimage

from voxgen.cli import main
from voxgen.data import VolumeDataset, load_volume, save_volume, scale_image
from voxgen.data.ct import (
    DEFAULT_PHOTONS,
    DEFAULT_WINDOWS,
    HEAD_CT,
    hu_from_windows,
    low_dose,
    make_ct_pairs,
    project,
    reconstruct,
    slab_splits,
    window_channels,
)
from voxgen.data.dataset import Intensity
from voxgen.data.layout import Modalities
from voxgen.errors import ConfigError

PAIRS = ("source", "target")
CHECK = ("data.modalities=[source,target]", "data.masks=[]")


def _disk(n: int = 96, radius: float = 40.0) -> tuple[np.ndarray, np.ndarray]:
    """A water disk (0 HU) in air (-1000 HU), and each pixel's distance from the centre."""
    y, x = np.mgrid[:n, :n] - (n - 1) / 2.0
    r = np.hypot(x, y)
    return np.where(r < radius, 0.0, -1000.0), r


def _brain(slice_hu: np.ndarray) -> np.ndarray:
    """Brain tissue (0-80 HU) well inside the skull of a head slice."""
    inside = ndimage.binary_erosion(ndimage.binary_fill_holes(slice_hu > -500), iterations=3)
    return ndimage.binary_erosion((slice_hu > 0) & (slice_hu < 80) & inside, iterations=2)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """3 slabs of 2 slices, read-only: train slab_051, test slab_053, val slab_055."""
    return make_ct_pairs(tmp_path_factory.mktemp("ct") / "pairs", cases=3, slab=2, seed=5)


def _run(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# --- windows -------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-9), (torch.float32, 2e-3)])
def test_windows_round_trip_is_exact_inside_the_widest_window(dtype, tolerance):
    edges = [v for window in DEFAULT_WINDOWS for v in window]
    hu = torch.tensor(np.concatenate([np.linspace(-1024, 3071, 4096), edges, [39.7, 80.001, -0.001]]), dtype=dtype)
    hu = hu.view(1, 1, 1, 1, -1)
    channels = window_channels(hu, DEFAULT_WINDOWS)
    assert channels.shape == (1, 3, 1, 1, hu.shape[-1]) and channels.dtype == dtype
    assert (hu_from_windows(channels, DEFAULT_WINDOWS) - hu).abs().max().item() < tolerance


def test_window_channels_map_each_window_to_minus_one_one_and_clip():
    hu = torch.tensor([-2000.0, 0.0, 40.0, 80.0, 240.0, 5000.0], dtype=torch.float64).view(1, 1, 1, 1, -1)
    channels = window_channels(hu, DEFAULT_WINDOWS)[0, :, 0, 0]  # (3, 6)
    wide = lambda v: 2 * (v + 1024) / 4095 - 1
    expected = [
        [-1, -1, 0, 1, 1, 1],
        [-1, -0.2, 0, 0.2, 1, 1],
        [-1, wide(0), wide(40), wide(80), wide(240), 1],
    ]
    assert torch.allclose(channels, torch.tensor(expected, dtype=torch.float64), atol=1e-12)
    # Beyond the widest window the HU saturate at its ends.
    back = hu_from_windows(window_channels(hu, DEFAULT_WINDOWS), DEFAULT_WINDOWS).flatten()
    assert back[0].item() == pytest.approx(-1024.0) and back[-1].item() == pytest.approx(3071.0)
    # So do channels beyond [-1, 1] (a network's overshoot).
    over = hu_from_windows(torch.full((1, 3, 1, 1, 2), 3.0) * torch.tensor([-1.0, 1.0]), DEFAULT_WINDOWS).flatten()
    assert over.tolist() == pytest.approx([-1024.0, 3071.0])


def test_hu_from_windows_lets_the_wider_windows_veto_a_narrower_one_only_when_it_is_far_outside():
    wide = lambda v: 2 * (v + 1024) / 4095 - 1
    channels = torch.tensor(
        [
            [0.0, 0.0, wide(40)],  # all agree -> 40, read from the brain window
            [0.8, 0.5, wide(500)],  # skull whose brain channel did not saturate (72 HU): the wide window's 500
            [1.0, 0.5, wide(100)],  # wide 100 is inside soft tissue's window -> its 140; 140 is beyond the brain's
            [0.97, 0.0, wide(40)],  # brain channel within its margin of saturation -> soft tissue's 40
            [-0.99, -0.99, -1.0],  # air as a network decodes it -> -1024
            [0.0, 0.0, wide(120)],  # an imprecise wide channel does not veto: brain's 40
            [0.0, 0.0, wide(-400)],  # but one beyond the narrower windows by more than its margin does: -400
            [1.0, 1.0, 1.0],
        ],
        dtype=torch.float64,
    ).T.reshape(1, 3, 1, 1, 8)
    hu = hu_from_windows(channels, DEFAULT_WINDOWS).flatten()
    assert torch.allclose(hu, torch.tensor([40.0, 500.0, 140.0, 40.0, -1024.0, 40.0, -400.0, 3071.0], dtype=torch.float64))


def test_windows_are_differentiable_through_the_chosen_channel():
    hu = torch.tensor([-500.0, 40.0, 100.0, 1500.0], dtype=torch.float64).view(1, 1, 1, 1, -1).requires_grad_()
    hu_from_windows(window_channels(hu, DEFAULT_WINDOWS), DEFAULT_WINDOWS).sum().backward()
    assert torch.allclose(hu.grad, torch.ones_like(hu))
    with pytest.raises(ConfigError, match="high > low"):
        window_channels(hu.detach(), [[80.0, 0.0]])


# --- low-dose simulation -------------------------------------------------------------------------


def test_noiseless_round_trip_error_is_small_inside_a_disk():
    disk, r = _disk()
    error = reconstruct(project(disk, 2.0), 2.0, disk.shape[0]) - disk
    inside = r < 30  # 10 pixels from the 1000 HU edge, whose ringing reaches furthest
    # Measured: mean |error| 3.1 HU, max 18.2 HU, mean -0.01 HU.
    assert np.abs(error[inside]).mean() < 4.0 and np.abs(error[inside]).max() < 25.0
    assert abs(error[inside].mean()) < 0.5


def test_noise_grows_as_one_over_the_square_root_of_the_photons():
    disk, r = _disk()
    inside = r < 30
    stds = []
    for photons in (1e4, 1e5, 1e6):
        scan = low_dose(disk, photons, np.random.default_rng(0), pixel_mm=2.0)
        assert scan.dtype == np.float32 and scan.shape == disk.shape
        assert abs(float(scan[inside].mean())) < 0.1 * float(scan[inside].std())  # noise, not a bias
        stds.append(float(scan[inside].std()))
    # Measured: 50.3, 16.2, 5.2 HU; sqrt(10) = 3.16.
    assert 2.8 < stds[0] / stds[1] < 3.5 and 2.8 < stds[1] / stds[2] < 3.5
    assert 10.0 < stds[1] < 25.0


def test_default_photons_give_visible_but_moderate_noise_in_the_brain():
    head, affine = load_volume(HEAD_CT)
    target = head[60]
    brain = _brain(target)
    scan = low_dose(target, DEFAULT_PHOTONS, np.random.default_rng(0), pixel_mm=float(affine[0, 0]))
    again = low_dose(target, DEFAULT_PHOTONS, np.random.default_rng(0), pixel_mm=float(affine[0, 0]))
    assert np.array_equal(scan, again)
    # Measured: 16.6 HU (the scan's own noise, by local 7 x 7 std, is ~5 HU).
    assert 13.0 < float((scan - target)[brain].std()) < 20.0
    assert abs(float((scan - target)[brain].mean())) < 2.0


def test_low_dose_keeps_a_non_square_slice_and_refuses_bad_photons():
    slice_hu = np.full((20, 30), -1000.0)
    slice_hu[5:15, 5:25] = 40.0
    scan = low_dose(slice_hu, 1e5, np.random.default_rng(1), angles=60, pixel_mm=1.0)
    assert scan.shape == (20, 30)
    with pytest.raises(ConfigError, match="photons"):
        low_dose(slice_hu, 0.0, np.random.default_rng(1), pixel_mm=1.0)


# --- pairs ---------------------------------------------------------------------------------------


def test_slab_splits_hold_out_the_middle_levels():
    assert slab_splits(9, {"train": 6, "val": 2, "test": 1}) == {"train": [0, 1, 3, 5, 7, 8], "val": [2, 6], "test": [4]}
    assert slab_splits(3, {"train": 1, "val": 1, "test": 1}) == {"train": [0], "val": [2], "test": [1]}


def test_make_ct_pairs_writes_slabs_of_the_head_with_their_affines(pairs):
    head, head_affine = load_volume(HEAD_CT)
    # 3 x 2 slices centred in the 108: slices 51-56.
    assert [p.name for p in sorted((pairs / "train").iterdir())] == ["slab_051"]
    assert [p.name for p in sorted((pairs / "val").iterdir())] == ["slab_055"]
    assert [p.name for p in sorted((pairs / "test").iterdir())] == ["slab_053"]
    for case in sorted(pairs.glob("*/slab_*")):
        z0 = int(case.name.split("_")[1])
        source, source_affine = load_volume(case / "source.nii.gz")
        target, target_affine = load_volume(case / "target.nii.gz")
        assert source.shape == target.shape == (2, 128, 128)
        assert np.array_equal(source_affine, target_affine)
        assert np.allclose(target_affine[:3, 3], head_affine[:3, 3] + z0 * head_affine[:3, 2])
        assert np.array_equal(target, head[z0 : z0 + 2])  # the real scan as acquired
        noise = (source - target)[_brain(target[0])[None].repeat(2, axis=0)]
        assert 10.0 < float(noise.std()) < 25.0


def test_make_ct_pairs_is_deterministic_for_a_seed(pairs, tmp_path):
    again = make_ct_pairs(tmp_path / "again", cases=3, slab=2, seed=5)
    other = make_ct_pairs(tmp_path / "other", cases=3, slab=2, seed=6)
    for case in sorted(p.relative_to(pairs) for p in pairs.glob("*/slab_*")):
        for modality in PAIRS:
            first = load_volume(pairs / case / f"{modality}.nii.gz")[0]
            assert np.array_equal(first, load_volume(again / case / f"{modality}.nii.gz")[0])
            differs = not np.array_equal(first, load_volume(other / case / f"{modality}.nii.gz")[0])
            assert differs == (modality == "source")


def test_make_ct_pairs_refuses_more_slices_than_the_head_holds(tmp_path):
    with pytest.raises(ConfigError, match="cases x slab"):
        make_ct_pairs(tmp_path / "x", cases=10, slab=12)
    assert not (tmp_path / "x").exists()


def test_data_check_passes_the_pairs(pairs, capsys):
    code, out, _ = _run(capsys, "data", "check", str(pairs), *CHECK)
    assert code == 0 and "no problems" in out


def _missing_target(case):
    (case / "target.nii.gz").unlink()
    return "missing modality 'target'"


def _other_shape(case):
    volume, affine = load_volume(case / "target.nii.gz")
    save_volume(case / "target.nii.gz", volume[:, :, :120], affine)
    return "shape [2, 128, 120] differs"


def _shifted_affine(case):
    volume, affine = load_volume(case / "target.nii.gz")
    affine[0, 3] += 2.0
    save_volume(case / "target.nii.gz", volume, affine)
    return "affine differs"


@pytest.mark.parametrize("break_case", [_missing_target, _other_shape, _shifted_affine])
def test_data_check_names_an_unpaired_or_mismatched_target(pairs, tmp_path, capsys, break_case):
    root = tmp_path / "pairs"
    shutil.copytree(pairs, root)
    case = root / "val" / "slab_055"
    expected = break_case(case)
    code, out, err = _run(capsys, "data", "check", str(root), *CHECK)
    lines = out.strip().splitlines()
    assert code == 2 and err.startswith("error: ") and "1 problem" in err
    assert len(lines) == 1 and lines[0].startswith(str(case / "target.nii.gz")) and expected in lines[0]


def test_ct_pairs_command_writes_the_folder_and_a_summary(tmp_path, capsys):
    out = tmp_path / "cli"
    code, stdout, _ = _run(capsys, "data", "ct-pairs", "--out", str(out), "--cases", "3", "--slab", "2", "--angles", "30")
    assert code == 0 and len(stdout.strip().splitlines()) == 1 and "3 CT pairs" in stdout
    assert sorted(p.name for p in out.iterdir()) == [".voxgen-dataset.json", "test", "train", "val"]


# --- intensity -----------------------------------------------------------------------------------


def test_fixed_intensity_maps_the_hu_range_to_minus_one_one_and_back():
    fixed = Intensity.of(SimpleNamespace(intensity="fixed", intensity_range=[-1024, 3071]))
    hu = np.array([-2000.0, -1024.0, 1023.5, 3071.0, 5000.0], dtype=np.float32).reshape(1, 1, 5)
    scaled = fixed.scale(hu)
    assert scaled.dtype == np.float32
    assert np.array_equal(scaled.ravel(), np.array([-1.0, -1.0, 0.0, 1.0, 1.0], dtype=np.float32))
    inside = np.linspace(-1024, 3071, 101, dtype=np.float32)
    assert np.abs(fixed.to_units(fixed.scale(inside)) - inside).max() < 1e-3
    assert torch.allclose(fixed.to_units(torch.tensor([-1.0, 1.0])), torch.tensor([-1024.0, 3071.0]))


def test_percentile_intensity_is_scale_image_bit_for_bit():
    volume = np.random.default_rng(0).gamma(2.0, 100.0, size=(6, 7, 8)).astype(np.float32)
    percentile = Intensity()
    assert np.array_equal(percentile.scale(volume), scale_image(volume))
    with pytest.raises(ValueError, match="no units"):
        percentile.to_units(volume)


@pytest.mark.parametrize("name, bounds, key", [("minmax", [0, 1], "data.intensity"), ("fixed", [10, 10], "data.intensity_range")])
def test_intensity_refuses_bad_values(name, bounds, key):
    with pytest.raises(ConfigError, match=key):
        Intensity.of(SimpleNamespace(intensity=name, intensity_range=bounds))


def test_volume_dataset_scales_a_pair_on_one_fixed_map(pairs):
    fixed = Intensity("fixed", -1024.0, 3071.0)
    item = VolumeDataset(pairs, "test", PAIRS, (2, 128, 128), layout=Modalities(PAIRS, ()), intensity=fixed)[0]
    for modality in PAIRS:
        volume = load_volume(pairs / "test" / "slab_053" / f"{modality}.nii.gz")[0]
        assert torch.equal(item[modality][0], torch.from_numpy(fixed.scale(volume)))
        # The noise takes some air below -1024 HU (to -1080); the map clips it.
        expected = torch.from_numpy(volume).clamp(-1024.0, 3071.0)
        assert (fixed.to_units(item[modality][0]) - expected).abs().max().item() < 1e-3
