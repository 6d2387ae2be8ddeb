"""Batch order that can be resumed: a fixed permutation per epoch and a position in it."""

from __future__ import annotations

import numpy as np
import torch


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Index batches of one epoch; a permutation seeded by (seed, epoch).

    Batches are full: the tail that does not fill one is dropped (it comes first in a later
    epoch's different order); a data set smaller than a batch is repeated to fill one.
    """
    order = np.random.default_rng([seed, epoch]).permutation(n).tolist()
    if n < batch_size:
        order = (order * (batch_size // n + 1))[:batch_size]
    return [order[i : i + batch_size] for i in range(0, len(order) - batch_size + 1, batch_size)]


def collate(items: list[dict]) -> dict:
    """[{modality: (1, D, H, W), 'case': id}] -> {modality: (B, 1, D, H, W), 'case': [ids]}."""
    batch = {k: torch.stack([item[k] for item in items]) for k in items[0] if k != "case"}
    batch["case"] = [item["case"] for item in items]
    return batch


def to_device(batch: dict, device) -> dict:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}
