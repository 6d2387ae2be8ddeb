"""`voxgen fit`: the largest configuration of a cartesian product that fits a GPU, with a margin.

Candidates are ordered by parameters, ties broken by tokens (transformers) or voxels, then by
what a run costs: fewer processes first (`world_size`, the pseudo-key of the torchrun job: each
candidate is planned per rank), no gradient checkpointing before it, DDP before FSDP. They are
planned in that order; the first whose band top (`Plan.band_bytes[2]`: reserved memory with the
planner's measured error added, see `voxgen.memory.planner`) is within the budget, GPU memory x
(1 - margin), is the answer, and the candidate just before it in that order is the one that does
not fit. Candidates the model cannot build are listed as invalid with their one-line reason.
Candidates that differ only in world size and sharding share one trace of the step.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from voxgen.errors import ConfigError
from voxgen.memory.tables import GiB, Network

FITS, TOO_BIG, NOT_PLANNED, INVALID = "fits", "too big", "not planned", "invalid"
# Not a config key: the number of processes of the torchrun job a candidate is planned for.
WORLD_SIZE = "world_size"


def split_values(text: str) -> list[str]:
    """'2,4,8' -> ['2','4','8']; commas inside brackets stay: '[20,32,32],[40,64,64]' -> two values."""
    values, depth, current = [], 0, ""
    for ch in text:
        if ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        if ch == "," and depth == 0:
            values.append(current.strip())
            current = ""
        else:
            current += ch
    values.append(current.strip())
    return values


def parse_vary(texts: Sequence[str]) -> list[tuple[str, list[str]]]:
    """['model.variant=S,B', ...] -> [('model.variant', ['S', 'B']), ...]."""
    axes = []
    for text in texts:
        if "=" not in text:
            raise ConfigError(f"--vary {text!r} is not of the form KEY=V1,V2,...")
        key, raw = text.split("=", 1)
        values = split_values(raw)
        if not key.strip() or any(v == "" for v in values):
            raise ConfigError(f"--vary {text!r} has an empty key or value")
        if any(k == key.strip() for k, _ in axes):
            raise ConfigError(f"--vary {key.strip()} is given twice")
        if key.strip() == WORLD_SIZE:
            _world_sizes(values)
        axes.append((key.strip(), values))
    if not axes:
        raise ConfigError("voxgen fit needs at least one --vary KEY=V1,V2,...")
    return axes


def _world_sizes(values: list[str]) -> list[int]:
    try:
        sizes = [int(v) for v in values]
    except ValueError:
        sizes = []
    if len(sizes) != len(values) or min(sizes) < 1:
        raise ConfigError(f"--vary {WORLD_SIZE}={','.join(values)}: give numbers of processes, each at least 1")
    return sizes


@dataclass
class Candidate:
    label: str  # 'model.variant=L model.patch_size=4'
    overrides: list[str]  # config overrides (world_size is not one)
    world_size: int = 1
    status: str = NOT_PLANNED
    network: Network | None = None
    reason: str = ""  # why it is invalid
    peak_bytes: int | None = None
    peak_bytes_first_step: int | None = None
    peak_phase: str = ""
    peak_module: str = ""
    band_bytes: list[int] | None = None  # [low, expected, high] reserved bytes
    outside_bytes: int = 0  # GPU memory taken outside the caching allocator (NCCL's buffers)
    cfg: object = field(default=None, repr=False)

    @property
    def needs_bytes(self) -> int | None:
        """What is compared with the budget: the band's top, and what NCCL takes on a rank."""
        return self.band_bytes[2] + self.outside_bytes if self.band_bytes else None

    def to_json(self) -> dict:
        n = self.network
        return {
            "label": self.label,
            "overrides": self.overrides,
            "status": self.status,
            "reason": self.reason or None,
            "params": n.params if n else None,
            "tokens": n.tokens if n else None,
            "voxels": n.voxels if n else None,
            "shape": list(n.shape) if n else None,
            "peak_bytes": self.peak_bytes,
            "peak_bytes_first_step": self.peak_bytes_first_step,
            "peak_phase": self.peak_phase,
            "peak_module": self.peak_module,
            "band_bytes": self.band_bytes,
            "world_size": self.world_size,
        }


@dataclass
class FitResult:
    gpu_memory_bytes: int
    margin: float
    candidates: list[Candidate]  # valid ones largest first, then invalid ones
    best: Candidate | None
    next_up: Candidate | None

    @property
    def budget_bytes(self) -> int:
        return int(self.gpu_memory_bytes * (1 - self.margin))

    def why_not_next(self) -> str:
        if self.next_up is None:
            return "it is the largest candidate" if self.best else "no candidate is valid"
        return (
            f"next one up, {self.next_up.label} ({self.next_up.network.params / 1e6:.1f} M parameters), "
            f"needs up to {self.next_up.needs_bytes / GiB:.2f} GiB > budget {self.budget_bytes / GiB:.2f} GiB "
            f"({self.gpu_memory_bytes / GiB:.0f} GiB - {100 * self.margin:.0f}%)"
        )

    def to_json(self) -> dict:
        return {
            "gpu_memory_bytes": self.gpu_memory_bytes,
            "margin": self.margin,
            "budget_bytes": self.budget_bytes,
            "best": self.best.to_json() if self.best else None,
            "next_up": self.next_up.to_json() if self.next_up else None,
            "why_not_next": self.why_not_next(),
            "candidates": [c.to_json() for c in self.candidates],
        }


