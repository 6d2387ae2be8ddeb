"""Does the seeds' s2d / wavelet recipe collapse to the mean at CPU scale, and does the guard see it?

    .venv/bin/python benchmarks/space_collapse.py [--steps 300] [--out docs/space-collapse.md]

Every s2d and wavelet run of the seeds (seed 002, Part 5: exp11, exp12) ended at MSE ~1.0, the
model predicting the mean. Their recipe: rectified flow, bravo, a 5-level UNet with attention at
L3+L4, LR 1e-4, no warm-up, no gradient clipping; the wavelet runs on raw Haar sub-bands. This
script shrinks it to the template cohort on two cores (widths [8, 16, 32, 64, 64], one residual
block per level, [32, 32, 32] volumes) and trains it in three spaces:

- s2d (space=s2d: every 2x2x2 block as 8 channels),
- raw Haar sub-bands (model.name=wdm: the transform inside the network, sub-bands not normalised),
- normalised Haar sub-bands (space=wavelet: per-sub-band shift and scale from the training split),

each with the seeds' recipe and with warm-up + clipping (exp9_1's fix: warm-up, grad_clip 0.5).
For each run it records the validation loss curve, the spread of the prediction relative to the
target's on the first validation batch (prediction_std / target_std: about 0 when the network
predicts a constant), and whether voxgen's collapse guard stopped the run (guards.collapse_*).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from voxgen.config import compose
from voxgen.data.cohort import make_cohort
from voxgen.errors import TrainingCollapsed
from voxgen.training.trainer import train

SHAPE = [32, 32, 32]
MODEL = [
    "mode=bravo",
    "strategy=rflow",
    "model.channels=[8,16,32,64,64]",
    "model.attention_levels=[false,false,false,true,true]",
    "model.num_res_blocks=1",
    "model.num_head_channels=8",
    "model.norm_num_groups=4",
    "training.batch_size=2",
    "training.lr=1e-4",
    "training.val_batches=2",
    "training.checkpoint_every=100000",
]
SPACES = {
    "s2d": ["space=s2d", "model.name=unet"],
    "raw Haar (wdm)": ["space=pixel", "model.name=wdm"],
    "normalised Haar (wavelet)": ["space=wavelet", "model.name=unet"],
}
RECIPES = {
    "seeds' (no warm-up, no clipping)": ["training.warmup_steps=0", "training.grad_clip=0"],
    "warm-up 50 + clip 0.5": ["training.warmup_steps=50", "training.grad_clip=0.5"],
}


def run(root: Path, out: Path, space: list[str], recipe: list[str], steps: int) -> dict:
    cfg = compose(
        [],
        [
            *MODEL,
            *space,
            *recipe,
            f"data.root={root}",
            f"data.shape=[{','.join(map(str, SHAPE))}]",
            f"training.steps={steps}",
            f"training.val_every={max(steps // 10, 1)}",
            f"run.dir={out}",
        ],
    )
    started = time.perf_counter()
    stopped = None
    try:
        history = train(cfg).history
    except TrainingCollapsed as exc:
        stopped = str(exc).split(":")[0]
        history = json.loads((out / "history.json").read_text())
    ratios = [r["prediction_std"] / r["target_std"] for r in history if r["step"] > 0]
    return {
        "first": history[0]["val_loss"],
        "last": history[-1]["val_loss"],
        "last_step": history[-1]["step"],
        "min_ratio": min(ratios) if ratios else float("nan"),
        "last_ratio": ratios[-1] if ratios else float("nan"),
        "stopped": stopped,
        "minutes": (time.perf_counter() - started) / 60,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--out", default="docs/space-collapse.md")
    args = parser.parse_args()
    torch.set_num_threads(2)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "cohort"
        make_cohort(root, cases=24, shape=SHAPE, seed=0)
        for space_name, space in SPACES.items():
            for recipe_name, recipe in RECIPES.items():
                result = run(root, Path(tmp) / f"run{len(rows)}", space, recipe, args.steps)
                rows.append((space_name, recipe_name, result))
                print(space_name, "|", recipe_name, "|", result, flush=True)
    lines = [
        "| space | recipe | val loss, step 0 | val loss, last | last step | min pred/target std | last pred/target std "
        "| collapse guard | minutes |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for space_name, recipe_name, r in rows:
        guard = r["stopped"] or "did not fire"
        lines.append(
            f"| {space_name} | {recipe_name} | {r['first']:.4f} | {r['last']:.4f} | {r['last_step']} | {r['min_ratio']:.3f} "
            f"| {r['last_ratio']:.3f} | {guard} | {r['minutes']:.1f} |"
        )
    date = subprocess.run(["date", "-u", "+%Y-%m-%d %H:%M UTC"], capture_output=True, text=True).stdout.strip()
    text = "\n".join(
        [
            "# s2d and wavelet spaces: the seeds' collapse at CPU scale",
            "",
            f"Measured {date} on {platform.machine()} ({torch.get_num_threads()} threads), torch {torch.__version__}, with",
            "",
            f"    .venv/bin/python benchmarks/space_collapse.py --steps {args.steps}",
            "",
            __doc__.split("\n\n", 2)[2].strip(),
            "",
            *lines,
            "",
        ]
    )
    Path(args.out).write_text(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
