"""Fuzzing the checkpoint store: bit flips and truncations of every file of a run's checkpoints.

Each case damages a pristine copy of a run folder with two checkpoints (steps 1 and 2, several
shards, a tensor split across shards, index, state, `latest` and `best`) and loads it as a
resume does, weights applied to a module with `load_state_dict`. Whatever the damage, the
load must end in one of three ways: the newest checkpoint bit for bit, the older one bit for
bit with a warning naming the newer one, or (only when both are damaged) one CheckpointError
line. Any other exception, or tensors that differ from what was saved, fails the test.
"""

import random
import shutil
from pathlib import Path

import torch
from torch import nn

from voxgen import checkpoint as store
from voxgen.errors import CheckpointError

CASES = 300
MiB = 2**20


def _model() -> nn.Module:
    return nn.Sequential(nn.Conv3d(2, 8, 3), nn.GroupNorm(4, 8), nn.Conv3d(8, 1, 1))


def _state(step: int) -> dict[str, torch.Tensor]:
    """Weights, EMA, a 'moment' large enough to be split across shards, and a random-generator state."""
    g = torch.Generator().manual_seed(step)
    model = {f"model/{k}": torch.randn(v.shape, generator=g) for k, v in _model().state_dict().items()}
    ema = {f"ema/{k}": torch.randn(v.shape, generator=g) for k, v in _model().state_dict().items()}
    moment = {"optimizer/p0/exp_avg": torch.randn(300_000, generator=g)}  # 1.2 MB: split over two shards
    return {**model, **ema, **moment, "rng/generator": torch.randint(0, 255, (5056,), dtype=torch.uint8, generator=g)}


def _pristine(folder: Path) -> Path:
    for step in (1, 2):
        store.save_checkpoint(folder, step, _state(step), {"step": step, "metrics": {"val": 1.0 / step}}, max_shard_bytes=MiB)
        store.retain(folder, keep_last=2, best_metric="val")
    return folder


def _damage(path: Path, rng: random.Random) -> str:
    data = bytearray(path.read_bytes())
    if data and rng.random() < 0.6:
        i, bit = rng.randrange(len(data)), rng.randrange(8)
        data[i] ^= 1 << bit
        path.write_bytes(bytes(data))
        return f"bit {bit} of byte {i}"
    cut = rng.randrange(len(data)) if data else 0
    path.write_bytes(bytes(data[:cut]))
    return f"truncated to {cut} bytes"


def _equal(got: dict, want: dict) -> bool:
    return set(got) == set(want) and all(torch.equal(got[k].view(torch.uint8), want[k].view(torch.uint8)) for k in want)


def test_damaged_checkpoints_never_load_wrong_weights_or_crash(tmp_path):
    pristine = _pristine(tmp_path / "pristine")
    root = store.checkpoint_root(pristine)
    files = sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())
    assert {f.name for f in files} >= {"latest", "best", "index.json", "state.json"}
    assert sum(f.suffix == ".safetensors" for f in files) >= 6, files
    saved = {1: _state(1), 2: _state(2)}
    rng = random.Random(12)
    outcomes = {"newest": 0, "fell back": 0, "refused": 0}
    for case in range(CASES):
        run = tmp_path / f"case{case}"
        shutil.copytree(pristine, run)
        targets = [rng.choice(files)]
        if rng.random() < 0.15:  # both checkpoints damaged
            targets = [rng.choice([f for f in files if f.parts[0] == name]) for name in ("step_00000001", "step_00000002")]
        what = [f"{t}: {_damage(store.checkpoint_root(run) / t, rng)}" for t in targets]
        warnings: list[str] = []
        model = _model()

        def use(folder, tensors, state, model=model):
            model.load_state_dict(store.split_prefix(tensors, "model/"))

        try:
            folder, tensors, state = store.load_latest(run, warn=warnings.append, use=use)
        except CheckpointError as exc:
            assert len(targets) == 2 and "\n" not in str(exc), (what, exc)
            assert "step_00000001" in str(exc) and "step_00000002" in str(exc), (what, exc)
            outcomes["refused"] += 1
        else:
            step = state["step"]
            assert _equal(tensors, saved[step]), what
            assert all(torch.equal(v, saved[step][f"model/{k}"]) for k, v in model.state_dict().items()), what
            if step == 1:
                assert any("step_00000002" in w for w in warnings), (what, warnings)
                outcomes["fell back"] += 1
            else:
                outcomes["newest"] += 1
            assert all("\n" not in w for w in warnings)
        # Retention (every save runs it) copes with whatever damage there is.
        store.retain(run, keep_last=2, best_metric="val")
        shutil.rmtree(run)
    print(outcomes)
    assert outcomes["newest"] > 20 and outcomes["fell back"] > 100 and outcomes["refused"] > 10, outcomes


def test_verify_checkpoint_refuses_every_damage_that_reading_the_tensors_refuses(tmp_path):
    """`verify_checkpoint` (the report's check: no tensor loaded) against reading every tensor:
    each file of a checkpoint flipped or truncated, or a shard removed, fails both."""
    pristine = _pristine(tmp_path / "pristine")
    newest = store.list_checkpoints(pristine)[0]
    store.verify_checkpoint(newest)
    rng = random.Random(3)
    # state.json is left out: reading the tensors never opens it (read_state checks it), so the
    # two have nothing to agree on there.
    names = sorted(p.name for p in newest.iterdir() if p.name != "state.json")
    assert sum(n.endswith(".safetensors") for n in names) >= 3, names
    cases = [(name, damage) for name in names for damage in ("flip", "truncate", "remove")]
    for case, (name, damage) in enumerate(cases):
        run = tmp_path / f"case{case}"
        shutil.copytree(pristine, run)
        folder = store.checkpoint_folder(run, 2)
        path = folder / name
        if damage == "remove":
            path.unlink()
        else:
            data = bytearray(path.read_bytes())
            if damage == "flip":
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
            else:
                data = data[: rng.randrange(len(data))]
            path.write_bytes(bytes(data))
        try:
            list(store.iter_tensors(folder))
        except CheckpointError:
            pass
        else:
            raise AssertionError(f"{name} {damage}: reading the tensors did not refuse it")
        try:
            store.verify_checkpoint(folder)
        except CheckpointError:
            continue
        raise AssertionError(f"{name} {damage}: verify_checkpoint passed a damaged checkpoint")
