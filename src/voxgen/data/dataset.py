"""Cases on disk -> tensors in model space, and a whole-folder check.

Model space: images in [-1, 1], masks in {-1, 1}, each modality a float32 tensor
(1, D, H, W) on the data set's grid `shape` = [D, H, W].
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from voxgen.data.layout import (
    MASK_MODALITIES,
    SPLITS,
    Case,
    Modalities,
    case_folders,
    case_problems,
    list_cases,
    root_problem,
    shared_cases,
)
from voxgen.data.nifti import load_volume, resized_affine, voxel_size_problem
from voxgen.errors import ConfigError, DataError

AFFINE_TOLERANCE_MM = 1e-3
MASK_TOLERANCE = 1e-3
# Upper percentile used as the image's white point. The maximum is set by a few
# voxels (vessels, fat, contrast-enhancing rims of the very lesions we model), so
# scaling by it would squeeze the brain into a narrow band; 99.5 % keeps brain
# contrast and clips only those outliers to 1.
UPPER_PERCENTILE = 99.5


def scale_image(volume: np.ndarray) -> np.ndarray:
    """(D, H, W) image -> [-1, 1]: (x - min) / (p99.5 - min) clipped to [0, 1], then 2x - 1.

    A constant image maps to -1 everywhere.
    """
    lo = float(volume.min())
    hi = float(np.percentile(volume, UPPER_PERCENTILE))
    scaled = (volume - lo) / max(hi - lo, 1e-12)
    return (2.0 * np.clip(scaled, 0.0, 1.0) - 1.0).astype(np.float32)


INTENSITIES = ("percentile", "fixed")


@dataclass(frozen=True)
class Intensity:
    """How an image volume maps to [-1, 1] (`data.intensity`, `data.intensity_range`).

    percentile: each volume by its own minimum and 99.5th percentile (`scale_image`; MRI, whose
    units are arbitrary). fixed: one linear map for every volume, [low, high] -> [-1, 1], clipped
    (CT in HU: the source and target of a pair must share one scale); `to_units` inverts it.
    """

    name: str = "percentile"
    low: float = -1024.0
    high: float = 3071.0

    def __post_init__(self):
        if self.name not in INTENSITIES:
            raise ConfigError(f"data.intensity: {self.name!r} is not one of {', '.join(INTENSITIES)}")
        if not (np.isfinite(self.low) and np.isfinite(self.high) and self.high > self.low):
            raise ConfigError(f"data.intensity_range: [{self.low:g}, {self.high:g}] must be finite with high > low")

    @classmethod
    def of(cls, data_cfg) -> Intensity:
        """From a config's `data` section."""
        bounds = [float(v) for v in data_cfg.intensity_range]
        if len(bounds) != 2:
            raise ConfigError(f"data.intensity_range: expected [low, high], got {bounds}")
        return cls(str(data_cfg.intensity), bounds[0], bounds[1])

    def scale(self, volume: np.ndarray) -> np.ndarray:
        """(D, H, W) image -> float32 in [-1, 1]."""
        if self.name == "percentile":
            return scale_image(volume)
        scaled = (np.asarray(volume, dtype=np.float64) - self.low) * (2.0 / (self.high - self.low)) - 1.0
        return np.clip(scaled, -1.0, 1.0).astype(np.float32)

    def to_units(self, x):
        """Model space -> the data's units (HU for CT): the inverse of `scale` inside [low, high].

        Works on numpy arrays and torch tensors alike. ValueError for `percentile`, whose scale
        differs per volume: the units are unknown.
        """
        if self.name != "fixed":
            raise ValueError(f"data.intensity={self.name}: each volume has its own scale, so model space has no units")
        return (x + 1.0) * (0.5 * (self.high - self.low)) + self.low


def mask_problem(volume: np.ndarray) -> str | None:
    """Why a mask volume is not binary {0, 1}, or None when it is."""
    off = np.minimum(np.abs(volume), np.abs(volume - 1.0)) > MASK_TOLERANCE
    if off.any():
        values = np.unique(volume[off])
        shown = ", ".join(f"{v:g}" for v in values[:3]) + (", ..." if values.size > 3 else "")
        return f"mask is not binary {{0, 1}} ({int(off.sum())} voxels with other values: {shown})"
    return None


def resample(volume: torch.Tensor, shape: Sequence[int], is_mask: bool) -> torch.Tensor:
    """(1, D, H, W) -> (1, *shape): trilinear for images, nearest neighbour for masks.

    Both use voxel-centre alignment (align_corners=False / 'nearest-exact'), the
    convention `resized_affine` assumes; torch's plain 'nearest' floors indices and
    would shift masks by up to half a voxel against the images.
    """
    if tuple(volume.shape[1:]) == tuple(shape):
        return volume
    mode = "nearest-exact" if is_mask else "trilinear"
    kwargs = {} if is_mask else {"align_corners": False}
    return F.interpolate(volume[None], size=tuple(shape), mode=mode, **kwargs)[0]


