"""How well a translate run (CT enhancement, seed 003) restores held-out pairs, next to doing nothing
and a classical denoiser.

For every case of a split, three volumes are scored against the case's target (full-dose) scan:

    input     the source (low-dose) scan as given
    enhanced  the run's whole-volume enhancement of it (voxgen.tasks.enhance)
    nlm       non-local means (Buades et al. 2005; `skimage.restoration.denoise_nl_means`)

Everything is in HU on the files' own grid, as `voxgen sample --input` enhances them (nothing is
resampled to the run's data.shape). Each score is computed in two ranges: both volumes clipped to
the range, its width the data range:

    soft tissue  [-160, 240] HU, data range 400: the window readers use for brain and soft tissue,
                 where a low-dose scan's noise shows
    full         [-1024, 3071] HU, data range 4095: a scanner's 12-bit range, bone and air included

PSNR is `voxgen.evaluation.pixel.psnr` of the whole volume (one MSE over all voxels). SSIM is 2-D,
per axial slice, averaged over slices: slabs of CT are a few thick slices, which a 3-D window of 11
voxels would not fit or would reduce to a handful of positions; its window, constants and valid
region are those of `voxgen.evaluation.pixel.ssim` (Gaussian, 11 voxels, sigma 1.5, K1 0.01, K2 0.03,
population covariance; the window shrinks to the largest odd size that fits a smaller slice).

NLM works per axial slice, in 2-D: the low-dose noise of CT arises slice by slice (each slice is
reconstructed from its own projections: independent between slices, correlated within one by
filtered back projection), slices are often thicker than the in-plane pixels, and 2-D works on
slabs of any thickness at about 1/30 of the time of 3-D. Its settings are fixed, not tuned per case:
patches of 5 x 5, search distance 6, `fast_mode`, sigma = the slice's noise estimate (`noise_sigma`,
from the source alone) and h = 0.8 sigma, scikit-image's recommendation for fast mode with sigma
given; on the 9 embedded slabs (`voxgen data ct-pairs`) 0.8 was within 0.2 dB of the best of
h / sigma in {0.4, 0.6, 0.8, 1.0, 1.2} in the soft-tissue window.
"""

from __future__ import annotations

import csv
import io
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from voxgen.data.nifti import load_volume
from voxgen.evaluation.pixel import psnr
from voxgen.files import write_atomic
from voxgen.tasks.enhance import DEFAULT_BATCH, DEFAULT_OVERLAP, enhance_volume


@dataclass(frozen=True)
class HURange:
    """A range of HU that both volumes are clipped to before they are compared."""

    name: str
    low: float
    high: float

    @property
    def data_range(self) -> float:
        return self.high - self.low


SOFT_TISSUE = HURange("soft tissue", -160.0, 240.0)
FULL = HURange("full", -1024.0, 3071.0)
RANGES = (SOFT_TISSUE, FULL)

SSIM_WINDOW, SSIM_SIGMA = 11, 1.5
NLM_PATCH, NLM_DISTANCE, NLM_H = 5, 6, 0.8
# Median absolute deviation of a normal variable / its standard deviation (Donoho & Johnstone 1994).
MAD_TO_SIGMA = 0.6744897501960817

METHODS = ("input", "enhanced", "nlm")
# (CSV column, Markdown header) of every score, in order.
COLUMNS = (
    ("psnr_soft_db", "PSNR soft (dB)"),
    ("ssim_soft", "SSIM soft"),
    ("psnr_full_db", "PSNR full (dB)"),
    ("ssim_full", "SSIM full"),
)


@dataclass(frozen=True)
class TranslateRow:
    case: str  # a case id, or "mean" over the cases
    method: str  # one of METHODS
    values: dict  # COLUMNS' keys -> float
    seconds: float  # per volume; nan for the input (nothing to compute)


@dataclass(frozen=True)
class Pair:
    """A held-out case: its id and the files of its source and target."""

    case: str
    source: Path
    target: Path


