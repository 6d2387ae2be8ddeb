"""The metric registry on hand-made inputs: thresholding, pairing, per-view averaging."""

import numpy as np
import pytest

from voxgen.errors import VoxgenError
from voxgen.evaluation import distribution
from voxgen.evaluation.features import build_extractor
from voxgen.evaluation.metrics import METRICS, Inputs, applicable, get_metric, header, prepare_samples


def _box(lo, hi, shape=(12, 12, 12)):
    m = -np.ones(shape, dtype=np.float32)
    m[tuple(slice(a, b) for a, b in zip(lo, hi))] = 1.0
    return m


def test_generated_masks_are_thresholded_and_images_clipped():
    soft = np.array([[-0.9, -0.01, 0.01, 0.7]])
    assert prepare_samples(soft, is_mask=True).tolist() == [[-1.0, -1.0, 1.0, 1.0]]
    assert prepare_samples(np.array([-1.5, 0.2, 1.2]), is_mask=False).tolist() == pytest.approx([-1.0, 0.2, 1.0])


def test_mask_metrics_through_the_registry():
    reals = np.stack([_box((1, 1, 1), (5, 5, 5)), _box((6, 6, 6), (9, 9, 9))])
    soft = np.stack([_box((1, 1, 1), (5, 5, 5)) * 0.3, _box((6, 6, 6), (9, 9, 9)) * 0.3])  # soft, same support
    samples = prepare_samples(soft, is_mask=True)
    inputs = Inputs("seg", True, samples, reals, targets=reals, spacing=(2.0, 1.0, 1.0))
    assert METRICS["dice"].fn(inputs) == pytest.approx(1.0)
    assert METRICS["hd95"].fn(inputs) == 0.0
    assert METRICS["lesions"].fn(inputs) == 1.0
    assert METRICS["lesion_count_w1"].fn(inputs) == 0.0
    assert METRICS["lesion_size_w1"].fn(inputs) == 0.0
    shifted = Inputs("seg", True, np.stack([_box((2, 1, 1), (6, 5, 5)), reals[1]]), reals, targets=reals)
    assert METRICS["dice"].fn(shifted) == pytest.approx((0.75 + 1.0) / 2)  # 48 of 64 voxels shared


def test_feature_metrics_average_over_views():
    class TwoViews:
        name, comparable = "fake", True

        def __call__(self, volumes):
            flat = volumes.reshape(len(volumes), -1)
            return {"a": flat[:, :3].astype(np.float64), "b": flat[:, 3:6].astype(np.float64) * 2}

    rng = np.random.default_rng(0)
    samples, reals = rng.normal(size=(6, 2, 2, 2)), rng.normal(size=(5, 2, 2, 2)) + 0.5
    inputs = Inputs("bravo", False, samples, reals, extractor=TwoViews())
    fs, fr = TwoViews()(samples[:, None]), TwoViews()(reals[:, None])
    expected = (distribution.fid(fs["a"], fr["a"]) + distribution.fid(fs["b"], fr["b"])) / 2
    assert METRICS["fid"].fn(inputs) == pytest.approx(expected, rel=1e-12)
    assert inputs.real_features is not None  # cached for the next solver configuration


def test_paired_metrics_need_pairs_and_applicability():
    inputs = Inputs("bravo", False, np.zeros((2, 12, 12, 12), np.float32), np.zeros((2, 12, 12, 12), np.float32))
    with pytest.raises(VoxgenError, match="paired metrics need conditioned samples"):
        METRICS["psnr"].fn(inputs)
    assert applicable(METRICS["psnr"], is_mask=False, paired=True)
    assert not applicable(METRICS["psnr"], is_mask=False, paired=False)
    assert not applicable(METRICS["dice"], is_mask=False, paired=True)
    assert applicable(METRICS["fid"], is_mask=True, paired=False)
    assert header(METRICS["kid"], build_extractor("random3d")) == "KID (random3d)"
    assert header(METRICS["ssim"], build_extractor("random3d")) == "SSIM"
    with pytest.raises(VoxgenError, match="unknown metric 'lpips'"):
        get_metric("lpips")
