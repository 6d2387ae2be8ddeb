"""Rectified-flow solvers against the exact flow of Gaussian data (see analytic.py)."""

import itertools
import math

import numpy as np
import pytest
import torch

from voxgen.diffusion.generate import generate
from voxgen.diffusion.rflow_samplers import heun2, restart, restart_jump, time_grid
from voxgen.diffusion.samplers import SAMPLERS, SolverSpec, parse_solver
from voxgen.errors import ConfigError

from .analytic import GaussianFlow, analytic_parts

FLOW = GaussianFlow(mu=0.5, sigma=0.8)


def _noise(shape, seed=0, dtype=torch.float64):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _terminal_error(name: str, steps: int, shift: float) -> float:
    x1 = _noise((3, 1, 2, 2, 2))
    out = SAMPLERS[name].fn(FLOW.velocity, x1, time_grid(steps, shift))
    return (out - FLOW.solution(x1)).abs().max().item()


# The midpoint rule converges with order 3 on this flow: off the mean, x - m(t) obeys
# y' = a(t) y with a = S'/(2S) and S quadratic in t, for which the midpoint rule's local
# h^3 error term, a a'/4 + a^3/6 + a''/24, is identically zero (use a' = S''/(2S) - 2a^2).
# The shifted grid used here keeps the measured order at 3. Heun's h^3 term does not vanish.
@pytest.mark.parametrize("name, slope", [("euler", 1), ("midpoint", 3), ("heun2", 2), ("heun3", 3), ("rk4", 4)])
def test_fixed_step_solvers_converge_with_their_order(name, slope):
    # A shifted grid (as sampling uses) keeps the test off any accident of the uniform grid.
    steps = [8, 16, 32, 64]
    errors = [_terminal_error(name, n, shift=3.0) for n in steps]
    fitted = -np.polyfit(np.log(steps), np.log(errors), 1)[0]
    assert abs(fitted - slope) < 0.3, (fitted, errors)
    assert all(later < earlier for earlier, later in itertools.pairwise(errors))


def test_second_order_beats_first_order_at_equal_cost():
    # 32 Euler steps and 16 Heun steps both cost 32 evaluations.
    assert _terminal_error("heun2", 16, 3.0) < _terminal_error("euler", 32, 3.0) / 5


@pytest.mark.parametrize("name", ["bosh3", "fehlberg2", "dopri5", "dopri8"])
@pytest.mark.parametrize("tolerance", [1e-4, 1e-5])
def test_adaptive_solvers_meet_their_tolerance_and_count_every_evaluation(name, tolerance):
    parts = analytic_parts(FLOW.velocity)
    seeds = list(range(6))
    result = generate(parts, seeds, solver=SolverSpec(name, tolerance=tolerance), batch_size=6)
    x1 = torch.stack([torch.randn(1, 2, 2, 2, generator=torch.Generator().manual_seed(s)) for s in seeds])
    exact = FLOW.solution(x1.double())
    # rtol = atol = tol bounds |error| / (tol (1 + |x|)) per step; globally it stays within ~10x
    # (measured at most 8.2x, fehlberg2 at 1e-4; at 1e-3 fehlberg2 takes 3 steps and reaches 10x).
    scaled = ((result.volumes.double() - exact).abs() / (tolerance * (1 + exact.abs()))).max().item()
    assert scaled < 10, scaled
    assert result.nfe == parts.model.calls  # one batch: every network call is one evaluation per volume
    assert result.nfe > 6  # at least the initial-step probe and one accepted step


def test_adaptive_solvers_spend_more_evaluations_on_tighter_tolerances():
    nfe = [generate(analytic_parts(FLOW.velocity), [0, 1], solver=parse_solver(f"dopri5:{tol}")).nfe for tol in (1e-2, 1e-6)]
    assert nfe[1] > nfe[0] + 12


@pytest.mark.parametrize("text, per_step", [("euler:5", 1), ("midpoint:5", 2), ("heun2:5", 2), ("heun3:5", 3), ("rk4:5", 4)])
def test_nfe_is_steps_times_evaluations_per_step(text, per_step):
    parts = analytic_parts(FLOW.velocity)
    result = generate(parts, [0, 1, 2], solver=parse_solver(text), batch_size=2)  # two batches
    assert result.nfe == 5 * per_step == SAMPLERS[text.split(":")[0]].evals_per_step * 5
    assert parts.model.calls == 2 * result.nfe
    assert result.seconds_per_volume > 0


def test_restart_jump_has_the_forward_marginal():
    t_min, t_max, n = 0.1, 0.4, 200_000
    x0 = FLOW.mu + FLOW.sigma * _noise((n,), seed=1)
    x_min = (1 - t_min) * x0 + t_min * _noise((n,), seed=2)
    x_max = restart_jump(x_min, t_min, t_max, _noise((n,), seed=3))
    mean, std = FLOW.marginal(t_max)
    assert abs(x_max.mean().item() - mean) < 4 * std / math.sqrt(n)
    assert abs(x_max.std().item() / std - 1) < 4 / math.sqrt(2 * n)
    # ... and keeps the link to its x0: Cov(x_max, x0) = (1 - t_max) sigma^2.
    covariance = ((x_max - x_max.mean()) * (x0 - x0.mean())).mean().item()
    assert covariance == pytest.approx((1 - t_max) * FLOW.sigma**2, rel=0.02)


