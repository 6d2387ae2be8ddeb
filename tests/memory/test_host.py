"""Host memory of a training process: its parts counted against what the trainer holds, and the
whole plan against the peak RSS of real CPU training runs."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

from voxgen.config import compose
from voxgen.data.dataset import VolumeDataset
from voxgen.data.layout import Modalities
from voxgen.memory.host import CUDA_RUNTIME_BYTES, host_plan, measure_peak_rss
from voxgen.memory.planner import plan, trace_step

TINY = [
    "model.channels=[16,32]",
    "model.attention_levels=[false,true]",
    "model.num_head_channels=16",
    "model.norm_num_groups=8",
    "data.shape=[16,16,16]",
    "training.batch_size=2",
]


def test_the_data_cache_is_every_train_and_val_case_read_as_the_trainer_reads_it(phantom_root):
    cfg = compose([], [*TINY, f"data.root={phantom_root}"])
    trace = trace_step(cfg)
    host = host_plan(trace)
    layout, cached, cases = Modalities.of(cfg.data), 0, 0
    for split in ("train", "val"):
        dataset = VolumeDataset(phantom_root, split, trace.modalities, cfg.data.shape, True, None, layout)
        for i in range(len(dataset)):
            dataset[i]
        cases += len(dataset)
        items = dataset._cache.values()
        cached += sum(t.numel() * t.element_size() for item in items for t in item.values() if torch.is_tensor(t))
    assert host.parts["data_cache"] == cached and host.data_cases == cases
    assert host.parts["batch"] == cached // cases * 2 and host.notes == []


def test_a_data_folder_not_found_leaves_the_cache_uncounted_and_says_so(tmp_path):
    host = host_plan(trace_step(compose([], [*TINY, f"data.root={tmp_path / 'none'}"])))
    assert host.data_cases is None and host.parts["data_cache"] == 0
    assert "data cache unknown and not counted" in host.notes[0] and "none" in host.notes[0]
    without = host_plan(trace_step(compose([], [*TINY, f"data.root={tmp_path / 'none'}", "data.cache=false"])))
    assert without.notes == []


def test_the_checkpoint_the_host_holds_is_weights_ema_and_adamw_state(tmp_path):
    """After a real CPU step: the model's state dict twice (weights and EMA) and AdamW's state, byte
    for byte (the slow test below checks it against a checkpoint the trainer wrote)."""
    from voxgen.tasks import build_task
    from voxgen.training.step import make_optimizer, train_step

    cfg = compose([], TINY)
    task = build_task(cfg, "cpu", training=True)
    optimizer = make_optimizer(task.model, cfg)
    batch = {m: torch.zeros(2, 1, 16, 16, 16) for m in task.modalities}
    train_step(task, optimizer, batch, torch.Generator().manual_seed(0), 1.0)
    weights = sum(t.numel() * t.element_size() for t in task.model.state_dict().values())
    moments = sum(t.numel() * t.element_size() for s in optimizer.state_dict()["state"].values() for t in s.values())
    written = 2 * weights + moments
    host = host_plan(trace_step(cfg))
    assert host.parts["checkpoint_resume"] == written
    # From a GPU the writer copies one shard at a time to the host.
    small = host_plan(trace_step(compose([], [*TINY, "checkpoint.max_shard_bytes=1048576"])))
    assert small.parts["checkpoint_write"] == 2**20 < written


def test_a_gpu_run_counts_the_cuda_runtime_and_a_cpu_run_its_step_and_ema():
    gpu = host_plan(trace_step(compose([], TINY)))
    assert gpu.device == "cuda" and gpu.parts["cuda_runtime"] == CUDA_RUNTIME_BYTES and gpu.parts["step"] == 0
    cpu = host_plan(trace_step(compose([], [*TINY, "training.device=cpu"])))
    weights = sum(p.numel() * 4 for p in trace_step(compose([], TINY)).model.parameters())
    assert cpu.device == "cpu" and cpu.parts["cuda_runtime"] == 0 and cpu.parts["ema"] == weights
    assert cpu.parts["step"] > 4 * weights  # weights, gradients, two moments, and activations
    assert cpu.phases["training"] - gpu.phases["training"] == cpu.parts["step"] + weights - CUDA_RUNTIME_BYTES


def test_a_node_holds_one_writer_and_readers_and_fsdp_ranks_read_the_whole_checkpoint():
    trace = trace_step(compose([], TINY))
    ddp = host_plan(trace, world_size=8, sharding="ddp")
    assert ddp.node_bytes(4) == ddp.rank_bytes + 3 * ddp.reader_bytes
    assert any("whole checkpoint" in note for note in ddp.notes)
    # Every FSDP process reads the whole checkpoint on resume before taking its part.
    fsdp = host_plan(trace, world_size=8, sharding="fsdp")
    assert fsdp.parts["checkpoint_resume"] == ddp.parts["checkpoint_resume"] > 0


MiB = 2**20
TOUCH_MIB = "b = bytearray({} * 2**20)\nfor i in range(0, len(b), 4096): b[i] = 1"


def test_the_measured_peak_is_the_programs_own_not_its_callers():
    """Linux hands the peak RSS of the image a process replaces at exec to the new program; a
    program started from a caller holding more memory than it ever uses must not report the
    caller's peak."""
    held = bytearray(512 * MiB)
    held[::4096] = b"\1" * len(held[::4096])  # resident, not only reserved
    small = measure_peak_rss([sys.executable, "-c", "pass"])
    large = measure_peak_rss([sys.executable, "-c", TOUCH_MIB.format(300)])
    del held
    assert small.returncode == large.returncode == 0
    assert small.peak_rss_bytes < 64 * MiB  # a bare interpreter
    assert 300 * MiB < large.peak_rss_bytes < 400 * MiB
    failed = measure_peak_rss([sys.executable, "-c", "import sys; print('out'); sys.exit(3)"])
    assert failed.returncode == 3 and failed.output == "out\n"
    missing = measure_peak_rss(["/no/such/program"])
    assert missing.returncode == 127 and "No such file" in missing.output
    slow = measure_peak_rss([sys.executable, "-c", "import time; time.sleep(30)"], timeout=1)
    assert slow.returncode == -9


