"""`space=latent`: the code of a trained, frozen autoencoder (`space.autoencoder=RUN_DIR`, a
`task=autoencoder` run).

Each modality is encoded on its own by the run's autoencoder (1 channel in, `latent_channels`
out) and normalised, (z - shift) / scale, with a shift and a scale per modality: the mean and
the standard deviation of all latent values of that modality on the training split. Diffusion
then starts from codes of unit spread, as it does from images in [-1, 1] (Rombach et al. 2022
scale their latents for the same reason; the seeds' DC-AE run, whose latents were not scaled,
started at an MSE of 31,387).

The autoencoder's weights (its EMA copy, from the run's newest checkpoint that reads back) are
loaded on first use, onto the device of the first tensor encoded or decoded: checking a config
or planning a step on the meta device reads the run's config and nothing else.
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch
from omegaconf import OmegaConf
from omegaconf.errors import ConfigAttributeError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn

from voxgen import checkpoint as store
from voxgen.data.dataset import VolumeDataset
from voxgen.data.latent_cache import LatentCache, cache_key, data_fingerprint, tensors_fingerprint
from voxgen.diffusion.run_inputs import read_saved_config
from voxgen.diffusion.spaces import dataset_batches
from voxgen.errors import ConfigError

# The weights the latent space uses: the EMA copy of the autoencoder, not its discriminator.
WEIGHTS_PREFIX = "ema/autoencoder."


def autoencoder_config(source: str | Path, needs: Sequence[str]):
    """The config of the autoencoder `source` names, checked: ConfigError (one line) when it is
    missing, is not a voxgen run or autoencoder config, is not an autoencoder or was not trained
    on every modality of `needs`.

    `source` is the folder of a trained `task=autoencoder` run (training, sampling), or a YAML
    file with that run's `model` and `autoencoder` sections (every key its family reads): enough
    to plan a latent-space step, whose geometry it fixes, before any autoencoder is trained.
    """
    key = "space.autoencoder"
    if not str(source):
        raise ConfigError(f"space=latent needs {key}=RUN_DIR: the folder of a trained task=autoencoder run")
    path = Path(source)
    saved = path / "config.yaml" if path.is_dir() else path
    if not path.exists():
        raise ConfigError(f"{key}={path}: no such run folder or autoencoder config file")
    data = read_saved_config(key, path, saved, ("model", "autoencoder"), "an autoencoder")
    if data.get("task", "diffusion") != "autoencoder":
        raise ConfigError(f"{key}={path} is a task={data.get('task', 'diffusion')} run, not an autoencoder (task=autoencoder)")
    cfg = OmegaConf.create(data)
    trained = list(cfg.autoencoder.modalities)
    absent = [m for m in needs if m not in trained]
    if absent:
        raise ConfigError(
            f"{key}={path} was trained on {', '.join(trained)}; this mode also needs {', '.join(absent)} "
            "(train an autoencoder with autoencoder.modalities that include them)"
        )
    return cfg


class LatentSpace:
    """A frozen autoencoder's normalised code; see the module docstring."""

    name = "latent"

    def __init__(self, run_dir: str | Path, ae_cfg, cached: bool, cache_dir: str | Path = "", device: str = "cpu"):
        from voxgen.models.autoencoders import build_autoencoder

        self.run_dir = Path(run_dir)
        try:
            self.network: nn.Module = build_autoencoder(ae_cfg.model, ae_cfg.autoencoder)
        except ConfigAttributeError as exc:
            # A config file written by hand may lack a key its family reads (a run's config has them all).
            raise ConfigError(f"space.autoencoder={self.run_dir}: the autoencoder's config lacks {exc.full_key}") from None
        self.network.requires_grad_(False).eval()
        self.latent_channels = int(self.network.latent_channels)
        self.factor = tuple(int(f) for f in self.network.factor)
        # True: the data sets give codes already (a latent cache) and the step does not encode.
        self.cached = cached
        # Cached, the autoencoder is not in the step (and leaves the device once the cache is built).
        self.frozen = () if cached else (self.network,)
        self.cache_dir = Path(cache_dir) if str(cache_dir) else self.run_dir / "latents"
        # Where the data set is encoded (the training device).
        self.device = torch.device(device)
        self.fingerprint: str | None = None
        self.shift: dict[str, float] = {}
        self.scale: dict[str, float] = {}
        self._loaded_on: torch.device | None = None

    # ---- geometry ------------------------------------------------------------------------
    def shape(self, data_shape: Sequence[int]) -> tuple[int, int, int]:
        return tuple(int(s) // f for s, f in zip(data_shape, self.factor, strict=True))

    def check(self, data_shape: Sequence[int]) -> None:
        for axis, size, f in zip("DHW", data_shape, self.factor, strict=True):
            if int(size) % f:
                raise ConfigError(
                    f"data.shape={list(data_shape)}: {axis}={size} is not divisible by {f}, the autoencoder's factor on "
                    f"that axis ({self.run_dir}: autoencoder.factor={list(self.factor)})"
                )

    # ---- weights -------------------------------------------------------------------------
    def _ready(self, device: torch.device) -> nn.Module:
        """The autoencoder with its trained weights on `device` (loaded once; meta: never)."""
        if device.type == "meta" or self._loaded_on == device:
            return self.network
        if self._loaded_on is None:
            self.load_weights()
        self.network.to(device)
        self._loaded_on = device
        return self.network

    def load_weights(self) -> None:
        """Load the EMA autoencoder of the run's newest checkpoint that reads back; CheckpointError
        when it has none, ConfigError when space.autoencoder is a config file (no weights)."""
        if not self.run_dir.is_dir():
            raise ConfigError(
                f"space.autoencoder={self.run_dir} is an autoencoder config, not a trained run: train it "
                f"(voxgen train --config {self.run_dir} run.dir=RUN) and set space.autoencoder=RUN"
            )

        missing = f"space.autoencoder={self.run_dir}: the autoencoder run has no checkpoint yet"
        # assign: a network built on the meta device (config checks) takes the tensors as they are.
        tensors, _ = store.load_weights(self.run_dir, self.network, WEIGHTS_PREFIX, missing, assign=True)
        self.network.requires_grad_(False).eval()
        self.fingerprint = tensors_fingerprint(tensors)
        self._loaded_on = torch.device("cpu")

    # ---- codes ---------------------------------------------------------------------------
    @torch.no_grad()
    def raw_code(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, D, H, W) -> the autoencoder's code (B, C', D', H', W'), not normalised."""
        return self._ready(x.device).encode(x)

    def encode(self, x: torch.Tensor, modality: str) -> torch.Tensor:
        z = self.raw_code(x)
        if z.device.type == "meta":
            return z
        shift, scale = self._stats(modality)
        return (z - shift) / scale

    @torch.no_grad()
    def decode(self, z: torch.Tensor, modality: str) -> torch.Tensor:
        network = self._ready(z.device)
        if z.device.type != "meta":
            shift, scale = self._stats(modality)
            z = z * scale + shift
        return network.decode(z)

    def _stats(self, modality: str) -> tuple[float, float]:
        if modality not in self.scale:
            raise RuntimeError(f"the latent space has no statistics for {modality!r}: fit it or load its state first")
        return self.shift[modality], self.scale[modality]

    # ---- data ----------------------------------------------------------------------------
    def prepare(self, train_set, val_set):
        """Uncached: fit the statistics on the training split, and the step encodes every batch.
        Cached: encode both splits once into the latent cache (or reuse it) and return its data
        sets, whose items are normalised codes; the statistics are the cache's."""
        if not self.cached:
            self.fit(dataset_batches(train_set))
            return train_set, val_set
        if not isinstance(train_set, VolumeDataset):
            # Items that are codes already (the profiler's random batch): nothing to encode or fit.
            return train_set, val_set
        self._ready(self.device)
        sets = {"train": train_set, "val": val_set}
        modalities = train_set.modalities
        cases = [(split, case.id, [case.path(m) for m in modalities]) for split, ds in sets.items() for case in ds.cases]
        key = cache_key(self.fingerprint, data_fingerprint(cases), train_set.shape, modalities)
        cache = LatentCache(self.cache_dir / key)
        items = [(split, case_id) for split, case_id, _ in cases]
        offsets = {"train": 0, "val": len(train_set)}

        def load(i: int) -> dict[str, torch.Tensor]:
            split, _ = items[i]
            item = sets[split][i - offsets[split]]
            return {m: item[m] for m in modalities}

        def encode(volumes: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return {m: self.raw_code(v[None].to(self.device))[0].float().cpu() for m, v in volumes.items()}

        with _progress("encoding the latent cache") as progress:
            cache.build(items, load, encode, progress=progress, warn=_warn)
        self._ready(torch.device("cpu"))  # off the training device: steps read codes
        self.load_state_dict({"shift": {}, "scale": {}} | _cache_state(cache.stats()))
        return cache.dataset("train"), cache.dataset("val")

    # ---- statistics ----------------------------------------------------------------------
    def fit(self, batches: Iterable[Mapping[str, torch.Tensor]]) -> None:
        """Mean and standard deviation of the codes of every modality over `batches` (float64 sums)."""
        sums: dict[str, list[float]] = {}
        for batch in batches:
            for name, x in batch.items():
                if torch.is_tensor(x):
                    z = self.raw_code(x).double()
                    total = sums.setdefault(name, [0.0, 0.0, 0.0])
                    total[0] += z.numel()
                    total[1] += float(z.sum())
                    total[2] += float((z * z).sum())
        self.load_state_dict({"shift": {}, "scale": {}} | stats_state(sums))

    def state_dict(self) -> dict:
        return {"shift": dict(self.shift), "scale": dict(self.scale), "autoencoder": self.fingerprint}

    def load_state_dict(self, state: dict) -> None:
        shift, scale = state.get("shift", {}), state.get("scale", {})
        if set(shift) != set(scale) or not all(_positive(v) for v in scale.values()):
            raise ValueError(f"latent space state has shifts for {sorted(shift)} and scales {scale}")
        self.shift = {k: float(v) for k, v in shift.items()}
        self.scale = {k: float(v) for k, v in scale.items()}
        if state.get("autoencoder"):
            self.fingerprint = state["autoencoder"]


def stats_state(sums: Mapping[str, Sequence[float]]) -> dict:
    """{modality: [count, sum, sum of squares]} -> {"shift": {m: mean}, "scale": {m: std}}; a
    code with no spread (std below 1e-6) keeps scale 1 rather than blow up."""
    shift, scale = {}, {}
    for name, (count, total, squares) in sums.items():
        mean = total / count
        std = math.sqrt(max(squares / count - mean * mean, 0.0))
        shift[name], scale[name] = mean, std if std > 1e-6 else 1.0
    return {"shift": shift, "scale": scale}


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def _cache_state(stats: Mapping[str, Mapping[str, float]]) -> dict:
    """The cache's {modality: {"shift", "scale"}} as this space's state."""
    return {"shift": {m: s["shift"] for m, s in stats.items()}, "scale": {m: s["scale"] for m, s in stats.items()}}


def _warn(message: str) -> None:
    print(message, file=sys.stderr)


@contextlib.contextmanager
def _progress(title: str):
    """A progress bar on stderr driven by `progress(done, total)` calls."""
    columns = TextColumn(f"[bold]{title}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(title, total=None)

        def progress(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield progress


def build_latent_space(cfg) -> LatentSpace:
    """The factory of `space=latent` (voxgen.diffusion.spaces.SPACES)."""
    from voxgen.diffusion.modes import build_mode

    ae_cfg = autoencoder_config(cfg.space.autoencoder, build_mode(cfg).modalities)
    wanted = cfg.training.device
    device = "cuda" if wanted != "cpu" and torch.cuda.is_available() else "cpu"
    return LatentSpace(cfg.space.autoencoder, ae_cfg, cfg.space.cache, cfg.space.cache_dir, device)
