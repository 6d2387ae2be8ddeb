"""The parts one training step and one sampler need, built once from a config.

`Parts` holds the network, the strategy, the mode, the space, the network's geometry and the
precision policy. The geometry (`NetworkShape`: channels in and out, the grid the network sees) is
worked out here and nowhere else; the trainer, the samplers, the planner, the profiler and
config validation all read it from `Parts.network`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from voxgen.data.tumour_bins import NUM_BINS, WithSizeBins
from voxgen.diffusion import controlnet
from voxgen.diffusion.augment import Augmentation, build_augmentation, scoreaug_batch, sda_batch
from voxgen.diffusion.modes import SIZE_BINS, Mode, build_mode, mask_modality
from voxgen.diffusion.spaces import Space, build_space, decode_channels, encode_batch
from voxgen.diffusion.strategies import Strategy, build_strategy
from voxgen.diffusion.tumour_weight import check_tumour_weight, tumour_weight_map
from voxgen.draws import Draws
from voxgen.errors import ConfigError
from voxgen.models.registry import build_model
from voxgen.precision import Autocast, autocast_policy


@dataclass(frozen=True)
class NetworkShape:
    """What the network sees: (B, in_channels, *shape) -> (B, out_channels, *shape).

    `data_in` and `data_out` are the channels the mode gives in the space; `in_channels` and
    `out_channels` equal them unless `model.in_channels` / `model.out_channels` override them
    (a network planned for other channel counts than the mode gives in the space).
    """

    in_channels: int
    out_channels: int
    shape: tuple[int, int, int]  # [D', H', W'] in the model's space
    data_in: int
    data_out: int
    data_shape: tuple[int, int, int] | None = None  # [D, H, W] of the data, before the space
    # Length of the condition vector the network takes next to its time (0: none).
    vector_size: int = 0

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """(C, D', H', W') of one generated volume in the model's space, what a sampler starts from."""
        return (self.out_channels, *self.shape)


def network_of(cfg, mode: Mode, space: Space) -> NetworkShape:
    """The network geometry of `cfg`: derived from mode and space, overridden by the config's channels."""
    data_in, data_out = mode.channels(space)
    in_ch = cfg.model.in_channels if cfg.model.in_channels is not None else data_in
    out_ch = cfg.model.out_channels if cfg.model.out_channels is not None else data_out
    data_shape = tuple(int(s) for s in cfg.data.shape)
    return NetworkShape(in_ch, out_ch, space.shape(data_shape), data_in, data_out, data_shape, mode.vector_size)


@dataclass
class Parts:
    """The diffusion task (`voxgen.tasks.Task`): a network trained by a strategy on a mode's
    modalities in a space."""

    # The loss calls the whole model (`model(x, t, ...)`): DDP and FSDP can wrap it.
    parallel: ClassVar[bool] = True
    model: nn.Module
    strategy: Strategy
    mode: Mode
    space: Space
    network: NetworkShape
    # device -> context manager entered around every forward (voxgen.precision).
    autocast: Autocast
    # A loaded batch {modality: (B, 1, D, H, W)} -> the same in the model's space. The space's
    # encoder, or the identity when the batches come encoded already (a latent cache).
    encode: Callable[[dict], dict] = field(default=None)
    # The run's `sample` section: how previews are sampled (None: the strategy's default sampler).
    sample: object = None
    # `training.tumour_weight`: tumour voxels of the batch's mask weigh more in the loss
    # (voxgen.diffusion.tumour_weight); 0 = off, the plain loss.
    tumour_weight: float = 0.0
    # The mode's mask modality (data.masks) that tumour weighting reads, if any.
    mask: str | None = None
    # `augment.*`: SDA or ScoreAug in training mode (voxgen.diffusion.augment); None = off.
    augmentation: Augmentation | None = None

    def __post_init__(self):
        if self.encode is None:
            self.encode = already_encoded if self.space.cached else partial(encode_batch, self.space)

    @property
    def modalities(self) -> tuple[str, ...]:
        return self.mode.modalities

    @property
    def frozen(self) -> tuple[nn.Module, ...]:
        return self.space.frozen

    def meta_batch(self, batch_size: int) -> tuple[Parts, dict]:
        """(the parts to step, meta tensors shaped like one loaded batch), for the memory planner.

        A batch is what the data sets give: volumes {modality: (B, 1, D, H, W)} that the step
        encodes into the space, or codes {modality: (B, C', D', H', W')} when the space reads a
        latent cache. A network whose channels are overridden (`model.in_channels`, a network for
        another space) gets model-space tensors that fit it instead, split over the modalities
        (generated ones share its output channels, conditions the rest of its input channels),
        and the step does not encode them.
        """
        net, mode = self.network, self.mode
        vectors = {SIZE_BINS: torch.empty(batch_size, NUM_BINS, device="meta")} if mode.size_bins else {}
        if (net.in_channels, net.out_channels) == (net.data_in, net.data_out):
            channels, shape = (self.space.latent_channels, net.shape) if self.space.cached else (1, net.data_shape)
            return self, {m: torch.empty(batch_size, channels, *shape, device="meta") for m in mode.modalities} | vectors
        cond_channels = net.in_channels - net.out_channels - (NUM_BINS if mode.size_bins == "channels" else 0)
        if mode.conditions and cond_channels < len(mode.conditions) or not mode.conditions and cond_channels:
            raise ConfigError(
                f"model.in_channels={net.in_channels} and model.out_channels={net.out_channels} do not fit mode "
                f"{mode.name!r} (generates {', '.join(mode.generated)}; conditions: {', '.join(mode.conditions) or 'none'})"
            )

        def split(total: int, names) -> dict:
            sizes = [total // len(names) + (i < total % len(names)) for i in range(len(names))]
            return {n: torch.empty(batch_size, c, *net.shape, device="meta") for n, c in zip(names, sizes)}

        batch = split(net.out_channels, mode.generated)
        if mode.conditions:
            batch.update(split(cond_channels, mode.conditions))
        return replace(self, encode=already_encoded), batch | vectors

    def loss(self, batch: dict, draws: Draws | torch.Generator | None, step: int = 0) -> torch.Tensor:
        """Scalar loss of one batch (see `prediction_and_target`); the same at every step."""
        return self.strategy.loss(*prediction_and_target(self, batch, draws), **self.voxel_weight(batch))

    def evaluate(self, batch: dict, draws: Draws | torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        prediction, target, t = prediction_and_target(self, batch, draws)
        return self.strategy.loss(prediction, target, t, **self.voxel_weight(batch)), prediction, target

    def voxel_weight(self, batch: dict) -> dict:
        """{"voxel_weight": (B, 1, D, H, W)} from the batch's pixel-space tumour mask when
        `tumour_weight` > 0; {} otherwise, so the loss is the plain one."""
        if self.tumour_weight == 0:
            return {}
        return {"voxel_weight": tumour_weight_map(batch[self.mask], self.tumour_weight)}

    def scores(self, prediction: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
        """No measures beyond the loss."""
        return {}

    def preview(self, batch: dict, seed: int) -> list[np.ndarray]:
        """[a sample for the first item's conditions, the real case]: first generated modality, (D, H, W)."""
        from voxgen.diffusion.generate import generate
        from voxgen.diffusion.sampling import sampling_settings

        x0, cond = self.mode.split(self.encode(batch))
        cond = None if cond is None else cond[:1]
        sampling = sampling_settings(self.sample, self.strategy, cond is not None)
        sample = generate(self, [seed], cond, solver=sampling.solver, guidance_scale=sampling.guidance_scale).volumes
        real = decode_channels(self.space, x0[:1].float(), self.mode.generated)
        return [sample[0, 0].numpy(), real[0, 0].cpu().numpy()]

    def with_model(self, model: nn.Module) -> Parts:
        return replace(self, model=model)

    def prepare(self, train_set, val_set):
        """The space's statistics from the training split, and the data sets the steps read (with
        their masks' size-bin vectors for a size-bin mode).

        Items that carry a size-bin vector already (the profiler's random batch, shaped by
        `meta_batch`) are read as they are: their vector is what the step costs, not a count."""
        if self.mode.size_bins and SIZE_BINS not in train_set[0]:
            mask = self.mode.generated[0]
            train_set, val_set = WithSizeBins(train_set, mask), WithSizeBins(val_set, mask)
        return self.space.prepare(train_set, val_set)

    def state_dict(self) -> dict:
        return {"space": self.space.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if "space" in state:
            self.space.load_state_dict(state["space"])


def already_encoded(batch: dict) -> dict:
    """`Parts.encode` of batches that hold codes already (a latent cache, or the planner's
    model-space batches): the identity."""
    return batch


def prediction_and_target(
    parts: Parts, batch: dict, draws: Draws | torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The network's prediction for one batch {modality: (B, 1, D, H, W)} and the strategy's
    target for it, both (B, C, D', H', W') in the model's space, and the training times (B,)
    they were drawn at (for a loss weighted per sample); noise, times and the rest from each
    sample's own generator in `draws` (a generator seeds them: `Draws.of`).

    In training mode, conditions are replaced by the null condition with probability
    `parts.strategy.cond_dropout` per sample (classifier-free guidance), and `parts.augmentation`
    applies: SDA appends transformed copies at shifted times (so prediction, target and times
    have B + K rows), ScoreAug moves x_t, the target and the volume conditions by one transform
    per sample and gives the network the transform's code. Evaluation mode does neither, so
    validation losses compare the conditional, unaugmented model across steps.
    """
    z0, cond = parts.mode.split(parts.encode(batch))  # (B, C, D', H', W'), (B, K, D', H', W') or None
    draws = Draws.of(draws, z0.shape[0], z0.device)
    noise = draws.normal(z0.shape[1:], z0.dtype)
    t = parts.strategy.sample_time(draws)  # (B,)
    if cond is not None and parts.strategy.cond_dropout > 0 and parts.model.training:
        # Drawn after noise and times: runs without dropout keep their random streams.
        cond = parts.mode.drop_conditions(cond, parts.strategy.cond_dropout, draws)
    # Drawn last, and only when on: runs without augmentation keep their random streams.
    aug = parts.augmentation if parts.augmentation is not None and parts.augmentation.active(parts.model.training) else None
    if aug is not None and aug.method == "sda":
        noisier = partial(parts.strategy.noisier, shift=aug.noise_shift)
        z0, noise, t, cond = sda_batch(aug, z0, noise, t, cond, draws, noisier)  # (B + K, ...)
    x_t = parts.strategy.interpolate(z0, noise, t)
    target = omega = None
    if aug is not None and aug.method == "scoreaug":
        target = parts.strategy.target(z0, noise, t)
        x_t, target, cond, omega = scoreaug_batch(aug, x_t, target, cond, draws)
    with parts.autocast(z0.device):
        prediction = network_output(parts, x_t, t, cond, omega)
    # Otherwise the target is made after the forward, as it always was (the planner's peak).
    return prediction, target if target is not None else parts.strategy.target(z0, noise, t), t


def network_output(
    parts: Parts, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None, omega: torch.Tensor | None = None
) -> torch.Tensor:
    """The network's prediction at x_t (B, C, D', H', W') and strategy time t (B,), given the mode's
    condition: volume conditions join x_t along C, a size-bin vector goes next to the time.

    A network trained with ScoreAug's omega conditioning also takes the code of the transform
    x_t was moved by (B, 18) after the mode's vector; None (sampling, validation) is the
    identity's code, zeros."""
    x, vector = parts.mode.network_inputs(x_t, cond)
    time = parts.strategy.model_time(t)
    size = parts.augmentation.omega_size if parts.augmentation is not None else 0
    if size:
        if omega is None:
            omega = torch.zeros(x_t.shape[0], size, device=x_t.device, dtype=x_t.dtype)
        vector = omega if vector is None else torch.cat([vector, omega.to(vector.dtype)], dim=1)
    return parts.model(x, time) if vector is None else parts.model(x, time, vector)


def require_data_channels(cfg) -> None:
    """ConfigError unless the network of `cfg` takes the channels real data gives (training).

    Channel overrides that differ from the mode and space describe a network for another
    space (the seeds' latent presets): it can be planned, but a batch of real volumes does not
    fit it. Checked before the network is built.
    """
    mode, space = build_mode(cfg), build_space(cfg)
    net = network_of(cfg, mode, space)
    if (net.in_channels, net.out_channels) != (net.data_in, net.data_out):
        raise ConfigError(
            f"model.in_channels={net.in_channels} and model.out_channels={net.out_channels} do not match the "
            f"{net.data_in} -> {net.data_out} channels of mode {mode.name!r} in space={space.name}: this config "
            "describes a network for another space; it can be planned (voxgen plan) but not trained on these "
            "volumes (set both to null to derive them from mode and space)"
        )


def _in_space(message: str, space: str, network: NetworkShape, model_cfg) -> str:
    """A network factory's refusal, said of the grid the space gives it rather than of data.shape
    (the seeds' DiT on DC-AE latents crashed in the patch embedding: the code's grid, not the
    volume's, must divide by the patch size); with the patch sizes that would tile that grid."""
    grid = list(network.shape)
    said = message.replace("data.shape ", "the code grid ", 1)
    text = (
        f"space={space} gives the network a {network.in_channels}-channel grid {grid} for data.shape "
        f"{list(network.data_shape)}: {said}"
    )
    if "model.patch_size" in message:
        fits = [p for p in (1, 2, 4, 8) if all(g % p == 0 for g in grid)]
        text += f"; patch sizes that tile {grid}: {', '.join(map(str, fits))}"
    return text


def build_diffusion_task(
    cfg, device: torch.device | str = "cpu", *, training: bool = False, model: nn.Module | None = None
) -> Parts:
    """The diffusion task of `cfg` (`voxgen.tasks.TASKS`); training=True first refuses channel
    overrides that real batches do not fit (`require_data_channels`)."""
    if training:
        require_data_channels(cfg)
    return build_parts(cfg, device, model)


def build_parts(cfg, device: torch.device | str = "cpu", model: nn.Module | None = None) -> Parts:
    """Everything a step needs; the network is built on the CPU (or under the caller's device
    context) and moved to `device`. `model` replaces the registry's network (a network from
    elsewhere, planned by `voxgen plan --factory`)."""
    mode, space, strategy = build_mode(cfg), build_space(cfg), build_strategy(cfg)
    space.check(cfg.data.shape)
    if mode.size_bins and space.cached:
        raise ConfigError(
            f"mode={mode.name} reads the size bins of each batch's mask, which a latent cache does not keep: "
            "set space.cache=false (the encoder then runs in the step)"
        )
    mask = mask_modality(cfg, mode)
    tumour_weight = check_tumour_weight(cfg.training.tumour_weight, mode, mask, space.name)
    augmentation = build_augmentation(cfg.augment)
    network = network_of(cfg, mode, space)
    if augmentation is not None and augmentation.omega_size:
        # ScoreAug's transform code goes after the mode's vector (network_output).
        network = replace(network, vector_size=network.vector_size + augmentation.omega_size)
    if model is None and cfg.model.name == controlnet.NAME:
        # Not a registry family: it is built on a stage-1 run (its config and weights).
        model = controlnet.build_controlnet(cfg, network)
    elif model is None:
        try:
            channels = network.in_channels, network.out_channels
            model = build_model(cfg.model, *channels, network.shape, cfg.training.grad_checkpointing, network.vector_size)
        except ConfigError as exc:
            if space.name == "pixel":
                raise
            raise ConfigError(_in_space(str(exc), space.name, network, cfg.model)) from None
    return Parts(
        model.to(device),
        strategy,
        mode,
        space,
        network,
        autocast_policy(cfg.training.precision),
        sample=cfg.sample,
        tumour_weight=tumour_weight,
        mask=mask,
        augmentation=augmentation,
    )
