"""`task=translate`: paired volume-to-volume latent diffusion (CT enhancement, seed 003).

The network learns the target modality of a pair given its source (`translate.source`,
`translate.target`; a low-dose CT and the full-dose scan in the embedded pairs):

    clip      the same [T, h, w] window of consecutive slices cut from source and target (one position
              per sample, drawn from its own generator), each as the seed's 3 channels: CT windows
              of its Hounsfield units (`translate.windows`, voxgen.data.ct.window_channels)
    encode    z = VAE(clip): (B, 4, T, h/8, w/8); slices are never downsampled
    scale     both latents divided by the latents' running standard deviation (a buffer of the
              model, as batch norm keeps its statistics; Rombach et al. 2022 scale latents by the
              first batch's): the diffusion sees unit-scale latents whatever scale the trainable
              VAE drifts to, and sampling scales back by the same number
    diffuse   the strategy (seed: DDPM, cosine schedule, eps) noises the target latent; the UNet
              sees it concatenated with the source latent. With `translate.residual` what is
              diffused is the difference target - source latent instead, scaled by its own running
              deviation, and the sample is added back to the source (residual diffusion, as in
              ResShift, Yue et al. 2023): the sample is the source plus a correction, so the
              network's errors cost a fraction of the residual's scale, not of the image's

The objective is the strategy's loss while the UNet trains, plus `translate.reconstruction_weight`
times the VAE's L1 reconstruction error of both clips while the VAE trains: the noise loss alone
would let a trainable encoder shrink its latents towards zero. Which parts train when is
`training.phases` (voxgen.training.phases): the seed trains the UNet with the VAE frozen for an
epoch, then both, the VAE at 0.1x the rate (`training.lr_multipliers: {vae: 0.1}`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from voxgen.data.ct import window_channels
from voxgen.data.dataset import Intensity
from voxgen.diffusion.parts import NetworkShape
from voxgen.diffusion.strategies import Strategy, build_strategy
from voxgen.draws import Draws
from voxgen.errors import ConfigError
from voxgen.models.registry import build_model
from voxgen.models.video_vae import PixelSpace, VideoVAE, build_video_vae
from voxgen.precision import Autocast, autocast_policy
from voxgen.tasks import Stateless


def trains(module: nn.Module) -> bool:
    """Whether any parameter of `module` takes gradients now (voxgen.training.phases freezes parts)."""
    return any(p.requires_grad for p in module.parameters())


class TranslateModel(nn.Module):
    """What trains: the VAE and the UNet (parts `vae` and `unet`). `forward` runs the whole training
    computation of one batch of clips, so that a DDP wrapper sees every parameter used in one call."""

    # Momentum of the latents' running standard deviation (per training forward).
    LATENT_MOMENTUM = 0.99

    def __init__(self, vae: VideoVAE | PixelSpace, unet: nn.Module, strategy: Strategy, residual: bool = False):
        super().__init__()
        self.vae = vae
        self.unet = unet
        self.strategy = strategy  # not a module: no parameters, nothing to checkpoint
        self.residual = residual
        # The latents' running standard deviation and how many batches it has seen: buffers, so
        # checkpoints, the EMA copy and DDP's broadcast carry them. The first batch sets it.
        self.register_buffer("latent_std", torch.ones(()))
        self.register_buffer("latent_batches", torch.zeros((), dtype=torch.int64))
        if residual:
            # The running deviation of the scaled latents' difference, target - source, per
            # channel: in window channels the wide window's difference is 40x smaller than the
            # brain window's, and one number would let the network's errors swamp it.
            self.register_buffer("residual_std", torch.ones(vae.latent_channels))

    @torch.no_grad()
    def track_latent_std(self, z: torch.Tensor) -> None:
        """Move the running standard deviation towards that of the latents `z` (training only), and
        with `residual` that of the difference of the scaled target and source latents; the first
        batch sets them."""
        first = self.latent_batches == 0

        def track(buffer: torch.Tensor, std: torch.Tensor) -> None:
            buffer.copy_(torch.where(first, std, torch.lerp(buffer, std, 1.0 - self.LATENT_MOMENTUM)))

        track(self.latent_std, z.detach().float().std())
        if self.residual:
            source, target = (z.detach().float() / self.latent_std).chunk(2)
            track(self.residual_std, (target - source).transpose(0, 1).flatten(1).std(dim=1))
        self.latent_batches += 1

    def diffused(self, z_source: torch.Tensor, z_target: torch.Tensor) -> torch.Tensor:
        """What the strategy diffuses, from scaled latents: the target, or its scaled difference from the source."""
        return (z_target - z_source) / self.residual_std.view(1, -1, 1, 1, 1) if self.residual else z_target

    def target_latent(self, x0: torch.Tensor, z_source: torch.Tensor) -> torch.Tensor:
        """The inverse of `diffused`: the scaled target latent of a clean sample `x0`."""
        return z_source + x0 * self.residual_std.view(1, -1, 1, 1, 1) if self.residual else x0

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, z_source: torch.Tensor) -> torch.Tensor:
        """The UNet's prediction for noisy target latents x_t at training times t, given the scaled
        source latents: (B, C, T, h, w) each -> (B, C, T, h, w)."""
        return self.unet(torch.cat([x_t, z_source], dim=1), self.strategy.model_time(t))

    def forward(
        self, source: torch.Tensor, target: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, reconstruct: bool
    ) -> dict:
        """Clips (B, 3, T, H, W) of source and target, latent noise (B, C, T, H/8, W/8) and times (B,)
        -> {prediction, target (the strategy's), x_t, scale, and with `reconstruct` the VAE's
        reconstruction of source and target (2B, 3, T, H, W)}. The encoder keeps its graph only
        while the VAE trains; in training mode the batch moves the latents' running deviation."""
        with torch.set_grad_enabled(trains(self.vae) and torch.is_grad_enabled()):
            z = self.vae.encode(torch.cat([source, target]))  # (2B, C, T, h, w)
        if self.training:
            self.track_latent_std(z)
        scale = self.latent_std
        z_source, z_target = (z / scale).chunk(2)
        x0 = self.diffused(z_source, z_target)
        x_t = self.strategy.interpolate(x0, noise, t)
        out = {
            "prediction": self.denoise(x_t, t, z_source),
            "target": self.strategy.target(x0, noise, t),
            "x_t": x_t,
            "scale": scale,
            "z_source": z_source,
        }
        if reconstruct:
            out["reconstruction"] = self.vae.decode(z)
        return out


@dataclass
class TranslateTask(Stateless):
    # The loss runs the model only as `model(...)`: DDP and FSDP can wrap it.
    parallel: ClassVar[bool] = True
    model: TranslateModel
    source: str
    target: str
    # [T, h, w] of the clips the steps train on.
    clip: tuple[int, int, int]
    windows: tuple[tuple[float, float], ...]
    intensity: Intensity
    reconstruction_weight: float
    autocast: Autocast
    network: NetworkShape

    @property
    def modalities(self) -> tuple[str, ...]:
        return (self.source, self.target)

    @property
    def frozen(self) -> tuple[nn.Module, ...]:
        return ()

    @property
    def strategy(self) -> Strategy:
        return self.model.strategy

    # ---- clips ------------------------------------------------------------------------
    def channels(self, x: torch.Tensor) -> torch.Tensor:
        """Volumes in model space (B, 1, ...) (data.intensity=fixed) -> the network's window channels (B, 3, ...)."""
        return window_channels(self.intensity.to_units(x), self.windows)

    def clips(self, batch: dict, draws: Draws) -> tuple[torch.Tensor, torch.Tensor]:
        """(source, target) window channels of one clip per sample, (B, 3, T, h, w) each, at a
        position drawn from the sample's generator (the same window of both volumes of a pair)."""
        source, target = batch[self.source].float(), batch[self.target].float()
        starts = torch.stack([draws.integers(size - c + 1) for size, c in zip(source.shape[2:], self.clip)], dim=1)  # (B, 3)
        if source.device.type == "meta":  # the planner: positions do not change what a step holds
            starts = torch.zeros((len(source), 3), dtype=torch.int64)
        corners = [tuple(int(v) for v in row) for row in starts.cpu()]
        return self.channels(cut(source, corners, self.clip)), self.channels(cut(target, corners, self.clip))

    # ---- training ---------------------------------------------------------------------
    def terms(self, batch: dict, draws: Draws | torch.Generator | None, every: bool = False) -> dict:
        """The parts of the objective of one batch, float32: diffusion (the strategy's loss) while the
        UNet trains, reconstruction (L1 of both clips) while the VAE trains, or both with `every`;
        and the model's output, the clips and the times."""
        n = len(batch[self.source])
        draws = Draws.of(draws, n, batch[self.source].device)
        source, target = self.clips(batch, draws)
        noise = draws.normal(self.network.sample_shape)  # (B, C, T, h, w)
        t = self.strategy.sample_time(draws)
        reconstruct = every or trains(self.model.vae)
        with self.autocast(source.device):
            out = self.model(source, target, noise, t, reconstruct)
        terms = {"out": out, "target_clip": target, "t": t}
        if every or trains(self.model.unet):
            terms["diffusion"] = self.strategy.loss(out["prediction"].float(), out["target"].float(), t)
        if reconstruct:
            terms["reconstruction"] = (out["reconstruction"].float() - torch.cat([source, target])).abs().mean()
        return terms

    def loss(self, batch: dict, draws: Draws | torch.Generator | None, step: int) -> torch.Tensor:
        """Diffusion loss + reconstruction_weight x reconstruction loss, of the parts that train."""
        terms = self.terms(batch, draws)
        total = terms.get("diffusion", 0.0)
        if "reconstruction" in terms:
            total = total + self.reconstruction_weight * terms["reconstruction"]
        return total

    def evaluate(self, batch: dict, draws: Draws | torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(the whole objective, whichever parts train now, so values compare across phases; the
        target clip decoded from the network's one-step estimate of it; the target clip)."""
        terms = self.terms(batch, draws, every=True)
        out = terms["out"]
        loss = terms["diffusion"] + self.reconstruction_weight * terms["reconstruction"]
        x0 = self.strategy.x0_from(out["x_t"].float(), out["prediction"].float(), terms["t"])
        z0 = self.model.target_latent(x0, out["z_source"].float())
        with self.autocast(z0.device):
            estimate = self.model.vae.decode(z0 * out["scale"]).float()
        return loss, estimate, terms["target_clip"]

    # ---- enhancing ----------------------------------------------------------------------
    @torch.no_grad()
    def enhance_clips(self, source: torch.Tensor, sampler, grid: torch.Tensor, generators) -> torch.Tensor:
        """Window channels of source clips (B, 3, T, H, W) -> the enhanced clips' channels, by the
        sampler from noise (one CPU generator per clip) to the target latent, decoded."""
        vae, device = self.model.vae, source.device
        scale = self.model.latent_std
        with self.autocast(device):
            z_source = vae.encode(source).float() / scale
        x = torch.stack([torch.randn(tuple(z_source.shape[1:]), generator=g) for g in generators]).to(device)

        def predict(x_t: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
            with self.autocast(device):
                return self.model.unet(torch.cat([x_t, z_source], dim=1), self.strategy.model_time(t)).float()

        z = self.model.target_latent(sampler(predict, x, grid, cond=None, generator=generators), z_source)
        with self.autocast(device):
            return vae.decode(z * scale).float()

    def preview(self, batch: dict, seed: int) -> list[np.ndarray]:
        """[enhanced, target, source] of the first pair's centre clip, its first window (D, H, W)."""
        from voxgen.diffusion.noise import seeded_generators
        from voxgen.diffusion.samplers import parse_solver, prepare

        sampler, grid = prepare(parse_solver(f"{self.strategy.default_sampler}:10"), self.strategy)
        one = {m: batch[m][:1].float() for m in self.modalities}
        source, target = (self.channels(centre_clip(one[m], self.clip)) for m in self.modalities)
        enhanced = self.enhance_clips(source, sampler, grid, seeded_generators([seed]))
        return [x[0, 0].cpu().numpy() for x in (enhanced, target, source)]

    # ---- the task protocol --------------------------------------------------------------
    def meta_batch(self, batch_size: int) -> tuple[TranslateTask, dict]:
        shape = (batch_size, 1, *self.network.data_shape)
        return self, {m: torch.empty(shape, device="meta") for m in self.modalities}


def cut(x: torch.Tensor, corners: list[tuple[int, int, int]], clip) -> torch.Tensor:
    """(B, C, D, H, W) -> (B, C, T, h, w): item i's window of size `clip` at corners[i]."""
    return torch.stack([x[i, :, d : d + clip[0], h : h + clip[1], w : w + clip[2]] for i, (d, h, w) in enumerate(corners)])


def centre_clip(x: torch.Tensor, clip) -> torch.Tensor:
    """(B, C, D, H, W) -> (B, C, T, h, w): the window of size `clip` at the centre of the volume."""
    d, h, w = ((size - c) // 2 for size, c in zip(x.shape[2:], clip))
    return x[:, :, d : d + clip[0], h : h + clip[1], w : w + clip[2]]


def check_clip(clip, data_shape, factor) -> tuple[int, int, int]:
    """`translate.clip` as a tuple; ConfigError unless [T, h, w] fits data.shape and h, w divide by the VAE's factor."""
    clip = tuple(int(c) for c in clip)
    if len(clip) != 3 or min(clip) < 1:
        raise ConfigError(f"translate.clip={list(clip)} must be [slices, H, W] of positive sizes")
    if any(c > s for c, s in zip(clip, data_shape)):
        raise ConfigError(
            f"translate.clip={list(clip)} is larger than the volumes, data.shape={list(data_shape)}: "
            f"a clip of {clip[0]} slices needs volumes of at least {clip[0]} slices"
        )
    if clip[1] % factor[1] or clip[2] % factor[2]:
        raise ConfigError(f"translate.clip={list(clip)}: H and W must be multiples of the VAE's factor {factor[1]}")
    return clip


def build_translate_task(cfg, device: torch.device | str = "cpu", *, training: bool = False) -> TranslateTask:
    """The translate task of `cfg` with its networks on `device`; ConfigError for an impossible geometry,
    data not in fixed (HU) intensities, or windows that are not [low, high] pairs."""
    tc = cfg.translate
    if cfg.data.intensity != "fixed":
        raise ConfigError(
            "task=translate works in Hounsfield units: set data.intensity=fixed (and data.intensity_range to the "
            "scanner's range, default [-1024, 3071])"
        )
    windows = tuple((float(lo), float(hi)) for lo, hi in tc.windows)
    if not windows or any(hi <= lo for lo, hi in windows):
        raise ConfigError(f"translate.windows={[list(w) for w in windows]} must be [low, high] pairs with low < high")
    if tc.source == tc.target:
        raise ConfigError(f"translate.source and translate.target are both {tc.source!r}: name two modalities")
    vae = build_video_vae(
        channels=tuple(tc.vae_channels),
        in_channels=len(windows),
        latent_channels=tc.latent_channels,
        num_res_blocks=tc.vae_num_res_blocks,
        norm_num_groups=cfg.model.norm_num_groups,
        grad_checkpointing=cfg.training.grad_checkpointing,
    )
    clip = check_clip(tc.clip, cfg.data.shape, vae.factor)
    latent = (clip[0], clip[1] // vae.factor[1], clip[2] // vae.factor[2])
    z = vae.latent_channels
    unet = build_model(cfg.model, 2 * z, z, latent, cfg.training.grad_checkpointing)
    model = TranslateModel(vae, unet, build_strategy(cfg), residual=bool(tc.residual)).to(device)
    return TranslateTask(
        model=model,
        source=tc.source,
        target=tc.target,
        clip=clip,
        windows=windows,
        intensity=Intensity.of(cfg.data),
        reconstruction_weight=float(tc.reconstruction_weight),
        autocast=autocast_policy(cfg.training.precision),
        network=NetworkShape(2 * z, z, latent, len(windows), len(windows), tuple(int(s) for s in cfg.data.shape)),
    )
