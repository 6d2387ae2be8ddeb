"""`voxgen sample` writes NIfTI volumes with the data's affine and orientation, and a mosaic."""

import nibabel as nib
import numpy as np

from tiny_run import TINY_RUN
from voxgen.cli import main

TINY = [*TINY_RUN, "training.batch_size=2"]


def test_samples_keep_the_data_affine_and_seeds_are_per_sample(phantom_root, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *TINY, f"data.root={phantom_root}", f"run.dir={run}"]) == 0
    assert main(["sample", "--run", str(run), "--num", "3", "--steps", "4", "--out", str(tmp_path / "s")]) == 0
    reference = nib.load(sorted((phantom_root / "train").iterdir())[0] / "bravo.nii.gz")
    for i in range(3):
        image = nib.load(tmp_path / "s" / f"sample_{i:03d}_bravo.nii.gz")
        assert image.shape == reference.shape
        assert np.array_equal(image.affine, reference.affine)
        assert nib.aff2axcodes(image.affine) == ("R", "A", "S")
        data = image.get_fdata()
        assert 0.0 <= data.min() and data.max() <= 1.0
        mask = nib.load(tmp_path / "s" / f"sample_{i:03d}_seg.nii.gz").get_fdata()
        assert set(np.unique(mask)) <= {0.0, 1.0}
    png = (tmp_path / "s" / "mosaic.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert "euler:4" in summary and "NFE 4," in summary and "s/volume" in summary
    # Heun, 2 steps, guided: 2 evaluations per step, each of them two network calls.
    assert (
        main(
            [
                "sample",
                "--run",
                str(run),
                "--num",
                "1",
                "--solver",
                "heun2:2,shift=3",
                "--guidance-scale",
                "2",
                "--out",
                str(tmp_path / "g"),
            ]
        )
        == 0
    )
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert "heun2:2,shift=3" in summary and "NFE 8," in summary
    assert main(["sample", "--run", str(run), "--solver", "ddim:3", "--out", str(tmp_path / "x")]) == 2
    assert "strategy=rflow" in capsys.readouterr().err


def test_a_sample_depends_on_its_seed_not_on_the_batch(phantom_root, tmp_path):
    import torch

    from voxgen.diffusion.generate import generate
    from voxgen.diffusion.samplers import parse_solver
    from voxgen.training.runs import load_run

    run = tmp_path / "run"
    assert main(["train", *TINY, f"data.root={phantom_root}", f"run.dir={run}"]) == 0
    cfg, parts, _ = load_run(run)
    with torch.no_grad():  # give the zero-initialised output layer weights, so samples depend on the model
        for p in parts.model.parameters():
            p.add_(0.01)
    cond = torch.cat([torch.ones(1, 1, 16, 16, 16), -torch.ones(2, 1, 16, 16, 16)])
    three = generate(parts, [5, 6, 7], cond, solver=parse_solver("euler:3"), batch_size=3).volumes
    alone = generate(parts, [6], cond[1:2], solver=parse_solver("euler:3"), batch_size=1).volumes
    assert torch.allclose(three[1], alone[0], atol=1e-5)
    assert not torch.allclose(three[1], three[2], atol=1e-3)


def test_bravo_uncond_plans_trains_and_samples_bravo_alone(phantom_root, tmp_path, capsys):
    """Stage 1 of the ControlNet recipe: BRAVO without a condition, 1 -> 1 channels."""
    import json

    common = [*TINY, "mode=bravo_uncond", f"data.root={phantom_root}"]
    assert main(["plan", "--json", *common]) == 0
    planned = json.loads(capsys.readouterr().out)
    assert (planned["in_channels"], planned["out_channels"]) == (1, 1)
    run = tmp_path / "run"
    assert main(["train", *common, f"run.dir={run}"]) == 0
    assert main(["sample", "--run", str(run), "--num", "1", "--steps", "2", "--out", str(tmp_path / "s")]) == 0
    written = sorted(p.name for p in (tmp_path / "s").glob("*.nii.gz"))
    assert written == ["sample_000_bravo.nii.gz"]
    # Guidance needs a condition to drop: refused in one line.
    assert main(["sample", "--run", str(run), "--guidance-scale", "2", "--out", str(tmp_path / "g")]) == 2
