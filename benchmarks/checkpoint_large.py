"""Checkpoint store at full size: a ~680M-parameter DiT-XL with its EMA and AdamW moments.

    .venv/bin/python benchmarks/checkpoint_large.py [--dir runs/checkpoint-bench] [--out docs/checkpoint-benchmark.md]

Builds the model the trainer builds (model.name=dit model.variant=XL model.patch_size=4
data.shape=[80,64,64]) on the CPU, takes one AdamW step on random gradients so the optimiser
holds its moments, and saves model + EMA + optimizer tensors the way the trainer names them
(about 10 GiB at fp32) with the default 1.9 GiB shard cap. Then:

- every file in the checkpoint folder is checked against the cap (header included);
- the checkpoint is read back shard by shard (`iter_tensors`, checksums verified) and every
  tensor compared bit for bit with the one in memory, so two full copies are never held;
- the in-memory state is dropped, the shards are evicted from the page cache, and the whole
  checkpoint is loaded with `load_latest`, as a resuming trainer does.

The run folder is deleted at the end. Needs ~11 GiB free on disk and ~16 GiB of free memory.
Run on purpose, not in CI.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import resource
import shutil
import sys
import time
from pathlib import Path

import torch

from voxgen import checkpoint as store
from voxgen.config import compose
from voxgen.diffusion.parts import build_parts
from voxgen.training.ema import EMA
from voxgen.training.state import optimizer_to_checkpoint
from voxgen.training.step import make_optimizer

GiB = 2**30
OVERRIDES = ["model.name=dit", "model.variant=XL", "model.patch_size=4", "data.shape=[80,64,64]"]


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _meminfo(key: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def available_memory() -> int:
    return _meminfo("MemAvailable")


def total_memory() -> int:
    return _meminfo("MemTotal")


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


def build_state(overrides: list[str], seed: int) -> tuple[dict[str, torch.Tensor], dict, int]:
    """(tensors named as the trainer names them, JSON state, parameter count)."""
    cfg = compose([], overrides)
    parts = build_parts(cfg, "cpu")
    model = parts.model
    params = sum(p.numel() for p in model.parameters())
    optimizer = make_optimizer(model, cfg)
    generator = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=generator) * 1e-3
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    ema = EMA(model, cfg.training.ema_decay)
    optim_tensors, groups = optimizer_to_checkpoint(optimizer)
    tensors = {
        **store.with_prefix(model.state_dict(), "model/"),
        **store.with_prefix(ema.module.state_dict(), "ema/"),
        **store.with_prefix(optim_tensors, "optimizer/"),
        "rng/generator": generator.get_state(),
    }
    state = {"step": 1, "optimizer_param_groups": groups, "metrics": {"val_loss_ema": 0.5}, "overrides": overrides}
    return tensors, state, params


def evict(folder: Path) -> None:
    """Drop the checkpoint's pages from the page cache, so the load below reads the disk."""
    for path in folder.iterdir():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path("runs/checkpoint-bench"))
    parser.add_argument("--out", type=Path, default=Path("docs/checkpoint-benchmark.md"))
    parser.add_argument("--max-shard-bytes", type=int, default=store.DEFAULT_MAX_SHARD_BYTES)
    parser.add_argument("overrides", nargs="*", help="KEY=VALUE applied after the DiT-XL settings (e.g. a smaller model)")
    args = parser.parse_args()
    overrides = OVERRIDES + args.overrides
    run_dir: Path = args.dir
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    if store.list_checkpoints(run_dir):
        print(f"error: {run_dir} already holds checkpoints; give an empty --dir", file=sys.stderr)
        return 2
    free_disk, free_mem = shutil.disk_usage(run_dir).free, available_memory()
    print(f"free: {free_disk / GiB:.1f} GiB disk in {run_dir}, {free_mem / GiB:.1f} GiB memory")
    if not args.overrides and (free_disk < 12 * GiB or free_mem < 16 * GiB):
        print("error: the DiT-XL run needs 12 GiB free disk and 16 GiB free memory", file=sys.stderr)
        return 2

    rows: list[tuple[str, str]] = [("load average at start (1 min)", f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")]
    try:
        start = time.perf_counter()
        tensors, state, params = build_state(overrides, seed=0)
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        largest_tensor = max(t.numel() * t.element_size() for t in tensors.values())
        rows += [
            ("model", " ".join(overrides)),
            ("parameters", f"{params:,}"),
            ("tensors", f"{len(tensors)} (model, EMA, AdamW exp_avg/exp_avg_sq/step, RNG)"),
            ("tensor bytes", f"{total / GiB:.2f} GiB ({total:,} bytes)"),
            ("largest tensor", f"{largest_tensor / 2**20:.1f} MiB"),
            ("build (model, one AdamW step, EMA)", f"{time.perf_counter() - start:.1f} s"),
        ]
        print(f"built {params:,} parameters, {total / GiB:.2f} GiB of tensors")

        start = time.perf_counter()
        folder = store.save_checkpoint(run_dir, 1, tensors, state, max_shard_bytes=args.max_shard_bytes)
        save_s = time.perf_counter() - start
        sizes = {p.name: p.stat().st_size for p in folder.iterdir()}
        largest = max(sizes, key=sizes.get)
        over = [name for name, size in sizes.items() if size > args.max_shard_bytes]
        on_disk = sum(sizes.values())
        rows += [
            ("save", f"{save_s:.1f} s ({on_disk / GiB / save_s:.2f} GiB/s, serialise + crc32 + write + fsync)"),
            ("files", f"{len(sizes)} ({sum(n.endswith('.safetensors') for n in sizes)} shards), {on_disk / GiB:.2f} GiB on disk"),
            ("cap", f"{args.max_shard_bytes:,} bytes ({args.max_shard_bytes / GiB:.3f} GiB)"),
            ("largest file", f"{largest}: {sizes[largest]:,} bytes ({sizes[largest] / GiB:.3f} GiB)"),
            ("files over the cap", str(len(over))),
            ("peak RSS after save", f"{peak_rss() / GiB:.1f} GiB"),
        ]
        print(f"saved in {save_s:.1f} s; largest file {sizes[largest]:,} bytes; over the cap: {over}")

        start = time.perf_counter()
        compared, mismatched = 0, []
        for name, loaded in store.iter_tensors(folder):
            original = tensors[name]
            if loaded.dtype != original.dtype or loaded.shape != original.shape or not torch.equal(bits(loaded), bits(original)):
                mismatched.append(name)
            compared += 1
        verify_s = time.perf_counter() - start
        missing = len(tensors) - compared
        rows += [
            ("read + compare, shard by shard", f"{verify_s:.1f} s (files just written: read mostly from the page cache)"),
            (
                "tensors bit-equal",
                f"{compared - len(mismatched)} of {len(tensors)} ({len(mismatched)} differ, {missing} missing)",
            ),
        ]
        print(f"compared {compared} tensors in {verify_s:.1f} s; differ: {mismatched[:5]}; missing: {missing}")

        del tensors
        gc.collect()
        evict(folder)
        start = time.perf_counter()
        found_folder, loaded_tensors, loaded_state = store.load_latest(run_dir)
        load_s = time.perf_counter() - start
        loaded_total = sum(t.numel() * t.element_size() for t in loaded_tensors.values())
        ok_load = found_folder == folder and loaded_total == total and loaded_state["step"] == 1
        rows += [
            (
                "load_latest (whole checkpoint)",
                f"{load_s:.1f} s ({loaded_total / GiB / load_s:.2f} GiB/s, read + crc32 + copy; "
                "files evicted from the page cache first)",
            ),
            ("load_latest returned", f"{len(loaded_tensors)} tensors, {loaded_total:,} bytes, step {loaded_state['step']}"),
            ("peak RSS overall", f"{peak_rss() / GiB:.1f} GiB"),
        ]
        print(f"load_latest in {load_s:.1f} s, {loaded_total:,} bytes")
        del loaded_tensors
        passed = not over and not mismatched and not missing and ok_load
    finally:
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
        if created:
            run_dir.rmdir()

    command = " ".join([".venv/bin/python", "benchmarks/checkpoint_large.py", *sys.argv[1:]])
    machine = (
        f"{cpu_name()}, {os.cpu_count()} CPU cores, {total_memory() / GiB:.0f} GiB memory, "
        f"{platform.system()}, Python {platform.python_version()}, torch {torch.__version__}"
    )
    lines = [
        "# Checkpoint store at full size",
        "",
        "A DiT-XL of ~680M parameters with its EMA copy and AdamW moments, saved and loaded by",
        "`voxgen.checkpoint` with the default shard cap. Produced by:",
        "",
        "```",
        command,
        "```",
        "",
        f"Machine: {machine}.",
        "",
        "The cores are shared with other jobs (see the load average in the table), so the times",
        "are those of a busy machine.",
        "",
        f"Disk: the file system under `{run_dir}`; the checkpoint folder is deleted after the run.",
        "",
        "| | |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in rows],
        "",
        (
            f"Result: {'PASS' if passed else 'FAIL'}: no file over the cap, every tensor bit-equal, "
            "the whole checkpoint loads through `load_latest`."
        ),
        "",
    ]
    args.out.write_text("\n".join(lines))
    print(f"wrote {args.out}; {'PASS' if passed else 'FAIL'}")
    return 0 if passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