def test_restart_sampling_keeps_the_data_marginal():
    x1 = _noise((4, 1, 16, 16, 16), seed=4)  # 16384 independent voxels
    generators = [torch.Generator().manual_seed(10 + i) for i in range(4)]
    out = restart(FLOW.velocity, x1, time_grid(8), generator=generators, restarts=3, t_min=0.1, t_max=0.5, restart_steps=4)
    n = out.numel()
    assert abs(out.mean().item() - FLOW.mu) < 4 * FLOW.sigma / math.sqrt(n)
    assert abs(out.std().item() / FLOW.sigma - 1) < 4 / math.sqrt(2 * n) + 0.005
    # The restarts add noise: samples are no longer the deterministic ODE's image of x1.
    assert (out - FLOW.solution(x1)).abs().mean().item() > 0.1


def test_restart_without_cycles_is_heun_on_the_grid_with_t_min():
    x1 = _noise((2, 1, 2, 2, 2), seed=5)
    grid = time_grid(6)
    with_t_min = torch.cat([grid[grid > 0.25], torch.tensor([0.25], dtype=torch.float64), grid[grid < 0.25]])
    out = restart(FLOW.velocity, x1, grid, restarts=0, t_min=0.25, t_max=0.5)
    assert torch.equal(out, heun2(FLOW.velocity, x1, with_t_min))


def test_restart_is_reproducible_per_sample_and_counts_its_evaluations():
    parts = analytic_parts(FLOW.velocity, sample_shape=(1, 4, 4, 4))
    spec = parse_solver("restart:6,k=2,tmin=0.2,tmax=0.5,rsteps=3")
    both = generate(parts, [7, 8], solver=spec, batch_size=2)
    alone = generate(analytic_parts(FLOW.velocity, sample_shape=(1, 4, 4, 4)), [8], solver=spec)
    assert torch.allclose(both.volumes[1], alone.volumes[0], atol=1e-6)
    # Heun: 2 evaluations per step; the grid gains t_min = 0.2 as an extra point (6 -> 7 steps).
    assert both.nfe == 2 * (7 + 2 * 3)


def test_parse_solver_forms():
    assert parse_solver("euler:25") == SolverSpec("euler", steps=25)
    assert parse_solver("heun2:10,shift=3") == SolverSpec("heun2", steps=10, shift=3.0)
    assert parse_solver("dopri5:1e-3") == SolverSpec("dopri5", tolerance=1e-3)
    spec = parse_solver("restart:18,k=4,tmin=0.05,tmax=0.3,rsteps=2")
    assert (spec.steps, spec.restarts, spec.t_min, spec.t_max, spec.restart_steps) == (18, 4, 0.05, 0.3, 2)
    assert parse_solver("ddim:50,eta=0.5") == SolverSpec("ddim", steps=50, eta=0.5)
    for text in ("euler:25", "heun2:10,shift=3", "dopri5:0.001", "restart:18,k=4,tmin=0.05", "ddim:50,eta=0.5"):
        assert str(parse_solver(text)) == text  # the text round-trips


def test_parse_solver_takes_missing_settings_from_the_config():
    from voxgen.config import compose

    sample = compose([], ["sample.steps=12", "sample.tolerance=1e-4", "sample.shift=2", "sample.eta=0.3"]).sample
    assert parse_solver("heun2", sample) == SolverSpec("heun2", steps=12, shift=2.0)
    assert parse_solver("rk4:4", sample) == SolverSpec("rk4", steps=4, shift=2.0)
    assert parse_solver("bosh3", sample) == SolverSpec("bosh3", tolerance=1e-4)
    assert parse_solver("ddim", sample) == SolverSpec("ddim", steps=12, eta=0.3)


@pytest.mark.parametrize(
    "text, message",
    [
        ("eulr:25", "choose one of euler, midpoint"),
        ("euler:2.5", "whole number"),
        ("euler:x", "not a number"),
        ("dopri5:25", "tolerance in (0, 1)"),
        ("euler:5,eta=0.5", "not an option of euler"),
        ("restart:5,tmin=0.5,tmax=0.3", "0 < tmin < tmax"),
    ],
)
def test_parse_solver_rejects_bad_text_with_a_config_error(text, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_solver(text)


def test_a_spec_without_steps_is_refused_when_sampling_and_ddpm_solvers_refuse_flow_models():
    parts = analytic_parts(FLOW.velocity)
    with pytest.raises(ConfigError, match="needs a number of steps"):
        generate(parts, [0], solver=parse_solver("euler"))
    with pytest.raises(ConfigError, match="strategy=rflow"):
        generate(parts, [0], solver=parse_solver("ddim:5"))


def test_the_sample_command_offers_solver_shift_and_guidance(capsys):
    from voxgen.cli import main

    with pytest.raises(SystemExit):
        main(["sample", "--help"])
    help_text = capsys.readouterr().out
    assert "--solver" in help_text and "--guidance-scale" in help_text and "--shift" in help_text
    # Unknown names are refused with the registry's list.
    with pytest.raises(ConfigError) as error:
        parse_solver("nope:3")
    assert all(name in str(error.value) for name in SAMPLERS)
