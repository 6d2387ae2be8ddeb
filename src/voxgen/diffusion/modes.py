"""Modes: which modalities are generated and which condition them.

Conditioning is by concatenated channels: the network sees [x_t, condition] along C.

The null condition of classifier-free guidance (Ho & Salimans 2022) is all zeros: masks are
{-1, 1} in model space, so zero is a value no real condition takes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from voxgen.diffusion.shapes import append_dims


@dataclass(frozen=True)
class Mode:
    name: str
    generated: tuple[str, ...]
    conditions: tuple[str, ...]
    summary: str

    @property
    def modalities(self) -> tuple[str, ...]:
        return self.generated + self.conditions

    def split(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        """batch {modality: (B, C', D', H', W')} in the model's space -> x0 (B, G C', ...), condition
        (B, K C', ...) or None."""
        x0 = torch.cat([batch[m] for m in self.generated], dim=1)
        cond = torch.cat([batch[m] for m in self.conditions], dim=1) if self.conditions else None
        return x0, cond

    def model_input(self, x_t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        return x_t if cond is None else torch.cat([x_t, cond.to(x_t.dtype)], dim=1)  # (B, G + K, D, H, W)

    def channels(self, space) -> tuple[int, int]:
        """(in, out) channels of the network in `space`."""
        generated = space.latent_channels * len(self.generated)
        return generated + space.latent_channels * len(self.conditions), generated


def null_condition(cond: torch.Tensor) -> torch.Tensor:
    """The condition that stands for "no condition": zeros shaped like cond (B, K, D, H, W)."""
    return torch.zeros_like(cond)


def drop_conditions(cond: torch.Tensor, probability: float, generator: torch.Generator | None) -> torch.Tensor:
    """cond (B, K, D, H, W) with each sample's condition replaced by the null one with `probability`;
    the draw comes from `generator`, so a seeded run drops the same samples again."""
    keep = torch.rand(cond.shape[0], generator=generator, device=cond.device) >= probability  # (B,)
    return cond * append_dims(keep, cond.ndim).to(cond.dtype)


MODES = {
    "bravo": Mode("bravo", ("bravo",), ("seg",), "generate the BRAVO image given the tumour mask"),
    "seg": Mode("seg", ("seg",), (), "generate tumour masks unconditionally"),
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
    return MODES[cfg.mode]
