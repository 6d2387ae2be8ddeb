"""Which bytes go in which shard file, and the index.json that records it.

No file, safetensors header included, is larger than max_shard_bytes: a tensor that does not
fit in one file is cut into flat pieces (keys `NAME#START`, START the first flat element),
each in its own shard, and put back together on load.

A process of a sharded (FSDP) run holds only a slice of some tensors: a `Part` says where its
slice starts in the whole tensor, and the slice is written as pieces of that tensor, so the
checkpoint reads back as whole tensors, the same as one written by a single process.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from voxgen.checkpoint.layout import FORMAT
from voxgen.errors import CheckpointError

# Tells other safetensors readers (transformers, the safetensors CLI) that these are torch tensors.
_SAFETENSORS_METADATA = {"format": "pt"}
# Upper bound of one header entry without its key and shape:
# "KEY":{"dtype":"F8_E4M3FNUZ","shape":[...],"data_offsets":[20 digits,20 digits]}, is 95 bytes.
_ENTRY_BYTES = 128
# The header's length prefix, braces, the metadata entry and the alignment padding.
_HEADER_FIXED_BYTES = 8 + 8 + 8 + len(json.dumps({"__metadata__": _SAFETENSORS_METADATA}))


@dataclass(frozen=True)
class Part:
    """A process's slice of a tensor: flat elements from `start` of a tensor of `shape`."""

    start: int
    shape: tuple[int, ...]


@dataclass
class _Piece:
    name: str  # the tensor's name in the checkpoint
    key: str  # its name inside the shard file
    start: int | None = None  # flat element range of a split tensor; None: the whole tensor
    stop: int | None = None


def _entry_bytes(key: str, shape) -> int:
    # json.dumps escapes non-ASCII as \uXXXX, never shorter than the UTF-8 safetensors writes.
    return _ENTRY_BYTES + len(json.dumps(key)) + sum(len(str(int(d))) + 1 for d in shape)


def _plan(
    tensors: dict[str, torch.Tensor], max_bytes: int, parts: dict[str, Part] | None = None
) -> tuple[list[list[_Piece]], list[int]]:
    """Shards (lists of pieces) and an upper bound of each shard's file size, header included.

    Tensors are placed in the order given, each shard filled before the next is started, so
    tensors saved next to each other (all of `ema/`) share shards with few others. A tensor
    named in `parts` is a slice of a larger one: it is written as pieces of that one.
    """
    parts = parts or {}
    capacity = max_bytes - _HEADER_FIXED_BYTES
    shards: list[list[_Piece]] = [[]]
    used = [0]

    def new_shard() -> None:
        if shards[-1]:
            shards.append([])
            used.append(0)

    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        part = parts.get(name)
        first = 0 if part is None else part.start
        key = name if part is None else f"{name}#{first}"
        cost = _entry_bytes(key, tensor.shape) + nbytes
        if cost > capacity - used[-1] and cost <= capacity:
            new_shard()
        if cost <= capacity - used[-1]:
            shards[-1].append(_Piece(name, key) if part is None else _Piece(name, key, first, first + tensor.numel()))
            used[-1] += cost
            continue
        # Larger than a whole file: flat pieces, each filling a fresh shard, the last one
        # leaving its shard open to the tensors that follow.
        new_shard()
        n, esize, start = first + tensor.numel(), tensor.element_size(), first
        while start < n:
            key = f"{name}#{start}"
            room = (capacity - _entry_bytes(key, [n])) // esize
            if room <= 0:
                raise CheckpointError(f"tensor {name!r}: its name alone does not fit in a {max_bytes}-byte shard")
            stop = min(n, start + room)
            shards[-1].append(_Piece(name, key, start, stop))
            used[-1] += _entry_bytes(key, [n]) + (stop - start) * esize
            start = stop
            if start < n:
                new_shard()
    keys = [p.key for shard in shards for p in shard]
    if len(set(keys)) != len(keys):
        clashes = sorted({k for k in keys if keys.count(k) > 1})
        raise CheckpointError(f"tensor names clash with the names of split pieces: {clashes[:3]}")
    return shards, [_HEADER_FIXED_BYTES + u for u in used]


def _shard_name(i: int, n: int, writer: int | None = None) -> str:
    """The i-th of n shard files; a process of several writing one checkpoint prefixes its number,
    so that file names sort by process first: the order its slices of a tensor go back in."""
    name = f"tensors-{i:05d}-of-{n:05d}.safetensors"
    return name if writer is None else f"rank-{writer:05d}-{name}"


def _index_part(
    shards: list[list[_Piece]], filenames: list[str], tensors: dict[str, torch.Tensor], parts: dict[str, Part]
) -> tuple[dict[str, str], dict[str, dict]]:
    """(weight_map, split_tensors) of one writer's shards: where its whole tensors live, and its
    pieces of split ones."""
    weight_map: dict[str, str] = {}
    split: dict[str, dict] = {}
    for filename, pieces in zip(filenames, shards):
        for p in pieces:
            if p.start is None:
                weight_map[p.name] = filename
                continue
            t = tensors[p.name]
            shape = parts[p.name].shape if p.name in parts else tuple(t.shape)
            dtype = str(t.dtype).removeprefix("torch.")
            entry = split.setdefault(p.name, {"dtype": dtype, "shape": list(shape), "pieces": []})
            entry["pieces"].append({"file": filename, "key": p.key, "start": p.start, "stop": p.stop})
    return weight_map, split


def _index(writers: list[tuple[dict[str, str], dict[str, dict]]], files: dict[str, dict], total_bytes: int) -> dict:
    """index.json from every writer's part (in writer order): where each tensor lives, how split
    ones are put back, size and crc32 of every file."""
    weight_map: dict[str, str] = {}
    split: dict[str, dict] = {}
    for part_map, part_split in writers:
        weight_map.update(part_map)
        for name, entry in part_split.items():
            split.setdefault(name, {**entry, "pieces": []})["pieces"].extend(entry["pieces"])
    return {"format": FORMAT, "total_bytes": total_bytes, "weight_map": weight_map, "split_tensors": split, "files": files}


def _shard_payload(pieces: list[_Piece], tensors: dict[str, torch.Tensor], parts: dict[str, Part]) -> dict[str, torch.Tensor]:
    # Tensors reach the host one shard at a time, so host memory holds one shard, not the state.
    payload = {}
    for p in pieces:
        t = tensors[p.name].detach()
        if p.start is not None:
            first = parts[p.name].start if p.name in parts else 0
            t = t.contiguous().view(-1)[p.start - first : p.stop - first]
        payload[p.key] = t.to("cpu").contiguous()
    return payload
