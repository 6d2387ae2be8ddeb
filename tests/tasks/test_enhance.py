"""Whole-volume CT enhancement with a translate run: tiling and blending, `voxgen sample --input`, and
`voxgen evaluate` of translate runs (input, enhanced, NLM against the targets)."""

from __future__ import annotations

import csv
import os

import nibabel as nib
import numpy as np
import pytest
import torch
from rich.console import Console

from tiny_translate import TINY_TRANSLATE
from voxgen.cli import main
from voxgen.config import compose, to_yaml
from voxgen.data.ct import DEFAULT_WINDOWS, hu_from_windows, window_channels
from voxgen.data.dataset import Intensity
from voxgen.data.nifti import load_volume, save_volume
from voxgen.errors import ConfigError, DataError
from voxgen.evaluation.translate import nlm_denoise, noise_sigma, scores, slice_ssim
from voxgen.tasks.enhance import (
    axis_starts,
    enhance_volume,
    find_inputs,
    overlap_voxels,
    parse_overlap,
    taper,
    window_corners,
)
from voxgen.training.trainer import train

CLIP = (4, 16, 16)


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _psnr(pred, target, low, high):
    """PSNR in an HU range, by hand: both clipped, data range high - low."""
    p, t = (np.clip(np.asarray(v, dtype=np.float64), low, high) for v in (pred, target))
    return 10 * np.log10((high - low) ** 2 / np.mean((p - t) ** 2))


class FakeTask:
    """What `enhance_volume` uses of a TranslateTask, with `enhance_clips` returning `gain` times its input
    (plus `jitter` times one normal draw of each window's generator, added to every voxel of the window)."""

    def __init__(self, jitter: float = 0.0, gain: float = 1.0):
        self.clip = CLIP
        self.windows = DEFAULT_WINDOWS
        self.intensity = Intensity("fixed")
        self.model = torch.nn.Linear(1, 1)
        self.jitter = jitter
        self.gain = gain
        self.calls = []

    def channels(self, x):
        return window_channels(self.intensity.to_units(x), self.windows)

    def enhance_clips(self, source, sampler, grid, generators):
        self.calls.append(len(source))
        shift = torch.stack([torch.randn((), generator=g) for g in generators]) * self.jitter
        return self.gain * source + shift.view(-1, 1, 1, 1, 1).to(source.dtype)


def _enhance(task, hu, **kwargs):
    return enhance_volume(task, hu, sampler=None, grid=None, **kwargs)


# ---- tiling and blending ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("size", "clip", "overlap"), [(16, 16, 4), (17, 16, 4), (40, 16, 4), (128, 16, 4), (12, 4, 2), (9, 4, 0), (30, 8, 7)]
)
def test_window_starts_run_from_the_first_voxel_to_the_last_with_at_least_the_overlap(size, clip, overlap):
    starts = axis_starts(size, clip, overlap)
    assert starts[0] == 0 and starts[-1] == size - clip
    steps = np.diff(starts)
    assert np.all(steps >= 1) and np.all(steps <= clip - overlap)
    assert len(starts) == 1 or len(starts) - 1 == int(np.ceil((size - clip) / (clip - overlap)))  # the fewest
    assert len(steps) == 0 or steps.max() - steps.min() <= 1  # spread evenly


def test_windows_cover_every_voxel():
    shape = (7, 37, 29)
    corners = window_corners(shape, CLIP, overlap_voxels(CLIP, (0.5, 0.25, 0.25)))
    covered = np.zeros(shape, dtype=int)
    for d, h, w in corners:
        covered[d : d + CLIP[0], h : h + CLIP[1], w : w + CLIP[2]] += 1
    assert covered.min() >= 1
    assert len(corners) == 3 * 3 * 3  # D: 0, 1, 3; H: 0, 10, 21; W: 0, 6, 13


