import math

import pytest
import torch

from voxgen.diffusion.modes import MODES
from voxgen.diffusion.rflow_samplers import euler, time_grid
from voxgen.diffusion.shapes import append_dims
from voxgen.diffusion.strategies import RectifiedFlow, logit_normal_density
from voxgen.draws import Draws


def test_append_dims_any_rank():
    v = torch.arange(3.0)
    assert append_dims(v, 5).shape == (3, 1, 1, 1, 1)
    assert append_dims(v, 3).shape == (3, 1, 1)
    with pytest.raises(ValueError):
        append_dims(torch.zeros(2, 2), 1)


def test_convention_t0_is_data_t1_is_noise():
    flow = RectifiedFlow()
    x0 = torch.full((2, 1, 2, 2, 2), 0.5)
    noise = torch.full_like(x0, -2.0)
    assert torch.equal(flow.interpolate(x0, noise, torch.zeros(2)), x0)
    assert torch.equal(flow.interpolate(x0, noise, torch.ones(2)), noise)
    mid = flow.interpolate(x0, noise, torch.tensor([0.25, 0.75]))
    assert torch.allclose(mid[0], torch.full_like(mid[0], 0.75 * 0.5 + 0.25 * -2.0))
    assert torch.allclose(mid[1], torch.full_like(mid[1], 0.25 * 0.5 + 0.75 * -2.0))
    assert torch.equal(flow.target(x0, noise), noise - x0)
    assert flow.model_time(torch.tensor([0.5])).item() == 500.0


def test_time_sampling_distributions():
    g = torch.Generator().manual_seed(0)
    uniform = RectifiedFlow("uniform").sample_time(Draws.of(g, 20000, "cpu"))
    assert 0 <= uniform.min() and uniform.max() <= 1
    assert abs(uniform.mean().item() - 0.5) < 0.01 and abs(uniform.var().item() - 1 / 12) < 0.003
    logit = RectifiedFlow("logit-normal").sample_time(Draws.of(g, 20000, "cpu"))
    # Logit-normal(0, 1) concentrates mass in the middle: P(0.25 < t < 0.75) = P(|z| < ln 3).
    inside = ((logit > 0.25) & (logit < 0.75)).float().mean().item()
    expected = math.erf(math.log(3) / math.sqrt(2))
    assert abs(inside - expected) < 0.015
    assert logit_normal_density(0.5) == pytest.approx(4 / math.sqrt(2 * math.pi))


def test_time_grid_runs_from_noise_to_data():
    grid = time_grid(4)
    assert grid.dtype == torch.float64
    assert grid.tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]
    shifted = time_grid(4, shift=3.0)
    assert shifted[0] == 1.0 and shifted[-1] == 0.0 and shifted[2] > 0.5


def test_euler_is_exact_for_the_true_rectified_flow_velocity():
    """A point mass x0: the exact velocity is (x - x0) / t, straight lines, so Euler is exact."""
    x0 = torch.tensor(0.3)

    def velocity(x, t, cond):
        return (x - x0) / t.view(-1, *([1] * (x.ndim - 1)))

    noise = torch.randn(3, 1, 2, 2, 2, generator=torch.Generator().manual_seed(1))
    out = euler(velocity, noise, time_grid(5)[:-1])  # stop just before t = 0 (velocity undefined there)
    expected = (1 - 0.2) * x0 + 0.2 * noise
    assert torch.allclose(out, expected, atol=1e-6)


def test_euler_callback_and_zero_velocity_keeps_noise():
    calls = []
    x = torch.randn(2, 1, 3, 3, 3)
    out = euler(lambda x, t, c: torch.zeros_like(x), x, time_grid(3), callback=lambda i, x: calls.append(i))
    assert calls == [0, 1, 2]
    assert torch.equal(out, x)


def test_modes_split_and_channels():
    from voxgen.diffusion.spaces import PixelSpace

    batch = {"bravo": torch.ones(2, 1, 4, 4, 4), "seg": -torch.ones(2, 1, 4, 4, 4)}
    x0, cond = MODES["bravo"].split(batch)
    assert torch.equal(x0, batch["bravo"]) and torch.equal(cond, batch["seg"])
    inputs, vector = MODES["bravo"].network_inputs(x0, cond)
    assert inputs.shape == (2, 2, 4, 4, 4) and vector is None
    assert MODES["bravo"].channels(PixelSpace()) == (2, 1)
    x0, cond = MODES["seg"].split(batch)
    assert cond is None and torch.equal(x0, batch["seg"])
    assert MODES["seg"].channels(PixelSpace()) == (1, 1)
    x0, cond = MODES["bravo_uncond"].split(batch)
    assert cond is None and torch.equal(x0, batch["bravo"]) and MODES["bravo_uncond"].channels(PixelSpace()) == (1, 1)


def test_monai_rectified_flow_uses_the_same_interpolant_and_the_opposite_velocity():
    """docs/conventions.md: MONAI's RFlowScheduler noises as voxgen does but its network is
    trained on x0 - noise, so its velocity is minus voxgen's; with the sign flipped, one of its
    steps is voxgen's Euler step."""
    from monai.networks.schedulers import RFlowScheduler

    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 1, 4, 4, 4, generator=g), torch.randn(2, 1, 4, 4, 4, generator=g)
    scheduler = RFlowScheduler(num_train_timesteps=1000, use_discrete_timesteps=True)
    t = torch.tensor([250, 700])
    noisy = scheduler.add_noise(x0, noise, t)
    assert torch.allclose(noisy, RectifiedFlow().interpolate(x0, noise, t / 1000.0), atol=1e-6)

    scheduler.set_timesteps(num_inference_steps=4)
    start, end = int(scheduler.timesteps[1]), int(scheduler.timesteps[2])  # 750 -> 500

    def velocity(x, time, cond=None):  # voxgen's: noise - x0 along the straight path through x
        return noise - x0

    ours = euler(velocity, noisy, torch.tensor([start / 1000.0, end / 1000.0], dtype=torch.float64))
    theirs, _ = scheduler.step(-(noise - x0), start, noisy, end)
    assert torch.allclose(ours, theirs, atol=1e-6)
    flipped, _ = scheduler.step(noise - x0, start, noisy, end)
    assert not torch.allclose(ours, flipped, atol=1e-2)
