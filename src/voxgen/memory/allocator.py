"""A model of PyTorch's CUDA caching allocator, replayed over a traced step's allocations.

`max_memory_allocated` counts the blocks tensors hold; what a GPU runs out of is what the
caching allocator has reserved from the driver (`max_memory_reserved`, what `nvidia-smi`
shows). The two differ by fragmentation: a freed block is cached, and a later request reuses
it only where it fits, splitting it and leaving a remainder. Transformers free an fp32
temporary of every token in every block (the adaLN modulation) while bf16 tensors of other
sizes are saved around it, so their reserved peak runs well above their allocated peak.

The rules replayed here are those of `c10/cuda/CUDACachingAllocator.cpp` with its default
settings (no `max_split_size_mb`, no expandable segments, one stream):

- requests are rounded up to 512 bytes; those up to 1 MiB come from a pool of small blocks,
  larger ones from a pool of large blocks;
- a request takes the smallest cached free block of its pool that is large enough (ties by
  address) and splits it when the remainder is at least 512 bytes (small pool) or more than
  1 MiB (large pool);
- with no such block a new segment is reserved: 2 MiB for small requests, 20 MiB for requests
  under 10 MiB, otherwise the request rounded up to 2 MiB;
- a freed block merges with free neighbours of its segment and goes back to its pool;
- when a new segment would exceed the GPU's memory, every wholly free cached segment is
  released first (as the allocator does before it reports out of memory).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

MiB = 2**20
BLOCK = 512  # kMinBlockSize
SMALL_SIZE = 1 * MiB  # kSmallSize: largest request served from the small pool
SMALL_BUFFER = 2 * MiB  # kSmallBuffer: segment size of the small pool
LARGE_BUFFER = 20 * MiB  # kLargeBuffer: segment size for requests under MIN_LARGE_ALLOC
MIN_LARGE_ALLOC = 10 * MiB  # kMinLargeAlloc
ROUND_LARGE = 2 * MiB  # kRoundLarge


def round_size(nbytes: int) -> int:
    return max(BLOCK, -(-nbytes // BLOCK) * BLOCK)


def segment_size(nbytes: int) -> int:
    if nbytes <= SMALL_SIZE:
        return SMALL_BUFFER
    if nbytes < MIN_LARGE_ALLOC:
        return LARGE_BUFFER
    return -(-nbytes // ROUND_LARGE) * ROUND_LARGE


@dataclass(eq=False)
class _Block:
    size: int
    segment: int
    offset: int
    small: bool
    free: bool = True
    prev: _Block | None = None
    next: _Block | None = None

    def key(self) -> tuple[int, int, int]:
        return (self.size, self.segment, self.offset)


@dataclass
class AllocatorReplay:
    """Replays malloc/free requests; `peak_reserved` and `peak_allocated` are in bytes.

    `capacity` (bytes) enables the release of cached segments under memory pressure and the
    out-of-memory verdict: `oom` is set when a request cannot be met even then.
    """

    capacity: int | None = None
    allocated: int = 0
    reserved: int = 0
    peak_allocated: int = 0
    peak_reserved: int = 0
    oom: bool = False
    _pools: dict[bool, list] = field(default_factory=lambda: {True: [], False: []})
    _segments: int = 0
    _live: dict[int, _Block] = field(default_factory=dict)

    def malloc(self, key: int, nbytes: int) -> None:
        size = round_size(nbytes)
        small = size <= SMALL_SIZE
        block = self._take_free(small, size) or self._new_segment(small, size)
        remainder = block.size - size
        if remainder >= BLOCK if small else remainder > SMALL_SIZE:
            rest = _Block(remainder, block.segment, block.offset + size, small, prev=block, next=block.next)
            if block.next is not None:
                block.next.prev = rest
            block.next, block.size = rest, size
            self._insert(rest)
        block.free = False
        self._live[key] = block
        self.allocated += block.size
        self.peak_allocated = max(self.peak_allocated, self.allocated)

    def free(self, key: int) -> None:
        block = self._live.pop(key)
        self.allocated -= block.size
        block.free = True
        for neighbour in (block.prev, block.next):
            if neighbour is not None and neighbour.free:
                self._remove(neighbour)
                if neighbour is block.prev:
                    neighbour.size += block.size
                    neighbour.next = block.next
                    if block.next is not None:
                        block.next.prev = neighbour
                    block = neighbour
                else:
                    block.size += neighbour.size
                    block.next = neighbour.next
                    if neighbour.next is not None:
                        neighbour.next.prev = block
        self._insert(block)

    # -- pools ------------------------------------------------------------------------------
    def _insert(self, block: _Block) -> None:
        bisect.insort(self._pools[block.small], (block.key(), id(block), block))

    def _remove(self, block: _Block) -> None:
        pool = self._pools[block.small]
        index = bisect.bisect_left(pool, (block.key(), id(block)))
        del pool[index]

    def _take_free(self, small: bool, size: int) -> _Block | None:
        pool = self._pools[small]
        index = bisect.bisect_left(pool, ((size, -1, -1),))
        if index == len(pool):
            return None
        return pool.pop(index)[2]

    def _new_segment(self, small: bool, size: int) -> _Block:
        nbytes = segment_size(size)
        if self.capacity is not None and self.reserved + nbytes > self.capacity:
            self._release_cached_segments()
            if self.reserved + nbytes > self.capacity:
                self.oom = True
        self._segments += 1
        self.reserved += nbytes
        self.peak_reserved = max(self.peak_reserved, self.reserved)
        return _Block(nbytes, self._segments, 0, small)

    def _release_cached_segments(self) -> None:
        for pool in self._pools.values():
            whole = [entry for entry in pool if entry[2].prev is None and entry[2].next is None]
            for entry in whole:
                pool.remove(entry)
                self.reserved -= entry[2].size


def replay(log, capacity: int | None = None) -> AllocatorReplay:
    """Replay a tracker's event log [(allocation id, +bytes | -bytes), ...]."""
    allocator = AllocatorReplay(capacity=capacity)
    for alloc_id, nbytes in log:
        if nbytes > 0:
            allocator.malloc(alloc_id, nbytes)
        elif nbytes < 0:
            allocator.free(alloc_id)
    return allocator