def test_taper_is_positive_and_a_partition_of_unity_where_windows_overlap_exactly():
    margins = (2, 4, 4)
    weight = taper(CLIP, margins)
    assert weight.shape == CLIP and weight.min() > 0 and weight.max() == pytest.approx(2 / 3)  # D: 4 voxels, overlap 2
    # Along H: windows every 12 voxels overlap by exactly 4; inside the volume their weights sum to 1.
    ramp = weight[1, :, 8] / weight[1, :, 8].max()
    total = np.zeros(16 + 3 * 12)
    for start in range(0, 3 * 12 + 1, 12):
        total[start : start + 16] += ramp
    np.testing.assert_allclose(total[4:-4], 1.0, rtol=0, atol=1e-12)


def test_blending_an_identity_model_returns_the_volume():
    rng = np.random.default_rng(0)
    hu = rng.uniform(-1100.0, 3500.0, size=(7, 37, 29)).astype(np.float32)
    out = _enhance(FakeTask(), hu, batch_size=5)
    assert out.shape == hu.shape and out.dtype == np.float32
    # The only loss is the windows' own: HU outside the widest window [-1024, 3071] come back clipped.
    expected = hu_from_windows(window_channels(torch.from_numpy(hu)[None, None], DEFAULT_WINDOWS), DEFAULT_WINDOWS)[0, 0].numpy()
    np.testing.assert_allclose(out, expected, rtol=0, atol=2e-3)
    np.testing.assert_allclose(out, np.clip(hu, -1024.0, 3071.0), rtol=0, atol=2e-3)


def test_channels_beyond_their_windows_do_not_leave_the_widest_window():
    hu = np.random.default_rng(2).uniform(-1100.0, 3500.0, size=(4, 16, 16)).astype(np.float32)
    out = _enhance(FakeTask(gain=3.0), hu)
    assert out.min() == pytest.approx(-1024.0) and out.max() == pytest.approx(3071.0)


def test_each_window_has_its_own_seed_so_the_batch_size_does_not_matter():
    hu = np.random.default_rng(1).uniform(-50.0, 50.0, size=(6, 30, 30)).astype(np.float32)
    one, many = FakeTask(jitter=0.01), FakeTask(jitter=0.01)
    a = _enhance(one, hu, batch_size=1, seed=3)
    b = _enhance(many, hu, batch_size=7, seed=3)
    assert set(one.calls) == {1} and max(many.calls) == 7
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-4)
    # Another seed draws other noise.
    c = _enhance(FakeTask(jitter=0.01), hu, batch_size=7, seed=4)
    assert np.abs(c - a).max() > 0.1


def test_a_volume_thinner_than_the_clip_is_one_error_line():
    with pytest.raises(DataError) as info:
        _enhance(FakeTask(), np.zeros((2, 64, 64), dtype=np.float32), name="thin.nii.gz")
    message = str(info.value)
    assert "\n" not in message and "thin.nii.gz" in message and "[2, 64, 64]" in message and "[4, 16, 16]" in message
    with pytest.raises(DataError, match=r"\[8, 12, 64\]"):
        _enhance(FakeTask(), np.zeros((8, 12, 64), dtype=np.float32))


def test_overlap_option():
    assert parse_overlap(None) == (0.5, 0.25, 0.25)
    assert parse_overlap("0.5") == (0.5, 0.5, 0.5)
    assert parse_overlap("0.5,0.25") == (0.5, 0.25, 0.25)
    assert parse_overlap("0,0.1,0.2") == (0.0, 0.1, 0.2)
    for bad in ("1", "-0.1", "a", "0.1,0.1,0.1,0.1"):
        with pytest.raises(ConfigError, match="--overlap"):
            parse_overlap(bad)


