"""Stage 2 of the ControlNet recipe: `model.name=controlnet controlnet.base=RUN1` on a stage-1
`mode=bravo_uncond` UNet run (tiny: 16^3 phantoms, the TINY_RUN UNet)."""

import shutil

import pytest
import torch
import yaml

from tiny_run import TINY_RUN
from voxgen.cli import main
from voxgen.config.compose import compose
from voxgen.diffusion.parts import build_parts
from voxgen.errors import ConfigError
from voxgen.models.controlnet import ControlledUNet
from voxgen.training.runs import load_run

# Both stages move within a few steps: no warm-up, a large learning rate (the UNet's output
# convolution starts at zero; an untrained base would pass almost nothing of the control on).
FAST = ["training.steps=4", "training.warmup_steps=0", "training.lr=1e-3"]
STAGE2 = ["mode=bravo", "model.name=controlnet", *FAST]


def _files(run) -> dict:
    return {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(run.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def runs(phantom_root, tmp_path_factory):
    """(stage-1 run, its files before stage 2, stage-2 run)."""
    root = tmp_path_factory.mktemp("controlnet")
    run1, run2 = root / "stage1", root / "stage2"
    assert main(["train", *TINY_RUN, *FAST, "mode=bravo_uncond", f"data.root={phantom_root}", f"run.dir={run1}"]) == 0
    before = _files(run1)
    args = [*TINY_RUN, *STAGE2, f"controlnet.base={run1}", f"data.root={phantom_root}", f"run.dir={run2}"]
    assert main(["train", *args]) == 0
    return run1, before, run2


def _stage2_config(run1, *extra):
    return compose([], [*TINY_RUN, *STAGE2, f"controlnet.base={run1}", *extra])


def test_at_initialisation_the_output_is_the_base_output(runs):
    run1, _, _ = runs
    _, base, _ = load_run(run1, device="cpu")
    model = build_parts(_stage2_config(run1)).model.eval()
    assert isinstance(model, ControlledUNet)
    gen = torch.Generator().manual_seed(0)
    x_t = torch.randn(3, 1, 16, 16, 16, generator=gen)
    t = torch.rand(3, generator=gen)
    with torch.no_grad():
        expected = base.model(x_t, t)
        for mask in (torch.randn(3, 1, 16, 16, 16, generator=gen), torch.zeros(3, 1, 16, 16, 16), torch.ones(3, 1, 16, 16, 16)):
            got = model(torch.cat([x_t, mask], dim=1), t)
            assert (got - expected).abs().max().item() < 1e-6
    # The ControlNet starts as the base's encoder: same input convolution and first level.
    assert torch.equal(model.controlnet.conv_in.conv.weight, base.model.net.conv_in.conv.weight)
    assert torch.equal(
        model.controlnet.down_blocks[0].resnets[0].conv1.conv.weight, base.model.net.down_blocks[0].resnets[0].conv1.conv.weight
    )
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith("controlnet.") for n in trainable)


def test_training_leaves_the_base_and_the_stage1_run_untouched(runs):
    run1, before, run2 = runs
    assert _files(run1) == before
    _, stage1, _ = load_run(run1, device="cpu")
    reference = stage1.model.state_dict()
    for weights in ("ema", "model"):
        _, stage2, step = load_run(run2, weights=weights, device="cpu")
        assert step == 4
        base = stage2.model.base.state_dict()
        assert base.keys() == reference.keys()
        assert all(torch.equal(base[k], reference[k]) for k in reference), weights
    # ... while the ControlNet trained: its zero convolutions are no longer zero.
    assert max(p.abs().max().item() for p in stage2.model.controlnet.controlnet_mid_block.parameters()) > 0


def test_after_training_the_mask_changes_the_output(runs):
    _, _, run2 = runs
    _, parts, _ = load_run(run2, weights="model", device="cpu")
    gen = torch.Generator().manual_seed(1)
    x_t = torch.randn(2, 1, 16, 16, 16, generator=gen)
    t = torch.full((2,), 0.5)
    mask = -torch.ones(2, 1, 16, 16, 16)
    mask[:, :, 4:12, 4:12, 4:12] = 1.0
    with torch.no_grad():
        with_mask = parts.model(torch.cat([x_t, mask], dim=1), t)
        null = parts.model(torch.cat([x_t, torch.zeros_like(mask)], dim=1), t)
    change = (with_mask - null).abs().max().item()
    assert change > 1e-4


def test_sample_writes_volumes(runs, tmp_path):
    _, _, run2 = runs
    out = tmp_path / "samples"
    assert main(["sample", "--run", str(run2), "--num", "2", "--steps", "2", "--out", str(out)]) == 0
    for i in range(2):
        assert (out / f"sample_{i:03d}_bravo.nii.gz").stat().st_size > 0
        assert (out / f"sample_{i:03d}_seg.nii.gz").stat().st_size > 0


def _fake_base(runs, tmp_path, **changes):
    """A copy of the stage-1 run's config.yaml, with changes, in a folder of its own."""
    run1 = runs[0]
    folder = tmp_path / "fake"
    folder.mkdir()
    data = yaml.safe_load((run1 / "config.yaml").read_text())
    for dotted, value in changes.items():
        section, _, key = dotted.rpartition("__")
        (data[section] if section else data)[key] = value
    (folder / "config.yaml").write_text(yaml.safe_dump(data))
    return folder


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"mode": "bravo"}, "was trained with mode=bravo; mode=bravo needs a base that generates bravo unconditionally"),
        ({"model__name": "dit"}, "trained model.name=dit; a ControlNet needs a UNet base (model.name=unet)"),
        ({"data__shape": [32, 32, 32]}, "was trained with data.shape=[32, 32, 32]; this run has data.shape=[16, 16, 16]"),
        ({"strategy": "ddpm"}, "was trained with strategy=ddpm; this run has strategy=rflow"),
        ({"task": "autoencoder"}, "is a task=autoencoder run, not a diffusion run"),
    ],
)
def test_a_base_that_does_not_fit_is_one_line(runs, tmp_path, changes, message):
    folder = _fake_base(runs, tmp_path, **changes)
    with pytest.raises(ConfigError) as info:
        _stage2_config(folder)
    text = str(info.value)
    assert text == f"controlnet.base={folder} {message}" or text.startswith(f"controlnet.base={folder} {message}"), text
    assert "\n" not in text


