"""Loading one set of weights (`ema/` or `model/`) reads, and verifies, only the shards that hold it.

The damage done to the other shards (a flipped byte, a deleted file) is what shows they were
never opened: the store checks the size and crc32 of every file it reads.
"""

import json
from pathlib import Path

import torch

from voxgen import checkpoint as store
from voxgen.config import compose
from voxgen.config.compose import to_yaml
from voxgen.diffusion.parts import build_parts
from voxgen.training.runs import load_run

MiB = 2**20


def _training_state(seed: int) -> dict[str, torch.Tensor]:
    """About 4.4 MiB laid out as the trainer saves it: model/, ema/, optimizer/ (two Adam moments), rng/.

    Tensors of 100_000 float32 (0.38 MiB): with a 1 MiB cap at most two share a shard, so
    the prefixes land in different shards; ema/big (1.5 MiB) is split across two shards.
    """
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g)

    return {
        "model/a": randn(100_000),
        "model/b": randn(250, 400),
        "ema/a": randn(100_000),
        "ema/big": randn(400, 1000),
        "ema/b": randn(250, 400).to(torch.bfloat16),
        "optimizer/p0/exp_avg": randn(100_000),
        "optimizer/p0/exp_avg_sq": randn(100_000),
        "optimizer/p1/exp_avg": randn(250, 400),
        "optimizer/p1/exp_avg_sq": randn(250, 400),
        "optimizer/p0/step": torch.tensor(7.0),
        "rng/generator": torch.randint(0, 255, (5056,), dtype=torch.uint8, generator=g),
    }


def _under(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in tensors.items() if k.startswith(prefix)}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(-1).view(torch.uint8)


def _assert_bit_equal(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
        assert torch.equal(_bits(got[k]), _bits(v)), k


def _shards(folder: Path) -> set[str]:
    return set(json.loads((folder / "index.json").read_text())["files"]) - {"state.json"}


def _shards_holding(folder: Path, prefix: str) -> set[str]:
    """Shard files holding a tensor, or a piece of a split tensor, whose name starts with `prefix`."""
    index = json.loads((folder / "index.json").read_text())
    found = {file for name, file in index["weight_map"].items() if name.startswith(prefix)}
    for name, spec in index["split_tensors"].items():
        if name.startswith(prefix):
            found |= {piece["file"] for piece in spec["pieces"]}
    return found


def _flip_byte(path: Path) -> None:
    """Invert one byte in the middle of the file (inside the tensor data, past the header)."""
    with open(path, "r+b") as f:
        f.seek(path.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))


def _two_checkpoints(run_dir: Path) -> Path:
    """Steps 1 and 2 (tensors of seeds 1 and 2); the folder of step 2, whose layout is checked."""
    store.save_checkpoint(run_dir, 1, _training_state(1), {"step": 1}, max_shard_bytes=MiB)
    folder = store.save_checkpoint(run_dir, 2, _training_state(2), {"step": 2}, max_shard_bytes=MiB)
    ema = _shards_holding(folder, "ema/")
    index = json.loads((folder / "index.json").read_text())
    assert len({p["file"] for p in index["split_tensors"]["ema/big"]["pieces"]}) == 2
    assert len(ema) >= 2 and len(_shards(folder) - ema) >= 2, sorted(ema)
    return folder


def test_loading_ema_opens_only_the_shards_holding_ema_tensors(tmp_path):
    folder = _two_checkpoints(tmp_path)
    others = sorted(_shards(folder) - _shards_holding(folder, "ema/"))
    for name in others[:-1]:
        _flip_byte(folder / name)
    (folder / others[-1]).unlink()  # a file that is not there cannot be read
    warnings = []
    found, tensors, state = store.load_latest(tmp_path, warn=warnings.append, prefix="ema/")
    assert found == folder and state == {"step": 2} and warnings == []
    _assert_bit_equal(tensors, _under(_training_state(2), "ema/"))
    # The same damage makes the whole checkpoint unreadable: a full load falls back to step 1.
    found, tensors, state = store.load_latest(tmp_path, warn=warnings.append)
    assert found.name == "step_00000001" and len(warnings) == 1
    _assert_bit_equal(tensors, _training_state(1))


def test_a_flipped_byte_in_any_ema_shard_is_caught_and_the_previous_checkpoint_loads(tmp_path):
    folder = _two_checkpoints(tmp_path)
    for name in sorted(_shards_holding(folder, "ema/")):
        original = (folder / name).read_bytes()
        _flip_byte(folder / name)
        warnings = []
        found, tensors, state = store.load_latest(tmp_path, warn=warnings.append, prefix="ema/")
        assert found.name == "step_00000001" and state == {"step": 1}, name
        assert len(warnings) == 1 and f"{name} fails its crc32 check" in warnings[0]
        _assert_bit_equal(tensors, _under(_training_state(1), "ema/"))
        (folder / name).write_bytes(original)
    found, tensors, _ = store.load_latest(tmp_path, prefix="ema/")
    assert found == folder
    _assert_bit_equal(tensors, _under(_training_state(2), "ema/"))


def test_load_run_reads_only_the_chosen_weights_and_falls_back_per_prefix(tmp_path, capsys):
    cfg = compose(
        [],
        [
            "data.shape=[16,16,16]",
            "model.channels=[16,32]",
            "model.attention_levels=[false,true]",
            "model.num_head_channels=8",
            "model.norm_num_groups=4",
            f"data.root={tmp_path}",
            f"run.dir={tmp_path}",
        ],
    )
    (tmp_path / "config.yaml").write_text(to_yaml(cfg))
    shapes = build_parts(cfg, torch.device("cpu")).model.state_dict()

    def like(seed: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        return {
            k: torch.randn(v.shape, generator=g).to(v.dtype) if v.is_floating_point() else v.clone() for k, v in shapes.items()
        }

    def checkpoint(seed: int) -> dict[str, torch.Tensor]:
        parts = {"model/": like(seed), "ema/": like(seed + 1), "optimizer/m/": like(seed + 2), "optimizer/v/": like(seed + 3)}
        return {prefix + k: v for prefix, part in parts.items() for k, v in part.items()}

    store.save_checkpoint(tmp_path, 10, checkpoint(10), {"step": 10}, max_shard_bytes=MiB)
    folder = store.save_checkpoint(tmp_path, 20, checkpoint(20), {"step": 20}, max_shard_bytes=MiB)
    ema, model = _shards_holding(folder, "ema/"), _shards_holding(folder, "model/")
    damaged = sorted(_shards(folder) - ema)
    assert model - ema and len(damaged) >= 3, (sorted(ema), damaged)
    for name in damaged:
        _flip_byte(folder / name)
    capsys.readouterr()

    _, parts, step = load_run(tmp_path, weights="ema", device="cpu")
    assert step == 20 and "warning" not in capsys.readouterr().err
    _assert_bit_equal(parts.model.state_dict(), like(21))
    # The raw weights of step 20 are damaged: the previous checkpoint's are used, with a warning.
    _, parts, step = load_run(tmp_path, weights="model", device="cpu")
    err = capsys.readouterr().err  # warnings go to stderr: stdout is for results
    assert step == 10 and err.count("warning:") == 1 and "step_00000020" in err
    _assert_bit_equal(parts.model.state_dict(), like(10))
