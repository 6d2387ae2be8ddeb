"""A data set encoded once by a frozen autoencoder: latents on disk, checksummed, normalised.

Latent diffusion trains on the latents of every case, which a frozen autoencoder gives the same
way every epoch and every run: encoding them once saves the autoencoder's forward pass (and its
memory) in every step. The data layer knows no models: `LatentCache.build` takes plain callables,
`load(i) -> {modality: (1, D, H, W)}` and `encode(volumes) -> {modality: (C', D', H', W')}`.

Layout of one cache, CACHE_DIR/KEY/ (KEY = `cache_key(...)`, so a new autoencoder or changed data
gets a new folder and never overwrites the latents another run trains on):

    index.json                     written last: a cache without it is not (completely) built
    build.lock                     lockf lock held while building
    <split>/<case>.safetensors     one shard per case: {modality: float32 (C', D', H', W')}
    <split>/<case>.json            the shard's record: size, crc32, shapes, moments of its values

Every file is written whole or not at all (`voxgen.files`). A shard's record is written after
the shard, so a build killed half-way leaves shards that either have a record whose crc32 they
match (kept by the next build) or not (encoded again). index.json gathers the records of all
shards, the normalisation statistics and the format version, and carries its own crc32.

Normalisation (the unnormalised latents of the seeds' DC-AE run put its first MSE at 31,387):
for each modality m, over every value x of every latent of m of the TRAIN cases (all channels,
all voxels), N values in all,

    shift_m = mean(x) = sum(x) / N
    scale_m = std(x)  = sqrt(sum((x - shift_m)^2) / N)         (population std)
    normalised latent = (latent - shift_m) / scale_m

Validation and test latents use the train statistics. The sums are streamed in float64: each
shard records (n, mean, M2 = sum((x - mean)^2)) of its values and the shards are combined with
Chan et al.'s pairwise update, so a repaired or resumed build never reads the other shards again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import re
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from voxgen.errors import DataError, WriteError
from voxgen.files import LockHeld, process_lock, write_atomic

# Part of the key: a new format gives a new folder instead of misreading an old one.
FORMAT = 1
INDEX = "index.json"
LOCK = "build.lock"
TRAIN = "train"
SHARD_SUFFIX = ".safetensors"
RECORD_SUFFIX = ".json"
KEY_LENGTH = 16  # hex digits: 64 bits, no collision among the caches of one machine
_IO_CHUNK = 4 * 2**20
# What `voxgen.files.atomic_path` leaves when a write is killed: '.NAME.RANDOM.tmp'.
_TEMPORARY = re.compile(r"\..+\.tmp")

Item = tuple[str, str]  # (split, case id)
Moments = list[float]  # [n, mean, M2] of a set of values, float64


class LatentCacheBusy(DataError):
    """Another process is building this latent cache."""


# Keys


def _update_framed(digest, data: bytes) -> None:
    """Add `data` with its length first, so ('ab', 'c') and ('a', 'bc') digest differently."""
    digest.update(len(data).to_bytes(8, "little"))
    digest.update(data)


def _update_file(digest, path: Path) -> None:
    try:
        size = path.stat().st_size
        digest.update(size.to_bytes(8, "little"))
        with open(path, "rb", buffering=0) as f:
            while chunk := f.read(_IO_CHUNK):
                digest.update(chunk)
    except OSError as exc:
        raise DataError(f"{path}: cannot read the file to fingerprint the data ({exc.strerror or exc})") from None


def data_fingerprint(cases: Sequence[tuple[str, str, Sequence[Path]]]) -> str:
    """sha256 (hex) of a data set's content: split and id of each case, names and bytes of its files.

    cases: (split, case id, files), e.g. `[(c.split, c.id, [c.path(m) for m in modalities]) for c in
    cases]`. Content, not modification times: a file copied, touched or moved with its folder keeps
    the fingerprint; a file whose bytes change changes it. Only file names count, not their folders.
    The order of the cases and of the files does not matter.

    Cost: every byte of every file is read once (sha256 runs at about 1-2 GB/s on one core, so a
    data set of 4 GB of NIfTI takes a few seconds from the page cache, longer from a slow disk).
    Raises DataError naming a file that cannot be read.
    """
    digest = hashlib.sha256(b"voxgen-data-fingerprint-1")
    for split, case, files in sorted(cases, key=lambda c: (c[0], c[1])):
        _update_framed(digest, split.encode())
        _update_framed(digest, case.encode())
        digest.update(len(files).to_bytes(8, "little"))
        for path in sorted((Path(p) for p in files), key=lambda p: p.name):
            _update_framed(digest, path.name.encode())
            _update_file(digest, path)
    return digest.hexdigest()


def tensors_fingerprint(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 (hex) of named tensors (an autoencoder's state dict): names, dtypes, shapes, bytes."""
    digest = hashlib.sha256(b"voxgen-tensors-fingerprint-1")
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous().reshape(-1)
        _update_framed(digest, f"{name} {tensor.dtype} {list(tensors[name].shape)}".encode())
        _update_framed(digest, tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def cache_key(autoencoder_fingerprint: str, data_fingerprint: str, shape: Sequence[int], modalities: Sequence[str]) -> str:
    """The cache's folder name: KEY_LENGTH hex digits of sha256 over everything the latents depend on.

    autoencoder_fingerprint: any string that changes when the autoencoder's weights or
    architecture change (`tensors_fingerprint` of its state dict plus its config, say).
    shape: the [D, H, W] volumes are resampled to before encoding. The order of `modalities`
    does not matter.
    """
    parts = [FORMAT, autoencoder_fingerprint, data_fingerprint, [int(s) for s in shape], sorted(modalities)]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:KEY_LENGTH]


