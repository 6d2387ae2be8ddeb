"""Autoencoders that compress volumes for `space=latent`: a KL autoencoder and a VQ-VAE, on MONAI.

Both follow the interface of every voxgen autoencoder (see `voxgen.models.compression`, which also holds
the rules for `autoencoder.factor`, the stage strides, the data shape and `model.num_res_blocks`):

- `KLAutoencoder` (Kingma & Welling 2014, "Auto-Encoding Variational Bayes"; the latent-diffusion
  first stage of Rombach et al. 2022) wraps MONAI's `AutoencoderKL`. `encode` is the posterior mean;
  `forward` decodes a sample mu + sigma * noise (noise from the caller's generator) and returns
  the KL divergence to N(0, I) (see `kl_divergence` for its normalisation).
- `VQAutoencoder` (van den Oord et al. 2017, "Neural Discrete Representation Learning") wraps
  MONAI's `VQVAE`. `encode` is the quantised code (every latent vector a codebook row); `forward`
  returns the quantisation loss.

Per-axis factors. MONAI builds every down-sampling with stride 2 on all axes; the factories set the
per-axis strides of `stage_strides` (and the matching up-sampling scales) on the built modules, which
changes no parameter shape.

`AUTOENCODERS` maps model.name to a factory (these two and `dcae`, from `voxgen.models.dcae`);
`build_autoencoder` builds the one model.name names.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from monai.networks.blocks import Convolution, Upsample
from monai.networks.nets import VQVAE, AutoencoderKL
from monai.networks.nets.autoencoderkl import AEKLDownsample
from torch import nn

from voxgen.errors import ConfigError
from voxgen.models.compression import (
    Triple,
    check_autoencoder_shape,
    check_factor,
    res_blocks_per_level,
    stage_strides,
)
from voxgen.models.dcae import build_dcae

# check_autoencoder_shape lives in voxgen.models.compression; voxgen.tasks.autoencoder imports it from here.
__all__ = [
    "AUTOENCODERS",
    "KLAutoencoder",
    "VQAutoencoder",
    "build_autoencoder",
    "build_autoencoder_kl",
    "build_vqvae",
    "check_autoencoder_shape",
    "kl_divergence",
]

# EMA decay of the VQ codebook (van den Oord et al. 2017, appendix A.1; MONAI's EMAQuantizer default).
VQ_CODEBOOK_DECAY = 0.99
# A code whose EMA cluster size (encodings per step it stands for, averaged) is under this is dead:
# unused for ~460 steps after one use per step (0.99^460 < 0.01), or never used yet.
VQ_DEAD_CODE_SIZE = 0.01


class _MonaiAutoencoder(nn.Module):
    """A MONAI autoencoder `net` (strides already set per axis) with the voxgen interface's attributes and decode."""

    def __init__(self, net: nn.Module, latent_channels: int, factor: Sequence[int]):
        super().__init__()
        self.net = net
        self.latent_channels = int(latent_channels)
        self.factor = tuple(factor)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(B, latent_channels, D', H', W') -> (B, 1, D, H, W)."""
        return self.net.decode(z)


class KLAutoencoder(_MonaiAutoencoder):
    """MONAI's AutoencoderKL with per-axis down-sampling and a seeded posterior sample."""

    def __init__(self, net: AutoencoderKL, factor: Sequence[int]):
        super().__init__(net, net.latent_channels, factor)

    def moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu, sigma) of the Gaussian posterior q(z|x), each (B, latent_channels, D/fD, H/fH, W/fW)."""
        return self.net.encode(x)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, D, H, W) -> the posterior mean (B, latent_channels, D/fD, H/fH, W/fW)."""
        return self.moments(x)[0]

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(reconstruction (B, 1, D, H, W), KL divergence (scalar, float32)) of one reparameterised sample.

        The noise comes from `generator` (not MONAI's randn_like) so a seeded step is reproducible."""
        mu, sigma = self.moments(x)
        noise = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        return self.decode(mu + sigma * noise), kl_divergence(mu, sigma)


def kl_divergence(mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma^2) || N(0, I)) in float32: summed over latent channels and voxels, averaged over the
    batch (the normalisation of MONAI's tutorials and of Rombach et al. 2022, for which kl_weight ~ 1e-6 is
    calibrated). mu, sigma: (B, C, D', H', W') -> scalar."""
    mu, sigma = mu.float(), sigma.float()
    per_voxel = 0.5 * (mu.square() + sigma.square() - 2 * torch.log(sigma) - 1)
    return per_voxel.flatten(1).sum(1).mean()


def _without_autocast(device: torch.device):
    """A region where autocast is off on `device` (devices without autocast, such as meta, have none to turn off)."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


class VQAutoencoder(_MonaiAutoencoder):
    """MONAI's VQVAE with per-axis down-sampling; the codebook is an EMA of the encodings."""

    def __init__(self, net: VQVAE, factor: Sequence[int]):
        super().__init__(net, net.embedding_dim, factor)

    @property
    def quantizer(self):
        """MONAI's EMAQuantizer (inside its VectorQuantizer wrapper, whose perplexity bookkeeping is skipped)."""
        return self.net.quantizer.quantizer

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, D, H, W) -> quantised code (B, latent_channels, D/fD, H/fH, W/fW): each vector a codebook row.
        Leaves the codebook as it is (its EMA moves only in `forward` in training mode)."""
        h = self.net.encode(x)
        # Nearest-codebook search in float32: bf16 distances would pick wrong codes.
        with _without_autocast(h.device):
            _, _, indices = self.quantizer.quantize(h.float())  # (B, D', H', W')
            return self.quantizer.embed(indices)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(reconstruction (B, 1, D, H, W), quantisation loss (scalar, float32)); `generator` draws the
        encodings that replace dead codes.

        The loss is commitment_cost * mean ||z_e - sg(e)||^2. The codebook term of van den Oord et al. is
        replaced by their EMA update of the codebook (appendix A.1), which MONAI's quantizer applies in
        training mode during this call; gradients reach the encoder through the straight-through estimator.
        """
        h = self.net.encode(x)
        with _without_autocast(h.device):
            if self.training:
                self._restart_dead_codes(h.detach().float(), generator)
            quantized, loss, _ = self.quantizer(h.float())
        return self.decode(quantized), loss

    @torch.no_grad()
    def _restart_dead_codes(self, h: torch.Tensor, generator: torch.Generator | None) -> None:
        """Give every dead code an encoding of this batch (Dhariwal et al. 2020, Jukebox, random restarts).

        Why: with the EMA update, a code no encoding picks keeps decaying its cluster size while its
        running sum does not follow, so it is divided by ~epsilon and drifts to huge norms (measured:
        mean code norm 9e4 after 80 steps, one code of 512 in use, every reconstruction the same).
        Before the first step every code is dead, so this is also a data-dependent initialisation:
        the codebook starts on the encoder's own outputs, not on N(0, 1) vectors far from them.
        """
        q = self.quantizer
        # Shape-static (a where over all codes, not an index of the dead ones): the planner traces it on meta.
        dead = (q.ema_cluster_size < VQ_DEAD_CODE_SIZE)[:, None]
        flat = h.movedim(1, -1).reshape(-1, q.embedding_dim)
        device = generator.device if generator is not None else flat.device
        pick = torch.randint(len(flat), (q.num_embeddings,), generator=generator, device=device).to(flat.device)
        vectors = flat[pick]
        q.embedding.weight.data.copy_(torch.where(dead, vectors, q.embedding.weight.data))
        q.ema_w.data.copy_(torch.where(dead, vectors, q.ema_w.data))
        q.ema_cluster_size.data.copy_(torch.where(dead[:, 0], 1.0, q.ema_cluster_size.data))
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # Every rank restarts on its own batch; rank 0's codebook is the one kept.
            for t in (q.embedding.weight.data, q.ema_w.data, q.ema_cluster_size.data):
                torch.distributed.broadcast(t, src=0)


