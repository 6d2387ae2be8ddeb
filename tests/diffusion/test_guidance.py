"""Classifier-free guidance: condition dropout in training, guided sampling."""

import pytest
import torch
from torch import nn

from voxgen.diffusion.generate import generate, prediction_fn
from voxgen.diffusion.modes import MODES
from voxgen.diffusion.parts import NetworkShape, Parts, build_parts
from voxgen.diffusion.rflow_samplers import euler, time_grid
from voxgen.diffusion.samplers import parse_solver
from voxgen.diffusion.spaces import PixelSpace
from voxgen.diffusion.strategies import RectifiedFlow
from voxgen.draws import Draws
from voxgen.errors import ConfigError
from voxgen.precision import autocast_policy

from .tiny import SHAPE, learnable_batch, tiny_cfg


def test_drop_conditions_nulls_whole_samples_with_the_given_probability():
    cond = torch.where(torch.rand(4000, 2, 2, 2, 2, generator=torch.Generator().manual_seed(0)) > 0.5, 1.0, -1.0)
    dropped = MODES["bravo"].drop_conditions(cond, 0.3, Draws.of(torch.Generator().manual_seed(1), 4000, "cpu"))
    null = (dropped == 0).flatten(1).all(dim=1)  # (B,)
    kept = (dropped == cond).flatten(1).all(dim=1)
    assert torch.all(null ^ kept)  # each sample is either untouched or entirely null
    assert abs(null.float().mean().item() - 0.3) < 0.03
    again = MODES["bravo"].drop_conditions(cond, 0.3, Draws.of(torch.Generator().manual_seed(1), 4000, "cpu"))
    assert torch.equal(again, dropped)  # the same generator drops the same samples


class ConditionSpy(nn.Module):
    """Records the condition channel the network is given; predicts zeros."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(()))
        self.seen = []

    def forward(self, x, t):
        self.seen.append(x[:, 1:].detach().clone())  # (B, K, D, H, W): the condition channels
        return self.weight * x[:, :1]


def _spy_parts(cond_dropout):
    network = NetworkShape(2, 1, (2, 2, 2), 2, 1)
    return Parts(
        ConditionSpy(), RectifiedFlow(cond_dropout=cond_dropout), MODES["bravo"], PixelSpace(), network, autocast_policy("fp32")
    )


def test_the_loss_drops_conditions_in_training_only_and_reproducibly():
    batch = {"bravo": torch.zeros(64, 1, 2, 2, 2), "seg": torch.ones(64, 1, 2, 2, 2)}
    parts = _spy_parts(0.5)
    parts.loss(batch, torch.Generator().manual_seed(3))
    parts.loss(batch, torch.Generator().manual_seed(3))
    first, second = parts.model.seen
    null = (first == 0).flatten(1).all(dim=1)
    assert 16 < int(null.sum()) < 48 and torch.all(first[~null] == 1)
    assert torch.equal(first, second)
    parts.model.eval()  # validation losses see every condition
    parts.loss(batch, torch.Generator().manual_seed(3))
    assert torch.all(parts.model.seen[-1] == 1)


def test_without_dropout_the_random_stream_is_unchanged():
    batch = {"bravo": torch.randn(4, 1, 2, 2, 2), "seg": torch.ones(4, 1, 2, 2, 2)}
    with_spy, without = _spy_parts(0.0), _spy_parts(0.0)
    d1, d2, d3 = (Draws.for_step(5, 0, 4, "cpu") for _ in range(3))
    with_spy.loss(batch, d1)
    without.loss(batch, d2)

    def same(a: Draws, b: Draws) -> bool:
        return all(torch.equal(x.get_state(), y.get_state()) for x, y in zip(a.samples, b.samples))

    assert same(d1, d2)
    # Each sample's stream is the one of its noise then its time: nothing else was drawn.
    d3.normal((1, 2, 2, 2))
    RectifiedFlow().sample_time(d3)
    assert same(d1, d3)


@pytest.fixture(scope="module")
def conditional_parts():
    torch.manual_seed(0)
    parts = build_parts(tiny_cfg("mode=bravo"))
    with torch.no_grad():  # the output layer starts at zero; give every weight a value
        for p in parts.model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return parts


def test_guidance_scale_one_is_the_plain_conditional_sample(conditional_parts):
    parts = conditional_parts
    cond = learnable_batch(2)["seg"]
    result = generate(parts, [3, 4], cond, solver=parse_solver("euler:3"), guidance_scale=1.0, batch_size=2)
    noise = torch.stack([torch.randn(1, *SHAPE, generator=torch.Generator().manual_seed(s)) for s in (3, 4)])
    with torch.no_grad():
        plain = euler(prediction_fn(parts), noise, time_grid(3), cond=cond)
    assert torch.equal(result.volumes, plain)
    assert result.nfe == 3


def test_guidance_costs_two_calls_per_step_and_is_affine_in_the_scale(conditional_parts):
    parts = conditional_parts
    cond = learnable_batch(2)["seg"]

    def sample(scale, condition=cond, solver=parse_solver("euler:1")):
        return generate(parts, [3, 4], condition, solver=solver, guidance_scale=scale, batch_size=2)

    guided = sample(3.0, solver=parse_solver("euler:3"))
    assert guided.nfe == 6
    assert not torch.allclose(guided.volumes, sample(1.0, solver=parse_solver("euler:3")).volumes, atol=1e-4)
    # Scale 0 is the model under the null condition, exactly.
    assert torch.equal(sample(0.0).volumes, sample(1.0, condition=torch.zeros_like(cond)).volumes)
    # One Euler step is affine in the guided prediction, hence in the scale.
    s0, s1, s2 = (sample(s).volumes for s in (0.0, 1.0, 2.0))
    assert torch.allclose(s2 - s1, s1 - s0, atol=1e-5)
    assert (s1 - s0).abs().max() > 1e-3


def test_guidance_needs_a_conditional_mode():
    torch.manual_seed(0)
    parts = build_parts(tiny_cfg("mode=seg"))
    with pytest.raises(ConfigError, match="needs a conditional mode"):
        generate(parts, [0], None, solver=parse_solver("euler:2"), guidance_scale=2.0)
