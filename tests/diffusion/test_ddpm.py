"""DDPM strategy: schedules, loss, and its samplers against exact noise predictions of Gaussian data."""

import math

import numpy as np
import pytest
import torch

from voxgen.cli import main
from voxgen.diffusion.ddpm_samplers import ddim, ddpm, ddpm_grid, dpmpp_2m
from voxgen.diffusion.generate import generate
from voxgen.diffusion.parts import build_parts
from voxgen.diffusion.samplers import parse_solver
from voxgen.diffusion.shapes import append_dims
from voxgen.diffusion.strategies import DDPM, build_strategy, ddpm_betas
from voxgen.draws import Draws
from voxgen.errors import ConfigError
from voxgen.training.step import make_optimizer, train_step

from .analytic import GaussianEps, analytic_parts
from .tiny import learnable_batch, tiny_cfg, train_losses


def _noise(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_linear_schedule_alphas_cumprod_is_the_product_of_one_minus_beta():
    strategy = DDPM(1000, "linear", 1e-4, 0.02)
    assert strategy.alphas_cumprod.dtype == torch.float64
    product = 1.0
    for t in range(1000):
        product *= 1.0 - (1e-4 + (0.02 - 1e-4) * t / 999)
        if t in (0, 1, 499, 999):
            assert strategy.alphas_cumprod[t].item() == pytest.approx(product, rel=1e-12)
    assert strategy.alphas_cumprod[-1].item() == pytest.approx(4.035e-5, rel=1e-3)  # Ho et al.'s ab_T


def test_cosine_schedule_alphas_cumprod_is_the_squared_cosine():
    strategy = DDPM(1000, "cosine")

    def f(t):
        return math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2

    for t in (0, 10, 500, 900, 980):
        assert strategy.alphas_cumprod[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-10)
    assert strategy.betas.max().item() == pytest.approx(0.999)  # capped where f(t + 1) -> 0


def test_unknown_schedule_is_a_config_error():
    with pytest.raises(ConfigError, match="ddpm.schedule"):
        ddpm_betas(10, "quadratic")


def test_ddpm_interpolation_target_and_model_time():
    strategy = DDPM(100, "linear", 1e-3, 0.05)
    x0, noise = torch.full((2, 1, 2, 2, 2), 0.5), torch.full((2, 1, 2, 2, 2), -1.0)
    t = torch.tensor([0, 99])
    x_t = strategy.interpolate(x0, noise, t)
    for i in range(2):
        ab = strategy.alphas_cumprod[t[i]].item()
        assert torch.allclose(x_t[i], torch.full_like(x_t[i], math.sqrt(ab) * 0.5 - math.sqrt(1 - ab)), atol=1e-6)
    assert torch.equal(strategy.target(x0, noise), noise)
    assert torch.equal(strategy.model_time(t), torch.tensor([0.0, 99.0]))
    draws = strategy.sample_time(Draws.of(torch.Generator().manual_seed(0), 20000, "cpu"))
    assert draws.min() == 0 and draws.max() == 99 and abs(draws.double().mean().item() - 49.5) < 0.6


def test_grid_runs_from_the_last_timestep_to_data():
    assert ddpm_grid(4, 1000).tolist() == [999.0, 666.0, 333.0, 0.0, -1.0]
    assert ddpm_grid(1000, 1000)[:-1].unique().numel() == 1000


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_ddim_converges_with_order_one_and_dpmpp_2m_is_far_more_accurate(schedule):
    strategy = DDPM(1000, schedule)
    eps = GaussianEps(strategy.alphas_cumprod)
    x = _noise((4, 1, 2, 2, 2))
    exact = eps.posterior_mean(eps.flow_map(x, 999, 0), 0)  # every sampler's last step is x0 at t = 0

    def error(sampler, steps):
        out = sampler(eps, x, ddpm_grid(steps, 1000), alphas_cumprod=strategy.alphas_cumprod)
        return (out - exact).abs().max().item()

    _assert_ddim_first_order_and_dpmpp_2m_5x_better(error)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_ddim_with_eta_zero_recovers_the_data_distribution(schedule):
    strategy = DDPM(1000, schedule)
    eps = GaussianEps(strategy.alphas_cumprod, mu=0.5, sigma=0.8)
    # Deterministic DDIM is affine in its input, out = a + b x, so noise x ~ N(0, 1) is mapped
    # to exactly N(a, b^2): two evaluations give the law without sampling error.
    unit = torch.tensor([0.0, 1.0], dtype=torch.float64).view(2, 1, 1, 1, 1)

    def law(steps):
        out = ddim(eps, unit, ddpm_grid(steps, 1000), alphas_cumprod=strategy.alphas_cumprod).flatten()
        return out[0].item(), (out[1] - out[0]).item()

    mean, std = law(1000)
    # The schedule ends at ab_T > 0 (linear: 4e-5), so pure noise is slightly off the exact x_T.
    assert abs(mean - 0.5) < 3e-3 and abs(std / 0.8 - 1) < 3e-3
    _, std_50 = law(50)
    assert abs(std_50 / 0.8 - 1) > 3 * abs(std / 0.8 - 1)  # fewer steps, visibly larger error


def test_ancestral_ddpm_is_ddim_with_eta_one_and_samples_the_data_distribution():
    strategy = DDPM(1000, "cosine")
    eps = GaussianEps(strategy.alphas_cumprod, mu=-0.2, sigma=0.6)
    x, grid = _noise((2, 1, 16, 16, 16), seed=2), ddpm_grid(1000, 1000)

    def generators():
        return [torch.Generator().manual_seed(20 + i) for i in range(2)]

    ancestral = ddpm(eps, x, grid, alphas_cumprod=strategy.alphas_cumprod, generator=generators())
    eta_one = ddim(eps, x, grid, alphas_cumprod=strategy.alphas_cumprod, generator=generators(), eta=1.0)
    assert torch.allclose(ancestral, eta_one, atol=1e-10)  # two forms of the same posterior
    n = ancestral.numel()
    assert abs(ancestral.mean().item() + 0.2) < 4 * 0.6 / math.sqrt(n)
    assert abs(ancestral.std().item() / 0.6 - 1) < 4 / math.sqrt(2 * n)
    deterministic = ddim(eps, x, grid, alphas_cumprod=strategy.alphas_cumprod)
    assert (ancestral - deterministic).abs().mean().item() > 0.1  # the ancestral sampler does add noise


def test_generate_samples_a_ddpm_model_with_one_evaluation_per_step():
    cfg = tiny_cfg("strategy=ddpm", "ddpm.num_timesteps=50")
    strategy = build_strategy(cfg)
    eps = GaussianEps(strategy.alphas_cumprod)
    parts = analytic_parts(eps, strategy, sample_shape=(1, 4, 4, 4))
    for text in ("ddpm:10", "ddim:10,eta=0.5", "dpmpp2m:10"):
        result = generate(parts, [0, 1], solver=parse_solver(text))
        assert result.nfe == 10 and result.volumes.shape == (2, 1, 4, 4, 4)
        assert torch.isfinite(result.volumes).all()
    with pytest.raises(ConfigError, match="at most ddpm.num_timesteps=50"):
        generate(parts, [0], solver=parse_solver("ddim:51"))
    with pytest.raises(ConfigError, match="strategy=ddpm"):
        generate(parts, [0], solver=parse_solver("euler:5"))


def test_a_tiny_unet_trains_with_ddpm_and_condition_dropout():
    losses = train_losses(tiny_cfg("strategy=ddpm", "training.cond_dropout=0.3"), steps=12)
    assert all(math.isfinite(x) for x in losses)
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses


def test_the_ddpm_grid_is_lin_et_al_linspace_spacing_not_trailing():
    """docs/sampling.md names the spacing: Lin et al. 2024, Table 2 (1-based t; here 0-based)."""
    T, S = 1000, 10
    linspace = np.round(np.linspace(1, T, S))[::-1] - 1
    trailing = np.round(np.arange(T, 0, -T / S)) - 1
    grid = ddpm_grid(S, T).numpy()
    assert np.array_equal(grid[:-1], linspace) and grid[-1] == -1
    assert not np.array_equal(grid[:-1], trailing)


# ---- v and x0 prediction (`ddpm.prediction`) ---------------------------------------------------


class _ExactPrediction:
    """The exact eps model of Gaussian data reporting `prediction` instead: its x0 and v are
    converted here in float64, from the definitions (x = a x0 + s eps, v = a eps - s x0), not
    by the samplers' conversion."""

    def __init__(self, eps: GaussianEps, prediction: str):
        self.eps, self.prediction = eps, prediction

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
        e = self.eps(x, t).double()
        ab = append_dims(self.eps.ab[t.long()], x.ndim)
        a, s = ab.sqrt(), (1 - ab).sqrt()
        x0 = (x.double() - s * e) / a
        return (x0 if self.prediction == "x0" else a * e - s * x0).to(x.dtype)


def test_ddpm_v_and_x0_targets():
    x0, noise = torch.full((2, 1, 2, 2, 2), 0.5), torch.full((2, 1, 2, 2, 2), -1.0)
    t = torch.tensor([3, 97])
    v = DDPM(100, "linear", 1e-3, 0.05, prediction="v")
    assert torch.equal(DDPM(100, "linear", 1e-3, 0.05, prediction="x0").target(x0, noise, t), x0)
    assert torch.equal(DDPM(100, "linear", 1e-3, 0.05).target(x0, noise, t), noise)
    target = v.target(x0, noise, t)
    for i in range(2):
        product = math.prod(1.0 - (1e-3 + (0.05 - 1e-3) * k / 99) for k in range(int(t[i]) + 1))
        expected = math.sqrt(product) * -1.0 - math.sqrt(1 - product) * 0.5
        assert torch.allclose(target[i], torch.full_like(target[i], expected), atol=1e-6)
    with pytest.raises(ValueError, match="depends on the timestep"):
        v.target(x0, noise)


@pytest.mark.parametrize("prediction", ["v", "x0"])
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_v_and_x0_models_converge_as_eps_models_do(prediction, schedule):
    """The eps test above for v and x0 models: DDIM first order, DPM-Solver++(2M) far more
    accurate, and each sampler gives what it gives with the same exact model predicting eps."""
    strategy = DDPM(1000, schedule)
    eps = GaussianEps(strategy.alphas_cumprod)
    model = _ExactPrediction(eps, prediction)
    x = _noise((4, 1, 2, 2, 2))
    exact = eps.posterior_mean(eps.flow_map(x, 999, 0), 0)

    def run(sampler, fn, steps, **kw):
        return sampler(fn, x, ddpm_grid(steps, 1000), alphas_cumprod=strategy.alphas_cumprod, **kw)

    def error(sampler, steps):
        out = run(sampler, model, steps, prediction=prediction)
        assert torch.allclose(out, run(sampler, eps, steps), rtol=0, atol=1e-9)
        return (out - exact).abs().max().item()

    ddim_errors = _assert_ddim_first_order_and_dpmpp_2m_5x_better(error)
    # Read as eps, the same network's output is far off: the prediction type matters.
    assert (run(ddim, model, 20) - exact).abs().max().item() > 100 * ddim_errors[1]


@pytest.mark.parametrize("prediction", ["v", "x0"])
def test_ancestral_ddpm_with_v_and_x0_models_samples_the_data_distribution(prediction):
    strategy = DDPM(1000, "cosine")
    eps = GaussianEps(strategy.alphas_cumprod, mu=-0.2, sigma=0.6)
    x, grid = _noise((2, 1, 16, 16, 16), seed=2), ddpm_grid(1000, 1000)

    def generators():
        return [torch.Generator().manual_seed(20 + i) for i in range(2)]

    model = _ExactPrediction(eps, prediction)
    ancestral = ddpm(model, x, grid, alphas_cumprod=strategy.alphas_cumprod, generator=generators(), prediction=prediction)
    assert torch.allclose(
        ancestral, ddpm(eps, x, grid, alphas_cumprod=strategy.alphas_cumprod, generator=generators()), atol=1e-8
    )
    n = ancestral.numel()
    assert abs(ancestral.mean().item() + 0.2) < 4 * 0.6 / math.sqrt(n)
    assert abs(ancestral.std().item() / 0.6 - 1) < 4 / math.sqrt(2 * n)


@pytest.mark.parametrize("prediction", ["v", "x0"])
def test_generate_binds_the_strategys_prediction_type(prediction):
    cfg = tiny_cfg("strategy=ddpm", "ddpm.num_timesteps=50", f"ddpm.prediction={prediction}")
    strategy = build_strategy(cfg)
    assert strategy.prediction == prediction
    eps = GaussianEps(strategy.alphas_cumprod)
    as_eps = analytic_parts(eps, DDPM(50), sample_shape=(1, 4, 4, 4))
    parts = analytic_parts(_ExactPrediction(eps, prediction), strategy, sample_shape=(1, 4, 4, 4))
    for text in ("ddpm:10", "ddim:10,eta=0.5", "dpmpp2m:10"):
        spec = parse_solver(text)
        assert "prediction" not in spec.settings  # bound from the strategy, not a user setting
        expected = generate(as_eps, [0, 1], solver=spec).volumes
        assert torch.allclose(generate(parts, [0, 1], solver=spec).volumes, expected, atol=1e-5)


def fixed_noise_losses(cfg, steps: int) -> tuple[float, float, list[float]]:
    """(loss before, loss after, training losses) of `steps` training steps on one fixed batch;
    before and after are means over 8 fixed draws of noise and times, so they compare like with
    like (a v or min-SNR loss varies with t from step to step far more than it falls in a few)."""
    torch.manual_seed(0)
    parts = build_parts(cfg)
    optimizer = make_optimizer(parts.model, cfg)
    batch, generator = learnable_batch(), torch.Generator().manual_seed(0)

    def fixed() -> float:
        with torch.no_grad():
            return float(np.mean([parts.loss(batch, torch.Generator().manual_seed(100 + k)).item() for k in range(8)]))

    before = fixed()
    losses = [train_step(parts, optimizer, batch, generator, grad_clip=1.0).loss for _ in range(steps)]
    return before, fixed(), losses


@pytest.mark.parametrize("prediction", ["v", "x0"])
def test_a_tiny_unet_trains_with_v_and_x0_prediction(prediction):
    before, after, losses = fixed_noise_losses(tiny_cfg("strategy=ddpm", f"ddpm.prediction={prediction}"), steps=12)
    assert all(math.isfinite(x) for x in losses)
    assert after < 0.8 * before, (before, after)


def test_train_dry_run_refuses_an_unknown_prediction_in_one_line(capsys):
    for strategy in ("ddpm", "rflow"):  # checked whatever the strategy, as ddpm.schedule is
        assert main(["train", "--dry-run", f"strategy={strategy}", "ddpm.prediction=foo"]) == 2
        captured = capsys.readouterr()
        assert captured.out == "" and captured.err == "error: ddpm.prediction='foo' is not one of eps, v, x0\n"
    with pytest.raises(ConfigError, match=r"^ddpm.prediction='epsilon' is not one of eps, v, x0$"):
        DDPM(10, prediction="epsilon")


def _assert_ddim_first_order_and_dpmpp_2m_5x_better(error) -> list[float]:
    """`error(sampler, steps)` against the exact x0: DDIM's falls as 1/steps, DPM-Solver++(2M)'s is
    at least 5x below it from 20 steps on; returns DDIM's errors at 10, 20, 40, 80 steps."""
    steps = [10, 20, 40, 80]
    ddim_errors = [error(ddim, n) for n in steps]
    assert abs(-np.polyfit(np.log(steps), np.log(ddim_errors), 1)[0] - 1.0) < 0.2, ddim_errors
    for n, ddim_error in zip(steps[1:], ddim_errors[1:]):
        assert error(dpmpp_2m, n) < ddim_error / 5
    return ddim_errors
