"""task=translate (CT enhancement, seed 003) on tiny slabs of the embedded head CT: the seed's two
phases, its learning-rate groups, exact resume in each phase, planning, and bad input."""

import os
import shutil

import pytest
import torch
from rich.console import Console

from tiny_translate import TINY_TRANSLATE
from voxgen import checkpoint as store
from voxgen.config import compose
from voxgen.errors import ConfigError, DataError
from voxgen.memory.planner import plan
from voxgen.training.trainer import Trainer, train

# The seed's recipe at test length: the VAE frozen for 2 steps, then everything at lr 1e-4 with
# the VAE at a tenth of it (a constant rate: min_lr_ratio 1).
SEED_RECIPE = [
    "training.phases=[{steps: 2, frozen: [vae]}, {}]",
    "training.lr_multipliers={vae: 0.1}",
    "training.lr=1e-4",
    "training.min_lr_ratio=1",
    "training.steps=4",
    "training.val_every=4",
    "training.checkpoint_every=2",
    "guards.collapse_std_ratio=0",
]


def _cfg(root, run_dir, *extra):
    return compose([], [*TINY_TRANSLATE, f"data.root={root}", f"run.dir={run_dir}", *extra])


def _quiet():
    return Console(file=open(os.devnull, "w"))


def _prefixed(tensors: dict, prefix: str) -> dict:
    return {k: v for k, v in tensors.items() if k.startswith(prefix)}


def test_phase_one_leaves_the_vae_bit_identical_and_phase_two_trains_it_at_a_tenth(ct_pairs_root, tmp_path):
    trainer = Trainer(_cfg(ct_pairs_root, tmp_path / "run", *SEED_RECIPE, "training.steps=2"), _quiet())
    start = {k: v.clone() for k, v in trainer.task.model.state_dict().items()}
    trainer.fit()
    after = trainer.task.model.state_dict()
    vae = [k for k in start if k.startswith("vae.")]
    unet = [k for k in start if k.startswith("unet.")]
    assert vae and all(torch.equal(after[k], start[k]) for k in vae)
    assert any(not torch.equal(after[k], start[k]) for k in unet)
    # Phase two's optimizer groups: the UNet at 1e-4, the VAE at 1e-5.
    groups = {group["lr_multiplier"]: group for group in trainer.optimizer.param_groups}
    assert groups[1.0]["lr"] == pytest.approx(1e-4, rel=1e-12) and groups[0.1]["lr"] == pytest.approx(1e-5, rel=1e-12)
    vae_ids = {id(p) for p in trainer.task.model.vae.parameters()}
    assert {id(p) for p in groups[0.1]["params"]} == vae_ids
    assert not vae_ids & {id(p) for p in groups[1.0]["params"]}


def test_a_run_stopped_in_each_phase_resumes_bit_identical(ct_pairs_root, tmp_path):
    straight = train(_cfg(ct_pairs_root, tmp_path / "straight", *SEED_RECIPE), _quiet())
    assert straight.step == 4
    _, weights, _ = store.load_latest(tmp_path / "straight")
    _, at_two, _ = store.load_named(tmp_path / "straight", "step_00000002")
    # The VAE moved in phase two only.
    first = _first_vae(tmp_path, ct_pairs_root)
    assert all(torch.equal(at_two[k], first[k]) for k in _prefixed(at_two, "model/vae."))
    assert any(not torch.equal(weights[k], at_two[k]) for k in _prefixed(weights, "model/vae."))

    chain = tmp_path / "chain"
    assert train(_cfg(ct_pairs_root, chain, *SEED_RECIPE), _quiet(), stop_at=1).interrupted  # in phase one
    assert train(_cfg(ct_pairs_root, chain, *SEED_RECIPE), _quiet(), stop_at=3).interrupted  # in phase two
    resumed = train(_cfg(ct_pairs_root, chain, *SEED_RECIPE), _quiet())
    assert resumed.resumed_from == 3 and resumed.step == 4
    _, chained, _ = store.load_latest(chain)
    assert set(chained) == set(weights)
    for key in weights:  # weights, EMA, AdamW moments, RNG
        assert torch.equal(chained[key], weights[key]), key


def _first_vae(tmp_path, root) -> dict:
    """The VAE weights a run of this config starts from, as checkpoint keys."""
    trainer = Trainer(_cfg(root, tmp_path / "unused", *SEED_RECIPE), _quiet())
    return {f"model/{k}": v for k, v in trainer.task.model.state_dict().items() if k.startswith("vae.")}


def test_training_lowers_the_validation_loss(ct_pairs_root, tmp_path):
    result = train(
        _cfg(ct_pairs_root, tmp_path / "run", "training.steps=30", "training.val_every=30", "training.lr=2e-3"), _quiet()
    )
    first, last = result.history[0]["val_loss"], result.history[-1]["val_loss"]
    assert last < 0.9 * first, (first, last)


