"""3D PSNR, SSIM and MS-SSIM against scikit-image, the formula, an independent MS-SSIM and MONAI's
per-scale SSIM (MS-SSIM with fewer scales on volumes below 176 voxels per axis)."""

import numpy as np
import pytest
import torch
from scipy import ndimage

from voxgen.errors import VoxgenError
from voxgen.evaluation.pixel import MS_SSIM_WEIGHTS, VolumeTooSmall, ms_ssim, ms_ssim_min_size, ms_ssim_scales, psnr, ssim

skimage_metrics = pytest.importorskip("skimage.metrics")


def _pair(shape, noise=0.3, seed=0):
    """A smooth random volume in [-1, 1] and a noisy copy, (1, 1, *shape) float64 tensors."""
    rng = np.random.default_rng(seed)
    a = np.tanh(ndimage.gaussian_filter(rng.normal(size=shape), 1.5) * 4)
    b = np.clip(a + noise * rng.normal(size=shape), -1, 1)
    return torch.from_numpy(a)[None, None], torch.from_numpy(b)[None, None]


def test_ssim_matches_scikit_image_on_3d_volumes():
    for shape, noise in (((20, 24, 22), 0.3), ((13, 30, 17), 0.8)):
        a, b = _pair(shape, noise)
        ours = ssim(b, a, data_range=2.0)
        reference = skimage_metrics.structural_similarity(
            a[0, 0].numpy(), b[0, 0].numpy(), data_range=2.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False
        )
        assert ours.shape == (1,)
        assert abs(ours[0] - reference) < 1e-3
        assert 0.05 < reference < 0.95  # a pair that tests something


def test_ssim_is_per_volume_and_one_for_identical_volumes():
    a, b = _pair((16, 16, 16))
    batch_pred, batch_target = torch.cat([a, b]), torch.cat([a, a])
    values = ssim(batch_pred, batch_target, data_range=2.0)
    assert values[0] == pytest.approx(1.0, abs=1e-6)
    assert values[1] == pytest.approx(ssim(b, a, data_range=2.0)[0], abs=1e-9)
    assert values[1] < 0.9


def test_ssim_says_the_window_does_not_fit():
    a, _ = _pair((8, 16, 16))
    with pytest.raises(VolumeTooSmall, match="11-voxel window.*minimum 11"):
        ssim(a, a, data_range=2.0)


def test_data_range_is_required_and_checked():
    a, b = _pair((12, 12, 12))
    with pytest.raises(TypeError):
        psnr(a, b)  # no default: a forgotten range must not silently be 1
    with pytest.raises(VoxgenError, match="data_range must be a positive number"):
        ssim(a, b, data_range=0)
    with pytest.raises(VoxgenError, match=r"differ in shape"):
        psnr(a, b[..., :-1], data_range=2.0)


def test_psnr_is_the_formula_exactly():
    a, b = _pair((10, 12, 14), noise=0.2)
    mse = float(((a - b) ** 2).mean())
    assert psnr(b, a, data_range=2.0)[0] == pytest.approx(10 * np.log10(4.0 / mse), rel=1e-12)
    assert psnr(b, a, data_range=1.0)[0] == pytest.approx(10 * np.log10(1.0 / mse), rel=1e-12)
    assert psnr(a, a, data_range=2.0)[0] == np.inf