# ---- the classical denoiser -----------------------------------------------------------------------
def noise_sigma(image: np.ndarray) -> float:
    """Standard deviation of the noise of a 2-D image, estimated from the image alone: the median
    absolute value of its finest diagonal Haar wavelet coefficients / 0.6745 (Donoho & Johnstone 1994;
    what `skimage.restoration.estimate_sigma` computes, there with the db2 wavelet and PyWavelets)."""
    x = np.asarray(image, dtype=np.float64)
    x = x[: x.shape[0] // 2 * 2, : x.shape[1] // 2 * 2]
    diagonal = (x[0::2, 0::2] - x[0::2, 1::2] - x[1::2, 0::2] + x[1::2, 1::2]) / 2.0  # orthonormal Haar HH
    return float(np.median(np.abs(diagonal)) / MAD_TO_SIGMA)


def nlm_denoise(hu: np.ndarray) -> np.ndarray:
    """(D, H, W) HU -> the same denoised by non-local means per axial slice (settings: module docstring)."""
    from skimage.restoration import denoise_nl_means

    out = np.empty(hu.shape, dtype=np.float32)
    for k, image in enumerate(np.asarray(hu, dtype=np.float64)):
        sigma = noise_sigma(image)
        out[k] = denoise_nl_means(
            image, patch_size=NLM_PATCH, patch_distance=NLM_DISTANCE, h=NLM_H * sigma, sigma=sigma, fast_mode=True
        )
    return out


# ---- scores -----------------------------------------------------------------------------------------
def slice_ssim(pred: np.ndarray, target: np.ndarray, data_range: float) -> float:
    """Mean over axial slices of the 2-D SSIM of (D, H, W) volumes (window: module docstring)."""
    from monai.metrics.regression import compute_ssim_and_cs

    size = min(SSIM_WINDOW, min(pred.shape[1:]) - (1 - min(pred.shape[1:]) % 2))
    x = torch.as_tensor(np.asarray(pred, dtype=np.float32))[:, None]  # (D, 1, H, W): slices as a batch
    y = torch.as_tensor(np.asarray(target, dtype=np.float32))[:, None]
    ssim_map, _ = compute_ssim_and_cs(
        x, y, spatial_dims=2, kernel_size=(size, size), kernel_sigma=(SSIM_SIGMA, SSIM_SIGMA), data_range=data_range
    )
    return float(ssim_map.double().mean())


def scores(pred: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """PSNR and slice SSIM of a (D, H, W) HU volume against the target, in each of RANGES."""
    out = {}
    for hu_range, (psnr_key, ssim_key) in zip(RANGES, (COLUMNS[0:2], COLUMNS[2:4])):
        p = np.clip(pred, hu_range.low, hu_range.high)
        t = np.clip(target, hu_range.low, hu_range.high)
        out[psnr_key[0]] = float(
            psnr(torch.from_numpy(p)[None, None], torch.from_numpy(t)[None, None], data_range=hu_range.data_range)[0]
        )
        out[ssim_key[0]] = slice_ssim(p, t, hu_range.data_range)
    return out


def evaluate_pairs(
    task,
    pairs: Sequence[Pair],
    sampler: Callable,
    grid: torch.Tensor,
    *,
    overlap: Sequence[float] = DEFAULT_OVERLAP,
    seed: int = 0,
    batch_size: int = DEFAULT_BATCH,
    progress: Callable[[int, str, int, int], None] | None = None,
    inspect: Callable[[Pair, np.ndarray], None] | None = None,
) -> list[TranslateRow]:
    """Rows (input, enhanced, nlm) for every pair, then their means (case "mean"). `progress(index,
    case, windows done, windows)` follows the enhancement; `inspect(pair, affine)` sees each source's
    affine (the voxel-size warning)."""
    rows = []
    for index, pair in enumerate(pairs):
        source, affine = load_volume(pair.source)
        target, _ = load_volume(pair.target)
        if inspect is not None:
            inspect(pair, affine)
        began = time.perf_counter()
        enhanced = enhance_volume(
            task,
            source,
            sampler,
            grid,
            overlap=overlap,
            seed=seed,
            batch_size=batch_size,
            progress=None if progress is None else lambda done, total: progress(index, pair.case, done, total),
            name=str(pair.source),
        )
        enhance_seconds = time.perf_counter() - began
        began = time.perf_counter()
        denoised = nlm_denoise(source)
        nlm_seconds = time.perf_counter() - began
        for method, volume, seconds in (
            ("input", source, math.nan),
            ("enhanced", enhanced, enhance_seconds),
            ("nlm", denoised, nlm_seconds),
        ):
            rows.append(TranslateRow(pair.case, method, scores(volume, target), seconds))
    return rows + mean_rows(rows)


def mean_rows(rows: Sequence[TranslateRow]) -> list[TranslateRow]:
    """One row per method: the mean of every score and of the seconds over the cases."""
    out = []
    for method in METHODS:
        mine = [r for r in rows if r.method == method]
        if mine:
            values = {key: float(np.mean([r.values[key] for r in mine])) for key, _ in COLUMNS}
            out.append(TranslateRow("mean", method, values, float(np.mean([r.seconds for r in mine]))))
    return out


# ---- tables -------------------------------------------------------------------------------------------
def to_markdown(rows: Sequence[TranslateRow], title: str, notes: Sequence[str] = ()) -> str:
    """A Markdown table (title, rows, notes)."""
    cols = ["case", "method", *(header for _, header in COLUMNS), "s / volume"]
    lines = [f"## {title}", "", "| " + " | ".join(cols) + " |", "|---|---|" + "---:|" * (len(cols) - 2)]
    for r in rows:
        cells = [f"**{r.case}**" if r.case == "mean" else r.case, r.method]
        cells += [f"{r.values[key]:.2f}" if key.startswith("psnr") else f"{r.values[key]:.4f}" for key, _ in COLUMNS]
        cells.append("-" if math.isnan(r.seconds) else f"{r.seconds:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    if notes:
        lines.append("")
        lines += [f"- {note}" for note in notes]
    return "\n".join(lines) + "\n"


def to_csv(rows: Sequence[TranslateRow]) -> str:
    """Full-precision CSV: case, method, every score, seconds per volume (empty for the input)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["case", "method", *(key for key, _ in COLUMNS), "seconds_per_volume"])
    for r in rows:
        writer.writerow(
            [r.case, r.method, *(repr(r.values[key]) for key, _ in COLUMNS), "" if math.isnan(r.seconds) else repr(r.seconds)]
        )
    return buf.getvalue()


def describe(solver: str, overlap: Sequence[float], seed: int, split: str, windows: Sequence[Sequence[float]]) -> list[str]:
    """The notes under the table: what was compared, how, and the metric definitions."""
    shown = ", ".join(f"{f:g}" for f in overlap)
    low, high = min(w[0] for w in windows), max(w[1] for w in windows)
    return [
        f"Pairs of the '{split}' split, on the files' own grid, in HU; each method is scored against the case's target.",
        "input: the source as given. enhanced: the run's EMA model over the whole volume, clip by clip "
        f"({solver}; windows overlapping by {shown} of a clip along D, H, W, blended with linear tapers; "
        f"window i seeded {seed} + i). nlm: non-local means per axial slice (patch 5, distance 6, fast mode, "
        "h = 0.8 sigma, sigma estimated per slice from the source by the MAD of its finest diagonal Haar "
        "coefficients).",
        f"soft: both volumes clipped to [{SOFT_TISSUE.low:g}, {SOFT_TISSUE.high:g}] HU, data range "
        f"{SOFT_TISSUE.data_range:g}. full: clipped to [{FULL.low:g}, {FULL.high:g}] HU, data range {FULL.data_range:g}.",
        "PSNR: 10 log10(range^2 / MSE) over all voxels of a volume. SSIM: 2-D per axial slice (Gaussian window "
        "11, sigma 1.5, K1 0.01, K2 0.03, where the window fits), averaged over slices.",
        f"The enhanced volume is decoded from the run's CT windows (translate.windows), so it lies in [{low:g}, {high:g}] "
        f"HU: air and padding below {low:g} HU come back at {low:g}, an error the full range counts and the soft-tissue "
        "window does not.",
        "s / volume: wall time of the enhancement (sampling every window, decoding, blending) or of NLM, per volume.",
    ]


def write_translate_tables(
    rows: Sequence[TranslateRow], out_dir: str | Path, title: str, notes: Sequence[str]
) -> tuple[Path, Path]:
    """OUT/translate.md and OUT/translate.csv, each whole or not at all."""
    out_dir = Path(out_dir)
    md = write_atomic(out_dir / "translate.md", to_markdown(rows, title, notes))
    csv_path = write_atomic(out_dir / "translate.csv", to_csv(rows))
    return md, csv_path
