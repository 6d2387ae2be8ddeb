"""Min-SNR-gamma loss weighting (Hang et al. 2023, `training.min_snr_gamma`): the paper's weights
for eps, v and x0 DDPM models, the rectified-flow weight derived in docs/training.md, and the
loss it weights."""

import math

import numpy as np
import pytest
import torch

from voxgen.cli import main
from voxgen.diffusion.strategies import DDPM, RectifiedFlow
from voxgen.errors import ConfigError

from .test_ddpm import fixed_noise_losses
from .tiny import tiny_cfg

T = 1000
# From the first timestep (SNR ~ 1e4) to the last (SNR ~ 4e-5): both sides of gamma = 5.
STEPS = [0, 1, 5, 20, 40, 60, 100, 250, 500, 750, 999]


def _linear_alphas_cumprod() -> list[float]:
    """ab_t of Ho et al.'s linear schedule, in Python floats: the test's own, not the strategy's."""
    ab, product = [], 1.0
    for t in range(T):
        product *= 1.0 - (1e-4 + (0.02 - 1e-4) * t / (T - 1))
        ab.append(product)
    return ab


def _paper_weight(ab: float, gamma: float, prediction: str) -> float:
    """Hang et al. 2023: the x0-loss weight min(SNR, gamma), said of each prediction's error."""
    snr = ab / (1 - ab)
    return {"eps": min(snr, gamma) / snr, "v": min(snr, gamma) / (snr + 1), "x0": min(snr, gamma)}[prediction]


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
@pytest.mark.parametrize("gamma", [5.0, 1.0, 20.0])
def test_ddpm_weights_are_the_papers(prediction, gamma):
    strategy = DDPM(T, "linear", prediction=prediction, min_snr_gamma=gamma)
    t = torch.tensor(STEPS)
    weights = strategy.min_snr_weight(t)
    assert weights.dtype == torch.float64 and weights.shape == (len(STEPS),)
    ab = _linear_alphas_cumprod()
    for i, step in enumerate(STEPS):
        assert weights[i].item() == pytest.approx(_paper_weight(ab[step], gamma, prediction), rel=1e-12, abs=1e-12)
    snr = [ab[s] / (1 - ab[s]) for s in STEPS]
    assert min(snr) < gamma < max(snr)  # both regimes of the min are tested


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_ddpm_weight_times_the_prediction_error_is_min_snr_times_the_x0_error(prediction):
    """The three weights are one weighting: the error of any prediction, converted to x0 by its
    own definition, weighs min(SNR, gamma)."""
    gamma = 5.0
    strategy = DDPM(T, "cosine", prediction=prediction, min_snr_gamma=gamma)
    g = torch.Generator().manual_seed(0)
    t = torch.tensor(STEPS)
    x0, noise = (
        torch.randn(len(STEPS), 1, 3, 3, 3, generator=g, dtype=torch.float64),
        torch.randn(len(STEPS), 1, 3, 3, 3, generator=g, dtype=torch.float64),
    )
    target = strategy.target(x0, noise, t)
    prediction_hat = target + 0.1 * torch.randn(target.shape, generator=g, dtype=torch.float64)
    x_t = strategy.interpolate(x0, noise, t)
    for i in range(len(STEPS)):
        ab = strategy.alphas_cumprod[STEPS[i]].item()
        a, s = math.sqrt(ab), math.sqrt(1 - ab)
        out = prediction_hat[i]
        x0_hat = {"eps": (x_t[i] - s * out) / a, "v": a * x_t[i] - s * out, "x0": out}[prediction]
        lhs = strategy.min_snr_weight(t[i : i + 1]).item() * ((out - target[i]) ** 2).mean().item()
        rhs = min(ab / (1 - ab), gamma) * ((x0_hat - x0[i]) ** 2).mean().item()
        assert lhs == pytest.approx(rhs, rel=1e-9)


def test_rflow_weight_gives_the_x0_error_the_weight_min_snr():
    """x_t = (1 - t) x0 + t n, v = n - x0: SNR(t) = ((1 - t) / t)^2, x0_hat = x_t - t v_hat, so
    |x0 - x0_hat|^2 = t^2 |v - v_hat|^2 and the velocity weight is t^2 min(SNR, gamma)."""
    gamma = 5.0
    flow = RectifiedFlow(min_snr_gamma=gamma)
    g = torch.Generator().manual_seed(1)
    t = torch.tensor([0.01, 0.1, 0.25, 0.3, 0.5, 0.7, 0.9, 0.99], dtype=torch.float64)
    x0, noise = (
        torch.randn(8, 1, 3, 3, 3, generator=g, dtype=torch.float64),
        torch.randn(8, 1, 3, 3, 3, generator=g, dtype=torch.float64),
    )
    v = flow.target(x0, noise, t)
    v_hat = v + 0.1 * torch.randn(v.shape, generator=g, dtype=torch.float64)
    x_t = flow.interpolate(x0, noise, t)
    weights = flow.min_snr_weight(t)
    assert weights.dtype == torch.float64
    snr = ((1 - t) / t) ** 2
    assert torch.allclose(flow.snr(t), snr, rtol=1e-14, atol=0)
    assert (snr > gamma).any() and (snr < gamma).any()  # SNR = 5 at t = 1 / (1 + sqrt 5) ~ 0.31
    for i in range(8):
        ti = t[i].item()
        x0_hat = x_t[i] - ti * v_hat[i]
        eps_hat = x_t[i] + (1 - ti) * v_hat[i]
        v_error = ((v_hat[i] - v[i]) ** 2).mean().item()
        x0_error = ((x0_hat - x0[i]) ** 2).mean().item()
        snr_i = ((1 - ti) / ti) ** 2
        assert weights[i].item() == pytest.approx(ti**2 * min(snr_i, gamma), rel=1e-12)
        assert weights[i].item() * v_error == pytest.approx(min(snr_i, gamma) * x0_error, rel=1e-9)
        if snr_i < gamma:  # unclipped, the x0 weight SNR is the eps loss: (1 - t)^2 |v error|^2
            assert weights[i].item() * v_error == pytest.approx(((eps_hat - noise[i]) ** 2).mean().item(), rel=1e-9)
    # At the ends SNR is infinite (t = 0) or zero (t = 1); the closed form min((1 - t)^2, gamma t^2) is not.
    assert flow.min_snr_weight(torch.tensor([0.0, 1.0])).tolist() == [0.0, 0.0]


