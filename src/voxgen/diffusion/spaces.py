"""Spaces the model works in: `pixel` (the identity), `s2d`, `wavelet` and `latent`.

Every space encodes each data modality on its own, (B, 1, D, H, W) -> (B, C', D', H', W'), and
decodes it back; a batch of several modalities is encoded modality by modality
(`encode_batch`) and the network sees their codes concatenated along C. So a mode with K
conditioning modalities gives K * C' condition channels in any space.

A space may hold statistics of the training split (per-sub-band shift and scale of the
wavelet space, the latent scale factor): `fit` estimates them once at the start of a run,
`state_dict` / `load_state_dict` carry them in the run's checkpoints, so sampling decodes
with the numbers training encoded with.

`s2d` and `wavelet` both trade resolution for channels: (B, 1, D, H, W) -> (B, 8, D/2, H/2, W/2).
`s2d` rearranges each (2, 2, 2) block of voxels into 8 channels (lossless, no statistics).
`wavelet` takes the one-level orthonormal Haar transform of `voxgen.models.wdm` and normalises
each sub-band to mean 0 and std 1 over the training split. The seeds trained on raw Haar
coefficients: their sub-bands differ by orders of magnitude (the LLL band carries the block
means, HHH only fine texture), and every such run collapsed to predicting the mean (MSE ~1.0).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Protocol

import torch
from torch.utils.data import Dataset

from voxgen.data.batches import collate
from voxgen.diffusion.shapes import append_dims
from voxgen.errors import ConfigError
from voxgen.models.wdm import SUBBANDS, haar_dwt3d, haar_idwt3d


class Space(Protocol):
    """What the step, the samplers and the planner need of a space."""

    name: str
    # C': channels of one encoded modality.
    latent_channels: int

    def shape(self, data_shape: Sequence[int]) -> tuple[int, int, int]:
        """[D', H', W'] in this space of a data volume [D, H, W]."""

    def check(self, data_shape: Sequence[int]) -> None:
        """ConfigError (one line naming the axis) when `data_shape` cannot be encoded."""

    def encode(self, x: torch.Tensor, modality: str) -> torch.Tensor:
        """(B, 1, D, H, W) of `modality` -> (B, C', D', H', W')."""

    def decode(self, z: torch.Tensor, modality: str) -> torch.Tensor:
        """(B, C', D', H', W') -> (B, 1, D, H, W) of `modality`."""

    def fit(self, batches: Iterable[Mapping[str, torch.Tensor]]) -> None:
        """Estimate the space's statistics from training batches {modality: (B, 1, D, H, W)}."""

    def state_dict(self) -> dict:
        """The fitted statistics as JSON-able data ({} for a space without any)."""

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` returned."""

    # True when `prepare` hands back data sets whose items are codes already (a latent cache):
    # the step then does not encode (`voxgen.diffusion.parts.Parts.encode`).
    cached: bool
    # Frozen networks the step runs on the training device (an uncached latent space's
    # autoencoder): their weights take device memory too.
    frozen: tuple[torch.nn.Module, ...]

    def prepare(self, train_set: Dataset, val_set: Dataset) -> tuple[Dataset, Dataset]:
        """At the start of training: fit the statistics on the training split and return the
        data sets the steps read (these, or their encoded form)."""


class FitsOnTrainingSplit:
    """What spaces whose data sets stay volumes share: `prepare` fits on the training split. The
    defaults are those of a space without statistics (pixel, s2d)."""

    cached = False
    frozen: tuple[torch.nn.Module, ...] = ()

    def fit(self, batches: Iterable[Mapping[str, torch.Tensor]]) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def prepare(self, train_set: Dataset, val_set: Dataset) -> tuple[Dataset, Dataset]:
        self.fit(dataset_batches(train_set))
        return train_set, val_set


def dataset_batches(dataset: Dataset, size: int = 4) -> Iterator[dict]:
    """The items of `dataset` in order, as batches {modality: (B, 1, D, H, W), "case": [ids]} of up to `size`."""
    for start in range(0, len(dataset), size):
        yield collate([dataset[i] for i in range(start, min(start + size, len(dataset)))])


class PixelSpace(FitsOnTrainingSplit):
    name = "pixel"
    latent_channels = 1

    def shape(self, data_shape: Sequence[int]) -> tuple[int, int, int]:
        return tuple(int(s) for s in data_shape)

    def check(self, data_shape: Sequence[int]) -> None:
        pass

    def encode(self, x: torch.Tensor, modality: str) -> torch.Tensor:
        return x

    def decode(self, z: torch.Tensor, modality: str) -> torch.Tensor:
        return z


def _check_halvable(data_shape: Sequence[int], space: str) -> None:
    """ConfigError naming the first axis of [D, H, W] that 2 does not divide."""
    sizes = [int(s) for s in data_shape]
    for axis, size in zip("DHW", sizes):
        if size % 2:
            raise ConfigError(f"data.shape={sizes}: {axis}={size} is not divisible by 2 (space={space} halves every axis)")


def _halved(data_shape: Sequence[int], space: str) -> tuple[int, int, int]:
    """[D/2, H/2, W/2] of [D, H, W]; ConfigError for an odd size, which has no halved grid."""
    _check_halvable(data_shape, space)
    d, h, w = (int(s) // 2 for s in data_shape)
    return d, h, w


def _check_volume(x: torch.Tensor, modality: str) -> None:
    """ValueError unless `x` is (B, 1, D, H, W) with even D, H, W: one modality, ready to halve."""
    if x.ndim != 5 or x.shape[1] != 1:
        raise ValueError(f"{modality}: expected one modality (B, 1, D, H, W), got {tuple(x.shape)}")
    for axis, size in zip("DHW", x.shape[2:]):
        if size % 2:
            raise ValueError(f"{modality}: {axis}={size} of {tuple(x.shape)} is not divisible by 2")


def _check_code(z: torch.Tensor, modality: str, channels: int) -> None:
    """ValueError unless `z` is (B, `channels`, D', H', W')."""
    if z.ndim != 5 or z.shape[1] != channels:
        raise ValueError(f"{modality}: expected a code (B, {channels}, D', H', W'), got {tuple(z.shape)}")


def pixel_unshuffle3d(x: torch.Tensor) -> torch.Tensor:
    """3D space-to-depth by 2: (B, C, D, H, W) -> (B, 8 C, D/2, H/2, W/2), a pure rearrangement.

    Channel order: z[b, 8 c + 4 i + 2 j + l, d, h, w] = x[b, c, 2 d + i, 2 h + j, 2 w + l], with
    i, j, l in {0, 1} the offsets inside the (2, 2, 2) block along D, H, W. This is PyTorch's 2D
    `pixel_unshuffle` order extended to three axes, and the sub-band order of `haar_dwt3d`
    (channel 4 i + 2 j + l holds band (i, j, l)), so s2d and wavelet codes line up channel by
    channel.
    """
    b, c, d, h, w = x.shape
    y = x.reshape(b, c, d // 2, 2, h // 2, 2, w // 2, 2)
    y = y.permute(0, 1, 3, 5, 7, 2, 4, 6)  # (B, C, 2, 2, 2, D/2, H/2, W/2)
    return y.reshape(b, c * 8, d // 2, h // 2, w // 2)


def pixel_shuffle3d(z: torch.Tensor) -> torch.Tensor:
    """Inverse of `pixel_unshuffle3d`: (B, 8 C, d, h, w) -> (B, C, 2 d, 2 h, 2 w)."""
    b, c8, d, h, w = z.shape
    y = z.reshape(b, c8 // 8, 2, 2, 2, d, h, w)
    y = y.permute(0, 1, 5, 2, 6, 3, 7, 4)  # (B, C, d, 2, h, 2, w, 2)
    return y.reshape(b, c8 // 8, 2 * d, 2 * h, 2 * w)


class HalvingSpace(FitsOnTrainingSplit):
    """What s2d and wavelet share: 8 channels per modality on a grid of half the size."""

    name: str
    latent_channels = 8

    def shape(self, data_shape: Sequence[int]) -> tuple[int, int, int]:
        return _halved(data_shape, self.name)

    def check(self, data_shape: Sequence[int]) -> None:
        _check_halvable(data_shape, self.name)


class S2DSpace(HalvingSpace):
    """`space=s2d`: every (2, 2, 2) block of voxels becomes 8 channels at half the resolution (lossless)."""

    name = "s2d"

    def encode(self, x: torch.Tensor, modality: str) -> torch.Tensor:
        """(B, 1, D, H, W) -> (B, 8, D/2, H/2, W/2) in the order of `pixel_unshuffle3d`."""
        _check_volume(x, modality)
        return pixel_unshuffle3d(x)

    def decode(self, z: torch.Tensor, modality: str) -> torch.Tensor:
        """(B, 8, D', H', W') -> (B, 1, 2 D', 2 H', 2 W'), exactly the volume `encode` was given."""
        _check_code(z, modality, self.latent_channels)
        return pixel_shuffle3d(z)


# Floor of a sub-band's scale, in data units (volumes span [-1, 1]). A sub-band that is constant
# over the training split (every band of an all-background mask) has std 0; it is encoded as
# (z - shift) / 1e-4, which is 0 up to the float32 rounding of z (|z| <= 2^1.5, so the code stays
# below ~3e-3), and the network's output there is decoded times 1e-4, i.e. ignored. The bands of
# real images and masks spread far more than 1e-4.
SCALE_EPS = 1e-4


class _BandMoments:
    """Streaming mean and variance of the 8 sub-bands (Chan et al.'s pairwise update, float64).

    Sums of squares lose the variance of a band whose mean is far larger than its spread (the
    LLL band of an image); merging per-batch means and centred sums does not.
    """

    def __init__(self):
        self.count = 0
        self.mean = torch.zeros(SUBBANDS, dtype=torch.float64)
        self.m2 = torch.zeros(SUBBANDS, dtype=torch.float64)  # sum of squared deviations

    def update(self, bands: torch.Tensor) -> None:
        """Add the voxels of `bands` (B, 8, d, h, w), float64."""
        values = bands.transpose(0, 1).reshape(SUBBANDS, -1).cpu()  # (8, B d h w)
        n = values.shape[1]
        mean = values.mean(dim=1)
        m2 = ((values - mean[:, None]) ** 2).sum(dim=1)
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta**2 * (self.count * n / total)
        self.count = total

    def shift_scale(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, population std floored at SCALE_EPS), each (8,) float64."""
        return self.mean, (self.m2 / self.count).sqrt().clamp_min(SCALE_EPS)


class WaveletSpace(HalvingSpace):
    """`space=wavelet`: one-level orthonormal 3D Haar, then (band - shift) / scale per sub-band.

    Sub-band k of the code is band k of `haar_dwt3d` (k = 4 i + 2 j + l, i, j, l the D, H, W
    bands, 0 low, 1 high; k = 0 is LLL). shift and scale are the mean and std of each sub-band
    of each modality over the training split (`fit`), so every channel the network predicts
    has mean 0 and std 1 there.
    """

    name = "wavelet"

    def __init__(self):
        # {modality: (shift (8,), scale (8,))}, float64 on the CPU; None until fit or load.
        self._stats: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None

    def encode(self, x: torch.Tensor, modality: str) -> torch.Tensor:
        """(B, 1, D, H, W) -> (B, 8, D/2, H/2, W/2): normalised Haar sub-bands, in x's dtype."""
        _check_volume(x, modality)
        shift, scale = self._normalisation(modality, x)
        return (haar_dwt3d(x) - shift) / scale

    def decode(self, z: torch.Tensor, modality: str) -> torch.Tensor:
        """(B, 8, D', H', W') -> (B, 1, 2 D', 2 H', 2 W'): the inverse of `encode`."""
        _check_code(z, modality, self.latent_channels)
        shift, scale = self._normalisation(modality, z)
        return haar_idwt3d(z * scale + shift)

    def _normalisation(self, modality: str, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """shift and scale of `modality` as (8, 1, 1, 1) in the dtype and on the device of `like`."""
        if self._stats is None and like.device.type == "meta":
            # A step traced on the meta device (the memory planner) costs the same with any numbers.
            return torch.zeros(SUBBANDS, 1, 1, 1, device=like.device, dtype=like.dtype), torch.ones(
                SUBBANDS, 1, 1, 1, device=like.device, dtype=like.dtype
            )
        if self._stats is None:
            raise RuntimeError("the wavelet space is used before fit() or load_state_dict() gave it its sub-band statistics")
        if modality not in self._stats:
            raise KeyError(f"the wavelet space has no statistics of modality {modality!r}; fitted: {sorted(self._stats)}")
        return tuple(append_dims(v.to(like.device, like.dtype), 4) for v in self._stats[modality])

    def fit(self, batches: Iterable[Mapping[str, torch.Tensor]]) -> None:
        """shift and scale per modality and sub-band: mean and population std over every voxel of
        `batches` ({modality: (B, 1, D, H, W)}; other entries skipped), streamed in float64."""
        # Per sub-band, not one number per modality: the Haar bands of an image differ by
        # orders of magnitude (LLL carries the block means, HHH the finest texture), so one
        # global scale leaves HHH near 0, and an MSE loss then ignores the detail bands.
        moments: dict[str, _BandMoments] = {}
        for batch in batches:
            for modality, x in batch.items():
                if torch.is_tensor(x) and x.ndim == 5:  # volumes, not a size-bin vector
                    _check_volume(x, modality)
                    moments.setdefault(modality, _BandMoments()).update(haar_dwt3d(x.detach().to(torch.float64)))
        if not moments:
            raise ValueError("the wavelet space was fitted on batches without any volume")
        stats = {modality: m.shift_scale() for modality, m in moments.items()}
        for modality, (shift, scale) in stats.items():
            if not (shift.isfinite().all() and scale.isfinite().all()):
                raise ValueError(f"the training volumes of {modality!r} hold non-finite values: no sub-band statistics")
        self._stats = stats

    def state_dict(self) -> dict:
        """{modality: {"shift": [8 floats], "scale": [8 floats]}}, JSON-able, exact for float64."""
        if self._stats is None:
            raise RuntimeError("the wavelet space has no state before fit() or load_state_dict()")
        return {modality: {"shift": shift.tolist(), "scale": scale.tolist()} for modality, (shift, scale) in self._stats.items()}

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` returned; ValueError for anything else."""
        if not isinstance(state, Mapping) or not state:
            raise ValueError(f"wavelet space state must map modalities to sub-band statistics, got {state!r:.200}")
        self._stats = {str(modality): _parse_stats(modality, entry) for modality, entry in state.items()}


def _parse_stats(modality: str, entry) -> tuple[torch.Tensor, torch.Tensor]:
    """(shift, scale) float64 (8,) of one modality's state entry; ValueError when malformed."""
    if not isinstance(entry, Mapping) or set(entry) != {"shift", "scale"}:
        raise ValueError(f"wavelet space state of {modality!r} must be {{'shift': [8], 'scale': [8]}}, got {entry!r:.200}")
    values = []
    for key in ("shift", "scale"):
        numbers = entry[key]
        valid = isinstance(numbers, (list, tuple)) and len(numbers) == SUBBANDS
        valid = valid and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in numbers)
        if not valid:
            raise ValueError(
                f"wavelet space state of {modality!r}: {key} must be {SUBBANDS} finite numbers, got {numbers!r:.100}"
            )
        values.append(torch.tensor(numbers, dtype=torch.float64))
    if (values[1] <= 0).any():
        raise ValueError(f"wavelet space state of {modality!r}: every scale must be positive, got {entry['scale']}")
    return values[0], values[1]


