"""Stability guards: skipped steps leave the model untouched, spikes are caught, shifts are learned."""

import copy
import json
import math
import random

import pytest
import torch

from voxgen.config import compose
from voxgen.config.schema import GuardsConfig
from voxgen.diffusion.parts import build_parts
from voxgen.errors import ConfigError, TrainingCollapsed
from voxgen.training.guards import Guards, spread
from voxgen.training.step import make_optimizer, train_step

SMALL = [
    "mode=seg",
    "data.shape=[8,8,8]",
    "model.channels=[8,16]",
    "model.attention_levels=[false,false]",
    "model.num_head_channels=8",
    "model.norm_num_groups=4",
    "training.batch_size=2",
    "training.lr=2e-3",
]


def _parts():
    cfg = compose([], SMALL)
    torch.manual_seed(0)
    parts = build_parts(cfg)
    return parts, make_optimizer(parts.model, cfg)


def _batch(nan: bool = False) -> dict:
    x = torch.linspace(-1, 1, 8).view(1, 1, 8, 1, 1).expand(2, 1, 8, 8, 8).clone()  # (2, 1, 8, 8, 8) ramp
    if nan:
        x[0, 0, 3, 3, 3] = float("nan")
    return {"seg": x}


def _snapshot(parts, optimizer):
    return copy.deepcopy(parts.model.state_dict()), copy.deepcopy(optimizer.state_dict())


def _assert_same(snapshot, parts, optimizer):
    weights, opt = snapshot
    for name, value in parts.model.state_dict().items():
        assert torch.equal(value, weights[name]), name
    now = optimizer.state_dict()
    assert now["state"].keys() == opt["state"].keys()
    for index, state in now["state"].items():
        for key, value in state.items():
            assert torch.equal(value, opt["state"][index][key]), (index, key)


def _noisy(level: float, n: int, rng: random.Random, rel: float = 0.02) -> list[float]:
    return [level * (1 + rel * rng.uniform(-1, 1)) for _ in range(n)]


# ------------------------------------------------------------------ train_step


def test_nan_loss_is_skipped_before_backward_and_changes_nothing():
    parts, optimizer = _parts()
    guards = Guards(GuardsConfig())
    generator = torch.Generator().manual_seed(0)
    for _ in range(2):  # optimiser moments and step counts exist
        assert train_step(parts, optimizer, _batch(), generator, 1.0, accept=guards.accept).applied
    before = _snapshot(parts, optimizer)

    result = train_step(parts, optimizer, _batch(nan=True), generator, 1.0, accept=guards.accept)

    assert not result.applied and math.isnan(result.loss) and math.isnan(result.grad_norm)
    assert all(p.grad is None for p in parts.model.parameters())  # backward never ran
    _assert_same(before, parts, optimizer)
    assert guards.skipped_nonfinite == 1 and guards.consecutive_skips == 1
    assert guards.scalars()["guards/skipped_nonfinite"] == 1.0


def test_infinite_gradient_is_skipped_and_the_next_step_applies():
    parts, optimizer = _parts()
    guards = Guards(GuardsConfig())
    generator = torch.Generator().manual_seed(0)
    train_step(parts, optimizer, _batch(), generator, 1.0, accept=guards.accept)
    before = _snapshot(parts, optimizer)
    name, first = next(iter(parts.model.named_parameters()))
    hook = first.register_hook(lambda grad: grad * float("inf"))

    result = train_step(parts, optimizer, _batch(), generator, 1.0, accept=guards.accept)

    assert not result.applied and math.isfinite(result.loss) and math.isinf(result.grad_norm)
    _assert_same(before, parts, optimizer)
    assert guards.skipped_nonfinite == 1
    hook.remove()
    assert train_step(parts, optimizer, _batch(), generator, 1.0, accept=guards.accept).applied
    assert not torch.equal(first.detach(), before[0][name])
    assert guards.consecutive_skips == 0


def test_an_accepting_guard_changes_nothing_about_the_step():
    runs = []
    for accept in (None, lambda loss, grad_norm: True):
        parts, optimizer = _parts()
        generator = torch.Generator().manual_seed(3)
        losses = [train_step(parts, optimizer, _batch(), generator, 1.0, accept=accept).loss for _ in range(3)]
        runs.append((losses, parts.model.state_dict()))
    assert runs[0][0] == runs[1][0]
    for name, value in runs[0][1].items():
        assert torch.equal(value, runs[1][1][name]), name


