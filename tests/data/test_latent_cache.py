"""The latent cache: built once, keyed by content, checksummed, resumable, normalised, locked."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from voxgen.data.latent_cache import (
    INDEX,
    LatentCache,
    LatentCacheBusy,
    build_lock,
    cache_key,
    data_fingerprint,
    tensors_fingerprint,
)
from voxgen.errors import DataError

ITEMS = [("train", "a"), ("train", "b"), ("train", "c"), ("train", "d"), ("val", "e"), ("val", "f")]
MODALITIES = ("bravo", "seg")
SHAPE = (4, 6, 8)


def load(i: int) -> dict[str, torch.Tensor]:
    """Volumes (1, 4, 6, 8) of items[i]; the val cases are offset, so their own statistics differ."""
    generator = torch.Generator().manual_seed(i)
    offset = 5.0 if ITEMS[i][0] == "val" else 0.0
    return {m: torch.randn((1, *SHAPE), generator=generator) + offset for m in MODALITIES}


def fake_encode(volumes: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """(1, D, H, W) -> (2, D/2, H/2, W/2): average pools, scaled and shifted away from N(0, 1)."""
    out = {}
    for modality, volume in volumes.items():
        pooled = F.avg_pool3d(volume[None], 2)[0]  # (1, 2, 3, 4)
        out[modality] = torch.cat([3.0 * pooled + 1.0, pooled - 2.0])  # (2, 2, 3, 4)
    return out


class Encoder:
    """`fake_encode` that counts its calls and can be told to fail on one of them."""

    def __init__(self, fail_on: int | None = None, check=None):
        self.calls = 0
        self.fail_on = fail_on
        self.check = check

    def __call__(self, volumes):
        self.calls += 1
        if self.check is not None:
            self.check()
        if self.calls == self.fail_on:
            raise RuntimeError("encoder killed")
        return fake_encode(volumes)


def build(cache: LatentCache, encoder: Encoder, warnings: list[str] | None = None) -> None:
    cache.build(ITEMS, load, encoder, warn=(warnings if warnings is not None else []).append)


def raw_latents(split: str) -> list[dict[str, torch.Tensor]]:
    return [fake_encode(load(i)) for i, (s, _) in enumerate(ITEMS) if s == split]


def test_second_build_encodes_nothing(tmp_path):
    cache = LatentCache(tmp_path / "key")
    assert not cache.is_complete()
    first, second = Encoder(), Encoder()
    steps: list[tuple[int, int]] = []
    start = time.perf_counter()
    cache.build(ITEMS, load, first, progress=lambda done, total: steps.append((done, total)), warn=[].append)
    first_s = time.perf_counter() - start
    index = (cache.folder / INDEX).read_bytes()
    start = time.perf_counter()
    build(cache, second)
    second_s = time.perf_counter() - start
    assert (first.calls, second.calls) == (len(ITEMS), 0), f"first build {first_s:.3f} s, second {second_s:.3f} s"
    assert steps == [(k, len(ITEMS)) for k in range(len(ITEMS) + 1)]
    assert (cache.folder / INDEX).read_bytes() == index  # nothing rewritten
    assert cache.is_complete()
    items = [cache.dataset("train")[i] for i in range(4)]
    assert [item["case"] for item in items] == ["a", "b", "c", "d"]
    assert items[0]["bravo"].shape == (2, 2, 3, 4) and items[0]["bravo"].dtype == torch.float32
    assert len(cache.dataset("val")) == 2


def _normalised(items: list[dict], modality: str) -> torch.Tensor:
    return torch.cat([item[modality].to(torch.float64).reshape(-1) for item in items])


def test_normalisation_uses_train_statistics(tmp_path):
    cache = LatentCache(tmp_path / "key")
    build(cache, Encoder())
    stats = cache.stats()
    train, val = cache.dataset("train"), cache.dataset("val")
    for modality in MODALITIES:
        values = _normalised([train[i] for i in range(len(train))], modality)
        assert abs(values.mean().item()) < 1e-5
        assert abs(values.std(unbiased=False).item() - 1.0) < 1e-5
        # The formula of the docstring, from the raw train latents.
        raw = torch.cat([latents[modality].to(torch.float64).reshape(-1) for latents in raw_latents("train")])
        assert stats[modality]["shift"] == pytest.approx(raw.mean().item(), abs=1e-9)
        assert stats[modality]["scale"] == pytest.approx(raw.std(unbiased=False).item(), rel=1e-9)
        # Val is normalised with the train statistics: offset data stays offset.
        shift, scale = stats[modality]["shift"], stats[modality]["scale"]
        for item, latents in zip([val[i] for i in range(len(val))], raw_latents("val")):
            torch.testing.assert_close(item[modality], (latents[modality] - shift) / scale, atol=1e-5, rtol=1e-5)
        assert _normalised([val[i] for i in range(len(val))], modality).mean().item() > 1.0


def test_damaged_shard_is_detected_and_only_it_is_encoded_again(tmp_path):
    cache = LatentCache(tmp_path / "key")
    build(cache, Encoder())
    shard = cache.folder / "train" / "b.safetensors"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))

    assert cache.is_complete()  # sizes only: the crc32 is checked on read
    train = cache.dataset("train")
    train[0]
    with pytest.raises(DataError, match=r"train/b\.safetensors.*crc32"):
        train[1]

    encoder, warnings = Encoder(), []
    build(cache, encoder, warnings)
    assert encoder.calls == 1
    assert len(warnings) == 1 and "train/b.safetensors" in warnings[0]
    torch.testing.assert_close(load_file(shard), fake_encode(load(1)))
    repaired = cache.dataset("train")
    assert repaired[1]["case"] == "b"


def test_interrupted_build_resumes_with_only_the_missing_cases(tmp_path):
    cache = LatentCache(tmp_path / "key")
    with pytest.raises(RuntimeError, match="encoder killed"):
        build(cache, Encoder(fail_on=3))
    assert not (cache.folder / INDEX).exists() and not cache.is_complete()
    with pytest.raises(DataError, match="not built"):
        cache.dataset("train")
    leftover = cache.folder / "train" / ".c.safetensors.x1y2z3.tmp"
    leftover.write_bytes(b"half a shard")

    def no_index_yet():
        assert not (cache.folder / INDEX).exists()

    encoder, warnings = Encoder(check=no_index_yet), []
    build(cache, encoder, warnings)
    assert encoder.calls == len(ITEMS) - 2
    assert cache.is_complete() and not leftover.exists()
    assert any("2 of 6 cases already encoded" in line for line in warnings)

    whole = LatentCache(tmp_path / "whole")
    build(whole, Encoder())
    for modality, stats in whole.stats().items():
        assert cache.stats()[modality] == pytest.approx(stats, rel=1e-12)
    index, whole_index = (json.loads((c.folder / INDEX).read_bytes()) for c in (cache, whole))
    assert index["shards"] == whole_index["shards"]


def test_shard_written_without_its_record_is_encoded_again(tmp_path):
    """A kill between a shard and its record: the shard cannot be trusted and is encoded again."""
    cache = LatentCache(tmp_path / "key")
    with pytest.raises(RuntimeError):
        build(cache, Encoder(fail_on=3))
    (cache.folder / "train" / "b.json").unlink()
    encoder, warnings = Encoder(), []
    build(cache, encoder, warnings)
    assert encoder.calls == len(ITEMS) - 1
    assert any("train/b.safetensors" in line and "record" in line for line in warnings)


def test_key_follows_autoencoder_and_data_content(tmp_path):
    files = []
    for name in ("bravo.nii.gz", "seg.nii.gz"):
        files.append(tmp_path / name)
        files[-1].write_bytes(name.encode() * 10)
    cases = [("train", "a", files)]
    weights = {"w": torch.ones(3, 3), "b": torch.zeros(3)}
    ae = tensors_fingerprint(weights)
    key = cache_key(ae, data_fingerprint(cases), SHAPE, MODALITIES)
    assert len(key) == 16
    assert cache_key(ae, data_fingerprint(cases), SHAPE, MODALITIES[::-1]) == key
    other_ae = tensors_fingerprint({**weights, "b": torch.full((3,), 1e-3)})
    assert cache_key(other_ae, data_fingerprint(cases), SHAPE, MODALITIES) != key
    assert cache_key(ae, data_fingerprint(cases), (4, 6, 10), MODALITIES) != key
    assert cache_key(ae, data_fingerprint([("val", "a", files)]), SHAPE, MODALITIES) != key
    files[0].touch()  # a new time stamp, the same bytes
    assert cache_key(ae, data_fingerprint(cases), SHAPE, MODALITIES) == key
    data = bytearray(files[0].read_bytes())
    data[3] ^= 1
    files[0].write_bytes(bytes(data))
    assert cache_key(ae, data_fingerprint(cases), SHAPE, MODALITIES) != key
    with pytest.raises(DataError, match="missing.nii.gz"):
        data_fingerprint([("train", "a", [tmp_path / "missing.nii.gz"])])


HOLDER = """
import sys
from voxgen.data.latent_cache import build_lock
with build_lock(sys.argv[1]):
    print("locked", flush=True)
    sys.stdin.read()
"""


def test_build_waits_for_another_process_holding_the_lock(tmp_path):
    cache = LatentCache(tmp_path / "key")
    cache.folder.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(cache.folder)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(LatentCacheBusy, match=f"process {holder.pid} on"):
            with build_lock(cache.folder, wait=False):
                pass
        threading.Timer(0.5, holder.stdin.close).start()  # the holder lets go half a second later
        encoder, warnings = Encoder(), []
        start = time.perf_counter()
        build(cache, encoder, warnings)
        assert time.perf_counter() - start >= 0.4
        assert any(f"process {holder.pid}" in line and "waiting" in line for line in warnings)
        assert encoder.calls == len(ITEMS) and cache.is_complete()
    finally:
        holder.kill()
        holder.wait()
