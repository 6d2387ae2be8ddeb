"""Size-bin modes (seg_conditioned, seg_conditioned_input) and data sets with their own modality names."""

import csv
import json
import shutil

import numpy as np
import pytest
import torch

from tiny_run import TINY_RUN
from voxgen.cli import main
from voxgen.data.tumour_bins import size_bin_vector
from voxgen.diffusion.modes import MODES, NULL_SIZE_BINS, scale_counts
from voxgen.draws import Draws

TINY = [*TINY_RUN, "training.batch_size=2"]
COUNTS = torch.tensor([[1, 0, 2, 0, 0, 0, 10], [0, 0, 0, 0, 0, 0, 0]])


def test_the_embedding_mode_passes_the_vector_beside_the_time():
    mode = MODES["seg_conditioned"]
    x, cond = torch.zeros(2, 1, 4, 4, 4), scale_counts(COUNTS)
    assert cond.max() == 1.0 and cond[0, 2] == pytest.approx(0.2)
    inputs, vector = mode.network_inputs(x, cond)
    assert inputs is x and torch.equal(vector, cond)
    assert mode.vector_size == 7 and mode.channels(_pixel()) == (1, 1)


def test_the_input_mode_gives_seven_constant_channels():
    mode = MODES["seg_conditioned_input"]
    x, cond = torch.zeros(2, 1, 4, 4, 4), scale_counts(COUNTS)
    inputs, vector = mode.network_inputs(x, cond)
    assert vector is None and inputs.shape == (2, 8, 4, 4, 4)
    assert torch.equal(inputs[:, 1:], cond[:, :, None, None, None].expand(-1, -1, 4, 4, 4))
    assert mode.vector_size == 0 and mode.channels(_pixel()) == (8, 1)


def test_the_null_size_bin_vector_is_no_real_request():
    mode = MODES["seg_conditioned"]
    cond = scale_counts(COUNTS)
    assert torch.equal(mode.null_condition(cond), torch.full((2, 7), NULL_SIZE_BINS))
    dropped = mode.drop_conditions(cond.repeat(500, 1), 0.5, Draws.of(torch.Generator().manual_seed(0), 1000, "cpu"))
    null = (dropped == NULL_SIZE_BINS).all(dim=1)
    kept = (dropped == cond.repeat(500, 1)).all(dim=1)
    assert torch.all(null ^ kept) and 400 < int(null.sum()) < 600


def _pixel():
    from voxgen.diffusion.spaces import PixelSpace

    return PixelSpace()


def test_seg_conditioned_plans_trains_samples_and_evaluates(phantom_root, tmp_path, capsys):
    common = [*TINY, "mode=seg_conditioned", "training.cond_dropout=0.2", f"data.root={phantom_root}"]
    assert main(["train", "--dry-run", *common]) == 0
    assert "name: seg_conditioned" in capsys.readouterr().out
    assert main(["plan", "--json", *common]) == 0
    planned = json.loads(capsys.readouterr().out)
    assert (planned["in_channels"], planned["out_channels"]) == (1, 1)
    run = tmp_path / "run"
    assert main(["train", *common, f"run.dir={run}"]) == 0
    out = tmp_path / "s"
    argv = ["sample", "--run", str(run), "--num", "2", "--steps", "2", "--guidance-scale", "2", "--out", str(out)]
    assert main(argv) == 0
    assert "NFE 4," in capsys.readouterr().out.strip().splitlines()[-1]  # guided: two calls a step
    rows = list(csv.DictReader((out / "size_bins.csv").open()))
    assert [r["sample"] for r in rows] == ["0", "1"]
    # The requests are the size bins of the test split's masks, in order, measured on the model grid.
    from voxgen.data.dataset import VolumeDataset

    test = VolumeDataset(phantom_root, "test", ("seg",), [16, 16, 16])
    for i, row in enumerate(rows):
        case = test[i % len(test)]  # cycling through the split
        wanted = size_bin_vector(case["seg"][0].numpy(), test.affine)
        assert row["case"] == case["case"]
        assert [int(v) for k, v in row.items() if k.startswith("asked")] == wanted.tolist()
        assert sum(k.startswith("got") for k in row) == 7
    assert sorted(p.name for p in out.glob("*.nii.gz")) == ["sample_000_seg.nii.gz", "sample_001_seg.nii.gz"]
    evaluation = tmp_path / "e"
    argv = ["evaluate", "--run", str(run), "--samples", "2", "--metrics", "bins_exact,bins_mae", "--out", str(evaluation)]
    assert main(argv) == 0
    (row,) = list(csv.DictReader((evaluation / "evaluate.csv").open()))
    assert 0 <= float(row["bins exact"]) <= 1 and 0 <= float(row["bins MAE"]) <= 10
    table = (evaluation / "evaluate.md").read_text()
    assert "Mean absolute count error per bin:" in table


