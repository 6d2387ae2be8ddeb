"""The anatomy score: the template scores near 1, noise at chance, real cases in between."""

from __future__ import annotations

import numpy as np
import pytest

from voxgen.data.cohort import _block_mean, _sample, cohort_affine, cohort_case, template_folder
from voxgen.data.nifti import load_volume
from voxgen.errors import VoxgenError
from voxgen.evaluation import anatomy

SHAPE = (32, 48, 40)


@pytest.fixture(scope="module")
def priors():
    return anatomy.template_priors(cohort_affine(SHAPE), SHAPE)


def template_t1(shape) -> np.ndarray:
    """The MNI152 T1 template itself on the cohort grid, 4 mm block means sampled as the cohort does."""
    t1, affine = load_volume(template_folder() / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")
    coarse, coarse_affine = _block_mean(t1.astype(np.float32), affine, 4)
    grid = cohort_affine(shape)
    z, y, x = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    xyz = [(grid[r, 0] * x + grid[r, 1] * y + grid[r, 2] * z + grid[r, 3]).astype(np.float32) for r in range(3)]
    return _sample(coarse, np.linalg.inv(coarse_affine), xyz, 0.0)


def test_the_template_itself_scores_near_one(priors):
    dice = anatomy.score(template_t1(SHAPE), priors)
    # Not exactly 1: at ~4.5 mm voxels the coarse template's partial-volume voxels sit between
    # the classes' intensities (measured: 0.94 / 0.83 / 0.80 for CSF / GM / WM).
    assert dice.mean() > 0.83, dice
    assert dice.min() > 0.75, dice


def test_noise_scores_at_chance(priors):
    rng = np.random.default_rng(0)
    for _ in range(3):
        noise = rng.normal(size=SHAPE)
        dice, chance = anatomy.score(noise, priors), anatomy.chance_scores(noise, priors)
        assert abs(dice.mean() - chance.mean()) < 0.03, (dice, chance)
        assert np.abs(dice - chance).max() < 0.05, (dice, chance)
    assert chance.mean() < 0.4


def test_real_cases_score_between_chance_and_the_template(priors):
    real = anatomy.score_group("real", [cohort_case(i, SHAPE, seed=0)["bravo"] for i in (20, 21)], priors)
    assert 0.5 < real.mean < anatomy.score(template_t1(SHAPE), priors).mean()


def test_a_scrambled_brain_loses_its_score(priors):
    """The same intensities moved away from their places: the histogram is kept, the anatomy is not."""
    case = cohort_case(20, SHAPE, seed=0)["bravo"]
    rng = np.random.default_rng(1)
    scrambled = case.copy()
    region = priors.region
    scrambled[region] = rng.permutation(case[region])
    assert anatomy.score(scrambled, priors).mean() < anatomy.score(case, priors).mean() - 0.2


def test_bad_inputs_are_refused_in_one_line(priors):
    with pytest.raises(VoxgenError, match="no known tissue contrast"):
        anatomy.tissue_order("ct")
    with pytest.raises(VoxgenError, match="T1-weighted only"):
        anatomy.tissue_order("flair")
    with pytest.raises(VoxgenError, match="shape"):
        anatomy.score(np.zeros((4, 4, 4)), priors)
    far = np.eye(4)
    far[:3, 3] = 1000.0  # a grid nowhere near the template
    with pytest.raises(VoxgenError, match="MNI space"):
        anatomy.template_priors(far, (4, 4, 4))


def test_the_csv_round_trips(tmp_path, priors):
    groups = [
        anatomy.GroupScore("real", 4, np.array([0.7, 0.6, 0.65])),
        anatomy.GroupScore("trained", 8, np.array([0.5, 0.55, 0.4])),
    ]
    path = anatomy.write_csv(tmp_path / "anatomy.csv", groups)
    back = anatomy.read_csv(path)
    assert [g.group for g in back] == ["real", "trained"]
    assert np.allclose(back[1].dice, [0.5, 0.55, 0.4]) and back[1].n == 8
    assert path.read_text().splitlines()[0] == ",".join(anatomy.COLUMNS)
