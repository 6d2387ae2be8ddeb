"""Anatomy score: do a volume's tissues sit where a brain's tissues sit?

For brain volumes in MNI152 space (the template cohort, or real data registered to the
template). Inside the template's intracranial volume, a 3-component Gaussian mixture on the
volume's intensities labels each voxel CSF, grey or white matter (components ordered by mean,
mapped to tissues by the contrast's known order, CSF < GM < WM on T1-weighted images). The score of a
class is the Dice overlap of its voxels with the voxels where that tissue is the template's
most likely one; the anatomy score is the mean over the three classes.

The priors: grey and white matter are nilearn's MNI152 2009 GM / WM maps (Fonov et al.,
NeuroImage 2011), resampled to the volume's grid as the template cohort samples them. nilearn
ships no CSF map, so the CSF prior is what the intracranial hull around the brain (the one the
cohort builds its CSF from, `voxgen.data.cohort`) holds beyond grey and white matter:
ventricles, sulci and the outer CSF layer.

Intensities carry no position, so a volume of noise scores at chance: the Dice of a labelling
independent of the anatomy, 2 p q / (p + q) per class for prior fraction p and labelled
fraction q (`chance_scores`). The ceiling is what real cases score, each warped slightly away
from the template and blurred by partial volume at coarse grids.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from voxgen.errors import VoxgenError

TISSUES = ("csf", "gm", "wm")
# Intensity order of the tissues, darkest first: T1-weighted contrasts only. On FLAIR the grey /
# white contrast is weak and, at coarse grids, inverted by partial volume (cortex mixes with
# CSF), so a 3-class mixture does not find the tissues there.
T1_ORDER = ("csf", "gm", "wm")
TISSUE_ORDER = {"bravo": T1_ORDER, "t1_pre": T1_ORDER, "t1_gd": T1_ORDER, "t1": T1_ORDER}
# The outer CSF layer of the cohort's hull: the middle of the 0.5-2.5 mm it draws per case.
CSF_LAYER_MM = 1.5
COLUMNS = ("group", "n", *(f"dice_{t}" for t in TISSUES), "dice_mean")


@dataclass(frozen=True)
class Priors:
    """Template tissue maps on one grid: `labels` (D, H, W) int8, index into TISSUES where the
    voxel is intracranial, -1 outside; `region` is labels >= 0."""

    labels: np.ndarray

    @property
    def region(self) -> np.ndarray:
        return self.labels >= 0

    def fractions(self) -> np.ndarray:
        inside = self.labels[self.region]
        return np.array([(inside == k).mean() for k in range(len(TISSUES))])


def made_from_template(data_root: str | Path) -> bool:
    """Whether a data folder is the template cohort (its voxgen marker says so): its volumes are
    in MNI152 space by construction. Other data must be registered to MNI152 by its user, who then
    asks for the score by name (`voxgen evaluate --metrics anatomy`)."""
    import json

    from voxgen.data.synth import MARKER

    marker = Path(data_root) / MARKER
    try:
        return json.loads(marker.read_text()).get("generator") == "cohort"
    except (OSError, ValueError):
        return False


def tissue_order(modality: str) -> tuple[str, str, str]:
    if modality not in TISSUE_ORDER:
        raise VoxgenError(
            f"anatomy score: no known tissue contrast for modality '{modality}' (T1-weighted only: {', '.join(TISSUE_ORDER)})"
        )
    return TISSUE_ORDER[modality]


def template_priors(affine: np.ndarray, shape: Sequence[int]) -> Priors:
    """The template's most likely tissue per voxel of the grid (`affine`: RAS, index (x, y, z) ->
    mm; `shape`: (D, H, W) = (z, y, x)), sampled with the template cohort's own resampling."""
    from voxgen.data.cohort import _sample, load_template

    tpl = load_template()
    affine = np.asarray(affine, dtype=np.float64)
    d, h, w = (int(s) for s in shape)
    z, y, x = np.meshgrid(np.arange(d), np.arange(h), np.arange(w), indexing="ij")
    xyz = [(affine[row, 0] * x + affine[row, 1] * y + affine[row, 2] * z + affine[row, 3]).astype(np.float32) for row in range(3)]
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    level = max(lv for lv in (1, 2, 4) if lv <= max(1.0, float(spacing.min())))
    gm = _sample(tpl.gm[level], tpl.inv_affine[level], xyz, 0.0)
    wm = _sample(tpl.wm[level], tpl.inv_affine[level], xyz, 0.0)
    sd = _sample(tpl.sd, tpl.sd_inv_affine, xyz, 1e3)
    icv = np.clip((CSF_LAYER_MM - sd) / float(spacing.mean()) + 0.5, 0.0, 1.0)
    csf = np.clip(icv - np.clip(gm + wm, 0.0, 1.0), 0.0, 1.0)
    labels = np.argmax(np.stack([csf, gm, wm]), axis=0).astype(np.int8)
    labels[icv < 0.5] = -1
    if not (labels >= 0).any():
        raise VoxgenError("anatomy score: the grid holds no voxel of the template's brain (is the data in MNI space?)")
    return Priors(labels)


