"""The bad-input suite: every fault voxgen detects ends in one `error:` line and exit code 2.

Each data fault is planted in a copy of the phantom folder and run through the command
line's own entry point, `voxgen.cli.main`, in this process (a new interpreter costs seconds
per run): `voxgen train` must stop with one line naming the file and the problem, leave
the run folder untouched, and `voxgen data check` must list that same line. Config faults
go through `voxgen train --dry-run`, `voxgen plan` and `voxgen train`. Two runs at the end
start a real `voxgen` process to check the exit code and stderr end to end.
"""

from __future__ import annotations

import gzip
import io
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tiny_run import TINY_RUN
from voxgen.cli import main

# A model small enough that a run which wrongly gets past the data check still ends quickly.
TINY = [*TINY_RUN, "training.device=cpu"]


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _error_line(err: str) -> str:
    """The one line of stderr, which must start with `error: `; returns its message."""
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0][len("error: ") :]


def _assert_run_folder_untouched(run_dir: Path) -> None:
    # Nothing is written before the data and the config are known to be good: no
    # checkpoint, no temporary file, not even the config.
    assert not run_dir.exists() or not any(run_dir.iterdir()), sorted(p.name for p in run_dir.rglob("*"))


# ---- planting faults -------------------------------------------------------------------------


def _case(root: Path, split: str = "train") -> Path:
    return min(p for p in (root / split).iterdir() if p.is_dir())


def _affine(path: Path) -> np.ndarray:
    return nib.load(str(path)).affine


def _save(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    nib.save(nib.Nifti1Image(data, affine), str(path))


def _with_sform(path: Path, data: np.ndarray, sform: np.ndarray) -> None:
    """Write an image whose only spatial transform is `sform` (a qform cannot hold a singular matrix)."""
    img = nib.Nifti1Image(data, None)
    img.set_qform(None, code=0)
    img.set_sform(sform, code=1)
    nib.save(img, str(path))


def _edit_header(path: Path, edit: Callable) -> None:
    """Change raw header fields of a .nii.gz without nibabel's repairs (they would undo the fault)."""
    raw = bytearray(gzip.decompress(path.read_bytes()))
    header = nib.Nifti1Header.from_fileobj(io.BytesIO(bytes(raw[:348])), check=False)
    edit(header)
    raw[:348] = header.binaryblock
    path.write_bytes(gzip.compress(bytes(raw)))


@dataclass(frozen=True)
class Fault:
    """`plant(root) -> path` breaks a data folder and returns the file or folder to blame."""

    name: str
    plant: Callable[[Path], Path]
    problem: str  # regex the message must match after the path
    training_refuses: bool = True  # False: a split training does not read (only `data check` sees it)


def _missing_root(root):
    shutil.rmtree(root)
    return root


def _root_is_file(root):
    shutil.rmtree(root)
    root.write_text("not a folder")
    return root


def _missing_split(root):
    shutil.rmtree(root / "train")
    return root / "train"


def _split_is_file(root):
    shutil.rmtree(root / "val")
    (root / "val").write_text("cases go here")
    return root / "val"


def _empty_split(root):
    shutil.rmtree(root / "val")
    (root / "val").mkdir()
    (root / "val" / ".DS_Store").write_text("hidden files are not cases")
    return root / "val"


def _missing_test_split(root):
    shutil.rmtree(root / "test")
    return root / "test"


def _empty_case_folder(root):
    case = _case(root)
    shutil.rmtree(case)
    case.mkdir()
    return case


def _missing_modality(root):
    path = _case(root) / "seg.nii.gz"
    path.unlink()
    return path


def _unknown_modality_file(root):
    path = _case(root) / "brav0.nii.gz"
    shutil.copy(_case(root) / "bravo.nii.gz", path)
    return path


def _modality_is_folder(root):
    path = _case(root) / "bravo.nii.gz"
    path.unlink()
    path.mkdir()
    return path


def _duplicate_case(root):
    shutil.copytree(_case(root, "train"), root / "test" / _case(root, "train").name)
    return root / "test" / _case(root, "train").name


def _corrupt_gzip(root):
    path = _case(root) / "bravo.nii.gz"
    path.write_bytes(b"\x1f\x8b\x08\x00" + np.random.default_rng(0).bytes(3000))
    return path


def _truncated_gzip(root):
    path = _case(root) / "seg.nii.gz"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def _plain_text(root):
    path = _case(root) / "bravo.nii.gz"
    path.write_text("this is not a NIfTI file\n")
    return path


def _png_renamed(root):
    path = _case(root) / "bravo.nii.gz"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(500))
    return path


