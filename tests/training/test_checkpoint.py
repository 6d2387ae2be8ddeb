import json

import pytest
import torch

from voxgen.errors import CheckpointError
from voxgen.training import checkpoint as store


def _tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"model/a": torch.randn(100, generator=g), "model/b": torch.randn(50, 4, generator=g), "rng/x": torch.arange(7, dtype=torch.uint8)}


def test_save_load_round_trip_and_latest(tmp_path):
    store.save_checkpoint(tmp_path, 1, _tensors(0), {"step": 1})
    store.save_checkpoint(tmp_path, 2, _tensors(1), {"step": 2})
    folder, tensors, state = store.load_latest(tmp_path)
    assert folder.name == "step_00000002" and state == {"step": 2}
    for k, v in _tensors(1).items():
        assert torch.equal(tensors[k], v)
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_00000002"
    assert not list((tmp_path / "checkpoints").glob(".*tmp"))


def test_shards_respect_the_cap(tmp_path):
    folder = store.save_checkpoint(tmp_path, 3, _tensors(), {"step": 3}, max_shard_bytes=500)
    shards = sorted(folder.glob("*.safetensors"))
    assert len(shards) == 3
    index = json.loads((folder / "index.json").read_text())
    assert set(index["weight_map"]) == set(_tensors())
    _, tensors, _ = store.load_latest(tmp_path)
    assert torch.equal(tensors["model/b"], _tensors()["model/b"])


def test_corrupt_newest_falls_back_to_previous(tmp_path):
    store.save_checkpoint(tmp_path, 1, _tensors(0), {"step": 1})
    newest = store.save_checkpoint(tmp_path, 2, _tensors(1), {"step": 2})
    shard = next(newest.glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:40])
    warnings = []
    folder, tensors, state = store.load_latest(tmp_path, warn=warnings.append)
    assert state["step"] == 1 and len(warnings) == 1 and "step_00000002" in warnings[0]
    with pytest.raises(CheckpointError, match="corrupt"):
        store.read_checkpoint(newest)


def test_prune_keeps_newest(tmp_path):
    for step in range(1, 5):
        store.save_checkpoint(tmp_path, step, _tensors(step), {"step": step})
    store.prune(tmp_path, keep=2)
    assert [p.name for p in store.list_checkpoints(tmp_path)] == ["step_00000004", "step_00000003"]


def test_no_checkpoint_is_none(tmp_path):
    assert store.load_latest(tmp_path) is None
