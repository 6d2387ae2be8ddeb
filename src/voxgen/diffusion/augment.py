"""Training-time augmentation of diffusion models: SDA and ScoreAug (`augment.*`).

Both move voxels of the model-space tensors (what the network sees: pixel volumes, or codes in a
latent, s2d or wavelet space) with shape-keeping transforms, drawn per sample from the run's
training generator, and only in training mode (`Parts.model.training`): validation, sampling and
evaluation never see them.

- **SDA**, shifted data augmentation (Nakamura, Sohn, Korman, Hong, "Regularization for
  Unconditional Image Diffusion Models via Shifted Data Augmentation", IEEE Access 13, 2025):
  next to the ordinary path of each sample, an auxiliary path on transformed clean data at a
  shifted noise level. Here: each sample gets, with `probability`, an extra copy whose x0 and
  volume conditions are transformed together, noised with fresh noise at time
  `t + noise_shift` (capped at the noisiest time); the strategy's target follows from the
  transformed x0. The copies join the batch, so the loss is the mean over both paths.
- **ScoreAug**, score augmentation (Hou et al., "Score Augmentation for Diffusion Models",
  arXiv:2508.07926, 2025): the transform acts on the noisy input x_t, and the network must
  predict the transformed target; with `omega_conditioning` it is told which transform it sees
  (a code of the transform's parameters next to its time; the identity's code, all zeros, when
  sampling and validating).

A transform keeps the grid's shape, since volumes are rarely cubes: flips of one axis,
180-degree rotations in any plane, 90-degree rotations only in a plane whose two sizes are
equal, integer shifts with zero fill, and a zeroed box (cutout). Each augmented sample gets one
of the enabled kinds. Flips, permutations, zero-filled shifts and cutouts are linear maps of the
voxels, so for ScoreAug transforming x_t and the target is the same as noising the transformed
x0 with the transformed noise.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from voxgen.draws import Draws
from voxgen.errors import ConfigError

METHODS = ("none", "sda", "scoreaug")
KINDS = ("rotate", "flip", "translate", "cutout")
# What `null` stands for in augment.rotate / flip / translate / cutout, per method: the seeds'
# exp4 (SDA: rotations and flips) and exp5_1 (ScoreAug: rotations, translations, cutout).
DEFAULTS = {
    "sda": {"rotate": True, "flip": True, "translate": 0.0, "cutout": 0.0},
    "scoreaug": {"rotate": True, "flip": False, "translate": 0.125, "cutout": 0.5},
}
# The code of a transform (`Transform.omega`): the signed permutation of the axes minus the
# identity (9), the shift per axis (3), the cutout box's centre and edges per axis (3 + 3).
OMEGA_SIZE = 18
# Uniforms drawn per sample and step, whatever is drawn from them: the generator advances by the
# same amount every step.
UNIFORMS = 12
PLANES = ((0, 1), (0, 2), (1, 2))


@dataclass(frozen=True)
class Transform:
    """A shape-keeping map of a grid (..., D, H, W): flip the axes in `flips`, then transpose the
    two axes of `swap` (equal sizes), shift by `shift` voxels with zero fill, and zero the box
    `box` = (start, edge) per axis. The default is the identity."""

    flips: tuple[bool, bool, bool] = (False, False, False)
    swap: tuple[int, int] | None = None
    shift: tuple[int, int, int] = (0, 0, 0)
    box: tuple[tuple[int, int, int], tuple[int, int, int]] | None = None

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., D, H, W) -> the same shape, moved (a new tensor unless the identity)."""
        first = x.ndim - 3
        dims = [first + a for a in range(3) if self.flips[a]]
        if dims:
            x = x.flip(dims)
        if self.swap is not None:
            x = x.transpose(first + self.swap[0], first + self.swap[1])
        if any(self.shift):
            x = _shifted(x, self.shift)
        if self.box is not None:
            start, edge = self.box
            x = x.clone()
            x[(..., *(slice(s, s + e) for s, e in zip(start, edge)))] = 0
        return x

    def omega(self, shape: tuple[int, int, int]) -> list[float]:
        """The transform's code (`OMEGA_SIZE` numbers), all zeros for the identity: the signed
        permutation M that maps centred input coordinates to output ones, minus the identity
        (row-major); shifts as fractions of each axis; the cutout box's centre (offset from the
        grid's centre) and edges as fractions of each axis."""
        m = [[(-1.0 if self.flips[j] else 1.0) if i == j else 0.0 for j in range(3)] for i in range(3)]  # F
        if self.swap is not None:
            a, b = self.swap
            m[a], m[b] = m[b], m[a]  # S F
        code = [m[i][j] - float(i == j) for i in range(3) for j in range(3)]
        code += [s / n for s, n in zip(self.shift, shape)]
        if self.box is None:
            return code + [0.0] * 6
        start, edge = self.box
        code += [(s + e / 2) / n - 0.5 for s, e, n in zip(start, edge, shape)]
        return code + [e / n for e, n in zip(edge, shape)]


