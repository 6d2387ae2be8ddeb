"""Planned vs measured GPU memory, from the table `voxgen profile --grid` writes: the page
docs/memory-validation.md.

    python benchmarks/memory_validation.py --profile DIR/profile.csv --out docs/memory-validation.md

`voxgen profile --grid` plans every configuration and measures it on the GPU at hand; this reads its
CSV back (no planning, no GPU) and writes the summary (median |error| of the planned figure against
the measured steady `max_memory_allocated`, goal <= 5 %) and the per-row table. The planned figure is
`required` (cuDNN's smallest convolution workspaces, what the verdict is judged on) where the table
has that column, otherwise the steady peak; the page says which.
"""

from __future__ import annotations

import argparse
import csv
import statistics
from pathlib import Path

GOAL_PCT = 5.0


def rows_of(path: Path) -> tuple[list[dict], str]:
    """(one dict per configuration, the planned column compared)."""
    rows = list(csv.DictReader(path.open()))
    if not rows:
        raise SystemExit(f"memory_validation.py: {path} has no rows")
    column = "planned_required_gib" if rows[0].get("planned_required_gib") else "planned_steady_gib"
    out = []
    for row in rows:
        ran = row["status"] == "OK" and row["steady_gib"] and row[column]
        measured = float(row["steady_gib"]) if ran else None
        planned = float(row[column]) if row[column] else None
        error = 100 * (planned - measured) / measured if ran else None
        out.append({"config": row["config"], "status": row["status"], "measured": measured, "planned": planned, "error": error})
    return out, column


def summary(rows: list[dict]) -> dict:
    errors = sorted(abs(r["error"]) for r in rows if r["error"] is not None)
    if not errors:
        return {"rows": len(rows), "ran": 0, "median_pct": None, "p90_pct": None, "max_pct": None, "goal_met": None}
    median = statistics.median(errors)
    return {
        "rows": len(rows),
        "ran": len(errors),
        "median_pct": median,
        "p90_pct": errors[min(len(errors) - 1, int(0.9 * len(errors)))],
        "max_pct": errors[-1],
        "goal_met": median <= GOAL_PCT,
    }


def page(rows: list[dict], column: str, source: str, env: dict) -> str:
    s = summary(rows)
    label = "required" if column == "planned_required_gib" else "steady peak"
    if s["ran"]:
        verdict = "met" if s["goal_met"] else "NOT met"
        line = (
            f"{s['rows']} configurations, {s['ran']} ran: planned {label} vs measured steady allocated, "
            f"median |error| {s['median_pct']:.1f}% (goal <= {GOAL_PCT:g}%: {verdict}), "
            f"p90 {s['p90_pct']:.1f}%, max {s['max_pct']:.1f}%."
        )
    else:
        line = f"{s['rows']} configurations, none ran: no error to report."
    lines = [
        "# Memory planner vs measured",
        "",
        f"Written by `benchmarks/memory_validation.py` from `{source}`, measured on {env['gpu']} "
        f"(torch {env['torch']}, cuDNN {env['cudnn']}) by `voxgen profile --grid`: the planner's figure made in the "
        "same run against `torch.cuda.max_memory_allocated` of the steady training step.",
        "",
        line,
        "",
        f"| config | measured GiB | planned {label} GiB | error | status |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        measured = f"{r['measured']:.2f}" if r["measured"] is not None else "-"
        planned = f"{r['planned']:.2f}" if r["planned"] is not None else "-"
        error = f"{r['error']:+.1f}%" if r["error"] is not None else "-"
        lines.append(f"| {r['config']} | {measured} | {planned} | {error} | {r['status']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", type=Path, required=True, help="profile.csv of `voxgen profile --grid`")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--source", help="how to name the CSV on the page (default: its path)")
    args = parser.parse_args(argv)
    rows, column = rows_of(args.profile)
    first = next(csv.DictReader(args.profile.open()))
    env = {k: first.get(k) or "?" for k in ("gpu", "torch", "cudnn")}
    text = page(rows, column, args.source or str(args.profile), env)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text.split("\n\n")[2])


if __name__ == "__main__":
    main()
