"""The caching-allocator model: pools, segment sizes, splitting, merging, release under pressure."""

from test_planner import TINY

from voxgen.config import compose
from voxgen.memory.allocator import AllocatorReplay, replay, segment_size
from voxgen.memory.planner import plan

MiB = 2**20


def test_segment_sizes_follow_the_three_size_classes():
    assert segment_size(100) == 2 * MiB  # small pool
    assert segment_size(5 * MiB) == 20 * MiB  # under 10 MiB: a 20 MiB segment
    assert segment_size(31 * MiB + 1) == 32 * MiB  # large: rounded up to 2 MiB


def test_small_request_reserves_a_small_segment_and_counts_512_byte_blocks():
    a = AllocatorReplay()
    a.malloc(0, 100)
    a.malloc(1, 600)
    assert (a.allocated, a.reserved) == (512 + 1024, 2 * MiB)


def test_freed_block_is_split_for_a_smaller_request_and_the_rest_stays_cached():
    a = AllocatorReplay()
    a.malloc(0, 30 * MiB)
    a.free(0)
    a.malloc(1, 20 * MiB)  # reuses the 30 MiB block, 10 MiB remain free
    assert a.reserved == 30 * MiB
    a.malloc(2, 15 * MiB)  # the 10 MiB remainder is too small: a new 16 MiB segment,
    assert a.reserved == 46 * MiB  # not split (1 MiB left is not more than 1 MiB),
    assert a.peak_allocated == 20 * MiB + 16 * MiB  # so the request holds all of it


def test_neighbours_merge_back_into_one_block():
    a = AllocatorReplay()
    a.malloc(0, 40 * MiB)
    a.free(0)
    a.malloc(1, 10 * MiB)
    a.malloc(2, 10 * MiB)
    a.free(1)
    a.free(2)
    a.malloc(3, 40 * MiB)  # only possible if the three free pieces merged again
    assert a.reserved == 40 * MiB


def test_cached_segments_are_released_before_running_out():
    a = AllocatorReplay(capacity=50 * MiB)
    a.malloc(0, 30 * MiB)
    a.free(0)
    a.malloc(1, 40 * MiB)  # 30 + 40 > 50: the cached 30 MiB segment goes back first
    assert not a.oom and a.reserved == 40 * MiB


def test_fragmentation_runs_out_although_enough_bytes_are_free():
    a = AllocatorReplay(capacity=50 * MiB)
    a.malloc(0, 40 * MiB)
    a.free(0)
    a.malloc(1, 12 * MiB)  # pins the 40 MiB segment; 28 MiB of it stay free
    a.malloc(2, 30 * MiB)  # 28 MiB free in pieces too small, and 40 + 30 > 50
    assert a.oom
    assert a.allocated == 42 * MiB  # less than the 50 MiB GPU: a max_memory_allocated view says it fits


def test_replay_of_an_event_log_matches_the_tracker_convention():
    log = [(0, 8 * MiB), (1, 4096), (0, -8 * MiB), (2, 12 * MiB), (2, -12 * MiB), (1, -4096)]
    a = replay(log)
    assert a.peak_allocated == 12 * MiB + 4096
    # 8 MiB takes a 20 MiB segment, 4 KiB a 2 MiB small one; 12 MiB reuses the cached 20 MiB.
    assert a.peak_reserved == 20 * MiB + 2 * MiB
    assert a.allocated == 0


def test_plan_reports_reserved_memory_at_least_the_required_peak():
    cfg = compose([], TINY)
    result = plan(cfg)
    assert result.reserved_bytes >= result.required_bytes
    assert result.reserved_bytes_first_step <= result.reserved_bytes
    assert not result.allocator_oom
    tiny_gpu = plan(cfg, gpu_memory_bytes=result.required_bytes // 2)
    assert not tiny_gpu.fits and tiny_gpu.allocator_oom
