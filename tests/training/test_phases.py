"""Training phases, learning-rate groups, gradient accumulation and fp16 with a loss scaler, on the
diffusion UNet's own parts (MONAI's DiffusionModelUNet under `net`: net.conv_in, net.down_blocks, ...)."""

import re

import pytest
import torch
from test_trainer import _cfg, _quiet

from voxgen import checkpoint as store
from voxgen.data.batches import collate
from voxgen.errors import ConfigError
from voxgen.training import phases
from voxgen.training.trainer import Trainer, train

PHASED = [
    "training.steps=8",
    "training.val_every=4",
    "training.checkpoint_every=4",
    "training.warmup_steps=0",
    "training.phases=[{steps: 3, frozen: [net.down_blocks]}, {}]",
    "training.lr_multipliers={net.down_blocks: 0.1}",
    "guards.collapse_std_ratio=0",
]


def _part(tensors: dict, prefix: str) -> dict:
    return {k: v for k, v in tensors.items() if k.startswith(prefix)}


def test_a_frozen_part_stays_bit_identical_and_groups_train_at_their_multiplier(phantom_root, tmp_path):
    cfg = _cfg(phantom_root, tmp_path / "run", *PHASED, "training.steps=3", "training.checkpoint_every=3")
    trainer = Trainer(cfg, _quiet())
    start = {k: v.clone() for k, v in trainer.task.model.state_dict().items()}
    lrs = {group["lr_multiplier"]: group for group in trainer.optimizer.param_groups}
    assert set(lrs) == {1.0, 0.1}
    down = {id(p) for p in trainer.task.model.net.down_blocks.parameters()}
    assert {id(p) for p in lrs[0.1]["params"]} == down
    trainer.fit()
    at_end = trainer.task.model.state_dict()
    assert all(torch.equal(at_end[k], start[k]) for k in start if k.startswith("net.down_blocks."))
    assert any(not torch.equal(at_end[k], start[k]) for k in start if k.startswith("net.up_blocks."))
    # AdamW holds no moments for the frozen part; the EMA of it is its weights, exactly.
    assert all(trainer.optimizer.state.get(p) in (None, {}) for p in trainer.task.model.net.down_blocks.parameters())
    ema = trainer.ema.module.state_dict()
    assert all(torch.equal(ema[k], start[k]) for k in start if k.startswith("net.down_blocks."))


def test_the_spike_guard_starts_a_new_history_with_each_phase(phantom_root, tmp_path):
    # Another part trains: the gradient norm moves to another level, which is not a spike.
    trainer = Trainer(_cfg(phantom_root, tmp_path / "run", *PHASED, "training.steps=5"), _quiet())
    trainer.fit()
    assert len(trainer.guards.window) == 2  # steps 4 and 5, of the second phase
    assert trainer.guards.skipped_spike == 0


def test_the_group_learning_rates_are_the_schedule_times_the_multiplier(phantom_root, tmp_path):
    from voxgen.training.state import lr_at

    cfg = _cfg(phantom_root, tmp_path / "run", *PHASED, "training.steps=2", "training.lr=1e-4")
    trainer = Trainer(cfg, _quiet())
    trainer.fit()
    expected = lr_at(1, 1e-4, 0, 2, cfg.training.min_lr_ratio)  # the rate of the last step taken
    rates = sorted(group["lr"] for group in trainer.optimizer.param_groups)
    assert rates == pytest.approx([0.1 * expected, expected], rel=1e-12)


def test_after_the_phase_the_part_trains_and_a_run_resumed_in_each_phase_is_exact(phantom_root, tmp_path):
    straight = train(_cfg(phantom_root, tmp_path / "straight", *PHASED), _quiet())
    assert straight.step == 8
    _, weights, _ = store.load_latest(tmp_path / "straight")
    _, start, _ = store.load_named(tmp_path / "straight", "step_00000004")
    # Frozen for 3 steps, then trained: the step-4 checkpoint's down_blocks moved at step 4 only.
    assert any(not torch.equal(weights[k], start[k]) for k in _part(weights, "model/net.down_blocks."))

    chain = tmp_path / "chain"
    assert train(_cfg(phantom_root, chain, *PHASED), _quiet(), stop_at=2).interrupted  # in the first phase
    assert train(_cfg(phantom_root, chain, *PHASED), _quiet(), stop_at=6).interrupted  # in the second
    resumed = train(_cfg(phantom_root, chain, *PHASED), _quiet())
    assert resumed.resumed_from == 6 and resumed.step == 8
    _, chained, _ = store.load_latest(chain)
    assert set(chained) == set(weights)
    for key in weights:
        assert torch.equal(chained[key], weights[key]), key


def test_epochs_count_optimizer_steps_of_the_global_batch(phantom_root, tmp_path):
    cfg = _cfg(phantom_root, tmp_path / "run", "training.phases=[{epochs: 2, frozen: [net.down_blocks]}, {steps: 1}]")
    trainer = Trainer(cfg, _quiet())
    per_epoch = len(trainer.train_set) // cfg.training.batch_size
    assert [p.end for p in trainer.training_phases] == [2 * per_epoch, 2 * per_epoch + 1]
    assert phases.frozen_at(trainer.training_phases, 2 * per_epoch - 1) == {"net.down_blocks"}
    assert phases.frozen_at(trainer.training_phases, 2 * per_epoch) == frozenset()