def _reference_ms_ssim(x, y, win, sigma, weights, data_range):
    """Independent MS-SSIM: scipy Gaussian filters cropped to the valid region, 2x2x2 block means."""
    truncate = (win // 2) / sigma  # scipy's radius = int(truncate * sigma + 0.5) = win // 2
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    r = win // 2
    factors = []
    for scale, w in enumerate(weights):
        f = lambda v: ndimage.gaussian_filter(v, sigma, truncate=truncate, mode="constant")[r:-r, r:-r, r:-r]
        mx, my = f(x), f(y)
        vx, vy, cxy = f(x * x) - mx**2, f(y * y) - my**2, f(x * y) - mx * my
        cs = (2 * cxy + c2) / (vx + vy + c2)
        value = cs if scale < len(weights) - 1 else cs * (2 * mx * my + c1) / (mx**2 + my**2 + c1)
        factors.append(max(value.mean(), 0.0) ** w)
        d, h, wd = (s // 2 * 2 for s in x.shape)
        x = x[:d, :h, :wd].reshape(d // 2, 2, h // 2, 2, wd // 2, 2).mean(axis=(1, 3, 5))
        y = y[:d, :h, :wd].reshape(d // 2, 2, h // 2, 2, wd // 2, 2).mean(axis=(1, 3, 5))
    return float(np.prod(factors))


def test_ms_ssim_matches_an_independent_implementation_and_monai():
    from monai.metrics.regression import compute_ms_ssim

    a, b = _pair((48, 50, 49), noise=0.4)
    ours = ms_ssim(b, a, data_range=2.0, win_size=3)[0]
    reference = _reference_ms_ssim(b[0, 0].numpy(), a[0, 0].numpy(), 3, 1.5, MS_SSIM_WEIGHTS, 2.0)
    monai = float(compute_ms_ssim(b.float(), a.float(), spatial_dims=3, data_range=2.0, kernel_size=3))
    assert ours == pytest.approx(reference, abs=1e-4)
    assert ours == pytest.approx(monai, abs=1e-6)
    assert 0.1 < ours < 0.99
    assert ms_ssim(a, a, data_range=2.0, win_size=3)[0] == pytest.approx(1.0, abs=1e-6)


def test_ms_ssim_minimum_size_is_the_window_after_all_halvings():
    assert ms_ssim_min_size(11, 5) == 176
    # Four scales of a 3-voxel window need 3 * 2^3 = 24 voxels (MONAI's own check would ask for 27).
    a, b = _pair((24, 24, 24), noise=0.4)
    weights = (0.25, 0.25, 0.25, 0.25)
    ours = ms_ssim(b, a, data_range=2.0, win_size=3, weights=weights)[0]
    assert ours == pytest.approx(_reference_ms_ssim(b[0, 0].numpy(), a[0, 0].numpy(), 3, 1.5, weights, 2.0), abs=1e-4)
    with pytest.raises(VolumeTooSmall, match=r"volumes \[23, 24, 24\] are too small for 4 scales .* at least 24 voxels"):
        ms_ssim(b[..., :23, :, :], a[..., :23, :, :], data_range=2.0, win_size=3, weights=weights)
    # The default weights use the scales that fit; only a volume below the window itself is refused.
    with pytest.raises(VolumeTooSmall, match=r"volumes \[10, 24, 24\] are smaller than the 11-voxel window"):
        ms_ssim(b[..., :10, :, :], a[..., :10, :, :], data_range=2.0)


def test_ms_ssim_scales_is_the_largest_count_whose_window_fits():
    assert ms_ssim_scales((176, 176, 176)) == 5
    assert ms_ssim_scales((4096, 4096, 4096)) == 5  # never more than the five weights
    assert ms_ssim_scales((160, 256, 256)) == 4  # the seeds' volumes
    assert ms_ssim_scales((256, 175, 256)) == 4  # the shortest axis decides, wherever it is
    assert ms_ssim_scales((87, 256, 256)) == 3
    assert ms_ssim_scales((22, 22, 22)) == 2
    assert ms_ssim_scales((21, 64, 64)) == 1
    assert ms_ssim_scales((11, 11, 11)) == 1
    assert ms_ssim_scales((80, 128, 128), win_size=7) == 4
    for s in range(1, 6):  # consistent with the size each count needs
        assert ms_ssim_scales((ms_ssim_min_size(11, s),) * 3) == s
    with pytest.raises(VolumeTooSmall, match=r"volumes \[10, 64, 64\] are smaller than the 11-voxel window"):
        ms_ssim_scales((10, 64, 64))


def _monai_ms_ssim(x, y, win, scales, data_range=2.0):
    """MS-SSIM of one pair (1, 1, D, H, W) from MONAI's per-scale `compute_ssim_and_cs`: contrast-
    structure at the first scales - 1 scales, SSIM at the last, to the powers of the first `scales`
    Wang et al. weights renormalised to sum to 1."""
    from monai.metrics.regression import compute_ssim_and_cs

    weights = np.asarray(MS_SSIM_WEIGHTS[:scales]) / sum(MS_SSIM_WEIGHTS[:scales])
    x, y = x.float(), y.float()
    value = 1.0
    for scale, w in enumerate(weights):
        ssim_map, cs_map = compute_ssim_and_cs(
            x, y, spatial_dims=3, kernel_size=(win,) * 3, kernel_sigma=(1.5,) * 3, data_range=data_range
        )
        value *= max(float((ssim_map if scale == scales - 1 else cs_map).mean()), 0.0) ** w
        x, y = torch.nn.functional.avg_pool3d(x, 2), torch.nn.functional.avg_pool3d(y, 2)
    return value


def test_ms_ssim_below_176_voxels_uses_fewer_scales_with_renormalised_weights():
    # The seeds' 160 x 256 x 256 volumes (4 scales of the 11-voxel window) take ~25 s per scale-1
    # SSIM on one CPU thread; half and quarter size with a 7-voxel window keep the shape and give 4
    # and 3 scales.
    for shape, win, scales in (((80, 128, 128), 7, 4), ((40, 64, 64), 7, 3)):
        a, b = _pair(shape, noise=0.4)
        assert ms_ssim_scales(shape, win) == scales
        ours = ms_ssim(b, a, data_range=2.0, win_size=win)
        assert ours.shape == (1,)
        assert ours[0] == pytest.approx(_monai_ms_ssim(b, a, win, scales), abs=1e-6)
        assert 0.1 < ours[0] < 0.99  # a pair that tests something
    # Per volume in a batch, and the default window: 40 voxels give it 2 scales.
    a, b = _pair((40, 64, 64), noise=0.4)
    values = ms_ssim(torch.cat([b, a]), torch.cat([a, a]), data_range=2.0)
    assert values[0] == pytest.approx(_monai_ms_ssim(b, a, 11, 2), abs=1e-6)
    assert values[1] == pytest.approx(1.0, abs=1e-6)