@pytest.mark.slow
def test_planned_host_memory_is_within_15_percent_of_the_peak_rss_of_cpu_training(phantom_root, tmp_path):
    """`voxgen train` on the CPU, measured with wait4 (as /usr/bin/time -v): a new run (training, its
    checkpoint and the end-of-run report) and the same run resumed (its checkpoint read back whole,
    then training)."""
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    run_dir = tmp_path / "run"
    planned = plan(compose([], _train(phantom_root, run_dir, 3))).host
    fresh = measure_peak_rss([sys.executable, "-m", "voxgen.cli", "train", *_train(phantom_root, run_dir, 3)], env, 600)
    assert fresh.returncode == 0, fresh.output[-2000:]
    new_run = max(planned["phases"]["training"], planned["phases"]["checkpoint_write"])
    # The report was measured with the new run; the resumed one is measured for reading the checkpoint.
    resumed_run = [*_train(phantom_root, run_dir, 5), "run.report=false"]
    resumed = measure_peak_rss([sys.executable, "-m", "voxgen.cli", "train", *resumed_run], env, 600)
    assert resumed.returncode == 0 and "resumed from" in resumed.output, resumed.output[-2000:]
    print(f"new run: planned {new_run / MiB:.0f} MiB, measured {fresh.peak_rss_bytes / MiB:.0f} MiB")
    print(f"resumed: planned {planned['rank_bytes'] / MiB:.0f} MiB, measured {resumed.peak_rss_bytes / MiB:.0f} MiB")
    assert abs(fresh.peak_rss_bytes / new_run - 1) < 0.15
    assert abs(resumed.peak_rss_bytes / planned["rank_bytes"] - 1) < 0.15
    assert planned["rank_bytes"] == planned["phases"]["resume"] > new_run  # resuming holds the checkpoint twice
    # The checkpoint's tensors as the trainer wrote them (index.json), less its RNG states (a few KiB).
    checkpoints = run_dir / "checkpoints"
    index = json.loads((checkpoints / (checkpoints / "latest").read_text().strip() / "index.json").read_text())
    assert planned["parts"]["checkpoint_resume"] == pytest.approx(index["total_bytes"], abs=64 * 2**10)


def _train(root, run_dir, steps: int) -> list[str]:
    # A DiT whose weights, gradients, AdamW state and EMA (~0.6 GiB) are about the size of the
    # process's baseline: both have to be right for the total to be.
    return [
        f"data.root={root}",
        "data.shape=[16,16,16]",
        "model.name=dit",
        "model.variant=S",
        "model.patch_size=4",
        "training.batch_size=2",
        "training.device=cpu",
        f"training.steps={steps}",
        "training.val_batches=1",
        "sample.steps=2",
        f"run.dir={run_dir}",
    ]