def _gzip_of_text(root):
    path = _case(root) / "bravo.nii.gz"
    path.write_bytes(gzip.compress(b"patient notes, not an image\n" * 40))
    return path


def _empty_file(root):
    path = _case(root) / "bravo.nii.gz"
    path.write_bytes(b"")
    return path


def _unreadable(root):
    path = _case(root) / "bravo.nii.gz"
    path.chmod(0)
    return path


def _two_dimensional(root):
    path = _case(root) / "bravo.nii.gz"
    _save(path, np.ones((16, 16), np.float32), np.eye(4))
    return path


def _four_dimensional(root):
    path = _case(root) / "bravo.nii.gz"
    _save(path, np.random.default_rng(0).random((16, 16, 16, 2)).astype(np.float32), _affine(path))
    return path


def _single_slice(root):
    path = _case(root) / "bravo.nii.gz"
    _save(path, np.random.default_rng(0).random((16, 16, 1)).astype(np.float32), _affine(path))
    return path


def _empty_axis(root):
    path = _case(root) / "bravo.nii.gz"
    _edit_header(path, lambda h: h["dim"].__setitem__(3, 0))
    return path


def _complex_voxels(root):
    path = _case(root) / "bravo.nii.gz"
    _save(path, np.ones((16, 16, 16), np.complex64), _affine(path))
    return path


def _nan_voxels(root):
    path = _case(root) / "bravo.nii.gz"
    data = np.asarray(nib.load(str(path)).dataobj, np.float32)
    data[3, 4, 5], data[1, 1, 1] = np.nan, np.inf
    _save(path, data, _affine(path))
    return path


def _non_finite_affine(root):
    path = _case(root) / "bravo.nii.gz"

    def edit(header):
        header["qform_code"] = 0
        header["srow_x"][0] = np.nan

    _edit_header(path, edit)
    return path


def _singular_affine(root):
    path = _case(root) / "bravo.nii.gz"
    _with_sform(path, np.asarray(nib.load(str(path)).dataobj), np.diag([1.0, 1.0, 0.0, 1.0]))
    return path


def _negative_pixdim(root):
    path = _case(root) / "bravo.nii.gz"
    _edit_header(path, lambda h: h["pixdim"].__setitem__(1, -10.0))
    return path


def _voxels_too_large(root):
    path = _case(root) / "bravo.nii.gz"
    _save(path, np.asarray(nib.load(str(path)).dataobj), np.diag([30.0, 30.0, 30.0, 1.0]))
    return path


def _voxels_too_small(root):
    path = _case(root) / "bravo.nii.gz"
    _save(path, np.asarray(nib.load(str(path)).dataobj), np.diag([0.01, 0.01, 0.01, 1.0]))
    return path


def _shape_mismatch(root):
    path = _case(root) / "seg.nii.gz"
    _save(path, np.zeros((16, 16, 12), np.uint8), _affine(path))
    return path


def _affine_mismatch(root):
    path = _case(root) / "seg.nii.gz"
    moved = _affine(path).copy()
    moved[0, 3] += 2.0
    _save(path, np.asarray(nib.load(str(path)).dataobj), moved)
    return path


def _non_binary_mask(root):
    path = _case(root) / "seg.nii.gz"
    data = np.asarray(nib.load(str(path)).dataobj).astype(np.uint8)
    data[2, 2, 2] = 2
    _save(path, data, _affine(path))
    return path