@dataclass(frozen=True)
class _Seen:
    """Where an image was first read."""

    split: str
    case: str
    path: Path


def _split_order(split: str) -> int:
    return SPLITS.index(split) if split in SPLITS else len(SPLITS)


class ImageIndex:
    """Digests of the images read from one data folder, to find the same image read twice.

    The digest is BLAKE2b of the shape and the canonical float32 voxels that `read_case` holds
    anyway: no file is read a second time, and a copy written again (another compression level,
    on-disk type or axis order) is found, which a digest of the file's bytes would miss (gzip
    even stores a time stamp). Constant volumes are left out: every case without a lesion has the
    same empty mask, and a constant image is refused on its own.
    """

    def __init__(self):
        self._seen: dict[bytes, _Seen] = {}
        # Repeats within one split, one line each in the order found (a data set made again
        # finds them again): a duplicate that counts twice, not a leak; `check_folder` warns.
        self.within_split: dict[str, None] = {}

    def add(self, case: Case, path: Path, volume: np.ndarray) -> str | None:
        """Record an image; the problem line when the same voxels were read in another split.

        The line blames the file of the later split (train, val, test) whichever was read
        first, so `voxgen train` and `voxgen data check` say the same.
        """
        if float(volume.min()) == float(volume.max()):
            return None
        digest = hashlib.blake2b(repr(volume.shape).encode(), digest_size=16)
        digest.update(np.ascontiguousarray(volume).data)
        key = digest.digest()
        here = _Seen(case.split, case.id, path)
        first = self._seen.get(key)
        if first is None or first.path == path:  # new, or the same file read again
            self._seen[key] = here
            return None
        if first.split == case.split:
            self.within_split[f"{path}: same voxels as {first.path} in the same split: a duplicate counts twice"] = None
            return None
        if first.case == case.id:
            return None  # the same case name in two splits: `shared_cases` reports the folder
        later, earlier = (here, first) if _split_order(case.split) > _split_order(first.split) else (first, here)
        return (
            f"{later.path}: same voxels as {earlier.path} in split '{earlier.split}': "
            "the same image in two splits leaks data between them"
        )


