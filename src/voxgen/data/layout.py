"""The BrainMetShare folder layout: ROOT/{train,val,test}/<case>/<modality>.nii.gz.

The modality names are the data set's (`data.modalities`, `data.masks`); BrainMetShare's are
the defaults.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from voxgen.errors import ConfigError, DataError

SPLITS = ("train", "val", "test")
MODALITIES = ("bravo", "t1_pre", "t1_gd", "flair", "seg")
MASK_MODALITIES = ("seg",)
SUFFIX = ".nii.gz"


@dataclass(frozen=True)
class Modalities:
    """The modality files a case folder may hold (`data.modalities`) and which are masks (`data.masks`)."""

    known: tuple[str, ...] = MODALITIES
    masks: tuple[str, ...] = MASK_MODALITIES
    # Modalities on a grid of their own (`data.grids`: the X-ray images of an X-ray/CT case):
    # (name, (D, H, W)) pairs. Their shape and affine need not match the case's other files.
    grids: tuple[tuple[str, tuple[int, int, int]], ...] = ()

    @classmethod
    def of(cls, data_cfg) -> Modalities:
        """From a config's `data` section."""
        grids = tuple((str(m), tuple(int(s) for s in shape)) for m, shape in data_cfg.grids.items())
        for name, shape in grids:
            if len(shape) != 3 or min(shape) < 1:
                raise ConfigError(f"data.grids.{name}={list(shape)} must be [D, H, W] of positive sizes")
        return cls(tuple(str(m) for m in data_cfg.modalities), tuple(str(m) for m in data_cfg.masks), grids)


@dataclass(frozen=True)
class Case:
    """One case folder: `folder / f"{modality}.nii.gz"` holds each modality."""

    id: str
    split: str
    folder: Path

    def path(self, modality: str) -> Path:
        return self.folder / f"{modality}{SUFFIX}"


def _entries(folder: Path) -> list[Path]:
    """Visible entries of a folder, sorted; DataError when it cannot be listed.

    Hidden entries are editor, OS or voxgen bookkeeping (.DS_Store, .voxgen-dataset.json).
    """
    try:
        return sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    except PermissionError:
        raise DataError(f"{folder}: permission denied (the folder cannot be listed)") from None
    except OSError as exc:
        raise DataError(f"{folder}: cannot list the folder ({exc.strerror or exc})") from None


def _is_nifti_name(name: str) -> bool:
    return name.lower().endswith((".nii", ".nii.gz"))


def root_problem(root: str | Path) -> str | None:
    """Why `root` cannot be a data folder (missing, or a file), or None."""
    root = Path(root)
    if root.is_file():
        return f"{root}: data root is a file, not a folder"
    if not root.is_dir():
        return f"{root}: data folder not found"
    return None


def case_folders(root: str | Path, split: str) -> list[Case]:
    """Every case folder of a split, sorted by id, without checking modalities.

    Raises DataError when the root or split folder is missing (or is a file), cannot be
    listed, or the split has no case folders.
    """
    root = Path(root)
    problem = root_problem(root)
    if problem:
        raise DataError(problem)
    folder = root / split
    if folder.is_file():
        raise DataError(f"{folder}: split '{split}' is a file, not a folder")
    if not folder.is_dir():
        raise DataError(f"{folder}: split folder '{split}' not found (expected {root}/{{{','.join(SPLITS)}}})")
    entries = _entries(folder)
    cases = [Case(id=p.name, split=split, folder=p) for p in entries if p.is_dir()]
    if not cases:
        loose = sum(p.is_file() and _is_nifti_name(p.name) for p in entries)
        # A common mistake: the files of cases put straight into the split folder.
        hint = f" ({loose} NIfTI files lie directly in it: put each case's files in a folder of its own)" if loose else ""
        raise DataError(f"{folder}: split '{split}' has no case folders{hint}")
    return cases


def case_problems(case: Case, modalities: Iterable[str], known: Sequence[str] = MODALITIES) -> list[str]:
    """What is wrong with a case folder's files by name alone (nothing is read), one line each.

    An empty folder is one problem (not one per missing modality). A NIfTI file whose name
    is not a `known` modality is reported as unknown: it is usually a misspelt modality that
    would otherwise be silently ignored. Files that are not NIfTI (notes, previews) are allowed.
    """
    modalities = [modalities] if isinstance(modalities, str) else list(modalities)
    try:
        entries = _entries(case.folder)
    except DataError as exc:
        return [str(exc)]
    if modalities and not any(p.is_file() for p in entries):
        return [f"{case.folder}: case folder '{case.id}' has no files"]
    known = [f"{m}{SUFFIX}" for m in known]
    problems = []
    for entry in entries:
        if entry.is_file() and _is_nifti_name(entry.name) and entry.name not in known:
            match = difflib.get_close_matches(entry.name.lower(), known, n=1, cutoff=0.6)
            hint = f"; did you mean '{match[0]}'?" if match else ""
            problems.append(f"{entry}: unknown file in case '{case.id}' (modality files are {', '.join(known)}){hint}")
    for modality in modalities:
        path = case.path(modality)
        if path.is_dir():
            problems.append(f"{path}: is a folder, not a NIfTI file")
        elif not path.is_file():
            problems.append(f"{path}: missing modality '{modality}' of case '{case.id}'")
    return problems


def list_cases(root: str | Path, split: str, modalities: Iterable[str], known: Sequence[str] = MODALITIES) -> list[Case]:
    """Cases of one split that hold every requested modality, sorted by id.

    Raises DataError for a missing root or split folder, an empty split, or the first
    problem of a case folder (see `case_problems`: no files, an unknown NIfTI file, a
    missing modality; the message names the file).
    """
    modalities = [modalities] if isinstance(modalities, str) else list(modalities)
    cases = case_folders(root, split)
    for case in cases:
        problems = case_problems(case, modalities, known)
        if problems:
            raise DataError(problems[0])
    return cases


def shared_cases(root: str | Path, involving: str | None = None) -> list[str]:
    """One line per case id found in more than one split (data leakage), at the later split.

    With `involving`, only the pairs that include that split. Splits that are missing or
    empty are skipped here: `case_folders` reports them.
    """
    seen: dict[str, Case] = {}
    problems = []
    for split in SPLITS:
        try:
            cases = case_folders(root, split)
        except DataError:
            continue
        for case in cases:
            first = seen.setdefault(case.id, case)
            if first is not case and involving in (None, first.split, case.split):
                problems.append(
                    f"{case.folder}: case '{case.id}' is also in split '{first.split}' ({first.folder}): "
                    "the same case in two splits leaks data between them"
                )
    return problems


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
