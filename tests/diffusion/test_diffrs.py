"""DiffRS (Na et al. 2024): the rejection sampler's bookkeeping on analytic models, and a tiny run's
head trained, checked on held-out volumes, resumed and sampled through the command line."""

from __future__ import annotations

import contextlib
import json
import shutil

import pytest
import torch

from tiny_run import TINY_RUN
from voxgen import checkpoint as store
from voxgen.cli import main
from voxgen.diffusion.diffrs import GENERATED, Head, Tally, diffrs, read_generated, sample_with_head
from voxgen.diffusion.generate import generate
from voxgen.diffusion.modes import MODES
from voxgen.diffusion.rflow_samplers import time_grid
from voxgen.diffusion.samplers import parse_solver
from voxgen.errors import ConfigError
from voxgen.tasks.diffrs_head import Codes, accuracy, report_line

from .analytic import GaussianFlow, analytic_parts

FLOW = GaussianFlow()
NO_AUTOCAST = contextlib.nullcontext  # device -> context manager, as voxgen.precision gives


def constant_head(logit: float) -> Head:
    """A head that says the same of every volume: log q/p = `logit` everywhere."""
    return Head(
        lambda x, t, v: torch.full((x.shape[0],), logit), MODES["seg"], lambda d: NO_AUTOCAST(), torch.randn(4, 1, 2, 2, 2)
    )


class ScriptedHead:
    """Accepts everything (log ratio 0, constants 0) except the first `rejections` proposals that
    arrive at time `at`, which get log ratio -inf: rejected with certainty. Records its calls."""

    def __init__(self, at: float, rejections: int):
        self.at, self.left, self.calls = at, rejections, []

    def thresholds(self, timesteps, percentile):
        return [0.0] * len(timesteps), [0.0] * len(timesteps)

    def log_ratio(self, x, t, cond):
        self.calls.append(t.tolist())
        out = torch.zeros(x.shape[0])
        for i, ti in enumerate(t.tolist()):
            if abs(ti - self.at) < 1e-6 and self.left > 0:
                out[i], self.left = float("-inf"), self.left - 1
        return out


def test_a_head_that_always_says_real_accepts_every_step_and_gives_the_base_sampler_samples():
    parts = analytic_parts(FLOW.velocity)
    seeds = [3, 4, 5]
    base = generate(parts, seeds, solver=parse_solver("euler:6"), batch_size=2)
    result, tally = sample_with_head(parts, constant_head(5.0), seeds, solver=parse_solver("diffrs:6"), batch_size=2)
    assert torch.equal(result.volumes, base.volumes)
    assert result.nfe == base.nfe == 6
    assert (tally.checks, tally.accepted, tally.backtracks, tally.evaluations) == (18, 18, 0, 18)
    assert tally.acceptance_rate == 1.0


def test_thresholds_of_a_constant_head_accept_its_transitions():
    marginal, transition = constant_head(2.5).thresholds(time_grid(4), 0.9)
    assert marginal == pytest.approx([2.5] * 5) and transition == [0.0] * 5


def test_a_rejection_jumps_back_redoes_the_step_and_is_counted():
    """Two volumes, 4 Euler steps; the first proposal that lands at t = 0.5 (volume 0's second
    step) is rejected: volume 0 jumps back to t = 0.75 and takes 5 steps, volume 1 takes 4; out of
    lock-step, each network call evaluates each volume at its own time."""
    grid = time_grid(4)
    head = ScriptedHead(at=0.5, rejections=1)
    calls = []

    def velocity(x, t, cond):
        calls.append(t.tolist())
        return FLOW.velocity(x, t)

    x1 = torch.randn(2, 1, 2, 2, 2, generator=torch.Generator().manual_seed(0))
    generators = [torch.Generator().manual_seed(s) for s in (10, 11)]
    tally = Tally()
    out = diffrs(velocity, x1, grid, generator=generators, head=head, tally=tally)
    assert (tally.evaluations, tally.checks, tally.accepted, tally.backtracks) == (9, 9, 8, 1)
    assert tally.acceptance_rate == pytest.approx(8 / 9)
    assert tally.as_dict()["evaluations_per_volume"] == 4.5
    # 5 network calls; from the third on, the volumes are at different times.
    assert calls == [[1.0, 1.0], [0.75, 0.75], [0.75, 0.5], [0.5, 0.25], [0.25]]
    # The rejected volume re-ran from a new point of the forward process; the other is plain Euler.
    plain = parse_solver("euler:4").entry.fn(FLOW.velocity, x1, grid)
    assert torch.allclose(out[1], plain[1], atol=1e-6)
    assert not torch.allclose(out[0], plain[0], atol=1e-3)