# Sealed JSON: a file that carries the crc32 of its own content

SEAL = "self_crc32"  # the key of a sealed file's own checksum (a shard's record has a crc32 of its own)


def _json_bytes(data) -> bytes:
    return json.dumps(data, indent=1, sort_keys=True).encode()


def _sealed(data: dict) -> bytes:
    return _json_bytes({**data, SEAL: zlib.crc32(_json_bytes(data))})


def _unsealed(raw: bytes) -> dict:
    """The content of a sealed file; ValueError when it is not JSON or fails its own crc32."""
    data = json.loads(raw)
    if not isinstance(data, dict) or SEAL not in data:
        raise ValueError(f"no {SEAL} entry")
    crc = data.pop(SEAL)
    if crc != zlib.crc32(_json_bytes(data)):
        raise ValueError("fails its own crc32 check: its bytes changed after it was written")
    return data


def _file_crc(path: Path) -> tuple[int, int]:
    """(size in bytes, crc32) of a file."""
    size = crc = 0
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(_IO_CHUNK):
            crc = zlib.crc32(chunk, crc)
            size += len(chunk)
    return size, crc


# Statistics


def _moments(values: torch.Tensor) -> Moments:
    """[n, mean, M2] of all values of a tensor, in float64."""
    x = values.detach().to(torch.float64).reshape(-1)
    mean = x.mean()
    return [float(x.numel()), float(mean), float(((x - mean) ** 2).sum())]


def _combine(a: Moments, b: Moments) -> Moments:
    """Moments of the union of two sets of values (Chan, Golub and LeVeque's pairwise update)."""
    n = a[0] + b[0]
    delta = b[1] - a[1]
    return [n, a[1] + delta * b[0] / n, a[2] + b[2] + delta**2 * a[0] * b[0] / n]


def _normalisation(folder: Path, records: Mapping[str, dict]) -> dict[str, dict[str, float]]:
    """{modality: {"shift", "scale", "count"}} from the moments of the train shards.

    Raises DataError when a modality has no train latents or its train latents are constant.
    """
    total: dict[str, Moments] = {}
    for record in records.values():
        if record["split"] == TRAIN:
            for modality, moments in record["moments"].items():
                total[modality] = _combine(total[modality], moments) if modality in total else moments
    modalities = {m for record in records.values() for m in record["moments"]}
    if missing := sorted(modalities - set(total)):
        raise DataError(f"{folder}: no '{TRAIN}' case has a latent of {missing[0]}: its normalisation needs train cases")
    stats = {}
    for modality, (n, mean, m2) in sorted(total.items()):
        std = math.sqrt(m2 / n)
        if not std > 0:
            raise DataError(f"{folder}: the train latents of {modality} are constant ({mean:g}): the autoencoder is broken")
        stats[modality] = {"shift": mean, "scale": std, "count": int(n)}
    return stats


