import errno
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from voxgen import checkpoint as store
from voxgen.checkpoint import write as store_write
from voxgen.errors import CheckpointError

MiB = 2**20


def _tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "model/a": torch.randn(100, generator=g),
        "model/b": torch.randn(50, 4, generator=g),
        "rng/x": torch.arange(7, dtype=torch.uint8),
    }


def _multi_shard(seed=0):
    """About 3 MiB in tensors: with a 1 MiB cap, 4 shards, the first three holding pieces of model/w."""
    g = torch.Generator().manual_seed(seed)
    return {
        "model/w": torch.randn(700_000, generator=g),
        "model/v": torch.randn(200_000, generator=g).to(torch.bfloat16),
        "optimizer/p0/step": torch.tensor(7.0),
        "rng/x": torch.randint(0, 255, (5000,), dtype=torch.uint8, generator=g),
    }


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(-1).view(torch.uint8) if t.numel() else t.reshape(-1)


def _assert_bit_equal(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
        assert torch.equal(_bits(got[k]), _bits(v)), k


def _root(tmp_path) -> Path:
    return tmp_path / "checkpoints"


def test_save_load_round_trip_and_latest(tmp_path):
    store.save_checkpoint(tmp_path, 1, _tensors(0), {"step": 1})
    store.save_checkpoint(tmp_path, 2, _tensors(1), {"step": 2})
    folder, tensors, state = store.load_latest(tmp_path)
    assert folder.name == "step_00000002" and state == {"step": 2}
    _assert_bit_equal(tensors, _tensors(1))
    assert (_root(tmp_path) / "latest").read_text().strip() == "step_00000002"
    assert not list(_root(tmp_path).glob(".*tmp"))


def test_large_state_with_an_oversized_tensor_respects_the_cap(tmp_path):
    # ~150 MiB against a 64 MiB cap; "model/big" (80 MiB) cannot fit in any one file.
    g = torch.Generator().manual_seed(0)
    tensors = {
        "model/big": torch.randn(5, 4096, 1024, generator=g),
        **{f"model/w{i}": torch.randn(4 * MiB, generator=g) for i in range(4)},
        "ema/half": torch.randn(2 * MiB, generator=g).to(torch.bfloat16),
        "optimizer/p0/step": torch.tensor(12.0),
        "optimizer/ids": torch.randint(-(2**40), 2**40, (1000,), dtype=torch.int64, generator=g),
        "rng/mask": torch.rand(333, generator=g) > 0.5,
        "rng/empty": torch.empty(0, 3),
    }
    cap = 64 * MiB
    folder = store.save_checkpoint(tmp_path, 5, tensors, {"step": 5}, max_shard_bytes=cap)
    sizes = {p.name: p.stat().st_size for p in folder.iterdir()}
    assert max(sizes.values()) <= cap
    assert max(sizes.values()) > cap - MiB  # shards are filled, not cut early
    assert sum(name.endswith(".safetensors") for name in sizes) == 3
    index = json.loads((folder / "index.json").read_text())
    assert list(index["split_tensors"]) == ["model/big"] and len(index["split_tensors"]["model/big"]["pieces"]) == 2
    assert set(index["files"]) == set(sizes) - {"index.json"}
    _, loaded, _ = store.load_latest(tmp_path)
    _assert_bit_equal(loaded, tensors)


def test_header_counts_against_the_cap(tmp_path):
    # Exactly 1 MiB of data does not fit in a 1 MiB file once the header is added; nor do
    # thousands of long (non-ASCII) names whose header alone is most of a shard.
    tensors = {"exact": torch.arange(MiB, dtype=torch.int64).to(torch.uint8)}
    tensors.update({f"model/блок_{i:05d}_" + "x" * 150: torch.tensor([i], dtype=torch.int32) for i in range(5000)})
    folder = store.save_checkpoint(tmp_path, 1, tensors, {}, max_shard_bytes=MiB)
    shards = sorted(folder.glob("*.safetensors"))
    assert len(shards) >= 3 and all(p.stat().st_size <= MiB for p in shards)
    loaded, _ = store.read_checkpoint(folder)
    _assert_bit_equal(loaded, tensors)


def test_cap_below_one_mib_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="max_shard_bytes=500 is below"):
        store.save_checkpoint(tmp_path, 3, _tensors(), {"step": 3}, max_shard_bytes=500)
    assert not _root(tmp_path).exists()


