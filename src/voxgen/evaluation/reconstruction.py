"""How well a compression model reconstructs held-out volumes, against the simplest compression of
the same size: trilinear down-sampling by the same factor, then trilinear up-sampling.

PSNR and 3D SSIM are computed per volume in model space (images in [-1, 1], data range 2) with
`voxgen.evaluation.pixel`, and averaged over the split's cases, per modality. The baseline keeps
(D/fD) (H/fH) (W/fW) values per volume: a latent_channels-channel code of the same grid holds
latent_channels times as many numbers, which the table says next to it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from voxgen.data.dataset import VolumeDataset
from voxgen.data.layout import Modalities
from voxgen.evaluation.pixel import psnr, ssim

DATA_RANGE = 2.0  # model space: [-1, 1]


@dataclass(frozen=True)
class ReconstructionRow:
    method: str  # "autoencoder" or "trilinear"
    modality: str
    psnr: float  # dB, mean over volumes
    ssim: float  # mean over volumes
    values_per_volume: int  # numbers the compressed form keeps for one volume


def trilinear_round_trip(x: torch.Tensor, factor: Sequence[int]) -> torch.Tensor:
    """(B, 1, D, H, W) -> down-sampled by `factor` per axis (area average) and back up (trilinear)."""
    small = F.interpolate(x, size=[s // f for s, f in zip(x.shape[2:], factor, strict=True)], mode="area")
    return F.interpolate(small, size=list(x.shape[2:]), mode="trilinear", align_corners=False)


def _scores(pred: torch.Tensor, target: torch.Tensor, win_size: int) -> tuple[float, float]:
    return float(np.mean(psnr(pred, target, data_range=DATA_RANGE))), float(
        np.mean(ssim(pred, target, data_range=DATA_RANGE, win_size=win_size))
    )


@torch.no_grad()
def reconstruction_rows(
    task, data_root, split: str, shape: Sequence[int], device, batch_size: int = 4, layout: Modalities = Modalities()
) -> list[ReconstructionRow]:
    """Rows for every modality of an autoencoder task on `split`: the autoencoder (its
    deterministic reconstruction) and the trilinear baseline by the autoencoder's factor."""
    network = task.model.autoencoder
    factor = tuple(int(f) for f in network.factor)
    dataset = VolumeDataset(data_root, split, task.modalities, shape, layout=layout)
    # SSIM's usual 11-voxel window, shrunk to the largest odd size that fits the smallest axis.
    win_size = min(11, min(shape) - (1 - min(shape) % 2))
    grid = math.prod(s // f for s, f in zip(shape, factor, strict=True))
    rows = []
    for modality in task.modalities:
        volumes = torch.stack([dataset[i][modality] for i in range(len(dataset))])  # (N, 1, D, H, W)
        coded = torch.cat(
            [task.reconstruct(volumes[i : i + batch_size].to(device)).cpu() for i in range(0, len(volumes), batch_size)]
        )
        rows.append(
            ReconstructionRow("autoencoder", modality, *_scores(coded, volumes, win_size), grid * network.latent_channels)
        )
        rows.append(
            ReconstructionRow("trilinear", modality, *_scores(trilinear_round_trip(volumes, factor), volumes, win_size), grid)
        )
    return rows


def reconstruction_table(task, data_root, split: str, shape: Sequence[int], device, layout: Modalities = Modalities()) -> str:
    """`reconstruction_rows` as a Markdown table."""
    rows = reconstruction_rows(task, data_root, split, shape, device, layout=layout)
    lines = ["| method | modality | PSNR (dB) | SSIM | values per volume |", "|---|---|---|---|---|"]
    lines += [f"| {r.method} | {r.modality} | {r.psnr:.2f} | {r.ssim:.4f} | {r.values_per_volume:,} |" for r in rows]
    return "\n".join(lines)