# Lock


@contextlib.contextmanager
def build_lock(folder: str | Path, wait: bool = True, warn: Callable[[str], None] = print) -> Iterator[None]:
    """Hold FOLDER/build.lock (`voxgen.files.process_lock`) for the block.

    A killed build leaves no stale lock. wait=True blocks, after one warning naming the holder,
    until the lock is free; wait=False raises LatentCacheBusy instead. The lock excludes other
    processes only: two builds of one folder in one process are not excluded.
    """
    path = Path(folder) / LOCK
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(process_lock(path))
        except LockHeld as held:
            if not wait:
                raise LatentCacheBusy(
                    f"{path.parent}: process {held.holder} is building this latent cache (lock {path})"
                ) from None
            warn(f"{path.parent}: process {held.holder} is building this latent cache; waiting for it to finish")
            stack.enter_context(process_lock(path, wait=True))
        yield


def _remove_temporaries(folder: Path) -> None:
    """Delete what killed writes left ('.NAME.RANDOM.tmp'); only under the lock, where no one writes."""
    for parent in [folder, *(p for p in folder.iterdir() if p.is_dir())]:
        for path in parent.iterdir():
            if _TEMPORARY.fullmatch(path.name) and path.is_file():
                path.unlink(missing_ok=True)


# Items and shards


def _checked_items(folder: Path, items: Sequence[Item]) -> list[Item]:
    """(split, case) pairs as a list; DataError on a repeat or a name unfit for a file name."""
    checked = [(str(split), str(case)) for split, case in items]
    for name in (n for pair in checked for n in pair):
        if name in ("", ".", "..") or "/" in name or "\0" in name:
            raise DataError(f"{folder}: {name!r} cannot name a split or case of a latent cache")
    if len(set(checked)) != len(checked):
        repeat = next(p for p in checked if checked.count(p) > 1)
        raise DataError(f"{folder}: case {repeat[0]}/{repeat[1]} is listed twice")
    return checked


def _name(item: Item) -> str:
    return f"{item[0]}/{item[1]}"


def _latents(latents, item: Item) -> dict[str, torch.Tensor]:
    """What `encode` returned as contiguous float32 CPU tensors; DataError when it cannot be used."""
    if not isinstance(latents, Mapping) or not latents or not all(isinstance(t, torch.Tensor) for t in latents.values()):
        raise DataError(f"{_name(item)}: the encoder must return a non-empty {{modality: tensor}} dict")
    out = {str(m): t.detach().to("cpu", torch.float32).contiguous() for m, t in latents.items()}
    for modality, tensor in out.items():
        if not torch.isfinite(tensor).all():
            raise DataError(f"{_name(item)}: the latent of {modality} has non-finite values")
    return out