def _set_kl_strides(net: AutoencoderKL, strides: list[Triple]) -> None:
    """Per-axis strides on MONAI's down-sampling (pad (0, 1) + 3^3 convolution of stride 2) and the inverse
    scales on its nearest-neighbour up-sampling. An axis kept at stride 1 gets padding (1, 1), so its size stays."""
    downs = [m for m in net.encoder.blocks if isinstance(m, AEKLDownsample)]
    ups = [m for m in net.decoder.blocks if isinstance(m, Upsample)]
    assert len(downs) == len(ups) == len(strides)
    for down, s in zip(downs, strides):
        down.conv.conv.stride = s
        # F.pad lists the last axis first.
        down.pad.pad = sum(((0, 1) if si == 2 else (1, 1) for si in reversed(s)), ())
    # The decoder's first up-sampling undoes the encoder's last down-sampling.
    for up, s in zip(ups, reversed(strides)):
        up.upsample_non_trainable.scale_factor = tuple(float(si) for si in s)


def build_autoencoder_kl(model_cfg, ae_cfg, *, grad_checkpointing: bool = False) -> KLAutoencoder:
    """MONAI AutoencoderKL, 1 channel in and out, with model.channels / num_res_blocks / attention_levels /
    norm_num_groups (MONAI's meaning) and autoencoder.latent_channels / factor. MONAI's non-local attention
    block at the bottleneck of encoder and decoder stays on (its default)."""
    channels = [int(c) for c in model_cfg.channels]
    factor = check_factor(ae_cfg.factor, len(channels), "autoencoder_kl")
    if len(model_cfg.attention_levels) != len(channels):
        raise ConfigError(
            f"model.attention_levels={list(model_cfg.attention_levels)} needs one entry per level of model.channels={channels}"
        )
    if any(c % model_cfg.norm_num_groups for c in channels):
        raise ConfigError(f"model.channels={channels} must all be multiples of model.norm_num_groups={model_cfg.norm_num_groups}")
    net = AutoencoderKL(
        spatial_dims=3,
        in_channels=1,
        out_channels=1,
        num_res_blocks=res_blocks_per_level(model_cfg.num_res_blocks, len(channels)),
        channels=channels,
        attention_levels=[bool(a) for a in model_cfg.attention_levels],
        latent_channels=ae_cfg.latent_channels,
        norm_num_groups=model_cfg.norm_num_groups,
        use_checkpoint=grad_checkpointing,
        use_flash_attention=model_cfg.attention == "sdpa",
    )
    _set_kl_strides(net, stage_strides(factor, len(channels) - 1))
    return KLAutoencoder(net, factor)


