"""Figures: slice mosaics, curves, memory charts."""

from __future__ import annotations

from pathlib import Path


def save_png(fig, path: str | Path, dpi: int = 100) -> Path:
    """Write a matplotlib figure as PNG, whole or not at all (temporary file, then rename), and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, dpi=dpi, format="png")
    plt.close(fig)
    tmp.replace(path)
    return path
