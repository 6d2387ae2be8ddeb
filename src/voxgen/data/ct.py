"""Paired CT for the CT-enhancement task: a real head CT and its simulated low-dose scan.

The embedded head CT (`embedded/head_ct.nii.gz`; embedded/README.md says where it comes from)
is one real scan: 108 axial slices of 128 x 128 at 1.914 x 1.914 x 1.5 mm, int16 Hounsfield
units. `make_ct_pairs` cuts it into slabs of consecutive slices; each slab is one case whose
target is the scan as acquired and whose source is the same slab after `low_dose`. Every case
is a slab of ONE patient's head: val and test pairs hold out anatomy levels of that head, not
other patients, so their scores say how well a model denoises unseen slices of a head it has
seen, not how it generalises across patients or scanners.

`window_channels` / `hu_from_windows` turn HU into the network's windowed channels and back.
scikit-image (the projector) and torch (the windows) are imported only by the functions that
use them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from voxgen.data import synth
from voxgen.data.layout import SPLITS, split_counts
from voxgen.data.nifti import load_volume, voxel_sizes
from voxgen.errors import ConfigError, DataError

if TYPE_CHECKING:
    import torch

HEAD_CT = Path(__file__).parent / "embedded" / "head_ct.nii.gz"
SOURCE_NOTE = "InVesalius example Cranium.inv3 (ProMED CT 0051), Debian invesalius-examples 3.1.99998-4, GPL-2"

# Linear attenuation of water at 70 keV, the effective energy of a ~120 kVp beam: mu/rho =
# 0.1937 cm^2/g, log-log interpolated between NIST XCOM's 60 keV (0.2059) and 80 keV (0.1837)
# values (Hubbell & Seltzer, NIST X-ray mass attenuation coefficients), times 1 g/cm^3.
MU_WATER_PER_MM = 0.01937
# Views over 180 degrees (parallel beam): 1 degree apart, as skimage's default.
DEFAULT_ANGLES = 180
# Incident photons per detector bin (one pixel, 1.914 mm on the embedded head) per view. Adds noise
# of std 16-17 HU in the brain of the embedded head (15.7-17.4 HU on slices 40, 50, 60, 70), three to
# four times the scan's own (~5 HU): plainly visible in a brain window [0, 80] while ventricles and
# sulci stay recognisable. The std goes as 1 / sqrt(photons): 1e5 -> ~23 HU, 5e5 -> ~10.5 HU.
DEFAULT_PHOTONS = 2e5
DEFAULT_SLAB = 12  # 108 slices -> 9 slabs, each holding one 8-slice clip of the seed's model and room to move it
DEFAULT_CASES = 9
MODALITIES = ("source", "target")
# The seed's three input channels: brain, soft tissue, and a wide one from air to dense bone.
DEFAULT_WINDOWS = ((0.0, 80.0), (-160.0, 240.0), (-1024.0, 3071.0))
# A channel within this much of -1 or 1 counts as saturated when windows are read back (hu_from_windows):
# 2.5 % of the window's width at each end.
SATURATION_MARGIN = 0.05


def mu_from_hu(hu, mu_water: float = MU_WATER_PER_MM):
    """Linear attenuation (1/mm) of HU: mu = mu_water (1 + HU / 1000). Air (-1000 HU) is 0."""
    return mu_water * (1.0 + np.asarray(hu, dtype=np.float64) / 1000.0)


def hu_from_mu(mu, mu_water: float = MU_WATER_PER_MM):
    """HU of a linear attenuation (1/mm): the inverse of `mu_from_hu`."""
    return (np.asarray(mu, dtype=np.float64) / mu_water - 1.0) * 1000.0


def _theta(angles: int | Sequence[float]) -> np.ndarray:
    """View angles in degrees: `angles` views over [0, 180), or the angles themselves."""
    if isinstance(angles, (int, np.integer)):
        if angles < 1:
            raise ConfigError(f"angles: need at least 1 view, got {angles}")
        return np.arange(angles, dtype=np.float64) * (180.0 / angles)
    return np.asarray(angles, dtype=np.float64)


def project(slice_hu: np.ndarray, pixel_mm: float, angles: int | Sequence[float] = DEFAULT_ANGLES) -> np.ndarray:
    """Line integrals of attenuation (dimensionless) of a square (N, N) HU slice: (bins, views).

    Parallel-beam sinogram by `skimage.transform.radon` of mu * pixel size; the whole square is
    projected (circle=False: bins = ceil(N sqrt 2)). HU below -1000 (the padding outside a scanner's
    field of view, -1024) count as air.
    """
    from skimage.transform import radon

    mu = np.clip(mu_from_hu(slice_hu), 0.0, None)
    return radon(mu * pixel_mm, _theta(angles), circle=False)


def reconstruct(sinogram: np.ndarray, pixel_mm: float, size: int, angles: int | Sequence[float] = DEFAULT_ANGLES) -> np.ndarray:
    """Filtered back projection (ramp filter, `skimage.transform.iradon`) of line integrals -> (size, size) HU."""
    return hu_from_mu(_fbp_mu(sinogram, pixel_mm, size, angles))


def _fbp_mu(sinogram: np.ndarray, pixel_mm: float, size: int, angles) -> np.ndarray:
    from skimage.transform import iradon

    return iradon(sinogram, _theta(angles), output_size=size, filter_name="ramp", circle=False) / pixel_mm


def low_dose(
    slice_hu: np.ndarray,
    photons: float,
    rng: np.random.Generator,
    angles: int | Sequence[float] = DEFAULT_ANGLES,
    *,
    pixel_mm: float,
    keep_resolution: bool = True,
) -> np.ndarray:
    """The slice as a scan with `photons` incident photons per detector bin and view: (H, W) HU float32.

    Line integrals p of the slice (`project`); transmitted counts N ~ Poisson(photons exp(-p)),
    clipped to N >= 1 (a ray with no photon left has no finite log); noisy integrals
    p' = -log(N / photons); filtered back projection (ramp filter) to HU.

    keep_resolution (default): return slice + FBP(p' - p), the reconstructed noise of the low-dose
    scan added to the slice itself. FBP is linear, so this is FBP(p') with the deterministic error of
    the noiseless round trip FBP(p) - slice taken out: skimage's discrete radon -> iradon blurs
    edges and aliases the skull into moire streaks across the brain (measured on slices 40-70 of
    the embedded head: mean |error| 33-41 HU inside the head, 5-11 HU in the brain, up to ~550 HU
    at bone edges; 3 HU inside a uniform disk), which no scanner would add. False: FBP(p') itself,
    blur and streaks included.

    Physical: Poisson photon statistics of the transmitted beam, the log transform, and FBP's
    noise texture (ramp-filtered, correlated) and photon-starvation streaks behind dense bone.
    Simplified: 2-D parallel beam per slice (no fan or cone beam, no helical interpolation);
    monochromatic beam (no beam hardening: mu scales with HU at one energy); no electronic noise,
    scatter, detector blur or bowtie filter; one photon count for every ray; the real scan's own
    noise stays in it (the source has both). Non-square slices are padded with air to a square.
    """
    hu = np.asarray(slice_hu, dtype=np.float64)
    if hu.ndim != 2:
        raise ValueError(f"low_dose: expected one (H, W) slice, got shape {list(hu.shape)}")
    if not (np.isfinite(photons) and photons > 0):
        raise ConfigError(f"photons: must be a positive number, got {photons}")
    h, w = hu.shape
    n = max(h, w)
    top, left = (n - h) // 2, (n - w) // 2
    square = np.full((n, n), -1000.0)
    square[top : top + h, left : left + w] = hu
    clean = project(square, pixel_mm, angles)
    counts = np.maximum(rng.poisson(photons * np.exp(-clean)), 1)
    noisy = -np.log(counts / photons)
    if keep_resolution:
        out = square + _fbp_mu(noisy - clean, pixel_mm, n, angles) * (1000.0 / MU_WATER_PER_MM)
    else:
        out = reconstruct(noisy, pixel_mm, n, angles)
    return out[top : top + h, left : left + w].astype(np.float32)


def _check_windows(windows) -> list[tuple[float, float]]:
    pairs = [(float(lo), float(hi)) for lo, hi in windows]
    if not pairs:
        raise ConfigError("windows: need at least one [low, high] window")
    for lo, hi in pairs:
        if not hi > lo:
            raise ConfigError(f"windows: window [{lo:g}, {hi:g}] must have high > low")
    return pairs


def window_channels(hu: torch.Tensor, windows: Sequence[Sequence[float]] = DEFAULT_WINDOWS) -> torch.Tensor:
    """(B, 1, D, H, W) HU -> (B, len(windows), D, H, W): window [low, high] -> [-1, 1], clipped.

    Differentiable (zero gradient where clipped); on hu's device and dtype.
    """
    import torch

    pairs = _check_windows(windows)
    if hu.ndim != 5 or hu.shape[1] != 1:
        raise ValueError(f"window_channels: expected (B, 1, D, H, W) HU, got shape {list(hu.shape)}")
    lo = torch.tensor([p[0] for p in pairs], dtype=hu.dtype, device=hu.device).view(1, -1, 1, 1, 1)
    hi = torch.tensor([p[1] for p in pairs], dtype=hu.dtype, device=hu.device).view(1, -1, 1, 1, 1)
    return (2.0 * (hu - lo) / (hi - lo) - 1.0).clamp(-1.0, 1.0)  # (B, K, D, H, W)


def hu_from_windows(channels: torch.Tensor, windows: Sequence[Sequence[float]] = DEFAULT_WINDOWS) -> torch.Tensor:
    """(B, K, D, H, W) windowed channels -> (B, 1, D, H, W) HU, the inverse of `window_channels`.

    From the widest window to the narrowest, a narrower window's reading replaces a voxel's value
    so far where the narrower channel is clear of saturation (by SATURATION_MARGIN) and the value
    so far lies no further outside the narrower window than the margin of the window it came from
    (SATURATION_MARGIN of that window's width, halved). Channels beyond [-1, 1] are overshoots, not
    values. Exact up to float error for HU inside the widest window, with the resolution of the
    narrowest window that holds them. A network's channels can disagree, and the wider window
    vetoes only a gross contradiction: a skull voxel whose brain channel came out at 0.8 rather
    than 1 (72 HU) keeps the wide window's 500 HU, while a brain voxel the wide channel puts at
    120 HU still takes the brain window's value. Air whose brain channel is -0.99, not -1, stays
    air. Differentiable through the
    chosen channel.
    """
    import torch

    pairs = _check_windows(windows)
    if channels.ndim != 5 or channels.shape[1] != len(pairs):
        raise ValueError(f"hu_from_windows: expected (B, {len(pairs)}, D, H, W) channels, got shape {list(channels.shape)}")
    widest_first = sorted(range(len(pairs)), key=lambda k: pairs[k][1] - pairs[k][0], reverse=True)
    inside = 1.0 - SATURATION_MARGIN
    out = margin = None
    for k in widest_first:
        lo, hi = pairs[k]
        c = channels[:, k : k + 1]  # (B, 1, D, H, W)
        value = lo + (c.clamp(-1.0, 1.0) + 1.0) * (0.5 * (hi - lo))
        own_margin = 0.5 * SATURATION_MARGIN * (hi - lo)  # HU
        if out is None:
            out, margin = value, torch.full_like(value, own_margin)
            continue
        speaks = (c.abs() < inside) & (out > lo - margin) & (out < hi + margin)
        out = torch.where(speaks, value, out)
        margin = torch.where(speaks, torch.full_like(margin, own_margin), margin)
    return out


def _default_splits(cases: int) -> dict[str, int]:
    """About 2/3 train, 2/9 val, 1/9 test, each at least 1 (9 -> 6/2/1)."""
    if cases < len(SPLITS):
        raise ConfigError(f"cases: need at least {len(SPLITS)} slabs (one per split), got {cases}")
    test = max(1, round(cases / 9))
    val = max(1, round(2 * cases / 9))
    return {"train": cases - val - test, "val": val, "test": test}


def slab_splits(cases: int, counts: Mapping[str, int]) -> dict[str, list[int]]:
    """Slab positions (0 = lowest) of each split: held-out slabs spread evenly between the ends.

    The lowest and highest slabs (skull base, vertex) hold the least brain, so they train; the
    test slabs are the middle ones of the held-out set (9 slabs, 6/2/1: val 2 and 6, test 4).
    """
    held = counts["val"] + counts["test"]
    positions = list(range(cases)) if held >= cases else [(j + 1) * cases // (held + 1) for j in range(held)]
    start = (held - counts["test"]) // 2
    test = positions[start : start + counts["test"]]
    val = [p for p in positions if p not in test]
    train = [p for p in range(cases) if p not in positions]
    return {"train": train, "val": val, "test": test}


def make_ct_pairs(
    root,
    cases: int = DEFAULT_CASES,
    slab: int = DEFAULT_SLAB,
    photons: float = DEFAULT_PHOTONS,
    seed: int = 0,
    splits=None,
    *,
    angles: int = DEFAULT_ANGLES,
    head: str | Path | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Write `cases` source/target pairs cut from the embedded head CT; returns root.

    Layout: ROOT/{train,val,test}/slab_<first slice>/{source,target}.nii.gz, float32 HU, each
    pair on its slab's grid (the head's affine with the origin moved to the slab's first slice).
    The slabs are `slab` consecutive axial slices, adjacent, centred in the head (the default
    9 x 12 covers all 108 slices). `splits` is {split: count} or (train, val, test); default
    about 2/3, 2/9, 1/9 (9 -> 6/2/1), held-out slabs as `slab_splits` says. Every case is part of
    one patient's head (see the module docstring). Deterministic given `seed`: the noise of a
    slice depends only on (seed, its index in the head). `head` replaces the embedded CT
    (a NIfTI volume in HU with square in-plane pixels).
    """
    path = HEAD_CT if head is None else Path(head)
    volume, affine = load_volume(path)
    depth = volume.shape[0]
    if slab < 2:
        raise ConfigError(f"slab: need at least 2 slices per slab (a NIfTI case is a 3-D volume), got {slab}")
    counts = _default_splits(cases) if splits is None else split_counts(cases, splits)
    if cases * slab > depth:
        raise ConfigError(f"cases x slab: {cases} slabs of {slab} slices need {cases * slab}, the head CT has {depth}")
    sx, sy, _ = voxel_sizes(affine)
    if not math.isclose(sx, sy, rel_tol=1e-4):
        raise DataError(f"{path}: in-plane voxels are {sx:g} x {sy:g} mm; the projector needs square pixels")
    first = (depth - cases * slab) // 2
    starts = [first + i * slab for i in range(cases)]
    positions = slab_splits(cases, counts)
    order = [p for split in SPLITS for p in positions[split]]  # writing order: train, val, test
    names = [f"slab_{starts[p]:03d}" for p in order]

    def make(index: int) -> dict[str, np.ndarray]:
        z0 = starts[order[index]]
        target = volume[z0 : z0 + slab]
        source = np.stack(
            [low_dose(target[k], photons, np.random.default_rng([seed, z0 + k]), angles, pixel_mm=sx) for k in range(slab)]
        )
        return {"source": source, "target": target}

    def slab_affine(index: int) -> np.ndarray:
        shift = np.eye(4)
        shift[2, 3] = starts[order[index]]  # voxel index z0 of the head is the slab's first slice
        return affine @ shift

    params = dict(
        generator="ct-pairs",
        head=SOURCE_NOTE if head is None else str(head),
        slab=slab,
        photons=photons,
        angles=angles,
        seed=seed,
        modalities=list(MODALITIES),
        slabs={name: [starts[p], starts[p] + slab - 1] for name, p in zip(names, order)},
    )
    return synth.write_dataset(root, "slab", cases, counts, make, slab_affine, params, progress, names=names)
