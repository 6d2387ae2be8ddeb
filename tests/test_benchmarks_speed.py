"""benchmarks/speed.py, benchmarks/memory_validation.py and benchmarks/gpu_check.sh at tiny CPU sizes.

The benchmarks measure on purpose, not in CI; these tests check that they run, that the two loops
the speed benchmark compares are the same network, and that their outputs have the fields the docs
read (docs/speed.md, docs/memory-validation.md).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tarfile

import pytest
import torch

from benchmark_module import REPO, load_benchmark

# A 2-level UNet at 16^3 with attention at its second level.
TINY = [
    "--shape",
    "16,16,16",
    "model.channels=[8,16]",
    "model.attention_levels=[false,true]",
    "model.num_head_channels=8",
    "model.norm_num_groups=8",
]


speed = load_benchmark("speed")
memory_validation = load_benchmark("memory_validation")


def test_both_loops_train_the_same_network():
    args = speed.parse_args([*TINY, "model.attention=naive"])
    cfg = speed.compose_config(args)
    device = torch.device("cpu")
    voxgen, task, _ = speed.voxgen_step(cfg, device)
    reference = speed.reference_step(cfg, task.network, device, args.precision, seed=0)
    shapes = [[tuple(p.shape) for p in side.modules[0].parameters()] for side in (reference, voxgen)]
    assert shapes[0] == shapes[1]
    assert (task.network.in_channels, task.network.out_channels) == (2, 1)  # bravo: image + mask in, image out
    for side in (reference, voxgen):
        side.step()  # MONAI zero-initialises output convolutions: only they get a gradient at first
        before = [p.detach().clone() for p in side.modules[0].parameters()]
        side.step()
        moved = sum(not torch.equal(b, p) for b, p in zip(before, side.modules[0].parameters()))
        assert moved > len(before) // 2, f"{side.name}: the optimiser moved {moved} of {len(before)} tensors"
        assert speed.held_bytes(side) >= 4 * sum(p.nbytes for p in side.modules[0].parameters())  # weights, grads, 2 moments


def test_speed_json_at_tiny_cpu_sizes(tmp_path):
    out = tmp_path / "speed.json"
    speed.main([*TINY, "--warmup", "1", "--steps", "2", "--repeats", "2", "--sample-steps", "2", "--json", str(out)])
    result = json.loads(out.read_text())
    assert result["device"] == "cpu" and result["config"]["precision"] == "fp32"
    assert result["config"]["attention"] == {"reference": "naive", "voxgen": "naive"}  # the CPU default: the same
    assert result["params"]["reference"] == result["params"]["voxgen"] > 0
    assert result["step"]["voxgen"]["skipped"] == 0
    step = result["step"]
    for side in ("reference", "voxgen"):
        assert step[side]["steps"] == 4 and len(step[side]["round_medians_s"]) == 2
        assert 0 < step[side]["min_s"] <= step[side]["median_s"] <= step[side]["max_s"]
    assert math.isfinite(step["ratio"]) and step["ratio"] > 0
    assert len(step["round_ratios"]) == 2 and all(math.isfinite(r) and r > 0 for r in step["round_ratios"])
    cpu = step["cpu_time"]
    assert cpu["reference"]["steps"] == 4 and math.isfinite(cpu["ratio"]) and cpu["ratio"] > 0
    assert result["memory"]["ratio"] is None and result["memory"]["voxgen_peak_bytes"] is None  # not measured on a CPU
    sampling = result["sampling"]
    assert sampling["solver"] == "euler:2" and sampling["nfe"] == 2 and sampling["seconds_per_volume"] > 0


def test_plan_comparison_reads_the_seeds_row(tmp_path):
    preset = tmp_path / "unet_latent4x_3L_toy.yaml"
    preset.write_text(
        "mode: bravo\ndata:\n  shape: [16, 16, 16]\nmodel:\n  name: unet\n  channels: [8, 16]\n"
        "  attention_levels: [false, true]\n  num_head_channels: 8\n  norm_num_groups: 8\n  attention: naive\n"
    )
    table = tmp_path / "table.csv"
    table.write_text("config,latent,peak_gb\n3L_toy,8x,9.0\n3L_toy,4x,2.0\n")
    p = speed.plan_comparison(preset, table)
    assert p["reference"]["attention"] == "naive" and p["voxgen"]["attention"] == "sdpa"
    # The attention matrix (512 tokens, 2 heads) is no longer kept: sdpa plans less.
    assert 0 < p["ratio_peak"] < 1 and p["voxgen"]["peak_bytes"] < p["reference"]["peak_bytes"]
    assert p["seeds_measured_bytes"] == 2 * 2**30
    assert p["ratio_to_seeds_measured"] == pytest.approx(p["voxgen"]["peak_bytes"] / 2**31)
    assert speed.seeds_measured_gib(tmp_path / "wdm_128.yaml", table) is None


def test_memory_validation_summary(tmp_path):
    csv_path = tmp_path / "profile.csv"
    csv_path.write_text(
        "config,steady_gib,status,planned_steady_gib,planned_required_gib,gpu,torch,cudnn\n"
        "a,10.0,OK,12.0,10.5,G,t,c\n"
        "b,4.0,OK,5.0,3.8,G,t,c\n"
        "c,2.0,OK,2.5,2.06,G,t,c\n"
        "d,,OOM (first step),90.0,88.0,G,t,c\n"
    )
    rows, column = memory_validation.rows_of(csv_path)
    assert column == "planned_required_gib"
    assert [r["error"] for r in rows[:3]] == pytest.approx([5.0, -5.0, 3.0])
    s = memory_validation.summary(rows)
    assert (s["rows"], s["ran"], s["median_pct"], s["max_pct"], s["goal_met"]) == (
        4,
        3,
        pytest.approx(5.0),
        pytest.approx(5.0),
        True,
    )
    out = tmp_path / "memory-validation.md"
    memory_validation.main(["--profile", str(csv_path), "--out", str(out)])
    text = out.read_text()
    assert "median |error| 5.0% (goal <= 5%: met)" in text and "| d | - | 88.00 | - | OOM (first step) |" in text


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path):
    """The whole GPU check on the CPU, less its training runs (the autoencoders and latent diffusion:
    minutes here, and the trainer's own tests cover them) and the plain speed comparison (the run
    with the speed switches takes the same path)."""
    # Only the training runs read the data set: an empty one spares building the cohort.
    (tmp_path / "data" / "test").mkdir(parents=True)
    env = {
        **os.environ,
        "OUT": str(tmp_path / "out"),
        "WORK": str(tmp_path / "work"),
        "DATA": str(tmp_path / "data"),
        "PYTHON": sys.executable,
        "SKIP": "speed latent-diffusion kl-train kl-score vq-train vq-score",
    }
    done = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh", "--dry-run"], cwd=REPO, env=env, capture_output=True, text=True, timeout=900
    )
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-3000:]
    for name in ("environment", "attention", "memory-validation", "speed-switches", "gpu-tests"):
        assert f"=== {name}: exit 0" in log, log[-3000:]
    # voxgen profile loads the grid and stops where a GPU is needed.
    assert "=== profile: exit 2" in log and "needs a CUDA GPU" in log
    skipped = ("speed", "latent-diffusion", "kl-train", "kl-score", "vq-train", "vq-score")
    assert all(f"=== {name}: skipped (SKIP)" in log for name in skipped)

    with tarfile.open(tmp_path / "out" / "results.tgz") as tar:
        names = set(tar.getnames())
        read = lambda name: tar.extractfile(name).read().decode()
        assert "./environment.txt" in names
        assert not any("checkpoints" in n or "cohort" in n for n in names)
        assert json.loads(read("./attention/summary_meta.json"))
        assert "median |error|" in read("./memory-validation.md")
        result = json.loads(read("./speed/switches.json"))
        assert math.isfinite(result["step"]["ratio"]) and result["step"]["ratio"] > 0
        assert result["sampling"]["nfe"] == 2
        switches = json.loads(read("./speed/switches.json"))["config"]["switches_requested"]
        assert switches == {"compile": False, "channels_last": True, "fused_optimizer": True, "tf32": True}
