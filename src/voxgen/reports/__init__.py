"""Figures: slice mosaics, curves, memory charts."""

from __future__ import annotations

from pathlib import Path

from voxgen.files import atomic_path


def save_png(fig, path: str | Path, dpi: int = 100) -> Path:
    """Write a matplotlib figure as PNG, whole or not at all (temporary file, then rename), and close it."""
    import matplotlib.pyplot as plt

    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=dpi, format="png")
    finally:
        plt.close(fig)
    return Path(path)