def _constant_image(root):
    path = _case(root) / "bravo.nii.gz"
    _save(path, np.full((16, 16, 16), 7.0, np.float32), _affine(path))
    return path


def _header_claims_huge_volume(root):
    """A file of about 60 bytes whose header claims 1600^3 voxels: reading it would allocate 4 GB."""
    path = _case(root) / "bravo.nii.gz"
    header = nib.Nifti1Header()
    header.set_data_shape((1600, 1600, 1600))
    header.set_data_dtype(np.uint8)
    header.set_sform(_affine(path), code=1)
    path.write_bytes(gzip.compress(header.binaryblock + bytes(4 + 16)))  # extension flag, 16 voxels
    return path


def _no_orientation(root):
    path = _case(root) / "bravo.nii.gz"

    def edit(header):
        header["sform_code"] = 0
        header["qform_code"] = 0

    _edit_header(path, edit)
    return path


def _image_copied_into(split: str) -> Callable[[Path], Path]:
    """A train case's image copied over the same modality of a case with another name in `split`."""

    def plant(root):
        path = _case(root, split) / "bravo.nii.gz"
        shutil.copy(_case(root, "train") / "bravo.nii.gz", path)
        return path

    return plant


DATA_FAULTS = [
    Fault("missing data root", _missing_root, "data folder not found"),
    Fault("data root is a file", _root_is_file, "data root is a file, not a folder"),
    Fault("missing split", _missing_split, "split folder 'train' not found"),
    Fault("split is a file", _split_is_file, "split 'val' is a file, not a folder"),
    Fault("empty split", _empty_split, "split 'val' has no case folders"),
    Fault("missing test split", _missing_test_split, "split folder 'test' not found", training_refuses=False),
    Fault("empty case folder", _empty_case_folder, r"case folder '\w+' has no files"),
    Fault("missing modality", _missing_modality, r"missing modality 'seg' of case '\w+'"),
    Fault("unknown modality file", _unknown_modality_file, r"unknown file in case '\w+' .*did you mean 'bravo.nii.gz'"),
    Fault("modality is a folder", _modality_is_folder, "is a folder, not a NIfTI file"),
    Fault("case in two splits", _duplicate_case, r"case '\w+' is also in split 'train' .* leaks data"),
    Fault(
        "image copied into val",
        _image_copied_into("val"),
        r"same voxels as \S+/train/\w+/bravo\.nii\.gz in split 'train': the same image in two splits leaks data",
    ),
    Fault(
        "image copied into test",
        _image_copied_into("test"),
        r"same voxels as \S+/train/\w+/bravo\.nii\.gz in split 'train': the same image in two splits leaks data",
        training_refuses=False,
    ),
    Fault("corrupt gzip", _corrupt_gzip, r"cannot read NIfTI \(corrupt gzip data"),
    Fault("truncated gzip", _truncated_gzip, r"cannot read NIfTI \(truncated file"),
    Fault("plain text", _plain_text, r"not gzip-compressed \(it looks like text starting 'this is not a NIfTI"),
    Fault("PNG renamed", _png_renamed, r"not gzip-compressed \(it looks like a PNG image\)"),
    Fault("gzip of text", _gzip_of_text, r"not a NIfTI image \(it holds text starting 'patient notes"),
    Fault("empty file", _empty_file, r"file is empty \(0 bytes\)"),
    Fault(
        "header claims a huge volume",
        _header_claims_huge_volume,
        r"header claims a 1600 x 1600 x 1600 uint8 volume \(4096000352 bytes\), more than \d+ bytes of gzip data",
    ),
    pytest.param(
        Fault("unreadable file", _unreadable, "permission denied"),
        marks=pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file"),
    ),
    Fault("2-D image", _two_dimensional, r"has 2 dimensions \(shape \[16, 16\]\), expected 3"),
    Fault("4-D series", _four_dimensional, r"has 4 dimensions .*a series of 2 volumes"),
    Fault("single slice", _single_slice, r"is a single slice \(shape \[16, 16, 1\]\), not a 3-D volume"),
    Fault("empty axis", _empty_axis, r"has an empty axis \(shape \[16, 16, 0\]\)"),
    Fault("complex voxels", _complex_voxels, "voxel type complex64 is not a real number"),
    Fault("NaN and Inf voxels", _nan_voxels, "has 2 NaN or Inf voxels"),
    Fault("non-finite affine", _non_finite_affine, r"affine \(sform/qform\) has non-finite entries"),
    Fault("singular affine", _singular_affine, "affine is not invertible"),
    Fault("no orientation", _no_orientation, r"both sform_code and qform_code are 0 \(no orientation\)"),
    Fault("negative voxel size", _negative_pixdim, r"voxel size in the header \(pixdim\) is -10 x"),
    Fault("voxels too large", _voxels_too_large, r"voxel size 30 x 30 x 30 mm \(x, y, z\) is implausible"),
    Fault("voxels too small", _voxels_too_small, r"voxel size 0.01 x 0.01 x 0.01 mm \(x, y, z\) is implausible"),
    Fault("shape mismatch", _shape_mismatch, r"shape \[12, 16, 16\] differs from .*bravo.nii.gz shape \[16, 16, 16\]"),
    Fault("affine mismatch", _affine_mismatch, r"affine differs from .*bravo.nii.gz by 2 mm"),
    Fault("non-binary mask", _non_binary_mask, r"mask is not binary \{0, 1\} \(1 voxels with other values: 2\)"),
    Fault("constant image", _constant_image, r"image is constant \(every voxel 7\)"),
]


