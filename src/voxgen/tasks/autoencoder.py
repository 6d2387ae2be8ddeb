"""`task=autoencoder`: train the compression models behind `space=latent`.

`model.name` picks the family (voxgen.models.autoencoders.AUTOENCODERS); `autoencoder.*` holds the
latent geometry and the loss weights. Each modality of `autoencoder.modalities` is a separate
one-channel sample, so one autoencoder serves every modality of a latent-space run.

The objective of one batch (`AutoencoderTask.terms` lists its parts):

    l1_weight L1 + ssim_weight (1 - SSIM) + kl_weight KL (VQ-VAE: + its quantisation loss, weight 1)
    + perceptual_weight perceptual                                        (with a local weights file)
    + adversarial_weight generator + discriminator                        (from step adversarial_start)

The reconstruction terms follow Rombach et al. 2022 (latent diffusion's first stage) and the patch
adversarial loss Esser et al. 2021. The discriminator trains in the same step from the same scalar: see
`AutoencoderTask.loss`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from voxgen.diffusion.parts import NetworkShape
from voxgen.draws import Draws
from voxgen.errors import ConfigError
from voxgen.models.autoencoders import AUTOENCODERS, check_autoencoder_shape
from voxgen.precision import Autocast, autocast_policy
from voxgen.tasks import Stateless
from voxgen.tasks.autoencoder_losses import (
    MedicalNetPerceptual,
    build_discriminator,
    build_perceptual,
    check_discriminator_shape,
    discriminator_loss,
    generator_loss,
    ssim_loss,
)


class AutoencoderModel(nn.Module):
    """What trains: the autoencoder and, with an adversarial loss, its discriminator (one optimiser, one EMA,
    one checkpoint for both). `forward` is the deterministic reconstruction decode(encode(x))."""

    def __init__(self, autoencoder: nn.Module, discriminator: nn.Module | None = None):
        super().__init__()
        self.autoencoder = autoencoder
        self.discriminator = discriminator

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, D, H, W) -> (B, 1, D, H, W)."""
        return self.autoencoder.decode(self.autoencoder.encode(x))


@dataclass(frozen=True)
class LossWeights:
    l1: float
    ssim: float
    # kl_weight for a KL autoencoder; 1 for a VQ-VAE, whose commitment_cost is its weight already.
    regulariser: float
    perceptual: float
    adversarial: float
    adversarial_start: int


def random_patch(x: torch.Tensor, patch: tuple[int, ...], generator: torch.Generator | None) -> torch.Tensor:
    """(N, C, D, H, W) -> (N, C, d, h, w): one window of size `patch` at a position drawn from `generator`,
    the same for every volume of the batch; `x` itself when `patch` is empty. Convolutional
    autoencoders train on patches (Rombach et al. 2022 train their first stage on crops; so do MONAI's 3D
    tutorials): a step costs a fraction of a whole volume's, and the network sees every position."""
    if not patch:
        return x
    starts = [
        int(torch.randint(0, size - p + 1, (1,), generator=generator, device=x.device)) for size, p in zip(x.shape[2:], patch)
    ]
    d, h, w = starts
    return x[:, :, d : d + patch[0], h : h + patch[1], w : w + patch[2]]


def stack_modalities(batch: dict, modalities: tuple[str, ...]) -> torch.Tensor:
    """{modality: (B, 1, D, H, W)} -> (K * B, 1, D, H, W), modality-major: the first B rows are the first
    modality, so row 0 is the first item's first modality."""
    return torch.cat([batch[m] for m in modalities]).float()


