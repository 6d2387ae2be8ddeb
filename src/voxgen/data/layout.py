"""The BrainMetShare folder layout: ROOT/{train,val,test}/<case>/<modality>.nii.gz."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from voxgen.errors import ConfigError, DataError

SPLITS = ("train", "val", "test")
MODALITIES = ("bravo", "t1_pre", "t1_gd", "flair", "seg")
MASK_MODALITIES = ("seg",)
SUFFIX = ".nii.gz"


@dataclass(frozen=True)
class Case:
    """One case folder: `folder / f"{modality}.nii.gz"` holds each modality."""

    id: str
    split: str
    folder: Path

    def path(self, modality: str) -> Path:
        return self.folder / f"{modality}{SUFFIX}"


def _visible_dirs(folder: Path) -> list[Path]:
    # Hidden entries are editor, OS or voxgen bookkeeping (.DS_Store, .voxgen-dataset.json).
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def case_folders(root: str | Path, split: str) -> list[Case]:
    """Every case folder of a split, sorted by id, without checking modalities.

    Raises DataError when the root or split folder is missing or the split is empty.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: data folder not found")
    folder = root / split
    if not folder.is_dir():
        raise DataError(f"{folder}: split folder '{split}' not found (expected {root}/{{{','.join(SPLITS)}}})")
    cases = [Case(id=p.name, split=split, folder=p) for p in _visible_dirs(folder)]
    if not cases:
        raise DataError(f"{folder}: split '{split}' has no case folders")
    return cases


def list_cases(root: str | Path, split: str, modalities: Iterable[str]) -> list[Case]:
    """Cases of one split that hold every requested modality, sorted by id.

    Raises DataError for a missing root or split folder, an empty split, or a case
    that lacks a requested modality (the message names the missing file).
    """
    modalities = [modalities] if isinstance(modalities, str) else list(modalities)
    cases = case_folders(root, split)
    for case in cases:
        for modality in modalities:
            if not case.path(modality).is_file():
                raise DataError(f"{case.path(modality)}: missing modality '{modality}' of case '{case.id}'")
    return cases


def split_counts(cases: int, splits: Mapping[str, int] | Sequence[int] | None = None) -> dict[str, int]:
    """How many generated cases go to each split.

    Default: about 2/3 train, 1/6 val, 1/6 test, each at least 1 (24 -> 16/4/4,
    12 -> 8/2/2). `splits` may be a mapping {split: count} or three counts in
    SPLITS order; they must add up to `cases`.
    """
    if splits is None:
        if cases < len(SPLITS):
            raise ConfigError(f"cases: need at least {len(SPLITS)} cases (one per split), got {cases}")
        val = test = max(1, round(cases / 6))
        return {"train": cases - val - test, "val": val, "test": test}
    if isinstance(splits, Mapping):
        unknown = set(splits) - set(SPLITS)
        if unknown:
            raise ConfigError(f"splits: unknown split {sorted(unknown)[0]!r}, expected one of {SPLITS}")
        counts = {s: int(splits.get(s, 0)) for s in SPLITS}
    else:
        values = [int(v) for v in splits]
        if len(values) != len(SPLITS):
            raise ConfigError(f"splits: expected {len(SPLITS)} counts (train, val, test), got {len(values)}")
        counts = dict(zip(SPLITS, values))
    if any(v < 0 for v in counts.values()) or sum(counts.values()) != cases:
        raise ConfigError(f"splits: counts {counts} must be >= 0 and add up to cases={cases}")
    return counts
