"""SDA and ScoreAug (`augment.*`): transforms, what moves together, omega, streams, resume, CLI."""

import csv
import json
from functools import partial

import pytest
import torch

from tiny_run import TINY_RUN
from voxgen import checkpoint as store
from voxgen.cli import main
from voxgen.diffusion import parts as parts_module
from voxgen.diffusion.augment import OMEGA_SIZE, Transform, build_augmentation, rotations, sda_batch
from voxgen.diffusion.parts import build_parts, network_output, prediction_and_target
from voxgen.diffusion.strategies import DDPM, RectifiedFlow
from voxgen.draws import Draws
from voxgen.models.blocks import VectorEmbedding
from voxgen.training.signals import EXIT_PREEMPTED

from .tiny import learnable_batch, tiny_cfg, train_losses

SCOREAUG = ["augment=scoreaug", "augment.probability=1"]
SDA = ["augment=sda", "augment.probability=1"]


def test_only_shape_keeping_rotations_are_drawn():
    shape = (4, 6, 6)  # D != H = W: quarter turns only in the H-W plane
    found = rotations(shape)
    assert len(found) == 3 + 2
    x = torch.randn(2, 1, *shape)
    for t in found:
        assert t.apply(x).shape == x.shape
    quarter = [t.apply(x) for t in found if t.swap is not None]
    assert any(torch.equal(q, torch.rot90(x, 1, dims=(3, 4))) for q in quarter)
    assert any(torch.equal(q, torch.rot90(x, -1, dims=(3, 4))) for q in quarter)
    assert len(rotations((4, 6, 8))) == 3  # no two sizes equal: 180 degrees only
    # A translation fills with zeros; a cutout zeroes its box and nothing else.
    moved = Transform(shift=(1, 0, -2)).apply(x)
    assert torch.equal(moved[..., 1:, :, :-2], x[..., :-1, :, 2:]) and moved[..., 0, :, :].abs().sum() == 0
    cut = Transform(box=((1, 2, 3), (2, 2, 2))).apply(x)
    assert cut[..., 1:3, 2:4, 3:5].abs().sum() == 0 and int((cut != x).sum()) == int((x[..., 1:3, 2:4, 3:5] != 0).sum())


def test_omega_codes_the_transform_and_the_identity_is_zero():
    shape = (8, 8, 12)
    codes = [t.omega(shape) for t in rotations(shape)]
    codes += [Transform(flips=(False, True, False)).omega(shape), Transform(shift=(1, 0, -2)).omega(shape)]
    codes += [Transform(box=((0, 0, 0), (2, 2, 2))).omega(shape), Transform(box=((6, 6, 10), (2, 2, 2))).omega(shape)]
    assert all(len(c) == OMEGA_SIZE for c in codes)
    assert Transform().omega(shape) == [0.0] * OMEGA_SIZE
    assert len({tuple(c) for c in codes}) == len(codes) and [0.0] * OMEGA_SIZE not in codes


def test_method_defaults_and_draws_follow_the_generator():
    sda = build_augmentation(tiny_cfg("augment=sda").augment)
    score = build_augmentation(tiny_cfg("augment=scoreaug").augment)
    assert sda.kinds == ("rotate", "flip") and score.kinds == ("rotate", "translate", "cutout")
    assert sda.omega_size == 0 and score.omega_size == OMEGA_SIZE
    assert build_augmentation(tiny_cfg().augment) is None
    first = score.draw((8, 8, 12), Draws.of(torch.Generator().manual_seed(1), 64, "cpu"))
    assert first == score.draw((8, 8, 12), Draws.of(torch.Generator().manual_seed(1), 64, "cpu"))
    assert 16 < sum(t is None for t in first) < 48  # probability 0.5
    moved = [t for t in first if t is not None]
    assert {"box" if t.box else "shift" if any(t.shift) else "rotate" for t in moved} == {"box", "shift", "rotate"}


def _recorder():
    """A network that returns its first input channel (x_t) and keeps what it was given."""

    class Recorder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.seen = []

        def forward(self, x, time, vector=None):
            self.seen.append((x.clone(), time.clone(), None if vector is None else vector.clone()))
            return x[:, :1].clone()

    return Recorder()


def _run(parts, training: bool, seed: int = 3):
    parts.model.train(training)
    prediction, target, t = prediction_and_target(parts, learnable_batch(), torch.Generator().manual_seed(seed))
    x, time, vector = parts.model.seen[-1]
    return x, target, t, vector