def test_the_planner_traces_the_whole_step_vae_and_unet(ct_pairs_root, tmp_path):
    cfg = _cfg(ct_pairs_root, tmp_path / "run")
    planned = plan(cfg)
    trainer_params = sum(p.numel() for p in Trainer(cfg, _quiet()).task.model.parameters())
    assert planned.params == trainer_params
    # The latent the UNet sees: 2 x 4 latent channels in, 4 out, on the clip's grid / (1, 8, 8).
    assert (planned.in_channels, planned.out_channels, planned.shape) == (8, 4, [4, 2, 2])
    # Gradient checkpointing of both networks lowers what the step holds.
    checkpointed = plan(_cfg(ct_pairs_root, tmp_path / "run", "training.grad_checkpointing=true"))
    assert checkpointed.breakdown["activations"] < planned.breakdown["activations"]


@pytest.mark.parametrize(
    "override, words",
    [
        ("translate.clip=[8,16,16]", "translate.clip=[8, 16, 16] is larger than the volumes, data.shape=[4, 32, 32]"),
        ("translate.clip=[4,12,12]", "H and W must be multiples of the VAE's factor 8"),
        ("data.intensity=percentile", "task=translate works in Hounsfield units: set data.intensity=fixed"),
        ("translate.target=flair", "translate.target='flair' is not in data.modalities ['source', 'target']"),
        ("training.phases=[{steps: 2, frozen: [encoder]}]", "training.phases[0].frozen names 'encoder'"),
        ("training.phases=[{}, {steps: 2}]", "training.phases[0] has no length"),
        ("training.phases=[{steps: 2, frozen: [vae, unet]}, {}]", "training.phases[0] freezes every part of the model"),
    ],
)
def test_impossible_configs_are_refused_in_one_line(ct_pairs_root, tmp_path, override, words):
    with pytest.raises(ConfigError) as info:
        Trainer(_cfg(ct_pairs_root, tmp_path / "run", override), _quiet())
    assert words in str(info.value) and "\n" not in str(info.value)


def test_an_unpaired_case_and_a_pair_of_two_shapes_stop_training_naming_the_file(ct_pairs_root, tmp_path):
    from voxgen.data.nifti import load_volume, save_volume

    root = tmp_path / "pairs"
    shutil.copytree(ct_pairs_root, root)
    [case] = (root / "train").iterdir()
    (case / "target.nii.gz").unlink()
    with pytest.raises(DataError, match=r"target\.nii\.gz"):
        Trainer(_cfg(root, tmp_path / "run"), _quiet()).fit()

    shutil.rmtree(root)
    shutil.copytree(ct_pairs_root, root)
    volume, affine = load_volume(case / "target.nii.gz")
    save_volume(case / "target.nii.gz", volume[:3], affine)
    with pytest.raises(DataError, match=r"target\.nii\.gz: shape \[3, 128, 128\] differs"):
        Trainer(_cfg(root, tmp_path / "run2"), _quiet()).fit()


def test_residual_diffusion_without_a_vae_diffuses_the_scaled_difference_per_channel(ct_pairs_root, tmp_path):
    from voxgen.draws import Draws
    from voxgen.tasks import build_task

    cfg = _cfg(ct_pairs_root, tmp_path / "run", "translate.vae_channels=[]", "translate.residual=true")
    task = build_task(cfg)
    model = task.model
    assert not any(True for _ in model.vae.parameters()) and task.network.in_channels == 6  # 3 windows + 3 of source
    trainer = Trainer(cfg, _quiet())
    batch = {m: torch.stack([trainer.train_set[0][m]] * 2) for m in task.modalities}  # one training pair, two clips
    model.train()
    source, target = task.clips(batch, Draws.of(torch.Generator().manual_seed(0), 2, "cpu"))
    model.track_latent_std(torch.cat([source, target]))
    # The first batch sets each channel's deviation of the scaled difference.
    diff = (target - source) / model.latent_std
    assert torch.allclose(model.residual_std, diff.transpose(0, 1).flatten(1).std(dim=1))
    assert model.residual_std[2] < model.residual_std[0] / 10  # the wide window's difference is far smaller
    z_source, z_target = source / model.latent_std, target / model.latent_std
    x0 = model.diffused(z_source, z_target)
    assert torch.allclose(x0.transpose(0, 1).flatten(1).std(dim=1), torch.ones(3), atol=1e-5)
    assert torch.allclose(model.target_latent(x0, z_source), z_target, atol=1e-6)
    # It trains through the trainer and its checkpoints carry the deviations.
    extra = ("translate.vae_channels=[]", "translate.residual=true", "training.steps=2", "training.val_every=2")
    result = train(_cfg(ct_pairs_root, tmp_path / "run", *extra), _quiet())
    _, weights, _ = store.load_latest(tmp_path / "run")
    assert result.step > 0 and "model/residual_std" in weights and weights["model/residual_std"].shape == (3,)
