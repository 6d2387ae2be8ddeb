"""The command line: user errors end in one `error:` line and exit code 2."""

import shutil

import nibabel as nib
import numpy as np
import pytest

from tiny_run import TINY_RUN
from voxgen.cli import main

TINY = TINY_RUN


def _run(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _first_case(root, split="train"):
    return sorted(p for p in (root / split).iterdir() if p.is_dir())[0]


def _corrupt_gz(root):
    (_first_case(root) / "bravo.nii.gz").write_bytes(b"\x1f\x8b\x08\x00garbage" * 50)
    return "bravo.nii.gz"


def _truncated_gz(root):
    path = _first_case(root) / "seg.nii.gz"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return "seg.nii.gz"


def _two_dimensional(root):
    path = _first_case(root) / "bravo.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((16, 16), np.float32), np.eye(4)), path)
    return "bravo.nii.gz"


def _four_dimensional(root):
    path = _first_case(root) / "bravo.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((16, 16, 16, 2), np.float32), np.eye(4)), path)
    return "bravo.nii.gz"


def _mismatched_shapes(root):
    case = _first_case(root)
    image = nib.load(case / "seg.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((16, 16, 12), np.uint8), image.affine), case / "seg.nii.gz")
    return case.name


def _missing_modality(root):
    (_first_case(root) / "seg.nii.gz").unlink()
    return "seg.nii.gz"


def _empty_split(root):
    shutil.rmtree(root / "val")
    (root / "val").mkdir()
    return "val"


def _missing_split(root):
    shutil.rmtree(root / "train")
    return "train"


def _not_gzip(root):
    (_first_case(root) / "bravo.nii.gz").write_text("this is not a NIfTI file")
    return "bravo.nii.gz"


FAULTS = [
    _corrupt_gz,
    _truncated_gz,
    _two_dimensional,
    _four_dimensional,
    _mismatched_shapes,
    _missing_modality,
    _empty_split,
    _missing_split,
    _not_gzip,
]


@pytest.mark.parametrize("fault", FAULTS, ids=[f.__name__[1:] for f in FAULTS])
def test_bad_data_is_one_error_line_and_exit_2(fault, phantom_root, tmp_path, capsys):
    root = tmp_path / "data"
    shutil.copytree(phantom_root, root)
    named = fault(root)
    run_dir = tmp_path / "run"
    code, out, err = _run(capsys, "train", *TINY, f"data.root={root}", f"run.dir={run_dir}")
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert named in lines[0]
    assert "Traceback" not in err
    assert not (run_dir / "checkpoints").exists()


def test_missing_data_folder(tmp_path, capsys):
    code, _, err = _run(capsys, "train", f"data.root={tmp_path / 'nowhere'}", f"run.dir={tmp_path / 'run'}")
    assert code == 2 and err.startswith("error: ") and "nowhere" in err and len(err.strip().splitlines()) == 1


def test_unknown_key_suggests(capsys):
    code, _, err = _run(capsys, "train", "trainig.steps=3")
    assert code == 2 and "unknown config key 'trainig'" in err and "did you mean 'training'" in err


def test_debug_shows_the_traceback(tmp_path):
    from voxgen.errors import VoxgenError

    with pytest.raises(VoxgenError):
        main(["--debug", "train", f"data.root={tmp_path / 'nowhere'}"])


def test_dry_run_prints_resolved_config(capsys):
    code, out, _ = _run(capsys, "train", "--dry-run", "training.steps=17")
    assert code == 0 and "steps: 17" in out


def test_models_lists_registry(capsys):
    code, out, _ = _run(capsys, "models")
    assert code == 0 and out.startswith("unet")


def test_data_check_reports_problems(phantom_root, tmp_path, capsys):
    code, out, _ = _run(capsys, "data", "check", str(phantom_root))
    assert code == 0 and "no problems" in out
    root = tmp_path / "data"
    shutil.copytree(phantom_root, root)
    _corrupt_gz(root)
    _missing_modality(root)
    code, out, err = _run(capsys, "data", "check", str(root))
    assert code == 2 and len(out.strip().splitlines()) >= 2 and err.startswith("error: ")


def test_plan_json_reports_parameters_of_the_seeds_4l_small(capsys):
    import json

    code, out, _ = _run(
        capsys,
        "plan",
        "--json",
        "model.channels=[64,128,256,512]",
        "model.attention_levels=[false,false,true,true]",
        "model.num_res_blocks=2",
        "model.norm_num_groups=32",
        "model.in_channels=8",
        "model.out_channels=4",
        "data.shape=[40,64,64]",
    )
    result = json.loads(out)
    assert code == 0 and isinstance(result["params"], int)
    assert abs(result["params"] / 1e6 - 166.6) < 0.05  # unet3d_latent_a100.csv, 4L_small


def test_plan_impossible_shape_is_one_line(capsys):
    code, _, err = _run(
        capsys,
        "plan",
        "model.channels=[8,16,16,16]",
        "model.attention_levels=[false,false,false,false]",
        "model.norm_num_groups=4",
        "data.shape=[20,16,16]",
    )
    assert code == 2 and err.strip() == "error: data.shape D=20 is not divisible by 2^3 for a 4-level UNet"
