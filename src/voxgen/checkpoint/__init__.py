"""Checkpoint store: one folder per checkpoint, written whole or not at all.

    RUN/checkpoints/step_00000100/
        tensors-00001-of-00002.safetensors   tensors, in files of at most max_shard_bytes
        index.json                           tensor -> shard, pieces of split tensors, size and crc32 of
                                             every file, and its own crc32
        state.json                           everything else (step, data position, metrics, config, versions)
    RUN/checkpoints/latest                   name of the newest complete checkpoint
    RUN/checkpoints/best                     name of the checkpoint with the lowest best_metric

No file, safetensors header included, is larger than max_shard_bytes: a tensor that does not
fit in one file is cut into flat pieces, each in its own shard, and put back together on load.

A checkpoint is written into a temporary folder, every file fsynced, then renamed into place;
`latest` is replaced atomically last; a deleted one is renamed to a trash name first. A
failed write (disk full, I/O error) removes what it wrote and leaves the previous checkpoint
and `latest` as they were. Reading checks every file it reads, size and crc32, against
index.json (itself checked against its own crc32), so a truncated or bit-flipped file is
reported, and `load_latest` falls back to the previous checkpoint; when no checkpoint loads
it raises rather than let a run start over. Pointers are hints, checked against the
checkpoints and ignored when damaged. A read can be restricted to the
tensors under one prefix ('ema/'): only the shards holding them are read. Nothing is pickled:
tensors go to safetensors, the rest to JSON.

Modules: `layout` (names on disk, pointers), `plan` (which tensor goes in which shard),
`write` (`save_checkpoint`), `read` (`iter_tensors`, `load_latest`, ...), `retention`
(`retain`, `prune`).
"""

from voxgen.checkpoint.layout import (
    BEST,
    FORMAT,
    INDEX,
    LATEST,
    STATE,
    checkpoint_folder,
    checkpoint_root,
    split_prefix,
    with_prefix,
)
from voxgen.checkpoint.plan import Part
from voxgen.checkpoint.read import (
    iter_tensors,
    list_checkpoints,
    load_latest,
    load_named,
    load_weights,
    read_checkpoint,
    read_state,
    verify_checkpoint,
)
from voxgen.checkpoint.retention import prune, retain
from voxgen.checkpoint.write import (
    DEFAULT_MAX_SHARD_BYTES,
    FREE_SPACE_MARGIN,
    MIN_SHARD_BYTES,
    Writers,
    delete_checkpoint,
    discard_after,
    remove_leftovers,
    save_checkpoint,
)

__all__ = [
    "BEST",
    "DEFAULT_MAX_SHARD_BYTES",
    "FORMAT",
    "FREE_SPACE_MARGIN",
    "INDEX",
    "LATEST",
    "MIN_SHARD_BYTES",
    "STATE",
    "Part",
    "Writers",
    "checkpoint_folder",
    "checkpoint_root",
    "delete_checkpoint",
    "discard_after",
    "iter_tensors",
    "list_checkpoints",
    "load_latest",
    "load_named",
    "load_weights",
    "prune",
    "read_checkpoint",
    "read_state",
    "remove_leftovers",
    "retain",
    "save_checkpoint",
    "split_prefix",
    "verify_checkpoint",
    "with_prefix",
]
