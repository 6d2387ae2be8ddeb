"""Planner vs the seeds' measured peaks (A100, max_memory_allocated): per row and in summary.

    .venv/bin/python benchmarks/plan_vs_reference.py [--reference DIR] [--out docs/memory-validation-reference.md]

Rows use the seeds' settings: batch 1, fp32 weights, bf16 autocast, AdamW, no gradient
checkpointing; UNet with materialised attention (model.attention=naive), DiT with sdpa and
QK-norm (the seeds' DiT code has it on; it is also voxgen's default for DiT).
The figure compared is `peak_bytes_first_step` (the seeds measured one step from a fresh
optimiser) against `peak_gb` read as GiB; the measured value is also checked against the band
of that figure (`voxgen.memory.planner.band`). The verdict is the plan's own at 80 GB
(reserved memory and its band, see `voxgen.memory.planner`), checked against the table's
status (OK and OK_OVER_60GB ran, OOM did not): no OOM row may be called `fits`, and no row that
ran under 80% of the GPU's memory may be called `does not fit`.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import time
from pathlib import Path

from voxgen.config import compose
from voxgen.memory.planner import DOES_NOT_FIT, ERRORS, FITS, TIGHT, GiB, band, plan
from voxgen.models.registry import MODELS

GPU = 80 * GiB


def unet_rows(path: Path):
    for row in csv.DictReader(path.open()):
        channels = row["channels"].split()
        overrides = [
            "model.name=unet",
            "model.attention=naive",
            "model.norm_num_groups=32",
            f"model.channels=[{','.join(channels)}]",
            f"model.attention_levels=[{','.join(row['attention_levels'].split())}]",
            f"model.num_res_blocks={row['num_res_blocks']}",
            f"model.num_head_channels={row['num_head_channels']}",
            f"model.in_channels={row['in_channels']}",
            f"model.out_channels={row['out_channels']}",
        ]
        yield f"unet {row['config']} {row['latent']}", row, overrides


def dit_rows(path: Path):
    for row in csv.DictReader(path.open()):
        overrides = [
            "model.name=dit",
            f"model.variant={row['variant']}",
            f"model.patch_size={row['patch']}",
            "model.attention=sdpa",
            "model.qk_norm=true",
            f"model.in_channels={row['in_channels']}",
            f"model.out_channels={row['out_channels']}",
        ]
        yield f"dit {row['variant']} {row['space']} p{row['patch']}", row, overrides


def evaluate(name, row, overrides) -> dict:
    shape = f"[{row['D']},{row['H']},{row['W']}]"
    mode = "mode=seg" if row["in_channels"] == row["out_channels"] else "mode=bravo"
    cfg = compose(
        [],
        [
            mode,
            *overrides,
            f"data.shape={shape}",
            "training.batch_size=1",
            "training.precision=bf16-mixed",
            "training.grad_checkpointing=false",
        ],
    )
    start = time.perf_counter()
    result = plan(cfg, GPU)
    seconds = time.perf_counter() - start
    measured = float(row["peak_gb"]) if row["peak_gb"] not in ("", "nan") else None
    predicted = result.peak_bytes_first_step / GiB
    ran = row["status"].startswith("OK")
    low, _, high = band(result.peak_bytes_first_step, ERRORS[result.error_class])
    return {
        "name": name,
        "shape": shape,
        "params_m": result.params / 1e6,
        "ref_params_m": float(row["params_m"]),
        "predicted": predicted,
        "steady": result.peak_bytes / GiB,
        "measured": measured,
        "status": row["status"],
        "error": (predicted - measured) / measured if measured and row["status"] == "OK" else None,
        "ran": ran,
        "verdict": result.verdict,
        "error_class": result.error_class,
        "in_band": None if measured is None or not ran else low <= measured * GiB <= high,
        "unsafe": not ran and result.verdict == FITS,
        "refused": ran and measured is not None and measured * GiB < 0.8 * GPU and result.verdict == DOES_NOT_FIT,
        "seconds": seconds,
        "where": f"{result.peak_phase}: {result.peak_module}",
    }


def summary(results: list[dict]) -> str:
    errors = sorted(abs(r["error"]) for r in results if r["error"] is not None)
    if not errors:
        return "no OK rows"
    p90 = errors[min(len(errors) - 1, int(round(0.9 * (len(errors) - 1))))]
    banded = [r["in_band"] for r in results if r["in_band"] is not None]
    verdicts = {v: sum(r["verdict"] == v for r in results) for v in (FITS, TIGHT, DOES_NOT_FIT)}
    return (
        f"{len(errors)} OK rows: median |error| {100 * statistics.median(errors):.1f}%, "
        f"p90 {100 * p90:.1f}%, max {100 * errors[-1]:.1f}%; measured within the band on {sum(banded)} of "
        f"{len(banded)}. Verdicts at 80 GB: {verdicts[FITS]} fits, {verdicts[TIGHT]} tight "
        f"({100 * verdicts[TIGHT] / len(results):.0f}% of rows), {verdicts[DOES_NOT_FIT]} does not fit; "
        f"OOM rows called fits: {sum(r['unsafe'] for r in results)}; rows that ran under 80% called "
        f"does not fit: {sum(r['refused'] for r in results)}; {statistics.mean(r['seconds'] for r in results):.1f} s per plan"
    )


def table(results: list[dict]) -> list[str]:
    lines = [
        "| config | D,H,W | params M (ref) | first step GiB | steady GiB | measured GiB | status | error | verdict "
        "| steady peak at |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        err = f"{100 * r['error']:+.1f}%" if r["error"] is not None else "-"
        meas = f"{r['measured']:.1f}" if r["measured"] is not None else "-"
        lines.append(
            f"| {r['name']} | {r['shape']} | {r['params_m']:.1f} ({r['ref_params_m']:.1f}) | {r['predicted']:.2f} | "
            f"{r['steady']:.2f} | {meas} | {r['status']} | {err} | {r['verdict']} | {r['where']} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", default="../shared/reference")
    parser.add_argument("--out", default="docs/memory-validation-reference.md")
    parser.add_argument("--only", choices=["unet", "dit"], default=None)
    args = parser.parse_args()
    ref = Path(args.reference)
    sources = {"unet": (unet_rows, ref / "unet3d_latent_a100.csv"), "dit": (dit_rows, ref / "dit3d_a100.csv")}
    doc = [
        "# Memory planner vs the seeds' measurements (A100 80GB)",
        "",
        "Generated by `benchmarks/plan_vs_reference.py`; prediction = `peak_bytes_first_step`.",
        "",
        "The seeds' DiT normalises queries and keys per head (QK-norm, on by default in their code;",
        "voxgen's `model.qk_norm` is on for dit/sit/hdit unless set). Under bf16 autocast on a GPU that",
        "keeps about 14 more bytes per token per channel per block alive than a DiT block without it:",
        "fp32 copies of q and k saved by the two norms, the bf16 normalised q and k saved by the kernel,",
        "and a copy of the attention output before the projection (normalised q is dense, so the kernel's",
        "output comes out head-major). The remaining error is a constant of roughly 0.05-0.1 GiB that the",
        "planner does not account for; it shows only on the smallest rows (0.7 GiB measured).",
        "",
    ]
    for family, (rows, path) in sources.items():
        if args.only and family != args.only:
            continue
        if family not in MODELS:
            doc += [f"## {family}", "", f"model.name={family} is not in the registry yet: not checked.", ""]
            print(f"{family}: not registered, skipped")
            continue
        results = []
        for name, row, overrides in rows(path):
            results.append(evaluate(name, row, overrides))
            r = results[-1]
            err = f"{100 * r['error']:+6.1f}%" if r["error"] is not None else "    -  "
            print(
                f"{name:28s} {r['shape']:14s} pred {r['predicted']:6.2f} steady {r['steady']:6.2f} "
                f"meas {r['measured'] or float('nan'):6.1f} {err} {r['status']:13s} {r['verdict']:12s} {r['seconds']:5.1f}s",
                flush=True,
            )
        line = summary(results)
        print(f"{family}: {line}")
        doc += [f"## {family} ({path.name})", "", line, "", *table(results), ""]
    Path(args.out).write_text("\n".join(doc))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