def _failing_write(monkeypatch, code: int, fail_on):
    """Make the n-th file write (or the write of the file named fail_on) fail after half its bytes.

    Shards fail as safetensors reports it (SafetensorError with the OS error number), JSON
    files and pointers with the OSError of os.write.
    """
    real_bytes, real_shard = store_write._write_bytes, store_write.save_file
    calls = []

    def fails(path) -> bool:
        calls.append(Path(path).name)
        return fail_on in (len(calls), Path(path).name)

    def write_bytes(path, data):
        if fails(path):
            real_bytes(path, data[: len(data) // 2])
            raise OSError(code, os.strerror(code))
        real_bytes(path, data)

    def save_file(payload, path, metadata=None):
        real_shard(payload, path, metadata=metadata)
        if fails(path):
            os.truncate(path, os.path.getsize(path) // 2)
            raise SafetensorError(f"Error while serializing: I/O error: {os.strerror(code)} (os error {code}) at path {path!r}")

    monkeypatch.setattr(store_write, "_write_bytes", write_bytes)
    monkeypatch.setattr(store_write, "save_file", save_file)
    return calls


@pytest.mark.parametrize(
    "code, fail_on, words",
    [
        (errno.ENOSPC, 2, "No space left on device while writing tensors-00002-of-00004"),
        (errno.EIO, 1, "Input/output error while writing tensors-00001-of-00004"),
        (errno.EIO, "state.json", "Input/output error while writing state.json"),
        (errno.ENOSPC, ".latest.tmp", "No space left on device while writing the latest pointer"),
    ],
)
def test_failed_write_leaves_the_previous_checkpoint(tmp_path, monkeypatch, code, fail_on, words):
    store.save_checkpoint(tmp_path, 1, _multi_shard(1), {"step": 1}, max_shard_bytes=MiB)
    calls = _failing_write(monkeypatch, code, fail_on)
    with pytest.raises(CheckpointError) as info:
        store.save_checkpoint(tmp_path, 2, _multi_shard(2), {"step": 2}, max_shard_bytes=MiB)
    message = str(info.value)
    assert "\n" not in message and words in message
    assert message.startswith(f"checkpoint {_root(tmp_path) / 'step_00000002'} not written: ")
    assert message.endswith("free in " + str(_root(tmp_path)) + "); step_00000001 is intact")
    assert fail_on in (len(calls), calls[-1])  # nothing more was written after the failure
    assert sorted(p.name for p in _root(tmp_path).iterdir()) == ["latest", "step_00000001"]
    warnings = []
    folder, tensors, state = store.load_latest(tmp_path, warn=warnings.append)
    assert folder.name == "step_00000001" and state == {"step": 1} and warnings == []
    _assert_bit_equal(tensors, _multi_shard(1))


@pytest.mark.parametrize("where", ["shard", "rename"])
def test_failed_resave_of_the_same_step_keeps_the_old_one(tmp_path, monkeypatch, where):
    store.save_checkpoint(tmp_path, 4, _multi_shard(1), {"step": 4}, max_shard_bytes=MiB)
    if where == "shard":
        _failing_write(monkeypatch, errno.EIO, 2)
    else:  # the old folder is already set aside when the new one fails to move in
        real_replace = os.replace

        def replace(src, dst):
            if Path(src).name == ".step_00000004.tmp":
                raise OSError(errno.EIO, os.strerror(errno.EIO))
            real_replace(src, dst)

        monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(CheckpointError, match="Input/output error .* step_00000004 is intact$"):
        store.save_checkpoint(tmp_path, 4, _multi_shard(2), {"step": 4, "again": True}, max_shard_bytes=MiB)
    monkeypatch.undo()
    assert sorted(p.name for p in _root(tmp_path).iterdir()) == ["latest", "step_00000004"]
    _, tensors, state = store.load_named(tmp_path, "latest")
    assert state == {"step": 4}
    _assert_bit_equal(tensors, _multi_shard(1))
    store.save_checkpoint(tmp_path, 4, _multi_shard(2), {"step": 4, "again": True}, max_shard_bytes=MiB)
    _, tensors, state = store.load_named(tmp_path, "step_00000004")
    assert state == {"step": 4, "again": True}
    _assert_bit_equal(tensors, _multi_shard(2))


def test_not_enough_free_space_is_refused_before_writing(tmp_path, monkeypatch):
    store.save_checkpoint(tmp_path, 1, _tensors(1), {"step": 1})
    written = _failing_write(monkeypatch, errno.EIO, "never")
    big = {"model/w": torch.empty(100 * MiB, dtype=torch.uint8)}
    total = 10 * 2**30
    monkeypatch.setattr(shutil, "disk_usage", lambda path: _usage(total, 150 * MiB))
    with pytest.raises(CheckpointError) as info:
        store.save_checkpoint(tmp_path, 2, big, {"step": 2})
    message = str(info.value)
    assert "\n" not in message and "not enough free space (needs 100.0 MiB, 150.0 MiB free in" in message
    assert message.endswith("step_00000001 is intact")
    assert written == [] and sorted(p.name for p in _root(tmp_path).iterdir()) == ["latest", "step_00000001"]
    # The same save with room for it (the margin included) goes through.
    monkeypatch.setattr(shutil, "disk_usage", lambda path: _usage(total, 200 * MiB))
    store.save_checkpoint(tmp_path, 2, {"model/w": torch.zeros(100 * MiB, dtype=torch.uint8)}, {"step": 2})
    assert (_root(tmp_path) / "latest").read_text().strip() == "step_00000002"


def _usage(total, free):
    return shutil._ntuple_diskusage(total, total - free, free)


def _flip_middle_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size - 100])


def _change_step_digit(path: Path) -> None:
    path.write_text(path.read_text().replace('"step": 2', '"step": 3'))


@pytest.mark.parametrize(
    "damage, target, reason",
    [
        (_truncate, "tensors-00002-of-00004.safetensors", "bytes, index.json says"),
        (_flip_middle_byte, "tensors-00003-of-00004.safetensors", "fails its crc32 check"),
        (_change_step_digit, "state.json", "state.json fails its crc32 check"),
        (lambda p: p.unlink(), "tensors-00004-of-00004.safetensors", "FileNotFoundError"),
    ],
)
def test_damaged_newest_falls_back_to_previous(tmp_path, damage, target, reason):
    store.save_checkpoint(tmp_path, 1, _multi_shard(1), {"step": 1}, max_shard_bytes=MiB)
    newest = store.save_checkpoint(tmp_path, 2, _multi_shard(2), {"step": 2}, max_shard_bytes=MiB)
    damage(newest / target)
    warnings = []
    folder, tensors, state = store.load_latest(tmp_path, warn=warnings.append)
    assert state["step"] == 1 and folder.name == "step_00000001"
    _assert_bit_equal(tensors, _multi_shard(1))
    assert len(warnings) == 1 and "step_00000002" in warnings[0] and reason in warnings[0] and "\n" not in warnings[0]
    with pytest.raises(CheckpointError, match="corrupt"):
        store.read_checkpoint(newest)


def _save_with_metric(tmp_path, step, value, keep_last=2):
    store.save_checkpoint(tmp_path, step, _tensors(step), {"step": step, "metrics": {"val_loss": 1.0, "val_loss_ema": value}})
    return store.retain(tmp_path, keep_last=keep_last, best_metric="val_loss_ema")


def _names(tmp_path):
    return [p.name for p in store.list_checkpoints(tmp_path)]


def _pointer(tmp_path, name):
    return (_root(tmp_path) / name).read_text().strip()


def test_retain_keeps_last_k_and_the_best(tmp_path):
    for step, value in zip(range(1, 7), [0.5, 0.2, 0.4, 0.2, 0.6, 0.7]):
        _save_with_metric(tmp_path, step, value)
    # 0.2 twice: the earlier one stays best.
    assert _names(tmp_path) == ["step_00000006", "step_00000005", "step_00000002"]
    assert _pointer(tmp_path, "best") == "step_00000002" and _pointer(tmp_path, "latest") == "step_00000006"
    deleted = _save_with_metric(tmp_path, 7, 0.1)
    assert [p.name for p in deleted] == ["step_00000005", "step_00000002"]
    assert _names(tmp_path) == ["step_00000007", "step_00000006"] and _pointer(tmp_path, "best") == "step_00000007"
    folder, tensors, state = store.load_named(tmp_path, "best")
    assert folder.name == "step_00000007" and state["metrics"]["val_loss_ema"] == 0.1
    _assert_bit_equal(tensors, _tensors(7))
    assert store.load_named(tmp_path, "step_00000006")[2]["step"] == 6


def test_retain_ignores_missing_and_nonfinite_metrics(tmp_path):
    _save_with_metric(tmp_path, 1, 0.3)
    _save_with_metric(tmp_path, 2, float("nan"))
    store.save_checkpoint(tmp_path, 3, _tensors(3), {"step": 3})  # no validation yet
    store.retain(tmp_path, keep_last=1, best_metric="val_loss_ema")
    assert _names(tmp_path) == ["step_00000003", "step_00000001"] and _pointer(tmp_path, "best") == "step_00000001"
    store.retain(tmp_path, keep_last=1, best_metric="")  # no best tracked: the old pointer still protects
    assert _names(tmp_path) == ["step_00000003", "step_00000001"]


def test_retain_never_deletes_latest_or_before_a_complete_successor(tmp_path):
    for step in range(1, 4):
        store.save_checkpoint(tmp_path, step, _tensors(step), {"step": step})
    _truncate(next((_root(tmp_path) / "step_00000003").glob("*.safetensors")))
    store.retain(tmp_path, keep_last=2, best_metric="")
    # step 3 is damaged, so step 1 is still one of the two newest complete checkpoints.
    assert _names(tmp_path) == ["step_00000003", "step_00000002", "step_00000001"]
    (_root(tmp_path) / "latest").write_text("step_00000001\n")  # e.g. a rollback
    store.retain(tmp_path, keep_last=1, best_metric="")
    assert _names(tmp_path) == ["step_00000003", "step_00000002", "step_00000001"]
    store.save_checkpoint(tmp_path, 4, _tensors(4), {"step": 4})
    store.retain(tmp_path, keep_last=1, best_metric="")
    assert _names(tmp_path) == ["step_00000004"]
    with pytest.raises(CheckpointError, match="keep_last=0"):
        store.retain(tmp_path, keep_last=0, best_metric="")


def test_load_named_errors_name_what_is_missing(tmp_path):
    store.save_checkpoint(tmp_path, 1, _tensors(1), {"step": 1})
    with pytest.raises(CheckpointError, match=r"checkpoints/best: no best checkpoint recorded"):
        store.load_named(tmp_path, "best")
    with pytest.raises(CheckpointError, match=r"step_00000009: checkpoint 'step_00000009' does not exist"):
        store.load_named(tmp_path, "step_00000009")
    with pytest.raises(CheckpointError, match="unknown checkpoint name 'newest'"):
        store.load_named(tmp_path, "newest")
    assert store.load_named(tmp_path, "latest")[2] == {"step": 1}


def test_stale_leftovers_are_cleaned_at_the_next_save(tmp_path):
    store.save_checkpoint(tmp_path, 1, _tensors(1), {"step": 1})
    root = _root(tmp_path)
    (root / ".step_00000002.tmp").mkdir()
    (root / ".step_00000002.tmp" / "tensors-00001-of-00001.safetensors").write_bytes(b"half a file")
    (root / ".latest.tmp").write_text("step_00000002\n")
    # Killed while replacing step 1 by a new save of step 1: the set-aside copy is the only one.
    os.replace(root / "step_00000001", root / ".step_00000001.old")
    store.save_checkpoint(tmp_path, 3, _tensors(3), {"step": 3})
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000001", "step_00000003"]
    _assert_bit_equal(store.load_named(tmp_path, "step_00000001")[1], _tensors(1))


def test_reads_format_1_checkpoints(tmp_path):
    # The layout written before sizes, checksums and split tensors were recorded.
    folder = _root(tmp_path) / "step_00000010"
    folder.mkdir(parents=True)
    tensors = _tensors(10)
    save_file({k: tensors[k] for k in ["model/a", "rng/x"]}, str(folder / "tensors-00001-of-00002.safetensors"))
    save_file({"model/b": tensors["model/b"]}, str(folder / "tensors-00002-of-00002.safetensors"))
    weight_map = {
        "model/a": "tensors-00001-of-00002.safetensors",
        "rng/x": "tensors-00001-of-00002.safetensors",
        "model/b": "tensors-00002-of-00002.safetensors",
    }
    (folder / "index.json").write_text(json.dumps({"weight_map": weight_map, "total_bytes": 1207}))
    (folder / "state.json").write_text(json.dumps({"step": 10}))
    (_root(tmp_path) / "latest").write_text("step_00000010\n")
    folder_read, loaded, state = store.load_latest(tmp_path)
    assert folder_read == folder and state == {"step": 10}
    _assert_bit_equal(loaded, tensors)
    store.save_checkpoint(tmp_path, 11, tensors, {"step": 11})
    assert store.retain(tmp_path, keep_last=1) == [folder]


def test_prune_keeps_newest(tmp_path):
    for step in range(1, 5):
        store.save_checkpoint(tmp_path, step, _tensors(step), {"step": step})
    store.prune(tmp_path, keep=2)
    assert _names(tmp_path) == ["step_00000004", "step_00000003"]


def test_steps_past_eight_digits_sort_numerically(tmp_path):
    store.save_checkpoint(tmp_path, 99_999_999, _tensors(1), {"step": 99_999_999})
    store.save_checkpoint(tmp_path, 100_000_000, _tensors(2), {"step": 100_000_000})
    assert _names(tmp_path) == ["step_100000000", "step_99999999"]
    store.retain(tmp_path, keep_last=1)
    assert _names(tmp_path) == ["step_100000000"]


def test_no_checkpoint_is_none(tmp_path):
    assert store.load_latest(tmp_path) is None


def test_safetensors_write_failures_become_os_errors(tmp_path):
    # A real failure inside safetensors (its folder is gone) keeps the OS error number.
    with pytest.raises(OSError) as info:
        store_write._write_shard(tmp_path / "gone" / "tensors-00001-of-00001.safetensors", {"a": torch.zeros(3)})
    assert info.value.errno == errno.ENOENT


def test_discard_after_points_latest_back_and_deletes_the_newer_checkpoints(tmp_path):
    # A rollback abandons the steps after the checkpoint it returns to.
    kept = store.save_checkpoint(tmp_path, 1, _tensors(1), {"step": 1})
    for step in (2, 3):
        store.save_checkpoint(tmp_path, step, _tensors(step), {"step": step})
    deleted = store.discard_after(tmp_path, kept)
    assert sorted(p.name for p in deleted) == ["step_00000002", "step_00000003"]
    assert _names(tmp_path) == ["step_00000001"] and _pointer(tmp_path, "latest") == "step_00000001"
    assert not [p for p in _root(tmp_path).iterdir() if p.name.startswith(".")]
    assert store.discard_after(tmp_path, kept) == []
