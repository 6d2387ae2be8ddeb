"""The metric registry: one function of `Inputs` per metric, one registry line each.

A metric sees one generated modality at a time: the samples, the reference volumes of the split,
and (for conditioned modes) the real volume of the case whose condition made each sample. Image
samples are clipped to [-1, 1] and mask samples thresholded to {-1, 1} before any metric sees
them (`prepare_samples`), so no metric compares soft values with binary masks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from voxgen.errors import VoxgenError
from voxgen.evaluation import distribution, masks, pixel
from voxgen.evaluation.anatomy import GroupScore, Priors, score_group, tissue_order
from voxgen.evaluation.distances import intensity_w1, lesion_fraction_w1
from voxgen.evaluation.features import Extractor

# Model space: images in [-1, 1], so the pixel metrics' data range is 2.
DATA_RANGE = 2.0


def prepare_samples(volumes, is_mask: bool) -> np.ndarray:
    """Model-space samples as the metrics see them: masks thresholded at 0 to {-1, 1}, images
    clipped to [-1, 1] (what `voxgen sample` writes)."""
    volumes = volumes.numpy() if isinstance(volumes, torch.Tensor) else np.asarray(volumes)
    if is_mask:
        return np.where(masks.binarize(volumes, "model"), 1.0, -1.0).astype(np.float32)
    return np.clip(volumes, -1.0, 1.0).astype(np.float32)


@dataclass
class Inputs:
    """What the metrics of one modality get. Arrays are (N, D, H, W) in model space."""

    modality: str
    is_mask: bool
    samples: np.ndarray
    reals: np.ndarray
    targets: np.ndarray | None = None  # (N, D, H, W): the real volume paired with each sample
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)  # mm along (D, H, W)
    extractor: Extractor | None = None
    real_features: dict[str, np.ndarray] | None = None  # cached by the caller across sample sets
    # Size-bin modes: the tumour counts per size bin requested of each sample, (N, 7).
    requested_bins: np.ndarray | None = None
    # Template-space data (voxgen.evaluation.anatomy): the MNI152 tissue labels on the data's grid.
    priors: Priors | None = None
    _sample_features: dict[str, np.ndarray] | None = field(default=None, repr=False)
    _bin_adherence: dict | None = field(default=None, repr=False)
    _anatomy: GroupScore | None = field(default=None, repr=False)

    def features(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """({view: sample features}, {view: reference features}), each computed once."""
        if self.extractor is None:
            raise VoxgenError("distribution metrics need a feature extractor")
        if self._sample_features is None:
            self._sample_features = self.extractor(self.samples[:, None])
        if self.real_features is None:
            self.real_features = self.extractor(self.reals[:, None])
        return self._sample_features, self.real_features

    def paired(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.targets is None:
            raise VoxgenError(f"{self.modality}: paired metrics need conditioned samples (a mode with conditions)")
        return torch.from_numpy(self.samples[:, None]), torch.from_numpy(self.targets[:, None])


def _per_view(inputs: Inputs, fn: Callable[[np.ndarray, np.ndarray], float]) -> float:
    """A feature-set distance averaged over the extractor's views (three planes or one volume)."""
    gen, real = inputs.features()
    return float(np.mean([fn(gen[view], real[view]) for view in gen]))


def psnr(inputs: Inputs) -> float:
    return float(np.mean(pixel.psnr(*inputs.paired(), data_range=DATA_RANGE)))


def ssim(inputs: Inputs) -> float:
    return float(np.mean(pixel.ssim(*inputs.paired(), data_range=DATA_RANGE)))


def ms_ssim(inputs: Inputs) -> float:
    return float(np.mean(pixel.ms_ssim(*inputs.paired(), data_range=DATA_RANGE)))


def fid(inputs: Inputs) -> float:
    return _per_view(inputs, distribution.fid)


def kid(inputs: Inputs) -> float:
    return _per_view(inputs, lambda a, b: distribution.kid(a, b).mean)


def mmd(inputs: Inputs) -> float:
    return _per_view(inputs, distribution.mmd)


def dice(inputs: Inputs) -> float:
    pred, target = inputs.paired()
    return float(np.mean(masks.dice(pred[:, 0], target[:, 0])))


def hd95(inputs: Inputs) -> float:
    pred, target = inputs.paired()
    return float(np.mean(masks.hd95(pred[:, 0], target[:, 0], inputs.spacing)))


def lesion_count_w1(inputs: Inputs) -> float:
    from scipy.stats import wasserstein_distance

    return float(
        wasserstein_distance(
            masks.lesion_stats(inputs.samples, inputs.spacing).counts, masks.lesion_stats(inputs.reals, inputs.spacing).counts
        )
    )


def lesion_size_w1(inputs: Inputs) -> float:
    from scipy.stats import wasserstein_distance

    gen = masks.lesion_stats(inputs.samples, inputs.spacing).sizes_mm3
    real = masks.lesion_stats(inputs.reals, inputs.spacing).sizes_mm3
    if not len(gen) or not len(real):
        return float("nan")
    return float(wasserstein_distance(gen, real))


def lesions_per_mask(inputs: Inputs) -> float:
    return masks.lesion_stats(inputs.samples, inputs.spacing).mean_count


def bin_adherence_of(inputs: Inputs) -> dict:
    """`tumour_bins.bin_adherence` of the samples' measured size bins against their requests,
    measured once per `Inputs`."""
    from voxgen.data.tumour_bins import bin_adherence, size_bin_vector

    if inputs.requested_bins is None:
        raise VoxgenError(f"{inputs.modality}: size-bin metrics need a size-bin mode (seg_conditioned)")
    if inputs._bin_adherence is None:
        spacing_xyz = tuple(reversed(inputs.spacing))  # Inputs.spacing is (D, H, W) = (z, y, x)
        measured = [size_bin_vector(mask, spacing_xyz) for mask in inputs.samples]
        inputs._bin_adherence = bin_adherence(inputs.requested_bins, measured)
    return inputs._bin_adherence