def candidates(axes: Sequence[tuple[str, list[str]]]) -> list[Candidate]:
    keys = [k for k, _ in axes]
    out = []
    for combo in itertools.product(*(values for _, values in axes)):
        pairs = list(zip(keys, combo))
        label = " ".join(f"{k}={v}" for k, v in pairs)
        world = [int(v) for k, v in pairs if k == WORLD_SIZE]
        overrides = [f"{k}={v}" for k, v in pairs if k != WORLD_SIZE]
        out.append(Candidate(label, overrides, world[0] if world else 1))
    return out


def _order_key(c: Candidate):
    """Largest first; among the same network, the cheapest run first: fewer processes, no
    gradient checkpointing before it (it recomputes the forward), DDP before FSDP."""
    training = c.cfg.training
    cost = (c.world_size, bool(training.grad_checkpointing), training.sharding == "fsdp" and c.world_size > 1)
    return (-c.network.params, -c.network.size, cost)


def fit(
    axes: Sequence[tuple[str, list[str]]],
    gpu_memory_bytes: int,
    margin: float = 0.1,
    files: Sequence[str] = (),
    overrides: Sequence[str] = (),
    plan_all: bool = False,
    planner: Callable | None = None,
    on_plan: Callable[[Candidate], None] | None = None,
) -> FitResult:
    """Search the product of `axes` (over `files` and `overrides`) for the largest config that fits.

    `planner(cfg, gpu_memory_bytes, world_size=N) -> Plan` defaults to the memory planner; `on_plan`
    is called before each candidate is planned (progress).
    """
    from voxgen.config import compose
    from voxgen.memory.grid import describe

    if not 0 <= margin < 1:
        raise ConfigError(f"--margin {margin} must be in [0, 1)")
    planner = planner or tracing_planner()
    pool = candidates(axes)
    for c in pool:
        try:
            c.cfg = compose(files, [*overrides, *c.overrides])
            c.network = describe(c.cfg)
        except ConfigError as exc:
            c.status, c.reason = INVALID, str(exc)
    valid = sorted((c for c in pool if c.status != INVALID), key=_order_key)
    invalid = [c for c in pool if c.status == INVALID]
    result = FitResult(gpu_memory_bytes, margin, valid + invalid, None, None)
    budget = result.budget_bytes
    previous = None
    for c in valid:
        if result.best is not None and not plan_all:
            break
        if on_plan is not None:
            on_plan(c)
        try:
            p = planner(c.cfg, gpu_memory_bytes, world_size=c.world_size)
        except ConfigError as exc:
            c.status, c.reason = INVALID, str(exc)
            continue
        c.peak_bytes, c.peak_bytes_first_step = p.peak_bytes, p.peak_bytes_first_step
        c.peak_phase, c.peak_module, c.band_bytes = p.peak_phase, p.peak_module, p.band_bytes
        c.outside_bytes = p.collectives.get("nccl_bytes", 0) if c.world_size > 1 else 0
        # The band's top (reserved memory, error included): a pick never runs out on the GPU.
        c.status = FITS if c.needs_bytes <= budget else TOO_BIG
        if c.status == FITS and result.best is None:
            result.best, result.next_up = c, previous
        if c.status == TOO_BIG:
            previous = c
    # Candidates that turned out invalid while planning go with the invalid ones.
    result.candidates = [c for c in valid if c.status != INVALID] + [c for c in valid if c.status == INVALID] + invalid
    return result


def tracing_planner() -> Callable:
    """The memory planner, tracing a configuration once for all the world sizes and shardings it
    is planned for (they change how the step's memory is spread over ranks, not the step)."""
    import dataclasses

    from voxgen.memory.planner import plan_trace, trace_step

    last: dict = {}

    def planner(cfg, gpu_memory_bytes: int, world_size: int = 1):
        key = _trace_key(cfg)
        if key not in last:
            last.clear()  # candidates of one network are planned one after the other
            last[key] = trace_step(cfg)
        return plan_trace(dataclasses.replace(last[key], cfg=cfg), gpu_memory_bytes, world_size)

    return planner


def _trace_key(cfg) -> str:
    import json

    from voxgen.config import to_dict

    values = to_dict(cfg)
    for key in ("sharding", "fsdp_unit_params"):
        values["training"].pop(key, None)
    return json.dumps(values, sort_keys=True, default=str)


def format_table(result: FitResult) -> list[str]:
    """Text table of the candidates, largest first."""
    rows = [("candidate", "params M", "tokens/voxels", "steady GiB", "needs up to GiB", "verdict")]
    for c in result.candidates:
        n = c.network
        size = "" if n is None else (f"{n.tokens:,} tok" if n.tokens is not None else f"{n.voxels:,} vox")
        # Below the answer: a smaller network, or the same one run at a higher cost (more GPUs, checkpointing).
        same = c.status == NOT_PLANNED and result.best and _order_key(c)[:2] == _order_key(result.best)[:2]
        below = "costlier run" if same else "smaller"
        verdict = {INVALID: f"invalid: {c.reason}", NOT_PLANNED: f"{below} (not planned; --all plans it)"}.get(c.status, c.status)
        if c is result.best:
            verdict = "FITS <- largest"
        rows.append(
            (
                c.label,
                f"{n.params / 1e6:.1f}" if n else "-",
                size or "-",
                f"{c.peak_bytes / GiB:.2f}" if c.peak_bytes is not None else "-",
                f"{c.needs_bytes / GiB:.2f}" if c.needs_bytes is not None else "-",
                verdict,
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return ["  ".join(cell.ljust(w) for cell, w in zip(r[:-1], widths)) + "  " + r[-1] for r in rows]
