"""Latent diffusion on the template cohort, end to end, against the same network in pixel space.

    .venv/bin/python benchmarks/latent_diffusion.py --autoencoder RUN [--out docs/latent-diffusion.md]

RUN is a trained `task=autoencoder` run on the cohort (e.g. configs/autoencoders/kl_4x_cohort.yaml,
trained by benchmarks/autoencoders.py). The script
1. times the start-up of a latent run that builds the latent cache and of a second one that reads it
   (`voxgen train ... training.steps=1`, wall clock of the whole command);
2. trains `mode=bravo_seg_cond space=latent`, and the same UNet in pixel space (`mode=bravo`) for one
   step, for the step-0 loss of both, through the command line;
3. samples with `voxgen sample` (decoded NIfTI) and measures the quickstart's distance (intensity W1 inside
   the head, samples vs held-out test cases) for the trained and an untrained latent model.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from voxgen.config import compose
from voxgen.data.cohort import make_cohort
from voxgen.quickstart import quality
from voxgen.training.runs import load_run

VOXGEN = [sys.executable, "-m", "voxgen.cli"]
SHAPE = [32, 48, 40]
# The latent grid is [8, 12, 10] at factor 4: two UNet levels divide it.
UNET = [
    "model.channels=[32,64]",
    "model.attention_levels=[false,true]",
    "model.num_res_blocks=1",
    "model.num_head_channels=16",
    "model.norm_num_groups=8",
    "training.batch_size=2",
    "training.lr=1e-3",
    "training.warmup_steps=20",
    "training.ema_decay=0.99",
    "training.val_batches=2",
    "sample.steps=20",
]


def voxgen(*args: str) -> float:
    """Run `voxgen ARGS`; seconds of wall clock."""
    began = time.perf_counter()
    subprocess.run([*VOXGEN, *args], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - began


def history(run: Path) -> list[dict]:
    return json.loads((run / "history.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--autoencoder", required=True, help="a trained task=autoencoder run on the cohort")
    parser.add_argument("--data", default=None, help="the cohort the autoencoder was trained on (default: its data.root)")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--out", default="docs/latent-diffusion.md")
    # Smaller shapes only to test the script (benchmarks/gpu_check.sh --dry-run); they must divide by 8.
    parser.add_argument("--shape", type=int, nargs=3, default=SHAPE, metavar=("D", "H", "W"))
    args = parser.parse_args()
    ae_cfg = compose([Path(args.autoencoder) / "config.yaml"])
    root = Path(args.data or ae_cfg.data.root)
    if not (root / "test").is_dir():
        make_cohort(root, cases=24, shape=tuple(args.shape), seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        common = [f"data.root={root}", f"data.shape=[{','.join(map(str, args.shape))}]", *UNET]
        latent = [
            "mode=bravo_seg_cond",
            "space=latent",
            f"space.autoencoder={args.autoencoder}",
            f"space.cache_dir={tmp / 'cache'}",
        ]
        build = voxgen("train", *common, *latent, "training.steps=1", f"run.dir={tmp / 'startup1'}")
        reuse = voxgen("train", *common, *latent, "training.steps=1", f"run.dir={tmp / 'startup2'}")
        steps = [
            f"training.steps={args.steps}",
            f"training.val_every={args.steps // 4}",
            f"training.checkpoint_every={args.steps}",
        ]
        latent_minutes = voxgen("train", *common, *latent, *steps, f"run.dir={tmp / 'latent'}") / 60
        # Only its step-0 loss is compared: one step, not a whole run (at full resolution it is the slow one).
        voxgen("train", *common, "mode=bravo", "training.steps=1", f"run.dir={tmp / 'pixel'}")
        voxgen("sample", "--run", str(tmp / "latent"), "--num", "4", "--out", str(tmp / "samples"))
        written = sorted((tmp / "samples").rglob("*.nii.gz"))
        cfg, parts, _ = load_run(tmp / "latent", device="cpu")
        torch.manual_seed(0)
        q = quality(cfg, parts, num=8, seed=0)
        latent_h, pixel_h = history(tmp / "latent"), history(tmp / "pixel")
    rows = [
        ("latent cache: start-up that builds it (`voxgen train ... training.steps=1`)", f"{build:.1f} s"),
        ("latent cache: start-up that reads it (same command, new run folder)", f"{reuse:.1f} s"),
        ("latent run: step-0 validation loss", f"{latent_h[0]['val_loss']:.4f}"),
        ("pixel run (same UNet, mode=bravo): step-0 validation loss", f"{pixel_h[0]['val_loss']:.4f}"),
        ("ratio latent / pixel", f"{latent_h[0]['val_loss'] / pixel_h[0]['val_loss']:.2f}"),
        (f"latent run: validation loss after {args.steps} steps", f"{latent_h[-1]['val_loss']:.4f} ({latent_minutes:.1f} min)"),
        ("`voxgen sample` files written (decoded NIfTI)", f"{len(written)}"),
        (f"{q.metric} to held-out test cases, trained latent model", f"{q.trained:.4f}"),
        (f"{q.metric}, untrained latent model", f"{q.untrained:.4f}"),
        ("untrained / trained", f"{q.ratio:.1f}x"),
    ]
    date = subprocess.run(["date", "-u", "+%Y-%m-%d %H:%M UTC"], capture_output=True, text=True).stdout.strip()
    text = "\n".join(
        [
            "# Latent diffusion on the template cohort",
            "",
            f"Measured {date}, 2-core CPU, torch {torch.__version__}, with",
            "",
            f"    .venv/bin/python benchmarks/latent_diffusion.py --autoencoder {args.autoencoder} --steps {args.steps}"
            + ("" if args.shape == SHAPE else f" --shape {' '.join(map(str, args.shape))}"),
            "",
            __doc__.split("\n\n", 2)[2].strip(),
            "",
            "| what | measured |",
            "|---|---|",
            *[f"| {what} | {value} |" for what, value in rows],
            "",
        ]
    )
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