class LatentCache:
    """Latents of a data set in one folder, CACHE_DIR/KEY (see the module's docstring).

    `build` makes or completes the cache; `dataset(split)` reads it, normalised. Readers take
    no lock: open a cache to train on it after `build` returned (in this or another process).
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    def _shard(self, item: Item) -> Path:
        return self.folder / item[0] / f"{item[1]}{SHARD_SUFFIX}"

    def _record_path(self, item: Item) -> Path:
        return self.folder / item[0] / f"{item[1]}{RECORD_SUFFIX}"

    def _index(self) -> dict:
        """index.json, verified; DataError when it is missing or damaged."""
        path = self.folder / INDEX
        try:
            index = _unsealed(path.read_bytes())
            if index.get("format") != FORMAT:
                raise ValueError(f"format {index.get('format')!r}, this version reads {FORMAT}")
            if not isinstance(index.get("items"), list) or not isinstance(index.get("shards"), dict):
                raise ValueError("no items or shards")
            if not isinstance(index.get("stats"), dict):
                raise ValueError("no stats")
            return index
        except FileNotFoundError:
            raise DataError(f"{self.folder}: latent cache is not built (no {INDEX}): build it first") from None
        except (OSError, ValueError) as exc:
            raise DataError(f"{path}: latent cache index is damaged ({exc}): build the cache again") from None

    def is_complete(self) -> bool:
        """Whether the index is there, intact, and every shard it lists has its recorded size.

        Cheap (no shard is read): the crc32 of a shard is checked by `build` and on a
        data set's first read of it.
        """
        try:
            index = self._index()
        except DataError:
            return False
        for split, case in index["items"]:
            try:
                if self._shard((split, case)).stat().st_size != index["shards"][_name((split, case))]["bytes"]:
                    return False
            except (OSError, KeyError):
                return False
        return True

    def stats(self) -> dict[str, dict[str, float]]:
        """{modality: {"shift": mean, "scale": std}} of the train latents; DataError when not built."""
        return {m: {"shift": s["shift"], "scale": s["scale"]} for m, s in self._index()["stats"].items()}

    def dataset(self, split: str) -> LatentDataset:
        """The cases of `split`, in build order, as normalised latents (see `LatentDataset`).

        DataError when the cache is not built or has no case of `split`.
        """
        index = self._index()
        entries = [(case, self._shard((s, case)), index["shards"][_name((s, case))]) for s, case in index["items"] if s == split]
        if not entries:
            raise DataError(f"{self.folder}: latent cache has no case of split '{split}'")
        return LatentDataset(entries, index["stats"])

    def build(
        self,
        items: Sequence[Item],
        load: Callable[[int], dict[str, torch.Tensor]],
        encode: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]],
        progress: Callable[[int, int], None] | None = None,
        warn: Callable[[str], None] = print,
    ) -> None:
        """Encode the cases the cache lacks, then write the index; encode nothing when it is whole.

        items: (split, case id) of every case, in the order `dataset` gives them. load(i): the
        volumes of items[i], {modality: float32 (1, D, H, W)}. encode(volumes): their latents,
        {modality: (C', D', H', W')}, no batch axis; called under torch.no_grad().
        progress(done, total): after each encoded case, and (0, total) first; total = cases to
        encode in this call. warn: one line per shard found damaged or missing and re-encoded.

        Shards whose crc32 matches the index (or, after a build killed before its index, their
        record) are kept; every shard is read once to check it. Waits for another process that
        is building the same folder (`build_lock`). Raises DataError (bad items, unusable
        latents, no statistics) or WriteError; whatever `load` and `encode` raise passes through,
        and the shards finished by then are kept for the next build.
        """
        items = _checked_items(self.folder, items)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise WriteError(f"{self.folder}: not written: {exc.strerror or exc}") from None
        with build_lock(self.folder, warn=warn):
            _remove_temporaries(self.folder)
            index = self._usable_index(warn)
            records, todo = self._survey(items, index["shards"] if index else {}, warn)
            if not todo and index and index["items"] == [list(item) for item in items]:
                return
            if records and todo and not index:
                warn(f"{self.folder}: resuming a latent cache build: {len(records)} of {len(items)} cases already encoded")
            (self.folder / INDEX).unlink(missing_ok=True)  # being changed: incomplete until written again
            if progress is not None and todo:
                progress(0, len(todo))
            for done, i in enumerate(todo):
                records[_name(items[i])] = self._encode(items[i], load(i), encode)
                if progress is not None:
                    progress(done + 1, len(todo))
            records = {_name(item): records[_name(item)] for item in items}
            self._write_index(items, records)

    def _usable_index(self, warn: Callable[[str], None]) -> dict | None:
        """The index when there is one and it reads; a damaged one is reported and left out."""
        if not (self.folder / INDEX).exists():
            return None
        try:
            return self._index()
        except DataError as exc:
            warn(f"warning: {exc}")
            return None

    def _survey(self, items: list[Item], indexed: dict[str, dict], warn: Callable[[str], None]) -> tuple[dict, list[int]]:
        """({name: record} of the shards kept, positions in `items` of those to encode)."""
        records: dict[str, dict] = {}
        todo: list[int] = []
        for i, item in enumerate(items):
            record, problem = self._kept(item, indexed.get(_name(item)))
            if record is not None:
                records[_name(item)] = record
                continue
            todo.append(i)
            if problem:
                warn(f"warning: {self._shard(item)}: {problem}; encoding it again")
        return records, todo

    def _kept(self, item: Item, indexed: dict | None) -> tuple[dict | None, str | None]:
        """(record, None) for a shard that can be kept; (None, why) otherwise (why None: never written)."""
        shard = self._shard(item)
        record = indexed if indexed is not None else self._read_record(item)
        if not shard.exists():
            return None, (None if record is None else "the shard is missing")
        if record is None:
            return None, "the shard has no record of its checksum (its build was interrupted)"
        if (record.get("split"), record.get("case")) != item:
            return None, f"its record names another case ({record.get('split')}/{record.get('case')})"
        try:
            size, crc = _file_crc(shard)
        except OSError as exc:
            return None, f"cannot be read ({exc.strerror or exc})"
        if (size, crc) != (record.get("bytes"), record.get("crc32")):
            return None, "the shard fails its crc32 check: its bytes changed after it was written"
        return record, None

    def _read_record(self, item: Item) -> dict | None:
        """A shard's record file; None when missing or damaged (the shard is then encoded again)."""
        try:
            return _unsealed(self._record_path(item).read_bytes())
        except (OSError, ValueError):
            return None

    def _encode(self, item: Item, volumes: dict[str, torch.Tensor], encode: Callable) -> dict:
        """Encode one case, write its shard and then its record; returns the record."""
        with torch.no_grad():
            latents = _latents(encode(volumes), item)
        # One metadata entry: safetensors writes its metadata map in an arbitrary order, and the
        # same latents should give the same bytes (and crc32) whenever they are encoded.
        about = json.dumps({"format": FORMAT, "split": item[0], "case": item[1]}, sort_keys=True)
        data = save_safetensors(latents, metadata={"voxgen_latent_cache": about})
        record = {
            "split": item[0],
            "case": item[1],
            "bytes": len(data),
            "crc32": zlib.crc32(data),
            "shapes": {m: list(t.shape) for m, t in latents.items()},
            "moments": {m: _moments(t) for m, t in latents.items()},
        }
        # Shard first: a record vouches only for bytes that are already in place.
        write_atomic(self._shard(item), data)
        write_atomic(self._record_path(item), _sealed(record))
        return record

    def _write_index(self, items: list[Item], records: dict[str, dict]) -> None:
        index = {
            "format": FORMAT,
            "items": [list(item) for item in items],
            "shards": records,
            "stats": _normalisation(self.folder, records),
        }
        write_atomic(self.folder / INDEX, _sealed(index))