IDENTITY = Transform()


def _shifted(x: torch.Tensor, shift: tuple[int, int, int]) -> torch.Tensor:
    """x (..., D, H, W) moved by `shift` voxels per axis; what enters from outside is zero."""
    out = torch.zeros_like(x)
    dst, src = [], []
    for s, n in zip(shift, x.shape[-3:]):
        dst.append(slice(max(s, 0), n + min(s, 0)))
        src.append(slice(max(-s, 0), n - max(s, 0)))
    out[(..., *dst)] = x[(..., *src)]
    return out


def rotations(shape: tuple[int, int, int]) -> list[Transform]:
    """The shape-keeping rotations of a grid: 180 degrees in each plane, and 90 and 270 degrees
    in each plane whose two sizes are equal (a flip of one axis, then a transpose)."""
    found = [Transform(flips=tuple(a in plane for a in range(3))) for plane in PLANES]
    for a, b in PLANES:
        if shape[a] == shape[b]:
            found += [Transform(flips=tuple(i == a for i in range(3)), swap=(a, b))]
            found += [Transform(flips=tuple(i == b for i in range(3)), swap=(a, b))]
    return found


def _pick(u: float, n: int) -> int:
    """An index in [0, n) from a uniform u in [0, 1)."""
    return min(int(u * n), n - 1)


@dataclass(frozen=True)
class Augmentation:
    """`augment.*` resolved: the method, the enabled kinds and their settings."""

    method: str  # sda | scoreaug
    probability: float
    noise_shift: float
    kinds: tuple[str, ...]
    translate: float
    cutout: float
    omega_conditioning: bool

    @property
    def omega_size(self) -> int:
        """Length of the transform code the network takes next to its time (0: none)."""
        return OMEGA_SIZE if self.method == "scoreaug" and self.omega_conditioning else 0

    def active(self, training: bool) -> bool:
        """Whether a step augments (and draws from the generator): training, probability > 0."""
        return training and self.probability > 0

    def draw(self, shape: tuple[int, int, int], draws: Draws) -> list[Transform | None]:
        """One transform per sample, or None (not augmented) with 1 - probability.

        `UNIFORMS` uniforms per sample come from its generator in `draws` and are read on the
        host, one small copy per step. On the meta device (the memory planner) nothing is drawn:
        every sample takes the first option of the first kind, so a plan is repeatable and counts
        the augmented batch.
        """
        if draws.device.type == "meta":
            rows = [[0.0] * UNIFORMS for _ in range(len(draws))]
        else:
            rows = draws.uniform((UNIFORMS,), torch.float64).tolist()
        return [self._transform(u, shape) if u[0] < self.probability else None for u in rows]

    def _transform(self, u: list[float], shape: tuple[int, int, int]) -> Transform:
        kind = self.kinds[_pick(u[1], len(self.kinds))]
        if kind == "rotate":
            options = rotations(shape)
            return options[_pick(u[2], len(options))]
        if kind == "flip":
            axis = _pick(u[2], 3)
            return Transform(flips=tuple(a == axis for a in range(3)))
        if kind == "translate":
            most = [math.floor(self.translate * n) for n in shape]
            return Transform(shift=tuple(_pick(u[3 + a], 2 * m + 1) - m for a, m in enumerate(most)))
        edge = tuple(1 + _pick(u[6 + a], max(1, round(self.cutout * n))) for a, n in enumerate(shape))
        start = tuple(_pick(u[9 + a], n - e + 1) for a, (n, e) in enumerate(zip(shape, edge)))
        return Transform(box=(start, edge))


