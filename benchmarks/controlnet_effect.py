"""Does a ControlNet's mask change what it samples? Stage 1 and stage 2 on phantoms, measured.

    .venv/bin/python benchmarks/controlnet_effect.py [--steps1 300] [--steps2 300] [--num 8] [--work /tmp/controlnet]

The ControlNet recipe (README, docs/models.md) in two commands: `mode=bravo_uncond` (stage 1, the
BRAVO image alone), then `mode=bravo model.name=controlnet controlnet.base=STAGE1` (stage 2, the
tumour mask as the control). Both sample from the same seeds, so each pair of samples starts from
the same noise and differs only by the control. For each test mask the script measures the
*lesion contrast* of a volume: the mean intensity inside the mask minus the mean in a ring of
`RING` voxels around it (model space, [-1, 1]; the ring is the tissue the lesion sits in, so a
region of the brain without a lesion scores about 0). Phantom lesions are brighter than the
brain around them in BRAVO, so a control that works raises the contrast of the controlled sample
over the base sample's at the same place; the real case's contrast is the target. It also checks
that stage 2 left the stage-1 weights bit-identical.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from voxgen.data.phantoms import make_phantoms
from voxgen.diffusion.sampling import sample_volumes, sampling_settings
from voxgen.training.runs import load_run

VOXGEN = [sys.executable, "-m", "voxgen.cli"]
# Width in voxels of the ring around a lesion that its contrast is measured against.
RING = 2
SHAPE = [32, 48, 40]
UNET = [
    "model.channels=[16,32,64]",
    "model.attention_levels=[false,false,true]",
    "model.num_res_blocks=1",
    "model.num_head_channels=16",
    "model.norm_num_groups=8",
    "training.batch_size=2",
    "training.lr=1e-3",
    "training.warmup_steps=20",
    "training.ema_decay=0.99",
    "training.val_batches=1",
    "training.device=cpu",
]


def train(argv: list[str]) -> float:
    """Run `voxgen train ARGV`; the wall clock in seconds."""
    started = time.perf_counter()
    print("voxgen train " + " ".join(argv), flush=True)
    subprocess.run([*VOXGEN, "train", *argv], check=True)
    return time.perf_counter() - started


def lesion_contrast(volume: np.ndarray, mask: np.ndarray) -> float:
    """Mean of `volume` inside `mask` minus its mean in the ring of RING voxels around it."""
    ring = ndimage.binary_dilation(mask, iterations=RING) & ~mask
    return float(volume[mask].mean() - volume[ring].mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps1", type=int, default=300)
    parser.add_argument("--steps2", type=int, default=300)
    parser.add_argument("--num", type=int, default=8, help="test masks (samples per stage)")
    parser.add_argument("--work", default="/tmp/controlnet")
    args = parser.parse_args()
    torch.set_num_threads(2)
    work = Path(args.work)
    root = work / "phantoms"
    if not root.exists():
        make_phantoms(root, cases=40, shape=tuple(SHAPE), seed=0, splits=(28, 4, 8))
    data = [f"data.root={root}", f"data.shape={SHAPE}"]
    stage1, stage2 = work / f"stage1_{args.steps1}", work / f"stage2_{args.steps2}"
    seconds = {}
    if not stage1.exists():
        seconds["stage 1"] = train([*data, *UNET, "mode=bravo_uncond", f"training.steps={args.steps1}", f"run.dir={stage1}"])
    before = {p: p.read_bytes() for p in sorted(stage1.rglob("*.safetensors"))}
    if not stage2.exists():
        seconds["stage 2"] = train(
            [
                *data,
                *UNET,
                "mode=bravo",
                "model.name=controlnet",
                f"controlnet.base={stage1}",
                f"training.steps={args.steps2}",
                f"run.dir={stage2}",
            ]
        )
    untouched = before == {p: p.read_bytes() for p in sorted(stage1.rglob("*.safetensors"))}

    rows = []
    for name, run in (("base (stage 1)", stage1), ("ControlNet (stage 2)", stage2)):
        cfg, parts, step = load_run(run, device="cpu")
        sampling = sampling_settings(cfg.sample, parts.strategy, parts.mode.conditional, solver="euler:25")
        rows.append((name, step, sample_volumes(cfg, parts, args.num, 0, sampling, split="test")))
    controlled = rows[1][2]
    masks = controlled.conditions["seg"] > 0  # (N, D, H, W): the controls, one test case each
    cfg2, _, _ = load_run(stage2, device="cpu")
    from voxgen.data.dataset import VolumeDataset

    test = VolumeDataset(cfg2.data.root, "test", ("bravo", "seg"), cfg2.data.shape)
    reals = {test[i]["case"]: test[i]["bravo"][0].numpy() for i in range(len(test))}
    table = []
    for i, case in enumerate(controlled.case_ids):
        mask = masks[i]
        if not mask.any():
            continue
        table.append(
            [
                case,
                int(mask.sum()),
                lesion_contrast(reals[case], mask),
                lesion_contrast(rows[0][2].volumes["bravo"][i], mask),
                lesion_contrast(controlled.volumes["bravo"][i], mask),
            ]
        )
    print()
    print(f"stage 1: {rows[0][1]} steps, stage 2: {rows[1][1]} steps; wall clock {seconds}")
    print(f"stage-1 checkpoint files bit-identical after stage 2: {untouched}")
    print()
    print("| test case | mask voxels | real contrast | base sample | ControlNet sample |")
    print("|---|---|---|---|---|")
    for case, voxels, real, base, ctrl in table:
        print(f"| {case} | {voxels} | {real:.3f} | {base:.3f} | {ctrl:.3f} |")
    values = np.array([row[2:] for row in table])
    print(f"| mean of {len(table)} | | {values[:, 0].mean():.3f} | {values[:, 1].mean():.3f} | {values[:, 2].mean():.3f} |")
    gain = values[:, 2] - values[:, 1]
    print(f"\nControlNet minus base contrast: mean {gain.mean():.3f}, positive in {int((gain > 0).sum())} of {len(gain)} cases")


if __name__ == "__main__":
    main()