def test_a_rejecting_head_costs_more_network_calls_within_the_budget_whatever_the_batch():
    parts = analytic_parts(FLOW.velocity)

    def noisy(x, t, v):  # a head whose verdict jumps around: most steps fail their check
        return 4.0 * torch.sin(1e3 * x.flatten(1).sum(1))

    head = Head(noisy, MODES["seg"], lambda d: NO_AUTOCAST(), torch.randn(16, 1, 2, 2, 2))
    seeds, solver = list(range(4)), parse_solver("diffrs:8,budget=2")
    result, tally = sample_with_head(parts, head, seeds, solver=solver, batch_size=1)
    assert 0.0 < tally.acceptance_rate < 0.9 and tally.backtracks >= tally.checks - tally.accepted
    assert tally.checks == tally.evaluations - tally.unchecked
    # One volume per batch: every network call is one evaluation of one volume.
    assert tally.evaluations == parts.model.calls and result.nfe == round(tally.evaluations / len(seeds))
    assert 8 < result.nfe <= 2 * 8 + 8  # the budget, then at most a full grid unchecked
    # Each volume draws from its own generator: a batch of 4 gives the same volumes and counts.
    batched, again = sample_with_head(parts, head, seeds, solver=solver, batch_size=4)
    assert torch.allclose(batched.volumes, result.volumes, atol=1e-6) and again == tally
    assert batched.nfe >= result.nfe  # a call for the volumes still sampling counts for the batch


def test_generate_refuses_diffrs_without_its_head():
    with pytest.raises(ConfigError, match="needs the run's DiffRS head"):
        generate(analytic_parts(FLOW.velocity), [0], solver=parse_solver("diffrs:4"))


def test_held_out_accuracy_shows_a_head_that_memorised_its_training_volumes():
    g = torch.Generator().manual_seed(0)
    volumes = {k: torch.randn(3, 1, 2, 2, 2, generator=g) for k in ("real", "fake", "real_new", "fake_new")}
    seen = volumes["real"].flatten(1)

    def memorised(x, t, v):  # "real" exactly for the real volumes it was trained on
        return torch.where(torch.cdist(x.flatten(1), seen).min(1).values < 1e-5, 10.0, -10.0)

    head = Head(memorised, MODES["seg"], lambda d: NO_AUTOCAST(), volumes["fake"])
    train = accuracy(head, Codes(volumes["real"], None, []), Codes(volumes["fake"], None, []), times=(0.0,))
    held = accuracy(head, Codes(volumes["real_new"], None, []), Codes(volumes["fake_new"], None, []), times=(0.0,))
    assert (train["balanced_accuracy"], held["balanced_accuracy"]) == (1.0, 0.5)
    assert (held["real"], held["generated"]) == (0.0, 1.0)
    line = report_line({"train": train, "held_out": held, "parameters": 1000, "step": 5, "head": "h"})
    assert "1.00 on its training volumes, 0.50 on held-out ones" in line and "overfitting" in line


# ---- a tiny run through the command line -------------------------------------------------------

HEAD = ["training.batch_size=4", "training.val_every=2", "training.checkpoint_every=2", "training.val_batches=1"]
HEAD += ["diffrs.solver=euler:3", "diffrs.channels=[8,16]", "training.lr=1e-3", "training.warmup_steps=0"]


@pytest.fixture(scope="module")
def tiny_run(phantom_root, tmp_path_factory):
    run = tmp_path_factory.mktemp("diffrs") / "run"
    assert (
        main(["train", *TINY_RUN, "training.steps=1", "training.batch_size=2", f"data.root={phantom_root}", f"run.dir={run}"])
        == 0
    )
    return run


