"""Planner (as it is now) vs a GPU measurement made by `voxgen profile --grid`: per row and in summary.

    .venv/bin/python benchmarks/plan_vs_gpu.py [--measured benchmarks/measured/gpu_validation_h200.csv]
        [--grid configs/grids/gpu_validation.yaml] [--out docs/gpu-validation-plan.md]

The measured CSV keeps what the GPU showed (max_memory_allocated and max_memory_reserved of the first
and the steady step); every row is planned again here, without a GPU, for that GPU's memory, so any
change to the planner is checked against the measurement. Compared:

- `required` (the step's need with cuDNN's smallest convolution workspaces) and `peak` (with its
  preferred ones, the seeds' A100 figure) against the measured steady allocated peak;
- the measured steady reserved memory against the band's top (`fit` picks by it): a row above its
  band's top is a miss of the safe verdict;
- the verdict against the status: no row that ran out of memory may be called `fits`, and no row
  that ran under 80% of the GPU may be called `does not fit`.
"""

from __future__ import annotations

import argparse
import csv
import statistics
from pathlib import Path

from voxgen.config import compose
from voxgen.memory.grid import load_grid
from voxgen.memory.planner import DOES_NOT_FIT, FITS, GiB, plan

REPO = Path(__file__).resolve().parents[1]


def pct(planned: float, measured: float) -> float:
    return 100 * (planned - measured) / measured


def evaluate(grid: Path, measured: Path) -> tuple[list[dict], dict]:
    _, items = load_grid(grid)
    configs = {entry.name: (entry.files, entry.overrides) for entry, _ in items}
    rows = list(csv.DictReader(measured.open()))
    gpu = int(float(rows[0]["gpu_gib"]) * GiB)
    results = []
    for row in rows:
        files, overrides = configs[row["config"]]
        p = plan(compose(files, overrides), gpu)
        ran = row["status"] == "OK"
        steady = float(row["steady_gib"]) if ran else None
        reserved = float(row["reserved_steady_gib"]) if ran else None
        results.append(
            {
                "config": row["config"],
                "status": row["status"],
                "measured": steady,
                "reserved": reserved,
                "required": p.required_bytes / GiB,
                "peak": p.peak_bytes / GiB,
                "planned_reserved": p.reserved_bytes / GiB,
                "error_class": p.error_class,
                "error_reserved": pct(p.reserved_bytes / GiB, reserved) if ran else None,
                "band_top": p.band_bytes[2] / GiB,
                "verdict": p.verdict,
                "error_required": pct(p.required_bytes / GiB, steady) if ran else None,
                "error_peak": pct(p.peak_bytes / GiB, steady) if ran else None,
                "over_band": ran and reserved > p.band_bytes[2] / GiB,
                "share": (reserved * GiB / gpu) if ran else None,
            }
        )
    return results, {"gpu": rows[0]["gpu"], "torch": rows[0]["torch"], "cudnn": rows[0]["cudnn"], "gpu_bytes": gpu}


def summary(results: list[dict], env: dict) -> str:
    ran = [r for r in results if r["measured"] is not None]
    errors = sorted(abs(r["error_required"]) for r in ran)
    p90 = errors[min(len(errors) - 1, int(0.9 * len(errors)))]
    oom_fits = sum(r["status"] != "OK" and r["verdict"] == FITS for r in results)
    refused = sum(r["share"] is not None and r["share"] < 0.8 and r["verdict"] == DOES_NOT_FIT for r in results)
    over = sum(r["over_band"] for r in results)
    return (
        f"{len(results)} rows on {env['gpu']} (torch {env['torch']}, cuDNN {env['cudnn']}), {len(ran)} ran: "
        f"`required` vs measured steady allocated: median |error| {statistics.median(errors):.1f}%, p90 {p90:.1f}%, "
        f"max {errors[-1]:.1f}%; measured reserved above the band's top: {over}; "
        f"OOM rows called fits: {oom_fits}; rows that ran under 80% called does not fit: {refused}"
    )


def table(results: list[dict]) -> list[str]:
    lines = [
        "| config | measured GiB | required GiB | error | peak GiB (preferred workspaces) | error | "
        "measured reserved GiB | planned reserved GiB | error | band top GiB (class) | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        measured = f"{r['measured']:.2f}" if r["measured"] is not None else r["status"]
        err_req = f"{r['error_required']:+.1f}%" if r["error_required"] is not None else "-"
        err_peak = f"{r['error_peak']:+.1f}%" if r["error_peak"] is not None else "-"
        reserved = f"{r['reserved']:.2f}" if r["reserved"] is not None else "-"
        err_res = f"{r['error_reserved']:+.1f}%" if r["error_reserved"] is not None else "-"
        flag = " (above)" if r["over_band"] else ""
        lines.append(
            f"| {r['config']} | {measured} | {r['required']:.2f} | {err_req} | {r['peak']:.2f} | {err_peak} | "
            f"{reserved}{flag} | {r['planned_reserved']:.2f} | {err_res} | {r['band_top']:.2f} ({r['error_class']}) | "
            f"{r['verdict']} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--measured", type=Path, default=REPO / "benchmarks/measured/gpu_validation_h200.csv")
    parser.add_argument("--grid", type=Path, default=REPO / "configs/grids/gpu_validation.yaml")
    parser.add_argument("--out", type=Path, default=REPO / "docs/gpu-validation-plan.md")
    args = parser.parse_args()
    results, env = evaluate(args.grid, args.measured)
    text = "\n".join(
        [
            f"# Planner vs {env['gpu']} (re-planned from the measurement)",
            "",
            f"Generated by `benchmarks/plan_vs_gpu.py` from `{args.measured.relative_to(REPO)}` "
            f"(measured by `voxgen profile --grid {args.grid.relative_to(REPO)}`). Verdicts are for "
            f"{env['gpu_bytes'] / GiB:.1f} GiB. Measured = max_memory_allocated of the steady step.",
            "",
            summary(results, env),
            "",
            *table(results),
            "",
        ]
    )
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
