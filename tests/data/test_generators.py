"""The embedded data sets: procedural phantoms and the MNI152 template cohort."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from voxgen.data import (
    MODALITIES,
    SPLITS,
    check_folder,
    cohort_case,
    list_cases,
    load_volume,
    make_cohort,
    make_phantoms,
    phantom_case,
)
from voxgen.data import cohort as cohort_module
from voxgen.errors import ConfigError, DataError

TINY = (16, 16, 16)
SMALL = (32, 48, 40)
T1_LIKE = ("t1_pre", "t1_gd", "bravo")


def read_all(root) -> dict[str, bytes]:
    """{split/case/modality: array bytes} for every file of a data folder."""
    out = {}
    for split in SPLITS:
        for case in list_cases(root, split, MODALITIES):
            for modality in MODALITIES:
                volume, affine = load_volume(case.path(modality))
                out[f"{split}/{case.id}/{modality}"] = volume.tobytes() + affine.tobytes()
    return out


@pytest.mark.parametrize("make, prefix", [(make_phantoms, "phantom"), (make_cohort, "cohort")])
def test_generators_are_deterministic_and_well_laid_out(tmp_path, make, prefix):
    a = make(tmp_path / "a", cases=4, shape=TINY, seed=3)
    b = make(tmp_path / "b", cases=4, shape=TINY, seed=3)
    c = make(tmp_path / "c", cases=4, shape=TINY, seed=4)
    files_a, files_b, files_c = read_all(a), read_all(b), read_all(c)
    assert files_a == files_b
    assert files_a.keys() == files_c.keys()
    assert all(files_a[k] != files_c[k] for k in files_a if not k.endswith("seg"))
    # 4 cases -> 2 train, 1 val, 1 test, numbered across splits in that order.
    ids = {split: [case.id for case in list_cases(a, split, MODALITIES)] for split in SPLITS}
    assert ids == {"train": [f"{prefix}_000", f"{prefix}_001"], "val": [f"{prefix}_002"], "test": [f"{prefix}_003"]}
    assert check_folder(a) == []
    meta = json.loads((a / ".voxgen-dataset.json").read_text())
    assert meta["seed"] == 3 and meta["shape"] == list(TINY)
    # No temporary folders left next to the data set.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c"]


@pytest.mark.parametrize("make", [make_phantoms, make_cohort])
def test_files_are_ras_with_uint8_binary_seg(tmp_path, make):
    root = make(tmp_path / "d", cases=3, shape=TINY, seed=0)
    case = list_cases(root, "train", MODALITIES)[0]
    img = nib.load(str(case.path("seg")))
    assert img.get_data_dtype() == np.uint8 and img.shape == TINY[::-1]
    assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
    seg, _ = load_volume(case.path("seg"))
    assert set(np.unique(seg)) <= {0.0, 1.0}
    for modality in ("bravo", "t1_pre", "t1_gd", "flair"):
        assert nib.load(str(case.path(modality))).get_data_dtype() == np.float32


def test_default_split_of_24_cohort_cases(tmp_path):
    root = make_cohort(tmp_path / "c", cases=24, shape=(8, 8, 8))
    assert [len(list_cases(root, s, ())) for s in SPLITS] == [16, 4, 4]


def test_a_case_does_not_depend_on_how_many_are_made(tmp_path):
    three = make_cohort(tmp_path / "three", cases=3, shape=TINY, seed=1)  # cohort_001 in val
    five = make_cohort(tmp_path / "five", cases=5, shape=TINY, seed=1)  # cohort_001 in train
    for modality in MODALITIES:
        a, _ = load_volume(three / "val" / "cohort_001" / f"{modality}.nii.gz")
        b, _ = load_volume(five / "train" / "cohort_001" / f"{modality}.nii.gz")
        assert np.array_equal(a, b)


def test_existing_folder_is_replaced_only_if_voxgen_made_it(tmp_path):
    root = make_phantoms(tmp_path / "d", cases=3, shape=TINY, seed=0)
    make_phantoms(root, cases=4, shape=TINY, seed=1)  # a voxgen folder: replaced whole
    assert len(list_cases(root, "train", ())) == 2
    user = tmp_path / "mine"
    user.mkdir()
    (user / "precious.txt").write_text("keep me")
    with pytest.raises(DataError, match="mine"):
        make_phantoms(user, cases=3, shape=TINY)
    assert (user / "precious.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "mine"]


def test_bad_arguments():
    with pytest.raises(ConfigError, match="shape"):
        phantom_case(0, shape=(16, 16))
    with pytest.raises(ConfigError, match="cases"):
        make_phantoms("/nonexistent/never-written", cases=2, shape=TINY)


def test_missing_template_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"):
        cohort_module.load_template(tmp_path)


def lesion_contrast(case: dict) -> dict[str, float]:
    """Lesion statistics against brain tissue away from lesions."""
    seg = case["seg"].astype(bool)
    near = ndimage.binary_dilation(seg, iterations=2)
    brain = ((case["gm"] + case["wm"]) > 0.9) & ~near
    wm = (case["wm"] > 0.9) & ~near
    ring = ndimage.binary_dilation(seg, iterations=1) & ~seg & ((case["gm"] + case["wm"]) > 0.5)
    return {
        "gd_lesion_max": float(case["t1_gd"][seg].max()),
        "gd_brain_p99": float(np.percentile(case["t1_gd"][brain], 99)),
        "pre_lesion_mean": float(case["t1_pre"][seg].mean()),
        "pre_wm_mean": float(case["t1_pre"][wm].mean()),
        "flair_ring_mean": float(case["flair"][ring].mean()),
        "flair_wm_mean": float(case["flair"][wm].mean()),
    }


@pytest.mark.parametrize("generate", [phantom_case, cohort_case])
def test_lesions_enhance_on_t1_gd_and_oedema_is_bright_on_flair(generate):
    cases = [generate(i, SMALL, 0) for i in range(6)]
    with_lesions = [c for c in cases if c["seg"].sum() >= 10]
    assert len(with_lesions) >= 2
    for case in with_lesions:
        s = lesion_contrast(case)
        # The enhancing rim is brighter than 99 % of the brain after contrast...
        assert s["gd_lesion_max"] > s["gd_brain_p99"] + 0.05, s
        # ...but the lesion is darker than white matter before it.
        assert s["pre_lesion_mean"] < s["pre_wm_mean"] - 0.1, s
        assert s["flair_ring_mean"] > s["flair_wm_mean"] + 0.1, s


@pytest.mark.parametrize("generate", [phantom_case, cohort_case])
def test_tissue_contrast_order(generate):
    case = generate(2, SMALL, 0)
    away = ~ndimage.binary_dilation(case["seg"].astype(bool), iterations=3)
    gm, wm, csf = ((case[t] > 0.8) & away for t in ("gm", "wm", "csf"))
    for modality in T1_LIKE:
        image = case[modality]
        assert image[wm].mean() > image[gm].mean() + 0.1 > image[csf].mean() + 0.2, modality
    flair = case["flair"]
    assert flair[gm].mean() > flair[wm].mean() + 0.05 and flair[wm].mean() > flair[csf].mean() + 0.2


def test_cohort_looks_like_a_head():
    for index in range(3):
        case = cohort_case(index, SMALL, 0)
        head = case["head"] > 0.5
        brain = (case["gm"] + case["wm"]) > 0.5
        assert 0.25 < head.mean() < 0.65
        assert 0.45 < brain.sum() / head.sum() < 0.8
        # One head, with the brain inside it and air around it.
        assert ndimage.label(head)[1] == 1
        assert not (brain & ~head).any()
        outside = ~ndimage.binary_dilation(head, iterations=2)
        assert case["t1_pre"][outside].mean() < 0.1 < case["t1_pre"][brain].mean() - 0.2
        # Left-right symmetric template: hemispheres hold similar brain volume.
        left, right = np.array_split(brain, 2, axis=2)
        assert abs(left.sum() - right.sum()) / brain.sum() < 0.1


def test_cohort_tiny_shape_and_deformations_differ():
    a, b = cohort_case(0, TINY, 0), cohort_case(1, TINY, 0)
    assert a["bravo"].shape == TINY and a["seg"].dtype == np.uint8
    # Different warps: the brain masks of two cases differ in a few percent of voxels.
    diff = ((a["gm"] + a["wm"]) > 0.5) != ((b["gm"] + b["wm"]) > 0.5)
    assert 0.005 < diff.mean() < 0.2