def _fault_id(fault) -> str:
    return fault.name.replace(" ", "-")


@pytest.fixture
def data_root(phantom_root, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(phantom_root, root)
    return root


@pytest.mark.parametrize("fault", DATA_FAULTS, ids=_fault_id)
def test_data_fault(fault, data_root, tmp_path, capsys):
    blamed = fault.plant(data_root)
    expected = re.compile(re.escape(f"{blamed}: ") + fault.problem)

    code, out, err = _run(capsys, "data", "check", str(data_root))
    assert code == 2
    assert _error_line(err) == f"{data_root}: {len(out.splitlines())} problem(s) found"
    # The fault is reported once, and nothing else is (the copy was clean before).
    assert [line for line in out.splitlines() if expected.match(line)] == out.splitlines(), out

    if fault.training_refuses:
        run_dir = tmp_path / "run"
        code, _, err = _run(capsys, "train", *TINY, f"data.root={data_root}", f"run.dir={run_dir}")
        assert code == 2
        message = _error_line(err)
        assert expected.match(message), message
        assert message in out.splitlines()  # training says what `data check` says
        _assert_run_folder_untouched(run_dir)


def test_data_check_reports_every_problem_at_once(data_root, capsys):
    code, out, err = _run(capsys, "data", "check", str(data_root))
    assert code == 0 and out.strip() == f"{data_root}: no problems found" and err == ""
    planted = [_constant_image(data_root), _missing_test_split(data_root), _non_binary_mask(data_root)]
    other_case = sorted(p for p in (data_root / "train").iterdir() if p.is_dir())[1]
    (other_case / "t1_pre.nii.gz").write_bytes(b"")
    planted.append(other_case / "t1_pre.nii.gz")
    code, out, err = _run(capsys, "data", "check", str(data_root))
    lines = out.splitlines()
    assert code == 2 and len(lines) == 4
    assert sorted(line.split(": ", 1)[0] for line in lines) == sorted(str(p) for p in planted)
    assert _error_line(err) == f"{data_root}: 4 problem(s) found"


def test_volumes_smaller_than_data_shape_are_resampled_not_refused(data_root, capsys):
    """Any grid of at least 2 voxels per axis is resampled to data.shape: a small volume is not a fault."""
    for path in data_root.glob("*/*/*.nii.gz"):
        img = nib.load(str(path))
        _save(path, np.asarray(img.dataobj)[::4, ::4, ::4], img.affine)  # 16 -> 4 voxels per axis
    code, out, _ = _run(capsys, "data", "check", str(data_root))
    assert code == 0, out
    from voxgen.data import VolumeDataset

    item = VolumeDataset(data_root, "train", ("bravo", "seg"), (16, 16, 16))[0]
    assert item["bravo"].shape == (1, 16, 16, 16) and set(item["seg"].unique().tolist()) <= {-1.0, 1.0}


# ---- config faults -----------------------------------------------------------------------------

CONFIG_FAULTS = [
    ("unknown key", ["trainig.steps=3"], "override 'trainig.steps=3': unknown config key 'trainig' (did you mean 'training'?)"),
    ("wrong type", ["training.steps=abc"], "override 'training.steps=abc': training.steps must be an integer, got 'abc'"),
    (
        "wrong list item type",
        ["data.shape=[a,16,16]"],
        "override 'data.shape=[a,16,16]': data.shape must be a list of integers, got [\"a\", 16, 16]",
    ),
    (
        "section set to a value",
        ["model=3"],
        "override 'model=3': model must be a section of keys (name, in_channels, out_channels, channels, ...), got 3",
    ),
    (
        "UNet depth vs shape",
        ["model.channels=[8,16,16,16]", "model.attention_levels=[false,false,false,false]", "data.shape=[20,16,16]"],
        "data.shape D=20 is not divisible by 2^3 for a 4-level UNet",
    ),
    (
        "patch size vs shape",
        ["model.name=dit", "data.shape=[16,15,16]"],
        "data.shape H=15 is not divisible by model.patch_size=2",
    ),
    ("head channels", ["model.num_head_channels=6"], "model.channels entry 16 is not divisible by model.num_head_channels=6"),
    ("norm groups", ["model.norm_num_groups=3"], "model.channels entry 8 is not divisible by model.norm_num_groups=3"),
    (
        "res blocks per level",
        ["model.num_res_blocks=[1,2,2]"],
        "model.num_res_blocks has 3 entries but model.channels has 2: give one per level",
    ),
    (
        "res blocks count",
        ["model.num_res_blocks=[1,0]"],
        "model.num_res_blocks=[1, 0] must be a whole number >= 1 or a list of them, one per level",
    ),
    ("cond dropout", ["training.cond_dropout=1.0"], "training.cond_dropout=1.0 must be in [0, 1)"),
    ("spike mads", ["guards.spike_mads=0"], "guards.spike_mads=0.0 must be positive"),
    ("spike window", ["guards.spike_window=0"], "guards.spike_window=0 must be at least 1"),
    ("rollback factor", ["guards.rollback_lr_factor=1.5"], "guards.rollback_lr_factor=1.5 must be in (0, 1]"),
    ("collapse ratio", ["guards.collapse_std_ratio=1"], "guards.collapse_std_ratio=1.0 must be in [0, 1)"),
    ("shard size", ["checkpoint.max_shard_bytes=1000"], "checkpoint.max_shard_bytes=1000 must be at least 1 MiB (1048576 bytes)"),
    ("keep last", ["checkpoint.keep_last=0"], "checkpoint.keep_last=0 must be at least 1"),
    ("tolerance", ["sample.tolerance=0"], "sample.tolerance=0.0 must be in (0, 1)"),
    ("guidance", ["sample.guidance_scale=-2"], "sample.guidance_scale=-2.0 must be at least 0 (1 = no guidance)"),
    (
        "ddpm betas",
        ["ddpm.beta_start=0.1", "ddpm.beta_end=0.01"],
        "ddpm.beta_start=0.1 and ddpm.beta_end=0.01 must satisfy 0 < beta_start <= beta_end < 1",
    ),
]
SMALL_UNET = TINY[1:5]  # channels [8, 16] with widths that divide


@pytest.mark.parametrize("overrides, message", [c[1:] for c in CONFIG_FAULTS], ids=[c[0] for c in CONFIG_FAULTS])
def test_config_fault(overrides, message, tmp_path, capsys):
    argv = [*SMALL_UNET, "data.shape=[16,16,16]", *overrides]
    code, out, err = _run(capsys, "train", "--dry-run", *argv)
    assert code == 2 and out == "" and _error_line(err) == message
    run_dir = tmp_path / "run"
    code, _, err = _run(capsys, "train", *argv, f"run.dir={run_dir}", f"data.root={tmp_path / 'unused'}")
    assert code == 2 and _error_line(err) == message
    _assert_run_folder_untouched(run_dir)


def test_plan_gives_the_shape_error_before_building(capsys):
    code, out, err = _run(capsys, "plan", "model.name=hdit", "data.shape=[16,16,12]", "model.level_depths=[1,1,1,1,1]")
    assert code == 2 and out == ""
    assert _error_line(err) == (
        "data.shape W=12 is not divisible by model.patch_size * 2^2 = 8 "
        "(HDiT with model.level_depths=[1, 1, 1, 1, 1] merges tokens 2 times)"
    )


def test_sample_solver_is_checked_against_the_sampler_registry(capsys):
    from voxgen.diffusion.samplers import SAMPLERS

    code, _, err = _run(capsys, "train", "--dry-run", "sample.solver=eulr")
    assert code == 2 and _error_line(err).startswith("sample.solver='eulr' is not one of ")
    assert "did you mean 'euler'" in err
    for name, entry in SAMPLERS.items():  # every registered sampler is accepted for its strategy ...
        code, _, err = _run(capsys, "train", "--dry-run", f"strategy={entry.strategy}", f"sample.solver={name}")
        if name == "diffrs":  # ... but DiffRS, whose head is trained on the run afterwards
            assert code == 2 and _error_line(err).startswith("sample.solver=diffrs needs the run's trained DiffRS head")
        else:
            assert code == 0
    assert _run(capsys, "train", "--dry-run", "sample.solver=euler:10")[0] == 0


def test_bad_yaml_value_names_the_file_and_key(tmp_path, capsys):
    path = tmp_path / "exp.yaml"
    path.write_text("training:\n  lr: fast\n")
    code, _, err = _run(capsys, "train", "--dry-run", "--config", str(path))
    assert code == 2 and _error_line(err) == f"{path}: training.lr must be a number, got 'fast'"


# ---- end to end: real `voxgen` processes -------------------------------------------------------


def test_real_processes_exit_2_with_one_error_line(phantom_root, tmp_path):
    """Exit code and stderr of a fresh interpreter, not of `main` in this process.

    The two runs are started together: each spends seconds importing torch and MONAI, and
    they overlap on a machine with more than one core. Config faults take the same path
    through `main` as data faults, so they are checked in-process only.
    """
    bad_data, listed = tmp_path / "bad", tmp_path / "listed"
    shutil.copytree(phantom_root, bad_data)
    shutil.copytree(phantom_root, listed)
    png = _png_renamed(bad_data)
    shared = _duplicate_case(listed)  # copied while still whole: only the train copy is then emptied
    empty = _empty_file(listed)
    run_dir = tmp_path / "run"
    runs = {
        "data": ["train", *TINY, f"data.root={bad_data}", f"run.dir={run_dir}"],
        "check": ["data", "check", str(listed)],
    }
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    started = {
        name: subprocess.Popen(
            [sys.executable, "-m", "voxgen.cli", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
        for name, argv in runs.items()
    }
    done = {name: (proc.communicate(timeout=180), proc.returncode) for name, proc in started.items()}

    (out, err), code = done["data"]
    assert code == 2 and out == ""
    assert _error_line(err) == f"{png}: not gzip-compressed (it looks like a PNG image); expected a .nii.gz NIfTI file"
    _assert_run_folder_untouched(run_dir)

    (out, err), code = done["check"]
    assert code == 2
    assert [line.split(": ", 1)[0] for line in out.splitlines()] == [str(empty), str(shared)]
    assert _error_line(err) == f"{listed}: 2 problem(s) found"
