"""Materialised attention's memory, op by op: the planner's trace next to the GPU's allocator.

    .venv/bin/python benchmarks/attention_memory.py --device meta --out DIR   # the planner (no GPU)
    python benchmarks/attention_memory.py --device cuda --out DIR             # the same on a GPU

Two measurements:

1. `blocks.json` (cuda only): one MONAI attention block of a voxgen-built UNet under bf16 autocast,
   at 4,096 tokens (2 heads) and 5,120 tokens (8 heads, the third level of an 80x64x64 input), in
   bytes per score (token pair and head): what the forward keeps, its transient peak and the
   backward's peak, and the dtypes of the N x N tensors autograd saves. The planner's hand count
   (tests/memory/test_planner.py) is 6 / 10 / 16 B.
2. `ops_<name>.csv`: the steady training step of the grid's naive/sdpa pair (UNet 16 -> 8 channels at
   80x64x64, attention at 5,120 tokens; configs/grids/gpu_validation.yaml), one row per aten op:
   phase, module (forward) or autograd node (backward), op, live bytes after it and the peak inside
   it. On meta the figures are the planner's (its tracker, cuDNN and cuBLAS allowances included);
   on cuda, `torch.cuda.memory_allocated` and `max_memory_allocated` reset before each op.
   `summary.json` gives each step's peak, where it happened and the live bytes at the end of the
   forward.

Comparing the two CSVs (same ops in the same order for a given config) shows where the trace misses.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from voxgen.config import compose
from voxgen.memory.grid import load_grid
from voxgen.memory.tracker import Peak

REPO = Path(__file__).resolve().parents[1]
GRID = REPO / "configs/grids/gpu_validation.yaml"
PAIR = ("unet s2d 80x64x64 naive attention at 5,120 tokens", "unet s2d 80x64x64 sdpa at 5,120 tokens")
# (data shape, channels per level) of a two-level UNet whose second level holds the attention.
BLOCKS = {"4096 tokens, 2 heads": ([32, 32, 32], [32, 64]), "5120 tokens, 8 heads": ([40, 32, 32], [128, 256])}


def pair_configs() -> dict[str, object]:
    _, items = load_grid(GRID)
    return {entry.name: compose(entry.files, entry.overrides) for entry, _ in items if entry.name in PAIR}


class CudaOpTrace(TorchDispatchMode):
    """Per aten op on a GPU: live bytes after it and the allocator's peak inside it."""

    def __init__(self):
        super().__init__()
        self.rows: list[dict] = []
        self.phase = "forward"
        self.module_stack: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if torch._C._current_graph_task_id() != -1:
            self.phase = "backward"
        elif self.phase == "backward" and not self.module_stack:
            self.phase = "optimizer"
        torch.cuda.reset_peak_memory_stats()
        out = func(*args, **(kwargs or {}))
        node = torch._C._current_autograd_node() if self.phase == "backward" else None
        where = node.name() if node is not None else (self.module_stack[-1] if self.module_stack else "")
        self.rows.append(
            {
                "phase": self.phase,
                "where": where,
                "op": str(func),
                "live": torch.cuda.memory_allocated(),
                "peak": torch.cuda.max_memory_allocated(),
            }
        )
        return out


def trace_cuda(cfg) -> list[dict]:
    from voxgen.memory.profiler import TrainingStep
    from voxgen.memory.tracker import track_modules

    step = TrainingStep(cfg, "cuda")
    try:
        step.build()
        step()  # the first step creates the optimiser state; the steady step is traced
        torch.cuda.synchronize()
        trace = CudaOpTrace()
        hooks = track_modules(step.model, trace)
        try:
            with trace:
                step()
        finally:
            for h in hooks:
                h.remove()
        return trace.rows
    finally:
        step.close()
        torch.cuda.empty_cache()


