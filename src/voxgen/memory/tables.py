"""Memory tables: one row per configuration, planned (`voxgen plan --grid`) or measured
(`voxgen profile`), written as CSV and Markdown in the layout of the seeds' tables.

A row describes the network (family, the [D, H, W] it sees, tokens for patch-based transformers,
voxels for everything, channels, parameters) and the memory of one training step: predicted by
the planner, measured on a GPU, or both. Sizes are bytes in memory and GiB (2^30) in the files.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from voxgen.files import write_atomic

GiB = 2**30

# Columns of a planner table and of a profiler table; the first ones are shared so the two
# files line up when compared side by side.
NETWORK_COLUMNS = [
    "config",
    "model",
    "D",
    "H",
    "W",
    "patch",
    "tokens",
    "voxels",
    "in_channels",
    "out_channels",
    "batch_size",
    "precision",
    "params_m",
]
PLAN_COLUMNS = NETWORK_COLUMNS + ["first_step_gib", "steady_gib", "gpu_gib", "verdict", "peak_phase", "peak_module"]
PROFILE_COLUMNS = NETWORK_COLUMNS + [
    "first_step_gib",
    "steady_gib",
    "reserved_first_gib",
    "reserved_steady_gib",
    "status",
    "planned_first_gib",
    "planned_steady_gib",
    "error_first_pct",
    "error_steady_pct",
    "planned_required_gib",
    "error_required_pct",
    "planned_reserved_gib",
    "band_high_gib",
    "verdict",
    "gpu_gib",
    "gpu",
    "torch",
    "cudnn",
]

# Markdown headers (the CSV keeps the machine-readable names above).
_LABELS = {
    "config": "config",
    "model": "model",
    "patch": "patch",
    "tokens": "tokens",
    "voxels": "voxels",
    "in_channels": "in",
    "out_channels": "out",
    "batch_size": "batch",
    "precision": "precision",
    "params_m": "params M",
    "first_step_gib": "first step GiB",
    "steady_gib": "steady GiB",
    "gpu_gib": "GPU GiB",
    "verdict": "verdict",
    "peak_phase": "peak phase",
    "peak_module": "peak module",
    "reserved_first_gib": "reserved first GiB",
    "reserved_steady_gib": "reserved steady GiB",
    "status": "status",
    "planned_first_gib": "planned first GiB",
    "planned_steady_gib": "planned steady GiB",
    "error_first_pct": "error first",
    "error_steady_pct": "error steady",
    "planned_required_gib": "planned required GiB",
    "error_required_pct": "error required",
    "planned_reserved_gib": "planned reserved GiB",
    "band_high_gib": "band top GiB",
}
# Columns left out of the Markdown table (constant over a table: said once above it).
_MARKDOWN_SKIP = {"gpu", "torch", "cudnn"}
# Columns moved above the Markdown table when every row has the same value.
_FACTORED = {"model", "in_channels", "out_channels", "batch_size", "precision", "gpu_gib"}


@dataclass
class Network:
    """What a configuration builds: enough to sort, label and chart it without planning it."""

    model: str
    shape: tuple[int, int, int]  # [D, H, W] the network sees (after the space)
    in_channels: int
    out_channels: int
    params: int
    patch: int | None = None  # patch size of a token-based network
    batch_size: int = 1
    precision: str = "fp32"

    @property
    def voxels(self) -> int:
        return math.prod(self.shape)

    @property
    def tokens(self) -> int | None:
        return None if self.patch is None else math.prod(s // self.patch for s in self.shape)

    @property
    def size(self) -> int:
        """Tokens for patch-based transformers, voxels otherwise: the x axis of the memory chart."""
        return self.tokens if self.tokens is not None else self.voxels


@dataclass
class Row:
    """One configuration of a table. Memory fields are bytes; None where not known."""

    config: str
    network: Network
    series: str = ""
    gpu_memory_bytes: int | None = None
    planned_first: int | None = None
    planned_steady: int | None = None
    verdict: str = ""  # the planner's: fits, tight, does not fit
    planned_required: int | None = None  # the planner's need with cuDNN's smallest workspaces
    planned_reserved: int | None = None  # the planner's reserved memory of the steady step
    band_high: int | None = None  # top of the planner's band (what `fit` judges)
    peak_phase: str = ""
    peak_module: str = ""
    measured_first: int | None = None
    measured_steady: int | None = None
    reserved_first: int | None = None
    reserved_steady: int | None = None
    status: str = ""  # profiler: OK, OOM (first step), OOM (steady step), ...
    environment: dict = field(default_factory=dict)  # gpu, torch, cudnn of a measurement

    def record(self) -> dict[str, str]:
        """Every column of either table, formatted as it appears in the files."""
        n = self.network
        rec = {
            "config": self.config,
            "model": n.model,
            "D": str(n.shape[0]),
            "H": str(n.shape[1]),
            "W": str(n.shape[2]),
            "patch": _opt(n.patch),
            "tokens": _opt(n.tokens),
            "voxels": str(n.voxels),
            "in_channels": str(n.in_channels),
            "out_channels": str(n.out_channels),
            "batch_size": str(n.batch_size),
            "precision": n.precision,
            "params_m": f"{n.params / 1e6:.1f}",
            "gpu_gib": _gib(self.gpu_memory_bytes, 1),
            "verdict": self.verdict,
            "peak_phase": self.peak_phase,
            "peak_module": self.peak_module,
            "reserved_first_gib": _gib(self.reserved_first),
            "reserved_steady_gib": _gib(self.reserved_steady),
            "status": self.status,
            "planned_first_gib": _gib(self.planned_first),
            "planned_steady_gib": _gib(self.planned_steady),
            "planned_required_gib": _gib(self.planned_required),
            "error_required_pct": _error(self.planned_required, self.measured_steady),
            "planned_reserved_gib": _gib(self.planned_reserved),
            "band_high_gib": _gib(self.band_high),
            "error_first_pct": _error(self.planned_first, self.measured_first),
            "error_steady_pct": _error(self.planned_steady, self.measured_steady),
            "gpu": self.environment.get("gpu", ""),
            "torch": self.environment.get("torch", ""),
            "cudnn": self.environment.get("cudnn", ""),
        }
        measured = self.measured_first is not None or self.status
        rec["first_step_gib"] = _gib(self.measured_first if measured else self.planned_first)
        rec["steady_gib"] = _gib(self.measured_steady if measured else self.planned_steady)
        return rec


def _opt(value) -> str:
    return "" if value is None else str(value)


def _gib(nbytes: int | None, digits: int = 2) -> str:
    return "" if nbytes is None else f"{nbytes / GiB:.{digits}f}"


def _error(planned: int | None, measured: int | None) -> str:
    """Signed relative error of the plan against the measurement, in percent."""
    if planned is None or not measured:
        return ""
    return f"{100 * (planned - measured) / measured:+.1f}"


def to_csv(rows: Iterable[Row], columns: Sequence[str]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(row.record())
    return buf.getvalue()


def to_markdown(rows: Iterable[Row], columns: Sequence[str], title: str = "", notes: Sequence[str] = ()) -> str:
    cols = [c for c in columns if c not in _MARKDOWN_SKIP and c not in ("D", "H", "W")]
    cols.insert(cols.index("model") + 1, "D,H,W")
    rows = list(rows)
    records = [row.record() for row in rows]
    # A column with one value over the whole table is said once above it.
    constant = [c for c in cols if c in _FACTORED and len(rows) > 1 and len({r[c] for r in records}) == 1 and records[0][c]]
    empty = [c for c in cols if c not in ("config", "D,H,W") and records and not any(r[c] for r in records)]
    cols = [c for c in cols if c not in constant and c not in empty]
    lines = [f"# {title}", ""] if title else []
    for note in notes:
        lines += [note, ""]
    if constant:
        lines += ["All rows: " + ", ".join(f"{_LABELS.get(c, c)} {records[0][c]}" for c in constant) + ".", ""]
    lines.append("| " + " | ".join(_LABELS.get(c, c) for c in cols) + " |")
    lines.append("|" + "---|" * len(cols))
    for rec in records:
        rec["D,H,W"] = f"{rec['D']},{rec['H']},{rec['W']}"
        for key in ("tokens", "voxels"):
            rec[key] = f"{int(rec[key]):,}" if rec[key] else "-"
        for key in ("error_first_pct", "error_steady_pct", "error_required_pct"):
            rec[key] = f"{rec[key]}%" if rec[key] else "-"
        lines.append("| " + " | ".join(rec[c].replace("|", "/") or "-" for c in cols) + " |")
    return "\n".join(lines) + "\n"


def write_tables(
    rows: Sequence[Row], out_dir: str | Path, stem: str, columns: Sequence[str], title: str, notes: Sequence[str] = ()
) -> tuple[Path, Path]:
    """DIR/STEM.csv and DIR/STEM.md; returns their paths."""
    out_dir = Path(out_dir)
    csv_path = write_atomic(out_dir / f"{stem}.csv", to_csv(rows, columns))
    md_path = write_atomic(out_dir / f"{stem}.md", to_markdown(rows, columns, title, notes))
    return csv_path, md_path