def test_scoreaug_moves_input_target_and_condition_by_the_same_transform():
    parts = build_parts(tiny_cfg(*SCOREAUG))
    parts = parts.with_model(_recorder())
    # Evaluation mode: no augmentation; the same seed gives the same noise and times in training.
    x0, target0, t0, omega0 = _run(parts, training=False)
    x1, target1, t1, omega1 = _run(parts, training=True)
    assert torch.equal(t0, t1) and torch.equal(omega0, torch.zeros(4, OMEGA_SIZE))
    moved = 0
    for b in range(4):
        # x_t has distinct values: each voxel of the augmented x_t names the voxel it came from
        # (or is 0: filled by a shift or a cutout). Target and mask must come from that voxel too.
        source, order = torch.sort(x0[b, 0].flatten())
        seen, tgt, cond = x1[b, 0].flatten(), target1[b, 0].flatten(), x1[b, 1].flatten()
        filled = seen == 0
        where = order[torch.searchsorted(source, seen[~filled]).clamp(max=source.numel() - 1)]
        assert torch.equal(x0[b, 0].flatten()[where], seen[~filled])
        assert torch.equal(tgt[~filled], target0[b, 0].flatten()[where])
        assert torch.equal(cond[~filled], x0[b, 1].flatten()[where])
        assert tgt[filled].abs().sum() == 0 and cond[filled].abs().sum() == 0
        changed = not torch.equal(x1[b], x0[b])
        moved += changed
        assert changed == bool(omega1[b].abs().sum() > 0)  # the code says whether it moved
    assert moved >= 2


def test_sda_moves_x0_and_condition_together_and_shifts_the_time():
    g = torch.Generator().manual_seed(0)
    z0 = torch.randn(3, 1, 4, 6, 8, generator=g)
    cond = 3 * z0  # a condition that is a known function of the volume
    noise, t = torch.randn(z0.shape, generator=g), torch.tensor([0.2, 0.5, 0.95])
    aug = build_augmentation(tiny_cfg(*SDA).augment)
    noisier = partial(RectifiedFlow().noisier, shift=aug.noise_shift)
    x, n, tt, c = sda_batch(aug, z0, noise, t, cond, Draws.of(torch.Generator().manual_seed(1), 3, "cpu"), noisier)
    assert x.shape[0] == 6 and torch.equal(x[:3], z0) and torch.equal(n[:3], noise) and torch.equal(c[:3], cond)
    assert torch.equal(c[3:], 3 * x[3:])  # the same transform hit x0 and its condition
    assert not torch.equal(x[3:], z0) and torch.equal(torch.sort(x[3:].flatten(1))[0], torch.sort(z0.flatten(1))[0])
    assert torch.allclose(tt[3:], torch.tensor([0.3, 0.6, 1.0])) and not torch.equal(n[3:], noise)
    assert DDPM(num_timesteps=1000).noisier(torch.tensor([0, 950]), 0.1).tolist() == [100, 999]
    # Through the step: B + K rows of prediction, target and time.
    parts = build_parts(tiny_cfg(*SDA)).with_model(_recorder())
    parts.model.train()
    prediction, target, times = prediction_and_target(parts, learnable_batch(), torch.Generator().manual_seed(3))
    assert prediction.shape[0] == target.shape[0] == times.shape[0] == 8
    assert torch.allclose(times[4:], (times[:4] + 0.1).clamp(max=1.0))


def test_omega_changes_the_output_and_sampling_uses_the_identity():
    torch.manual_seed(0)
    parts = build_parts(tiny_cfg(*SCOREAUG))
    assert parts.network.vector_size == OMEGA_SIZE
    (embedding,) = [m for m in parts.model.modules() if isinstance(m, VectorEmbedding)]
    with torch.no_grad():  # away from the zero inits (the vector's last layer, the output conv)
        for p in parts.model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    assert embedding.mlp[-1].weight.abs().sum() > 0
    parts.model.eval()
    x, t = torch.randn(2, 1, 8, 8, 8), torch.tensor([0.3, 0.7])
    cond = torch.ones(2, 1, 8, 8, 8)
    shape = (8, 8, 8)
    codes = [Transform().omega(shape), rotations(shape)[3].omega(shape), Transform(shift=(1, 0, 0)).omega(shape)]
    with torch.no_grad():
        identity = network_output(parts, x, t, cond)
        outs = [network_output(parts, x, t, cond, torch.tensor([c, c])) for c in codes]
    assert torch.equal(identity, outs[0])
    assert (outs[1] - outs[0]).abs().max() > 1e-3 and (outs[2] - outs[1]).abs().max() > 1e-3
    # Without omega conditioning, or with SDA, the network takes no code; a size-bin mode's
    # vector comes first.
    assert build_parts(tiny_cfg(*SCOREAUG, "augment.omega_conditioning=false")).network.vector_size == 0
    assert build_parts(tiny_cfg(*SDA)).network.vector_size == 0
    bins = tiny_cfg(*SCOREAUG, "mode=seg_conditioned", "training.batch_size=2")
    assert build_parts(bins).network.vector_size == 7 + OMEGA_SIZE


