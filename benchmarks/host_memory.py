"""Host memory: the planner's figure against the peak RSS of `voxgen train` runs on the CPU.

    .venv/bin/python benchmarks/host_memory.py [--only baseline|workers|runs]

- baseline: peak RSS of a run whose model and data are negligible (a UNet of 8 channels on eight
  16^3 phantoms, two steps), three times: `voxgen.memory.host.BASELINE_BYTES`;
- workers: private memory (USS, from /proc/PID/smaps_rollup) of each data-loader worker over a
  run of 60 steps with two workers: `voxgen.memory.host.WORKER_BYTES`;
- runs: for a few models, a new run (3 steps) and the same run resumed (to step 5), each measured
  as its process's peak RSS (wait4, as /usr/bin/time -v), against the plan's host figure of a new
  run (training, checkpoint write) and of a resumed one (the checkpoint read back whole).

Prints Markdown (docs/memory.md, "Host memory").
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from voxgen.config import compose
from voxgen.data.phantoms import make_phantoms
from voxgen.memory.host import measure_peak_rss
from voxgen.memory.planner import plan

MiB = 2**20
# The thread count the measurements are made with (torch's pools grow with it).
ENV = {**os.environ, "OMP_NUM_THREADS": "2"}
NEGLIGIBLE = [
    "model.channels=[8,8,8]",
    "model.attention_levels=[false,false,false]",
    "model.num_res_blocks=1",
    "model.norm_num_groups=8",
    "model.num_head_channels=8",
    "training.batch_size=1",
]
RUNS = {
    "DiT-S p4, 16^3, batch 2 (tests/memory/test_host.py)": (
        16,
        ["model.name=dit", "model.variant=S", "model.patch_size=4", "training.batch_size=2"],
    ),
    "DiT-S p8, 32^3, batch 2": (32, ["model.name=dit", "model.variant=S", "model.patch_size=8", "training.batch_size=2"]),
    "DiT-B p8, 32^3, batch 1": (32, ["model.name=dit", "model.variant=B", "model.patch_size=8", "training.batch_size=1"]),
    "UNet 2.9 M (default), 32^3, batch 2": (32, ["training.batch_size=2"]),
    "UNet 41 M, 16^3, batch 1": (
        16,
        [
            "model.channels=[64,128,256]",
            "model.attention_levels=[false,false,true]",
            "model.num_res_blocks=2",
            "model.num_head_channels=32",
            "training.batch_size=1",
        ],
    ),
}


def _train(root: Path, size: int, run_dir: Path, steps: int, extra: list[str]) -> list[str]:
    return [
        f"data.root={root}",
        f"data.shape=[{size},{size},{size}]",
        "training.device=cpu",
        f"training.steps={steps}",
        "training.val_batches=1",
        "sample.steps=2",
        f"run.dir={run_dir}",
        *extra,
    ]


def _voxgen(*args: str) -> list[str]:
    return [sys.executable, "-m", "voxgen.cli", *args]


def baseline(roots: dict[int, Path], work: Path) -> list[str]:
    peaks = []
    for i in range(3):
        argv = _voxgen("train", *_train(roots[16], 16, work / f"baseline{i}", 2, NEGLIGIBLE))
        measured = measure_peak_rss(argv, ENV)
        assert measured.returncode == 0, measured.output[-2000:]
        peaks.append(measured.peak_rss_bytes / MiB)
    return [f"baseline (negligible model and data, 3 runs): {', '.join(f'{p:.0f}' for p in peaks)} MiB peak RSS"]


def _private_mib(pid: int) -> int | None:
    try:
        fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:])
    except (OSError, ValueError):
        return None
    return (int(fields["Private_Clean"].split()[0]) + int(fields["Private_Dirty"].split()[0])) // 1024


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                continue
    return found


def workers(roots: dict[int, Path], work: Path) -> list[str]:
    argv = _voxgen(
        "train", *_train(roots[32], 32, work / "workers", 60, [*NEGLIGIBLE, "data.num_workers=2", "training.val_every=1000"])
    )
    proc = subprocess.Popen(argv, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    most: dict[int, int] = {}
    while proc.poll() is None:
        for child in _children(proc.pid):
            private = _private_mib(child)
            if private is not None:
                most[child] = max(most.get(child, 0), private)
        time.sleep(0.1)
    sizes = sorted(most.values())
    summary = f"private memory {sizes[0]}-{sizes[-1]} MiB, median {sizes[len(sizes) // 2]} MiB"
    return [f"data-loader workers ({len(sizes)} over 60 steps): {summary}"]


def runs(roots: dict[int, Path], work: Path) -> list[str]:
    lines = [
        "| run | planned new run MiB | measured MiB | error | planned resumed MiB | measured MiB | error |",
        "|---|---|---|---|---|---|---|",
    ]
    for i, (name, (size, extra)) in enumerate(RUNS.items()):
        run_dir = work / f"run{i}"
        host = plan(compose([], _train(roots[size], size, run_dir, 3, extra))).host
        new_run = max(host["phases"]["training"], host["phases"]["checkpoint_write"])
        measured = []
        for steps in (3, 5):  # a new run, then the same run resumed from its checkpoint at step 3
            result = measure_peak_rss(_voxgen("train", *_train(roots[size], size, run_dir, steps, extra)), ENV)
            assert result.returncode == 0, result.output[-2000:]
            measured.append(result.peak_rss_bytes)
        cells = []
        for planned, got in zip((new_run, host["rank_bytes"]), measured):
            cells += [f"{planned / MiB:.0f}", f"{got / MiB:.0f}", f"{100 * (planned - got) / got:+.1f}%"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["baseline", "workers", "runs"], default=None)
    args = parser.parse_args()
    print(
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"torch {torch.__version__}; OMP_NUM_THREADS=2",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        roots = {size: work / f"phantoms{size}" for size in (16, 32)}
        for size, root in roots.items():
            make_phantoms(root, cases=8, shape=(size, size, size), seed=0)
        for name, measure in (("baseline", baseline), ("workers", workers), ("runs", runs)):
            if args.only in (None, name):
                print("\n".join(measure(roots, work)), flush=True)


if __name__ == "__main__":
    main()