def _head_weights(folder):
    _, tensors, _ = store.load_latest(folder, prefix="model/")
    return tensors


def test_the_head_trains_on_split_volumes_reports_held_out_accuracy_and_resumes(tiny_run, phantom_root, tmp_path, capsys):
    assert main(["train", "--run", str(tiny_run), *HEAD, "training.steps=4", "--stop-at", "2"]) == 75
    head = tiny_run / "diffrs-head"
    assert not (head / "accuracy.json").exists()  # measured once training is complete
    assert main(["train", "--run", str(tiny_run), *HEAD, "training.steps=4"]) == 0
    out = capsys.readouterr()
    assert "resumed from" in out.err and "on held-out ones" in out.out.splitlines()[-1]
    report = json.loads((head / "accuracy.json").read_text())
    train_cases, val_cases = (len(list((phantom_root / s).iterdir())) for s in ("train", "val"))
    assert report["train"]["volumes"] == {"real": train_cases, "generated": train_cases}
    assert report["held_out"]["volumes"] == {"real": val_cases, "generated": val_cases}
    assert report["step"] == 4 and 0.0 <= report["held_out"]["balanced_accuracy"] <= 1.0
    tensors, about = read_generated(head / GENERATED)
    assert about["solver"] == "euler:3" and len(tensors["train/x0"]) == train_cases
    assert len(tensors["held_out/x0"]) == val_cases
    assert not any(torch.equal(h, t) for h in tensors["held_out/x0"] for t in tensors["train/x0"])  # other seeds
    # An uninterrupted run (same cached volumes) ends on the very same weights.
    other = tmp_path / "head"
    other.mkdir()
    shutil.copy(head / GENERATED, other / GENERATED)
    assert main(["train", "--run", str(tiny_run), *HEAD, "training.steps=4", f"run.dir={other}"]) == 0
    resumed, straight = _head_weights(head), _head_weights(other)
    assert resumed.keys() == straight.keys() and all(torch.equal(resumed[k], straight[k]) for k in resumed)


def _error(capsys) -> str:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")][-1]


def test_sampling_with_the_head_records_acceptance_and_nfe_and_refuses_wrong_heads(tiny_run, phantom_root, tmp_path, capsys):
    head = tiny_run / "diffrs-head"
    if not (head / "accuracy.json").exists():
        assert main(["train", "--run", str(tiny_run), *HEAD, "training.steps=2"]) == 0
    out = tmp_path / "s"
    assert main(["sample", "--run", str(tiny_run), "--solver", "diffrs:3,q=0.5", "--num", "2", "--out", str(out)]) == 0
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    record = json.loads((out / "diffrs.json").read_text())
    assert f"NFE {record['nfe']} with rejections vs 3 without" in summary and "acceptance" in summary
    assert record["checks"] == record["evaluations"] >= 6 and record["volumes"] == 2
    assert record["acceptance_rate"] == record["accepted"] / record["checks"]
    assert (out / "sample_001_bravo.nii.gz").is_file()
    # No head yet for another run; a head of another run; a folder that is not a diffusion run.
    other = tmp_path / "other"
    assert main(["train", *TINY_RUN, "training.steps=1", "run.seed=1", f"data.root={phantom_root}", f"run.dir={other}"]) == 0
    assert main(["sample", "--run", str(other), "--solver", "diffrs:3"]) == 2
    assert "has no trained DiffRS head" in _error(capsys)
    assert main(["sample", "--run", str(other), "--solver", "diffrs:3", "--head", str(head)]) == 2
    assert f"is a DiffRS head for {tiny_run.resolve()} (step 1), not for the weights of {other}" in _error(capsys)
    assert main(["sample", "--run", str(head), "--solver", "diffrs:3"]) == 2
    assert "is a task=diffrs-head run, not a diffusion run" in _error(capsys)
    assert main(["train", "--run", str(phantom_root)]) == 2
    assert "not a voxgen run folder" in _error(capsys)