class LatentDataset(torch.utils.data.Dataset):
    """One split of a latent cache: `dataset[i]` is {modality: float32 (C', D', H', W'), "case": id}.

    Latents are normalised with the train statistics, (latent - shift) / scale. Each shard's
    size and crc32 are checked against the index on its first read (per process: a data-loader
    worker checks the shards it reads); a shard that no longer matches raises a DataError naming
    it, and `LatentCache.build` encodes it again.
    """

    def __init__(self, entries: Sequence[tuple[str, Path, dict]], stats: Mapping[str, Mapping[str, float]]):
        self.entries = list(entries)  # (case id, shard, record)
        self.stats = {m: (float(s["shift"]), float(s["scale"])) for m, s in stats.items()}
        self._verified: set[int] = set()

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> dict:
        case, shard, record = self.entries[index]
        try:
            data = shard.read_bytes()
        except OSError as exc:
            raise DataError(f"{shard}: latent shard cannot be read ({exc.strerror or exc}): build the cache again") from None
        if index not in self._verified:
            if (len(data), zlib.crc32(data)) != (record["bytes"], record["crc32"]):
                raise DataError(f"{shard}: latent shard fails its crc32 check (its bytes changed): build the cache again")
            self._verified.add(index)
        try:
            latents = load_safetensors(data)
        except SafetensorError as exc:
            raise DataError(f"{shard}: latent shard does not read ({exc}): build the cache again") from None
        item: dict = {"case": case}
        for modality, latent in latents.items():
            shift, scale = self.stats[modality]
            item[modality] = ((latent.to(torch.float64) - shift) / scale).to(torch.float32)
        return item