def test_training_with_nan_batches_still_converges():
    parts, optimizer = _parts()
    guards = Guards(GuardsConfig())
    generator = torch.Generator().manual_seed(0)

    def held_out_loss() -> float:  # same noise and times before and after
        g = torch.Generator().manual_seed(123)
        with torch.no_grad():
            return sum(float(parts.loss(_batch(), g)) for _ in range(8)) / 8

    start = held_out_loss()
    applied = [
        train_step(parts, optimizer, _batch(nan=i % 4 == 3), generator, 1.0, accept=guards.accept).applied for i in range(60)
    ]
    end = held_out_loss()

    assert guards.skipped_nonfinite == 15 and applied.count(True) + guards.skipped_spike == 45
    assert all(torch.isfinite(p).all() for p in parts.model.parameters())
    assert end <= start / 3, (start, end)  # ~1.43 -> ~0.2 without the NaN batches


# ---------------------------------------------------------------- spike logic


def test_a_spike_after_a_history_is_skipped_and_ordinary_norms_are_not():
    rng = random.Random(0)
    guards = Guards(GuardsConfig())
    norms = _noisy(1.0, 30, rng, rel=0.3)  # a lively history: robust std ~0.2
    assert all(guards.check_step(0.5, n) == "ok" for n in norms)
    assert guards.check_step(0.5, 1.8) == "ok"  # within the normal wobble of training
    assert guards.check_step(0.5, 100.0) == "spike"
    assert (guards.skipped_spike, guards.consecutive_skips) == (1, 1)
    assert guards.check_step(0.5, 1.0) == "ok" and guards.consecutive_skips == 0
    assert guards.scalars()["guards/grad_norm_median"] == pytest.approx(1.0, abs=0.1)


def test_no_spike_detection_before_the_minimum_history():
    guards = Guards(GuardsConfig(spike_min_history=20))
    assert all(guards.check_step(0.5, 1.0) == "ok" for _ in range(19))
    assert guards.check_step(0.5, 100.0) == "ok"  # 19 norms: not yet trusted
    assert guards.check_step(0.5, 1e4) == "spike"  # 20 accepted norms now


def test_a_flat_history_does_not_flag_small_changes():
    guards = Guards(GuardsConfig(spike_mads=20.0))
    for _ in range(30):
        guards.check_step(0.5, 2.0)  # MAD = 0
    # Floor: threshold = median * (1 + 20 * 0.05) = 4.0.
    assert guards.scalars()["guards/spike_threshold"] == pytest.approx(4.0)
    assert guards.check_step(0.5, 2.5) == "ok"
    assert guards.check_step(0.5, 3.9) == "ok"
    assert guards.check_step(0.5, 4.5) == "spike"


def test_a_persistent_level_shift_is_accepted_after_a_bounded_run_without_rollbacks():
    rng = random.Random(1)
    guards = Guards(GuardsConfig(max_consecutive_skips=0, spike_min_history=20))
    for n in _noisy(1.0, 50, rng):
        assert guards.check_step(0.5, n) == "ok"
    decisions = [guards.check_step(0.5, n) for n in _noisy(3.0, 300, rng)]
    # The seeds' detector skipped this for ever; here exactly spike_min_history steps are lost.
    assert decisions[:20] == ["spike"] * 20
    assert decisions[20:] == ["ok"] * 280
    assert guards.rebaselines == 1 and not guards.should_roll_back()
    assert guards.scalars()["guards/grad_norm_median"] == pytest.approx(3.0, rel=0.02)
    assert guards.check_step(0.5, 300.0) == "spike"  # protection holds at the new level


def test_rollback_after_consecutive_skips_then_the_new_level_is_learned():
    rng = random.Random(2)
    guards = Guards(GuardsConfig(max_consecutive_skips=5, spike_min_history=20))
    for n in _noisy(1.0, 50, rng):
        guards.check_step(0.5, n)
    shifted = iter(_noisy(3.0, 200, rng))
    for k in range(1, 6):
        assert guards.check_step(0.5, next(shifted)) == "spike"
        assert guards.should_roll_back() == (k == 5)
    guards.rolled_back()
    assert guards.rollbacks == 1 and guards.consecutive_skips == 0 and not guards.should_roll_back()
    assert all(guards.check_step(0.5, n) == "ok" for n in shifted)
    assert guards.skipped_spike == 5 and guards.scalars()["guards/rollbacks"] == 1.0


def test_rollback_counts_nonfinite_and_spikes_and_resets_on_an_accepted_step():
    guards = Guards(GuardsConfig(max_consecutive_skips=3, spike_min_history=5))
    for _ in range(10):
        guards.check_step(0.5, 1.0)
    assert guards.check_step(float("nan"), float("nan")) == "nonfinite"
    assert guards.check_step(0.5, 50.0) == "spike"
    assert not guards.should_roll_back()
    assert guards.check_step(0.5, 1.0) == "ok" and guards.consecutive_skips == 0
    for decision, norm in (("spike", 50.0), ("nonfinite", float("inf")), ("spike", 60.0)):
        assert guards.check_step(0.5, norm) == decision
    assert guards.should_roll_back()


