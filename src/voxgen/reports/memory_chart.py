"""Memory chart: peak GPU memory of one training step against tokens (transformers) or voxels
(convolutional networks), one panel per model family, one line per series, log-log axes."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from voxgen.reports import save_png

GiB = 2**30
_MAX_LABELS = 40  # name the points of a panel when it has at most this many
_NICE = [0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000]


def _place_labels(ax, labels) -> None:
    """Name points, highest first, skipping a name that would sit on one already placed."""
    placed: list[tuple[float, float]] = []
    for x, y, text in sorted(labels, key=lambda item: -item[1]):
        lx, ly = math.log10(x), math.log10(y)
        if any(abs(lx - px) < 0.35 and abs(ly - py) < 0.08 for px, py in placed):
            continue
        placed.append((lx, ly))
        ax.annotate(text, (x, y), xytext=(6, -4), textcoords="offset points", fontsize=7, color="0.25")


def _values(row) -> tuple[float | None, float | None, bool]:
    """(steady GiB, first-step GiB, measured?) of a row: measured when it has a measurement."""
    if row.measured_steady is not None or row.measured_first is not None:
        pair = (row.measured_steady, row.measured_first)
        measured = True
    else:
        pair = (row.planned_steady, row.planned_first)
        measured = False
    return tuple(None if v is None else v / GiB for v in pair) + (measured,)


def save_memory_chart(path: str | Path, rows: Sequence, gpu_memory_bytes: int | None = None, title: str = "") -> Path:
    """Write a PNG of `rows` (voxgen.memory.tables.Row); appears whole or not at all.

    Filled markers joined by a line: steady-state peak (allocated); hollow markers:
    first step (fresh optimiser, the seeds' protocol). Rows that ran out of memory are drawn as
    red crosses at the GPU's memory.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

    families: dict[str, list] = defaultdict(list)
    for row in rows:
        families[row.network.model].append(row)
    n = len(families)
    fig, axes = plt.subplots(1, n, figsize=(8.6 * n, 5.4), squeeze=False)
    gpu_gib = gpu_memory_bytes / GiB if gpu_memory_bytes else None
    for ax, (family, members) in zip(axes[0], sorted(families.items())):
        tokens = members[0].network.patch is not None
        by_series: dict[str, list] = defaultdict(list)
        for row in members:
            by_series[row.series or family].append(row)
        cmap = plt.get_cmap("tab10" if len(by_series) <= 10 else "tab20")
        any_measured = False
        labels: list[tuple[float, float, str]] = []
        ordered = sorted(by_series.items(), key=lambda kv: (min(r.network.params for r in kv[1]), kv[0]))
        for i, (series, srows) in enumerate(ordered):
            color = cmap(i % cmap.N)
            srows = sorted(srows, key=lambda r: r.network.size)
            pts = [(r.network.size, *_values(r)) for r in srows]
            ok = [(x, s, f) for x, s, f, _ in pts if s is not None]
            any_measured |= any(m for *_, m in pts)
            if ok:
                ax.plot([p[0] for p in ok], [p[1] for p in ok], "-o", color=color, label=series, markersize=6, lw=1.5)
                ax.plot([p[0] for p in ok if p[2]], [p[2] for p in ok if p[2]], "o", mfc="none", color=color, markersize=10, lw=0)
            ooms = [r.network.size for r in srows if r.status.startswith("OOM")]
            if ooms and gpu_gib:
                ax.plot(ooms, [gpu_gib] * len(ooms), "x", color="red", markersize=10, mew=2)
            if len(members) <= _MAX_LABELS:
                for row, (x, s, _, _) in zip(srows, pts):
                    y = s if s is not None else gpu_gib
                    if y:
                        labels.append((x, y, row.config))
        _place_labels(ax, labels)
        if gpu_gib:
            ax.axhline(gpu_gib, color="red", ls="--", lw=1)
            ax.text(
                0.99,
                gpu_gib,
                f"GPU {gpu_gib:.0f} GiB",
                color="red",
                fontsize=8,
                va="bottom",
                ha="right",
                transform=ax.get_yaxis_transform(),
            )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(FixedLocator(_NICE))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("tokens per sample (patch-embedded)" if tokens else "voxels per sample (network input)")
        what = "measured" if any_measured else "predicted"
        ax.set_ylabel(f"{what} peak GPU memory of a training step (GiB)")
        ax.set_title(family)
        ax.grid(True, which="major", alpha=0.4)
        ax.grid(True, which="minor", alpha=0.15)
        handles, names = ax.get_legend_handles_labels()
        handles = [
            plt.Line2D([], [], marker="o", color="0.3", lw=0, markersize=6),
            plt.Line2D([], [], marker="o", mfc="none", color="0.3", lw=0, markersize=9),
        ] + handles
        names = ["steady step", "first step (fresh optimiser)"] + names
        ax.legend(handles, names, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
        # Room on the right for the names of the largest points (log axis: in decades).
        lo, hi = min(r.network.size for r in members), max(r.network.size for r in members)
        span = max(math.log10(hi / lo), 1.0)
        ax.set_xlim(lo / 10 ** (0.08 * span), hi * 10 ** (0.3 * span))
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return save_png(fig, path, dpi=110)
