"""Per-rank plans of torchrun jobs: DDP's gradient buckets, FSDP's shards and units in flight."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from voxgen.cli import main
from voxgen.config import compose
from voxgen.memory import ranks
from voxgen.memory.planner import GiB, plan_trace, trace_step
from voxgen.memory.tracker import block_bytes
from voxgen.training.distributed import unit_params

# A small DiT whose parameters are a large part of its step, so that sharding shows.
DIT = [
    "mode=seg",
    "model.name=dit",
    "model.variant=S",
    "model.patch_size=4",
    "data.shape=[16,16,16]",
    "training.batch_size=1",
    "training.fsdp_unit_params=1000000",
]


@pytest.fixture(scope="module")
def trace():
    return trace_step(compose([], DIT))


def _with(trace, *overrides):
    return dataclasses.replace(trace, cfg=compose([], [*DIT, *overrides]))


def test_the_rank_log_scan_reproduces_the_tracker_when_nothing_is_resized(trace):
    """World size 1 keeps every allocation's size: the scan of `ranks` must find the tracker's own peaks."""
    sizes = {key: alloc.bytes for key, alloc in trace.tracker.allocations.items()}
    _, parts_of, _ = ranks._rank_sizes(trace, 1, "fsdp")
    log, first_end = ranks._rank_log(trace.tracker.log, sizes, [], trace.first_step_events)
    first, first_required, steady, steady_required = ranks._scan(log, parts_of, trace.tracker.transients, first_end)
    assert (first.bytes, steady.bytes) == (trace.first.peak.bytes, trace.steady.peak.bytes)
    assert (first_required, steady_required) == (trace.first.required, trace.steady.required)
    assert steady.parts == trace.steady.parts


def test_world_size_one_is_the_one_process_plan(trace):
    one = plan_trace(trace)
    assert one.world_size == 1 and one.one_gpu == {} and one.collectives == {}
    again = plan_trace(trace, world_size=1)
    assert (again.peak_bytes, again.reserved_bytes, again.band_bytes) == (one.peak_bytes, one.reserved_bytes, one.band_bytes)


def test_ddp_holds_every_gradient_in_its_buckets_for_the_whole_step(trace):
    one, ddp = plan_trace(trace), plan_trace(_with(trace, "training.sharding=ddp"), world_size=4)
    grads = sum(p.numel() * p.element_size() for p in trace.model.parameters() if p.requires_grad)
    # Wherever the peak is, the buckets are all there (and with bucket views, nothing else of the gradients).
    assert ddp.breakdown["gradients"] == grads == ddp.collectives["gradient_buckets_bytes"]
    assert ddp.collectives["buckets"] == 1 + math.ceil((grads - 2**20) / (25 * 2**20))
    assert ddp.breakdown_first_step["gradients"] == grads
    # Never less than one process, but for the 512-byte rounding of each gradient the buckets do not have.
    rounding = 512 * len(list(trace.model.parameters()))
    assert ddp.peak_bytes >= one.peak_bytes - rounding and ddp.one_gpu["peak_bytes"] == one.peak_bytes
    # NCCL's buffers are not the caching allocator's: they come off the usable memory.
    assert one.usable_bytes - ddp.usable_bytes == ranks.NCCL_BYTES == ddp.collectives["nccl_bytes"]


@pytest.mark.parametrize("world_size", [2, 8])
def test_fsdp_shards_the_optimizer_state_and_gathers_the_largest_units(trace, world_size):
    fsdp = plan_trace(_with(trace, "training.sharding=fsdp"), world_size=world_size)
    state = [trace.tracker.allocations[key].bytes for key in trace.ids["optimizer"]]
    assert fsdp.breakdown["optimizer"] == sum(block_bytes(math.ceil(b / world_size)) for b in state)
    counts = unit_params(trace.model, 1_000_000)
    assert fsdp.collectives["unit_params"] == counts[:-1] and fsdp.collectives["root_params"] == counts[-1]
    root, (first, second) = 4 * counts[-1], sorted((4 * c for c in counts[:-1]), reverse=True)[:2]
    assert fsdp.collectives["forward_in_flight_bytes"] == root + 2 * first + second
    # The parameters at the peak: the shards, and the units in flight where the peak is in forward or backward.
    shards = sum(block_bytes(math.ceil(trace.tracker.allocations[k].bytes / world_size)) for k in trace.ids["trainable"])
    in_flight = fsdp.collectives["forward_in_flight_bytes"] if fsdp.peak_phase in ("forward", "backward") else 0
    assert fsdp.breakdown["parameters"] == shards + in_flight


def test_fsdp_needs_less_per_rank_as_ranks_are_added_but_never_less_than_the_activations(trace):
    peaks = [plan_trace(_with(trace, "training.sharding=fsdp"), world_size=n).peak_bytes for n in (2, 4, 16)]
    assert peaks[0] > peaks[1] > peaks[2]
    one = plan_trace(trace)
    assert peaks[2] < one.peak_bytes and peaks[2] > one.breakdown_first_step["activations"]


def test_cli_plans_each_rank_and_refuses_bad_worlds_in_one_line(capsys):
    assert main(["plan", *DIT, "--world-size", "2", "--sharding", "fsdp", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["world_size"] == 2 and out["sharding"] == "fsdp" and out["one_gpu"]["peak_bytes"] > out["peak_bytes"]
    assert out["collectives"]["units"] > 0 and out["host"]["world_size"] == 2
    for argv, words in (
        (["--world-size", "0"], "error: --world-size 0: must be at least 1"),
        (["--world-size", "two"], "error: --world-size 'two'"),
        (["--sharding", "zero3"], "error: --sharding 'zero3': must be one of ddp, fsdp"),
    ):
        assert main(["plan", *DIT, *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith(words) and err.count("\n") == 1
    assert main(["plan", *DIT, "--world-size", "4"]) == 0
    text = capsys.readouterr().out
    assert "each of 4 ranks (ddp" in text and "DDP gradient buckets" in text and "host memory (RSS)" in text


def test_the_3_5b_unet_over_8_gpus_with_fsdp_fits_where_one_gpu_is_tight():
    """configs/unet_latent4x_4L_large_d.yaml: 3477.6 M parameters (the seeds' table); in one process
    its step peaks at 65.7 GiB, 38.9 GiB of which are fp32 weights and AdamW state: 1/8 of them per rank."""
    cfg = compose(["configs/unet_latent4x_4L_large_d.yaml"], ["training.sharding=fsdp"])
    traced = trace_step(cfg)
    fsdp = plan_trace(traced, world_size=8)
    assert abs(fsdp.params / 1e6 - 3477.6) < 0.1
    one = fsdp.one_gpu
    assert fsdp.breakdown["optimizer"] == pytest.approx(one["breakdown"]["optimizer"] / 8, rel=1e-3)
    assert fsdp.peak_bytes < 0.6 * one["peak_bytes"] and fsdp.verdict == "fits" and fsdp.peak_bytes > 20 * GiB