def test_seg_conditioned_input_takes_eight_channels_and_samples(phantom_root, tmp_path, capsys):
    common = [*TINY, "mode=seg_conditioned_input", f"data.root={phantom_root}"]
    assert main(["plan", "--json", *common]) == 0
    planned = json.loads(capsys.readouterr().out)
    assert (planned["in_channels"], planned["out_channels"]) == (8, 1)
    run = tmp_path / "run"
    assert main(["train", *common, f"run.dir={run}"]) == 0
    out = tmp_path / "s"
    assert main(["sample", "--run", str(run), "--num", "1", "--steps", "2", "--out", str(out)]) == 0
    assert len(list(csv.DictReader((out / "size_bins.csv").open()))) == 1


def test_size_bin_metrics_need_a_size_bin_mode(phantom_root, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *TINY, "mode=seg", f"data.root={phantom_root}", f"run.dir={run}"]) == 0
    capsys.readouterr()
    assert main(["evaluate", "--run", str(run), "--samples", "2", "--metrics", "bins_exact"]) == 2
    assert "needs a size-bin mode (seg_conditioned)" in capsys.readouterr().err


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["mode.generated=[t1c]"], "mode=bravo: modality 't1c' is not in data.modalities"),
        (["data.masks=[mask]"], "data.masks entry 'mask' is not in data.modalities"),
        (["mode=seg_conditioned", "data.masks=[]"], "mode=seg_conditioned counts tumours in the generated 'seg', which is"),
        (["mode.conditions=[seg,flair]"], "mode.conditions=['seg', 'flair'] names 2 modalities; mode=bravo conditions 1"),
        (["data.modalities=[bravo,seg,bravo]"], "data.modalities=['bravo', 'seg', 'bravo'] names a modality twice"),
        (["data.modalities=[bravo.nii.gz,seg]"], "data.modalities entry 'bravo.nii.gz' must be a plain file name"),
    ],
)
def test_bad_modality_settings_are_one_line(capsys, overrides, message):
    assert main(["train", "--dry-run", *overrides]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1, err


def test_a_data_set_with_its_own_modality_names_trains_and_samples(phantom_root, tmp_path, capsys):
    root = tmp_path / "renamed"
    for case in phantom_root.glob("*/*"):
        target = root / case.relative_to(phantom_root)
        target.mkdir(parents=True)
        shutil.copy(case / "bravo.nii.gz", target / "t1c.nii.gz")
        shutil.copy(case / "seg.nii.gz", target / "lesions.nii.gz")
    names = ["data.modalities=[t1c,lesions]", "data.masks=[lesions]", "mode.generated=[t1c]", "mode.conditions=[lesions]"]
    assert main(["data", "check", str(root), *names[:2]]) == 0
    assert main(["data", "check", str(root), *names, "--mode", "bravo"]) == 0
    capsys.readouterr()
    assert main(["data", "check", str(root)]) == 2  # BrainMetShare's names: every file is unknown
    assert "unknown file in case" in capsys.readouterr().out
    run = tmp_path / "run"
    assert main(["train", *TINY, *names, f"data.root={root}", f"run.dir={run}"]) == 0
    assert main(["sample", "--run", str(run), "--num", "1", "--steps", "2", "--out", str(tmp_path / "s")]) == 0
    written = sorted(p.name for p in (tmp_path / "s").glob("*.nii.gz"))
    assert written == ["sample_000_lesions.nii.gz", "sample_000_t1c.nii.gz"]
    import nibabel as nib

    mask = np.asarray(nib.load(tmp_path / "s" / "sample_000_lesions.nii.gz").dataobj)
    assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1}  # written as a mask
    # With the default names the same folder holds unknown files: one line naming one.
    capsys.readouterr()
    assert main(["train", *TINY, f"data.root={root}", f"run.dir={tmp_path / 'other'}"]) == 2
    assert "unknown file in case" in capsys.readouterr().err
