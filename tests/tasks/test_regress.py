"""task=regress (X-ray to CT, seed 004): the trainer's regression task on a grid-of-its-own input."""

from __future__ import annotations

import csv
import os

import pytest
import torch
from rich.console import Console

from tiny_regress import SIZE, TINY_REGRESS, make_regress_root
from voxgen import checkpoint as store
from voxgen.cli import main
from voxgen.config import compose
from voxgen.data.dataset import VolumeDataset, check_folder
from voxgen.data.layout import Modalities
from voxgen.errors import ConfigError
from voxgen.memory.planner import plan
from voxgen.tasks import build_task
from voxgen.training.trainer import train


@pytest.fixture(scope="module")
def regress_root(tmp_path_factory):
    return make_regress_root(tmp_path_factory.mktemp("regress"))


def _quiet():
    return Console(file=open(os.devnull, "w"))


def _cfg(root, run_dir, *extra):
    return compose([], [*TINY_REGRESS, f"data.root={root}", f"run.dir={run_dir}", *extra])


def test_the_input_keeps_its_own_grid_and_scale(regress_root):
    cfg = _cfg(regress_root, "unused")
    item = VolumeDataset.of(cfg.data, "train", ("xray", "ct"))[0]
    assert item["xray"].shape == (1, 2, SIZE, SIZE) and item["ct"].shape == (1, SIZE, SIZE, SIZE)
    # The X-rays are scaled per volume (their units are not HU): min -> -1, p99.5 -> 1.
    assert item["xray"].min().item() == -1.0 and item["xray"].max().item() == 1.0
    # The CT keeps the fixed HU map: air -1000 HU is just above -1 of [-1024, 3071].
    assert item["ct"].min().item() == pytest.approx(2 * 24 / 4095 - 1, abs=1e-5)
    # A folder check accepts the X-ray file's other shape and affine only when it is declared.
    layout = Modalities(("xray", "ct"), (), (("xray", (2, SIZE, SIZE)),))
    assert check_folder(regress_root, layout=layout) == []
    problems = check_folder(regress_root, layout=Modalities(("xray", "ct"), ()))
    assert problems and all("differs from" in line for line in problems)


@pytest.fixture(scope="module")
def trained(regress_root, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    cfg = _cfg(regress_root, run_dir, "training.steps=40", "training.val_every=20", "training.lr=3e-3")
    return run_dir, train(cfg, _quiet())


def test_training_lowers_the_loss_and_logs_psnr_and_ssim_to_a_csv(trained):
    run_dir, result = trained
    first, last = result.history[0], result.history[-1]
    assert last["step"] == 40 and last["val_loss"] < 0.7 * first["val_loss"]
    assert last["val_psnr_ema"] > first["val_psnr_ema"] + 1.0 and 0.0 < last["val_ssim_ema"] <= 1.0
    rows = list(csv.DictReader((run_dir / "history.csv").open()))
    assert [int(r["step"]) for r in rows] == [0, 20, 40]
    assert float(rows[-1]["val_psnr_ema"]) == pytest.approx(last["val_psnr_ema"])


def test_evaluate_scores_the_run_its_untrained_network_and_the_mean_volume(trained, capsys):
    run_dir, _ = trained
    assert main(["evaluate", "--run", str(run_dir)]) == 0
    rows = list(csv.DictReader((run_dir / "evaluation" / "regress.csv").open()))
    assert {r["case"] for r in rows} == {"case_08", "case_09", "mean"}
    mean = {r["method"]: (float(r["psnr_db"]), float(r["ssim"])) for r in rows if r["case"] == "mean"}
    assert set(mean) == {"trained", "untrained", "mean volume"}
    assert mean["trained"][0] > mean["untrained"][0] and mean["trained"][1] > mean["untrained"][1]
    assert "PSNR / SSIM: trained" in capsys.readouterr().out


def test_a_run_stopped_and_resumed_is_bit_identical(regress_root, tmp_path):
    extra = ("training.steps=6", "training.val_every=3", "training.checkpoint_every=2")
    train(_cfg(regress_root, tmp_path / "straight", *extra), _quiet())
    assert train(_cfg(regress_root, tmp_path / "chain", *extra), _quiet(), stop_at=3).interrupted
    resumed = train(_cfg(regress_root, tmp_path / "chain", *extra), _quiet())
    assert resumed.resumed_from == 3 and resumed.step == 6
    _, a, _ = store.load_latest(tmp_path / "straight")
    _, b, _ = store.load_latest(tmp_path / "chain")
    assert set(a) == set(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_the_planner_traces_a_network_whose_output_is_not_its_input(regress_root):
    cfg = _cfg(regress_root, "unused", "training.batch_size=1")
    task = build_task(cfg, "cpu")
    p = plan(cfg)
    params = sum(t.numel() for t in task.model.parameters())
    assert p.params == params
    # The peak holds at least the weights, AdamW's two moments and the gradients (fp32), and the
    # 16^3 output with its loss.
    assert p.peak_bytes > 4 * 4 * params + 4 * SIZE**3


@pytest.mark.parametrize(
    "override, words",
    [
        (None, "needs a grid of its own"),
        ("regress.loss=huber", "regress.loss='huber' is not one of l1, mse"),
        ("regress.input=ct", "both 'ct'"),
        ("data.shape=[16,16,8]", "makes a cube"),
        ("model.name=unet", "model.name"),
    ],
)
def test_bad_configs_are_refused_in_one_line(regress_root, override, words):
    overrides = [o for o in TINY_REGRESS if override or not o.startswith("data.grids")]
    with pytest.raises(ConfigError, match=words) as info:
        compose([], [*overrides, f"data.root={regress_root}", *([override] if override else [])])
    assert "\n" not in str(info.value)


def test_sample_reconstructs_given_xrays_on_the_training_grid(trained, regress_root, tmp_path, capsys):
    from voxgen.data.nifti import load_volume

    run_dir, _ = trained
    out = tmp_path / "out"
    assert main(["sample", "--run", str(run_dir), "--input", str(regress_root / "test"), "--out", str(out)]) == 0
    written = sorted(p.name for p in out.iterdir())
    assert written == ["case_08_ct.nii.gz", "case_08_ct.png", "case_09_ct.nii.gz", "case_09_ct.png"]
    volume, affine = load_volume(out / "case_08_ct.nii.gz")
    real, real_affine = load_volume(regress_root / "test" / "case_08" / "ct.nii.gz")
    assert volume.shape == real.shape and (affine == real_affine).all()
    assert -1024.0 <= volume.min() and volume.max() <= 3071.0  # HU, the data's units
    assert "reconstructed 2 volumes" in capsys.readouterr().out


@pytest.mark.parametrize("shape, words", [((3, SIZE, SIZE), "3 images of 16 x 16"), ((2, 32, 32), "2 images of 32 x 32")])
def test_xrays_of_the_wrong_count_or_size_are_refused_in_one_line(trained, tmp_path, capsys, shape, words):
    import numpy as np

    from voxgen.data.nifti import save_volume

    run_dir, _ = trained
    path = save_volume(tmp_path / "xray.nii.gz", np.ones(shape, dtype=np.float32), np.eye(4))
    assert main(["sample", "--run", str(run_dir), "--input", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and words in err and "trained on 2 of 16 x 16" in err
