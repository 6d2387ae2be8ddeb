"""The solver a run samples with is settled when its config is composed, by one rule.

- the default solver follows the strategy, and a solver that cannot sample the strategy, or
  a setting a sampler does not have, is refused by `train --dry-run`, not after training;
- `--shift`/`--steps` on the command line are refused for a sampler without them exactly as
  the same settings in the solver text are;
- a preset for another space (channel overrides) is refused by `train` in one line.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tiny_run import TINY_RUN
from voxgen.cli import main
from voxgen.config import compose
from voxgen.diffusion.sampling import sampling_settings
from voxgen.diffusion.strategies import build_strategy
from voxgen.errors import ConfigError

TINY = [
    *TINY_RUN,
    "training.val_every=2",
    "training.checkpoint_every=2",
    "training.device=cpu",
    "sample.steps=2",
]
CONFIGS = Path(__file__).parents[1] / "configs"


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error: ")]


@pytest.mark.parametrize("strategy, sampler", [("rflow", "euler"), ("ddpm", "ddim")])
def test_the_default_solver_follows_the_strategy(strategy, sampler):
    cfg = compose([], [f"strategy={strategy}"])
    assert cfg.sample.solver is None
    spec = sampling_settings(cfg.sample, build_strategy(cfg), conditional=True).solver
    assert spec.name == sampler and spec.steps == cfg.sample.steps


@pytest.mark.parametrize(
    "overrides, words",
    [
        (
            ["strategy=ddpm", "sample.solver=euler"],
            ["sample.solver='euler'", "strategy=rflow", "not strategy=ddpm", "ddpm, ddim, dpmpp2m"],
        ),
        (["sample.solver=ddim"], ["sample.solver='ddim'", "not strategy=rflow"]),
        (["sample.solver=heun2:25,foo=1"], ["'foo=1' is not an option of heun2", "options: shift"]),
        (["strategy=ddpm", "ddpm.num_timesteps=10", "sample.steps=20"], ["at most ddpm.num_timesteps=10 steps"]),
    ],
)
def test_dry_run_refuses_a_solver_that_cannot_sample_the_run(capsys, overrides, words):
    code, out, err = _run(capsys, "train", "--dry-run", *overrides)
    assert code == 2 and out == ""
    lines = _error_lines(err)
    assert len(lines) == 1
    for word in words:
        assert word in lines[0], lines[0]


def test_command_line_settings_follow_the_spec_text_rule():
    cfg = compose([], ["strategy=ddpm"])
    strategy = build_strategy(cfg)
    with pytest.raises(ConfigError) as from_text:
        sampling_settings(cfg.sample, strategy, True, solver="ddim:10,shift=3")
    with pytest.raises(ConfigError) as from_flag:
        sampling_settings(cfg.sample, strategy, True, solver="ddim:10", shift=3.0)
    for error in (from_text, from_flag):
        assert "'shift=3' is not an option of ddim (options: eta)" in str(error.value)
    flow = compose([], [])
    with pytest.raises(ConfigError, match="'steps=4' is not an option of dopri5"):
        sampling_settings(flow.sample, build_strategy(flow), True, solver="dopri5:1e-3", steps=4)
    spec = sampling_settings(flow.sample, build_strategy(flow), True, solver="heun2:10", steps=4, shift=3.0).solver
    assert str(spec) == "heun2:4,shift=3"


def test_a_ddpm_run_trains_to_exit_0_and_its_sample_command_refuses_a_shift(capsys, phantom_root, tmp_path):
    run = tmp_path / "ddpm"
    code, out, err = _run(
        capsys, "train", *TINY, "strategy=ddpm", "training.mosaic_every=2", f"data.root={phantom_root}", f"run.dir={run}"
    )
    assert code == 0, err
    assert "trained 2 steps" in out
    code, out, err = _run(capsys, "sample", "--run", str(run), "--num", "1", "--shift", "3")
    assert code == 2 and out == ""
    assert _error_lines(err) == ["error: solver 'ddim:2': 'shift=3' is not an option of ddim (options: eta)"]
    code, out, err = _run(capsys, "sample", "--run", str(run), "--num", "1", "--solver", "ddim:2,eta=1")
    assert code == 0, err
    assert "ddim:2,eta=1" in out


SHRUNK_UNET = [
    "data.shape=[16,16,16]",
    "model.name=unet",
    "model.channels=[8,16]",
    "model.attention_levels=[false,false]",
    "model.norm_num_groups=4",
    "model.num_head_channels=8",
]


@pytest.mark.parametrize("preset", ["unet_latent4x_3L_tiny.yaml", "dit_exp13_S2_latent4x.yaml"])
def test_a_latent_preset_plans_and_training_it_asks_for_a_trained_autoencoder(capsys, phantom_root, tmp_path, preset):
    """The presets plan from the autoencoder config they name; training needs a trained run there."""
    config = str(CONFIGS / preset)
    code, out, _ = _run(capsys, "plan", "--json", "--config", config)
    assert code == 0 and '"in_channels": 8' in out
    run = tmp_path / "run"
    code, out, err = _run(capsys, "train", "--config", config, *SHRUNK_UNET, f"data.root={phantom_root}", f"run.dir={run}")
    assert code == 2 and out == ""
    lines = _error_lines(err)
    assert len(lines) == 1 and len(err.strip().splitlines()) == 1, err
    assert lines[0].startswith(
        "error: space.autoencoder=configs/autoencoders/vqvae_4x.yaml is an autoencoder config, not a trained run"
    )
    assert not run.exists()


def test_channel_overrides_plan_but_train_refuses_them_in_one_line(capsys, phantom_root, tmp_path):
    overrides = [*SHRUNK_UNET, "model.in_channels=8", "model.out_channels=4"]
    code, out, _ = _run(capsys, "plan", "--json", *overrides)
    assert code == 0 and '"in_channels": 8' in out
    run = tmp_path / "run"
    code, out, err = _run(capsys, "train", *overrides, f"data.root={phantom_root}", f"run.dir={run}")
    assert code == 2 and out == ""
    lines = _error_lines(err)
    assert len(lines) == 1 and len(err.strip().splitlines()) == 1
    assert lines[0].startswith(
        "error: model.in_channels=8 and model.out_channels=4 do not match the 2 -> 1 channels of mode 'bravo' in space=pixel"
    )
    assert not run.exists()