def encode_batch(space: Space, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{modality: (B, 1, D, H, W)} -> {modality: (B, C', D', H', W')}; entries that are not volumes
    (the case ids, a size-bin vector (B, 7)) pass as they are."""
    return {name: space.encode(x, name) if torch.is_tensor(x) and x.ndim == 5 else x for name, x in batch.items()}


def encode_channels(space: Space, x: torch.Tensor, modalities: Sequence[str]) -> torch.Tensor:
    """(B, K, D, H, W) volumes of K `modalities` in order -> (B, K C', D', H', W')."""
    if x.shape[1] != len(modalities):
        raise ValueError(f"{x.shape[1]} channels are not the {len(modalities)} modalities {list(modalities)}")
    return torch.cat([space.encode(x[:, i : i + 1], name) for i, name in enumerate(modalities)], dim=1)


def decode_channels(space: Space, z: torch.Tensor, modalities: Sequence[str]) -> torch.Tensor:
    """(B, K C', D', H', W') codes of K `modalities` in order -> (B, K, D, H, W)."""
    codes = z.split(space.latent_channels, dim=1)
    if len(codes) != len(modalities):
        raise ValueError(f"{z.shape[1]} channels are not {len(modalities)} modalities of {space.latent_channels}")
    return torch.cat([space.decode(c, name) for c, name in zip(codes, modalities, strict=True)], dim=1)


# name -> factory(cfg); the config's choices of `space` are these keys.
SPACES = {
    "pixel": lambda cfg: PixelSpace(),
    "s2d": lambda cfg: S2DSpace(),
    "wavelet": lambda cfg: WaveletSpace(),
    "latent": lambda cfg: _latent_space(cfg),
}


def _latent_space(cfg) -> Space:
    # Imported on use: voxgen.diffusion.latent builds on this module.
    from voxgen.diffusion.latent import build_latent_space

    return build_latent_space(cfg)


def build_space(cfg) -> Space:
    return SPACES[cfg.space.name](cfg)
