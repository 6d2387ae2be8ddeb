"""Generate volumes from a trained model: noise per seed -> sampler -> decoded volumes.

`generate` wraps the network three times before a sampler sees it: as a prediction function
of the strategy's time (`prediction_fn`), counted (`CountedModel`, so the reported number of
function evaluations is what ran, adaptive solvers' rejected steps included), and guided
(`guided`, classifier-free guidance for conditional modes).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from voxgen.diffusion.noise import seeded_generators
from voxgen.diffusion.samplers import SolverSpec, prepare
from voxgen.diffusion.spaces import decode_channels
from voxgen.errors import ConfigError


@dataclass
class Generation:
    """volumes: (N, C, D, H, W) decoded, on the CPU. nfe: network evaluations per volume (every
    volume of a batch is evaluated together, so this is the number of network calls a batch
    took; with classifier-free guidance both calls of a step count). Fixed-step samplers give
    every batch the same count; adaptive ones may differ per batch, and then nfe is the mean
    over volumes, rounded. seconds_per_volume: wall time of the whole run (noise, sampling,
    decoding) divided by N."""

    volumes: torch.Tensor
    nfe: int
    seconds_per_volume: float


def prediction_fn(parts) -> Callable:
    """The network as f(x, t, cond) for the samplers: the strategy maps sampler time t (rflow:
    [0, 1]; ddpm: timestep index) to the network's time; returns float32 predictions."""

    from voxgen.diffusion.parts import network_output

    def prediction(x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        with parts.autocast(x.device):
            out = network_output(parts, x, t, cond)
        return out.float()

    return prediction


class CountedModel:
    """f(x, t, cond) that counts its calls in `calls`."""

    def __init__(self, fn: Callable):
        self.fn = fn
        self.calls = 0

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        self.calls += 1
        return self.fn(x, t, cond)


def guided(fn: Callable, scale: float, null_condition: Callable[[torch.Tensor], torch.Tensor]) -> Callable:
    """Classifier-free guidance (Ho & Salimans 2022): f_null + s (f_cond - f_null), with the mode's
    null condition (`Mode.null_condition`). s = 1 is the plain conditional model, one call per
    evaluation; any other s makes two calls."""
    if scale == 1.0:
        return fn

    def guided_fn(x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        conditional = fn(x, t, cond)
        unconditional = fn(x, t, null_condition(cond))
        return unconditional + scale * (conditional - unconditional)

    return guided_fn


@torch.no_grad()
def generate(
    parts,
    seeds: Sequence[int],
    cond: torch.Tensor | None = None,
    *,
    solver: SolverSpec,
    batch_size: int = 4,
    guidance_scale: float = 1.0,
    progress: Callable[[int], None] | None = None,
) -> Generation:
    """Sample len(seeds) codes of `parts.network.sample_shape` (C, D', H', W') in the model's space
    and decode them to volumes (N, G, D, H, W), G the mode's generated modalities; `cond`
    (N, K C', D', H', W') are the conditions encoded in the model's space. Sample i uses a CPU
    generator seeded with seeds[i] for its initial noise and any noise the sampler adds, so it
    does not depend on the batch it shares (except for adaptive solvers, whose step control
    sees the batch)."""
    if not seeds:
        raise ValueError("generate needs at least one seed")
    if solver.name == "diffrs":
        # Its discriminator head is another run's: `diffrs.sample_with_head` binds it.
        raise ConfigError(
            f"solver '{solver}' needs the run's DiffRS head: sample with `voxgen sample --run RUN --solver {solver}` "
            "(docs/diffrs.md)"
        )
    if guidance_scale != 1.0 and cond is None:
        raise ConfigError(
            f"guidance scale {guidance_scale:g} needs a conditional mode; mode {parts.mode.name!r} has no condition (use 1)"
        )
    sampler, grid = prepare(solver, parts.strategy)
    latent_shape = parts.network.sample_shape
    parts.model.eval()
    device = next(parts.model.parameters()).device
    started = time.perf_counter()
    out, evaluations = [], 0
    for start in range(0, len(seeds), batch_size):
        chunk = seeds[start : start + batch_size]
        generators = seeded_generators(chunk)
        # (b, C, D, H, W); drawn on the CPU so a seed gives the same volume on every device
        x = torch.stack([torch.randn(tuple(latent_shape), generator=g) for g in generators]).to(device)
        c = cond[start : start + len(chunk)].to(device) if cond is not None else None
        counted = CountedModel(prediction_fn(parts))
        x = sampler(guided(counted, guidance_scale, parts.mode.null_condition), x, grid, cond=c, generator=generators)
        out.append(decode_channels(parts.space, x, parts.mode.generated).cpu())
        evaluations += counted.calls * len(chunk)
        if progress is not None:
            progress(len(chunk))
    seconds = time.perf_counter() - started
    return Generation(torch.cat(out), round(evaluations / len(seeds)), seconds / len(seeds))
