"""A sampler step costs one network forward pass: the wrapping around the network is free."""

import statistics
import time

import torch

from voxgen.diffusion.generate import CountedModel, guided, prediction_fn
from voxgen.diffusion.parts import build_parts
from voxgen.diffusion.rflow_samplers import euler, time_grid

from .tiny import tiny_cfg

STEPS = 3


def _seconds(fn) -> float:
    """CPU seconds of this process: unlike wall time, it does not count the time other
    processes on the same cores hold them."""
    started = time.process_time()
    fn()
    return time.process_time() - started


def test_an_euler_step_costs_at_most_1_2_forward_passes():
    # Runs on one thread (conftest.py), so CPU time is the work of this test alone.
    torch.manual_seed(0)
    parts = build_parts(tiny_cfg("mode=bravo", "data.shape=[16,16,16]"))
    parts.model.eval()
    x = torch.randn(2, 1, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    cond = torch.ones(2, 1, 16, 16, 16)
    model_input, model_time = parts.mode.network_inputs(x, cond)[0], parts.strategy.model_time(torch.full((2,), 0.5))
    # What generate hands a sampler: counted, guided (scale 1), under autocast.
    wrapped = guided(CountedModel(prediction_fn(parts)), 1.0, parts.mode.null_condition)
    grid = time_grid(STEPS)

    def forwards():
        with torch.no_grad():
            for _ in range(STEPS):
                parts.model(model_input, model_time)

    def sampling():
        with torch.no_grad():
            euler(wrapped, x, grid, cond=cond)

    for _ in range(2):  # warm-up: allocator, first-call dispatch
        forwards()
        sampling()
    # Paired, back-to-back measurements of equal work: a busy neighbour on the shared cores
    # slows both halves of a pair alike, and the median drops the pairs it did not.
    ratios = [_seconds(sampling) / _seconds(forwards) for _ in range(5)]
    assert statistics.median(ratios) <= 1.2, sorted(ratios)