@pytest.mark.parametrize(
    "override, words",
    [
        ("training.phases=[{steps: 2, frozen: [vae]}]", "training.phases[0].frozen names 'vae': the parts of this task's model"),
        ("training.lr_multipliers={encoder: 0.1}", "training.lr_multipliers names 'encoder'"),
    ],
)
def test_unknown_parts_are_refused_naming_the_parts(phantom_root, tmp_path, override, words):
    with pytest.raises(ConfigError, match=re.escape(words)) as info:
        Trainer(_cfg(phantom_root, tmp_path / "run", override), _quiet())
    assert "the parts of this task's model are net" in str(info.value)


def test_two_accumulated_micro_batches_equal_one_batch_of_both(phantom_root, tmp_path):
    common = ["training.steps=4", "training.val_every=4", "training.checkpoint_every=4", "training.lr=1e-4"]
    train(_cfg(phantom_root, tmp_path / "whole", *common, "training.batch_size=4"), _quiet())
    train(_cfg(phantom_root, tmp_path / "micro", *common, "training.batch_size=2", "training.accumulate=2"), _quiet())
    _, whole, state_whole = store.load_latest(tmp_path / "whole")
    _, micro, state_micro = store.load_latest(tmp_path / "micro")
    # The same samples in the same order with the same draws; float32 sums of 4 and of 2 + 2 round apart.
    # (Validation batches are batch_size long, so the validation losses are not comparable.)
    compared = [k for k in whole if k.startswith(("model/", "ema/", "optimizer/"))]
    assert set(compared) == {k for k in micro if k.startswith(("model/", "ema/", "optimizer/"))}
    for key in compared:
        assert torch.allclose(whole[key].double(), micro[key].double(), rtol=0, atol=1e-6), key
    assert any(whole[k].abs().max() > 0 for k in compared if k.endswith("exp_avg"))
    assert (state_whole["epoch"], state_whole["batch_index"]) == (state_micro["epoch"], state_micro["batch_index"])


def test_fp16_mixed_scales_the_loss_saves_the_scale_and_resumes_exactly(phantom_root, tmp_path):
    # float16 convolutions are slow on the CPU: few steps, one validation batch.
    extra = [
        "training.precision=fp16-mixed",
        "training.steps=3",
        "training.val_every=3",
        "training.val_batches=1",
        "sample.steps=2",
    ]
    straight = train(_cfg(phantom_root, tmp_path / "straight", *extra), _quiet())
    assert straight.step == 3 and all(r["val_loss"] == r["val_loss"] for r in straight.history)
    _, weights, state = store.load_latest(tmp_path / "straight")
    assert state["scaler"]["scale"] > 0 and "_growth_tracker" in state["scaler"]
    assert train(_cfg(phantom_root, tmp_path / "chain", *extra), _quiet(), stop_at=1).interrupted
    train(_cfg(phantom_root, tmp_path / "chain", *extra), _quiet())
    _, chained, chained_state = store.load_latest(tmp_path / "chain")
    for key in weights:
        assert torch.equal(chained[key], weights[key]), key
    assert chained_state["scaler"] == state["scaler"]


def test_an_overflow_skips_the_step_and_lowers_the_scale_without_the_guard(phantom_root, tmp_path):
    from voxgen.training.step import train_step

    cfg = _cfg(phantom_root, tmp_path / "run", "training.precision=fp16-mixed")
    trainer = Trainer(cfg, _quiet())
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40)  # beyond float16's range: the gradients overflow
    batch = collate([trainer.train_set[0], trainer.train_set[1]])
    before = {k: v.clone() for k, v in trainer.task.model.state_dict().items()}
    asked = []
    result = train_step(
        trainer.task, trainer.optimizer, batch, None, 1.0, accept=lambda *a: asked.append(a) or True, scaler=trainer.scaler
    )
    assert result.overflow and not result.applied and asked == []
    assert trainer.scaler.get_scale() == 2.0**39
    assert all(torch.equal(v, before[k]) for k, v in trainer.task.model.state_dict().items())


def test_the_planner_traces_the_accumulated_micro_batches(phantom_root, tmp_path):
    from voxgen.memory.planner import plan

    one, two = (plan(_cfg(phantom_root, tmp_path / "run", "training.batch_size=1", f"training.accumulate={k}")) for k in (1, 2))
    whole = plan(_cfg(phantom_root, tmp_path / "run", "training.batch_size=2"))
    # The second micro-batch runs while the first one's gradients are held: a little above one
    # micro-batch, well below the batch of both.
    assert one.peak_bytes < two.peak_bytes < whole.peak_bytes
    assert two.breakdown["activations"] < whole.breakdown["activations"]