def _set_vq_strides(net: VQVAE, strides: list[Triple]) -> None:
    """Per-axis strides on the level convolutions of MONAI's VQVAE (3^3 kernels, padding 1): encoder level i + 1
    down-samples by strides[i]; the transposed convolution that undoes it gets output_padding stride - 1."""
    downs = [b for b in net.encoder.blocks if isinstance(b, Convolution)][:-1]  # one per level; the last maps to the latent
    ups = [b for b in net.decoder.blocks if isinstance(b, Convolution)][1:]  # the first maps from the latent
    assert len(downs) == len(ups) == len(strides) + 1
    for down, s in zip(downs[1:], strides):
        down.conv.stride = s
    for up, s in zip(ups[:-1], reversed(strides)):
        up.conv.stride = s
        up.conv.output_padding = tuple(si - 1 for si in s)


def build_vqvae(model_cfg, ae_cfg, *, grad_checkpointing: bool = False) -> VQAutoencoder:
    """MONAI VQVAE, 1 channel in and out, embedding_dim = autoencoder.latent_channels, codebook of
    autoencoder.num_embeddings with autoencoder.commitment_cost.

    Mapping of the model keys: model.channels are VQVAE's channels and num_res_channels, one level each; the
    first level keeps the resolution (a stride-1 stem from the one input channel) and each further level
    down-samples once, so len(channels) - 1 down-samplings as in the KL autoencoder. model.num_res_blocks is
    num_res_layers (VQVAE has one count for all levels). VQVAE has no attention and no normalisation layers:
    model.attention_levels and model.norm_num_groups do not apply to it.
    """
    channels = [int(c) for c in model_cfg.channels]
    factor = check_factor(ae_cfg.factor, len(channels), "vqvae")
    blocks = res_blocks_per_level(model_cfg.num_res_blocks, len(channels))
    if len(set(blocks)) != 1:
        raise ConfigError(f"model.num_res_blocks={blocks}: model.name=vqvae takes one count for every level (e.g. {blocks[0]})")
    levels = len(channels)
    net = VQVAE(
        spatial_dims=3,
        in_channels=1,
        out_channels=1,
        channels=channels,
        num_res_layers=blocks[0],
        num_res_channels=channels,
        # (stride, kernel, dilation, padding): 3^3 kernels so that stride 1 and stride 2 both keep sizes exact.
        downsample_parameters=[(1, 3, 1, 1)] + [(2, 3, 1, 1)] * (levels - 1),
        # (stride, kernel, dilation, padding, output_padding), decoder order; the last level is the stem's mirror.
        upsample_parameters=[(2, 3, 1, 1, 1)] * (levels - 1) + [(1, 3, 1, 1, 0)],
        num_embeddings=ae_cfg.num_embeddings,
        embedding_dim=ae_cfg.latent_channels,
        commitment_cost=ae_cfg.commitment_cost,
        decay=VQ_CODEBOOK_DECAY,
        use_checkpointing=grad_checkpointing,
    )
    _set_vq_strides(net, stage_strides(factor, levels - 1))
    return VQAutoencoder(net, factor)


# name -> factory(model_cfg, ae_cfg, *, grad_checkpointing=False); model.name picks one for task=autoencoder.
AUTOENCODERS = {
    "autoencoder_kl": build_autoencoder_kl,
    "vqvae": build_vqvae,
    "dcae": build_dcae,
}


def build_autoencoder(model_cfg, ae_cfg, *, grad_checkpointing: bool = False) -> nn.Module:
    """The autoencoder model.name names (a key of AUTOENCODERS), built from model.* and autoencoder.*;
    ConfigError naming model.name and the choices when it names none."""
    name = model_cfg.name
    if name not in AUTOENCODERS:
        raise ConfigError(f"model.name={name!r} is not an autoencoder: choose one of {', '.join(AUTOENCODERS)}")
    return AUTOENCODERS[name](model_cfg, ae_cfg, grad_checkpointing=grad_checkpointing)