def read_case(
    case: Case,
    modalities: Iterable[str],
    report: Callable[[str], None],
    images: ImageIndex | None = None,
    masks: Sequence[str] = MASK_MODALITIES,
    own_grid: Sequence[str] = (),
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Load a case's modalities and check each file and the files against each other.

    Returns {modality: (volume (D, H, W), affine)} for the files that passed. Each problem
    is passed to `report` as one line naming the file; `report` may raise. Problems: the
    file cannot be loaded (see `load_volume`), implausible voxel sizes, a shape or affine
    differing from the case's first file (modalities of `own_grid` are neither compared nor
    compared with), a mask (one of `masks`) that is not binary, an image whose voxels
    are all equal (scaling it to [-1, 1] gives a blank volume the model would learn from),
    and, with `images`, the same voxels as a file of another split already read into it.
    """
    loaded: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    first: tuple[Path, np.ndarray, np.ndarray] | None = None
    for modality in modalities:
        path = case.path(modality)
        try:
            volume, affine = load_volume(path)
        except DataError as exc:
            report(str(exc))
            continue
        problem = voxel_size_problem(affine)
        if problem:
            report(f"{path}: {problem}")
            continue
        if modality in own_grid:
            pass
        elif first is None:
            first = (path, volume, affine)
        elif volume.shape != first[1].shape:
            report(f"{path}: shape {list(volume.shape)} differs from {first[0]} shape {list(first[1].shape)}")
            continue
        elif np.abs(affine - first[2]).max() > AFFINE_TOLERANCE_MM:
            diff = float(np.abs(affine - first[2]).max())
            report(f"{path}: affine differs from {first[0]} by {diff:.3g} mm (tolerance {AFFINE_TOLERANCE_MM} mm)")
            continue
        if modality in masks:
            problem = mask_problem(volume)
        elif float(volume.max()) == float(volume.min()):
            problem = f"image is constant (every voxel {float(volume.min()):g})"
        else:
            problem = None
        if problem:
            report(f"{path}: {problem}")
            continue
        leak = images.add(case, path, volume) if images is not None else None
        if leak:
            report(leak)
            continue
        loaded[modality] = (volume, affine)
    return loaded


def _raise(message: str) -> None:
    raise DataError(message)


class VolumeDataset(torch.utils.data.Dataset):
    """One split of a data folder as model-space tensors.

    `dataset[i]` is {modality: float32 tensor (1, D, H, W), "case": case id}, with
    (D, H, W) = `shape`. Images are scaled to [-1, 1] by `intensity` (default: per volume, see
    `scale_image`), masks
    (`layout.masks`) are {-1, 1}. Volumes whose grid differs from
    `shape` are resampled (trilinear for images, nearest for masks). Modalities on a grid of their
    own (`layout.grids`) are resampled to theirs instead and scaled per volume (their units are not
    the others': X-ray line integrals next to CT in HU). With
    cache=True processed tensors are kept in memory; treat them as read-only.

    images: an ImageIndex shared by the data sets of one folder (the trainer's train and val
    sets): the first read of each case compares its images with those the others read, and a
    train image copied into val stops training when val is read.
    """

    def __init__(
        self,
        root,
        split: str,
        modalities: Sequence[str],
        shape: Sequence[int],
        cache: bool = True,
        images: ImageIndex | None = None,
        layout: Modalities = Modalities(),
        intensity: Intensity = Intensity(),
    ):
        self.root = Path(root)
        self.split = split
        self.modalities = (modalities,) if isinstance(modalities, str) else tuple(modalities)
        if not self.modalities:
            raise DataError(f"{self.root}: no modalities requested for split '{split}'")
        self.shape = tuple(int(s) for s in shape)
        if len(self.shape) != 3 or min(self.shape) < 1:
            raise DataError(f"{self.root}: data shape must be [D, H, W] of positive sizes, got {list(shape)}")
        self.cache = cache
        self.layout = layout
        self.intensity = intensity
        self.cases: list[Case] = list_cases(self.root, split, self.modalities, layout.known)
        leaks = shared_cases(self.root, involving=split)
        if leaks:
            raise DataError(leaks[0])
        self.images = images
        self._compared: set[int] = set()  # without the cache, later reads need not compare again
        self._cache: dict[int, dict] = {}
        self._affine: np.ndarray | None = None

    @classmethod
    def of(cls, data_cfg, split: str, modalities: Sequence[str], images: ImageIndex | None = None) -> VolumeDataset:
        """One split of the data set a config's `data` section describes: its folder, grid, cache,
        modality names and intensity scaling."""
        return cls(
            data_cfg.root,
            split,
            modalities,
            data_cfg.shape,
            data_cfg.cache,
            images,
            Modalities.of(data_cfg),
            Intensity.of(data_cfg),
        )

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, index: int) -> dict:
        if index in self._cache:
            return dict(self._cache[index])
        case = self.cases[index]
        item: dict = {"case": case.id}
        images = None if index in self._compared else self.images
        own = dict(self.layout.grids)
        volumes = read_case(case, self.modalities, _raise, images, self.layout.masks, tuple(own))
        self._compared.add(index)
        for modality, (volume, _) in volumes.items():
            is_mask = modality in self.layout.masks
            if is_mask:
                values = (volume > 0.5).astype(np.float32)
            elif modality in own:
                values = scale_image(volume)
            else:
                values = self.intensity.scale(volume)
            tensor = resample(torch.from_numpy(values)[None], own.get(modality, self.shape), is_mask)
            if is_mask:
                tensor = torch.where(tensor > 0.5, 1.0, -1.0)
            item[modality] = tensor.to(torch.float32).contiguous()
        if self.cache:
            self._cache[index] = item
        return dict(item)

    @property
    def affine(self) -> np.ndarray:
        """Reference affine: the first case's first modality, resized to `shape`.

        Samples are written with it. (4, 4) float64 for (x, y, z) = (W, H, D) indices.
        """
        if self._affine is None:
            volume, affine = load_volume(self.cases[0].path(self.modalities[0]))
            self._affine = resized_affine(affine, volume.shape, self.shape)
        return self._affine.copy()


def check_folder(
    root,
    modalities: Sequence[str] | None = None,
    warn: Callable[[str], None] | None = None,
    layout: Modalities = Modalities(),
) -> list[str]:
    """Every problem of a data folder, one line each naming the file; [] means OK.

    Checks every split (missing, a file, empty), every case folder (no files, unknown
    NIfTI files, missing modalities), every requested modality file of every case (default:
    every modality of `layout`; see
    `read_case`), case ids shared between splits and images repeated in another split; it
    collects problems instead of stopping at the first. A `VolumeDataset` raises the same
    lines, the first it meets. An image repeated within one split is not a problem: it is
    passed to `warn`, one line each.
    """
    root = Path(root)
    modalities = layout.known if modalities is None else (modalities,) if isinstance(modalities, str) else tuple(modalities)
    problem = root_problem(root)
    if problem:
        return [problem]
    problems: list[str] = []
    images = ImageIndex()
    for split in SPLITS:
        try:
            cases = case_folders(root, split)
        except DataError as exc:
            problems.append(str(exc))
            continue
        for case in cases:
            problems.extend(case_problems(case, modalities, layout.known))
            present = [m for m in modalities if case.path(m).is_file()]
            read_case(case, present, problems.append, images, layout.masks, tuple(dict(layout.grids)))
    problems.extend(shared_cases(root))
    if warn is not None:
        for line in images.within_split:
            warn(line)
    return problems
