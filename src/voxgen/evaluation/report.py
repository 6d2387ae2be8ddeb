"""Tables (Markdown, CSV) and the metric-against-NFE chart of an evaluation."""

from __future__ import annotations

import csv
import io
import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from voxgen.evaluation.evaluate import Row
from voxgen.files import write_atomic
from voxgen.reports import save_png

FIXED = ("solver", "steps / tolerance", "NFE")


def _fmt(value: float) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    magnitude = abs(value)
    if magnitude != 0 and (magnitude < 1e-3 or magnitude >= 1e5):
        return f"{value:.3e}"
    return f"{value:.4g}" if magnitude < 1 else f"{value:.2f}" if magnitude < 1000 else f"{value:.0f}"


def records(rows: Sequence[Row], headers: Sequence[str]) -> list[list]:
    """Each row as [solver, setting, NFE, *metrics, seconds per volume] (raw numbers)."""
    return [[r.solver, r.setting, r.nfe, *[r.values.get(h, float("nan")) for h in headers], r.seconds_per_volume] for r in rows]


def to_csv(rows: Sequence[Row], headers: Sequence[str], extractor_label: str = "") -> str:
    """Full-precision CSV; an `extractor` column names the features (and says when they are not comparable)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([*FIXED, *headers, "seconds per volume", "spec", "extractor"])
    for row, rec in zip(rows, records(rows, headers)):
        writer.writerow([*[repr(v) if isinstance(v, float) else v for v in rec], row.spec, extractor_label])
    return buf.getvalue()


def to_markdown(rows: Sequence[Row], headers: Sequence[str], title: str, notes: Sequence[str] = ()) -> str:
    lines = [f"## {title}", ""] if title else []
    cols = [*FIXED, *headers, "s / volume"]
    lines.append("| " + " | ".join(cols) + " |")
    lines.append("|" + "|".join(["---"] * 2 + ["---:"] * (len(cols) - 2)) + "|")
    for rec in records(rows, headers):
        cells = [str(rec[0]), str(rec[1]), str(rec[2]), *[_fmt(v) for v in rec[3:-1]], f"{rec[-1]:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    if notes:
        lines.append("")
        lines += [f"- {note}" for note in notes]
    return "\n".join(lines) + "\n"


def write_tables(
    rows: Sequence[Row],
    headers: Sequence[str],
    out_dir: str | Path,
    stem: str,
    title: str,
    notes: Sequence[str] = (),
    extractor_label: str = "",
) -> tuple[Path, Path]:
    """OUT/STEM.md and OUT/STEM.csv, each whole or not at all."""
    out_dir = Path(out_dir)
    md = write_atomic(out_dir / f"{stem}.md", to_markdown(rows, headers, title, notes))
    csv_path = write_atomic(out_dir / f"{stem}.csv", to_csv(rows, headers, extractor_label))
    return md, csv_path


def save_nfe_chart(
    path: str | Path, rows: Sequence[Row], headers: Sequence[str], title: str = "", better: dict[str, str] | None = None
) -> Path:
    """PNG: one panel per metric, the metric against NFE (log axis), one line per solver, each point
    named by its steps or tolerance; appears whole or not at all."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, FormatStrFormatter, NullLocator

    better = better or {}
    n = max(1, len(headers))
    ncols = min(3, n)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.8 * ncols, 3.6 * nrows), squeeze=False)
    by_solver: dict[str, list[Row]] = defaultdict(list)
    for row in rows:
        by_solver[row.solver].append(row)
    for ax, header in zip(axes.flat, headers):
        for solver, members in sorted(by_solver.items()):
            points = sorted((r.nfe, r.values.get(header, float("nan")), r.setting) for r in members)
            points = [p for p in points if math.isfinite(p[1])]
            if not points:
                continue
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=solver)
            for x, y, setting in points:
                ax.annotate(
                    setting.replace(" steps", ""), (x, y), xytext=(4, 4), textcoords="offset points", fontsize=7, color="0.3"
                )
        ax.set_xscale("log")
        nfes = sorted({r.nfe for r in rows if r.nfe > 0})
        if nfes:  # plain numbers at the NFEs of the table, not 2x10^0 at decades
            ax.xaxis.set_major_locator(FixedLocator(nfes))
            ax.xaxis.set_major_formatter(FormatStrFormatter("%d"))
            ax.xaxis.set_minor_locator(NullLocator())
        ax.ticklabel_format(axis="y", useOffset=False)
        ax.margins(x=0.12, y=0.12)
        ax.set_xlabel("NFE (network evaluations per volume)")
        arrow = {"lower": " (lower is better)", "higher": " (higher is better)"}.get(better.get(header, ""), "")
        ax.set_title(header + arrow, fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(headers) :]:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_png(fig, path)