def test_nonfinite_steps_pass_when_skipping_is_off_and_never_enter_the_window():
    guards = Guards(GuardsConfig(skip_nonfinite=False))
    assert guards.check_step(float("nan"), float("nan")) == "ok"
    assert guards.skipped_nonfinite == 0 and len(guards.window) == 0


def test_impossible_window_is_a_config_error():
    # Refused with the rest of the config, before a Guards is ever built.
    with pytest.raises(ConfigError, match="guards.spike_min_history"):
        compose([], ["guards.spike_window=10", "guards.spike_min_history=20"])


def test_state_dict_round_trip_preserves_decisions():
    rng = random.Random(3)
    settings = GuardsConfig(max_consecutive_skips=0, spike_min_history=10, spike_window=30)
    history = _noisy(1.0, 40, rng) + [50.0, float("nan")] + _noisy(2.5, 4, rng)  # 5 pending spikes
    future = _noisy(2.5, 10, rng) + [80.0] + _noisy(1.0, 5, rng)
    original = Guards(settings)
    for n in history:
        original.check_step(0.5, n)
    state = json.loads(json.dumps(original.state_dict()))
    resumed, fresh = Guards(settings), Guards(settings)
    resumed.load_state_dict(state)

    expected = [original.check_step(0.5, n) for n in future]
    assert [resumed.check_step(0.5, n) for n in future] == expected
    assert resumed.scalars() == original.scalars()
    # The decisions depend on the restored history: 5 more spikes, the re-baseline, a new spike.
    assert expected[:5] == ["spike"] * 5 and expected[5:10] == ["ok"] * 5 and expected[10] == "spike"
    assert [fresh.check_step(0.5, n) for n in future] != expected


# ------------------------------------------------------------------- collapse


def test_collapse_is_raised_after_patience_checks_not_before():
    guards = Guards(GuardsConfig(collapse_std_ratio=0.05, collapse_patience=3))
    guards.check_collapse(800, 0.003, 0.81)
    guards.check_collapse(1000, 0.003, 0.81)
    guards.check_collapse(1100, 0.5, 0.81)  # recovered: the count starts again
    guards.check_collapse(1150, 0.003, 0.81)
    guards.check_collapse(1180, 0.003, 0.81)
    with pytest.raises(TrainingCollapsed) as caught:
        guards.check_collapse(1200, 0.003, 0.81)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("training collapsed at step 1200: predictions' std 0.003 is 0.4% of the target's 0.81")
    assert "3 validations in a row" in message and "training.lr" in message


def test_collapse_counts_only_after_the_predictions_spread_or_warm_up():
    # Without warm-up: the zero-initialised start (no spread yet) is not counted, however long it lasts.
    guards = Guards(GuardsConfig(collapse_std_ratio=0.05, collapse_patience=2))
    for step in range(1, 6):
        guards.check_collapse(step, 0.001, 1.0, after_warmup=False)
    assert guards.low_spread_checks == 0
    guards.check_collapse(6, 0.3, 1.0, after_warmup=False)  # the network has spread: from now on it counts
    guards.check_collapse(7, 0.001, 1.0, after_warmup=False)
    with pytest.raises(TrainingCollapsed, match="at step 8"):
        guards.check_collapse(8, 0.001, 1.0, after_warmup=False)
    # After warm-up a constant counts even if the predictions never spread; the flag survives a resume.
    after = Guards(GuardsConfig(collapse_std_ratio=0.05, collapse_patience=2))
    after.check_collapse(60, 0.001, 1.0, after_warmup=True)
    assert after.low_spread_checks == 1
    resumed = Guards(GuardsConfig(collapse_std_ratio=0.05, collapse_patience=2))
    resumed.load_state_dict(json.loads(json.dumps(guards.state_dict())))
    assert resumed.spread_seen


def test_collapse_check_can_be_disabled():
    guards = Guards(GuardsConfig(collapse_patience=0))
    for step in range(10):
        guards.check_collapse(step, 0.0, 1.0)
    assert guards.low_spread_checks == 0


def test_spread_is_the_batch_mean_of_per_sample_spatial_std():
    target = torch.ones(2, 1, 4, 4, 4)  # (B, C, D, H, W)
    target[0, :, :2] = -1.0  # sample 0: values +-1, std 1
    target[1, :, :2] = -3.0
    target[1, :, 2:] = 3.0  # sample 1: values +-3, std 3
    constant = torch.full_like(target, 0.7)  # a model that predicts the mean
    prediction_std, target_std = spread(constant, target)
    assert prediction_std == 0.0
    assert target_std == pytest.approx(2.0, abs=1e-6)