def trace_meta(cfg) -> list[dict]:
    """The planner's own trace of the same step (both steps run; the second is kept)."""
    from voxgen.memory import planner

    rows: list[dict] = []
    original = planner._kernel_workspaces

    def record(tracker, func, args, out):
        before = tracker.peak.bytes
        tracker.reset_peak()
        original(tracker, func, args, out)  # adds the cuDNN workspace as a transient
        rows.append(
            {
                "phase": tracker.phase,
                "where": tracker._where(),
                "op": str(func),
                "live": tracker.live + planner.CUBLAS_WORKSPACE,
                "peak": tracker.peak.bytes + planner.CUBLAS_WORKSPACE,
            }
        )
        tracker.peak = max(tracker.peak, Peak(before), key=lambda p: p.bytes)

    planner._kernel_workspaces = record
    try:
        planner.plan(cfg)
    finally:
        planner._kernel_workspaces = original
    # The steady step: from the second forward's first op on.
    starts = [i for i, r in enumerate(rows) if r["phase"] == "forward" and (i == 0 or rows[i - 1]["phase"] != "forward")]
    return rows[starts[1] :] if len(starts) > 1 else rows


def summarise(rows: list[dict]) -> dict:
    top = max(range(len(rows)), key=lambda i: rows[i]["peak"])
    forward_end = max((i for i, r in enumerate(rows) if r["phase"] == "forward"), default=0)
    return {
        "ops": len(rows),
        "peak_bytes": rows[top]["peak"],
        "peak_at": {k: rows[top][k] for k in ("phase", "where", "op")},
        "peak_index": top,
        "live_after_forward": rows[forward_end]["live"],
        "live_at_start": rows[0]["live"],
    }


def block_bytes_per_score() -> dict:
    """Measure (1): one attention block on the GPU, bytes per score."""
    from monai.networks.blocks.spatialattention import SpatialAttentionBlock

    from voxgen.diffusion.parts import build_parts

    results = {}
    for label, (shape, channels) in BLOCKS.items():
        cfg = compose(
            [],
            [
                f"data.shape=[{','.join(map(str, shape))}]",
                f"model.channels=[{','.join(map(str, channels))}]",
                "model.attention_levels=[false,true]",
                "model.num_head_channels=32",
                "model.norm_num_groups=32",
                "model.attention=naive",
            ],
        )
        unet = build_parts(cfg, "cuda").model
        block = next(m for m in unet.modules() if isinstance(m, SpatialAttentionBlock))
        side = [s // 2 for s in shape]
        tokens = side[0] * side[1] * side[2]
        heads = channels[1] // 32
        scores = tokens * tokens * heads
        x = torch.randn(1, channels[1], *side, device="cuda", requires_grad=True)
        saved = []

        def pack(t, saved=saved, scores=scores):
            if t.numel() >= scores:
                saved.append(str(t.dtype))
            return t

        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                y = block(x)
            kept = torch.cuda.memory_allocated() - before
            forward_peak = torch.cuda.max_memory_allocated() - before
            torch.cuda.reset_peak_memory_stats()
            y.float().sum().backward()
        backward_peak = torch.cuda.max_memory_allocated() - before
        results[label] = {
            "tokens": tokens,
            "heads": heads,
            "saved_nxn": sorted(saved),
            "kept_per_score": kept / scores,
            "forward_peak_per_score": forward_peak / scores,
            "backward_peak_per_score": backward_peak / scores,
            "planner_hand_count": [6, 10, 16],
        }
        del unet, block, x, y
        torch.cuda.empty_cache()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["meta", "cuda"], required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    summary = {}
    if args.device == "cuda":
        blocks = block_bytes_per_score()
        (args.out / "blocks.json").write_text(json.dumps(blocks, indent=1))
        print(json.dumps(blocks, indent=1), flush=True)
    for name, cfg in pair_configs().items():
        rows = trace_cuda(cfg) if args.device == "cuda" else trace_meta(cfg)
        kind = "naive" if "naive" in name else "sdpa"
        with open(args.out / f"ops_{kind}_{args.device}.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["index", *rows[0]])
            writer.writeheader()
            for i, r in enumerate(rows):
                writer.writerow({"index": i, **r})
        summary[name] = summarise(rows)
        print(name, json.dumps(summary[name]), flush=True)
    (args.out / f"summary_{args.device}.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
