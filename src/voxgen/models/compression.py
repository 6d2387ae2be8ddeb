"""Rules shared by the compression models of `task=autoencoder` (`autoencoders.py`: KL autoencoder and VQ-VAE;
`dcae.py`: DC-AE): the per-axis factor, the strides of the down-sampling stages, the data shape the factor
must divide and `model.num_res_blocks` per level. Each check raises a one-line ConfigError naming the keys.

Every voxgen autoencoder has one interface:

    latent_channels: int
    factor: (fD, fH, fW)                    down-sampling per axis, powers of two
    encode(x) -> z                          (B, 1, D, H, W) -> (B, latent_channels, D/fD, H/fH, W/fW), deterministic
    decode(z) -> x                          -> (B, 1, D, H, W)
    forward(x, generator) -> (x_hat, reg)   a training pass: reconstruction and the regulariser (a float32 scalar;
                                            randomness, if any, from `generator`)

Per-axis factors. `model.channels` has one entry per level and every family has len(channels) - 1
down-sampling stages; stage i halves an axis while that axis still needs halving, so factor [1, 8, 8] with
four levels keeps D and halves H and W at every stage. The largest factor must be 2 ** (len(channels) - 1):
a stage that halved no axis would be a level without purpose.
"""

from __future__ import annotations

from collections.abc import Sequence

from voxgen.errors import ConfigError

Triple = tuple[int, int, int]  # per axis (D, H, W): a factor or the strides of one stage


def _is_count(value) -> bool:
    """A whole number >= 0 (an int, not a bool)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _log2(value) -> int | None:
    """log2 of a positive power of two (an int, not a bool), else None."""
    if not _is_count(value) or value < 1 or value & (value - 1):
        return None
    return value.bit_length() - 1


def _check_powers_of_two(factor) -> Triple:
    """`autoencoder.factor` as a (fD, fH, fW) tuple, or ConfigError unless it is three powers of two."""
    values = list(factor) if isinstance(factor, Sequence) and not isinstance(factor, str) else [factor]
    if len(values) != 3 or any(_log2(f) is None for f in values):
        raise ConfigError(
            f"autoencoder.factor={values} must be three powers of two >= 1, one per axis [fD, fH, fW] "
            "(e.g. [4, 4, 4] or [1, 8, 8])"
        )
    return tuple(values)


def check_factor(factor: Sequence[int], levels: int, family: str) -> Triple:
    """`autoencoder.factor` as a (fD, fH, fW) tuple, or ConfigError unless it is three powers of two whose largest
    is 2 ** (levels - 1), `levels` being len(model.channels) of model.name=`family`."""
    factor = _check_powers_of_two(factor)
    if max(factor) != 2 ** (levels - 1):
        needed = _log2(max(factor)) + 1
        raise ConfigError(
            f"autoencoder.factor={list(factor)} needs {needed} levels in model.channels for model.name={family} "
            f"(the largest factor is 2 ** (levels - 1)), but model.channels has {levels}: give model.channels "
            f"{needed} entries or use a largest factor of {2 ** (levels - 1)}"
        )
    return factor


def stage_strides(factor: Sequence[int], stages: int) -> list[Triple]:
    """Strides (sD, sH, sW) of each down-sampling stage, encoder order: stage i halves an axis while it still
    needs halving (i < log2 of its factor). [1, 4, 4] over 2 stages -> [(1, 2, 2), (1, 2, 2)].

    The early, high-resolution stages shrink every axis they can, which keeps the widest activations small;
    an axis with factor 1 is never touched. `factor` must have passed `check_factor`."""
    logs = [_log2(f) for f in factor]
    return [tuple(2 if i < n else 1 for n in logs) for i in range(stages)]


def check_autoencoder_shape(shape: Sequence[int], factor: Sequence[int]) -> None:
    """ConfigError naming the axis unless every axis of data.shape [D, H, W] divides by its factor."""
    factor = _check_powers_of_two(factor)
    if len(shape) != 3:
        raise ConfigError(f"data.shape={list(shape)} must be three sizes [D, H, W]")
    for axis, size, f in zip("DHW", shape, factor):
        if size % f:
            lower, upper = size // f * f, (size // f + 1) * f
            examples = f"{lower} or {upper}" if lower else f"{upper}"
            raise ConfigError(
                f"data.shape {axis}={size} is not divisible by autoencoder.factor {axis}={f}: "
                f"use a multiple of {f} (e.g. {examples})"
            )


def res_blocks_per_level(num_res_blocks, levels: int) -> list[int]:
    """`model.num_res_blocks` (one count, or a list with one per level; counts >= 0) as `levels` counts,
    or ConfigError."""
    per_level = isinstance(num_res_blocks, Sequence) and not isinstance(num_res_blocks, str)
    counts = list(num_res_blocks) if per_level else [num_res_blocks] * levels
    if len(counts) != levels or not all(_is_count(n) for n in counts):
        raise ConfigError(
            f"model.num_res_blocks={counts if per_level else num_res_blocks} needs one count per level of "
            f"model.channels ({levels}), or one count for all, each a whole number >= 0"
        )
    return counts
