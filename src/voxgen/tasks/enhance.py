"""Whole-volume CT enhancement with a `task=translate` run (seed 003): any volume, clip by clip.

The network of a translate run sees clips of `translate.clip` = [T, h, w] voxels. A volume of any
size (D >= T, H >= h, W >= w) is enhanced by tiling it with windows of the clip's size that overlap:

    tiling    along each axis, the fewest windows whose neighbours overlap by at least the asked
              fraction of the clip (default: half a clip along D, a quarter in-plane), spread evenly
              from the first voxel to the last (the last window flush with the end)
    sampling  `TranslateTask.enhance_clips` on batches of windows; window i of a volume draws its
              noise from its own CPU generator seeded `seed + i`, so results do not depend on the
              batch size or the device
    blending  each window's channels decoded to HU (`hu_from_windows`) and added
              with a separable trapezoid weight (`taper`): at most 1 in its middle, falling linearly
              over the overlap to 1 / (overlap + 1) at its faces, never 0; the sums are divided by the
              summed weights. Where two windows overlap by exactly the asked amount, their weights sum
              to 1 (a linear cross-fade), so no seam shows

Volumes go in and come out in HU, (D, H, W) RAS as `voxgen.data.nifti.load_volume` reads them; the
network's input is made the way training made it (the run's `data.intensity` scaling, then
`TranslateTask.channels`). Volumes keep their own grid: nothing is resampled, and `voxel_size_warning`
says when a volume's voxels differ from those the run trained on.

`find_inputs` turns what `voxgen sample --input PATH` names (a NIfTI file, a case folder, a split
or data folder) into the volumes to enhance; `write_enhanced` writes one result.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from voxgen.data.ct import hu_from_windows
from voxgen.data.layout import SUFFIX
from voxgen.data.nifti import save_volume, voxel_sizes
from voxgen.diffusion.noise import seeded_generators
from voxgen.errors import ConfigError, DataError
from voxgen.reports.mosaic import save_mosaic

# Overlap of neighbouring windows, as a fraction of the clip along (D, H, W).
DEFAULT_OVERLAP = (0.5, 0.25, 0.25)
# Windows enhanced together (one batch of the network).
DEFAULT_BATCH = 8
# Voxel sizes further than this (relative) from the training grid's draw a warning.
VOXEL_TOLERANCE = 0.10
# The window the mosaics show: soft tissue, [-160, 240] HU.
MOSAIC_HU = (-160.0, 240.0)


# ---- tiling and blending ------------------------------------------------------------------------
def parse_overlap(text: str | Sequence[float] | None) -> tuple[float, float, float]:
    """`--overlap`: one fraction for every axis, two (D, then H and W) or three (D, H, W), each in
    [0, 1): the share of a clip that neighbouring windows overlap by at least. None = DEFAULT_OVERLAP."""
    if text is None:
        return DEFAULT_OVERLAP
    parts = text.split(",") if isinstance(text, str) else list(text)
    shown = text if isinstance(text, str) else ",".join(str(v) for v in parts)
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise ConfigError(f"--overlap {shown}: expected fractions such as 0.5 or 0.5,0.25 (D, in-plane)") from None
    if len(values) not in (1, 2, 3) or not all(math.isfinite(v) and 0.0 <= v < 1.0 for v in values):
        raise ConfigError(f"--overlap {shown}: expected 1 to 3 fractions in [0, 1) (all axes; D, in-plane; or D, H, W)")
    if len(values) == 1:
        values = values * 3
    elif len(values) == 2:
        values = [values[0], values[1], values[1]]
    return (values[0], values[1], values[2])


def overlap_voxels(clip: Sequence[int], overlap: Sequence[float]) -> tuple[int, int, int]:
    """The overlap fractions as voxels per axis: round(fraction x clip), at most clip - 1."""
    return tuple(min(int(round(f * c)), c - 1) for f, c in zip(overlap, clip, strict=True))


def axis_starts(size: int, clip: int, overlap: int) -> list[int]:
    """First voxels of the windows along one axis of `size` voxels: the fewest windows of `clip`
    voxels whose neighbours overlap by at least `overlap` voxels, spread evenly from 0 to size - clip."""
    if clip > size:
        raise ValueError(f"axis_starts: a window of {clip} voxels does not fit {size}")
    if size == clip:
        return [0]
    stride = clip - overlap  # the largest step that keeps the overlap
    gaps = math.ceil((size - clip) / stride)
    # Floors of evenly spaced points: consecutive steps differ by at most one voxel and none exceeds `stride`.
    return [i * (size - clip) // gaps for i in range(gaps + 1)]


def window_corners(shape: Sequence[int], clip: Sequence[int], overlap: Sequence[int]) -> list[tuple[int, int, int]]:
    """(d, h, w) first voxels of every window tiling a (D, H, W) volume, D slowest."""
    starts = [axis_starts(s, c, o) for s, c, o in zip(shape, clip, overlap, strict=True)]
    return [(d, h, w) for d in starts[0] for h in starts[1] for w in starts[2]]


def taper(clip: Sequence[int], overlap: Sequence[int]) -> np.ndarray:
    """(T, h, w) float64 blending weight of one window: the product over axes of a trapezoid,
    min(1, (voxels to the nearer face + 1) / (overlap + 1)): rising linearly from the faces, 1 in the
    middle where the clip is long enough, never 0. Two windows overlapping by exactly `overlap` voxels
    along an axis have weights summing to 1 there (a linear cross-fade)."""
    ramps = []
    for c, o in zip(clip, overlap, strict=True):
        i = np.arange(c)
        ramps.append(np.minimum(1.0, (np.minimum(i, c - 1 - i) + 1.0) / (o + 1.0)))
    return ramps[0][:, None, None] * ramps[1][None, :, None] * ramps[2][None, None, :]


def check_volume(shape: Sequence[int], clip: Sequence[int], name: str) -> None:
    """DataError (one line naming `name`) unless a (D, H, W) volume holds at least one clip."""
    if len(shape) != 3 or any(s < c for s, c in zip(shape, clip)):
        raise DataError(
            f"{name}: volume of shape {list(shape)} (D, H, W) is smaller than the run's clip {list(clip)} "
            f"(translate.clip): enhancing it needs at least {clip[0]} slices of {clip[1]} x {clip[2]} voxels"
        )


@torch.no_grad()
def enhance_volume(
    task,
    hu: np.ndarray,
    sampler: Callable,
    grid: torch.Tensor,
    *,
    overlap: Sequence[float] = DEFAULT_OVERLAP,
    seed: int = 0,
    batch_size: int = DEFAULT_BATCH,
    progress: Callable[[int, int], None] | None = None,
    name: str = "volume",
) -> np.ndarray:
    """A whole (D, H, W) volume in HU -> the translate task's enhanced volume, (D, H, W) float32 HU.

    `task` is a TranslateTask (what it uses: clip, windows, intensity, channels, enhance_clips, its
    model's device); `sampler` and `grid` come from `voxgen.diffusion.samplers.prepare`. Window i
    samples with a generator seeded seed + i. `progress(done, total)` is called with windows done.
    DataError (naming `name`) for a volume smaller than the clip.
    """
    hu = np.asarray(hu, dtype=np.float32)
    clip = tuple(int(c) for c in task.clip)
    check_volume(hu.shape, clip, name)
    if batch_size < 1:
        raise ConfigError(f"batch size {batch_size}: need at least one window per batch")
    margins = overlap_voxels(clip, overlap)
    corners = window_corners(hu.shape, clip, margins)
    weight = torch.from_numpy(taper(clip, margins))  # (T, h, w) float64
    model_space = torch.from_numpy(task.intensity.scale(hu))  # (D, H, W) in [-1, 1], as training scaled it
    total = torch.zeros(hu.shape, dtype=torch.float64)
    weights = torch.zeros(hu.shape, dtype=torch.float64)
    device = next(task.model.parameters()).device
    t, h, w = clip
    for first in range(0, len(corners), batch_size):
        chunk = corners[first : first + batch_size]
        clips = torch.stack([model_space[d : d + t, y : y + h, x : x + w] for d, y, x in chunk])[:, None]  # (B, 1, T, h, w)
        generators = seeded_generators(range(seed + first, seed + first + len(chunk)))
        enhanced = task.enhance_clips(task.channels(clips).to(device), sampler, grid, generators)  # (B, 3, T, h, w)
        decoded = hu_from_windows(enhanced.float().cpu(), task.windows)[:, 0].double()  # (B, T, h, w) HU
        for (d, y, x), values in zip(chunk, decoded):
            total[d : d + t, y : y + h, x : x + w] += weight * values
            weights[d : d + t, y : y + h, x : x + w] += weight
        if progress is not None:
            progress(first + len(chunk), len(corners))
    return (total / weights).numpy().astype(np.float32)


def window_count(shape: Sequence[int], clip: Sequence[int], overlap: Sequence[float] = DEFAULT_OVERLAP) -> int:
    """How many windows `enhance_volume` samples for a (D, H, W) volume."""
    return len(window_corners(shape, clip, overlap_voxels(clip, overlap)))


# ---- inputs and outputs ---------------------------------------------------------------------------
@dataclass(frozen=True)
class EnhanceInput:
    """One volume to enhance: its name in the outputs, its file, and the case's target if it has one."""

    name: str
    source: Path
    target: Path | None = None


def _nifti_stem(path: Path) -> str:
    for suffix in (".nii.gz", ".nii"):
        if path.name.endswith(suffix):
            return path.name[: -len(suffix)]
    return path.stem


def _case(folder: Path, source: str, target: str) -> EnhanceInput:
    other = folder / f"{target}{SUFFIX}"
    return EnhanceInput(folder.name, folder / f"{source}{SUFFIX}", other if other.is_file() else None)


def find_inputs(path: str | Path, source: str, target: str) -> list[EnhanceInput]:
    """What `--input PATH` names, sorted: a NIfTI file (a case's `<source>.nii.gz` is that case, named
    by its folder, with its target when it has one), a case folder (its `<source>.nii.gz`), or a split
    or data folder (the sources of the case folders one or two levels below). DataError when PATH is
    missing, not NIfTI, or holds no source."""
    path = Path(path)
    if path.is_file():
        if not path.name.endswith((".nii.gz", ".nii")):
            raise DataError(f"{path}: --input must be a NIfTI file (.nii.gz or .nii), a case folder or a data folder")
        if path.name == f"{source}{SUFFIX}":
            return [_case(path.parent, source, target)]
        return [EnhanceInput(_nifti_stem(path), path)]
    if not path.is_dir():
        raise DataError(f"{path}: --input not found")
    if (path / f"{source}{SUFFIX}").is_file():
        return [_case(path, source, target)]
    found = sorted({p.parent for pattern in (f"*/{source}{SUFFIX}", f"*/*/{source}{SUFFIX}") for p in path.glob(pattern)})
    cases = [_case(folder, source, target) for folder in found if not folder.name.startswith(".")]
    if not cases:
        raise DataError(f"{path}: no {source}{SUFFIX} in it, in its case folders or in its split folders")
    names = [c.name for c in cases]
    if len(set(names)) < len(names):  # the same case name under two splits: keep both apart
        cases = [EnhanceInput(f"{c.source.parent.parent.name}_{c.name}", c.source, c.target) for c in cases]
    return cases


def training_affine(cfg, modality: str, warn: Callable[[str], None]) -> np.ndarray | None:
    """The affine of the grid a run trained on (its first training case of `modality` at data.shape),
    or None, after one line to `warn`, when the run's data folder cannot be read here."""
    from voxgen.data.dataset import VolumeDataset

    try:
        return VolumeDataset.of(cfg.data, "train", (modality,)).affine
    except DataError as exc:
        warn(f"warning: voxel sizes not compared with the run's training data ({exc})")
        return None


def voxel_size_warning(name: str, affine: np.ndarray, reference: np.ndarray, tolerance: float = VOXEL_TOLERANCE) -> str | None:
    """One line when a volume's voxel sizes differ from the training grid's (`reference`, its affine)
    by more than `tolerance` (relative) along any axis, else None."""
    mine, theirs = voxel_sizes(affine), voxel_sizes(reference)
    if np.all(np.abs(mine - theirs) <= tolerance * theirs):
        return None
    shown = " x ".join(f"{s:.3g}" for s in mine)
    trained = " x ".join(f"{s:.3g}" for s in theirs)
    return (
        f"warning: {name}: voxels of {shown} mm (x, y, z) differ by more than {tolerance:.0%} from the {trained} mm "
        "the run trained on: the model has not seen structures at this scale"
    )


def write_enhanced(
    out_dir: str | Path,
    name: str,
    source: np.ndarray,
    enhanced: np.ndarray,
    affine: np.ndarray,
    target: np.ndarray | None = None,
) -> tuple[Path, Path]:
    """OUT/<name>_enhanced.nii.gz (float32 HU on `affine`) and OUT/<name>_enhanced.png (mid-slices of
    source | enhanced | target, soft-tissue window); each file whole or not at all."""
    out_dir = Path(out_dir)
    volume = save_volume(out_dir / f"{name}_enhanced.nii.gz", enhanced, affine, dtype=np.float32)
    shown, titles = [source, enhanced], ["source", "enhanced"]
    if target is not None:
        shown.append(target)
        titles.append("target")
    lo, hi = MOSAIC_HU
    titles = [f"{t} [{lo:g}, {hi:g}] HU" for t in titles]
    mosaic = save_mosaic(out_dir / f"{name}_enhanced.png", shown, titles=titles, value_range=MOSAIC_HU)
    return volume, mosaic


@contextlib.contextmanager
def volume_progress(volumes: int, what: str) -> Iterator[Callable[..., None]]:
    """Progress bars on stderr (a terminal only): volumes done and windows of the current one. Yields
    `update(volume_index, name, windows_done, windows_total)`."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    # Off the terminal (logs, pipes) the bars would leave only stray lines around the summary.
    with Progress(*columns, console=console, transient=True, disable=not console.is_terminal) as bar:
        outer = bar.add_task(what, total=volumes)
        inner = bar.add_task("windows", total=None)

        def update(index: int, name: str, done: int, total: int) -> None:
            bar.update(outer, completed=index + (done == total))
            bar.update(inner, description=f"windows of {name}", completed=done, total=total)

        yield update