def test_inputs_of_a_file_a_case_a_split_and_a_data_folder(ct_pairs_root, tmp_path):
    cases = sorted(p for split in ("train", "val", "test") for p in (ct_pairs_root / split).iterdir())
    case = cases[0]
    (one,) = find_inputs(case, "source", "target")
    assert one.name == case.name and one.source == case / "source.nii.gz" and one.target == case / "target.nii.gz"
    assert find_inputs(case / "source.nii.gz", "source", "target") == [one]
    other = tmp_path / "scan.nii.gz"
    other.write_bytes((case / "source.nii.gz").read_bytes())
    assert [(i.name, i.target) for i in find_inputs(other, "source", "target")] == [("scan", None)]
    assert sorted(i.name for i in find_inputs(ct_pairs_root, "source", "target")) == sorted(c.name for c in cases)
    assert [i.name for i in find_inputs(ct_pairs_root / "test", "source", "target")] == [
        c.name for c in cases if c.parent.name == "test"
    ]
    with pytest.raises(DataError, match="no source.nii.gz"):
        find_inputs(tmp_path, "source", "target")


# ---- metrics and the classical denoiser -------------------------------------------------------------
def test_noise_estimate_and_slice_ssim_match_references():
    from skimage.metrics import structural_similarity

    rng = np.random.default_rng(0)
    assert noise_sigma(rng.normal(0.0, 10.0, size=(128, 128))) == pytest.approx(10.0, rel=0.05)
    a = rng.uniform(-160, 240, size=(3, 40, 36)).astype(np.float32)
    b = (a + rng.normal(0, 30, size=a.shape)).astype(np.float32)
    reference = np.mean(
        [
            structural_similarity(x, y, data_range=400, gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
            for x, y in zip(a, b)
        ]
    )
    assert slice_ssim(a, b, 400.0) == pytest.approx(reference, abs=1e-4)


def test_nlm_beats_the_noisy_input_in_the_soft_tissue_window(ct_pairs_root):
    case = next((ct_pairs_root / "test").iterdir())
    source, _ = load_volume(case / "source.nii.gz")
    target, _ = load_volume(case / "target.nii.gz")
    noisy, denoised = scores(source, target), scores(nlm_denoise(source), target)
    assert noisy["psnr_soft_db"] == pytest.approx(_psnr(source, target, -160, 240), abs=1e-9)
    assert denoised["psnr_soft_db"] > noisy["psnr_soft_db"] + 3.0
    assert denoised["ssim_soft"] > noisy["ssim_soft"] + 0.05


# ---- the commands ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def translate_run(ct_pairs_root, tmp_path_factory):
    run = tmp_path_factory.mktemp("translate") / "run"
    overrides = [
        *TINY_TRANSLATE,
        f"data.root={ct_pairs_root}",
        f"run.dir={run}",
        "training.steps=2",
        "training.val_every=2",
        "training.checkpoint_every=2",
    ]
    train(compose([], overrides), Console(file=open(os.devnull, "w")))
    return run


def _test_case(root):
    return next((root / "test").iterdir())


def test_sample_input_case_writes_the_enhanced_volume_on_the_inputs_grid(translate_run, ct_pairs_root, tmp_path, capsys):
    case = _test_case(ct_pairs_root)
    code, out, err = _run(capsys, "sample", "--run", translate_run, "--input", case, "--out", tmp_path)
    assert code == 0, err
    written = tmp_path / f"{case.name}_enhanced.nii.gz"
    source = nib.load(case / "source.nii.gz")
    image = nib.load(written)
    assert image.shape == source.shape and image.get_data_dtype() == np.float32
    np.testing.assert_allclose(image.affine, source.affine, atol=1e-5)
    volume = np.asarray(image.dataobj)
    assert np.isfinite(volume).all() and -1024.0 - 1e-3 <= volume.min() and volume.max() <= 3071.0 + 1e-3
    assert (tmp_path / f"{case.name}_enhanced.png").stat().st_size > 0
    assert out.count("\n") == 1 and "enhanced 1 volume" in out and "ddim:4" in out
    # The tiny run trained on the slabs resampled to 32 x 32: 4x coarser than the input's voxels.
    assert "differ by more than 10%" in err


def test_sample_input_folder_writes_one_volume_per_case(translate_run, ct_pairs_root, tmp_path, capsys):
    code, out, err = _run(capsys, "sample", "--run", translate_run, "--input", ct_pairs_root, "--out", tmp_path, "--steps", "1")
    assert code == 0, err
    names = sorted(p.name for split in ("train", "val", "test") for p in (ct_pairs_root / split).iterdir())
    assert sorted(p.name for p in tmp_path.glob("*.nii.gz")) == [f"{n}_enhanced.nii.gz" for n in names]
    assert "enhanced 3 volumes" in out and "ddim:1" in out


def test_sample_of_a_thin_volume_is_one_error_line(translate_run, ct_pairs_root, tmp_path, capsys):
    volume, affine = load_volume(_test_case(ct_pairs_root) / "source.nii.gz")
    thin = save_volume(tmp_path / "thin.nii.gz", volume[:2], affine)
    code, out, err = _run(capsys, "sample", "--run", translate_run, "--input", thin, "--out", tmp_path / "out")
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "thin.nii.gz" in lines[0] and "[2, 128, 128]" in lines[0]
    assert not (tmp_path / "out").exists()


def test_sample_flags_that_do_not_fit_the_run_are_one_error_line(translate_run, ct_pairs_root, tmp_path, capsys):
    code, _, err = _run(capsys, "sample", "--run", translate_run)
    assert code == 2 and err.count("\n") == 1 and "--input" in err
    diffusion = tmp_path / "diffusion"
    diffusion.mkdir()
    (diffusion / "config.yaml").write_text(to_yaml(compose([], [])))
    code, _, err = _run(capsys, "sample", "--run", diffusion, "--input", _test_case(ct_pairs_root))
    assert code == 2 and err.count("\n") == 1 and "--input" in err and "task=diffusion" in err


def test_evaluate_scores_input_enhanced_and_nlm(translate_run, ct_pairs_root, tmp_path, capsys):
    case = _test_case(ct_pairs_root)
    code, out, err = _run(capsys, "evaluate", "--run", translate_run, "--out", tmp_path / "eval", "--device", "cpu")
    assert code == 0, err
    table = (tmp_path / "eval" / "translate.md").read_text()
    for method in ("input", "enhanced", "nlm"):
        assert f"| {case.name} | {method} |" in table and f"| **mean** | {method} |" in table
    assert "[-160, 240] HU, data range 400" in table and "[-1024, 3071] HU, data range 4095" in table
    assert out.splitlines()[-1].startswith("evaluated 1 pair of 'test'")
    rows = {(r["case"], r["method"]): r for r in csv.DictReader((tmp_path / "eval" / "translate.csv").open())}
    source, _ = load_volume(case / "source.nii.gz")
    target, _ = load_volume(case / "target.nii.gz")
    for low, high, key in ((-160, 240, "psnr_soft_db"), (-1024, 3071, "psnr_full_db")):
        assert float(rows[(case.name, "input")][key]) == pytest.approx(_psnr(source, target, low, high), abs=1e-6)
    assert float(rows[(case.name, "nlm")]["psnr_soft_db"]) > float(rows[(case.name, "input")]["psnr_soft_db"])
    assert (
        rows[(case.name, "input")]["seconds_per_volume"] == "" and float(rows[(case.name, "enhanced")]["seconds_per_volume"]) > 0
    )
    # The enhanced row scores what `voxgen sample --input` writes (same seed, sampler and overlap).
    assert _run(capsys, "sample", "--run", translate_run, "--input", case, "--out", tmp_path / "sample")[0] == 0
    enhanced, _ = load_volume(tmp_path / "sample" / f"{case.name}_enhanced.nii.gz")
    assert float(rows[(case.name, "enhanced")]["psnr_soft_db"]) == pytest.approx(_psnr(enhanced, target, -160, 240), abs=1e-6)
