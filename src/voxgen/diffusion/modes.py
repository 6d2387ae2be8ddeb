"""Modes: which modalities are generated and what conditions them.

Two kinds of condition reach the network:

- **Volumes** (`Mode.conditions`): modalities of the same case, concatenated with x_t along C
  (bravo: the tumour mask conditions the BRAVO image).
- **A size-bin vector** (`Mode.size_bins`): the 7 tumour counts per size bin of the generated
  mask (`voxgen.data.tumour_bins`), scaled to [0, 1] by the count cap. `embedding` adds an
  embedding of it to the network's time embedding (FiLM on the time embedding, as the seeds'
  seg_conditioned); `channels` gives it as 7 constant input channels (seg_conditioned_input).

The null condition of classifier-free guidance (Ho & Salimans 2022) is, per kind, a value no real
condition takes: zeros for volume conditions (masks are {-1, 1} and images are never exactly 0
everywhere), and -1 in every bin for size-bin vectors (real scaled counts lie in [0, 1]; a vector
of zeros means "no tumours" and is a real request).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from voxgen.data.tumour_bins import MAX_COUNT, NUM_BINS, SIZE_BINS
from voxgen.diffusion.shapes import append_dims
from voxgen.draws import Draws
from voxgen.errors import ConfigError

# The null size-bin vector's value in every bin (scaled counts lie in [0, 1]).
NULL_SIZE_BINS = -1.0


@dataclass(frozen=True)
class Mode:
    name: str
    generated: tuple[str, ...]
    conditions: tuple[str, ...]
    summary: str
    # How the size-bin vector of the generated mask conditions the network: None (not at all),
    # "embedding" (added to the time embedding) or "channels" (7 constant input channels).
    size_bins: str | None = None

    @property
    def modalities(self) -> tuple[str, ...]:
        """The modality files a batch is read from."""
        return self.generated + self.conditions

    @property
    def conditional(self) -> bool:
        return bool(self.conditions) or self.size_bins is not None

    @property
    def vector_size(self) -> int:
        """Length of the vector the network takes next to its time (0: none)."""
        return NUM_BINS if self.size_bins == "embedding" else 0

    def split(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        """batch {modality: (B, C', D', H', W')} in the model's space -> x0 (B, G C', ...) and the
        condition: volumes (B, K C', ...), the scaled size-bin vector (B, 7), or None."""
        x0 = torch.cat([batch[m] for m in self.generated], dim=1)
        if self.size_bins is not None:
            return x0, scale_counts(batch[SIZE_BINS]).to(x0.device)
        cond = torch.cat([batch[m] for m in self.conditions], dim=1) if self.conditions else None
        return x0, cond

    def network_inputs(self, x_t: torch.Tensor, cond: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(what the network sees along C, the vector it takes next to its time or None)."""
        if cond is None:
            return x_t, None
        if self.size_bins == "embedding":
            return x_t, cond.to(x_t.dtype)
        if self.size_bins == "channels":
            cond = append_dims(cond, x_t.ndim).expand(-1, -1, *x_t.shape[2:])  # (B, 7, D, H, W)
        return torch.cat([x_t, cond.to(x_t.dtype)], dim=1), None  # (B, G + K, D, H, W)

    def channels(self, space) -> tuple[int, int]:
        """(in, out) channels of the network in `space`."""
        generated = space.latent_channels * len(self.generated)
        conditions = space.latent_channels * len(self.conditions) + (NUM_BINS if self.size_bins == "channels" else 0)
        return generated + conditions, generated

    def null_condition(self, cond: torch.Tensor) -> torch.Tensor:
        """The condition that stands for "no condition", shaped like `cond`."""
        if self.size_bins is not None:
            return torch.full_like(cond, NULL_SIZE_BINS)
        return torch.zeros_like(cond)

    def drop_conditions(self, cond: torch.Tensor, probability: float, draws: Draws) -> torch.Tensor:
        """cond with each sample's condition replaced by the null one with `probability`; the draw
        comes from each sample's generator, so a seeded run drops the same samples again."""
        keep = draws.uniform().to(cond.device) >= probability  # (B,)
        return torch.where(append_dims(keep, cond.ndim), cond, self.null_condition(cond))


def scale_counts(counts: torch.Tensor) -> torch.Tensor:
    """Tumour counts per bin (B, 7) -> float32 in [0, 1] (divided by the count cap)."""
    return counts.to(torch.float32) / MAX_COUNT


MODES = {
    "bravo": Mode("bravo", ("bravo",), ("seg",), "generate the BRAVO image given the tumour mask"),
    "seg": Mode("seg", ("seg",), (), "generate tumour masks unconditionally"),
    "seg_conditioned": Mode(
        "seg_conditioned",
        ("seg",),
        (),
        "generate tumour masks given tumour counts per size bin (an embedding added to the time embedding)",
        size_bins="embedding",
    ),
    "seg_conditioned_input": Mode(
        "seg_conditioned_input",
        ("seg",),
        (),
        "generate tumour masks given tumour counts per size bin (7 constant input channels)",
        size_bins="channels",
    ),
    # Stage 1 of the seeds' ControlNet recipe: a BRAVO model without a condition, to which a
    # ControlNet adds the mask afterwards.
    "bravo_uncond": Mode("bravo_uncond", ("bravo",), (), "generate the BRAVO image unconditionally"),
    # The seeds' name for bravo in a latent space: the BRAVO code generated from the mask's code
    # (8 -> 4 channels with a 4-channel latent). The same mode as bravo, under the name their
    # configs and scripts use.
    "bravo_seg_cond": Mode(
        "bravo_seg_cond", ("bravo",), ("seg",), "generate the BRAVO code given the tumour mask's code (the seeds' LDM mode)"
    ),
}


def build_mode(cfg) -> Mode:
    """The mode `cfg.mode` names, with the modality names `mode.generated` / `mode.conditions`
    give, checked against `data.modalities` and `data.masks` (ConfigError, one line)."""
    section = cfg.mode
    if section.name not in MODES:
        raise ConfigError(f"mode={section.name!r} is not a mode; use one of {', '.join(sorted(MODES))}")
    mode = MODES[section.name]
    generated = mode.generated if section.generated is None else tuple(str(m) for m in section.generated)
    conditions = mode.conditions if section.conditions is None else tuple(str(m) for m in section.conditions)
    for key, names, default in (("generated", generated, mode.generated), ("conditions", conditions, mode.conditions)):
        if len(names) != len(default):
            raise ConfigError(
                f"mode.{key}={list(names)} names {len(names)} modalities; mode={mode.name} {key.rstrip('s')}s "
                f"{len(default)} ({', '.join(default) or 'none'})"
            )
    known, masks = [str(m) for m in cfg.data.modalities], [str(m) for m in cfg.data.masks]
    for name in generated + conditions:
        if name not in known:
            raise ConfigError(f"mode={mode.name}: modality {name!r} is not in data.modalities {known}")
    if len(set(generated + conditions)) != len(generated + conditions):
        raise ConfigError(f"mode={mode.name}: a modality is named twice in {list(generated + conditions)}")
    if mode.size_bins is not None and generated[0] not in masks:
        raise ConfigError(
            f"mode={mode.name} counts tumours in the generated {generated[0]!r}, which is not in data.masks {masks}"
        )
    return replace(mode, generated=generated, conditions=conditions)


def saved_mode(data: dict) -> Mode | None:
    """The mode of a run's saved config (plain data: `mode: NAME` or `mode: {name, generated,
    conditions}`), as that run was validated when it trained; None for an unknown name."""
    section = data.get("mode", "bravo")
    section = {"name": section} if not isinstance(section, dict) else section
    mode = MODES.get(section.get("name"))
    if mode is None:
        return None
    generated, conditions = section.get("generated"), section.get("conditions")
    return replace(
        mode,
        generated=mode.generated if generated is None else tuple(generated),
        conditions=mode.conditions if conditions is None else tuple(conditions),
    )


def mask_modality(cfg, mode: Mode) -> str | None:
    """The first of the mode's modalities that is a mask (data.masks), or None."""
    return next((m for m in mode.modalities if m in cfg.data.masks), None)
