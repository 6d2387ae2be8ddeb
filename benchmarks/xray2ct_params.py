"""Parameter counts of the seed-004 X-ray-to-CT presets, built on the meta device (no memory).

    .venv/bin/python benchmarks/xray2ct_params.py

For each `configs/xray2ct_*.yaml`: the parameters by part (2D encoder, initial volume, stages, skips,
heads) and the size of the largest X-ray fusion tensor, (C + F) x s^3 in fp32 at batch 1: the tensor the
seed's fix 1 targets. Runs in seconds on a CPU; docs/xray.md holds its output.
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import OmegaConf

from voxgen.models.registry import count_parameters
from voxgen.models.xray2ct import XRay2CTConfig, build_xray2ct, xray2ct_config

CONFIGS = Path(__file__).parents[1] / "configs"
# preset -> X-ray size (the output size follows from the stage table), as each file's header states.
XRAY_SIZES = {
    "xray2ct_256_before_fixes.yaml": 512,
    "xray2ct_256_after_fixes.yaml": 512,
    "xray2ct_128.yaml": 512,
    "xray2ct_cpu.yaml": 64,
}


def largest_fusion_gib(cfg: XRay2CTConfig) -> float:
    """GiB of the biggest (C + F) x s^3 concatenation of a fusing stage, fp32, batch 1."""
    sizes = [
        (s.channels + cfg.xray_features) * (cfg.initial_size * 2 ** (i + 1)) ** 3 * 4
        for i, s in enumerate(cfg.stages)
        if s.fuse_xray
    ]
    return max(sizes, default=0) / 2**30


def main() -> None:
    header = f"{'preset':32s} {'out':>4s} {'xray':>5s} {'encoder':>10s} {'initial':>9s} {'stages':>10s} {'skips':>8s}"
    print(header + f" {'heads':>10s} {'total':>11s} {'fusion GiB':>10s}")
    for name, xray_size in XRAY_SIZES.items():
        section = OmegaConf.load(CONFIGS / name).xray2ct
        cfg = xray2ct_config(section)
        with torch.device("meta"):
            model = build_xray2ct(section, cfg.output_size, xray_size, grad_checkpointing=False)
        parts = [count_parameters(getattr(model, part)) for part in ("encoders", "initial", "stages", "skips", "head")]
        row = f"{name:32s} {cfg.output_size:4d} {xray_size:5d} {parts[0]:10,d} {parts[1]:9,d} {parts[2]:10,d} {parts[3]:8,d}"
        print(row + f" {parts[4]:10,d} {count_parameters(model):11,d} {largest_fusion_gib(cfg):10.2f}")


if __name__ == "__main__":
    main()