def build_augmentation(section) -> Augmentation | None:
    """The `augment` section -> an Augmentation, or None for `augment=none`; `null` transform
    keys take the method's defaults (`DEFAULTS`). ConfigError (one line) for an unknown method or
    one without any transform."""
    name = str(section.name)
    if name not in METHODS:
        raise ConfigError(f"augment={name!r} is not one of {', '.join(METHODS)}")
    if name == "none":
        return None
    chosen = {k: DEFAULTS[name][k] if section[k] is None else section[k] for k in KINDS}
    kinds = tuple(k for k in KINDS if chosen[k])
    if not kinds:
        raise ConfigError(
            f"augment={name} has no transform to draw: enable augment.rotate or augment.flip, or give "
            "augment.translate or augment.cutout a fraction above 0"
        )
    return Augmentation(
        name,
        float(section.probability),
        float(section.noise_shift),
        kinds,
        float(chosen["translate"]),
        float(chosen["cutout"]),
        bool(section.omega_conditioning),
    )


def transform_batch(x: torch.Tensor, transforms: list[Transform | None]) -> torch.Tensor:
    """x (B, C, D, H, W) with sample i moved by transforms[i] (None: kept)."""
    return torch.stack([x[i] if t is None else t.apply(x[i]) for i, t in enumerate(transforms)])


def _moves_with_volume(cond: torch.Tensor | None, x: torch.Tensor) -> bool:
    """Volume conditions (a mask) move with the volume; a size-bin vector (B, 7) does not."""
    return cond is not None and cond.ndim == x.ndim


def sda_batch(
    aug: Augmentation,
    z0: torch.Tensor,
    noise: torch.Tensor,
    t: torch.Tensor,
    cond: torch.Tensor | None,
    draws: Draws,
    noisier: Callable[[torch.Tensor], torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(x0, noise, t, cond) with SDA's auxiliary copies appended along the batch: (B + K, ...).

    For each of the K samples drawn (probability `aug.probability`), x0 (B, C, D, H, W) and its
    volume conditions are moved by one transform together; the copy gets fresh noise (drawn after
    the transforms) and the time `noisier(t)` (the strategy's `noisier` by `aug.noise_shift`). A
    size-bin vector is copied unchanged.
    """
    transforms = aug.draw(tuple(z0.shape[-3:]), draws)
    picked = [i for i, tr in enumerate(transforms) if tr is not None]
    if not picked:
        return z0, noise, t, cond
    chosen = [transforms[i] for i in picked]
    extra_x0 = transform_batch(z0[picked], chosen)  # (K, C, D, H, W)
    extra_noise = draws.normal(extra_x0.shape[1:], z0.dtype, rows=picked)
    extra_t = noisier(t[picked])
    if cond is not None:
        extra_cond = transform_batch(cond[picked], chosen) if _moves_with_volume(cond, z0) else cond[picked]
        cond = torch.cat([cond, extra_cond])
    return torch.cat([z0, extra_x0]), torch.cat([noise, extra_noise]), torch.cat([t, extra_t]), cond


def scoreaug_batch(
    aug: Augmentation,
    x_t: torch.Tensor,
    target: torch.Tensor,
    cond: torch.Tensor | None,
    draws: Draws,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(x_t, target, cond, omega): x_t and the target (B, C, D, H, W) and the volume conditions of
    each sample moved by the same transform (drawn with `aug.probability`, else kept), and the
    transforms' codes omega (B, OMEGA_SIZE) in x_t's dtype (zeros for kept samples)."""
    shape = tuple(x_t.shape[-3:])
    transforms = aug.draw(shape, draws)
    codes = [(IDENTITY if tr is None else tr).omega(shape) for tr in transforms]
    omega = torch.tensor(codes, dtype=torch.float32).to(device=x_t.device, dtype=x_t.dtype)  # (B, 18)
    if all(tr is None for tr in transforms):
        return x_t, target, cond, omega
    if _moves_with_volume(cond, x_t):
        cond = transform_batch(cond, transforms)
    return transform_batch(x_t, transforms), transform_batch(target, transforms), cond, omega
