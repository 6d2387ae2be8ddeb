"""How each configuration the seeds ran out of memory with on an 80 GB GPU can train, from `voxgen fit`.

    .venv/bin/python benchmarks/seed_oom_fit.py [--reference ../shared/reference] [--gpu-memory 80GB]

Every row of the seeds' tables with status OOM (DiT: dit3d_a100.csv; HDiT and U-ViT at 160x256x256:
hdit_uvit_params.csv) is given to `voxgen.memory.fit.fit` with the seeds' settings (batch 1 per
process, bf16 autocast, AdamW) and the ways out varied, as

    voxgen fit --gpu-memory 80GB --all --vary training.grad_checkpointing=false,true \\
        --vary training.sharding=ddp,fsdp --vary world_size=1,2,4,8 OVERRIDES...

fit takes the cheapest run that fits (fewer GPUs, then no checkpointing, then DDP before FSDP).
Prints a Markdown table (docs/memory.md, "Seed configurations that ran out of memory").
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

from voxgen.memory.fit import FITS, fit, parse_vary
from voxgen.memory.planner import GiB, parse_memory
from voxgen.memory.ranks import NCCL_BYTES

VARY = ["training.grad_checkpointing=false,true", "training.sharding=ddp,fsdp", "world_size=1,2,4,8"]
SEEDS = ["training.batch_size=1", "training.precision=bf16-mixed"]


def oom_rows(reference: Path):
    """(name, overrides, the table's parameter count in M) of every OOM row."""
    for row in csv.DictReader((reference / "dit3d_a100.csv").open()):
        if row["status"] == "OOM":
            shape = f"[{row['D']},{row['H']},{row['W']}]"
            overrides = [
                "mode=seg",
                "model.name=dit",
                f"model.variant={row['variant']}",
                f"model.patch_size={row['patch']}",
                "model.attention=sdpa",
                "model.qk_norm=true",
                f"data.shape={shape}",
            ]
            yield f"DiT-{row['variant']} p{row['patch']} {row['space']} {shape}", overrides, float(row["params_m"])
    for row in csv.DictReader((reference / "hdit_uvit_params.csv").open()):
        if row["status"] == "OOM":
            shape = f"[{row['D']},{row['H']},{row['W']}]"
            overrides = [
                "mode=bravo",
                f"model.name={row['arch']}",
                f"model.variant={row['variant']}",
                f"model.patch_size={row['patch']}",
                f"data.shape={shape}",
            ]
            depths = row["level_depths"].split()
            if depths:
                overrides.append(f"model.level_depths=[{','.join(depths)}]")
            name = f"{'HDiT' if row['arch'] == 'hdit' else 'U-ViT'}-{row['variant']} p{row['patch']} {shape}"
            yield name + (f" [{','.join(depths)}]" if depths else ""), overrides, float(row["params_m"])


def way(candidate) -> str:
    """'1 GPU, checkpointing', 'FSDP over 4 GPUs', ..."""
    training = candidate.cfg.training
    gpus = f"{candidate.world_size} GPU" + ("s" if candidate.world_size > 1 else "")
    how = [f"FSDP over {gpus}" if training.sharding == "fsdp" and candidate.world_size > 1 else gpus]
    if training.grad_checkpointing:
        how.append("gradient checkpointing")
    return ", ".join(how)


def needs(result, label: str) -> str:
    found = next(c for c in result.candidates if c.label == label)
    return f"{found.needs_bytes / GiB:.1f}" if found.needs_bytes is not None else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", default="../shared/reference")
    parser.add_argument("--gpu-memory", default="80GB")
    args = parser.parse_args()
    gpu = parse_memory(args.gpu_memory)
    axes = parse_vary(VARY)
    columns = {
        "1 GPU": "training.grad_checkpointing=false training.sharding=ddp world_size=1",
        "1 GPU + ckpt": "training.grad_checkpointing=true training.sharding=ddp world_size=1",
        "FSDP x8": "training.grad_checkpointing=false training.sharding=fsdp world_size=8",
        "FSDP x8 + ckpt": "training.grad_checkpointing=true training.sharding=fsdp world_size=8",
    }
    lines = [
        "| configuration | params M (seeds) | " + " | ".join(f"{c} GiB" for c in columns) + " | how it trains in 80 GB |",
        "|---" * (3 + len(columns)) + "|",
    ]
    started = time.perf_counter()
    for name, overrides, params_m in oom_rows(Path(args.reference)):
        t0 = time.perf_counter()
        result = fit(axes, gpu, 0.1, overrides=[*overrides, *SEEDS], plan_all=True)
        planned = [c for c in result.candidates if c.status in (FITS, "too big")]
        params = planned[0].network.params / 1e6 if planned else float("nan")
        answer = way(result.best) if result.best else "no way (within 8 GPUs)"
        cells = " | ".join(needs(result, label) for label in columns.values())
        lines.append(f"| {name} | {params:.1f} ({params_m:.1f}) | {cells} | {answer} |")
        print(lines[-1], f"  [{time.perf_counter() - t0:.0f} s]", flush=True)
    budget, seconds = gpu * 0.9 / GiB, time.perf_counter() - started
    print()
    nccl = NCCL_BYTES / GiB
    print(f"GiB: what each rank needs, the band's top (reserved memory and the planner's error) plus NCCL's {nccl:.0f} GiB")
    print(f"on ranks of a torchrun job; fits when <= {budget:.0f} GiB ({args.gpu_memory} - 10%). {seconds:.0f} s in all.")
    print()
    print("\n".join(lines))


if __name__ == "__main__":
    main()