@dataclass
class AutoencoderTask(Stateless):
    # The loss steps the autoencoder and the discriminator separately: no DDP or FSDP wrapper
    # (which only sees calls of the whole model) can keep them in step across processes.
    parallel: ClassVar[bool] = False
    model: AutoencoderModel
    weights: LossWeights
    modalities: tuple[str, ...]
    # device -> context manager entered around every forward (voxgen.precision).
    autocast: Autocast
    # What the network sees: one modality at a time, in and out, on the data's grid.
    network: NetworkShape
    # Training patch [d, h, w] cut from every volume, or () for whole volumes.
    patch: tuple[int, ...] = ()
    # Frozen, from a local file: not part of `model`, so neither trained, averaged nor checkpointed.
    perceptual: MedicalNetPerceptual | None = None

    @property
    def frozen(self) -> tuple[nn.Module, ...]:
        return () if self.perceptual is None else (self.perceptual,)

    def meta_batch(self, batch_size: int) -> tuple[AutoencoderTask, dict]:
        """(this task, meta tensors shaped like one loaded batch {modality: (B, 1, D, H, W)}), for the planner."""
        shape = (batch_size, 1, *self.network.data_shape)
        return self, {m: torch.empty(shape, device="meta") for m in self.modalities}

    def adversarial_at(self, step: int) -> bool:
        """Whether the adversarial terms are on at optimiser step `step`."""
        return self.model.discriminator is not None and step >= self.weights.adversarial_start

    def terms(self, batch: dict, draws: Draws | torch.Generator | None, step: int) -> dict[str, torch.Tensor]:
        """The unweighted float32 scalars of one training batch: l1, ssim (1 - SSIM), regulariser, and when
        on, perceptual, generator and discriminator. Networks run under the precision policy; the losses
        (SSIM's convolutions included) in float32 outside it.

        The patch position and the autoencoder's own noise are drawn once per batch, from the
        batch generator of `draws` (one per process in a torchrun job)."""
        x = stack_modalities(batch, self.modalities)  # (K B, 1, D, H, W)
        generator = Draws.of(draws, len(x) // len(self.modalities), x.device).batch
        x = random_patch(x, self.patch, generator)  # (K B, 1, d, h, w)
        discriminator = self.model.discriminator
        with self.autocast(x.device):
            reconstruction, regulariser = self.model.autoencoder(x, generator)
            extra = {}
            if self.perceptual is not None:
                extra["perceptual"] = self.perceptual(reconstruction, x)
            if self.adversarial_at(step):
                extra["generator"] = generator_loss(discriminator, reconstruction)
                extra["discriminator"] = discriminator_loss(discriminator, x, reconstruction)
        reconstruction = reconstruction.float()
        return {
            "l1": (reconstruction - x).abs().mean(),
            "ssim": ssim_loss(reconstruction, x),
            "regulariser": regulariser.float(),
            **{name: value.float() for name, value in extra.items()},
        }

    def loss(self, batch: dict, draws: Draws | torch.Generator | None, step: int) -> torch.Tensor:
        """The weighted sum of `terms`: one scalar whose single backward trains both networks.

        The generator term evaluates the discriminator with detached parameters (a functional call), so
        it sends gradients through the discriminator into the autoencoder but none into the
        discriminator; the discriminator term sees the reconstruction detached, so it sends gradients
        into the discriminator only. The gradient of the sum is thus, per network, the gradient of that
        network's own objective: the autoencoder's of its reconstruction + weighted generator loss, the
        discriminator's of the discriminator loss, as with two optimisers and two backward passes.
        """
        w, t = self.weights, self.terms(batch, draws, step)
        total = w.l1 * t["l1"] + w.ssim * t["ssim"] + w.regulariser * t["regulariser"]
        if "perceptual" in t:
            total = total + w.perceptual * t["perceptual"]
        if "generator" in t:
            total = total + w.adversarial * t["generator"] + t["discriminator"]
        return total

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Deterministic decode(encode(x)) under the precision policy, float32. (N, 1, D, H, W) -> same."""
        with self.autocast(x.device):
            return self.model(x).float()

    def evaluate(self, batch: dict, draws: Draws | torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(L1 of the deterministic reconstruction, reconstruction, input), each volume (K B, 1, D, H, W)."""
        x = stack_modalities(batch, self.modalities)
        reconstruction = self.reconstruct(x)
        return (reconstruction - x).abs().mean(), reconstruction, x

    def preview(self, batch: dict, seed: int) -> list[np.ndarray]:
        """[reconstruction, real] of the first item's first modality, each (D, H, W); `seed` is unused (the
        reconstruction is deterministic)."""
        x = batch[self.modalities[0]][:1].float()
        with torch.no_grad():
            reconstruction = self.reconstruct(x)
        return [reconstruction[0, 0].cpu().numpy(), x[0, 0].cpu().numpy()]


def loss_weights(cfg) -> LossWeights:
    ae = cfg.autoencoder
    return LossWeights(
        l1=ae.l1_weight,
        ssim=ae.ssim_weight,
        regulariser=1.0 if cfg.model.name == "vqvae" else ae.kl_weight,
        perceptual=ae.perceptual_weight,
        adversarial=ae.adversarial_weight,
        adversarial_start=ae.adversarial_start,
    )


def check_patch(patch, shape: tuple[int, ...], factor: tuple[int, ...]) -> tuple[int, ...]:
    """`autoencoder.patch` as a tuple (() for whole volumes); ConfigError unless it has one size per axis, no
    larger than data.shape and a multiple of the factor."""
    patch = tuple(int(p) for p in patch)
    if not patch:
        return ()
    if len(patch) != 3 or any(p < f or p % f or p > s for p, s, f in zip(patch, shape, factor)):
        raise ConfigError(
            f"autoencoder.patch={list(patch)} must be three sizes [d, h, w], each a multiple of autoencoder.factor="
            f"{list(factor)} and at most data.shape={list(shape)} (or [] for whole volumes)"
        )
    return patch


def build_autoencoder_task(cfg, device: torch.device | str = "cpu", *, training: bool = False) -> AutoencoderTask:
    """The autoencoder task of `cfg` with its networks on `device`; ConfigError for an unknown family, an
    impossible geometry, a data shape the factors or the discriminator cannot take, or a perceptual loss
    without its weights file. `training` refuses nothing beyond that: every buildable config trains."""
    ae_cfg, name = cfg.autoencoder, cfg.model.name
    if name not in AUTOENCODERS:
        raise ConfigError(f"model.name={name!r} is not an autoencoder: task=autoencoder takes one of {', '.join(AUTOENCODERS)}")
    if not ae_cfg.modalities:
        raise ConfigError("autoencoder.modalities is empty: name the modalities to compress, e.g. [bravo, seg]")
    autoencoder = AUTOENCODERS[name](cfg.model, ae_cfg, grad_checkpointing=cfg.training.grad_checkpointing)
    check_autoencoder_shape(cfg.data.shape, autoencoder.factor)
    data_shape = tuple(int(s) for s in cfg.data.shape)
    patch = check_patch(ae_cfg.patch, data_shape, autoencoder.factor)
    discriminator = None
    if ae_cfg.adversarial_weight > 0:
        check_discriminator_shape(patch or data_shape, ae_cfg.discriminator_layers)
        discriminator = build_discriminator(ae_cfg)
    perceptual = build_perceptual(ae_cfg)
    return AutoencoderTask(
        model=AutoencoderModel(autoencoder, discriminator).to(device),
        weights=loss_weights(cfg),
        modalities=tuple(ae_cfg.modalities),
        autocast=autocast_policy(cfg.training.precision),
        network=NetworkShape(1, 1, patch or data_shape, 1, 1, patch or data_shape),
        patch=patch,
        perceptual=None if perceptual is None else perceptual.to(device),
    )