def test_missing_or_foreign_bases_are_one_line(runs, tmp_path):
    cases = [
        (None, "model.name=controlnet needs controlnet.base=RUN_DIR"),
        (str(tmp_path / "nowhere"), f"controlnet.base={tmp_path / 'nowhere'}: no such run folder"),
        (str(tmp_path), f"controlnet.base={tmp_path}: not a voxgen run folder (no config.yaml)"),
    ]
    for base, message in cases:
        with pytest.raises(ConfigError) as info:
            compose([], [*TINY_RUN, *STAGE2, *([] if base is None else [f"controlnet.base={base}"])])
        assert str(info.value).startswith(message) and "\n" not in str(info.value), str(info.value)
    run1 = runs[0]
    with pytest.raises(ConfigError, match="mode=bravo_uncond needs a base"):
        compose([], [*TINY_RUN, *STAGE2, "mode=bravo_uncond", f"controlnet.base={run1}"])
    with pytest.raises(ConfigError, match=r"controlnet.conditioning_channels=\[16, 32\] must be one positive width"):
        _stage2_config(run1, "controlnet.conditioning_channels=[16,32]")


def test_a_base_without_checkpoint_is_refused_when_built(runs, tmp_path):
    from voxgen.errors import CheckpointError

    folder = tmp_path / "empty"
    folder.mkdir()
    shutil.copy(runs[0] / "config.yaml", folder / "config.yaml")
    cfg = _stage2_config(folder)  # the config alone checks out
    with pytest.raises(CheckpointError, match="the stage-1 run has no checkpoint yet"):
        build_parts(cfg)


def test_the_plan_counts_the_frozen_base_as_weights_without_optimiser_state(runs):
    from voxgen.memory.planner import plan

    run1, _, _ = runs
    cfg = _stage2_config(run1)
    model = build_parts(cfg).model
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    p = plan(cfg)
    assert p.params == trainable + frozen and frozen > 0
    # AdamW keeps two fp32 moments of the trainable parameters only (storages rounded to 512 B).
    assert 8 * trainable <= p.breakdown["optimizer"] < 8 * trainable + 512 * 2 * len(list(model.parameters()))