def test_probability_zero_and_validation_change_nothing():
    plain = train_losses(tiny_cfg(), 3)
    # Off: no draws, so the random streams and the losses are the plain run's, bit for bit.
    assert train_losses(tiny_cfg("augment=sda", "augment.probability=0"), 3) == plain
    off = ("augment=scoreaug", "augment.probability=0", "augment.omega_conditioning=false")
    assert train_losses(tiny_cfg(*off), 3) == plain
    assert train_losses(tiny_cfg(*SDA), 3) != plain  # ... and on, it does change them
    # Validation (evaluation mode) is never augmented.
    losses = []
    for extra in ([], SDA):
        torch.manual_seed(0)
        parts = build_parts(tiny_cfg(*extra))
        parts.model.eval()
        losses.append(parts.evaluate(learnable_batch(), torch.Generator().manual_seed(5))[0].item())
    assert losses[0] == losses[1]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["augment=bogus"], "augment='bogus' is not one of none, sda, scoreaug"),
        (["augment=sda", "augment.probability=1.5"], "augment.probability=1.5 must be in [0, 1]"),
        (["augment=scoreaug", "augment.translate=0.5"], "augment.translate=0.5 must be in [0, 0.5)"),
        (["augment=sda", "augment.rotate=false", "augment.flip=false"], "augment=sda has no transform to draw"),
        (["augment=sda", "training.tumour_weight=1"], "augment=sda moves voxels of the target"),
        (["augment=scoreaug", "model.name=controlnet"], "set augment.omega_conditioning=false"),
    ],
)
def test_bad_augment_settings_are_one_line(capsys, overrides, message):
    assert main(["train", "--dry-run", *overrides]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1


def _common(method: str, root) -> list[str]:
    return [*TINY_RUN, "training.batch_size=2", "sample.steps=2", f"augment={method}", f"data.root={root}"]


@pytest.fixture(scope="module")
def scoreaug_run(cohort_root, tmp_path_factory):
    """A tiny ScoreAug run trained straight through by `voxgen train` (2 steps)."""
    run = tmp_path_factory.mktemp("scoreaug") / "run"
    assert main(["train", *_common("scoreaug", cohort_root), f"run.dir={run}"]) == 0
    return run


def test_both_methods_plan_train_sample_and_evaluate_through_the_cli(cohort_root, scoreaug_run, tmp_path, capsys):
    peaks = {}
    for method in ("sda", "scoreaug"):
        common = _common(method, cohort_root)
        assert main(["train", "--dry-run", *common]) == 0
        assert f"name: {method}" in capsys.readouterr().out
        assert main(["plan", "--json", *common]) == 0
        peaks[method] = json.loads(capsys.readouterr().out)["peak_bytes"]
    # The planner (meta device) takes every draw as augmented: SDA's copies double the batch the
    # network sees; ScoreAug keeps the batch.
    assert peaks["sda"] > 1.15 * peaks["scoreaug"]
    sda_run = tmp_path / "sda"
    assert main(["train", *_common("sda", cohort_root), f"run.dir={sda_run}"]) == 0
    for run in (sda_run, scoreaug_run):
        out = tmp_path / f"{run.name}-samples"
        assert main(["sample", "--run", str(run), "--num", "2", "--steps", "2", "--out", str(out)]) == 0
        assert len(list(out.glob("sample_*_bravo.nii.gz"))) == 2
    # Evaluation samples through the same network_output as `sample`; an SDA network takes no extra
    # input, so its evaluation is a plain run's: the ScoreAug run (omega) is the one to check.
    evaluation = tmp_path / "eval"
    argv = ["evaluate", "--run", str(scoreaug_run), "--samples", "2", "--solvers", "euler:2", "--metrics", "intensity_w1"]
    assert main([*argv, "--out", str(evaluation)]) == 0
    (row,) = list(csv.DictReader((evaluation / "evaluate.csv").open()))
    assert float(row["intensity W1"]) >= 0


def test_exact_resume_with_augmentation_is_bit_identical(cohort_root, scoreaug_run, tmp_path, monkeypatch):
    moved = []
    original = parts_module.scoreaug_batch

    def spy(*args):
        out = original(*args)
        moved.append(bool(out[3].abs().sum() > 0))
        return out

    monkeypatch.setattr(parts_module, "scoreaug_batch", spy)
    chain = [*_common("scoreaug", cohort_root), f"run.dir={tmp_path / 'chain'}"]
    assert main(["train", *chain, "--stop-at", "1"]) == EXIT_PREEMPTED
    assert main(["train", *chain]) == 0
    assert len(moved) == 2 and any(moved)  # both steps augmented (probability 0.5 per sample)
    _, a, state_a = store.load_latest(scoreaug_run)
    _, b, state_b = store.load_latest(tmp_path / "chain")
    assert state_a["step"] == state_b["step"] == 2 and set(a) == set(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    state_a.pop("config"), state_b.pop("config")  # run.dir differs, nothing else may
    assert state_a == state_b
