"""`voxgen evaluate` of a `task=regress` run (X-ray to CT): the held-out cases reconstructed by the
trained network (EMA weights), by the same network untrained (the run's initial weights: its seed),
and by a baseline that ignores the input (the mean training volume), each scored against the real
volume by PSNR and 3D SSIM.

Scores are taken in model space, whose range [-1, 1] stands for `data.intensity_range` under
`data.intensity=fixed` (HU [-1024, 3071] by default): PSNR = 10 log10(2^2 / MSE), i.e. PSNR over
that HU range; SSIM with a 3D Gaussian window (voxgen.evaluation.pixel.ssim) over the same range.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from voxgen.data.batches import collate, to_device
from voxgen.data.dataset import VolumeDataset
from voxgen.evaluation.pixel import psnr, ssim
from voxgen.files import write_atomic
from voxgen.tasks.regress import DATA_RANGE, SSIM_WINDOW

METHODS = ("trained", "untrained", "mean volume")


@dataclass(frozen=True)
class RegressRow:
    case: str
    method: str
    psnr_db: float
    ssim: float


def mean_volume(cfg, target: str) -> torch.Tensor:
    """(1, 1, D, H, W): the voxel-wise mean of the training split's target volumes in model space."""
    train = VolumeDataset.of(cfg.data, "train", (target,))
    return torch.stack([train[i][target] for i in range(len(train))]).mean(dim=0, keepdim=True)


@torch.no_grad()
def score_cases(tasks: dict, dataset: VolumeDataset, baseline: torch.Tensor, device) -> list[RegressRow]:
    """One row per case and method: `tasks` {method: task} predict, the baseline is the same volume for all."""
    rows = []
    for i in range(len(dataset)):
        item = dataset[i]
        batch = to_device(collate([item]), device)
        first = next(iter(tasks.values()))
        target = batch[first.target].float().cpu()
        predictions = {m: task.predict(batch).cpu() for m, task in tasks.items()}
        predictions["mean volume"] = baseline
        for method in METHODS:
            pred = predictions[method].clamp(-1.0, 1.0)
            rows.append(
                RegressRow(
                    item["case"],
                    method,
                    float(psnr(pred, target, data_range=DATA_RANGE)[0]),
                    float(ssim(pred, target, data_range=DATA_RANGE, win_size=SSIM_WINDOW)[0]),
                )
            )
    return rows


def mean_rows(rows: Sequence[RegressRow]) -> list[RegressRow]:
    out = []
    for method in METHODS:
        mine = [r for r in rows if r.method == method]
        out.append(RegressRow("mean", method, float(np.mean([r.psnr_db for r in mine])), float(np.mean([r.ssim for r in mine]))))
    return out


def to_markdown(rows: Sequence[RegressRow], title: str, notes: Sequence[str]) -> str:
    lines = [f"## {title}", "", "| case | method | PSNR (dB) | SSIM 3D |", "|---|---|---:|---:|"]
    for r in rows:
        case = f"**{r.case}**" if r.case == "mean" else r.case
        lines.append(f"| {case} | {r.method} | {r.psnr_db:.2f} | {r.ssim:.4f} |")
    return "\n".join([*lines, "", *(f"- {n}" for n in notes)]) + "\n"


def to_csv(rows: Sequence[RegressRow]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["case", "method", "psnr_db", "ssim"])
    writer.writerows([r.case, r.method, repr(r.psnr_db), repr(r.ssim)] for r in rows)
    return buf.getvalue()


def describe(cfg, split: str) -> list[str]:
    lo, hi = (float(v) for v in cfg.data.intensity_range)
    scale = f"HU [{lo:g}, {hi:g}]" if cfg.data.intensity == "fixed" else "the volumes' own [-1, 1] scaling"
    return [
        f"Cases of the '{split}' split. trained: the run's EMA weights. untrained: the same network at the run's "
        f"initial weights (seed {cfg.run.seed}). mean volume: the voxel-wise mean of the training volumes, whatever the input.",
        f"PSNR = 10 log10(range^2 / MSE) over every voxel, range = {scale}. SSIM: 3D Gaussian window of "
        f"{SSIM_WINDOW} voxels (sigma 1.5), K1 0.01, K2 0.03, over the same range, where the window fits.",
    ]


def write_regress_tables(rows: Sequence[RegressRow], out_dir: str | Path, title: str, notes: Sequence[str]) -> tuple[Path, Path]:
    """OUT/regress.md and OUT/regress.csv, each whole or not at all."""
    out_dir = Path(out_dir)
    md = write_atomic(out_dir / "regress.md", to_markdown(rows, title, notes))
    csv_path = write_atomic(out_dir / "regress.csv", to_csv(rows))
    return md, csv_path