@pytest.mark.parametrize("strategy", [DDPM(T, "linear", prediction="v"), RectifiedFlow()], ids=["ddpm", "rflow"])
def test_gamma_zero_leaves_the_loss_as_it_was(strategy):
    g = torch.Generator().manual_seed(2)
    prediction, target = torch.randn(4, 2, 5, 6, 7, generator=g), torch.randn(4, 2, 5, 6, 7, generator=g)
    t = torch.tensor([0, 10, 500, 999]) if isinstance(strategy, DDPM) else torch.tensor([0.1, 0.4, 0.6, 0.9])
    assert strategy.min_snr_gamma == 0.0
    loss = strategy.loss(prediction, target, t)
    assert torch.equal(loss, torch.mean((prediction.float() - target.float()) ** 2))
    assert torch.equal(strategy.loss(prediction, target), loss)  # no t needed when unweighted


@pytest.mark.parametrize(
    "strategy",
    [DDPM(T, "linear", prediction="eps", min_snr_gamma=5.0), RectifiedFlow(min_snr_gamma=5.0)],
    ids=["ddpm", "rflow"],
)
def test_weighted_loss_is_a_float32_batch_mean_of_weighted_sample_errors(strategy):
    g = torch.Generator().manual_seed(3)
    prediction = torch.randn(4, 2, 5, 6, 7, generator=g).to(torch.bfloat16)
    target = torch.randn(4, 2, 5, 6, 7, generator=g)
    t = torch.tensor([0, 10, 500, 999]) if isinstance(strategy, DDPM) else torch.tensor([0.1, 0.4, 0.6, 0.9])
    loss = strategy.loss(prediction, target, t)
    assert loss.dtype == torch.float32 and loss.shape == ()
    per_sample = ((prediction.double() - target.double()) ** 2).flatten(1).mean(1)
    expected = (strategy.min_snr_weight(t) * per_sample).mean().item()
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert abs(loss.item() - per_sample.mean().item()) > 0.1 * per_sample.mean().item()  # the weights do act
    with pytest.raises(ValueError, match="training times"):
        strategy.loss(prediction, target)


def test_a_huge_gamma_turns_eps_weighting_off():
    """min(SNR, gamma) / SNR = 1 when gamma exceeds every SNR of the schedule: L_simple again."""
    strategy = DDPM(T, "linear", min_snr_gamma=1e9)
    g = torch.Generator().manual_seed(4)
    prediction, target = torch.randn(3, 1, 4, 4, 4, generator=g), torch.randn(3, 1, 4, 4, 4, generator=g)
    t = torch.tensor([0, 300, 999])
    assert torch.equal(strategy.min_snr_weight(t), torch.ones(3, dtype=torch.float64))
    assert strategy.loss(prediction, target, t).item() == pytest.approx(torch.mean((prediction - target) ** 2).item(), rel=1e-6)


@pytest.mark.parametrize(
    "overrides",
    [
        ("strategy=ddpm",),
        ("strategy=ddpm", "ddpm.prediction=v"),
        ("strategy=ddpm", "ddpm.prediction=x0"),
        ("strategy=rflow",),
    ],
    ids=["ddpm-eps", "ddpm-v", "ddpm-x0", "rflow"],
)
def test_a_tiny_unet_trains_with_min_snr_weighting(overrides):
    cfg = tiny_cfg(*overrides, "training.min_snr_gamma=5")
    before, after, losses = fixed_noise_losses(cfg, steps=16)
    assert all(math.isfinite(x) for x in losses)
    assert after < 0.9 * before, (before, after, np.round(losses, 3))


def test_a_negative_gamma_is_refused_in_one_line(capsys):
    message = "training.min_snr_gamma=-1.0 must be at least 0 (0 disables min-SNR weighting; the paper uses 5)"
    for strategy in ("ddpm", "rflow"):
        assert main(["train", "--dry-run", f"strategy={strategy}", "training.min_snr_gamma=-1"]) == 2
        captured = capsys.readouterr()
        assert captured.out == "" and captured.err == f"error: {message}\n"
    with pytest.raises(ConfigError):
        RectifiedFlow(min_snr_gamma=float("nan"))
