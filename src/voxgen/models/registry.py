"""Model registry: name -> factory. It also drives the CLI's choices (`voxgen models`).

A factory takes the model section of the config, the channel counts and the spatial shape
the network sees, and the size of a condition vector (`vector_size`, 0 = none), and returns an
`nn.Module` with `forward(x, t[, vector]) -> prediction` where x is (B, C_in, D, H, W), t is
(B,) model time and vector (B, vector_size) is added to the time embedding (FiLM through the
embedding, `voxgen.models.blocks.VectorEmbedding`).

This module imports no family, so families never import it back: the package
`voxgen.models` (its `__init__`) imports the families and registers each with one line.
Python runs that `__init__` before any `voxgen.models.*` module, so every importer of
`voxgen.models.registry` sees all families.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from voxgen.errors import ConfigError

Factory = Callable[..., nn.Module]


# What a family computes: "denoiser", f(x, t[, vector]) as above, trained by the diffusion task;
# "regression", f(x) of another shape (X-ray images -> CT volume), trained by task=regress.
KINDS = ("denoiser", "regression")


@dataclass(frozen=True)
class ModelEntry:
    name: str
    factory: Factory
    summary: str
    kind: str = "denoiser"


MODELS: dict[str, ModelEntry] = {}


def register(name: str, summary: str, kind: str = "denoiser") -> Callable[[Factory], Factory]:
    """Decorator (or call `register(name, summary)(factory)`) adding `factory` under `name`."""
    if kind not in KINDS:
        raise ValueError(f"register({name!r}): kind {kind!r} is not one of {KINDS}")

    def wrap(factory: Factory) -> Factory:
        MODELS[name] = ModelEntry(name, factory, summary, kind)
        return factory

    return wrap


def build_model(
    model_cfg, in_channels: int, out_channels: int, shape: Sequence[int], grad_checkpointing: bool, vector_size: int = 0
) -> nn.Module:
    """Build the network named by `model_cfg.name` for inputs of `shape` [D, H, W]; with
    `vector_size` > 0 it also takes a condition vector (B, vector_size) next to its time."""
    if model_cfg.name not in MODELS:
        raise ConfigError(f"model.name={model_cfg.name!r} is not one of {', '.join(sorted(MODELS))}")
    return MODELS[model_cfg.name].factory(
        model_cfg,
        in_channels=in_channels,
        out_channels=out_channels,
        shape=tuple(shape),
        grad_checkpointing=grad_checkpointing,
        vector_size=vector_size,
    )


def names_of(kind: str) -> list[str]:
    """The registered families of one kind, in registration order."""
    return [name for name, entry in MODELS.items() if entry.kind == kind]


def count_parameters(model: nn.Module) -> int:
    """Number of parameter values (shared parameters once), on any device including meta."""
    return sum(p.numel() for p in model.parameters())


def build_on_meta(model_cfg, in_channels: int, out_channels: int, shape: Sequence[int]) -> nn.Module:
    """Build without allocating weights (parameter counts and memory plans of huge models)."""
    with torch.device("meta"):
        return build_model(model_cfg, in_channels, out_channels, shape, grad_checkpointing=False)