def classify(volume: np.ndarray, region: np.ndarray, order: Sequence[str], seed: int = 0) -> np.ndarray:
    """Tissue index (into TISSUES) of each voxel in `region`, from a 3-component 1-D Gaussian
    mixture of the volume's intensities there; components are assigned to tissues by their means
    in the contrast's `order` (darkest first)."""
    from sklearn.mixture import GaussianMixture

    values = np.asarray(volume, dtype=np.float64)[region].reshape(-1, 1)
    if np.ptp(values) == 0:
        return np.full(len(values), TISSUES.index(order[0]), dtype=np.int8)
    # Started from k-means clusters: k-means++ seeds alone leave the mixture in poor local optima
    # on these partial-volume histograms (grey matter swallowed by its neighbours). More restarts
    # change no score by more than 0.002 on the cohort's cases and samples, at 3x the time.
    gmm = GaussianMixture(3, covariance_type="full", init_params="kmeans", random_state=seed)
    components = gmm.fit_predict(values)
    rank = np.argsort(np.argsort(gmm.means_[:, 0]))  # component -> 0 darkest .. 2 brightest
    tissue_of_rank = np.array([TISSUES.index(t) for t in order])
    return tissue_of_rank[rank[components]].astype(np.int8)


def dice_scores(labels: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Per-tissue Dice of two label vectors (indices into TISSUES)."""
    scores = []
    for k in range(len(TISSUES)):
        a, b = labels == k, truth == k
        total = a.sum() + b.sum()
        scores.append(2.0 * (a & b).sum() / total if total else 1.0)
    return np.array(scores)


def score(volume: np.ndarray, priors: Priors, order: Sequence[str] = T1_ORDER) -> np.ndarray:
    """(csf, gm, wm) Dice of one (D, H, W) volume against the template priors."""
    volume = np.asarray(volume)
    if volume.shape != priors.labels.shape:
        raise VoxgenError(f"anatomy score: volume of shape {list(volume.shape)} on a grid of {list(priors.labels.shape)}")
    region = priors.region
    return dice_scores(classify(volume, region, order), priors.labels[region])


def chance_scores(volume: np.ndarray, priors: Priors, order: Sequence[str] = T1_ORDER) -> np.ndarray:
    """(csf, gm, wm) Dice a labelling with this volume's class fractions scores when it is
    independent of the anatomy: 2 p q / (p + q)."""
    region = priors.region
    labels = classify(np.asarray(volume), region, order)
    q = np.array([(labels == k).mean() for k in range(len(TISSUES))])
    p = priors.fractions()
    return np.where(p + q > 0, 2 * p * q / np.maximum(p + q, 1e-12), 0.0)


@dataclass(frozen=True)
class GroupScore:
    """The mean per-tissue Dice of a group of volumes (real cases, samples)."""

    group: str
    n: int
    dice: np.ndarray  # (3,) csf, gm, wm

    @property
    def mean(self) -> float:
        return float(self.dice.mean())

    def row(self) -> list:
        return [self.group, self.n, *(float(v) for v in self.dice), self.mean]


def score_group(group: str, volumes: Iterable[np.ndarray], priors: Priors, order: Sequence[str] = T1_ORDER) -> GroupScore:
    per_volume = [score(v, priors, order) for v in volumes]
    if not per_volume:
        raise VoxgenError(f"anatomy score: no volumes in group '{group}'")
    return GroupScore(group, len(per_volume), np.mean(per_volume, axis=0))


def write_csv(path: str | Path, groups: Sequence[GroupScore]) -> Path:
    """RUN/evaluation/anatomy.csv: one row per group, the columns of COLUMNS."""
    from voxgen.files import write_atomic

    lines = [",".join(COLUMNS)]
    lines += [",".join(str(v) if not isinstance(v, float) else f"{v:.6f}" for v in g.row()) for g in groups]
    path = Path(path)
    write_atomic(path, ("\n".join(lines) + "\n").encode())
    return path


def read_csv(path: str | Path) -> list[GroupScore]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return [GroupScore(r["group"], int(r["n"]), np.array([float(r[f"dice_{t}"]) for t in TISSUES])) for r in rows]


def line(g: GroupScore) -> str:
    parts = ", ".join(f"{t.upper()} {v:.3f}" for t, v in zip(TISSUES, g.dice))
    return f"{g.group}: {g.mean:.3f} ({parts}; n={g.n})"
