"""Tasks: what the trainer trains. A task supplies the network, the loss of one batch, the
validation measure and a preview; the trainer, the step and the planner never branch on the
task's name (`task=` in the config picks one from TASKS).

- `diffusion` (voxgen.diffusion.parts.Parts): a space, a mode and a strategy around a network.
- `autoencoder` (voxgen.tasks.autoencoder): the compression models behind `space=latent`.
- `diffrs-head` (voxgen.tasks.diffrs_head): the discriminator head of DiffRS sampling, on a trained
  diffusion run (`voxgen train --run RUN`).
- `translate` (voxgen.tasks.translate): paired volume-to-volume latent diffusion (CT enhancement,
  seed 003): the target of a pair given its source.
- `regress` (voxgen.tasks.regress): direct regression of one modality from another (X-ray to CT,
  seed 004), with an L1 or MSE loss.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from typing import Protocol

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from voxgen.draws import Draws
from voxgen.errors import ConfigError
from voxgen.precision import Autocast


class Task(Protocol):
    # Everything that trains: the optimiser, the EMA and the checkpoints cover its parameters.
    model: nn.Module
    # device -> context manager entered around every forward (voxgen.precision).
    autocast: Autocast
    # The data modalities a batch must hold.
    modalities: tuple[str, ...]
    # What the network sees (voxgen.diffusion.parts.NetworkShape): channels in and out, its grid.
    network: object
    # Frozen networks that run in the step on the training device (their weights take memory too).
    frozen: tuple[nn.Module, ...]
    # Whether the loss runs the model only as `model(...)`, so the processes of a torchrun job can
    # train it wrapped by DDP or sharded by FSDP (voxgen.training.distributed).
    parallel: bool

    def loss(self, batch: dict, draws: Draws | torch.Generator | None, step: int) -> torch.Tensor:
        """The scalar training objective of one batch {modality: (B, 1, D, H, W)} at optimiser
        step `step` (the step about to be taken, from 0). Its randomness comes from `draws` (one
        generator per sample, `voxgen.draws`); a generator seeds them, None uses torch's own."""

    def evaluate(self, batch: dict, draws: Draws | torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(validation loss, prediction, target) of one batch, without gradients by the caller:
        the loss that picks the best checkpoint, and the two tensors whose spread the collapse
        guard compares."""

    def scores(self, prediction: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
        """Measures of one validation batch's `evaluate` output beyond the loss, logged as
        val_<name> (e.g. PSNR of a regression); {} for tasks whose loss says it all."""

    def preview(self, batch: dict, seed: int) -> list[np.ndarray]:
        """Volumes (D, H, W) to show side by side, the model's first: a sample or a reconstruction
        next to the real case of `batch` (its first item)."""

    def meta_batch(self, batch_size: int) -> tuple[Task, dict]:
        """(the task to step, meta tensors shaped like one loaded batch): what the memory planner traces."""

    def with_model(self, model: nn.Module) -> Task:
        """The same task around another copy of the network (the EMA weights)."""

    def prepare(self, train_set: Dataset, val_set: Dataset) -> tuple[Dataset, Dataset]:
        """Called once at every start of training, after every case was read: estimate what the
        task learns from the training split before the first step (a space's statistics) and
        return the data sets the steps read (the given ones, or their encoded form)."""

    def state_dict(self) -> dict:
        """What `prepare` estimated, as JSON-able data: kept in every checkpoint's state."""

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict` (opening a run for sampling or evaluation)."""


class Stateless:
    """The Task protocol's methods for a dataclass task around `model` that estimates nothing
    before training (the autoencoder and translate tasks inherit them)."""

    def with_model(self, model: nn.Module):
        return dataclasses.replace(self, model=model)

    def scores(self, prediction: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
        """No measures beyond the loss."""
        return {}

    def prepare(self, train_set: Dataset, val_set: Dataset) -> tuple[Dataset, Dataset]:
        """Nothing to estimate: the steps read the data sets as they are."""
        return train_set, val_set

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


# task name -> "module:builder"; a builder is `build(cfg, device, *, training: bool, model=None) -> Task`,
# where training=True also refuses configs that can be planned but not trained, and `model` replaces
# the registry's network (`voxgen plan --factory`; tasks that cannot take one refuse it). Imported on use: the
# autoencoder task pulls in its networks and losses only when asked for.
TASKS = {
    "diffusion": "voxgen.diffusion.parts:build_diffusion_task",
    "autoencoder": "voxgen.tasks.autoencoder:build_autoencoder_task",
    "diffrs-head": "voxgen.tasks.diffrs_head:build_diffrs_head_task",
    "translate": "voxgen.tasks.translate:build_translate_task",
    "regress": "voxgen.tasks.regress:build_regress_task",
}


def build_task(cfg, device: torch.device | str = "cpu", *, training: bool = False, model: nn.Module | None = None) -> Task:
    """The task `cfg.task` names, with its network on `device` (`model` in place of the registry's)."""
    module, _, name = TASKS[cfg.task].partition(":")
    builder = getattr(importlib.import_module(module), name)
    if model is None:
        return builder(cfg, device, training=training)
    if "model" not in inspect.signature(builder).parameters:
        raise ConfigError(f"task={cfg.task} trains only its own networks: a network from elsewhere cannot replace them")
    return builder(cfg, device, training=training, model=model)