def bins_exact(inputs: Inputs) -> float:
    return bin_adherence_of(inputs)["exact_fraction"]


def bins_mae(inputs: Inputs) -> float:
    return float(np.mean(bin_adherence_of(inputs)["mean_abs_error_per_bin"]))


def anatomy_of(inputs: Inputs) -> GroupScore:
    """Per-tissue anatomy Dice of the samples, averaged over them; computed once per `Inputs`."""
    if inputs.priors is None:
        raise VoxgenError(f"{inputs.modality}: the anatomy score needs data in MNI152 template space")
    if inputs._anatomy is None:
        order = tissue_order(inputs.modality)
        inputs._anatomy = score_group("samples", list(inputs.samples), inputs.priors, order)
    return inputs._anatomy


def anatomy(inputs: Inputs) -> float:
    return anatomy_of(inputs).mean


def intensity(inputs: Inputs) -> float:
    return intensity_w1(inputs.samples, inputs.reals)


def lesion_fraction(inputs: Inputs) -> float:
    return lesion_fraction_w1(inputs.samples, inputs.reals)


@dataclass(frozen=True)
class Metric:
    """name: registry key and CLI choice; label: table header (feature metrics add the extractor);
    needs: 'pairs' (conditioned samples), 'features' (an extractor), 'sets' (the two sets),
    'size_bins' (the size-bin requests of a seg_conditioned mode) or 'template' (T1-weighted data
    in MNI152 space);
    kind: 'image', 'mask' or 'any' modality; better: 'lower', 'higher' or 'none' (a statistic)."""

    name: str
    label: str
    fn: Callable[[Inputs], float]
    needs: str
    kind: str
    better: str
    summary: str


METRICS: dict[str, Metric] = {
    m.name: m
    for m in (
        Metric(
            "psnr", "PSNR (dB)", psnr, "pairs", "image", "higher", "peak signal-to-noise ratio vs the paired case, data range 2"
        ),
        Metric("ssim", "SSIM", ssim, "pairs", "image", "higher", "3D SSIM, Gaussian window 11, sigma 1.5, vs the paired case"),
        Metric(
            "ms_ssim",
            "MS-SSIM",
            ms_ssim,
            "pairs",
            "image",
            "higher",
            "3D MS-SSIM, window 11, 5 scales; fewer below 176 voxels per axis (weights renormalised)",
        ),
        Metric("fid", "FID", fid, "features", "any", "lower", "Fréchet distance of Gaussians fitted to features"),
        Metric("kid", "KID", kid, "features", "any", "lower", "unbiased MMD^2, cubic polynomial kernel, 100 subsets"),
        Metric("mmd", "MMD", mmd, "features", "any", "lower", "unbiased MMD^2, RBF kernel, median-distance bandwidth"),
        Metric(
            "anatomy",
            "anatomy",
            anatomy,
            "template",
            "image",
            "higher",
            "mean Dice of 3 intensity classes (CSF, GM, WM) with the MNI152 tissue priors (docs/evaluation.md)",
        ),
        Metric("intensity_w1", "intensity W1", intensity, "sets", "image", "lower", "W1 of voxel intensities inside the head"),
        Metric("dice", "Dice", dice, "pairs", "mask", "higher", "Dice vs the paired case's mask"),
        Metric("hd95", "HD95 (mm)", hd95, "pairs", "mask", "lower", "95th-percentile Hausdorff distance vs the paired mask"),
        Metric(
            "lesions", "lesions/mask", lesions_per_mask, "sets", "mask", "none", "mean number of 26-connected lesions per sample"
        ),
        Metric("lesion_count_w1", "lesion-count W1", lesion_count_w1, "sets", "mask", "lower", "W1 of lesions per mask"),
        Metric("lesion_size_w1", "lesion-size W1 (mm^3)", lesion_size_w1, "sets", "mask", "lower", "W1 of lesion volumes"),
        Metric(
            "bins_exact",
            "bins exact",
            bins_exact,
            "size_bins",
            "mask",
            "higher",
            "fraction of samples whose 7 measured size-bin counts all equal the requested ones",
        ),
        Metric(
            "bins_mae",
            "bins MAE",
            bins_mae,
            "size_bins",
            "mask",
            "lower",
            "mean absolute error of the size-bin counts, averaged over samples and the 7 bins",
        ),
        Metric(
            "lesion_fraction_w1",
            "lesion-fraction W1",
            lesion_fraction,
            "sets",
            "mask",
            "lower",
            "W1 of per-mask lesion volume fractions",
        ),
    )
}


def applicable(metric: Metric, is_mask: bool, paired: bool, size_bins: bool = False, template: bool = False) -> bool:
    """Whether `metric` can be computed for a modality (mask or image) with or without pairs, with
    or without size-bin requests, and in template space (T1-weighted, MNI152) or not."""
    kind_ok = metric.kind == "any" or (metric.kind == "mask") == is_mask
    return (
        kind_ok
        and (metric.needs != "pairs" or paired)
        and (metric.needs != "size_bins" or size_bins)
        and (metric.needs != "template" or template)
    )


def get_metric(name: str) -> Metric:
    if name not in METRICS:
        raise VoxgenError(f"unknown metric '{name}' (have: {', '.join(METRICS)})")
    return METRICS[name]


def header(metric: Metric, extractor: Extractor | None) -> str:
    """Table header: a feature metric names its extractor, e.g. 'FID (random3d)'."""
    if metric.needs == "features" and extractor is not None:
        return f"{metric.label} ({extractor.name})"
    return metric.label
