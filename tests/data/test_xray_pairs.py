"""X-ray / CT pairs: the cube resampling and poses, `voxgen data xray-pairs` and `voxgen data drr`, their bad inputs."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from voxgen.cli import main
from voxgen.data import load_volume, save_volume
from voxgen.data.ct import HEAD_CT
from voxgen.data.drr import Geometry, render
from voxgen.data.nifti import voxel_sizes
from voxgen.data.xray import AIR_HU, cube_affine, make_xray_pairs, resample_cube, rotation

CT, DRR = 16, 24  # tiny cube and detector: the whole file runs in seconds


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """3 poses of the head (train, val, test), read-only."""
    return make_xray_pairs(tmp_path_factory.mktemp("xray") / "pairs", cases=3, ct_size=CT, drr_size=DRR, seed=7)


def _arrays(root) -> dict[str, bytes]:
    out = {}
    for path in sorted(root.rglob("*.nii.gz")):
        volume, affine = load_volume(path)
        out[str(path.relative_to(root))] = volume.tobytes() + affine.tobytes()
    return out


def test_pairs_hold_a_ct_cube_and_its_two_drrs_as_documented(pairs):
    head, head_affine = load_volume(HEAD_CT)
    field_mm = float((voxel_sizes(head_affine) * np.array(head.shape[::-1])).max())  # 128 x 1.914 mm
    voxel = field_mm / CT
    meta = json.loads((pairs / "drr.json").read_text())
    geometry = dict(meta["geometry"], spacing=None)
    assert geometry == dict(sid=1000.0, sdd=1500.0, rows=DRR, cols=DRR, spacing=None, vertical_flip=False)
    assert meta["hu_to_mu"]["mu_water_per_mm"] == pytest.approx(0.01937)
    assert "same real head" in meta["note"]
    assert sorted(meta["cases"]) == ["test/pose_002", "train/pose_000", "val/pose_001"]
    cubes = []
    for key, record in meta["cases"].items():
        ct, ct_affine = load_volume(pairs / key / "ct.nii.gz")
        xray, xray_affine = load_volume(pairs / key / "xray.nii.gz")
        assert ct.shape == (CT, CT, CT) and xray.shape == (2, DRR, DRR)
        # The cube: isotropic voxels of the head's field of view / N, centred where the scan's centre is (0 mm).
        expected = np.diag([voxel, voxel, voxel, 1.0])
        expected[:3, 3] = -voxel * (CT - 1) / 2.0
        assert np.allclose(ct_affine, expected, atol=1e-4)
        spacing = record["spacing"]
        expected = np.diag([spacing, spacing, 1.0, 1.0])
        expected[:2, 3] = -spacing * (DRR - 1) / 2.0
        assert np.allclose(xray_affine, expected, atol=1e-4)
        # The X-rays are the DRRs of the CT as written: the pair is exact.
        again = render(ct, ct_affine, Geometry(rows=DRR, cols=DRR, spacing=spacing))
        assert np.allclose(xray, again, rtol=1e-4, atol=1e-4)
        # Air around, bone inside (blurred by 15 mm voxels).
        assert ct.min() == pytest.approx(AIR_HU, abs=1.0) and ct.max() > 300.0
        assert 2.0 < xray.max() < 8.0 and xray.min() == 0.0  # a head is a few attenuation lengths thick
        assert max(abs(a) for a in record["angles_deg"]) <= 15.0 and max(abs(s) for s in record["shift_mm"]) <= 10.0
        cubes.append(ct)
    assert not np.allclose(cubes[0], cubes[1])  # different poses


def test_pairs_are_deterministic_for_a_seed(pairs, tmp_path):
    again = make_xray_pairs(tmp_path / "again", cases=3, ct_size=CT, drr_size=DRR, seed=7)
    other = make_xray_pairs(tmp_path / "other", cases=3, ct_size=CT, drr_size=DRR, seed=8)
    first, second, third = _arrays(pairs), _arrays(again), _arrays(other)
    assert first == second
    assert first.keys() == third.keys() and all(first[k] != third[k] for k in first)


def test_a_pose_turns_and_shifts_the_anatomy_about_the_cube_centre():
    """A bright ball at (10, 0, 5) mm turned 90 degrees about z (x -> y) and shifted 4 mm along x lands at (4, 10, 5)."""
    n = 41
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    affine[:3, 3] = -(n - 1) / 2.0
    idx = np.arange(n) - (n - 1) / 2.0
    z, y, x = np.meshgrid(idx, idx, idx, indexing="ij")
    hu = np.where((x - 10) ** 2 + y**2 + (z - 5) ** 2 < 9.0, 1000.0, AIR_HU).astype(np.float32)
    assert np.allclose(rotation((0, 0, 90)) @ [10.0, 0.0, 5.0], [0.0, 10.0, 5.0])
    cube, grid = resample_cube(hu, affine, n, angles_deg=(0.0, 0.0, 90.0), shift_mm=(4.0, 0.0, 0.0))
    assert np.allclose(grid, affine)  # a cube already: same grid, no smoothing
    weight = cube - AIR_HU
    centroid = [float((weight * axis).sum() / weight.sum()) for axis in (x, y, z)]
    assert centroid == pytest.approx([4.0, 10.0, 5.0], abs=0.05)
    unmoved, _ = resample_cube(hu, affine, n)
    assert np.allclose(unmoved, hu, atol=1e-3)


def test_the_cube_holds_the_field_of_view_of_an_anisotropic_oblique_scan():
    affine = np.array([[0.0, -1.0, 0.0, 30.0], [1.5, 0.0, 0.0, -20.0], [0.0, 0.0, 4.0, 7.0], [0.0, 0.0, 0.0, 1.0]])
    shape = (10, 30, 20)  # (D, H, W): x index -> world y (20 x 1.5 = 30 mm), y index -> world -x (30 mm), z 40 mm
    grid = cube_affine(shape, affine, 16)
    corners = np.array([[a, b, c] for a in (-0.5, 19.5) for b in (-0.5, 29.5) for c in (-0.5, 9.5)])
    world = corners @ affine[:3, :3].T + affine[:3, 3]
    centre = (world.min(axis=0) + world.max(axis=0)) / 2.0
    assert np.allclose(np.diag(grid)[:3], 40.0 / 16)
    assert np.allclose(grid[:3, 3] + 2.5 * 7.5, centre)


def test_xray_pairs_command_writes_the_folder_and_one_summary_line(tmp_path, capsys):
    code, out, err = _run(capsys, "data", "xray-pairs", "--out", tmp_path / "p", "--cases", 3, "--ct-size", CT, "--drr-size", DRR)
    assert code == 0 and err == ""
    assert out.count("\n") == 1 and out.startswith("3 X-ray / CT pairs (poses of one head CT; CT 16^3, DRRs 2 x 24 x 24)")
    assert sorted(p.relative_to(tmp_path / "p").as_posix() for p in (tmp_path / "p").rglob("*.nii.gz")) == [
        f"{split}/pose_{i:03d}/{m}.nii.gz" for split, i in (("test", 2), ("train", 0), ("val", 1)) for m in ("ct", "xray")
    ]


def test_drr_command_mirrors_the_ct_folder_and_flips_rows_on_request(pairs, tmp_path, capsys):
    sizes = ("--ct-size", CT, "--drr-size", DRR)
    code, out, _ = _run(capsys, "data", "drr", "--ct", pairs, "--out", tmp_path / "a", *sizes)
    assert code == 0 and out.startswith("3 X-ray / CT pairs (CT 16^3, DRRs 2 x 24 x 24)")
    code, _, _ = _run(capsys, "data", "drr", "--ct", pairs, "--out", tmp_path / "b", *sizes, "--vertical-flip")
    assert code == 0
    meta = json.loads((tmp_path / "b" / "drr.json").read_text())
    assert meta["layout"]["row_0"] == "superior" and meta["geometry"]["vertical_flip"] is True
    for case in ("train/pose_000", "val/pose_001", "test/pose_002"):
        source, _ = load_volume(pairs / case / "ct.nii.gz")
        ct, _ = load_volume(tmp_path / "a" / case / "ct.nii.gz")
        assert np.allclose(ct, source, atol=1e-3)  # a 16^3 cube resampled to 16^3 is itself
        plain, _ = load_volume(tmp_path / "a" / case / "xray.nii.gz")
        flipped, _ = load_volume(tmp_path / "b" / case / "xray.nii.gz")
        assert np.array_equal(flipped, plain[:, ::-1, :])
        assert np.allclose(plain, load_volume(pairs / case / "xray.nii.gz")[0], rtol=1e-4, atol=1e-4)


def _write_raw(path, sform: np.ndarray, sform_code: int = 1) -> None:
    """A NIfTI file whose header holds exactly this sform (nibabel would repair it on a normal save), no qform."""
    header = nib.Nifti1Header()
    header.set_data_shape((8, 8, 8))
    header.set_data_dtype(np.float32)
    header["srow_x"], header["srow_y"], header["srow_z"] = sform[0], sform[1], sform[2]
    header["sform_code"], header["qform_code"] = sform_code, 0
    path.parent.mkdir(parents=True)
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), None, header=header), str(path))


@pytest.fixture
def ct_root(tmp_path):
    """A one-case CT folder with a good 32 mm cube of water."""
    root = tmp_path / "cts"
    save_volume(root / "train" / "case_a" / "ct.nii.gz", np.zeros((32, 32, 32), np.float32), np.eye(4))
    return root


@pytest.mark.parametrize(
    "case, extra, message",
    [
        ("zero", [], "affine is not invertible"),
        ("flat", [], "affine is not invertible"),
        ("unoriented", [], "both sform_code and qform_code are 0"),
        (None, ["--sid", "10"], "sid: the source (10 mm from the isocentre) lies inside the volume"),
        (None, ["--sid", "100", "--sdd", "110"], "sdd: the detector (110 mm from the source) cuts through the volume"),
        (None, ["--spacing", "0.01"], "spacing: a 24 x 24 detector of 0.01 mm pixels is smaller than the volume's shadow"),
        (None, ["--ct-size", "0"], "ct-size: must be a whole number >= 2, got 0"),
        (None, ["--drr-size", "-3"], "drr-size: must be a whole number >= 1, got -3"),
        (None, ["--spacing", "0"], "spacing: detector pixel spacing must be a positive number of mm, got 0"),
        (None, ["--sid", "-5"], "sid: must be a positive distance in mm, got -5"),
        (None, ["--ct-modality", "t1"], "missing modality 't1' of case 'case_a'"),
    ],
)
def test_drr_bad_inputs_exit_2_with_one_error_line(ct_root, tmp_path, capsys, case, extra, message):
    if case is not None:
        sform = {"zero": np.zeros((4, 4)), "flat": np.array([[1.0, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 1]])}
        _write_raw(ct_root / "val" / "bad" / "ct.nii.gz", sform.get(case, np.eye(4)), 0 if case == "unoriented" else 1)
    code, out, err = _run(capsys, "data", "drr", "--ct", ct_root, "--out", tmp_path / "out", "--drr-size", DRR, *extra)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_drr_refuses_missing_and_overlapping_folders(ct_root, tmp_path, capsys):
    code, _, err = _run(capsys, "data", "drr", "--ct", tmp_path / "nowhere", "--out", tmp_path / "out")
    assert code == 2 and err == f"error: {tmp_path / 'nowhere'}: data folder not found\n"
    code, _, err = _run(capsys, "data", "drr", "--ct", ct_root, "--out", ct_root / "pairs")
    assert code == 2 and err.count("\n") == 1 and "overlap" in err
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    code, _, err = _run(capsys, "data", "drr", "--ct", ct_root, "--out", tmp_path / "mine")
    assert code == 2 and "not made by voxgen" in err and (tmp_path / "mine" / "notes.txt").exists()
